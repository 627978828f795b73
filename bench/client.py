"""Open-loop streaming load client for any OpenAI-compatible `/v1/completions` endpoint.

Each request of a `Workload` is sent at its arrival time whatever happened to the earlier ones (open
loop), with `stream: true`, `stream_options.include_usage`, `ignore_eos: true`, `max_tokens` = the
asked output length and temperature 0. Per request it records the send time, the time to the first
token (first SSE chunk carrying text), every gap between text chunks, the end-to-end latency, the output
token count (from the final usage chunk when the server sends one) and any error. One chunk may carry
several tokens (a server that batches its stream, or a detokenizer holding back an incomplete UTF-8
character): `output_tokens - num_chunks` counts the tokens that arrived bundled with others; the
gaps are per chunk, as a client sees them.

Everything is bounded: a per-request timeout (whole request, not per read), a run deadline after
which unfinished requests are cancelled and recorded as errors, and a connection pool as large as the
number of requests so the client itself never queues a request.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx

from bench.results import RequestResult, RunResult
from bench.workload import PromptBuilder, RequestSpec, Workload

MAX_CONNECTIONS = 4096
MAX_ERROR_CHARS = 300


def completions_url(url: str) -> str:
    """Accepts `http://host:port`, `.../v1` or the full `.../v1/completions`."""
    u = url.rstrip("/")
    if u.endswith("/completions"):
        return u
    if u.endswith("/v1"):
        return u + "/completions"
    return u + "/v1/completions"


def models_url(url: str) -> str:
    return completions_url(url).removesuffix("/completions") + "/models"


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def fetch_model(url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The first model id the server lists at /v1/models."""
    async with httpx.AsyncClient(timeout=timeout_s) as c:
        r = await c.get(models_url(url), headers=_headers(api_key))
        r.raise_for_status()
        data = r.json().get("data") or []
        if not data:
            raise RuntimeError(f"{models_url(url)} lists no models")
        return data[0]["id"]


def _error_text(body: bytes) -> str:
    try:
        d = json.loads(body)
        msg = d.get("error", {}).get("message") if isinstance(d.get("error"), dict) else d.get("detail")
        if msg:
            return str(msg)[:MAX_ERROR_CHARS]
    except (ValueError, AttributeError):
        pass
    return body.decode(errors="replace")[:MAX_ERROR_CHARS]


async def _stream_one(client: httpx.AsyncClient, url: str, payload: dict, headers: dict,
                      res: RequestResult, t_send: float) -> None:
    """Send one request and fill `res` from its SSE stream (raises on transport errors)."""
    last_chunk_t: float | None = None
    async with client.stream("POST", url, json=payload, headers=headers) as resp:
        res.status = resp.status_code
        if resp.status_code != 200:
            body = await resp.aread()
            res.error = f"HTTP {resp.status_code}: {_error_text(body)}"
            return
        done = False
        async for line in resp.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                done = True
                break
            now = time.perf_counter()
            try:
                chunk = json.loads(data)
            except ValueError:
                res.error = f"bad SSE data: {data[:MAX_ERROR_CHARS]}"
                return
            if "error" in chunk:
                err = chunk["error"]
                res.error = "stream error: " + str(err.get("message") if isinstance(err, dict) else err)
                return
            usage = chunk.get("usage")
            if usage:
                res.usage_reported = True
                res.output_tokens = int(usage.get("completion_tokens") or 0)
                res.server_prompt_tokens = usage.get("prompt_tokens")
            for choice in chunk.get("choices") or ():
                text = choice.get("text")
                if text is None:  # chat-style servers
                    text = (choice.get("delta") or {}).get("content")
                if text:
                    if last_chunk_t is None:
                        res.ttft_s = now - t_send
                    else:
                        res.itl_s.append(now - last_chunk_t)
                    last_chunk_t = now
                    res.num_chunks += 1
        res.e2e_s = time.perf_counter() - t_send
        if not res.usage_reported:
            res.output_tokens = res.num_chunks
        if not done:
            res.error = "stream ended without [DONE]"
        elif res.num_chunks == 0 and res.max_tokens > 0:
            res.error = "no tokens received"


async def _one(client: httpx.AsyncClient, url: str, model: str, spec: RequestSpec,
               res: RequestResult, prompt, headers: dict, t0: float, timeout_s: float,
               on_done: Callable[[RequestResult], None] | None,
               tenant_keys: dict[str, str] | None = None) -> None:
    delay = t0 + spec.arrival_s - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    payload = {"model": model, "prompt": prompt, "max_tokens": spec.output_tokens,
               "temperature": 0.0, "stream": True, "stream_options": {"include_usage": True},
               "ignore_eos": True}
    if spec.tenant is not None:
        key = (tenant_keys or {}).get(spec.tenant)
        if key is not None:
            headers = _headers(key)
        else:
            payload["user"] = spec.tenant
    t_send = time.perf_counter()
    res.send_s = t_send - t0
    try:
        async with asyncio.timeout(timeout_s):
            await _stream_one(client, url, payload, headers, res, t_send)
    except TimeoutError:
        res.error = f"timeout after {timeout_s:g} s"
    except httpx.HTTPError as e:
        res.error = f"{type(e).__name__}: {str(e)[:MAX_ERROR_CHARS]}"
    except asyncio.CancelledError:
        res.error = res.error or "cancelled at the run deadline"
        raise
    finally:
        if res.e2e_s is None and res.error is None:
            res.error = "unfinished"
        if on_done is not None:
            on_done(res)


async def run_load(workload: Workload, url: str, *, model: str | None = None,
                   api_key: str | None = None, timeout_s: float = 120.0,
                   run_timeout_s: float | None = None, prompts: PromptBuilder | None = None,
                   on_done: Callable[[RequestResult], None] | None = None,
                   tenant_keys: dict[str, str] | None = None) -> RunResult:
    """Send every request of `workload` at its arrival time and record what came back.

    `timeout_s` bounds each request; `run_timeout_s` (default: last arrival + timeout_s + 5 s) bounds
    the whole run: at that deadline unfinished requests are cancelled and recorded as errors.
    `on_done` is called as each request finishes (for progress display). A request with a
    `tenant` is sent with that tenant's key from `tenant_keys`, or else as the `user` field."""
    prompts = prompts or PromptBuilder()
    headers = _headers(api_key)
    if model is None:
        model = await fetch_model(url, api_key, timeout_s=min(timeout_s, 10.0))
    if run_timeout_s is None:
        run_timeout_s = workload.duration_s + timeout_s + 5.0
    target = completions_url(url)
    built = [prompts.prompt(spec) for spec in workload]  # before the clock starts, in arrival order
    results = [RequestResult(i, s.prompt_tokens, s.output_tokens, s.arrival_s, tenant=s.tenant)
               for i, s in enumerate(workload)]
    n = max(1, min(len(workload), MAX_CONNECTIONS))
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    # per-operation timeouts are a backstop; the per-request asyncio timeout is the real bound
    timeout = httpx.Timeout(timeout_s, pool=timeout_s)
    timed_out = False
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        started_at = time.time()
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(_one(client, target, model, spec, res, prompt, headers, t0,
                                          timeout_s, on_done, tenant_keys))
                 for spec, res, prompt in zip(workload, results, built)]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=run_timeout_s)
            if pending:
                timed_out = True
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=5.0)
        t_end = time.perf_counter()
    for r in results:
        if r.send_s is None and r.error is None:
            r.error = "not sent before the run deadline"
    sent = [r.send_s for r in results if r.send_s is not None]
    ends = [r.send_s + r.e2e_s for r in results if r.send_s is not None and r.e2e_s is not None]
    first = min(sent) if sent else 0.0
    last = max(ends) if (ends and not timed_out) else t_end - t0
    return RunResult(target, model, results, max(last - first, 1e-9), started_at, timed_out)
