"""Decode node: receives prompt KV from prefill nodes and decodes with hybrid batching.

Request life cycle on this node:
1. the gateway sends `AddRequest(remote_prefill={transfer_id, prefill_replica, prefill_addr})`
   for a long prompt (short ones come plain and are prefilled here, stall-free);
2. we reserve blocks for the whole prompt and expect the transfer (WAITING); if the blocks or a
   batch slot are not free right now -- counting what the requests already waiting here need, so
   the reservation never delays them (FCFS) -- the request simply queues for a local prefill.
   With prefix caching the reservation shares the blocks of the prompt's cached prefix here;
3. we send the prompt to the prefill node with `kv_target` = our KV address, those block ids and
   `skip_tokens` = that cached prefix (request id `<id>/prefill`), and expect the transfer of the
   rest only: a frame writing a cached (possibly shared) block fails it;
4. every loop turn `KVReceiver.poll` writes arriving KV into the reserved blocks
   (TRANSFERRING); on "done" the request joins the running batch with all prompt tokens but the
   last computed -- the next step computes that one and samples the first token here;
5. on any failure (checksum, lost frame, abort, no progress within the timeout, or the gateway
   reporting the prefill replica lost) the partial KV is dropped and the prompt is recomputed
   locally, first in line; the prefill node is told to stop;
6. decoding, streaming, finishing and aborting are the hybrid replica's, and every path frees the
   request's blocks (an abort while waiting for KV also cancels the transfer).
"""
from __future__ import annotations

import logging
import time

import zmq

from engine import protocol
from engine.replica import ReplicaServer
from kv_transfer import KVReceiver, TransferState, make_transport
from kv_transfer.config import KVConfig
from prefill_node.server import PREFILL_SUFFIX
from scheduler.request import SamplingParams

log = logging.getLogger("tandem.decode")

TRANSFER_POLL_MS = 2
"""Loop wait while only transfers are pending: short, so KV lands without delay."""


class DecodeServer(ReplicaServer):
    role = "decode"

    def __init__(self, replica_id, config, input_addr, output_addr, kv: KVConfig) -> None:
        super().__init__(replica_id, config, input_addr, output_addr)
        self.kv = kv
        if kv.transport == "zmq":
            transport = make_transport("zmq", "receiver", address=kv.kv_addr)
            self.kv_addr = transport.address
            self._receivers = {"*": KVReceiver(transport, default_timeout_s=kv.timeout_s)}
        else:  # one torch.distributed channel per prefill peer
            self.kv_addr = None
            self._receivers = {
                peer: KVReceiver(make_transport("torch", "receiver", peer=rank), default_timeout_s=kv.timeout_s)
                for peer, rank in kv.peer_ranks.items() if peer.startswith("prefill")}
        self._prefill_socks: dict[str, zmq.Socket] = {}
        self._pending: dict[str, dict] = {}   # request id -> its remote_prefill info
        self._events: list[dict] = []
        # With tp/pp, every rank receives its own shard of a prompt's KV at an address of its own
        # (rank i of the prefill replica sends to rank i here); the prompt has landed when all
        # ranks report it.
        self._workers = self.engine.runner.workers
        self.kv_addrs = [self.kv_addr]
        if self._workers is not None:
            if kv.transport != "zmq":
                raise ValueError("a decode replica with tp/pp > 1 needs --kv-transport zmq")
            # Beside ours: ipc paths get a rank suffix, tcp a free port on this node.
            base = self.kv_addr.rsplit(":", 1)[0] + ":0" if self.kv_addr.startswith("tcp://") else None
            bound = self._workers.kv_listen(
                {r: base or f"{self.kv_addr}-rank{r}" for r in range(1, config.world_size)}, kv.timeout_s)
            self.kv_addrs += [bound[r] for r in range(1, config.world_size)]

    def ready_frame(self) -> protocol.ReplicaReady:
        frame = super().ready_frame()
        frame.kv_addr = self.kv_addr
        return frame

    def _to_prefill(self, addr: str, msg) -> None:
        sock = self._prefill_socks.get(addr)
        if sock is None:
            sock = self._prefill_socks[addr] = self.ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
        sock.send(protocol.encode(msg), copy=False)

    def _receiver(self, info: dict) -> KVReceiver:
        return self._receivers.get("*") or self._receivers[info["prefill_replica"]]

    def handle_add(self, msg: protocol.AddRequest) -> list[protocol.RequestOutput]:
        info = msg.remote_prefill
        if info is None:
            return super().handle_add(msg)
        result = self.engine.add_remote_prefill(msg.request_id, msg.prompt_token_ids, msg.sampling,
                                                tenant=msg.tenant)
        if result is None:   # no room beyond what the waiting queue needs: queued for a local prefill
            self._events.append({"state": "skipped", "reason": "no_free_blocks", "fallback": "local"})
            return []
        if isinstance(result, protocol.RequestOutput):
            return [result]
        tid, blocks = info["transfer_id"], list(result.block_ids)
        # Its cached prefix's blocks are shared here: the prefill replica sends only the rest.
        cached = result.num_computed_tokens
        self._receiver(info).expect(tid, msg.request_id, blocks, result.num_prompt_tokens,
                                    timeout_s=self.kv.timeout_s, num_cached_tokens=cached)
        if self._workers is not None:
            self._workers.kv({r: {"op": "expect", "transfer_id": tid, "request_id": msg.request_id,
                                  "block_ids": blocks, "num_tokens": result.num_prompt_tokens,
                                  "timeout_s": self.kv.timeout_s, "num_cached_tokens": cached}
                              for r in range(1, len(self.kv_addrs))})
        self._pending[msg.request_id] = {**info, "ranks_left": set(range(len(self.kv_addrs)))}
        target = {"transfer_id": tid, "request_id": msg.request_id, "kv_addr": self.kv_addr,
                  "kv_addrs": self.kv_addrs, "decode_replica": self.replica_id,
                  "dst_block_ids": blocks, "skip_tokens": cached}
        prefill_sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
        self._to_prefill(info["prefill_addr"], protocol.AddRequest(
            msg.request_id + PREFILL_SUFFIX, msg.prompt_token_ids, prefill_sampling, time.time(),
            kv_target=target, tenant=msg.tenant))
        return []

    def _cancel(self, info: dict) -> None:
        """Stop receiving a transfer on every rank."""
        self._receiver(info).cancel(info["transfer_id"])
        if self._workers is not None:
            self._workers.kv({r: {"op": "cancel", "transfer_id": info["transfer_id"]}
                              for r in range(1, len(self.kv_addrs))})

    def handle_abort(self, msg: protocol.AbortRequests) -> list[protocol.RequestOutput]:
        for rid in msg.request_ids:
            info = self._pending.pop(rid, None)
            if info is not None:
                self._cancel(info)
                self._to_prefill(info["prefill_addr"], protocol.AbortRequests([rid + PREFILL_SUFFIX]))
        return super().handle_abort(msg)

    def before_step(self) -> list[protocol.RequestOutput]:
        now = time.monotonic()
        for receiver in self._receivers.values():
            for e in receiver.poll(self.engine.runner.kv_caches):
                self._rank_event(0, e.request_id, e.state.value, e.reason, e.error, e.wire_bytes,
                                 e.raw_bytes, now, e)
        if self._workers is not None:
            for rank, e in self._workers.kv_reports():
                self._rank_event(rank, e["request_id"], e["state"], e["reason"], e["error"],
                                 e["wire_bytes"], e["raw_bytes"], now)
        return []

    def _rank_event(self, rank: int, request_id: str, state: str, reason: str | None,
                    error: str | None, wire_bytes: int, raw_bytes: int, now: float,
                    event=None) -> None:
        """One rank's shard of a prompt landed (or failed). All landed: the request runs; any
        failed: the others are cancelled and the prompt is recomputed here."""
        info = self._pending.get(request_id)
        if info is None:
            return
        if event is not None:   # rank 0's transfer gives the codec and the latency
            info["event"] = event
        if state == TransferState.DONE.value:
            info["ranks_left"].discard(rank)
            info["wire_bytes"] = info.get("wire_bytes", 0) + wire_bytes
            info["raw_bytes"] = info.get("raw_bytes", 0) + raw_bytes
            if info["ranks_left"]:
                return
            del self._pending[request_id]
            self.engine.scheduler.remote_prefill_done(request_id, now)
            self._events.append({"state": "done", "codec": info["event"].codec or "none",
                                 "wire_bytes": info["wire_bytes"], "raw_bytes": info["raw_bytes"],
                                 "latency_s": info["event"].latency_s})
            return
        del self._pending[request_id]
        log.warning("KV transfer %s for %s failed on rank %d (%s: %s); recomputing locally",
                    info["transfer_id"], request_id, rank, reason, error)
        self._cancel(info)
        self._to_prefill(info["prefill_addr"], protocol.AbortRequests([request_id + PREFILL_SUFFIX]))
        self._recompute(request_id, reason or "error", event.codec if event is not None else None)

    def handle_peer_lost(self, msg: protocol.PeerLost) -> list[protocol.RequestOutput]:
        """A prefill replica died: its prompts will never arrive, so recompute them here now
        (first in line) rather than after --kv-timeout."""
        lost = [rid for rid, info in self._pending.items() if info["prefill_replica"] == msg.replica_id]
        for rid in lost:
            self._cancel(self._pending.pop(rid))
            self._recompute(rid, "peer_lost", None)
        if lost:
            log.warning("prefill replica %s lost; recomputing %d prompts locally", msg.replica_id, len(lost))
        return []

    def _recompute(self, request_id: str, reason: str, codec: str | None) -> None:
        """Give up on the transfer: drop the partial KV and prefill here, first in line."""
        self.engine.scheduler.remote_prefill_failed(request_id)
        self._events.append({"state": "failed", "reason": reason, "codec": codec or "none",
                             "fallback": "recompute"})

    def live_transfers(self) -> int:
        return len(self._pending)

    def kv_events(self) -> list[dict]:
        events, self._events = self._events, []
        return events

    def idle_poll_ms(self) -> int:
        if self.engine.has_work():
            return 0
        return TRANSFER_POLL_MS if self._pending else super().idle_poll_ms()

    def close(self) -> None:
        for sock in self._prefill_socks.values():
            sock.close(linger=0)
        for receiver in self._receivers.values():
            receiver.transport.close()
        super().close()
