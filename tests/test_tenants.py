"""Per-tenant fair share in the scheduler (torch-free): weighted-fair admission across tenants,
FCFS within one, and exactly the old single queue when there is one tenant."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.config import SchedulerConfig, parse_tenant_weights
from scheduler.policies import SCHEDULERS, make_scheduler
from scheduler.request import Request, RequestStatus, SamplingParams
from scheduler.tenants import WaitingQueue
from tests.test_scheduler import run_to_completion

POLICIES = list(SCHEDULERS)


def config(policy: str = "sarathi", **kw) -> SchedulerConfig:
    base = dict(policy=policy, token_budget=32, max_num_seqs=8, block_size=4, max_model_len=256,
                max_batched_tokens=256)
    return SchedulerConfig(**{**base, **kw})


def req(i: int, tenant: str, prompt_len: int = 16, max_tokens: int = 16,
        arrival: float | None = None) -> Request:
    return Request(f"r{i}", list(range(1000 * i + 1, 1000 * i + prompt_len + 1)),
                   SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                   arrival_time=float(i) if arrival is None else arrival,
                   eos_token_ids=frozenset({0}), tenant=tenant)


def step(sched, t: float, rng: random.Random):
    out = sched.schedule(t)
    sched.update(out, {c.request.request_id: rng.randrange(1, 100) for c in out.chunks if c.samples}, t)
    sched.check_integrity()
    return out


@pytest.mark.parametrize("policy", ["sarathi", "vllm", "orca", "hybrid_only", "chunked_only"])
def test_weights_two_to_one_split_token_throughput_under_saturation(policy):
    """Both tenants always backlogged: tokens computed follow the weights within 10%."""
    sched = make_scheduler(config(policy, tenant_weights={"a": 2, "b": 1}), 400)
    rng = random.Random(0)
    n = 0
    tokens = {"a": 0, "b": 0}
    for t in range(600):
        # Keep both backlogged: top each tenant up to 10 waiting requests.
        waiting = {"a": 0, "b": 0}
        for r in sched.waiting:
            waiting[r.tenant] += 1
        for tenant in ("a", "b"):
            for _ in range(10 - waiting[tenant]):
                n += 1
                sched.add_request(req(n, tenant, prompt_len=rng.randint(4, 40),
                                      max_tokens=rng.randint(4, 40), arrival=float(t)))
        out = step(sched, float(t), rng)
        if t >= 100:   # after the running set has turned over once
            for c in out.chunks:
                tokens[c.request.tenant] += c.num_tokens
    ratio = tokens["a"] / tokens["b"]
    assert abs(ratio - 2.0) <= 0.2, f"token ratio a:b = {ratio:.3f}, weights 2:1 ({tokens})"


@pytest.mark.parametrize("fair", [True, False])
def test_a_flooding_tenant_does_not_delay_a_quiet_one(fair):
    """A quiet tenant's request is admitted after at most one more of the flood's (it starts at
    the current virtual time, so it waits for the flood's head at most); one FCFS queue makes it
    wait for the flood's whole backlog."""
    sched = make_scheduler(config(tenant_fair_share=fair), 400)
    rng = random.Random(1)
    for i in range(40):
        sched.add_request(req(i, "flood", arrival=0.0 + i * 1e-3))
    for t in range(5):
        step(sched, float(t), rng)
    backlog = len(sched.waiting)
    quiet = req(100, "quiet", arrival=5.0)
    sched.add_request(quiet)
    t = 5
    while quiet.status is RequestStatus.WAITING:
        step(sched, float(t), rng)
        t += 1
    overtook = backlog - len([r for r in sched.waiting if r.tenant == "flood"])
    assert backlog > 25
    assert overtook <= 1 if fair else overtook == backlog


def test_fcfs_within_a_tenant_and_ties_by_arrival():
    q = WaitingQueue()
    a1, b1, a2, b2 = req(1, "a"), req(2, "b"), req(3, "a"), req(4, "b")
    for r in (a1, b1, a2, b2):
        q.append(r)
    assert q.head() is a1            # equal service: the earlier arrival
    q.remove(a1)
    q.charge("a", 10)
    assert q.head() is b1            # a was served: b's head goes next
    q.remove(b1)
    q.charge("b", 10)
    assert q.head() is a2            # tie again, a2 arrived before b2
    assert len(q) == 2 and set(q) == {a2, b2}
    q.remove(a2)
    assert q.head() is b2


def test_an_idle_tenant_does_not_bank_credit():
    """A tenant that queues after others were served starts at the current virtual time, not 0."""
    q = WaitingQueue()
    a = [req(i, "a") for i in range(3)]
    for r in a:
        q.append(r)
    q.charge("a", 1000)
    b = req(10, "b", arrival=100.0)
    q.append(b)
    assert q.service["b"] == 1000     # raised to a's normalized service, the least backlogged
    assert q.head() is a[0]           # equal service: a's head arrived first
    q.charge("b", 1)
    assert q.head() is a[0]
    # The last backlog drains; a tenant queueing later still starts from where it was.
    for r in (*a, b):
        q.remove(r)
    c = req(20, "c", arrival=200.0)
    q.append(c)
    assert q.service["c"] >= 1000


def test_unknown_tenants_weigh_one_and_weights_normalise():
    q = WaitingQueue({"a": 4.0})
    assert q.weight("a") == 4.0 and q.weight("zzz") == 1.0
    assert parse_tenant_weights("b=1, a=2") == (("a", 2.0), ("b", 1.0))
    assert parse_tenant_weights({"b": 1, "a": 2}) == (("a", 2.0), ("b", 1.0))
    assert parse_tenant_weights([["a", 2]]) == (("a", 2.0),)   # after msgpack/JSON
    assert SchedulerConfig(tenant_weights=[["x", 3]]).tenant_weights == (("x", 3.0),)


@pytest.mark.parametrize("bad, words", [
    ("a=0", "'a'"), ("a=x", "'x'"), ("a", "name=weight"), ("a=1,a=2", "'a'"),
    ({"": 1}, "non-empty"), ({"a": -1}, "'a'"), ({"a": True}, "'a'"),
])
def test_bad_tenant_weights_are_named(bad, words):
    with pytest.raises(ValueError, match=words):
        SchedulerConfig(tenant_weights=bad)


def test_only_the_head_can_be_indexed():
    q = WaitingQueue()
    q.append(req(1, "a"))
    with pytest.raises(IndexError):
        q[1]
    with pytest.raises(ValueError, match="'r0' is not waiting"):
        q.remove(req(0, "zz"))


def _trace(policy: str, tenants: list[str], **kw) -> list:
    """Every batch of a random workload, as (request id, tokens) pairs."""
    rng = random.Random(7)
    requests = [req(i, tenants[i % len(tenants)], rng.randint(1, 60), rng.randint(1, 20),
                    arrival=float(rng.randint(0, 30)) + i * 1e-3) for i in range(30)]
    sched = make_scheduler(config(policy, **kw), 60)
    outs = run_to_completion(sched, requests, random.Random(3))
    return [[(c.request.request_id, c.num_tokens) for c in o.chunks] + o.preempted_ids for o in outs]


@pytest.mark.parametrize("policy", POLICIES)
def test_one_tenant_schedules_exactly_as_the_plain_fifo(policy):
    """One tenant (whatever its name) with fair share on == fair share off == the old deque; and
    with fair share off, tenants change nothing at all."""
    fifo = _trace(policy, ["default"], tenant_fair_share=False)
    assert _trace(policy, ["default"]) == fifo
    assert _trace(policy, ["acme"], tenant_weights={"acme": 3}) == fifo
    assert _trace(policy, ["a", "b"], tenant_fair_share=False) == fifo


def test_preempted_request_returns_to_the_head_of_its_own_tenant():
    sched = make_scheduler(config(token_budget=16, max_num_seqs=8), 12)   # 48 tokens of KV
    rng = random.Random(0)
    a = [req(i, "a", prompt_len=8, max_tokens=30, arrival=i * 1e-3) for i in range(3)]
    for r in a:
        sched.add_request(r)
    b = [req(10 + i, "b", prompt_len=8, max_tokens=4, arrival=1.0 + i) for i in range(2)]
    preempted = []
    for t in range(200):
        if t == 2:
            for r in b:
                sched.add_request(r)
        out = step(sched, float(t), rng)
        for rid in out.preempted_ids:
            victim = sched.get(rid)
            preempted.append(victim)
            mine = [r for r in sched.waiting if r.tenant == victim.tenant]
            assert mine[0] is victim, "a victim goes back to the head of its own tenant"
        if not sched.has_work():
            break
    assert preempted, "the workload must preempt"
    assert all(r.is_finished for r in (*a, *b))


# The FCFS property of tests/test_policies.py, per tenant: with several tenants each step admits
# a prefix of every tenant's queue, and pushed-back requests (preempted, failed remote prefill)
# go to the head of their own tenant's queue.
@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=30, deadline=None)
@given(
    num_blocks=st.integers(12, 60),
    workload=st.lists(st.tuples(st.integers(1, 60), st.integers(1, 20), st.integers(0, 15),
                                st.sampled_from(["local", "remote", "remote_fails"]),
                                st.integers(0, 3), st.sampled_from(["a", "b", "c"])),
                      min_size=1, max_size=14),
    weights=st.sampled_from([{}, {"a": 2}, {"a": 3, "b": 0.5}]),
    seed=st.integers(0, 1000),
)
def test_admission_is_fcfs_within_each_tenant(policy, num_blocks, workload, weights, seed):
    cfg = config(policy, tenant_weights=weights)
    sched = make_scheduler(cfg, num_blocks)
    rng = random.Random(seed)
    pending = sorted(((a, i, req(i, tenant, p, m, arrival=a + i * 1e-3), kind, delay)
                      for i, (p, m, a, kind, delay, tenant) in enumerate(workload)
                      if sched.block_manager.blocks_for(p + m) <= num_blocks), key=lambda x: x[:2])
    queues: dict[str, list] = {"a": [], "b": [], "c": []}   # the model: one FIFO per tenant
    landing: dict[str, tuple[int, bool]] = {}
    t = 0
    while pending or sched.has_work() or landing:
        while pending and pending[0][0] <= t:
            _, _, r, kind, delay = pending.pop(0)
            if kind != "local" and sched.add_remote_prefill(r):
                landing[r.request_id] = (t + delay, kind == "remote")
                continue
            sched.add_request(r)
            queues[r.tenant].append(r)
        for rid, (at, ok) in list(landing.items()):
            if at <= t:
                del landing[rid]
                if ok:
                    sched.remote_prefill_done(rid, float(t))
                else:
                    sched.remote_prefill_failed(rid)
                    r = sched.get(rid)
                    queues[r.tenant].insert(0, r)
        for tenant, q in queues.items():
            assert [r for r in sched.waiting if r.tenant == tenant] == q
        out = sched.schedule(float(t))
        victims = [sched.get(rid) for rid in out.preempted_ids]
        for tenant, q in queues.items():
            admitted = [r for r in q if r.status is RequestStatus.RUNNING]
            assert admitted == q[:len(admitted)], f"tenant {tenant}: admission is not FCFS"
            mine = [v for v in victims if v.tenant == tenant]
            now = [r for r in sched.waiting if r.tenant == tenant]
            assert set(now[:len(mine)]) == set(mine), "victims are not at their tenant's head"
            queues[tenant] = now
        sampled = {c.request.request_id: rng.randrange(1, 100) for c in out.chunks if c.samples}
        sched.update(out, sampled, float(t))
        sched.check_integrity()
        t += 1
        assert t < 10_000, "scheduler made no progress"
    assert sched.block_manager.num_free_blocks == num_blocks
