"""Tensor and pipeline parallelism within one replica on one machine.

Tensor parallelism (`tp`, Megatron-style): each rank of a stage holds whole GQA groups of
attention heads and a slice of the MLP columns; an all-reduce over the stage's ranks follows
`o_proj` and `down_proj`. Pipeline parallelism (`pp`): the layers are split into contiguous
stages; a stage passes its activations to the same tp rank of the next one, and the last stage's
tp rank 0 sends the final hidden rows to the driver. Rank = stage * tp + tp_rank.

Life cycle of a replica with tp * pp = N ranks:
1. the driver (rank 0: the replica server, scheduler, sampler; stage 0) starts ranks 1..N-1 as
   worker processes (`python -m engine.parallel`) and all N join one process group through a
   file store in a private directory (Gloo on CPU, NCCL on CUDA: `kv_transfer.config.kv_backend`),
   then one sub-group per stage for its all-reduces;
2. every rank loads only its shard (its stage's layers, its heads and columns) and allocates the
   same number of KV blocks (sized by the largest shard) for its own layers and heads: block ids
   mean the same on every rank;
3. every step the driver sends the step's `StepBatch` (its forward arrays, msgpack over a ZeroMQ
   PUSH socket per worker; KV-transfer instructions go down the same ordered channel between
   steps, and each worker moves its own shard of a prompt's KV, `RankKV`) and then runs its own
   forward; ranks meet in the all-reduces and the
   stage-to-stage sends; only the driver computes logits and samples. With pp > 1 every rank cuts
   the step into pp micro-batches of whole sequences (`split_batch`), and sends go out without
   waiting, so stage s runs micro-batch m+1 while stage s+1 runs m;
4. a rank that dies fails the driver's next collective (or the driver sees its exit first): the
   step raises `ParallelBroken`, which ends the replica process, so the launcher restarts the
   whole replica with a fresh group; workers exit when their driver does.
"""
from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta

import msgpack
import torch
import torch.distributed as dist
import zmq

from engine.config import EngineConfig
from engine.model_config import ModelConfig, shard_heads
from engine.step_batch import StepBatch, decode_forward, encode_forward

log = logging.getLogger("tandem.parallel")

GROUP_TIMEOUT_S = 120.0
"""Longest a rank waits in the group (joining, or in a collective for a slow peer)."""
WORKER_POLL_MS = 1000
"""How often an idle worker checks that its driver is still alive."""
TRANSFER_POLL_MS = 2
"""A worker's wait between polls while KV transfers of its shard are in flight."""


class ParallelBroken(RuntimeError):
    """A rank of this replica is gone: the process group cannot be used again."""

    fatal = True
    """The replica loop ends the process on it (engine/replica.py); the launcher restarts it."""


@dataclass(frozen=True)
class Shard:
    """What one rank holds: [start, end) ranges of layers, query heads, KV heads, MLP columns."""

    rank: int
    tp: int
    pp: int
    layers: tuple[int, int]
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def num_layers(self) -> int:
        return self.layers[1] - self.layers[0]

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_size(self) -> int:
        return self.ffn[1] - self.ffn[0]

    @property
    def first_stage(self) -> bool:
        return self.stage == 0

    @property
    def last_stage(self) -> bool:
        return self.stage == self.pp - 1


def _even(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of `parts` runs covering `total`, the first `total % parts` one longer."""
    base, extra = divmod(total, parts)
    out, start = [], 0
    for i in range(parts):
        out.append((start, start + base + (i < extra)))
        start = out[-1][1]
    return out


def _runs(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def make_shard(cfg: ModelConfig, tp: int, rank: int, pp: int = 1) -> Shard:
    if pp > cfg.num_layers:
        raise ValueError(f"pp={pp} exceeds the model's {cfg.num_layers} layers")
    heads = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp)
    t = rank % tp
    return Shard(rank, tp, pp, _even(cfg.num_layers, pp)[rank // tp], _runs([q for q, _ in heads])[t],
                 _runs([kv for _, kv in heads])[t], _even(cfg.intermediate_size, tp)[t])


def cache_model_config(cfg: ModelConfig, tp: int, pp: int) -> ModelConfig:
    """The model as the largest shard sees it (most KV heads, most layers): every rank sizes its
    cache by it, so all get the same number of blocks without talking to each other."""
    kv = max(k for _, k in shard_heads(cfg.num_heads, cfg.num_kv_heads, tp))
    layers = max(b - a for a, b in _even(cfg.num_layers, pp))
    return replace(cfg, num_kv_heads=kv, num_layers=layers)


class Pipeline:
    """This rank's view of the replica's process group (after `join`): its stage's all-reduce
    and the stage-to-stage sends."""

    def __init__(self, config: EngineConfig, store_dir: str) -> None:
        from kv_transfer.config import kv_backend  # noqa: PLC0415 - one place picks the backend

        backend = kv_backend(config.device)
        if backend == "gloo":
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group(backend, init_method=f"file://{store_dir}/store", rank=config.rank,
                                world_size=config.world_size,
                                timeout=timedelta(seconds=GROUP_TIMEOUT_S))
        self.config = config
        self.tp_group = None
        for stage in range(config.pp):   # every rank creates every group, in the same order
            group = dist.new_group(list(range(stage * config.tp, (stage + 1) * config.tp)))
            if stage == config.stage:
                self.tp_group = group
        self.device = torch.device(config.device)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over this stage's tensor-parallel ranks (in place)."""
        _collective(functools.partial(dist.all_reduce, x, group=self.tp_group))
        return x

    def send_next(self, x: torch.Tensor):
        """Activations to the same tp rank of the next stage, without waiting for it to take them
        (so this stage goes on with the next micro-batch); `.wait()` the handle before reusing x."""
        return _collective(functools.partial(dist.isend, x.contiguous(), dst=self.config.rank + self.config.tp))

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        _collective(functools.partial(dist.recv, x, src=self.config.rank - self.config.tp))
        return x

    def send_result(self, x: torch.Tensor):
        """The last stage's hidden rows, from its tp rank 0 to the driver (not waiting for it)."""
        return _collective(functools.partial(dist.isend, x.contiguous(), dst=0))

    def recv_result(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        x = torch.empty(shape, dtype=dtype, device=self.device)
        _collective(functools.partial(dist.recv, x, src=(self.config.pp - 1) * self.config.tp))
        return x

    @staticmethod
    def wait(work) -> None:
        """Until a `send_next` / `send_result` has completed."""
        _collective(work.wait)


def _collective(call):
    """Run a collective or point-to-point call; a failure means a rank is gone."""
    try:
        return call()
    except (RuntimeError, dist.DistBackendError) as e:
        raise ParallelBroken(f"a collective of the replica's ranks failed: {e}") from e


class RankKV:
    """A worker rank's part in KV transfers (disaggregation): it moves its own shard of each
    prompt's KV (its layers, its heads) from or to the rank of the same index on the other side,
    as its driver instructs (`Workers.kv`), and reports how each transfer ended."""

    def __init__(self) -> None:
        self.receiver = None
        self.senders: dict[str, object] = {}
        self.expected: set[str] = set()

    def handle(self, op: dict, kv_caches: list[torch.Tensor]) -> str | None:
        """Carry out one instruction; "listen" returns the address the receiver bound."""
        from kv_transfer import KVReceiver, KVSender, make_transport  # noqa: PLC0415 - nodes only

        kind, tid = op["op"], op.get("transfer_id")
        if kind == "listen":
            self.receiver = KVReceiver(make_transport("zmq", "receiver", address=op["addr"]),
                                       default_timeout_s=op["timeout_s"])
            return self.receiver.transport.address
        elif kind == "expect":
            self.receiver.expect(tid, op["request_id"], op["block_ids"], op["num_tokens"],
                                 timeout_s=op["timeout_s"], num_cached_tokens=op.get("num_cached_tokens", 0))
            self.expected.add(tid)
        elif kind == "cancel":
            self.receiver.cancel(tid)
            self.expected.discard(tid)
        else:   # the prefill side: send / done / abort
            sender = self.senders.get(op["kv_addr"])
            if sender is None:
                sender = self.senders[op["kv_addr"]] = KVSender(
                    make_transport("zmq", "sender", address=op["kv_addr"]), op["codec"],
                    timeout_s=op["timeout_s"])
            if kind == "send":
                sender.send_chunk(tid, op["request_id"], kv_caches, op["src_block_ids"],
                                  op["dst_block_ids"], op["start"], op["end"])
            elif kind == "done":
                sender.send_done(tid, op["request_id"], op["first_token"], op["num_tokens"])
            elif kind == "abort":
                sender.send_abort(tid, op["reason"], request_id=op["request_id"])
        return None

    def poll(self, kv_caches: list[torch.Tensor]) -> list[dict]:
        events = list(self.receiver.poll(kv_caches)) if self.receiver is not None else []
        for sender in self.senders.values():
            events += [e for e in sender.poll() if e.state.value == "failed"]
        for e in events:
            self.expected.discard(e.transfer_id)
        return [{"transfer_id": e.transfer_id, "request_id": e.request_id, "state": e.state.value,
                 "reason": e.reason, "error": e.error, "wire_bytes": e.wire_bytes,
                 "raw_bytes": e.raw_bytes} for e in events]

    @property
    def busy(self) -> bool:
        return bool(self.expected)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.transport.close()
        for sender in self.senders.values():
            sender.close(timeout_s=2.0)


class Workers:
    """The driver's handle on ranks 1..N-1: started, fed a StepBatch every step and KV
    instructions in between (one ordered channel per worker), their KV reports read back,
    stopped."""

    def __init__(self, config: EngineConfig) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-par-")
        self._ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self.socks: list[zmq.Socket] = []
        self._reports = self._ctx.socket(zmq.PULL)
        self._reports.bind(f"ipc://{self._dir.name}/reports")
        for rank in range(1, config.world_size):
            addr = f"ipc://{self._dir.name}/rank-{rank}"
            worker_cfg = replace(config, rank=rank)
            self.procs.append(subprocess.Popen([
                sys.executable, "-m", "engine.parallel", "--addr", addr,
                "--report-addr", f"ipc://{self._dir.name}/reports",
                "--store-dir", self._dir.name, "--config-json", json.dumps(worker_cfg.to_dict())]))
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            self.socks.append(sock)
        log.info("tp=%d pp=%d: started %d worker ranks (pids %s)", config.tp, config.pp,
                 len(self.procs), [p.pid for p in self.procs])
        self.pipeline = Pipeline(config, self._dir.name)

    def broadcast(self, batch: StepBatch) -> None:
        """Send the step to every worker (before the driver's own forward)."""
        dead = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            raise ParallelBroken(f"worker ranks exited: {dead}")
        frame = encode_forward(batch)
        for sock in self.socks:
            sock.send_multipart([b"step", frame], copy=False)

    def kv(self, ops: dict[int, dict]) -> None:
        """KV instructions for worker ranks (rank -> op); they run in order with the steps."""
        for rank, op in ops.items():
            self.socks[rank - 1].send_multipart([b"kv", msgpack.packb(op, use_bin_type=True)])

    def kv_listen(self, addrs: dict[int, str], timeout_s: float) -> dict[int, str]:
        """Each worker rank binds a KV receiver (address per rank; tcp port 0 picks one) and
        says where: rank -> bound address."""
        self.kv({r: {"op": "listen", "addr": a, "timeout_s": timeout_s} for r, a in addrs.items()})
        bound: dict[int, str] = {}
        while len(bound) < len(addrs):
            if not self._reports.poll(GROUP_TIMEOUT_S * 1000):
                raise ParallelBroken(f"worker ranks {sorted(set(addrs) - set(bound))} did not bind "
                                     f"their KV receivers within {GROUP_TIMEOUT_S:g}s")
            rank, kind, payload = msgpack.unpackb(self._reports.recv(), raw=False)
            if kind == "listening":
                bound[rank] = payload
        return bound

    def kv_reports(self) -> list[tuple[int, dict]]:
        """(rank, transfer event) the workers reported since the last call (non-blocking)."""
        out = []
        while True:
            try:
                rank, kind, events = msgpack.unpackb(self._reports.recv(zmq.NOBLOCK), raw=False)
            except zmq.Again:
                return out
            if kind == "events":
                out += [(rank, e) for e in events]

    def close(self, timeout_s: float = 5.0) -> None:
        for sock in self.socks:
            try:
                sock.send_multipart([b"stop"], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            sock.close()
        self._reports.close(linger=0)
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
        self._ctx.term()
        self._dir.cleanup()


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One worker rank of a replica (started by its driver).")
    p.add_argument("--addr", required=True, help="ZeroMQ address to bind for the driver's steps")
    p.add_argument("--report-addr", required=True, help="ZeroMQ address of the driver's KV reports")
    p.add_argument("--store-dir", required=True, help="directory of the process group's file store")
    p.add_argument("--config-json", required=True, help="EngineConfig as JSON (rank set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = EngineConfig.from_dict(json.loads(args.config_json))
    if config.threads:
        torch.set_num_threads(config.threads)
    parent = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(args.addr)
    reports = ctx.socket(zmq.PUSH)
    reports.setsockopt(zmq.LINGER, 0)
    reports.connect(args.report_addr)
    pipeline = Pipeline(config, args.store_dir)
    from engine.runner import ModelRunner  # noqa: PLC0415 - the runner imports this module

    runner = ModelRunner(config, ModelConfig.from_dir(config.model_dir), pipeline=pipeline)
    log.info("rank %d of %d ready (stage %d, tp rank %d)", config.rank, config.world_size,
             config.stage, config.tp_rank)
    kv = RankKV()
    try:
        while True:
            if sock.poll(TRANSFER_POLL_MS if kv.busy else WORKER_POLL_MS):
                kind, *payload = sock.recv_multipart()
                if kind == b"stop":
                    return
                if kind == b"step":
                    runner.forward(decode_forward(payload[0]))
                else:
                    bound = kv.handle(msgpack.unpackb(payload[0], raw=False), runner.kv_caches)
                    if bound is not None:
                        reports.send(msgpack.packb([config.rank, "listening", bound], use_bin_type=True))
            elif os.getppid() != parent:
                log.warning("driver exited; rank %d stops", config.rank)
                return
            events = kv.poll(runner.kv_caches)
            if events:
                reports.send(msgpack.packb([config.rank, "events", events], use_bin_type=True))
    except ParallelBroken as e:
        log.warning("rank %d stops: %s", config.rank, e)
    finally:
        kv.close()
        sock.close(linger=0)
        reports.close()
        ctx.term()


if __name__ == "__main__":
    worker_main()
