"""Server-sent events and client-disconnect helpers shared by the handlers."""
from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway.replica_client import RequestStream


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


class SSEResponse(StreamingResponse):
    """StreamingResponse that always closes its generator and aborts its requests if they did not
    finish (client gone, or the body was never iterated). Starlette cancels the body as soon as
    the client disconnects (ASGI spec < 2.4 listens for http.disconnect), so the abort goes out
    at once, not at the next token. `on_close` runs last, whatever happened: a generator that
    was never started never runs its own `finally`, and what it would have released there (a
    tenant's quota, the request's metrics) must not leak."""

    def __init__(self, content: AsyncIterator[str], streams: Sequence[RequestStream],
                 on_close: Callable[[], None] | None = None) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = list(streams)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            for stream in self.streams:
                stream.abort()
            if self.on_close is not None:
                self.on_close()


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has already been read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
        await asyncio.sleep(0.01)
