"""TorchDistTransport with Gloo across two processes (the NCCL path is the same code on GPUs)."""
from __future__ import annotations

import multiprocessing as mp
import queue
import time

import pytest
import torch

from bench.server import free_port

torch.set_num_threads(1)
BS, HEADS, DIM, LAYERS = 16, 3, 64, 6
SRC_IDS, DST_IDS = [7, 1, 4, 0, 9, 3], [2, 10, 5, 8, 0, 11]
NUM_TOKENS, CHUNKS = 90, [(0, 40), (40, 80), (80, 90)]


def source_cache() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randn(12, 2, BS, HEADS, DIM, generator=g) for _ in range(LAYERS)]


def _rank(rank: int, port: int, codec: str, results) -> None:
    torch.set_num_threads(1)
    from kv_transfer import KVReceiver, KVSender, TransferState, make_transport
    from kv_transfer.torch_transport import init_process_group

    try:
        init_process_group(rank, 2, port, backend="gloo", timeout_s=30)
        if rank == 0:  # prefill side
            sender = KVSender(make_transport("torch", "sender", peer=1, keepalive_s=0.5), codec,
                              max_frame_bytes=256 * 1024)
            src = source_cache()
            for t0, t1 in CHUNKS:
                sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, t0, t1)
            sender.send_done("t1", "r1", 123, NUM_TOKENS)
            sender.flush(20)
            states = [e.state for e in sender.poll()]
            time.sleep(1.2)  # idle: keepalives must keep the receiver's recv alive
            sender.close()
            results.put((rank, states == [TransferState.DONE], str(states)))
        else:  # decode side
            receiver = KVReceiver(make_transport("torch", "receiver", peer=0), default_timeout_s=30)
            dst = [torch.zeros(12, 2, BS, HEADS, DIM) for _ in range(LAYERS)]
            receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS)
            deadline, events = time.monotonic() + 30, []
            while not events and time.monotonic() < deadline:
                events = receiver.poll(dst)
                time.sleep(0.005)
            src = source_cache()
            exact = all(torch.equal(s[SRC_IDS], d[DST_IDS]) for s, d in zip(src, dst))
            ok = len(events) == 1 and events[0].state == TransferState.DONE and \
                events[0].first_token == 123 and exact
            time.sleep(1.5)
            healthy = receiver.transport.error is None
            results.put((rank, ok and healthy, f"{events} exact={exact} healthy={healthy}"))
        import torch.distributed as dist

        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, False, repr(e)))


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_gloo_transfer_between_two_processes(codec):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, port, codec, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    try:
        deadline = time.monotonic() + 60
        while len(got) < 2 and time.monotonic() < deadline:
            try:
                rank, ok, info = results.get(timeout=1)
            except queue.Empty:
                if any(p.exitcode not in (None, 0) for p in procs):
                    break  # a rank crashed without reporting
                continue
            got[rank] = (ok, info)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
    assert set(got) == {0, 1}, f"ranks did not report in time: {got}"
    assert got[0][0], got[0][1]
    assert got[1][0], got[1][1]
