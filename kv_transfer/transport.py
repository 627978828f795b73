"""Transports move frames (lists of byte buffers) one way, sender -> receiver. Same interface:

    send(parts)       queue a frame; does not wait for the peer (raises TransportError if the queue
                      stays full past the send timeout, or the transport broke)
    recv(timeout_s)   the next frame's parts (memoryviews), or None after timeout_s (0 = just poll)
    close()

`ZmqTransport` (PUSH -> PULL: the receiver binds, senders connect, so several prefill replicas can
feed one decode replica), `TorchDistTransport` (torch.distributed point-to-point, in
`kv_transfer.torch_transport`), `FakeTransport` (in memory, with fault hooks for tests).
Each transport object is used from one thread (zmq sockets are not thread-safe).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import zmq

from kv_transfer.codecs import Buffer

TRANSPORTS = ("zmq", "torch", "fake")


class TransportError(RuntimeError):
    """The transport cannot move frames (peer unreachable / not draining, or broken)."""


class Transport(Protocol):
    def send(self, parts: list[Buffer]) -> None: ...

    def recv(self, timeout_s: float) -> list[Buffer] | None: ...

    def close(self) -> None: ...


class ZmqTransport:
    """PUSH/PULL over ipc:// or tcp://. The receiver binds `address` (tcp port 0 or * picks a free
    port; read `.address` after), the sender connects to it. Large parts go zero-copy."""

    def __init__(self, role: str, address: str, *, context: zmq.Context | None = None,
                 hwm: int = 64, send_timeout_s: float = 30.0, linger_s: float = 2.0) -> None:
        if role not in ("sender", "receiver"):
            raise ValueError(f"role must be sender or receiver, got {role!r}")
        self.role = role
        self._own_context = context is None
        self._ctx = context or zmq.Context(io_threads=1)
        if role == "sender":
            self._sock = self._ctx.socket(zmq.PUSH)
            self._sock.setsockopt(zmq.SNDHWM, hwm)
            # At the high-water mark (receiver gone or far behind) a send waits this long, then fails.
            self._sock.setsockopt(zmq.SNDTIMEO, int(send_timeout_s * 1000))
            # Close waits at most this long to flush queued frames.
            self._sock.setsockopt(zmq.LINGER, int(linger_s * 1000))
            self._sock.connect(address)
            self.address = address
        else:
            self._sock = self._ctx.socket(zmq.PULL)
            self._sock.setsockopt(zmq.RCVHWM, hwm)
            self._sock.setsockopt(zmq.LINGER, 0)
            if address.startswith("tcp://") and address.endswith((":0", ":*")):
                address = address.rsplit(":", 1)[0] + ":*"
            self._sock.bind(address)
            self.address = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._closed = False

    def send(self, parts: list[Buffer]) -> None:
        if self._closed:
            raise TransportError("send on a closed transport")
        try:
            self._sock.send_multipart(parts, copy=False)
        except zmq.Again as e:
            raise TransportError(f"KV receiver at {self.address} is not draining frames "
                                 "(send queue full past the send timeout)") from e

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        if self._closed:
            raise TransportError("recv on a closed transport")
        if not self._sock.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self._sock.recv_multipart(copy=False)
        return [f.buffer for f in frames]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._sock.close()
        if self._own_context:
            self._ctx.term()


# -- in-memory transport for tests ---------------------------------------------------------------
@dataclass
class FakeLink:
    """The wire between a FakeTransport pair. Frames are numbered by send order (0, 1, ...);
    fault sets name those numbers. Parts are copied to bytes on send, as a real wire would."""

    drop: set[int] = field(default_factory=set)
    corrupt: set[int] = field(default_factory=set)
    """Flip one byte of the last part (the payload; the header if there is none)."""
    delay: dict[int, float] = field(default_factory=dict)
    """Deliver frame i this many seconds late (later frames may overtake it)."""
    swap: set[int] = field(default_factory=set)
    """Hold frame i back and deliver it right after frame i + 1."""
    hook: Callable[[int, list[bytes]], list[list[bytes]]] | None = None
    """Anything else: frame number, parts -> frames to deliver instead (empty list = drop)."""
    closed: bool = False

    def __post_init__(self) -> None:
        self._lock = threading.Condition()
        self._queue: list[tuple[float, int, list[bytes]]] = []
        self._held: dict[int, list[bytes]] = {}
        self._sent = 0
        self._order = 0
        self.sent_frames = 0
        self.delivered_frames = 0

    def _put(self, parts: list[bytes], delay_s: float = 0.0) -> None:
        self._order += 1
        self._queue.append((time.monotonic() + delay_s, self._order, parts))
        self._queue.sort(key=lambda e: (e[0], e[1]))
        self._lock.notify_all()

    def push(self, parts: list[Buffer]) -> None:
        wire = [bytes(memoryview(p).cast("B")) for p in parts]
        with self._lock:
            i = self._sent
            self._sent += 1
            self.sent_frames += 1
            out = self.hook(i, wire) if self.hook else [wire]
            if i in self.drop:
                out = []
            if i in self.corrupt and out:
                last = bytearray(out[0][-1])
                last[len(last) // 2] ^= 0xFF
                out[0] = [*out[0][:-1], bytes(last)]
            if i in self.swap:
                self._held[i + 1] = out[0] if out else None
                return
            for frame in out:
                self._put(frame, self.delay.get(i, 0.0))
            held = self._held.pop(i, None)
            if held is not None:
                self._put(held)

    def pop(self, timeout_s: float) -> list[bytes] | None:
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while True:
                now = time.monotonic()
                if self._queue and self._queue[0][0] <= now:
                    self.delivered_frames += 1
                    return self._queue.pop(0)[2]
                wake = min(deadline, self._queue[0][0]) if self._queue else deadline
                if wake <= now:
                    return None
                self._lock.wait(wake - now)


class FakeTransport:
    def __init__(self, link: FakeLink, role: str) -> None:
        self.link = link
        self.role = role

    @classmethod
    def pair(cls, link: FakeLink | None = None) -> tuple["FakeTransport", "FakeTransport"]:
        """(sender, receiver) sharing one FakeLink (reachable as `.link` on both)."""
        link = link or FakeLink()
        return cls(link, "sender"), cls(link, "receiver")

    def send(self, parts: list[Buffer]) -> None:
        if self.link.closed:
            raise TransportError("fake link closed")
        self.link.push(parts)

    def recv(self, timeout_s: float) -> list[Buffer] | None:
        parts = self.link.pop(timeout_s)
        return None if parts is None else [memoryview(p) for p in parts]

    def close(self) -> None:
        self.link.closed = True


def make_transport(name: str, role: str, **kwargs: Any) -> Transport:
    """By name: `zmq` (address=..., hwm, send_timeout_s, linger_s, context), `torch` (peer=rank,
    device, group, tag, queue_size, send_timeout_s, keepalive_s; torch.distributed must be
    initialized, e.g. with kv_transfer.torch_transport.init_process_group), `fake` (link=FakeLink)."""
    if name == "zmq":
        return ZmqTransport(role, **kwargs)
    if name == "torch":
        from kv_transfer.torch_transport import TorchDistTransport  # noqa: PLC0415 - optional path

        return TorchDistTransport(role, **kwargs)
    if name == "fake":
        link = kwargs.pop("link", None)
        if kwargs:
            raise TypeError(f"unexpected arguments for the fake transport: {sorted(kwargs)}")
        if link is None:
            raise ValueError("the fake transport needs link=FakeLink() shared by both ends")
        return FakeTransport(link, role)
    raise ValueError(f"unknown KV transport {name!r}; choose from {TRANSPORTS}")


__all__ = ["FakeLink", "FakeTransport", "Transport", "TransportError", "ZmqTransport",
           "make_transport", "TRANSPORTS"]
