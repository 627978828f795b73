"""The /v1/completions and /v1/chat/completions handlers.

validate + tokenize -> fan out into choices (n per prompt; a batched prompt list gives
n x prompts, indexed prompt-major as OpenAI does) -> admit all or none (bounded waiting per
replica, else 429) -> collect (non-streaming) or merge the choices into one SSE stream.
A client that goes away aborts every choice on its replica.
"""
from __future__ import annotations

import asyncio
import functools
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from engine.protocol import RequestOutput
from gateway.errors import APIError, error_body, overloaded, unavailable
from gateway.metrics import RequestTimer
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest, _SamplingFields
from gateway.replica_client import NoHealthyReplica, Overloaded, RequestStream
from gateway.responses import (
    CompletionLogprobs, chat_choice, chat_chunk, chat_logprobs, chat_response, completion_choice,
    completion_chunk, completion_response, now_ts, usage_chunk,
)
from gateway.sse import SSEResponse, sse, wait_disconnect
from gateway.tenants import Tenants

if TYPE_CHECKING:
    from gateway.app import Tokenizer
    from gateway.config import GatewayConfig
    from gateway.metrics import GatewayMetrics
    from gateway.replica_client import ReplicaPool
    from scheduler.request import SamplingParams

OFFLOAD_TOKENIZE_CHARS = 16_384
"""Longer texts are tokenized in a worker thread so the event loop keeps streaming."""


@dataclass
class Choice:
    """One sub-request (one returned choice) and what it has produced so far."""

    index: int
    prompt_ids: list[int]
    sampling: "SamplingParams"
    echo_text: str | None = None
    """Completions with echo: the prompt text, prepended to the choice's text."""
    hide_generation: bool = False
    """echo with max_tokens=0: the replica generates one token that is not returned."""
    stream: RequestStream | None = None
    timer: RequestTimer | None = None
    texts: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[list] = field(default_factory=list)
    prompt_logprobs: list | None = None
    finish_reason: str | None = None
    num_output_tokens: int = 0
    lp_builder: CompletionLogprobs | None = None

    @property
    def completion_tokens(self) -> int:
        return 0 if self.hide_generation else self.num_output_tokens

    def absorb(self, out: RequestOutput) -> None:
        assert self.timer is not None
        self.timer.on_output(time.perf_counter(), len(out.new_token_ids), out.queue_time)
        self.texts.append(out.text)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        if out.finish_reason is not None:
            self.finish_reason = out.finish_reason
            self.timer.on_finish(time.perf_counter(), out.finish_reason, len(self.prompt_ids))


def finish_ok(out: RequestOutput) -> bool:
    return out.finish_reason in ("stop", "length")


def replica_error(out: RequestOutput) -> APIError:
    detail = out.error or f"the request ended with finish_reason {out.finish_reason!r}"
    if out.retryable:   # the replica was lost, not the request at fault: 503 + Retry-After
        return unavailable(detail)
    return APIError(500, f"replica error: {detail}", "server_error", code="replica_error")


async def merged(choices: list[Choice]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Outputs of every choice as they arrive, until each has its final output."""
    if len(choices) == 1:
        only = choices[0]
        assert only.stream is not None
        async for out in only.stream:
            yield only, out
        return
    queue: asyncio.Queue[tuple[Choice, RequestOutput]] = asyncio.Queue()

    async def pump(c: Choice) -> None:
        assert c.stream is not None
        try:
            async for out in c.stream:
                queue.put_nowait((c, out))
        except Exception as exc:  # noqa: BLE001 - turn it into this choice's final output
            queue.put_nowait((c, RequestOutput(c.stream.request_id, [], "", len(c.prompt_ids),
                                               c.num_output_tokens, "error", repr(exc))))

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        left = len(choices)
        while left:
            c, out = await queue.get()
            yield c, out
            if out.finish_reason is not None:
                left -= 1
    finally:
        for task in tasks:
            task.cancel()


class Serving:
    def __init__(self, config: "GatewayConfig", tokenizer: "Tokenizer", pool: "ReplicaPool",
                 metrics: "GatewayMetrics") -> None:
        self.config, self.tokenizer, self.pool, self.metrics = config, tokenizer, pool, metrics
        self.tenants = Tenants(config)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(
            lambda t: tokenizer.decode([t], skip_special_tokens=False))

    # ---- validation ------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.config.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"`{self.config.model_name}`.", param="model",
                           code="model_not_found")

    def check_prompt_ids(self, ids: list[int], param: str, where: str) -> None:
        if not ids:
            raise APIError(400, f"{param}{where} is empty after tokenization", param=param)
        vocab = self.tokenizer.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"{param}{where}: token id {bad} is out of vocabulary "
                                f"(valid ids are 0..{vocab - 1})", param=param)

    def token_capacity(self) -> int:
        """Longest sequence that fits: the context limit, or a smaller KV cache."""
        limit = self.config.max_model_len
        for ready in self.pool.ready_info.values():
            limit = min(limit, ready.num_blocks * ready.block_size)
        return limit

    def resolve_max_tokens(self, requested: int | None, n_prompt: int, param: str,
                           where: str) -> int:
        limit = self.token_capacity()
        max_tokens = requested if requested is not None else limit - n_prompt
        if max_tokens < 1 or n_prompt + max_tokens > limit:
            what = "messages" if param == "messages" else "prompt"
            asked = max(max_tokens, 1)
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                     f"requested {n_prompt + asked} tokens ({n_prompt} in the {what}{where}, "
                     f"{asked} in the completion). Please reduce the length of the {what} or "
                     f"completion.", param=param, code="context_length_exceeded")
        return max_tokens

    async def _run_tokenizer(self, fn, *args) -> list[int]:
        return list(await asyncio.to_thread(fn, *args))

    # ---- endpoints -------------------------------------------------------------------------
    async def completions(self, request: Request, body: CompletionRequest) -> Response:
        start = time.perf_counter()
        self.check_model(body.model)
        prompts = body.prompts()
        choices: list[Choice] = []
        lp = body.logprobs
        for pi, prompt in enumerate(prompts):
            where = f" {pi}" if len(prompts) > 1 else ""
            if isinstance(prompt, str):
                ids = (await self._run_tokenizer(self.tokenizer.encode, prompt)
                       if len(prompt) > OFFLOAD_TOKENIZE_CHARS else list(self.tokenizer.encode(prompt)))
            else:
                ids = list(prompt)
            self.check_prompt_ids(ids, "prompt", where)
            hide = body.max_tokens == 0
            max_tokens = self.resolve_max_tokens(1 if hide else body.max_tokens, len(ids),
                                                 "prompt", where)
            echo_text = None
            if body.echo:
                echo_text = prompt if isinstance(prompt, str) else self.tokenizer.decode(ids)
            for j in range(body.num_choices):
                sampling = self._sampling(body, max_tokens, j, lp,
                                          lp if body.echo and lp is not None else None)
                choices.append(Choice(len(choices), ids, sampling, echo_text, hide))
        return await self._serve(request, body, choices, chat=False, start=start)

    async def chat(self, request: Request, body: ChatCompletionRequest) -> Response:
        start = time.perf_counter()
        self.check_model(body.model)
        messages = body.message_dicts()
        try:
            if sum(len(m["content"]) for m in messages) > OFFLOAD_TOKENIZE_CHARS:
                ids = await self._run_tokenizer(self.tokenizer.encode_chat, messages, True)
            else:
                ids = list(self.tokenizer.encode_chat(messages, add_generation_prompt=True))
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        self.check_prompt_ids(ids, "messages", "")
        max_tokens = self.resolve_max_tokens(body.requested_max_tokens(), len(ids), "messages", "")
        top = (body.top_logprobs or 0) if body.logprobs else None
        choices = [Choice(j, ids, self._sampling(body, max_tokens, j, top, None))
                   for j in range(body.num_choices)]
        return await self._serve(request, body, choices, chat=True, start=start)

    @staticmethod
    def _sampling(body: _SamplingFields, max_tokens: int, choice: int, logprobs: int | None,
                  prompt_logprobs: int | None) -> "SamplingParams":
        try:
            return body.to_sampling(max_tokens, choice, logprobs, prompt_logprobs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc

    # ---- admission and results -------------------------------------------------------------
    async def _admit(self, request: Request, chat: bool, choices: list[Choice],
                     start: float, user: str | None = None) -> str:
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{request.state.request_id}"
        sub_ids = [rid] if len(choices) == 1 else [f"{rid}-{c.index}" for c in choices]
        if any(self.pool.has_request(s) for s in sub_ids):
            suffix = uuid.uuid4().hex[:8]
            rid, sub_ids = f"{rid}-{suffix}", [f"{s}-{suffix}" for s in sub_ids]
        items = [(s, c.prompt_ids, c.sampling) for s, c in zip(sub_ids, choices)]
        tenant = self.tenants.resolve(getattr(request.state, "key_tenant", None), user)
        request.state.tenant = tenant
        rejected = self.metrics.tenant_requests_rejected
        try:
            self.tenants.acquire(tenant, len(choices))
        except APIError:
            rejected.labels(tenant=tenant, reason="tenant_quota").inc()
            raise
        waiting = self.metrics.tenant_requests_waiting.labels(tenant=tenant)
        try:
            streams = await self.pool.submit_many(items, self.config.max_waiting_per_replica,
                                                  tenant)
        except (Overloaded, NoHealthyReplica) as exc:
            for _ in choices:
                self.tenants.release(tenant)
            if isinstance(exc, Overloaded):
                self.metrics.requests_rejected.labels(reason="overloaded").inc()
                rejected.labels(tenant=tenant, reason="overloaded").inc()
                raise overloaded(f"The server is over capacity ({exc}); retry later.") from exc
            self.metrics.requests_rejected.labels(reason="unavailable").inc()
            rejected.labels(tenant=tenant, reason="unavailable").inc()
            raise unavailable(f"No replica is available ({exc}); retry later.") from exc
        waiting.inc(len(choices))

        def started() -> None:
            self.tenants.release(tenant)
            waiting.dec()

        for c, stream in zip(choices, streams):
            c.stream = stream
            c.timer = RequestTimer(self.metrics, stream.replica_id, start, tenant, started)
        return rid

    async def _serve(self, request: Request, body: _SamplingFields, choices: list[Choice],
                     chat: bool, start: float) -> Response:
        rid = await self._admit(request, chat, choices, start, body.user)
        prompt_tokens = sum(len(c.prompt_ids) for c in choices) // body.num_choices
        request.state.prompt_tokens = prompt_tokens
        streams = [c.stream for c in choices]
        if body.is_stream:
            events = self._sse(request, rid, body, choices, chat, prompt_tokens)
            return SSEResponse(events, streams, on_close=lambda: self._abandon(choices))
        try:
            done = await self._collect(request, choices)
        finally:
            for s in streams:
                s.abort()
        if not done:  # the client went away; nobody reads this
            return Response(status_code=499)
        self._record(request, choices)
        build_choice, build = ((chat_choice, chat_response) if chat
                               else (completion_choice, completion_response))
        out = [build_choice(c.index, self._text(c), self._logprobs(body, c, chat), c.finish_reason)
               for c in choices]
        return JSONResponse(build(rid, now_ts(), self.config.model_name, out, prompt_tokens,
                                  sum(c.completion_tokens for c in choices)))

    async def _collect(self, request: Request, choices: list[Choice]) -> bool:
        """Gather every choice; False if the client went away first. Raises on a replica error."""

        async def gather() -> None:
            async for c, out in merged(choices):
                c.absorb(out)
                if out.finish_reason is not None and not finish_ok(out):
                    raise replica_error(out)

        gather_task = asyncio.ensure_future(gather())
        watch_task = asyncio.ensure_future(wait_disconnect(request))
        try:
            await asyncio.wait({gather_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if not gather_task.done():
                return False
            gather_task.result()
            return True
        finally:
            watch_task.cancel()
            gather_task.cancel()
            self._abandon(choices)

    @staticmethod
    def _abandon(choices: list[Choice]) -> None:
        """End the timers of choices that did not finish (client gone, error): their metrics are
        counted as aborts and their tenant's quota is released. Idempotent."""
        for c in choices:
            if c.finish_reason is None and c.timer is not None:
                c.timer.on_finish(time.perf_counter(), "abort", len(c.prompt_ids))

    def _record(self, request: Request, choices: list[Choice]) -> None:
        request.state.completion_tokens = sum(c.completion_tokens for c in choices)
        reasons = [self._finish_reason(c) for c in choices]
        request.state.finish_reason = reasons[0] if len(reasons) == 1 else reasons

    @staticmethod
    def _finish_reason(c: Choice) -> str | None:
        return "length" if c.hide_generation and c.finish_reason else c.finish_reason

    @staticmethod
    def _text(c: Choice) -> str:
        generated = "" if c.hide_generation else "".join(c.texts)
        return (c.echo_text or "") + generated

    def _logprobs(self, body: _SamplingFields, c: Choice, chat: bool,
                  entries: list | None = None, first: bool = True) -> dict | None:
        """The choice's logprobs object (of `entries`, default all generated so far)."""
        entries = c.logprobs if entries is None else entries
        if chat:
            return chat_logprobs(entries, self.token_text) if body.logprobs else None
        if body.logprobs is None:
            return None
        if c.lp_builder is None:
            c.lp_builder = CompletionLogprobs(self.token_text)
        parts = []
        if first and c.echo_text is not None:
            prompt_entries = c.prompt_logprobs or [None] * len(c.prompt_ids)
            parts.append(c.lp_builder.format(prompt_entries, c.prompt_ids))
        if not c.hide_generation:
            parts.append(c.lp_builder.format(entries, [e[0] for e in entries]))
        merged_lp: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                     "text_offset": []}
        for part in parts:
            for key, values in part.items():
                merged_lp[key].extend(values)
        return merged_lp

    # ---- streaming -------------------------------------------------------------------------
    async def _sse(self, request: Request, rid: str, body: _SamplingFields, choices: list[Choice],
                   chat: bool, prompt_tokens: int) -> AsyncIterator[str]:
        ts, model, inc = now_ts(), self.config.model_name, body.include_usage
        started: set[int] = set()
        try:
            if chat:  # OpenAI opens each chat choice with the role
                for c in choices:
                    yield sse(chat_chunk(rid, ts, model, c.index,
                                         {"role": "assistant", "content": ""}, None, None, inc))
            async for c, out in merged(choices):
                c.absorb(out)
                if out.finish_reason is not None and not finish_ok(out):
                    raise replica_error(out)
                new_lps = list(out.logprobs or ())
                reason = self._finish_reason(c) if out.finish_reason else None
                if chat:
                    lps = chat_logprobs(new_lps, self.token_text) if body.logprobs else None
                    if out.text or (lps and lps["content"]):
                        delta = {"content": out.text} if out.text else {}
                        yield sse(chat_chunk(rid, ts, model, c.index, delta, lps, None, inc))
                    if reason:  # chat sends the finish reason in a chunk of its own
                        yield sse(chat_chunk(rid, ts, model, c.index, {}, None, reason, inc))
                    continue
                first = c.index not in started
                started.add(c.index)
                text = "" if c.hide_generation else out.text
                if first and c.echo_text:
                    text = c.echo_text + text
                lps = self._logprobs(body, c, chat, new_lps, first)
                if text or reason or (lps and lps["tokens"]):
                    choice = completion_choice(c.index, text, lps, reason)
                    yield sse(completion_chunk(rid, ts, model, choice, inc))
            self._record(request, choices)
            if inc:
                obj = "chat.completion.chunk" if chat else "text_completion"
                yield sse(usage_chunk(rid, ts, model, obj, prompt_tokens,
                                      sum(c.completion_tokens for c in choices)))
        except APIError as exc:
            yield sse(error_body(exc.message, exc.type, exc.param, exc.code))
        finally:
            for c in choices:
                if c.finish_reason is None:
                    assert c.stream is not None
                    c.stream.abort()
            self._abandon(choices)
        yield "data: [DONE]\n\n"
