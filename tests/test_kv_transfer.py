"""KV handoff state machines over the fake transport (faults) and over ZeroMQ (threads, processes)."""
from __future__ import annotations

import multiprocessing as mp
import threading
import time

import pytest
import torch

from kv_transfer import (FakeLink, FakeTransport, KVReceiver, KVSender, TransferState,
                         make_transport)
from kv_transfer import session as kv_session
from kv_transfer.frames import control_frame

torch.set_num_threads(1)
S = TransferState
BS, HEADS, DIM = 16, 3, 64


def make_cache(num_layers: int, num_blocks: int, dtype=torch.float32) -> list[torch.Tensor]:
    return [torch.zeros(num_blocks, 2, BS, HEADS, DIM, dtype=dtype) for _ in range(num_layers)]


def fill_tokens(caches, block_ids, t0, t1, seed=0) -> None:
    """Write deterministic K/V for tokens [t0, t1) into their slots (what a prefill chunk does)."""
    for layer, cache in enumerate(caches):
        g = torch.Generator().manual_seed(seed * 1000 + layer)
        values = torch.randn(t1, 2, HEADS, DIM, generator=g).to(cache.dtype)[t0:]
        for pos in range(t0, t1):
            cache[block_ids[pos // BS], :, pos % BS] = values[pos - t0]


def assert_landed(src, src_ids, dst, dst_ids, num_tokens) -> None:
    for layer in range(len(src)):
        for pos in range(num_tokens):
            a = src[layer][src_ids[pos // BS], :, pos % BS]
            b = dst[layer][dst_ids[pos // BS], :, pos % BS]
            assert torch.equal(a, b), (layer, pos)


def poll_until(receiver, caches, timeout_s=30.0):
    """Poll until an event arrives; `timeout_s` only guards against a hang."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        events = receiver.poll(caches)
        if events:
            return events
        time.sleep(0.002)
    raise AssertionError("no transfer event in time")


SRC_IDS, DST_IDS = [5, 2, 7, 0, 9], [3, 11, 1, 8, 6]
NUM_TOKENS, CHUNKS = 70, [(0, 24), (24, 48), (48, 70)]


def prefill_and_send(sender, src, transfer_id="t1", request_id="r1", first_token=17,
                     chunks=CHUNKS, num_tokens=NUM_TOKENS) -> None:
    for t0, t1 in chunks:
        fill_tokens(src, SRC_IDS, t0, t1)
        sender.send_chunk(transfer_id, request_id, src, SRC_IDS, DST_IDS, t0, t1)
    sender.send_done(transfer_id, request_id, first_token, num_tokens)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_multi_chunk_transfer_lands_bit_exact_in_dst_blocks(background, dtype):
    send_t, recv_t = FakeTransport.pair()
    # Small frames: several per chunk, some split inside a layer.
    sender = KVSender(send_t, "lz4", max_frame_bytes=3 * 2 * BS * HEADS * DIM * 4, background=background)
    receiver = KVReceiver(recv_t)
    src, dst = make_cache(4, 10, dtype), make_cache(4, 12, dtype)
    assert sender.begin("t1", "r1") == S.BOOTSTRAP
    assert receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS, timeout_s=10) == S.WAITING
    assert receiver.poll(dst) == [] and receiver.state("t1") == S.WAITING

    fill_tokens(src, SRC_IDS, 0, 24)
    sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 0, 24)
    assert sender.flush(5)
    assert sender.state("t1") == S.TRANSFERRING
    assert receiver.poll(dst) == [] and receiver.state("t1") == S.TRANSFERRING
    # Block 1 is half filled (tokens 16..23); the next chunk re-sends it full.
    assert_landed(src, SRC_IDS, dst, DST_IDS, 24)
    assert torch.count_nonzero(dst[0][DST_IDS[1], :, 8:]) == 0

    prefill_and_send(sender, src, chunks=CHUNKS[1:])
    events = poll_until(receiver, dst)
    assert [(e.transfer_id, e.state, e.first_token, e.num_tokens) for e in events] == \
        [("t1", S.DONE, 17, NUM_TOKENS)]
    assert_landed(src, SRC_IDS, dst, DST_IDS, NUM_TOKENS)
    untouched = [b for b in range(12) if b not in DST_IDS]
    assert all(torch.count_nonzero(c[untouched]) == 0 for c in dst)
    assert receiver.state("t1") == S.DONE and events[0].latency_s >= 0
    assert events[0].codec == "lz4"   # what the frames carried (metrics are labelled by it)
    assert [e.state for e in sender.poll()] == [S.DONE] and sender.state("t1") == S.DONE
    # Counters: the same raw bytes on both sides; headers add a little on the wire.
    assert sender.metrics.raw_bytes["lz4"] == receiver.metrics.raw_bytes["lz4"] > 0
    assert receiver.metrics.transfers_done == 1 and sender.metrics.transfers_done == 1
    assert sender.metrics.frames == receiver.metrics.frames
    assert sender.metrics.wire_bytes["lz4"] == receiver.metrics.wire_bytes["lz4"] > 0
    sender.close()


def run_with_faults(link: FakeLink, receiver_timeout_s=10.0, **kw):
    send_t, recv_t = FakeTransport.pair(link)
    sender = KVSender(send_t, "raw", max_frame_bytes=2 * 2 * BS * HEADS * DIM * 4, background=False)
    receiver = KVReceiver(recv_t)
    src, dst = make_cache(3, 10), make_cache(3, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS, timeout_s=receiver_timeout_s)
    prefill_and_send(sender, src, **kw)
    return sender, receiver, dst


def test_dropped_frame_fails_with_a_gap():
    _, receiver, dst = run_with_faults(FakeLink(drop={2}))
    (event,) = poll_until(receiver, dst)
    assert event.state == S.FAILED and event.reason == "sequence" and "lost" in event.error
    assert receiver.state("t1") == S.FAILED
    assert receiver.poll(dst) == []           # the rest of its frames are dropped quietly
    assert receiver.metrics.frames_dropped > 0


def test_reordered_frames_fail():
    _, receiver, dst = run_with_faults(FakeLink(swap={1}))
    (event,) = poll_until(receiver, dst)
    assert event.state == S.FAILED and event.reason == "sequence"


def test_corrupted_frame_fails_with_checksum_error():
    _, receiver, dst = run_with_faults(FakeLink(corrupt={3}))
    (event,) = poll_until(receiver, dst)
    assert event.state == S.FAILED and event.reason == "checksum" and "checksum" in event.error


class FakeClock:
    """Stands in for the receiver's `time` module: `monotonic()` moves only when the test says,
    so timeouts are checked exactly (before and after the deadline) without wall-clock bounds
    that flake on a loaded machine."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(kv_session, "time", fake)
    return fake


def test_lost_done_frame_times_out_after_the_gap_not_before(clock):
    send_t, recv_t = FakeTransport.pair(FakeLink())
    sender = KVSender(send_t, background=False)
    receiver = KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS, timeout_s=0.3)
    clock.now += 0.2                                               # slow to start, but in time
    fill_tokens(src, SRC_IDS, 0, 24)
    sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 0, 24)   # then the prefill side stalls
    assert receiver.poll(dst) == [] and receiver.state("t1") == S.TRANSFERRING
    clock.now += 0.29            # 0.49 s since expect, but the gap since the last frame counts
    assert receiver.poll(dst) == [] and receiver.state("t1") == S.TRANSFERRING
    clock.now += 0.02
    (event,) = receiver.poll(dst)
    assert event.state == S.FAILED and event.reason == "timeout"
    assert "24 tokens received" in event.error and receiver.state("t1") == S.FAILED
    assert receiver.poll(dst) == []                                # reported once


def test_waiting_transfer_times_out_if_nothing_arrives(clock):
    receiver = KVReceiver(FakeTransport.pair()[1])
    receiver.expect("t9", "r9", [1, 2], 20, timeout_s=0.1)
    clock.now += 0.09
    assert receiver.poll(make_cache(1, 4)) == [] and receiver.state("t9") == S.WAITING
    clock.now += 0.02
    (event,) = receiver.poll(make_cache(1, 4))
    assert event.state == S.FAILED and event.reason == "timeout" and "waiting" in event.error


def test_abort_fails_both_sides():
    send_t, recv_t = FakeTransport.pair()
    sender, receiver = KVSender(send_t, background=False), KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS)
    fill_tokens(src, SRC_IDS, 0, 24)
    sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 0, 24)
    assert sender.send_abort("t1", "prefill replica out of memory") == S.FAILED
    (event,) = poll_until(receiver, dst)
    assert event.state == S.FAILED and event.reason == "abort" and "out of memory" in event.error
    assert [e.reason for e in sender.poll()] == ["abort"]
    # Later sends for it are ignored.
    assert sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 24, 48) == S.FAILED


def test_sender_timeout_sends_abort():
    send_t, recv_t = FakeTransport.pair()
    sender = KVSender(send_t, background=False, timeout_s=0.05)
    receiver = KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS)
    fill_tokens(src, SRC_IDS, 0, 24)
    sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 0, 24)
    time.sleep(0.1)
    assert [e.reason for e in sender.poll()] == ["timeout"]
    assert [e.reason for e in poll_until(receiver, dst)] == ["abort"]


def test_frames_of_unknown_or_cancelled_transfers_are_ignored():
    send_t, recv_t = FakeTransport.pair()
    sender, receiver = KVSender(send_t, background=False), KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    prefill_and_send(sender, src, transfer_id="nobody-expects-me")
    assert receiver.poll(dst) == []
    assert all(torch.count_nonzero(c) == 0 for c in dst)
    assert receiver.metrics.frames_dropped > 0 and receiver.state("nobody-expects-me") is None

    receiver.expect("t2", "r2", DST_IDS, NUM_TOKENS)
    assert receiver.cancel("t2") and receiver.state("t2") == S.FAILED
    prefill_and_send(sender, src, transfer_id="t2", request_id="r2")
    assert receiver.poll(dst) == [] and all(torch.count_nonzero(c) == 0 for c in dst)


def test_frames_for_foreign_blocks_or_requests_fail_the_transfer():
    send_t, recv_t = FakeTransport.pair()
    sender, receiver = KVSender(send_t, background=False), KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    receiver.expect("t1", "r1", [4, 4, 4, 4, 4], NUM_TOKENS)     # not the blocks the sender targets
    prefill_and_send(sender, src)
    (event,) = poll_until(receiver, dst)
    assert event.reason == "frame" and "not this transfer's blocks" in event.error
    assert all(torch.count_nonzero(c) == 0 for c in dst)

    receiver.expect("t2", "other-request", DST_IDS, NUM_TOKENS)
    send_t.send(control_frame("t2", "r2", "done", 0, first_token=1, num_tokens=NUM_TOKENS))
    (event,) = poll_until(receiver, dst)
    assert event.reason == "frame" and "expected 'other-request'" in event.error


def test_done_before_all_tokens_fails():
    send_t, recv_t = FakeTransport.pair()
    sender, receiver = KVSender(send_t, background=False), KVReceiver(recv_t)
    src, dst = make_cache(2, 10), make_cache(2, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS)
    prefill_and_send(sender, src, chunks=CHUNKS[:2])
    (event,) = poll_until(receiver, dst)
    assert event.state == S.FAILED and "done after 48 tokens" in event.error


def test_transport_failure_fails_the_sender_transfer():
    send_t, _ = FakeTransport.pair()
    sender = KVSender(send_t, background=True)
    send_t.close()
    src = make_cache(2, 10)
    fill_tokens(src, SRC_IDS, 0, 24)
    sender.send_chunk("t1", "r1", src, SRC_IDS, DST_IDS, 0, 24)
    sender.flush(5)
    (event,) = sender.poll()
    assert event.state == S.FAILED and event.reason == "transport"


# -- ZeroMQ ----------------------------------------------------------------------------------------
def test_zmq_ipc_between_threads(tmp_path):
    receiver = KVReceiver(make_transport("zmq", "receiver", address=f"ipc://{tmp_path}/kv.sock"))
    src, dst = make_cache(6, 10), make_cache(6, 12)
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS, timeout_s=20)

    def prefill() -> None:
        sender = KVSender(make_transport("zmq", "sender", address=receiver.transport.address), "int8",
                          max_frame_bytes=64 * 1024)
        prefill_and_send(sender, src)
        sender.close()

    thread = threading.Thread(target=prefill)
    thread.start()
    (event,) = poll_until(receiver, dst, timeout_s=20)
    thread.join(10)
    assert event.state == S.DONE and event.first_token == 17
    for layer in range(6):  # int8: within 1/254 of each (block, K|V, head) absmax
        a, b = src[layer][SRC_IDS], dst[layer][DST_IDS]
        bound = a.abs().amax(dim=(2, 4), keepdim=True) / 254 + 1e-6
        assert ((a - b).abs() <= bound).all()
    receiver.transport.close()


def _zmq_prefill_process(address: str) -> None:
    torch.set_num_threads(1)
    sender = KVSender(make_transport("zmq", "sender", address=address), "lz4")
    src = make_cache(8, 10)
    prefill_and_send(sender, src)
    sender.close()


def test_zmq_tcp_between_processes():
    receiver = KVReceiver(make_transport("zmq", "receiver", address="tcp://127.0.0.1:0"))
    assert receiver.transport.address.startswith("tcp://127.0.0.1:")
    receiver.expect("t1", "r1", DST_IDS, NUM_TOKENS, timeout_s=60)
    proc = mp.get_context("spawn").Process(target=_zmq_prefill_process, args=(receiver.transport.address,))
    proc.start()
    try:
        dst = make_cache(8, 12)
        (event,) = poll_until(receiver, dst, timeout_s=60)
        assert event.state == S.DONE and event.num_tokens == NUM_TOKENS
        src = make_cache(8, 10)
        for t0, t1 in CHUNKS:
            fill_tokens(src, SRC_IDS, t0, t1)
        assert_landed(src, SRC_IDS, dst, DST_IDS, NUM_TOKENS)
        # 6 blocks sent per layer: block 1 twice (half filled by chunk 0, full after chunk 1).
        assert receiver.metrics.raw_bytes["lz4"] == 8 * 6 * 2 * BS * HEADS * DIM * 4
    finally:
        proc.join(20)
        if proc.is_alive():
            proc.kill()
        receiver.transport.close()
    assert proc.exitcode == 0
