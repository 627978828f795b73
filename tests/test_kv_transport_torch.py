"""TorchDistTransport across two processes: Gloo on CPU here; NCCL between cuda:0 and cuda:1 where
there are two GPUs (a `cuda` test, skipped without them)."""
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


def _run_two(target, *args, timeout_s: float = 60.0) -> dict:
    """Run target(rank, port, *args, results) as ranks 0 and 1 in spawned processes."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, port, *args, results)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = {}
    try:
        deadline = time.monotonic() + timeout_s
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
    return got


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_gloo_transfer_between_two_processes(codec):
    got = _run_two(_rank, codec)
    assert got[0][0], got[0][1]
    assert got[1][0], got[1][1]


def _wait_events(receiver, dst, timeout_s: float = 30.0) -> list:
    deadline, events = time.monotonic() + timeout_s, []
    while not events and time.monotonic() < deadline:
        events = receiver.poll(dst)
        time.sleep(0.005)
    return events


def _nccl_rank(rank: int, port: int, results) -> None:
    """Rank 0 (prefill, cuda:0) pushes two transfers to rank 1 (decode, cuda:1) over NCCL. Between
    them the sender idles 3 s (one keepalive at 2 s); meanwhile the decode side checks that the
    receive it always has posted does not hold up work on its default stream."""
    from kv_transfer import KVReceiver, KVSender, TransferState, make_transport
    from kv_transfer.torch_transport import init_process_group

    device = torch.device("cuda", rank)
    try:
        backend = init_process_group(rank, 2, port, device=str(device), timeout_s=60)
        setup = backend == "nccl" and torch.cuda.current_device() == rank
        if rank == 0:
            transport = make_transport("torch", "sender", peer=1, keepalive_s=2.0)
            setup = setup and transport.device == device
            sender = KVSender(transport, "raw", max_frame_bytes=256 * 1024)
            src = [c.to(device) for c in source_cache()]
            states = []
            for tid in ("t0", "t1"):
                for t0, t1 in CHUNKS:
                    sender.send_chunk(tid, "r-" + tid, src, SRC_IDS, DST_IDS, t0, t1)
                sender.send_done(tid, "r-" + tid, 123, NUM_TOKENS)
                sender.flush(30)
                states += [e.state for e in sender.poll()]
                if tid == "t0":
                    time.sleep(3.0)
            time.sleep(0.5)
            sender.close()
            ok = setup and states == [TransferState.DONE] * 2 and transport.error is None
            results.put((rank, ok, f"setup={setup} states={states} error={transport.error!r}"))
        else:
            transport = make_transport("torch", "receiver", peer=0)
            setup = setup and transport.device == device
            receiver = KVReceiver(transport, default_timeout_s=60)
            src = [c.to(device) for c in source_cache()]
            report = []
            for tid in ("t0", "t1"):
                dst = [torch.zeros(12, 2, BS, HEADS, DIM, device=device) for _ in range(LAYERS)]
                receiver.expect(tid, "r-" + tid, DST_IDS, NUM_TOKENS)
                events = _wait_events(receiver, dst, 60)
                exact = all(torch.equal(s[SRC_IDS], d[DST_IDS]) for s, d in zip(src, dst))
                report.append(len(events) == 1 and events[0].state == TransferState.DONE and
                              events[0].first_token == 123 and exact)
                if tid == "t0":   # the sender now idles: a receive is posted and waiting
                    time.sleep(0.3)
                    t = time.monotonic()
                    (torch.ones(1024, device=device) * 2).sum().item()   # default stream
                    unblocked = time.monotonic() - t < 0.5
            time.sleep(1.0)
            healthy = transport.error is None
            ok = setup and all(report) and unblocked and healthy
            results.put((rank, ok, f"setup={setup} transfers={report} unblocked={unblocked} "
                                   f"healthy={healthy} error={transport.error!r}"))
        import torch.distributed as dist

        dist.destroy_process_group()
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, False, repr(e)))


@pytest.mark.cuda
def test_nccl_transfer_between_two_gpus():
    import torch.distributed as dist

    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs (one per NCCL rank)")
    if not dist.is_nccl_available():
        pytest.skip("torch was built without NCCL")
    got = _run_two(_nccl_rank, timeout_s=120)
    assert got[0][0], got[0][1]
    assert got[1][0], got[1][1]


def test_transport_device_follows_the_group_and_must_suit_its_backend():
    """In-process, world of one (Gloo): the transport defaults to the CPU; a CUDA device is refused."""
    import torch.distributed as dist

    from kv_transfer import TransportError
    from kv_transfer.torch_transport import TorchDistTransport, group_device, init_process_group

    assert init_process_group(0, 1, free_port(), device="cpu", timeout_s=10) == "gloo"
    try:
        assert group_device() == torch.device("cpu")
        # A sender that never sends (its thread idles on its queue; nothing goes to rank 0 itself).
        t = TorchDistTransport("sender", peer=0, keepalive_s=3600)
        assert t.device == torch.device("cpu")
        with pytest.raises(TransportError, match="gloo backend sends CPU tensors"):
            TorchDistTransport("sender", peer=0, device="cuda:0")
    finally:
        dist.destroy_process_group()
