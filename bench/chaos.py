"""The chaos run: a seeded mix of well-behaved and hostile traffic against a prefill/decode
deployment, one replica SIGKILLed midway and one KV transfer corrupted, then a check that nothing
hung, nothing leaked and the server still answers.

    tandem bench-chaos [--num-requests 1000] [--kill-role prefill] [--model DIR] [--json out.json]
    tandem bench-chaos --url http://127.0.0.1:8000      # an already running server

Without --url it starts `tandem serve` itself: 1 hybrid + 1 prefill + 1 decode replica, pd routing
with a small offload threshold (so long prompts go through a KV transfer), a small admission
bound (so bursts get 429) and TANDEM_KV_FAULT=corrupt:N (the prefill replica corrupts its N-th KV
frame; after a restart it counts again).

Traffic (all choices from --seed; timing is not reproducible, the plan is): non-streaming and
streaming completions and chat completions with n in 1..3, some over the offload threshold;
streams cancelled by the client after a random number of chunks; requests whose client timeout
is shorter than the request; invalid requests that must get a 4xx with an OpenAI error body;
bursts that overflow the admission bound so some get 429 with Retry-After. Every request is
classified:

  ok        every choice ended with finish_reason stop/length (an SSE stream also with [DONE])
  cancelled we gave up first: a stream closed after k chunks, or a client timeout
  failed    cleanly: a 4xx/5xx with an OpenAI body {"error": {...}} (429/503 with Retry-After),
            or a stream that sent `data: {"error": ...}` and then `data: [DONE]`
  hung      no end within the hard per-request deadline (--deadline)
  bare      a defect: an error without an OpenAI body, 429/503 without Retry-After, a reset
            connection, a stream that ends without [DONE], a 200 with a choice that has no
            proper finish_reason, or an invalid request that was not answered with a 4xx

Midway one replica of --kill-role is SIGKILLed (pid from /health); its recovery time is the time
until /health shows that replica healthy again with a new pid. After the load the run waits
(bounded) until every replica reports all KV blocks free and no live KV transfers, then one more
request must succeed. The exit status is 1 if anything hung, leaked, failed barely, the killed
replica did not come back, or the final request failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from bench.workload import PROMPT_WORDS

OK_REASONS = ("stop", "length")
ROLES = ("prefill", "decode", "hybrid", "none")

KIND_WEIGHTS = {
    "completion": 0.18, "completion_stream": 0.14, "chat": 0.14, "chat_stream": 0.12,
    "cancel": 0.14, "timeout": 0.1, "bad": 0.1,
}
"""Share of each kind among the requests that are not part of a burst."""


@dataclass
class ChaosConfig:
    num_requests: int = 1000
    seed: int = 0
    concurrency: int = 8
    """Requests in flight outside the bursts."""
    deadline_s: float = 60.0
    """Hard per-request deadline: a request without an end by then counts as hung."""
    max_tokens: int = 48
    """Upper end of max_tokens of ordinary requests."""
    offload_threshold: int = 64
    """Long prompts have more tokens than this (so pd routing offloads them)."""
    long_prompt_max: int = 320
    long_fraction: float = 0.3
    burst_size: int = 32
    num_bursts: int | None = None
    """Default: one per 250 requests (at least one)."""
    kill_role: str = "prefill"
    kill_at: float = 0.5
    """Share of the requests dispatched before the kill."""
    recovery_timeout_s: float = 120.0
    drain_timeout_s: float = 30.0

    @property
    def bursts(self) -> int:
        if self.num_bursts is not None:
            return self.num_bursts
        return max(1, self.num_requests // 250)


DEFAULTS = ChaosConfig()
"""The plan's defaults, which the command line's defaults are."""


@dataclass
class Spec:
    """One planned request."""

    index: int
    kind: str
    path: str                       # "/v1/completions" or "/v1/chat/completions"
    body: Any                       # dict, or bytes sent as is (bad inputs)
    stream: bool = False
    n: int = 1
    long: bool = False
    cancel_after: int | None = None
    """Close the stream after this many data chunks."""
    client_timeout_s: float | None = None
    burst: int | None = None
    bad: str | None = None
    """Name of the invalid input."""
    retry_after_s: float | None = None
    """Set from the Retry-After of a 429/503 answer (the dispatcher backs off that long)."""


@dataclass
class Outcome:
    index: int
    kind: str
    outcome: str                    # ok | cancelled | failed | hung | bare
    key: str = ""                   # failed: "429", "400", "stream:<code>"; bare: short cause
    status: int | None = None
    detail: str = ""
    start_s: float = 0.0
    latency_s: float = 0.0
    stream: bool = False
    n: int = 1
    long: bool = False
    bad: str | None = None


@dataclass
class KillReport:
    role: str
    replica: str | None = None
    old_pid: int | None = None
    new_pid: int | None = None
    killed_at_s: float | None = None
    recovery_s: float | None = None
    skipped: str | None = None


@dataclass
class ChaosResult:
    url: str
    model: str
    config: dict
    outcomes: list[Outcome]
    wall_s: float
    kill: KillReport
    kv_fault: str | None
    final_health: dict
    drained: bool
    leaked_blocks: int
    live_transfers: int
    unhealthy_replicas: list[str]
    final_ok: bool
    final_detail: str
    metrics: dict[str, float] = field(default_factory=dict)

    def counts(self) -> Counter:
        return Counter(o.outcome for o in self.outcomes)

    def failed_by_key(self) -> dict[str, int]:
        return dict(sorted(Counter(o.key for o in self.outcomes if o.outcome == "failed").items()))

    def bare_by_key(self) -> dict[str, int]:
        return dict(sorted(Counter(o.key for o in self.outcomes if o.outcome == "bare").items()))

    def figures(self) -> dict:
        c = self.counts()
        bad = [o for o in self.outcomes if o.bad]
        return {
            "sent": len(self.outcomes), "ok": c["ok"], "cancelled": c["cancelled"],
            "cancelled_mid_stream": sum(o.outcome == "cancelled" and o.kind == "cancel"
                                        for o in self.outcomes),
            "cancelled_client_timeout": sum(o.outcome == "cancelled" and o.kind == "timeout"
                                            for o in self.outcomes),
            "failed_cleanly": c["failed"], "failed_by_status": self.failed_by_key(),
            "hung": c["hung"], "bare_failures": c["bare"], "bare_by_cause": self.bare_by_key(),
            "server_errors": len(self.server_errors()),
            "status_429": sum(o.outcome == "failed" and o.status == 429 for o in self.outcomes),
            "bad_inputs": len(bad),
            "bad_inputs_4xx": sum(o.outcome == "failed" and o.status is not None and 400 <= o.status < 500
                                  for o in bad),
            "leaked_blocks": self.leaked_blocks, "live_transfers": self.live_transfers,
            "drained": self.drained, "unhealthy_replicas": self.unhealthy_replicas,
            "killed_role": self.kill.role if self.kill.replica else None,
            "killed_replica": self.kill.replica, "kill_skipped": self.kill.skipped,
            "recovery_s": self.kill.recovery_s, "final_request_ok": self.final_ok,
            "final_request_detail": self.final_detail, "kv_fault": self.kv_fault,
            "max_latency_s": max((o.latency_s for o in self.outcomes if o.outcome != "hung"), default=0.0),
            "wall_s": self.wall_s, "metrics": self.metrics,
        }

    def server_errors(self) -> list[Outcome]:
        """Clean failures that are still the server's fault (a 5xx other than 503, or a stream error
        other than service_unavailable): not defects of form, but worth a look."""
        return [o for o in self.outcomes if o.outcome == "failed" and (
            (o.status is not None and o.status >= 500 and o.status != 503)
            or (o.key.startswith("stream:") and o.key != "stream:service_unavailable"))]

    def problems(self) -> list[str]:
        f = self.figures()
        out = []
        if f["hung"]:
            out.append(f"{f['hung']} requests hung")
        if f["bare_failures"]:
            out.append(f"{f['bare_failures']} bare failures {f['bare_by_cause']}")
        if f["leaked_blocks"]:
            out.append(f"{f['leaked_blocks']} KV blocks leaked")
        if f["live_transfers"]:
            out.append(f"{f['live_transfers']} KV transfers still live")
        if self.unhealthy_replicas:
            out.append(f"replicas unhealthy at the end: {self.unhealthy_replicas}")
        if self.kill.replica and self.kill.recovery_s is None:
            out.append(f"killed replica {self.kill.replica} did not come back")
        if not self.final_ok:
            out.append(f"final request failed: {self.final_detail}")
        return out

    def to_json(self) -> dict:
        return {"kind": "chaos", "url": self.url, "model": self.model, "config": self.config,
                **self.figures(), "kill": asdict(self.kill), "problems": self.problems(),
                "final_health": self.final_health,
                "defects": [asdict(o) for o in self.outcomes if o.outcome in ("bare", "hung")],
                "server_error_requests": [asdict(o) for o in self.server_errors()],
                "requests": [asdict(o) for o in self.outcomes]}


# ---- the plan ---------------------------------------------------------------------------------

def _words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(PROMPT_WORDS) for _ in range(n)).strip()


def _prompt_len(rng: random.Random, cfg: ChaosConfig, long: bool) -> int:
    if long:
        return rng.randint(cfg.offload_threshold + 16, max(cfg.offload_threshold + 16, cfg.long_prompt_max))
    return rng.randint(3, max(3, cfg.offload_threshold // 2))


def _sampling(rng: random.Random, body: dict) -> dict:
    body["temperature"] = rng.choice([0.0, 0.0, 0.7, 1.0])
    if rng.random() < 0.3:
        body["seed"] = rng.randint(0, 2**31)
    if rng.random() < 0.5:
        body["ignore_eos"] = True
    if rng.random() < 0.1:
        body["stop"] = [rng.choice(PROMPT_WORDS).strip()]
    return body


def _completion(rng, cfg, model, long: bool, max_tokens: int, n: int, stream: bool) -> dict:
    length = _prompt_len(rng, cfg, long)
    if rng.random() < 0.5:   # exact token ids (ids 1000..9999 are ordinary tokens of the vocabulary)
        prompt: Any = [rng.randrange(1000, 10000) for _ in range(length)]
    else:
        prompt = _words(rng, length)
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "n": n, "stream": stream}
    if stream and rng.random() < 0.3:
        body["stream_options"] = {"include_usage": True}
    return _sampling(rng, body)


def _chat(rng, cfg, model, long: bool, max_tokens: int, n: int, stream: bool) -> dict:
    messages = [{"role": "user", "content": _words(rng, _prompt_len(rng, cfg, long))}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are terse."})
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "n": n, "stream": stream}
    return _sampling(rng, body)


def _bad_inputs(model: str) -> list[tuple[str, str, Any]]:
    """(name, path, body) of requests that must be refused with a 4xx and an OpenAI error body."""
    c, ch = "/v1/completions", "/v1/chat/completions"
    ok = {"model": model, "prompt": "hello", "max_tokens": 4}
    okc = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    return [
        ("invalid_json", c, b'{"model": "' + model.encode() + b'", "prompt": "hi", '),
        ("not_an_object", ch, b"[1, 2, 3]"),
        ("unknown_model", c, {**ok, "model": "no-such-model"}),
        ("missing_prompt", c, {"model": model, "max_tokens": 4}),
        ("prompt_wrong_type", c, {**ok, "prompt": {"text": "hi"}}),
        ("negative_max_tokens", c, {**ok, "max_tokens": -5}),
        ("temperature_out_of_range", c, {**ok, "temperature": 7}),
        ("n_zero", c, {**ok, "n": 0}),
        ("token_out_of_vocab", c, {**ok, "prompt": [1000, 10**9]}),
        ("context_length_exceeded", c, {**ok, "max_tokens": 10**8}),
        ("too_many_stop", c, {**ok, "stop": ["a"] * 20}),
        ("logit_bias", c, {**ok, "logit_bias": {"1000": 5}}),
        ("empty_messages", ch, {**okc, "messages": []}),
        ("bad_role", ch, {**okc, "messages": [{"role": "wizard", "content": "hi"}]}),
        ("top_p_zero", ch, {**okc, "top_p": 0}),
        ("top_logprobs_without_logprobs", ch, {**okc, "top_logprobs": 2}),
    ]


def build_plan(cfg: ChaosConfig, model: str) -> list[Spec]:
    """The requests of a run, in dispatch order (a pure function of the config and model id)."""
    rng = random.Random(cfg.seed)
    bursts = min(cfg.bursts, cfg.num_requests // max(1, cfg.burst_size))
    n_single = cfg.num_requests - bursts * cfg.burst_size
    # Bursts start at evenly spread points (none at the very start, one shortly after the kill).
    burst_at = sorted({round(n_single * (i + 1) / (bursts + 1)) for i in range(bursts)})
    kinds, weights = zip(*KIND_WEIGHTS.items())
    bad = _bad_inputs(model)
    specs: list[Spec] = []
    burst_id = 0

    def add_single() -> None:
        i = len(specs)
        kind = rng.choices(kinds, weights)[0]
        long = rng.random() < cfg.long_fraction
        n = rng.randint(1, 3)
        if kind == "bad":
            name, path, body = bad[rng.randrange(len(bad))]
            if isinstance(body, dict):
                body = {**body, "stream": rng.random() < 0.5}
            specs.append(Spec(i, kind, path, body, stream=isinstance(body, dict) and body["stream"],
                              bad=name))
            return
        chat = kind.startswith("chat") or (kind in ("cancel", "timeout") and rng.random() < 0.5)
        stream = kind.endswith("_stream") or kind == "cancel" or (kind == "timeout" and rng.random() < 0.5)
        max_tokens = rng.randint(1, cfg.max_tokens)
        spec = Spec(i, kind, "/v1/chat/completions" if chat else "/v1/completions", None,
                    stream=stream, n=n, long=long)
        if kind == "cancel":
            max_tokens = rng.randint(cfg.max_tokens // 2 + 1, cfg.max_tokens * 2)
            spec.cancel_after = rng.randint(1, 6)
        elif kind == "timeout":
            max_tokens = rng.randint(cfg.max_tokens, cfg.max_tokens * 3)
            spec.client_timeout_s = round(rng.uniform(0.05, 1.0), 3)
        build = _chat if chat else _completion
        spec.body = build(rng, cfg, model, long, max_tokens, n, stream)
        if kind in ("cancel", "timeout"):
            spec.body["ignore_eos"] = True   # long enough to be cut short
        specs.append(spec)

    for k in range(n_single):
        while burst_id < len(burst_at) and burst_at[burst_id] == k:
            for _ in range(cfg.burst_size):
                n = rng.randint(1, 3)
                body = _completion(rng, cfg, model, False, rng.randint(8, cfg.max_tokens), n, False)
                specs.append(Spec(len(specs), "burst", "/v1/completions", body, n=n, burst=burst_id))
            burst_id += 1
        add_single()
    return specs


# ---- one request ------------------------------------------------------------------------------

def _error_object(data: Any) -> dict | None:
    if isinstance(data, dict) and isinstance(data.get("error"), dict) and data["error"].get("message"):
        return data["error"]
    return None


def _classify_error(status: int, headers: httpx.Headers, raw: bytes) -> tuple[str, str, str]:
    """(outcome, key, detail) of a non-200 answer."""
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    err = _error_object(data)
    if err is None:
        return "bare", f"{status} without error body", raw[:200].decode("utf-8", "replace")
    if status in (429, 503) and "retry-after" not in headers:
        return "bare", f"{status} without Retry-After", err["message"][:200]
    outcome = "failed" if status >= 400 else "bare"
    return outcome, str(status), f"{err.get('type')}/{err.get('code')}: {err['message'][:200]}"


def _retry_after(r: httpx.Response) -> float | None:
    try:
        return float(r.headers["retry-after"]) if r.status_code in (429, 503) else None
    except (KeyError, ValueError):
        return None


def _check_choices(choices: Any, n: int) -> str | None:
    """Why a finished response's choices are not proper (None if they are)."""
    if not isinstance(choices, list) or len(choices) != n:
        return f"expected {n} choices, got {choices if not isinstance(choices, list) else len(choices)}"
    for ch in choices:
        if ch.get("finish_reason") not in OK_REASONS:
            return f"choice {ch.get('index')} finish_reason {ch.get('finish_reason')!r}"
    return None


async def _plain(client: httpx.AsyncClient, url: str, spec: Spec) -> tuple[str, str, int | None, str]:
    kwargs = {"content": spec.body} if isinstance(spec.body, bytes) else {"json": spec.body}
    headers = {"Content-Type": "application/json"}
    r = await client.post(url + spec.path, headers=headers, **kwargs)
    if r.status_code != 200:
        spec.retry_after_s = _retry_after(r)
        outcome, key, detail = _classify_error(r.status_code, r.headers, r.content)
        return outcome, key, r.status_code, detail
    try:
        data = r.json()
    except ValueError:
        return "bare", "200 with a body that is not JSON", 200, r.text[:200]
    why = _check_choices(data.get("choices") if isinstance(data, dict) else None, spec.n)
    if why:
        return "bare", "200 with improper choices", 200, why
    return "ok", "", 200, ""


async def _streamed(client: httpx.AsyncClient, url: str, spec: Spec) -> tuple[str, str, int | None, str]:
    kwargs = {"content": spec.body} if isinstance(spec.body, bytes) else {"json": spec.body}
    async with client.stream("POST", url + spec.path, headers={"Content-Type": "application/json"},
                             **kwargs) as r:
        if r.status_code != 200:
            spec.retry_after_s = _retry_after(r)
            raw = await r.aread()
            outcome, key, detail = _classify_error(r.status_code, r.headers, raw)
            return outcome, key, r.status_code, detail
        finish: dict[int, str | None] = {}
        chunks = 0
        error: dict | None = None
        done = False
        async for line in r.aiter_lines():
            if not line.strip():
                continue
            if not line.startswith("data: "):
                if line.startswith(":"):
                    continue    # an SSE comment
                return "bare", "malformed SSE line", 200, line[:200]
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                break
            if error is not None:
                return "bare", "event after an SSE error event", 200, payload[:200]
            try:
                event = json.loads(payload)
            except ValueError:
                return "bare", "SSE data that is not JSON", 200, payload[:200]
            if _error_object(event) is not None:
                error = event["error"]
                continue
            if not isinstance(event, dict) or not isinstance(event.get("choices"), list):
                return "bare", "SSE event without choices", 200, payload[:200]
            for ch in event["choices"]:
                idx = ch.get("index", 0)
                if ch.get("finish_reason") is not None:
                    finish[idx] = ch["finish_reason"]
            if event["choices"]:
                chunks += 1
            if spec.cancel_after is not None and chunks >= spec.cancel_after:
                return "cancelled", "mid-stream", 200, f"closed after {chunks} chunks"
        if not done:
            what = "after an error event" if error else f"after {chunks} chunks"
            return "bare", "stream ended without [DONE]", 200, what
        if error is not None:
            return ("failed", f"stream:{error.get('code') or error.get('type')}", 200,
                    str(error.get("message"))[:200])
        bad = [i for i in range(spec.n) if finish.get(i) not in OK_REASONS]
        if bad:
            return ("bare", "[DONE] with improper finish_reason", 200,
                    f"choices {bad}: {[finish.get(i) for i in bad]}")
        return "ok", "", 200, ""


async def run_one(client: httpx.AsyncClient, url: str, spec: Spec, cfg: ChaosConfig, t0: float) -> Outcome:
    start = time.monotonic()
    fn = _streamed if spec.stream else _plain

    async def attempt():
        if spec.client_timeout_s is None:
            return await fn(client, url, spec)
        try:
            async with asyncio.timeout(spec.client_timeout_s):
                return await fn(client, url, spec)
        except TimeoutError:
            return "cancelled", "client timeout", None, f"gave up after {spec.client_timeout_s}s"

    try:
        outcome, key, status, detail = await asyncio.wait_for(attempt(), cfg.deadline_s)
    except TimeoutError:
        outcome, key, status, detail = "hung", "deadline", None, f"no end within {cfg.deadline_s:g}s"
    except (httpx.TransportError, httpx.DecodingError) as exc:  # reset, refused, protocol error
        outcome, key, status, detail = "bare", type(exc).__name__, None, repr(exc)[:200]
    except Exception as exc:  # noqa: BLE001 - e.g. a choice that is not an object
        outcome, key, status = "bare", f"malformed response ({type(exc).__name__})", None
        detail = repr(exc)[:200]
    if spec.bad and outcome != "bare" and not (outcome == "failed" and status is not None and
                                               (400 <= status < 500 or status == 503)):
        outcome, key, detail = "bare", f"bad input answered {status}", f"{spec.bad}: {outcome} {detail}"
    return Outcome(spec.index, spec.kind, outcome, key, status, detail, round(start - t0, 3),
                   round(time.monotonic() - start, 3), spec.stream, spec.n, spec.long, spec.bad)


# ---- health, kill, drain ----------------------------------------------------------------------

async def get_health(client: httpx.AsyncClient, url: str) -> dict | None:
    try:
        r = await client.get(url + "/health", timeout=5)
        return r.json()
    except (httpx.HTTPError, ValueError):
        return None


def pid_visible(url: str, pid: int | None) -> str | None:
    """Why we cannot SIGKILL this pid (None if we can)."""
    if pid is None:
        return "/health reports no pid"
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        return "the server is not on this machine"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is not visible here"
    except PermissionError:
        return f"no permission to signal pid {pid}"
    return None


async def kill_and_watch(client: httpx.AsyncClient, url: str, role: str, cfg: ChaosConfig,
                         t0: float, report: KillReport) -> None:
    health = await get_health(client, url)
    candidates = sorted((rid, r) for rid, r in ((health or {}).get("replicas") or {}).items()
                        if r.get("role") == role)
    if not candidates:
        report.skipped = f"no {role} replica in /health"
        return
    rid, r = candidates[0]
    why = pid_visible(url, r.get("pid"))
    if why:
        report.skipped = why
        return
    report.replica, report.old_pid = rid, r["pid"]
    os.kill(r["pid"], signal.SIGKILL)
    killed = time.monotonic()
    report.killed_at_s = round(killed - t0, 3)
    while time.monotonic() - killed < cfg.recovery_timeout_s:
        await asyncio.sleep(0.2)
        health = await get_health(client, url)
        now = (health or {}).get("replicas", {}).get(rid) or {}
        if now.get("healthy") and now.get("pid") not in (None, report.old_pid):
            report.recovery_s = round(time.monotonic() - killed, 3)
            report.new_pid = now["pid"]
            return


def _idle(replica: dict) -> bool:
    return (replica.get("healthy", False) and replica.get("num_free_blocks") == replica.get("num_blocks")
            and not replica.get("num_live_transfers", 0))


async def drain(client: httpx.AsyncClient, url: str, timeout_s: float) -> tuple[bool, dict]:
    """Wait until every replica is healthy with all blocks free and no live transfers."""
    deadline = time.monotonic() + timeout_s
    health: dict = {}
    while True:
        health = await get_health(client, url) or health
        reps = health.get("replicas") or {}
        if reps and all(_idle(r) for r in reps.values()):
            return True, health
        if time.monotonic() > deadline:
            return False, health
        await asyncio.sleep(0.25)


def parse_metrics(text: str) -> dict[str, float]:
    """Totals of the chaos-relevant counters of /metrics (summed over labels), plus by-label keys
    like 'kv_transfer_failures{reason="checksum"}'."""
    want = ("tandem:kv_fallbacks_total", "tandem:kv_transfer_failures_total",
            "tandem:requests_rejected_total", "tandem:kv_transfer_bytes_total",
            "tandem:request_success_total")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name_labels, value = line.rsplit(" ", 1)
        name = name_labels.split("{", 1)[0]
        if name not in want:
            continue
        short = name.removeprefix("tandem:").removesuffix("_total")
        out[short] = out.get(short, 0.0) + float(value)
        if "{" in name_labels:
            labels = name_labels.split("{", 1)[1].rstrip("}")
            keep = ",".join(p for p in labels.split(",") if not p.startswith("replica="))
            if keep:
                key = f"{short}{{{keep}}}"
                out[key] = out.get(key, 0.0) + float(value)
    return out


async def final_request(client: httpx.AsyncClient, url: str, model: str) -> tuple[bool, str]:
    body = {"model": model, "prompt": "hello world", "max_tokens": 8, "temperature": 0}
    try:
        r = await client.post(url + "/v1/completions", json=body, timeout=60)
    except httpx.HTTPError as exc:
        return False, repr(exc)
    if r.status_code != 200:
        return False, f"{r.status_code}: {r.text[:300]}"
    why = _check_choices(r.json().get("choices"), 1)
    return (why is None), why or "200 ok"


# ---- the run ----------------------------------------------------------------------------------

async def fetch_model(client: httpx.AsyncClient, url: str) -> str:
    r = await client.get(url + "/v1/models", timeout=10)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def run_chaos(url: str, cfg: ChaosConfig, model: str | None = None, kv_fault: str | None = None,
                    on_done=None) -> ChaosResult:
    url = url.rstrip("/").removesuffix("/v1")
    # Idle connections are dropped well before uvicorn's 5 s keep-alive timeout: reusing one the
    # server is closing at that moment fails the request (a race of HTTP/1.1 itself, not a defect).
    limits = httpx.Limits(max_connections=cfg.concurrency + cfg.burst_size + 16,
                          max_keepalive_connections=cfg.concurrency + cfg.burst_size + 16,
                          keepalive_expiry=2.0)
    timeout = httpx.Timeout(cfg.deadline_s + 5, connect=10)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        model = model or await fetch_model(client, url)
        plan = build_plan(cfg, model)
        sem = asyncio.Semaphore(cfg.concurrency)
        outcomes: list[Outcome] = []
        tasks: set[asyncio.Task] = set()
        report = KillReport(cfg.kill_role)
        killer: asyncio.Task | None = None
        kill_index = int(len(plan) * cfg.kill_at) if cfg.kill_role != "none" else None
        t0 = time.monotonic()
        backoff_until = 0.0

        async def go(spec: Spec, held: bool) -> None:
            nonlocal backoff_until
            try:
                o = await run_one(client, url, spec, cfg, t0)
                outcomes.append(o)
                if held and spec.retry_after_s:   # ordinary clients honour Retry-After
                    backoff_until = max(backoff_until, time.monotonic() + min(spec.retry_after_s, 5.0))
                if on_done is not None:
                    on_done(o)
            finally:
                if held:
                    sem.release()

        burst: list[asyncio.Task] = []
        for spec in plan:
            if spec.index == kill_index:
                killer = asyncio.create_task(kill_and_watch(client, url, cfg.kill_role, cfg, t0, report))
            held = spec.burst is None
            if held:
                if burst:   # ordinary traffic resumes once the burst is over (else it gets the 429s)
                    await asyncio.wait(burst)
                    burst = []
                await sem.acquire()
                if backoff_until > time.monotonic():
                    await asyncio.sleep(backoff_until - time.monotonic())
            task = asyncio.create_task(go(spec, held))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            if not held:
                burst.append(task)
        if tasks:
            await asyncio.wait(set(tasks))
        load_end = time.monotonic()
        if killer is not None:
            await killer
        elif cfg.kill_role == "none":
            report.skipped = "--kill-role none"
        drained, health = await drain(client, url, cfg.drain_timeout_s)
        reps = health.get("replicas") or {}
        leaked = sum(max(0, (r.get("num_blocks") or 0) - (r.get("num_free_blocks") or 0))
                     for r in reps.values())
        live = sum(r.get("num_live_transfers") or 0 for r in reps.values())
        unhealthy = sorted(rid for rid, r in reps.items() if not r.get("healthy"))
        ok, detail = await final_request(client, url, model)
        try:
            metrics = parse_metrics((await client.get(url + "/metrics", timeout=10)).text)
        except httpx.HTTPError:
            metrics = {}
        for decision, count in (health.get("routing") or {}).items():
            metrics[f"routing_{decision}"] = count
        outcomes.sort(key=lambda o: o.index)
        return ChaosResult(url, model, {**asdict(cfg), "bursts": cfg.bursts}, outcomes,
                           round(load_end - t0, 3), report, kv_fault, health, drained, leaked, live,
                           unhealthy, ok, detail, metrics)


# ---- output -----------------------------------------------------------------------------------

def print_table(result: ChaosResult) -> None:
    from rich.console import Console
    from rich.table import Table

    f = result.figures()
    t = Table(title=f"chaos run against {result.url} ({result.model})", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    failed = ", ".join(f"{k}: {v}" for k, v in f["failed_by_status"].items()) or "-"
    bare = ", ".join(f"{k}: {v}" for k, v in f["bare_by_cause"].items())
    kill = result.kill
    if kill.replica:
        rec = (f"{kill.recovery_s:.1f} s ({kill.replica} killed at {kill.killed_at_s:.1f} s, "
               f"pid {kill.old_pid} -> {kill.new_pid})"
               if kill.recovery_s is not None else f"NOT RECOVERED ({kill.replica}, pid {kill.old_pid})")
    else:
        rec = f"no kill ({kill.skipped})"
    rows = [
        ("sent", f["sent"]), ("ok", f["ok"]),
        ("cancelled", f"{f['cancelled']} (mid-stream {f['cancelled_mid_stream']}, "
                      f"client timeout {f['cancelled_client_timeout']})"),
        ("failed cleanly", f"{f['failed_cleanly']} ({failed})"),
        ("bad inputs -> 4xx", f"{f['bad_inputs_4xx']} of {f['bad_inputs']}"),
        ("server errors (5xx but 503)", f["server_errors"]),
        ("hung", f["hung"]), ("bare failures", f"{f['bare_failures']}" + (f" ({bare})" if bare else "")),
        ("leaked blocks", f["leaked_blocks"]), ("live transfers at the end", f["live_transfers"]),
        ("unhealthy replicas at the end", ", ".join(f["unhealthy_replicas"]) or "none"),
        ("recovery of the killed replica", rec),
        ("KV fault", result.kv_fault or "none"),
        ("KV fallbacks / transfer failures",
         f"{f['metrics'].get('kv_fallbacks', 0):g} / {f['metrics'].get('kv_transfer_failures', 0):g}"),
        ("final request", "ok" if result.final_ok else f"FAILED: {result.final_detail}"),
        ("slowest request (s)", f"{f['max_latency_s']:.1f}"),
        ("wall time (s)", f"{f['wall_s']:.1f}"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    console = Console(width=None if sys.stdout.isatty() else 120)
    console.print(t)
    defects = [o for o in result.outcomes if o.outcome in ("bare", "hung")]
    for o in defects[:20]:
        console.print(f"  defect #{o.index} {o.kind}{' stream' if o.stream else ''} n={o.n}"
                      f"{' long' if o.long else ''}: {o.outcome} [{o.key}] {o.detail}", markup=False)
    if len(defects) > 20:
        console.print(f"  ... {len(defects) - 20} more (see --json)")
    for o in result.server_errors()[:10]:
        console.print(f"  server error #{o.index} {o.kind}{' stream' if o.stream else ''} n={o.n} at "
                      f"{o.start_s:.1f}s: [{o.key}] {o.detail}", markup=False)
    problems = result.problems()
    console.print("PASS" if not problems else "FAIL: " + "; ".join(problems), markup=False)


def serve_args(args: argparse.Namespace) -> list[str]:
    out = ["--model", args.model] if args.model else []
    out += ["--hybrid-replicas", "1", "--prefill-replicas", "1", "--decode-replicas", "1",
            "--routing", "pd", "--offload-threshold", str(args.offload_threshold),
            "--threads", str(args.threads), "--dtype", args.dtype,
            "--compile" if args.compile else "--no-compile",
            "--max-num-seqs", str(args.max_num_seqs),
            "--max-waiting-per-replica", str(args.max_waiting_per_replica),
            "--num-kv-blocks", str(args.num_kv_blocks), "--max-model-len", str(args.max_model_len),
            "--token-budget", str(args.token_budget), "--idle-token-budget", "0",
            "--kv-timeout", str(args.kv_timeout)]
    for extra in args.serve_arg or ():
        out += extra.split()
    return out


def config_from_args(args: argparse.Namespace) -> ChaosConfig:
    return ChaosConfig(
        num_requests=args.num_requests, seed=args.seed, concurrency=args.concurrency,
        deadline_s=args.deadline, max_tokens=args.max_tokens, offload_threshold=args.offload_threshold,
        long_prompt_max=args.long_prompt_max, long_fraction=args.long_fraction,
        burst_size=args.burst_size, num_bursts=args.bursts, kill_role=args.kill_role,
        kill_at=args.kill_at, recovery_timeout_s=args.recovery_timeout,
        drain_timeout_s=args.drain_timeout)


def main(args: argparse.Namespace) -> None:
    from prefill_node.server import FAULT_ENV

    from bench.server import local_server

    logging.getLogger("httpx").setLevel(logging.WARNING)   # not a line per request
    cfg = config_from_args(args)
    if cfg.num_requests < 1:
        raise SystemExit("error: --num-requests must be >= 1")
    done = Counter()

    def on_done(o: Outcome) -> None:
        done[o.outcome] += 1
        if not args.quiet and sum(done.values()) % 50 == 0:
            print(f"  {sum(done.values())}/{cfg.num_requests} done: " +
                  ", ".join(f"{k} {v}" for k, v in sorted(done.items())), file=sys.stderr, flush=True)

    with ExitStack() as stack:
        if args.url:
            url, fault = args.url, None
            print(f"chaos run against {url} (no KV fault injection: the server is not ours)", file=sys.stderr)
        else:
            fault = None if args.kv_fault == "none" else args.kv_fault
            old = os.environ.get(FAULT_ENV)
            if fault:
                os.environ[FAULT_ENV] = fault
            else:
                os.environ.pop(FAULT_ENV, None)
            try:
                sargs = serve_args(args)
                note = f" ({FAULT_ENV}={fault})" if fault else ""
                print("starting tandem serve " + " ".join(sargs) + note,
                      file=sys.stderr, flush=True)
                log = stack.enter_context(open(args.server_log, "a")) if args.server_log else None
                server = stack.enter_context(local_server(sargs, ready_timeout=args.ready_timeout,
                                                          quiet=log is None, log_file=log))
            finally:
                if old is None:
                    os.environ.pop(FAULT_ENV, None)
                else:
                    os.environ[FAULT_ENV] = old
            url = server.url
        result = asyncio.run(run_chaos(url, cfg, args.served_model, fault, on_done))
    print_table(result)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result.to_json(), indent=1) + "\n")
        print(f"wrote {args.json}")
    if result.problems():
        raise SystemExit(1)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-chaos", help="Chaos run: hostile traffic, a killed replica, a corrupted KV transfer; "
                            "nothing may hang or leak.",
        formatter_class=argparse.RawDescriptionHelpFormatter, description=__doc__,
        epilog="`make chaos` runs 1000 requests against SmolLM2 (4 to 6 minutes on 2 cores, replicas "
               "uncompiled); "
               "tests/test_chaos.py runs 200 against a tiny random model (under a minute).")
    g = p.add_argument_group("traffic")
    g.add_argument("--num-requests", type=int, default=DEFAULTS.num_requests,
                   help="Requests in all, bursts included (default %(default)s).")
    g.add_argument("--seed", type=int, default=DEFAULTS.seed,
                   help="Seed of the request plan (default %(default)s).")
    g.add_argument("--concurrency", type=int, default=DEFAULTS.concurrency,
                   help="Requests in flight outside the bursts (default %(default)s).")
    g.add_argument("--deadline", type=float, default=DEFAULTS.deadline_s,
                   help="Hard per-request deadline in s: a request with no end by then is hung "
                        "(default %(default)s).")
    g.add_argument("--max-tokens", type=int, default=DEFAULTS.max_tokens,
                   help="Upper end of max_tokens of ordinary requests; cancelled streams ask up to 2x, "
                        "client-timeout requests up to 3x (default %(default)s).")
    g.add_argument("--long-fraction", type=float, default=DEFAULTS.long_fraction,
                   help="Share of requests with a prompt over --offload-threshold (default %(default)s).")
    g.add_argument("--long-prompt-max", type=int, default=DEFAULTS.long_prompt_max,
                   help="Longest prompt in tokens (default %(default)s).")
    g.add_argument("--burst-size", type=int, default=DEFAULTS.burst_size,
                   help="Requests sent at once in each burst, to overflow the admission bound "
                        "(default %(default)s).")
    g.add_argument("--bursts", type=int, default=None,
                   help="Number of bursts (default: one per 250 requests).")
    g.add_argument("--kill-role", choices=ROLES, default=DEFAULTS.kill_role,
                   help="Role of the replica SIGKILLed midway (pid from /health); none: no kill "
                        "(default %(default)s).")
    g.add_argument("--kill-at", type=float, default=DEFAULTS.kill_at,
                   help="Share of the requests dispatched before the kill (default %(default)s).")
    g.add_argument("--recovery-timeout", type=float, default=DEFAULTS.recovery_timeout_s,
                   help="Seconds the killed replica has to come back healthy with a new pid "
                        "(default %(default)s).")
    g.add_argument("--drain-timeout", type=float, default=DEFAULTS.drain_timeout_s,
                   help="Seconds after the load for every replica to free all KV blocks and transfers "
                        "(default %(default)s).")
    g.add_argument("--json", default=None, metavar="OUT",
                   help="Write the figures and every request's outcome here.")
    g.add_argument("--quiet", action="store_true", help="No progress lines on stderr.")
    s = p.add_argument_group("server (ignored with --url)")
    s.add_argument("--url", default=None,
                   help="Target a running server instead of starting one; no KV fault then, and the kill "
                        "only if /health's pids are processes of this machine.")
    s.add_argument("--served-model", default=None, help="Model id to request (default: first of /v1/models).")
    s.add_argument("--model", default=None,
                   help="Model directory or .gguf for the server (default: the embedded "
                        "SmolLM2-135M-Instruct).")
    s.add_argument("--dtype", default="auto", help="--dtype of the server (default auto).")
    s.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                   help="torch.compile the replicas (slower start and restart; default off).")
    s.add_argument("--threads", type=int, default=1, help="Torch threads per replica (default 1).")
    s.add_argument("--offload-threshold", type=int, default=DEFAULTS.offload_threshold,
                   help="pd routing offloads prompts longer than this (default %(default)s); long "
                        "prompts exceed it.")
    s.add_argument("--max-num-seqs", type=int, default=8, help="Running requests per replica (default 8).")
    s.add_argument("--max-waiting-per-replica", type=int, default=4,
                   help="Admission bound per replica: beyond it 429 (default 4, so bursts overflow).")
    s.add_argument("--num-kv-blocks", type=int, default=320, help="KV blocks per replica (default 320).")
    s.add_argument("--max-model-len", type=int, default=1024, help="Context limit (default 1024).")
    s.add_argument("--token-budget", type=int, default=64,
                   help="Token budget per step (default 64; idle budget 0, so long prompts go out in "
                        "several KV frames).")
    s.add_argument("--kv-timeout", type=float, default=10.0, help="KV transfer timeout in s (default 10).")
    s.add_argument("--kv-fault", default="corrupt:2",
                   help="TANDEM_KV_FAULT of the server: corrupt:N flips a byte of the prefill replica's "
                        "N-th KV frame (counted again after a restart); drop:N, stall:S; none "
                        "(default corrupt:2).")
    s.add_argument("--serve-arg", action="append", default=None, metavar="ARGS",
                   help="More `tandem serve` arguments (repeatable, split on spaces), e.g. "
                        "--serve-arg '--kv-codec lz4'.")
    s.add_argument("--ready-timeout", type=float, default=300.0,
                   help="Seconds for the server to become ready (default 300).")
    s.add_argument("--server-log", default=None, metavar="PATH",
                   help="Append the server's stdout/stderr here (default: discarded).")
    p.set_defaults(func=main)


if __name__ == "__main__":
    _p = argparse.ArgumentParser(prog="python -m bench.chaos")
    add_parser(_p.add_subparsers(dest="command", required=True))
    _a = _p.parse_args(["bench-chaos", *sys.argv[1:]])
    _a.func(_a)
