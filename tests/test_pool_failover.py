"""ReplicaPool bookkeeping when a replica is lost, without processes: sends are intercepted, so
each test controls exactly when the loss happens."""
from __future__ import annotations

import asyncio
import collections

from engine.protocol import AbortRequests, AddRequest, PeerLost, ReplicaReady, RequestOutput, StepOutputs
from gateway.replica_client import ReplicaPool
from scheduler.request import SamplingParams


async def make_pool(tmp_path, roles=(("a", "hybrid"), ("b", "hybrid"))):
    pool = ReplicaPool(f"ipc://{tmp_path}/out", {rid: f"ipc://{tmp_path}/{rid}" for rid, _ in roles})
    await pool.start()
    for pid, (rid, role) in enumerate(roles, 1):
        pool._handle(ReplicaReady(rid, "m", 1024, num_blocks=64, block_size=16, pid=pid, role=role))
    sent: list[tuple[str, object]] = []

    async def send(replica_id, msg):
        sent.append((replica_id, msg))
        await asyncio.sleep(0)
    pool._send = send
    return pool, sent


def adds(sent):
    return [(rid, m.request_id) for rid, m in sent if isinstance(m, AddRequest)]


def test_replica_lost_during_a_multi_choice_submit_sends_each_choice_once(tmp_path):
    async def run():
        pool, sent = await make_pool(tmp_path)
        real_send = pool._send

        async def send(replica_id, msg):   # "a" dies while the first choice goes out
            await real_send(replica_id, msg)
            if len(adds(sent)) == 1:
                pool.replica_lost(replica_id, "test")
        pool._send = send
        streams = await pool.submit_many([(f"r-{i}", [5, 6, 7], SamplingParams(max_tokens=4))
                                          for i in range(3)])
        await asyncio.sleep(0.05)
        await pool.close()
        return streams, sent

    streams, sent = asyncio.run(run())
    first_add = adds(sent)[0]
    to_b = collections.Counter(req for rid, req in adds(sent) if rid == "b")
    assert to_b == {"r-0": 1, "r-1": 1, "r-2": 1}, f"each choice once on the live replica: {to_b}"
    assert [a for a in adds(sent) if a[0] == "a"] == [first_add], "nothing more to the lost one"
    assert all(s.replica_id == "b" for s in streams)


def test_lost_replica_moves_silent_requests_fails_the_rest_retryably_and_tells_peers(tmp_path):
    async def run():
        pool, sent = await make_pool(tmp_path, (("d", "decode"), ("h", "hybrid"), ("p", "prefill")))
        params = SamplingParams(max_tokens=4)
        started, other, silent = [await pool.submit(f"r{i}", [1, 2, 3], params) for i in range(3)]
        placed = (started.replica_id, other.replica_id, silent.replica_id)
        pool._handle(StepOutputs("d", [RequestOutput("r0", [9], "x", 3, 1)]))
        pool.replica_lost("d", "test")
        healthy = pool.healthy_replicas()
        first, last = await started.__anext__(), await started.__anext__()
        state = (silent.replica_id, silent.finished, other.replica_id, other.finished)
        await asyncio.sleep(0.05)
        await pool.close()
        return placed, healthy, first, last, state, sent, pool.requests_moved

    placed, healthy, first, last, state, sent, moved = asyncio.run(run())
    assert placed == ("d", "h", "d")                       # round robin over decode-capable
    assert "d" not in healthy
    assert first.new_token_ids == [9]                      # what it produced still arrives...
    assert last.finish_reason == "error" and last.retryable and "d was lost" in last.error
    assert state == ("h", False, "h", False) and moved == 1   # ...the silent one moved
    assert ("h", "r2") in adds(sent)
    assert ("d", AbortRequests(["r0"])) in sent and ("d", AbortRequests(["r2"])) in sent
    assert {rid for rid, m in sent if isinstance(m, PeerLost)} == {"h", "p"}


def test_lost_replica_is_readmitted_only_by_a_new_process(tmp_path):
    async def run():
        pool, _ = await make_pool(tmp_path)
        pool.replica_lost("a", "test")
        pool._handle(StepOutputs("a", []))        # a late frame of the dead process
        still_lost = pool.replicas["a"].lost
        pool._handle(ReplicaReady("a", "m", 1024, num_blocks=64, block_size=16, pid=1, role="hybrid"))
        same_pid_lost = pool.replicas["a"].lost
        pool._handle(ReplicaReady("a", "m", 1024, num_blocks=64, block_size=16, pid=99, role="hybrid"))
        back = not pool.replicas["a"].lost and "a" in pool.healthy_replicas()
        restarts = pool.replicas["a"].restarts
        await pool.close()
        return still_lost, same_pid_lost, back, restarts

    assert asyncio.run(run()) == (True, True, True, 1)


def test_a_moved_request_keeps_its_tenant(tmp_path):
    async def run():
        pool, sent = await make_pool(tmp_path)
        stream = await pool.submit("r0", [1, 2, 3], SamplingParams(max_tokens=4), tenant="acme")
        pool.replica_lost(stream.replica_id, "test")
        await asyncio.sleep(0.05)
        await pool.close()
        return sent

    sent = asyncio.run(run())
    tenants = [(rid, m.tenant) for rid, m in sent if isinstance(m, AddRequest)]
    assert tenants == [("a", "acme"), ("b", "acme")], tenants
