"""The OpenAI-compatible FastAPI app: validate, tokenize, admit, route, stream back.

`create_app(config, tokenizer, pool)` wires it; the app never starts or stops replicas. Its
lifespan starts the pool's background tasks if nobody did (and then closes the pool's sockets on
shutdown — not the replicas).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.config import GatewayConfig
from gateway.metrics import CONTENT_TYPE, GatewayMetrics, RequestTimer
from gateway.openai_schema import (
    ChatCompletionRequest, CompletionRequest, _SamplingFields, chat_chunk, chat_response,
    completion_chunk, completion_response, error_body, model_list, now_ts, usage_chunk,
)
from gateway.replica_client import NoHealthyReplica, ReplicaPool, RequestStream

log = logging.getLogger(__name__)

RETRY_AFTER_OVERLOADED_S = 1
RETRY_AFTER_UNAVAILABLE_S = 5


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...


class APIError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code),
                            status_code=self.status, headers=self.headers)


# ---- validation errors -> 400 ---------------------------------------------------------------

_UNION_TAGS = {"str", "int", "float", "bool", "none", "dict", "list"}


def _param_path(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc[1:] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    return ".".join(parts) or None


def validation_error_response(exc: RequestValidationError) -> JSONResponse:
    errors = list(exc.errors())
    if not errors:
        return APIError(400, "invalid request").response()
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return APIError(400, f"request body is not valid JSON: {detail}".rstrip(": "),
                        code="invalid_json").response()
    loc = tuple(err.get("loc", ()))
    param = _param_path(loc)
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    if err.get("type") == "missing":
        text = f"{param}: field required"
    elif param is None:
        text = f"request body must be a JSON object (Content-Type: application/json): {msg}"
    else:
        bad = json.dumps(err.get("input"), default=str)
        bad = bad if len(bad) <= 100 else bad[:100] + "..."
        text = f"{param}: {msg} (got {bad})"
    return APIError(400, text, param=param).response()


# ---- pure ASGI middleware: x-request-id and bearer auth --------------------------------------

class RequestContextMiddleware:
    """Echo (or create) x-request-id and check the bearer key on /v1/*. Pure ASGI so streaming
    and disconnect detection are untouched."""

    def __init__(self, app: ASGIApp, api_key: str | None) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        rid = headers.get(b"x-request-id", b"").decode("latin-1").strip()[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message,
                           "headers": [*message.get("headers", []),
                                       (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        if self.api_key is not None and scope.get("path", "").startswith("/v1"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                err = APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer "
                                    "<key>'.", param=None, code="invalid_api_key")
                await err.response()(scope, receive, send_with_id)
                return
        await self.app(scope, receive, send_with_id)


class _SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator and aborts the request if it did not
    finish (client gone, or the body was never iterated)."""

    def __init__(self, content: AsyncIterator[str], stream: RequestStream) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.stream = stream

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            self.stream.abort()


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


async def _wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)


def create_app(config: GatewayConfig, tokenizer: Tokenizer, pool: ReplicaPool) -> FastAPI:
    metrics = GatewayMetrics()
    created = now_ts()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started_here = not pool.started
        if started_here:
            await pool.start()
        yield
        if started_here:
            await pool.close(shutdown_replicas=False)

    pool.on_iterations = metrics.observe_iterations
    app = FastAPI(title="Tandem gateway", lifespan=lifespan)
    app.state.config = config
    app.state.pool = pool
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, api_key=config.api_key)

    @app.exception_handler(RequestValidationError)
    async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error_response(exc)

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code,
                        headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return APIError(500, f"internal error: {exc!r}", "server_error",
                        code="internal_error").response()

    # ---- helpers ---------------------------------------------------------------------------

    def check_model(model: str) -> None:
        if model != config.model_name:
            raise APIError(404, f"The model `{model}` does not exist. This server serves "
                                f"`{config.model_name}`.", param="model", code="model_not_found")

    def check_prompt_ids(ids: list[int], param: str) -> None:
        if not ids:
            raise APIError(400, f"{param} is empty after tokenization", param=param)
        vocab = tokenizer.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"{param}: token id {bad[0]} is out of vocabulary "
                                f"(valid ids are 0..{vocab - 1})", param=param)

    def resolve_max_tokens(body: _SamplingFields, n_prompt: int, param: str) -> int:
        requested = body.requested_max_tokens()
        limit = config.max_model_len
        max_tokens = requested if requested is not None else limit - n_prompt
        if max_tokens < 1 or n_prompt + max_tokens > limit:
            what = "messages" if param == "messages" else "prompt"
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you "
                     f"requested {n_prompt + max(max_tokens, 1)} tokens ({n_prompt} in the {what}, "
                     f"{max(max_tokens, 1)} in the completion). Please reduce the length of the "
                     f"{what} or completion.", param=param, code="context_length_exceeded")
        return max_tokens

    async def admit(request: Request, prefix: str, ids: list[int],
                    body: _SamplingFields, max_tokens: int) -> RequestStream:
        try:
            sampling = body.to_sampling(max_tokens)
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        healthy = pool.healthy_replicas()
        if not healthy:
            raise APIError(503, "No replica is available; retry later.", "server_error",
                           code="service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})
        if pool.num_outstanding >= config.max_waiting_per_replica * len(healthy):
            raise APIError(429, f"The server is over capacity ({pool.num_outstanding} requests in "
                                f"flight on {len(healthy)} replica(s)); retry later.",
                           "rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(RETRY_AFTER_OVERLOADED_S)})
        rid = f"{prefix}-{request.state.request_id}"
        if pool.has_request(rid):
            rid = f"{rid}-{uuid.uuid4().hex[:8]}"
        try:
            return await pool.submit(rid, ids, sampling)
        except NoHealthyReplica as exc:
            raise APIError(503, str(exc), "server_error", code="service_unavailable",
                           headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}) from exc

    def replica_error(out) -> APIError:
        detail = out.error or f"the request ended with finish_reason {out.finish_reason!r}"
        return APIError(500, f"replica error: {detail}", "server_error", code="replica_error")

    async def collect(request: Request, stream: RequestStream, timer: RequestTimer):
        """Non-streaming: gather all outputs, aborting if the client goes away meanwhile."""

        async def gather() -> tuple[str, Any]:
            parts: list[str] = []
            async for out in stream:
                timer.on_output(time.perf_counter(), len(out.new_token_ids), out.queue_time)
                parts.append(out.text)
                if out.finish_reason is not None:
                    return "".join(parts), out
            raise RuntimeError("stream ended without a finish_reason")

        gather_task = asyncio.ensure_future(gather())
        watch_task = asyncio.ensure_future(_wait_disconnect(request))
        try:
            await asyncio.wait({gather_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
            if not gather_task.done():
                gather_task.cancel()
                stream.abort()
                timer.on_finish(time.perf_counter(), "abort", stream.num_prompt_tokens)
                return None
            return gather_task.result()
        finally:
            watch_task.cancel()
            gather_task.cancel()
            stream.abort()

    def finish_ok(out) -> bool:
        return out.finish_reason in ("stop", "length")

    # ---- endpoints -------------------------------------------------------------------------

    async def serve(request: Request, body: _SamplingFields, ids: list[int], chat: bool,
                    start: float) -> Response:
        param = "messages" if chat else "prompt"
        check_prompt_ids(ids, param)
        max_tokens = resolve_max_tokens(body, len(ids), param)
        stream = await admit(request, "chatcmpl" if chat else "cmpl", ids, body, max_tokens)
        timer = RequestTimer(metrics, stream.replica_id, start)
        ts, model = now_ts(), config.model_name
        if body.stream:
            return _SSEResponse(_stream(stream, timer, ts, model, body.include_usage, chat), stream)
        result = await collect(request, stream, timer)
        if result is None:  # client went away; nobody reads this
            return Response(status_code=499)
        text, last = result
        if not finish_ok(last):
            raise replica_error(last)
        timer.on_finish(time.perf_counter(), last.finish_reason, len(ids))
        build = chat_response if chat else completion_response
        return JSONResponse(build(stream.request_id, ts, model, text, last.finish_reason,
                                  len(ids), last.num_output_tokens))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        check_model(body.model)
        prompt = body.prompt
        ids = list(tokenizer.encode(prompt)) if isinstance(prompt, str) else list(prompt)
        return await serve(request, body, ids, chat=False, start=start)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        start = time.perf_counter()
        check_model(body.model)
        try:
            ids = list(tokenizer.encode_chat(body.message_dicts(), add_generation_prompt=True))
        except ValueError as exc:
            raise APIError(400, f"messages: {exc}", param="messages") from exc
        return await serve(request, body, ids, chat=True, start=start)

    async def _stream_outputs(stream: RequestStream, timer: RequestTimer):
        """Yield (text, finish_reason, output) per output; raises APIError on a replica error."""
        async for out in stream:
            timer.on_output(time.perf_counter(), len(out.new_token_ids), out.queue_time)
            if out.finish_reason is not None and not finish_ok(out):
                raise replica_error(out)
            yield out.text, out.finish_reason, out

    async def _stream(stream: RequestStream, timer: RequestTimer, ts: int, model: str,
                      include_usage: bool, chat: bool) -> AsyncIterator[str]:
        """SSE events of one request: text pieces, the finish reason, optional usage, [DONE]."""
        rid, last = stream.request_id, None

        def chunk(text: str, reason: str | None) -> str:
            if chat:
                delta = {"content": text} if text else {}
                return _sse(chat_chunk(rid, ts, model, delta, reason, include_usage))
            return _sse(completion_chunk(rid, ts, model, text, reason, include_usage))

        try:
            if chat:  # OpenAI opens a chat stream with the role
                yield _sse(chat_chunk(rid, ts, model, {"role": "assistant", "content": ""}, None,
                                      include_usage))
            async for text, reason, out in _stream_outputs(stream, timer):
                last = out
                if chat and text and reason:  # chat sends the finish reason in a chunk of its own
                    yield chunk(text, None)
                    text = ""
                if text or reason:
                    yield chunk(text, reason)
            if last is not None:
                timer.on_finish(time.perf_counter(), last.finish_reason, stream.num_prompt_tokens)
                if include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    yield _sse(usage_chunk(rid, ts, model, obj, stream.num_prompt_tokens,
                                           last.num_output_tokens))
        except APIError as exc:
            yield _sse(error_body(exc.message, exc.type, exc.param, exc.code))
        finally:
            if not stream.finished:
                stream.abort()
                timer.on_finish(time.perf_counter(), "abort", stream.num_prompt_tokens)
        yield "data: [DONE]\n\n"

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(model_list(config.model_name, created))

    @app.get("/health")
    async def health() -> JSONResponse:
        now = time.monotonic()
        replicas = {}
        for rid, r in pool.replicas.items():
            replicas[rid] = {
                "ready": r.ready is not None,
                "healthy": r.is_healthy(now, pool.heartbeat_timeout_s),
                "last_seen_s_ago": None if r.last_seen is None else round(now - r.last_seen, 3),
                "outstanding": r.outstanding,
                "num_running": r.stats.num_running,
                "num_waiting": r.stats.num_waiting,
                "kv_cache_usage": r.stats.kv_cache_usage,
            }
        ok = pool.healthy()
        return JSONResponse({"status": "ok" if ok else "unavailable", "replicas": replicas},
                            status_code=200 if ok else 503,
                            headers=None if ok else {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        for rid, r in pool.replicas.items():
            metrics.update_replica(rid, r.stats)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app

