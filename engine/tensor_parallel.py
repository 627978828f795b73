"""Tensor parallelism within one replica on one machine (Megatron-style: attention heads split by
whole GQA groups, the MLP by intermediate columns, an all-reduce after `o_proj` and after
`down_proj`).

Life cycle of a replica with `tp` = N:
1. the driver (rank 0: the replica server, scheduler, sampler) starts ranks 1..N-1 as worker
   processes (`python -m engine.tensor_parallel`) and all N join one process group through a file
   store in a private directory (Gloo on CPU, NCCL on CUDA: `kv_transfer.config.kv_backend`);
2. every rank loads only its shard of each projection and allocates the same number of KV blocks
   for its own KV heads (block ids mean the same on every rank);
3. every step the driver sends the step's `StepBatch` (its forward arrays, msgpack over a ZeroMQ
   PUSH socket per worker) and then runs its own forward; the ranks meet in the all-reduces; only
   the driver computes logits and samples;
4. a worker that dies fails the driver's next all-reduce (or the driver sees its exit first):
   the step raises `TensorParallelBroken`, which ends the replica process, so the launcher
   restarts the whole replica with a fresh group; workers exit when their driver does.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, replace
from datetime import timedelta

import torch
import torch.distributed as dist
import zmq

from engine.config import EngineConfig
from engine.model_config import ModelConfig, shard_heads
from engine.step_batch import StepBatch, decode_forward, encode_forward

log = logging.getLogger("tandem.tp")

GROUP_TIMEOUT_S = 120.0
"""Longest a rank waits in the group (joining, or in an all-reduce for a slow peer)."""
WORKER_POLL_MS = 1000
"""How often an idle worker checks that its driver is still alive."""


class TensorParallelBroken(RuntimeError):
    """A rank of this replica is gone: the process group cannot be used again."""

    fatal = True
    """The replica loop ends the process on it (engine/replica.py); the launcher restarts it."""


@dataclass(frozen=True)
class Shard:
    """What one rank holds: [start, end) ranges of query heads, KV heads and MLP columns."""

    rank: int
    size: int
    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    ffn: tuple[int, int]

    @property
    def num_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]

    @property
    def ffn_size(self) -> int:
        return self.ffn[1] - self.ffn[0]


def _ranges(sizes: list[int]) -> list[tuple[int, int]]:
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def make_shard(cfg: ModelConfig, tp: int, rank: int) -> Shard:
    heads = shard_heads(cfg.num_heads, cfg.num_kv_heads, tp)
    base, extra = divmod(cfg.intermediate_size, tp)
    ffn = [base + (r < extra) for r in range(tp)]
    return Shard(rank, tp, _ranges([q for q, _ in heads])[rank], _ranges([kv for _, kv in heads])[rank],
                 _ranges(ffn)[rank])


def max_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """KV heads of the largest shard: every rank sizes its cache by it, so all get the same
    number of blocks without talking to each other."""
    return max(kv for _, kv in shard_heads(cfg.num_heads, cfg.num_kv_heads, tp))


def init_group(rank: int, size: int, store_dir: str, device: str) -> None:
    from kv_transfer.config import kv_backend  # noqa: PLC0415 - one place picks the backend

    backend = kv_backend(device)
    if backend == "gloo":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(backend, init_method=f"file://{store_dir}/store", rank=rank,
                            world_size=size, timeout=timedelta(seconds=GROUP_TIMEOUT_S))


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum of `x` over the replica's ranks (in place)."""
    try:
        dist.all_reduce(x)
    except (RuntimeError, dist.DistBackendError) as e:
        raise TensorParallelBroken(f"tensor-parallel all-reduce failed: {e}") from e
    return x


class Workers:
    """The driver's handle on ranks 1..N-1: started, fed a StepBatch every step, stopped."""

    def __init__(self, config: EngineConfig) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="tandem-tp-")
        self._ctx = zmq.Context()
        self.procs: list[subprocess.Popen] = []
        self.socks: list[zmq.Socket] = []
        for rank in range(1, config.tp):
            addr = f"ipc://{self._dir.name}/rank-{rank}"
            worker_cfg = replace(config, tp_rank=rank)
            self.procs.append(subprocess.Popen([
                sys.executable, "-m", "engine.tensor_parallel", "--addr", addr,
                "--store-dir", self._dir.name, "--config-json", json.dumps(worker_cfg.to_dict())]))
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(addr)
            self.socks.append(sock)
        log.info("tensor parallel: started %d worker ranks (pids %s)", len(self.procs),
                 [p.pid for p in self.procs])
        init_group(0, config.tp, self._dir.name, config.device)

    def broadcast(self, batch: StepBatch) -> None:
        """Send the step to every worker (before the driver's own forward)."""
        dead = [(i + 1, p.returncode) for i, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            raise TensorParallelBroken(f"tensor-parallel worker ranks exited: {dead}")
        frame = encode_forward(batch)
        for sock in self.socks:
            sock.send(frame, copy=False)

    def close(self, timeout_s: float = 5.0) -> None:
        for sock in self.socks:
            try:
                sock.send(b"", zmq.NOBLOCK)   # empty frame: stop
            except zmq.ZMQError:
                pass
            sock.close()
        for p in self.procs:
            try:
                p.wait(timeout_s)
            except subprocess.TimeoutExpired:
                p.kill()
        self._ctx.term()
        self._dir.cleanup()


def worker_main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="One tensor-parallel worker rank (started by its driver).")
    p.add_argument("--addr", required=True, help="ZeroMQ address to bind for the driver's steps")
    p.add_argument("--store-dir", required=True, help="directory of the process group's file store")
    p.add_argument("--config-json", required=True, help="EngineConfig as JSON (tp_rank set)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = EngineConfig.from_dict(json.loads(args.config_json))
    if config.threads:
        torch.set_num_threads(config.threads)
    parent = os.getppid()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PULL)
    sock.bind(args.addr)
    init_group(config.tp_rank, config.tp, args.store_dir, config.device)
    from engine.runner import ModelRunner  # noqa: PLC0415 - the runner imports this module

    runner = ModelRunner(config, ModelConfig.from_dir(config.model_dir))
    log.info("tensor-parallel rank %d/%d ready", config.tp_rank, config.tp)
    try:
        while True:
            if not sock.poll(WORKER_POLL_MS):
                if os.getppid() != parent:
                    log.warning("driver exited; rank %d stops", config.tp_rank)
                    return
                continue
            frame = sock.recv()
            if not frame:
                return
            runner.forward(decode_forward(frame))
    except TensorParallelBroken as e:
        log.warning("rank %d stops: %s", config.tp_rank, e)
    finally:
        sock.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    worker_main()
