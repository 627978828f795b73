"""The KV handoff state machines: `KVSender` on the prefill replica, `KVReceiver` on the decode one.

The decode side allocates blocks and calls `receiver.expect(transfer_id, ...)`; the id and its
block ids reach the prefill side out of band (the decode replica sends them with the prompt; the
gateway only picks the transfer id); the prefill side then calls
`sender.send_chunk(...)` after every computed chunk and `send_done(...)` after the last one. Both
sides are polled explicitly (like SGLang's KVPoll): nothing here blocks beyond a timeout.

    sender:    BOOTSTRAP -> TRANSFERRING (first frame handed to the transport) -> DONE (done frame
               handed over) | FAILED (transport error, timeout between calls, abort)
    receiver:  WAITING (expected) -> TRANSFERRING (first frame written) -> DONE (done frame, every
               token covered) | FAILED (checksum, lost/reordered frame, abort, timeout since the last
               progress, mismatching frame, cancel)

A FAILED transfer's blocks are the caller's to free (decode: recompute the prompt itself). Frames of
unknown or finished transfers are dropped with a log line.
"""
from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from kv_transfer.codecs import CODECS, DTYPES, Codec, get_codec
from kv_transfer.frames import ChecksumError, FrameError, block_range, decode_frame, wire_bytes
from kv_transfer.transport import Transport, TransportError

log = logging.getLogger(__name__)
_FINISHED_KEPT = 4096


class TransferState(str, Enum):
    BOOTSTRAP = "bootstrap"
    WAITING = "waiting"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"

    @property
    def finished(self) -> bool:
        return self in (TransferState.DONE, TransferState.FAILED)


@dataclass
class TransferEvent:
    """A transfer reached DONE or FAILED (what poll() reports)."""

    transfer_id: str
    request_id: str
    state: TransferState
    first_token: int | None = None
    num_tokens: int | None = None
    error: str | None = None
    reason: str | None = None
    """FAILED: checksum | sequence | abort | timeout | frame | transport | cancelled."""
    latency_s: float | None = None
    """Receiver: sender's first frame -> done received (wall clocks). Sender: first -> done queued."""
    wire_bytes: int = 0
    raw_bytes: int = 0
    codec: str | None = None
    """Receiver: the codec the transfer's KV frames carried (their headers say), None if no KV
    frame arrived; the sender leaves it None."""


@dataclass
class TransferMetrics:
    """Plain counters for export (Prometheus etc.); only ever incremented."""

    wire_bytes: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """Bytes on the wire (headers + payload), by codec."""
    raw_bytes: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    """Uncoded KV bytes moved, by codec."""
    frames: int = 0
    frames_dropped: int = 0
    """Receiver: frames of unknown/finished transfers, or unreadable ones."""
    transfers_started: int = 0
    transfers_done: int = 0
    transfers_failed: dict[str, int] = field(default_factory=lambda: collections.defaultdict(int))
    latencies_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=1024))
    on_latency: Callable[[float], None] | None = None
    """Called with each finished transfer's latency (e.g. a histogram's observe)."""

    def observe(self, latency_s: float) -> None:
        self.latencies_s.append(latency_s)
        if self.on_latency is not None:
            self.on_latency(latency_s)


@dataclass
class _Transfer:
    transfer_id: str
    request_id: str
    state: TransferState
    timeout_s: float
    last_progress: float
    dst_block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    seq: int = 0
    covered: int = 0
    first_writable: int = 0
    """Receiver: tokens before this one are cached here (shared blocks): never written."""
    t_first: float | None = None
    codec: str | None = None
    """Receiver: the codec of the KV frames so far (from their headers)."""
    wire_bytes: int = 0
    raw_bytes: int = 0


class _Finished(collections.OrderedDict):
    def add(self, t: _Transfer) -> None:
        self[t.transfer_id] = t.state
        while len(self) > _FINISHED_KEPT:
            self.popitem(last=False)


# -- decode side ---------------------------------------------------------------------------
class KVReceiver:
    def __init__(self, transport: Transport, *, default_timeout_s: float = 30.0,
                 max_frames_per_poll: int = 64) -> None:
        self.transport = transport
        self.default_timeout_s = default_timeout_s
        self.max_frames_per_poll = max_frames_per_poll
        self.metrics = TransferMetrics()
        self._active: dict[str, _Transfer] = {}
        self._finished = _Finished()
        self._codecs: dict[str, Codec] = {}

    def expect(self, transfer_id: str, request_id: str, dst_block_ids: list[int], num_tokens: int,
               timeout_s: float | None = None, num_cached_tokens: int = 0) -> TransferState:
        """Blocks are allocated: accept this transfer's frames from now on (state WAITING).
        `timeout_s` bounds the wait for the first frame and every gap between frames.
        `num_cached_tokens` (a whole number of blocks): the first tokens are in this replica's
        prefix cache already, in blocks other requests may share: the sender skips them, and a
        frame writing any of them fails the transfer."""
        if transfer_id in self._active or transfer_id in self._finished:
            raise ValueError(f"transfer {transfer_id!r} is already known")
        if num_tokens < 1:
            raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
        if not 0 <= num_cached_tokens < num_tokens:
            raise ValueError(f"num_cached_tokens must be in [0, {num_tokens}), got {num_cached_tokens}")
        self._active[transfer_id] = _Transfer(
            transfer_id, request_id, TransferState.WAITING,
            self.default_timeout_s if timeout_s is None else timeout_s, time.monotonic(),
            dst_block_ids=list(dst_block_ids), num_tokens=num_tokens, covered=num_cached_tokens,
            first_writable=num_cached_tokens)
        self.metrics.transfers_started += 1
        return TransferState.WAITING

    def state(self, transfer_id: str) -> TransferState | None:
        t = self._active.get(transfer_id)
        return t.state if t else self._finished.get(transfer_id)

    def cancel(self, transfer_id: str) -> bool:
        """Stop accepting this transfer (its later frames are dropped); True if it was active."""
        t = self._active.get(transfer_id)
        if t is None:
            return False
        self._fail(t, "cancelled", "cancelled by the decode side")
        return True

    def poll(self, kv_caches: list[torch.Tensor]) -> list[TransferEvent]:
        """Drain available frames (up to max_frames_per_poll) without blocking, write their KV into
        `kv_caches`, then time out stalled transfers. Returns transfers that finished."""
        events: list[TransferEvent] = []
        for _ in range(self.max_frames_per_poll):
            try:
                parts = self.transport.recv(0)
            except TransportError as e:
                log.error("KV receive transport failed: %s", e)
                break
            if parts is None:
                break
            event = self._handle(parts, kv_caches)
            if event is not None:
                events.append(event)
        now = time.monotonic()
        for t in list(self._active.values()):
            if now - t.last_progress > t.timeout_s:
                events.append(self._fail(t, "timeout", f"no KV frame for {t.timeout_s:g}s "
                                         f"(state {t.state.value}, {t.covered} tokens received)"))
        return events

    # -- internals -------------------------------------------------------------------------
    def _fail(self, t: _Transfer, reason: str, error: str) -> TransferEvent:
        t.state = TransferState.FAILED
        del self._active[t.transfer_id]
        self._finished.add(t)
        self.metrics.transfers_failed[reason] += 1
        log.warning("KV transfer %s (request %s) failed: %s", t.transfer_id, t.request_id, error)
        return TransferEvent(t.transfer_id, t.request_id, TransferState.FAILED, error=error,
                             reason=reason, wire_bytes=t.wire_bytes, raw_bytes=t.raw_bytes,
                             codec=t.codec)

    def _handle(self, parts: list, kv_caches: list[torch.Tensor]) -> TransferEvent | None:
        try:
            header, buffers = decode_frame(parts)
        except FrameError as e:
            t = self._active.get((e.header or {}).get("transfer_id"))
            if t is None:
                self.metrics.frames_dropped += 1
                log.warning("dropped an unreadable KV frame: %s", e)
                return None
            return self._fail(t, "checksum" if isinstance(e, ChecksumError) else "frame", str(e))
        tid = header["transfer_id"]
        t = self._active.get(tid)
        if t is None:
            self.metrics.frames_dropped += 1
            known = "finished" if tid in self._finished else "unknown"
            log.info("dropped KV frame seq %s of %s transfer %r", header["seq"], known, tid)
            return None
        if header["request_id"] != t.request_id:
            return self._fail(t, "frame", f"frame for request {header['request_id']!r}, "
                                          f"expected {t.request_id!r}")
        if header["seq"] != t.seq:
            return self._fail(t, "sequence", f"expected frame {t.seq}, got {header['seq']} "
                                             "(a frame was lost or reordered)")
        t.seq += 1
        t.last_progress = time.monotonic()
        size = wire_bytes(parts)
        t.wire_bytes += size
        t.codec = header.get("codec", t.codec)
        self.metrics.frames += 1
        self.metrics.wire_bytes[t.codec or "none"] += size
        kind = header["kind"]
        if kind == "abort":
            return self._fail(t, "abort", f"aborted by the prefill side: {header.get('reason')}")
        if kind == "kv":
            try:
                self._write(t, header, buffers, kv_caches)
            except Exception as e:  # noqa: BLE001 - any bad frame fails only its transfer
                return self._fail(t, "frame", f"bad KV frame seq {header['seq']}: {e}")
            if t.t_first is None:
                t.t_first = header.get("t_first", time.time())
            t.state = TransferState.TRANSFERRING
            self.metrics.raw_bytes[header["codec"]] += header["raw_bytes"]
            t.raw_bytes += header["raw_bytes"]
            return None
        # done
        if header["num_tokens"] != t.num_tokens or t.covered < t.num_tokens:
            return self._fail(t, "frame", f"done after {t.covered} tokens with num_tokens="
                                          f"{header['num_tokens']}; expected {t.num_tokens}")
        t.state = TransferState.DONE
        del self._active[tid]
        self._finished.add(t)
        self.metrics.transfers_done += 1
        latency = None
        if t.t_first is not None:
            latency = max(0.0, time.time() - t.t_first)
            self.metrics.observe(latency)
        return TransferEvent(tid, t.request_id, TransferState.DONE, first_token=header["first_token"],
                             num_tokens=header["num_tokens"], latency_s=latency,
                             wire_bytes=t.wire_bytes, raw_bytes=t.raw_bytes, codec=t.codec)

    def _write(self, t: _Transfer, h: dict, buffers: list, kv_caches: list[torch.Tensor]) -> None:
        l0, l1 = h["layers"]
        t0, t1 = h["tokens"]
        blocks = h["blocks"]
        if not 0 <= l0 < l1 <= len(kv_caches):
            raise ValueError(f"layers [{l0}, {l1}) outside the {len(kv_caches)} of this cache")
        if not t.first_writable <= t0 < t1 <= t.num_tokens:
            raise ValueError(f"tokens [{t0}, {t1}) outside the expected [{t.first_writable}, "
                             f"{t.num_tokens})")
        b0, b1 = block_range(t0, t1, kv_caches[0].shape[2])
        allowed = t.dst_block_ids[b0:b1]
        start = allowed.index(blocks[0]) if blocks and blocks[0] in allowed else -1
        if start < 0 or allowed[start:start + len(blocks)] != blocks:
            raise ValueError(f"blocks {blocks[:4]}... are not this transfer's blocks for tokens [{t0}, {t1})")
        shape = [l1 - l0, len(blocks), *kv_caches[l0].shape[1:]]
        if list(h["shape"]) != shape:
            raise ValueError(f"payload shape {h['shape']} does not fit the cache (expected {shape})")
        if h["codec"] not in CODECS:
            raise ValueError(f"unknown codec {h['codec']!r}")
        codec = self._codecs.get(h["codec"]) or self._codecs.setdefault(h["codec"], get_codec(h["codec"]))
        staging = torch.empty(shape, dtype=DTYPES[h["dtype"]])
        codec.decode(h["codec_meta"], buffers, staging)
        cache0 = kv_caches[l0]
        idx = torch.tensor(blocks, dtype=torch.long, device=cache0.device)
        for i in range(l1 - l0):
            cache = kv_caches[l0 + i]
            cache.index_copy_(0, idx, staging[i].to(device=cache.device, dtype=cache.dtype))
        if h["last"]:
            if t0 > t.covered:
                raise ValueError(f"chunk [{t0}, {t1}) leaves tokens [{t.covered}, {t0}) unsent")
            t.covered = max(t.covered, t1)
