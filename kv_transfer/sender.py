"""KVSender: the prefill side of the handoff (states and events are in kv_transfer.session).

`send_chunk` snapshots the chunk's blocks synchronously (one gather copy per layer, so the prefill
replica may reuse or free its blocks as soon as the call returns) and leaves encoding and sending
to a background thread (`background=True`), so the engine loop goes on computing. Only the
calling thread changes transfer state: the worker reports back through a queue, applied by every
public method. Use one KVSender from one thread.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from kv_transfer.codecs import Codec, get_codec
from kv_transfer.frames import (MAX_FRAME_BYTES, block_range, control_frame, encode_frames,
                                frame_plan, gather_kv, wire_bytes)
from kv_transfer.session import (TransferEvent, TransferMetrics, TransferState, _Finished,
                                 _Transfer)
from kv_transfer.transport import Transport

log = logging.getLogger(__name__)
S = TransferState


class KVSender:
    def __init__(self, transport: Transport, codec: str | Codec = "raw", *, timeout_s: float = 60.0,
                 max_frame_bytes: int = MAX_FRAME_BYTES, background: bool = True,
                 max_queued_chunks: int = 16) -> None:
        """`timeout_s`: a transfer not finished within this long after its last send_* call fails
        (and an abort frame tells the receiver). `max_queued_chunks` bounds snapshot memory: a
        send_chunk that finds the queue full waits up to timeout_s, then fails the transfer."""
        self.transport = transport
        self.codec = get_codec(codec)
        self.timeout_s = timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.metrics = TransferMetrics()
        self._transfers: dict[str, _Transfer] = {}
        self._finished = _Finished()
        self._events: list[TransferEvent] = []
        self._notices: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: queue.Queue | None = None
        if background:
            self._jobs = queue.Queue(maxsize=max_queued_chunks)
            self._worker = threading.Thread(target=self._work, name="kv-sender", daemon=True)
            self._worker.start()

    # -- the interface -----------------------------------------------------------------------
    def begin(self, transfer_id: str, request_id: str) -> TransferState:
        """Register a transfer (BOOTSTRAP) before its first chunk; send_chunk does it implicitly."""
        self._apply_notices()
        t = self._transfers.get(transfer_id)
        if t is None:
            if transfer_id in self._finished:
                raise ValueError(f"transfer {transfer_id!r} already finished")
            t = _Transfer(transfer_id, request_id, S.BOOTSTRAP, self.timeout_s, time.monotonic())
            self._transfers[transfer_id] = t
            self.metrics.transfers_started += 1
        return t.state

    def send_chunk(self, transfer_id: str, request_id: str, kv_caches: list[torch.Tensor],
                   src_block_ids: list[int], dst_block_ids: list[int], token_start: int,
                   token_end: int) -> TransferState:
        """Queue the KV of tokens [token_start, token_end) (all layers, whole blocks: a partly
        filled last block is sent as is and re-sent by the next chunk) for the decode side's
        `dst_block_ids` (the request's full block table there)."""
        if self._closed_state(transfer_id) is not None:
            return self._closed_state(transfer_id)
        self.begin(transfer_id, request_id)
        t = self._transfers[transfer_id]
        b0, b1 = block_range(token_start, token_end, kv_caches[0].shape[2])
        if b1 > len(dst_block_ids):
            raise ValueError(f"tokens [{token_start}, {token_end}) need {b1} blocks, the decode side "
                             f"allocated {len(dst_block_ids)}")
        snap, b0, b1 = gather_kv(kv_caches, src_block_ids, token_start, token_end)
        if snap.device.type != "cpu":
            snap = snap.cpu()
        block_bytes = snap[0, 0].numel() * snap.element_size()
        seq = t.seq
        t.seq += len(frame_plan(snap.shape[0], snap.shape[1], block_bytes, self.max_frame_bytes))
        if t.t_first is None:
            t.t_first = time.time()
        extra = {"t_first": t.t_first}
        dst = [int(b) for b in dst_block_ids[b0:b1]]

        def job() -> list[list]:
            return encode_frames(transfer_id, request_id, seq, snap, dst, token_start, token_end,
                                 self.codec, max_frame_bytes=self.max_frame_bytes, extra=extra)

        self._submit(t, "kv", job, raw=snap.numel() * snap.element_size())
        return self.state(transfer_id)

    def send_done(self, transfer_id: str, request_id: str, first_token: int,
                  num_tokens: int) -> TransferState:
        """After the last chunk: the first sampled token and the number of prompt tokens computed."""
        if self._closed_state(transfer_id) is not None:
            return self._closed_state(transfer_id)
        self.begin(transfer_id, request_id)
        t = self._transfers[transfer_id]
        frame = control_frame(transfer_id, request_id, "done", t.seq, first_token=first_token,
                              num_tokens=num_tokens, extra={"t_first": t.t_first})
        t.seq += 1
        self._submit(t, "done", lambda: [frame])
        return self.state(transfer_id)

    def send_abort(self, transfer_id: str, reason: str, request_id: str | None = None) -> TransferState:
        """Tell the decode side to give up (it recomputes); the transfer is FAILED here at once."""
        self._apply_notices()
        t = self._transfers.get(transfer_id)
        if t is None and transfer_id in self._finished:
            return self._finished[transfer_id]
        if t is None:
            t = _Transfer(transfer_id, request_id or "", S.BOOTSTRAP, self.timeout_s, time.monotonic())
            self._transfers[transfer_id] = t
        self._abort(t, "abort", reason)
        return S.FAILED

    def state(self, transfer_id: str) -> TransferState | None:
        self._apply_notices()
        t = self._transfers.get(transfer_id)
        return t.state if t else self._finished.get(transfer_id)

    def poll(self) -> list[TransferEvent]:
        """Transfers that finished (DONE: every frame handed to the transport; FAILED) since the
        last poll; also fails transfers idle for more than timeout_s."""
        self._apply_notices()
        now = time.monotonic()
        for t in list(self._transfers.values()):
            if not t.state.finished and now - t.last_progress > t.timeout_s:
                self._abort(t, "timeout", f"prefill side sent nothing for {t.timeout_s:g}s")
        events, self._events = self._events, []
        return events

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every queued frame has been handed to the transport."""
        if self._jobs is not None:
            done = threading.Event()
            try:
                self._jobs.put((None, "flush", done.set, 0), timeout=timeout_s)
            except queue.Full:
                return False
            if not done.wait(timeout_s):
                return False
        self._apply_notices()
        return True

    def close(self, timeout_s: float = 10.0, close_transport: bool = True) -> None:
        """Flush (bounded), stop the worker and (unless told not to) close the transport."""
        if self._jobs is not None:
            self.flush(timeout_s)
            try:
                self._jobs.put(None, timeout=timeout_s)
            except queue.Full:
                pass
            self._worker.join(timeout_s)
        if close_transport:
            self.transport.close()

    # -- internals ---------------------------------------------------------------------------
    def _closed_state(self, transfer_id: str) -> TransferState | None:
        self._apply_notices()
        t = self._transfers.get(transfer_id)
        state = t.state if t else self._finished.get(transfer_id)
        if state is not None and state.finished:
            log.info("ignoring a send for finished KV transfer %s (%s)", transfer_id, state.value)
            return state
        return None

    def _submit(self, t: _Transfer, kind: str, job: Callable[[], list[list]], raw: int = 0) -> None:
        t.last_progress = time.monotonic()
        if self._jobs is None:
            self._run(t.transfer_id, kind, job, raw)
            self._apply_notices()
            return
        try:
            self._jobs.put((t.transfer_id, kind, job, raw), timeout=self.timeout_s)
        except queue.Full:
            self._abort(t, "timeout", f"send queue stayed full for {self.timeout_s:g}s")

    def _run(self, transfer_id: str, kind: str, job: Callable[[], list[list]], raw: int) -> None:
        """Encode + send one job (worker thread, or inline); report through the notice queue."""
        try:
            frames = job()
            sent = 0
            for parts in frames:
                self.transport.send(parts)
                sent += wire_bytes(parts)
            self._notices.put((transfer_id, kind, len(frames), sent, raw, None))
        except Exception as e:  # noqa: BLE001 - reported as the transfer's failure
            self._notices.put((transfer_id, kind, 0, 0, 0, f"{type(e).__name__}: {e}"))

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            transfer_id, kind, job, raw = item
            if kind == "flush":
                job()
                continue
            self._run(transfer_id, kind, job, raw)

    def _apply_notices(self) -> None:
        while True:
            try:
                tid, kind, frames, sent, raw, error = self._notices.get_nowait()
            except queue.Empty:
                return
            self.metrics.frames += frames
            self.metrics.wire_bytes[self.codec.name] += sent
            self.metrics.raw_bytes[self.codec.name] += raw
            t = self._transfers.get(tid)
            if t is None:  # already failed and forgotten
                continue
            t.wire_bytes += sent
            t.raw_bytes += raw
            t.last_progress = time.monotonic()
            if error is not None:
                self._finish(t, S.FAILED, "transport", f"sending {kind} frames failed: {error}")
            elif kind == "kv" and t.state == S.BOOTSTRAP:
                t.state = S.TRANSFERRING
            elif kind == "done":
                self._finish(t, S.DONE)

    def _abort(self, t: _Transfer, reason: str, error: str) -> None:
        """FAILED here, and an abort frame (best effort) so the receiver fails fast."""
        frame = control_frame(t.transfer_id, t.request_id, "abort", t.seq, reason=error)
        t.seq += 1
        self._finish(t, S.FAILED, reason, error)
        try:
            if self._jobs is None:
                self.transport.send(frame)
            else:
                self._jobs.put_nowait((t.transfer_id, "abort", lambda: [frame], 0))
        except Exception as e:  # noqa: BLE001 - the receiver will time out instead
            log.warning("could not send abort for KV transfer %s: %s", t.transfer_id, e)

    def _finish(self, t: _Transfer, state: TransferState, reason: str | None = None,
                error: str | None = None) -> None:
        t.state = state
        self._transfers.pop(t.transfer_id, None)
        self._finished.add(t)
        latency = time.time() - t.t_first if t.t_first is not None else None
        if state == S.DONE:
            self.metrics.transfers_done += 1
            if latency is not None:
                self.metrics.observe(latency)
        else:
            self.metrics.transfers_failed[reason or "unknown"] += 1
            log.warning("KV transfer %s (request %s) failed on the prefill side: %s",
                        t.transfer_id, t.request_id, error)
        self._events.append(TransferEvent(t.transfer_id, t.request_id, state, error=error,
                                          reason=reason if state == S.FAILED else None,
                                          latency_s=latency if state == S.DONE else None,
                                          wire_bytes=t.wire_bytes, raw_bytes=t.raw_bytes))

