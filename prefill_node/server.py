"""Prefill node: the same EngineCore, stopping after the prompt and pushing KV as it is computed.

Request life cycle on this node:
1. a decode replica sends `AddRequest(kv_target=...)`: its request id, transfer id, KV address,
   the block ids it reserved and `skip_tokens`, the prompt's prefix it has cached already; we
   queue the prompt with max_tokens=1 (stall-free chunking, but the traffic here is prefill only,
   so chunks fill the whole budget). With prefix caching our own cached prefix is not computed
   again: the prompt starts after it;
2. after every step that computed a chunk of it, the KV of exactly those tokens (and, the first
   time, of our cached prefix beyond `skip_tokens`) goes out
   (`KVSender.send_chunk`: a synchronous copy of the blocks, encode + send on a worker thread), so
   the transfer overlaps the next chunk's compute;
3. when the prompt is done (the step samples one token) the last chunk and a "done" frame go out
   and the request ends here; its blocks are freed in that step (the copy was already taken);
4. if it cannot be admitted, is aborted by the decode side, ends in a failed step, or the sender
   fails, an abort frame (or the decode side's timeout) makes the decode replica recompute the
   prompt itself; if the gateway reports the decode replica lost, its prompts are dropped here.
Nothing of these requests goes to the gateway: the decode replica streams the tokens.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

from engine import protocol
from engine.replica import ReplicaServer
from kv_transfer import KVSender, TransferState, make_transport
from kv_transfer.config import KVConfig
from scheduler.request import Request

log = logging.getLogger("tandem.prefill")


@dataclass
class _Push:
    request: Request
    transfer_id: str
    target_request_id: str
    dst_block_ids: list[int]
    sender: KVSender
    target_replica: str
    """The decode replica waiting for this KV."""
    rank_addrs: list[str] = field(default_factory=list)
    """With tp/pp: the KV address of each decode rank (rank i's shard goes to rank i)."""
    sent_upto: int = 0
    """Tokens whose KV has been handed to the sender."""
    skip: int = 0
    """Tokens the decode replica has cached already (its `skip_tokens`): never sent."""
    step_table: list[int] = field(default_factory=list)
    """The request's block table as the step computed into it (see `before_step`)."""


class PrefillServer(ReplicaServer):
    role = "prefill"

    def __init__(self, replica_id, config, input_addr, output_addr, kv: KVConfig) -> None:
        super().__init__(replica_id, config, input_addr, output_addr)
        self.kv = kv
        self._senders: dict[str, KVSender] = {}
        self._pushes: dict[str, _Push] = {}
        self._workers = self.engine.runner.workers
        self._ranks = config.world_size
        if self._workers is not None and kv.transport != "zmq":
            raise ValueError("a prefill replica with tp/pp > 1 needs --kv-transport zmq")

    def _sender(self, target: dict) -> KVSender:
        key = target["kv_addr"] if self.kv.transport == "zmq" else target["decode_replica"]
        sender = self._senders.get(key)
        if sender is None:
            if self.kv.transport == "zmq":
                transport = make_transport("zmq", "sender", address=target["kv_addr"])
            else:
                transport = make_transport("torch", "sender", peer=self.kv.peer_ranks[key])
            if os.environ.get(FAULT_ENV):
                transport = FaultyTransport(transport, os.environ[FAULT_ENV])
            sender = self._senders[key] = KVSender(transport, self.kv.codec, timeout_s=self.kv.timeout_s)
        return sender

    def handle_add(self, msg: protocol.AddRequest) -> list[protocol.RequestOutput]:
        target = msg.kv_target
        if target is None:  # plain request: serve it like a hybrid replica would
            return super().handle_add(msg)
        sender = self._sender(target)
        tid = target["transfer_id"]
        sender.begin(tid, target["request_id"])
        rank_addrs = list(target.get("kv_addrs") or [target["kv_addr"]])
        if len(rank_addrs) != self._ranks:
            error = (f"the decode replica has {len(rank_addrs)} ranks, this prefill replica "
                     f"{self._ranks} (KV shards go rank i -> rank i)")
        else:
            result = self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.sampling,
                                             tenant=msg.tenant)
            error = result.error if result is not None else None
        if error is not None:
            sender.send_abort(tid, f"prefill replica {self.replica_id} refused it: {error}",
                              request_id=target["request_id"])
            return []
        request = self.engine.scheduler.get(msg.request_id)
        skip = int(target.get("skip_tokens", 0))
        self._pushes[msg.request_id] = _Push(request, tid, target["request_id"],
                                             list(target["dst_block_ids"]), sender,
                                             target["decode_replica"], rank_addrs, sent_upto=skip,
                                             skip=skip)
        return []

    def handle_abort(self, msg: protocol.AbortRequests) -> list[protocol.RequestOutput]:
        for rid in msg.request_ids:
            self._pushes.pop(rid, None)  # the decode side gave up: nothing more to send
        return self.engine.abort(msg.request_ids)

    def handle_peer_lost(self, msg: protocol.PeerLost) -> list[protocol.RequestOutput]:
        """A decode replica died: nobody will receive these prompts' KV, so stop computing them."""
        lost = [rid for rid, push in self._pushes.items() if push.target_replica == msg.replica_id]
        for rid in lost:
            self._drop(rid, f"decode replica {msg.replica_id} lost")
        if lost:
            log.warning("decode replica %s lost; dropping %d prompts", msg.replica_id, len(lost))
        return self.engine.abort(lost)

    def live_transfers(self) -> int:
        return len(self._pushes)

    def before_step(self) -> list[protocol.RequestOutput]:
        failed = [(e.transfer_id, e.error) for sender in self._senders.values() for e in sender.poll()
                  if e.state is TransferState.FAILED]
        if self._workers is not None:   # a worker rank's shard failed: the transfer has failed
            failed += [(e["transfer_id"], e["error"]) for _, e in self._workers.kv_reports()]
        for tid, error in failed:
            rid = next((r for r, p in self._pushes.items() if p.transfer_id == tid), None)
            if rid is not None:
                log.warning("KV push %s failed (%s); dropping %s", tid, error, rid)
                self._drop(rid, f"KV push failed: {error}")
                self.engine.abort([rid])
        for push in self._pushes.values():
            # Finishing frees the blocks in `update`, which rebinds `request.block_ids` to a new
            # list; holding the list object itself (not a copy) keeps the blocks the step computed
            # into, including those `schedule` is about to allocate to a prompt done in one step.
            push.step_table = push.request.block_ids
        return []

    def after_step(self) -> None:
        for rid, push in list(self._pushes.items()):
            r = push.request
            done = r.is_finished
            computed = r.num_prompt_tokens if done else r.num_computed_tokens
            if computed < push.sent_upto:   # preempted: it will be recomputed from the start
                push.sent_upto = push.skip
                continue
            blocks = push.step_table if done else r.block_ids
            if computed > push.sent_upto:
                push.sender.send_chunk(push.transfer_id, push.target_request_id, self.engine.runner.kv_caches,
                                       blocks, push.dst_block_ids, push.sent_upto, computed)
                self._to_ranks(push, "send", src_block_ids=list(blocks), dst_block_ids=push.dst_block_ids,
                               start=push.sent_upto, end=computed)
                push.sent_upto = computed
            if done:
                first = r.output_token_ids[0] if r.output_token_ids else -1
                push.sender.send_done(push.transfer_id, push.target_request_id, first, r.num_prompt_tokens)
                self._to_ranks(push, "done", first_token=first, num_tokens=r.num_prompt_tokens)
                del self._pushes[rid]

    def _to_ranks(self, push: _Push, op: str, **fields) -> None:
        """The same KV operation for every worker rank, on its own shard, to its decode rank.
        Instructions follow the step on the worker's channel, so it copies what that step wrote."""
        if self._workers is not None:
            self._workers.kv({r: {"op": op, "transfer_id": push.transfer_id,
                                  "request_id": push.target_request_id, "kv_addr": push.rank_addrs[r],
                                  "codec": self.kv.codec, "timeout_s": self.kv.timeout_s, **fields}
                              for r in range(1, self._ranks)})

    def _drop(self, rid: str, reason: str) -> None:
        push = self._pushes.pop(rid)
        push.sender.send_abort(push.transfer_id, f"prefill replica {self.replica_id}: {reason}",
                               request_id=push.target_request_id)
        self._to_ranks(push, "abort", reason=f"prefill replica {self.replica_id}: {reason}")

    def _fail_all(self, message: str) -> list[protocol.RequestOutput]:
        """A failed step ends every request here; the decode replicas waiting for their KV hear it
        now (they recompute) instead of after --kv-timeout, and nothing is pushed from freed
        blocks on the next turn."""
        for rid in list(self._pushes):
            self._drop(rid, message)
        return super()._fail_all(message)

    def visible(self, outputs: list[protocol.RequestOutput]) -> list[protocol.RequestOutput]:
        return [o for o in outputs if not o.request_id.endswith(PREFILL_SUFFIX)]

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close(timeout_s=2.0)
        super().close()


PREFILL_SUFFIX = "/prefill"
"""Request ids a decode node gives the prompts it offloads (never shown to the gateway)."""


FAULT_ENV = "TANDEM_KV_FAULT"


class FaultyTransport:
    """Fault injection for tests, set by the environment variable TANDEM_KV_FAULT of a prefill
    node: `drop:N` loses the N-th frame, `corrupt:N` flips a payload byte of the N-th frame,
    `stall:S` sleeps S seconds after the first frame (on the sender's worker thread: frames stop
    flowing while the engine goes on).

    `scramble` is the negative control of the parity tests, the one wrong handoff that no check
    can see: every KV frame is decoded, its values shuffled (a fixed permutation of the elements)
    and encoded again with the same codec and fresh checksums -- as if the sender had encoded
    wrong KV -- so the frame is well formed, passes every check and completes the transfer; only
    the KV is wrong. A parity test that still passes with it would not be testing the handoff.
    Test-only, like the rest."""

    def __init__(self, inner, spec: str) -> None:
        kind, _, value = spec.partition(":")
        if kind not in ("drop", "corrupt", "stall", "scramble"):
            raise ValueError(f"{FAULT_ENV} must be drop:N, corrupt:N, stall:S or scramble, got {spec!r}")
        self.inner, self.kind, self.value, self.count = inner, kind, float(value or 1), 0
        log.warning("KV fault injection active: %s", spec)

    def send(self, parts) -> None:
        self.count += 1
        hit = self.count == int(self.value)
        if self.kind == "drop" and hit:
            return
        if self.kind == "corrupt" and hit and len(parts) > 1:
            payload = bytearray(bytes(parts[-1]))
            payload[len(payload) // 2] ^= 0xFF
            parts = [*parts[:-1], bytes(payload)]
        if self.kind == "scramble":
            parts = _scrambled(parts)
        self.inner.send(parts)
        if self.kind == "stall" and self.count == 1:
            time.sleep(self.value)

    def recv(self, timeout_s):
        return self.inner.recv(timeout_s)

    def close(self) -> None:
        self.inner.close()


def _scrambled(parts):
    """A KV frame re-encoded (same codec, fresh checksums) with its values shuffled; others as is."""
    import torch

    from kv_transfer.codecs import DTYPES, get_codec
    from kv_transfer.frames import _pack, crc32, decode_frame, nbytes

    header, buffers = decode_frame(parts)
    if header["kind"] != "kv":
        return parts
    codec = get_codec(header["codec"])
    kv = torch.empty(header["shape"], dtype=DTYPES[header["dtype"]])
    codec.decode(header["codec_meta"], buffers, kv)
    perm = torch.randperm(kv.numel(), generator=torch.Generator().manual_seed(0))
    meta, buffers = codec.encode(kv.reshape(-1)[perm].reshape(kv.shape))
    header.update(codec_meta=meta, sizes=[nbytes(b) for b in buffers], crc=crc32(buffers))
    return _pack(header, buffers)
