"""The OpenAI-compatible FastAPI app: wiring, errors, and the small endpoints.

`create_app(config, tokenizer, pool)` wires it; the app never starts or stops replicas. Its
lifespan starts the pool's background tasks if nobody did (and then closes the pool's sockets on
shutdown — not the replicas). The completion/chat handlers live in `gateway.serving`; request ids,
auth, the body limit and access logs in `gateway.middleware`.
"""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from gateway.config import GatewayConfig
from gateway.errors import RETRY_AFTER_UNAVAILABLE_S, APIError, validation_error_response
from gateway.metrics import CONTENT_TYPE, GatewayMetrics
from gateway.middleware import RequestContextMiddleware
from gateway.openai_schema import ChatCompletionRequest, CompletionRequest
from gateway.replica_client import ReplicaPool
from gateway.responses import model_list, now_ts
from gateway.serving import Serving

log = logging.getLogger(__name__)

_ERROR_RESPONSES = {code: {"description": text} for code, text in [
    (400, "Invalid request (OpenAI error body)"), (401, "Missing or wrong API key"),
    (404, "Unknown model"), (413, "Request body too large"),
    (429, "Over capacity (Retry-After)"), (503, "No replica available (Retry-After)")]}


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]: ...


def create_app(config: GatewayConfig, tokenizer: Tokenizer, pool: ReplicaPool) -> FastAPI:
    metrics = GatewayMetrics()
    serving = Serving(config, tokenizer, pool, metrics)
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
    pool.on_kv_events = metrics.observe_kv_events
    app = FastAPI(title="Tandem gateway", lifespan=lifespan)
    app.state.config = config
    app.state.pool = pool
    app.state.metrics = metrics
    app.add_middleware(RequestContextMiddleware, api_keys=config.all_api_keys)

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

    @app.post("/v1/completions", responses=_ERROR_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(request, body)

    @app.post("/v1/chat/completions", responses=_ERROR_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(request, body)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(model_list(config.model_name, created))

    @app.get("/health")
    async def health() -> JSONResponse:
        now = time.monotonic()
        replicas = {}
        for rid, r in pool.replicas.items():
            replicas[rid] = {
                "role": r.role,
                "address": r.address,
                "ready": r.ready is not None,
                "pid": r.ready.pid if r.ready is not None else None,
                "healthy": r.is_healthy(now, pool.heartbeat_timeout_s),
                "last_seen_s_ago": None if r.last_seen is None else round(now - r.last_seen, 3),
                "outstanding": r.outstanding,
                "num_running": r.stats.num_running,
                "num_waiting": r.stats.num_waiting,
                "num_free_blocks": r.stats.num_free_blocks,
                "num_blocks": r.stats.num_blocks,
                "kv_cache_usage": r.stats.kv_cache_usage,
                "num_live_transfers": r.stats.num_live_transfers,
                "prefix_cache_queries": r.stats.prefix_cache_queries,
                "prefix_cache_hits": r.stats.prefix_cache_hits,
                "prefix_cache_hit_rate": (round(r.stats.prefix_cache_hits / r.stats.prefix_cache_queries, 4)
                                          if r.stats.prefix_cache_queries else None),
                "lost": r.lost,
                "restarts": r.restarts,
            }
        # Serving needs one healthy replica that can decode; others down is "degraded", not down.
        healthy = set(pool.healthy_replicas())
        can_serve = any(rid in healthy and r.role != "prefill" for rid, r in pool.replicas.items())
        status = "ok" if pool.healthy() else "degraded" if can_serve else "unavailable"
        return JSONResponse({"status": status, "replicas": replicas,
                             "routing": dict(pool.route_decisions),
                             "requests_moved": pool.requests_moved},
                            status_code=200 if can_serve else 503,
                            headers=None if can_serve else {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        for rid, r in pool.replicas.items():
            metrics.update_replica(rid, r.stats)
        metrics.update_routing(pool.route_decisions)
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    return app
