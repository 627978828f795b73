"""Pure ASGI middleware (streaming and disconnect detection stay untouched): x-request-id,
bearer-key auth on /v1, a request-body size limit, and one JSON access-log line per request."""
from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import APIError

access_log = logging.getLogger("tandem.access")

MAX_BODY_BYTES = 4 * 2**20
"""Largest request body accepted; beyond it 413 (bounds JSON parsing and tokenization work)."""


class RequestContextMiddleware:
    """Echo (or create) x-request-id, check the bearer key on /v1/*, cap the body size, and log
    the request when it ends. Handlers put `prompt_tokens`, `completion_tokens` and
    `finish_reason` into `request.state` for the access log.

    `api_keys`: accepted keys as (tenant, key) pairs (none: /v1 is open). The matching key's
    tenant goes into `request.state.key_tenant` (None when /v1 is open)."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[tuple[str, str]] = (),
                 max_body_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.bearers = [(tenant, f"Bearer {key}".encode()) for tenant, key in api_keys]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        rid = headers.get(b"x-request-id", b"").decode("latin-1").strip()[:128] or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = rid
        status = {"code": 499}  # stays 499 if the client leaves before any response

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = {**message,
                           "headers": [*message.get("headers", []),
                                       (b"x-request-id", rid.encode("latin-1"))]}
            await send(message)

        try:
            error = self._check_auth(scope, headers, state)
            if error is None and scope.get("method") in ("POST", "PUT", "PATCH"):
                body, error = await self._read_body(headers, receive)
                if body is None and error is None:
                    return  # client disconnected while sending the body
                if error is None:
                    receive = _replay(body, receive)
            if error is not None:
                await error.response()(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            self._log(scope, state, status["code"], time.perf_counter() - start)

    def _check_auth(self, scope: Scope, headers: dict[bytes, bytes],
                    state: dict) -> APIError | None:
        state["key_tenant"] = None
        if not self.bearers or not scope.get("path", "").startswith("/v1"):
            return None
        given = headers.get(b"authorization", b"")
        # Compare against every key, without stopping at a match, so the time taken does not
        # tell which key (or how much of one) matched.
        tenant = None
        for name, bearer in self.bearers:
            if hmac.compare_digest(given, bearer):
                tenant = name
        if tenant is not None:
            state["key_tenant"] = tenant
            return None
        return APIError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.",
                        code="invalid_api_key")

    async def _read_body(self, headers: dict[bytes, bytes],
                         receive: Receive) -> tuple[bytes | None, APIError | None]:
        limit = self.max_body_bytes
        too_big = APIError(413, f"request body is larger than the limit of {limit} bytes",
                           code="request_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            return None, too_big
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, too_big
            parts.append(chunk)
            if not message.get("more_body", False):
                return b"".join(parts), None

    @staticmethod
    def _log(scope: Scope, state: dict, status: int, latency: float) -> None:
        if not access_log.isEnabledFor(logging.INFO):
            return
        access_log.info(json.dumps({
            "request_id": state.get("request_id"), "method": scope.get("method"),
            "path": scope.get("path"), "status": status, "latency_s": round(latency, 6),
            "tenant": state.get("tenant"),
            "prompt_tokens": state.get("prompt_tokens"),
            "completion_tokens": state.get("completion_tokens"),
            "finish_reason": state.get("finish_reason"),
        }, separators=(",", ":")))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands the app the already-read body once, then the real channel (so the
    app still sees http.disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
