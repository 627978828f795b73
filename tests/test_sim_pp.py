"""Pipeline parallelism: the scheduler's in-flight set (several batches scheduled before the first
is updated) and the simulator's stages (sim/cost.py `stage_times`, sim/replica.py micro-batches).
Torch-free and fast: cost models and small workloads only."""
from __future__ import annotations

import argparse
import bisect
import random
import statistics
from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.workload import WorkloadConfig, build_workload
from scheduler.config import POLICIES, SchedulerConfig
from scheduler.core import ScheduledChunk, SchedulerOutput
from scheduler.policies import make_scheduler
from scheduler.request import FinishReason
from sim.cluster import Cluster, KVLink
from sim.cost import RooflineCost, stage_layers
from sim.replica import SimReplica, make_request, num_kv_blocks
from sim.specs import get_device, get_link, get_model
from tests.test_scheduler import make_request as make_sched_request
from tests.test_sim import _check_conservation, _config, _hybrid, _pd, _workload
from tests.no_torch import run_without_torch

MISTRAL, A100 = get_model("mistral-7b"), get_device("a100-80gb")


# -- the scheduler with k batches in flight ----------------------------------------------------

def _ids(out: SchedulerOutput) -> set[str]:
    return {c.request.request_id for c in out.chunks}


def drive_pipelined(sched, requests, k: int, rng: random.Random, abort_p: float = 0.0,
                    max_steps: int = 20_000):
    """Keep up to `k` batches in flight: schedule until k are out (or nothing more can be
    scheduled), then update the oldest (FIFO), as a k-stage pipeline does. Checks, at every call,
    that no request is in two batches in flight and that `in_flight` is exactly their requests.
    With `abort_p`, aborts a random request of the oldest batch before its update. Returns
    (ids in the order they were first scheduled, aborted ids)."""
    pending = sorted(requests, key=lambda r: r.arrival_time)
    batches: deque[SchedulerOutput] = deque()
    first: list[str] = []
    aborted: set[str] = set()
    step = 0
    while pending or sched.has_work() or batches:
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        while len(batches) < k:
            out = sched.schedule(float(step))
            ids = _ids(out)
            assert len(ids) == len(out.chunks), "a request twice in one batch"
            for other in batches:
                assert not ids & _ids(other), f"in two batches in flight: {ids & _ids(other)}"
            sched.check_integrity()
            if out.is_empty:
                break
            first.extend(c.request.request_id for c in out.chunks if c.request.request_id not in first)
            batches.append(out)
        live = {c.request.request_id for b in batches for c in b.chunks if not c.request.is_finished}
        assert sched.in_flight == live
        if batches:
            out = batches.popleft()
            if abort_p and rng.random() < abort_p:
                victim = rng.choice(out.chunks).request
                if not victim.is_finished:
                    sched.finish(victim.request_id, FinishReason.ABORT)
                    aborted.add(victim.request_id)
                    sched.check_integrity()
            sampled = {c.request.request_id: rng.randrange(1, 100) for c in out.chunks if c.samples}
            sched.update(out, sampled, float(step))
            sched.check_integrity()
        else:   # nothing in flight and nothing schedulable: only arrivals can change that
            assert pending, "work left, nothing in flight, and nothing could be scheduled"
        step += 1
        assert step < max_steps, "no progress"
    assert not sched.in_flight and sched.num_unfinished == 0
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
    return first, aborted


@settings(max_examples=80, deadline=None)
@given(
    policy=st.sampled_from(POLICIES),
    k=st.integers(1, 4),
    budget=st.integers(8, 96),
    num_blocks=st.integers(12, 80),
    block_size=st.sampled_from([4, 8, 16]),
    workload=st.lists(st.tuples(st.integers(1, 120), st.integers(1, 20), st.integers(0, 30)),
                      min_size=1, max_size=12),
    seed=st.integers(0, 1000),
    abort_p=st.sampled_from([0.0, 0.0, 0.2]),
)
def test_batches_in_flight_keep_every_invariant(policy, k, budget, num_blocks, block_size,
                                                workload, seed, abort_p):
    cfg = SchedulerConfig(policy=policy, token_budget=budget, max_num_seqs=8, block_size=block_size,
                          max_model_len=256, max_batched_tokens=256)
    sched = make_scheduler(cfg, num_blocks)
    requests = []
    for i, (prompt, max_tokens, arrival) in enumerate(workload):
        r = make_sched_request(i, prompt, max_tokens, arrival=float(arrival) + i * 1e-3)
        if sched.block_manager.blocks_for(prompt + max_tokens) <= num_blocks:
            requests.append(r)
    first, aborted = drive_pipelined(sched, requests, k, random.Random(seed), abort_p)
    for r in requests:
        assert r.is_finished
        if r.request_id in aborted:
            assert r.finish_reason is FinishReason.ABORT
        else:
            assert r.num_output_tokens == r.sampling.max_tokens and r.finish_reason is FinishReason.LENGTH
    # FCFS: requests are first scheduled in the order they arrived (preempted ones go first in
    # line again, but they have been scheduled before)
    assert first == [r.request_id for r in sorted(requests, key=lambda r: r.arrival_time)]


def _two_blocks():
    """A cache of 2 blocks of 4 tokens and two 4-token prompts, A (older) and X (newer): each
    prompt fills one block, so each one's first decode needs the other's block."""
    cfg = SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4, max_model_len=64)
    sched = make_scheduler(cfg, 2)
    a, x = make_sched_request(0, 4, 4, arrival=0.0), make_sched_request(1, 4, 4, arrival=1.0)
    return sched, a, x


def test_an_in_flight_request_is_never_preempted_the_one_needing_a_block_waits():
    sched, a, x = _two_blocks()
    sched.add_request(a)
    b0 = sched.schedule(0.0)                        # A's prompt
    sched.add_request(x)
    b1 = sched.schedule(0.5)                        # X's prompt, while b0 is in flight
    assert _ids(b0) == {"r0"} and _ids(b1) == {"r1"} and sched.in_flight == {"r0", "r1"}
    sched.update(b0, {"r0": 5}, 1.0)                # A decodes next and needs a second block
    b2 = sched.schedule(1.0)
    assert b2.is_empty and not b2.preempted_ids     # the victim would be X, in flight: A waits
    assert sched.num_preemptions == 0 and sched.block_manager.num_free_blocks == 0
    sched.update(b1, {"r1": 5}, 1.5)
    b3 = sched.schedule(1.5)                        # X is back: the newest is preempted, A goes on
    assert [c.request for c in b3.chunks] == [a] and b3.preempted_ids == ["r1"]
    assert sched.in_flight == {"r0"} and x in sched.waiting
    sched.check_integrity()


def test_when_nothing_is_in_flight_the_newest_is_preempted_as_before():
    sched, a, x = _two_blocks()
    sched.add_request(a)
    sched.add_request(x)
    sched.update(sched.schedule(0.0), {"r0": 5, "r1": 5}, 0.0)
    out = sched.schedule(1.0)
    assert [c.request for c in out.chunks] == [a] and out.preempted_ids == ["r1"]


def test_abort_of_an_in_flight_request_frees_its_blocks_once():
    cfg = SchedulerConfig(token_budget=64, max_num_seqs=4, block_size=4, max_model_len=64)
    sched = make_scheduler(cfg, 16)
    for i in range(3):
        sched.add_request(make_sched_request(i, 5, 3, arrival=float(i)))
    out1 = sched.schedule(0.0)
    assert sched.in_flight == {"r0", "r1", "r2"}
    assert sched.schedule(0.5).is_empty             # everyone is in flight
    sched.finish("r1", FinishReason.ABORT)
    assert sched.in_flight == {"r0", "r2"}
    free = sched.block_manager.num_free_blocks
    sched.update(out1, {"r0": 7, "r1": 7, "r2": 7}, 1.0)
    assert sched.block_manager.num_free_blocks == free and not sched.in_flight
    assert [c.request.request_id for c in sched.schedule(1.0).chunks] == ["r0", "r2"]
    sched.check_integrity()


# -- cost model --------------------------------------------------------------------------------

def _outputs():
    def req(rid, prompt, computed):
        r = make_request(rid, prompt, 8, 0.0)
        r.num_computed_tokens = computed
        return r
    yield "decodes", SchedulerOutput([ScheduledChunk(req(f"d{i}", 100 + 37 * i, 99 + 37 * i), 1)
                                      for i in range(16)], 512)
    yield "prefill", SchedulerOutput([ScheduledChunk(req("p", 3000, 0), 2048)], 2048)
    yield "hybrid", SchedulerOutput([ScheduledChunk(req("d", 700, 699), 1),
                                     ScheduledChunk(req("d2", 90, 89), 1),
                                     ScheduledChunk(req("c", 1500, 512), 300),
                                     ScheduledChunk(req("n", 200, 0), 200)], 512)


# RooflineCost.step_time of `_outputs()` before stages existed (sim/cost.py at 3286da0). That code
# charged one link latency per all-reduce; a ring all-reduce pays it at each of its 2(n-1) steps,
# so with TP the single-stage time is the old one plus the latencies that were missing.
OLD_STEP_TIMES = {
    ("mistral-7b", 1, None): (0.011407036390387445, 0.13995239286200734, 0.035022461592411534),
    ("llama-2-70b", 4, None): (0.024641471905836196, 0.3661172324547985, 0.09073533011764166),
    ("falcon-180b", 8, "100gbe"): (0.04774579846591466, 2.1340024348905495, 0.527277577471067),
}


@pytest.mark.parametrize("key", sorted(OLD_STEP_TIMES, key=str))
def test_single_stage_roofline_is_unchanged(key):
    name, tp, link = key
    cost = RooflineCost(get_model(name), A100, tp=tp, tp_link=get_link(link) if link else None)
    assert cost.pp == 1
    model = get_model(name)
    missing = model.num_layers * 2 * (2 * (tp - 1) - 1) * cost.link.latency_s if tp > 1 else 0.0
    for (_, out), old in zip(_outputs(), OLD_STEP_TIMES[key]):
        assert cost.step_time(out) == pytest.approx(old + missing, rel=1e-12, abs=0)
        assert cost.stage_times(out) == [cost.step_time(out)]


def test_stage_times_split_layers_and_add_sends():
    assert stage_layers(32, 1) == [32] and stage_layers(32, 3) == [11, 11, 10]
    assert stage_layers(80, 8) == [10] * 8
    with pytest.raises(ValueError, match="pp must be"):
        RooflineCost(MISTRAL, A100, pp=33)
    one = RooflineCost(MISTRAL, A100)
    free = get_link("nvlink").__class__("free", 1e30, 0.0)
    for pp in (2, 3, 4):
        cost = RooflineCost(MISTRAL, A100, pp=pp)
        ideal = RooflineCost(MISTRAL, A100, pp=pp, pp_link=free)
        for _, out in _outputs():
            times = cost.stage_times(out)
            assert len(times) == pp and all(t > 0 for t in times)
            assert cost.step_time(out) == pytest.approx(sum(times), rel=1e-12)
            # with a free link the stages add up to the single-stage step exactly
            assert sum(ideal.stage_times(out)) == pytest.approx(one.step_time(out), rel=1e-12)
            sends = sum(times) - sum(ideal.stage_times(out))
            tokens = out.num_tokens
            link = get_link("nvlink")
            assert sends == pytest.approx((pp - 1) * (link.latency_s + tokens * 4096 * 2 / link.bandwidth),
                                          rel=1e-6)
            # stage 0 carries the host time, the last one the LM head
            assert times[0] > times[1]
    slow = RooflineCost(MISTRAL, A100, pp=2, pp_link=get_link("100gbe"))
    _, prefill = list(_outputs())[1]
    assert slow.stage_times(prefill)[0] > RooflineCost(MISTRAL, A100, pp=2).stage_times(prefill)[0]


def test_kv_blocks_with_stages():
    one = num_kv_blocks(MISTRAL, A100)
    assert num_kv_blocks(MISTRAL, A100, pp=1) == one
    assert num_kv_blocks(MISTRAL, A100, pp=2) > 2 * one   # half the weights and half of each block
    falcon = get_model("falcon-180b")
    assert num_kv_blocks(falcon, A100, tp=4, pp=2) > 0
    with pytest.raises(ValueError, match="does not fit on 2 x"):
        num_kv_blocks(falcon, A100, tp=1, pp=2)


# -- the simulator ------------------------------------------------------------------------------

def _run_stats(res) -> tuple:
    def pct(xs, q):
        xs = sorted(xs)
        k = (len(xs) - 1) * q
        f = int(k)
        c = min(f + 1, len(xs) - 1)
        return xs[f] + (xs[c] - xs[f]) * (k - f)
    tbt = [g for r in res.run.requests for g in r.itl_s]
    ttft = [r.ttft_s for r in res.run.requests]
    return pct(tbt, .5), pct(tbt, .99), pct(ttft, .5), pct(ttft, .99), res.end_time, res.num_steps


# (P50 TBT, P99 TBT, P50 TTFT, P99 TTFT, end time, steps) of single-stage runs, computed by the
# simulator before stages and the in-flight set existed (3286da0): pp = 1 must reproduce them.
PP1_BEFORE = {
    "sarathi": (0.011091207925453261, 0.019762762877217455, 0.06072871585048656,
                0.2567182748715194, 19.206571537226353, 1426),
    "vllm": (0.011111420696419572, 0.12245535472572322, 0.056390988261719066,
             0.2184564151405071, 19.308300967753564, 1284),
    "orca": (0.011094707248652469, 0.0889645856520751, 0.05779340519155707,
             0.21858667780562607, 19.277251232663893, 1263),
    "request": (0.010924322432565248, 0.011139777420304142, 2.501460564192875,
                9.279679464172364, 28.197810874746768, 2115),
    "chunked_only": (0.011210926140265087, 0.030935636903703732, 0.14050336777462835,
                     0.40689217896079666, 19.490046322085306, 1493),
    "hybrid_only": (0.011093867503678467, 0.08765826940861743, 0.048190099594938474,
                    0.21844685205297842, 19.26551859840125, 1269),
    "sarathi_preempt": (0.011091047219224492, 0.019332809748192403, 17.949303379483624,
                        34.83639952362067, 39.25556477676342, 3265),
    "vllm_preempt": (0.011088264855320995, 0.08128736515931223, 18.88178543943608,
                     36.91123476603006, 41.33669840980064, 3186),
    "pd300": (0.011178383128985558, 0.019720504485258653, 5.735223342407734,
              10.692417426251257, 14.793393696691204, 1097),
}
PP1_PREEMPTIONS = {"sarathi_preempt": 20, "vllm_preempt": 17}


@pytest.mark.parametrize("case", sorted(PP1_BEFORE))
def test_single_stage_runs_are_unchanged(case):
    if case == "pd300":
        c, reqs = _pd(300), _workload(n=150, qps=40.0)
    elif case.endswith("_preempt"):
        c = _hybrid(policy=case[:-len("_preempt")], blocks=260)
        reqs = _workload(n=150, qps=50.0, output=120)
    else:
        c, reqs = _hybrid(policy=case), _workload(n=120, qps=6.0)
    res = c.run(reqs)
    assert all(r.pp == 1 for r in c.replicas)
    assert _run_stats(res) == PP1_BEFORE[case]
    if case in PP1_PREEMPTIONS:
        assert sum(r.sched.num_preemptions for r in c.replicas) == PP1_PREEMPTIONS[case]


class _Recording:
    """A cost model that records every batch's stage times (to check the pipeline's timing)."""

    def __init__(self, cost):
        self.cost, self.pp, self.seen = cost, cost.pp, []

    def step_time(self, out):
        return self.cost.step_time(out)

    def stage_times(self, out):
        times = self.cost.stage_times(out)
        self.seen.append(times)
        return times


def _pp_cluster(pp: int, policy: str = "sarathi", blocks: int | None = None,
                link: str = "nvlink", record: bool = False, **kw) -> Cluster:
    """One Mistral-7B replica of `pp` stages of one A100 each."""
    cost = RooflineCost(MISTRAL, A100, pp=pp, pp_link=get_link(link))
    if record:
        cost = _Recording(cost)
    nb = blocks or num_kv_blocks(MISTRAL, A100, pp=pp)
    return Cluster([SimReplica("h0", "hybrid", _config(policy, **kw), nb, cost)], "round_robin")


def _check_pipeline(replica: SimReplica, cost: _Recording, steps) -> None:
    """Stages never run two batches at once, a batch goes through them in order, and batches
    leave in the order they were scheduled."""
    assert len(steps) == len(cost.seen) == replica.iteration
    for s in range(replica.pp):
        spans = sorted((b.stage_ends[s] - t[s], b.stage_ends[s]) for b, t in zip(steps, cost.seen))
        assert all(a[1] <= b[0] + 1e-12 for a, b in zip(spans, spans[1:])), f"stage {s} overlaps"
    for b, t in zip(steps, cost.seen):
        assert b.stage_ends[0] == pytest.approx(b.start + t[0])
        assert all(b.stage_ends[s] >= b.stage_ends[s - 1] + t[s] - 1e-12 for s in range(1, len(t)))
    ends = [b.end for b in steps]
    assert ends == sorted(ends)
    assert sum(replica.stage_busy_s) == pytest.approx(sum(map(sum, cost.seen)))


def _record_steps(replica: SimReplica) -> list:
    steps, start = [], replica.start_step

    def start_step(now):
        step = start(now)
        if step is not None:
            steps.append(step)
        return step
    replica.start_step = start_step
    return steps


@pytest.mark.parametrize("policy", ["sarathi", "vllm"])
@pytest.mark.parametrize("pp", [2, 4])
def test_conservation_with_stages(policy, pp):
    reqs = _workload(n=120, qps=6.0)
    c = _pp_cluster(pp, policy, record=True)
    rep = c.replicas[0]
    steps = _record_steps(rep)
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    assert not rep.sched.in_flight and rep.pp == pp
    _check_pipeline(rep, rep.cost, steps)
    ends = [b.end for b in steps]   # sorted: batches leave in order (_check_pipeline)
    in_flight = [i + 1 - bisect.bisect_right(ends, b.start, 0, i) for i, b in enumerate(steps)]
    assert 2 <= max(in_flight) <= pp


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_with_stages_and_memory_pressure(policy):
    reqs = _workload(n=100, qps=50.0, output=120)
    c = _pp_cluster(2, policy, blocks=260)
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    if policy != "request":   # request-level reserves whole sequences: it never preempts
        assert c.replicas[0].sched.num_preemptions > 0


def test_pd_with_stages():
    """`tests.test_sim._pd`'s cluster (infiniband KV link, offload past 256 tokens), pp=2."""
    cost = RooflineCost(MISTRAL, A100, pp=2)
    reps = [SimReplica(f"{r}{i}", r, _config(), 300, cost) for i, r in enumerate(["prefill", "decode"])]
    c = Cluster(reps, "pd", offload_threshold=256,
                kv_link=KVLink(get_link("infiniband"), MISTRAL.kv_bytes_per_token()))
    reqs = _workload(n=150, qps=40.0)
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    assert res.decisions.get("offload", 0) > 0


def _bubble(replica: SimReplica, makespan: float) -> float:
    return 1 - sum(replica.stage_busy_s) / (replica.pp * makespan)


def _burst(n: int, prompt: int = 800, output: int = 150, seed: int = 0):
    return _workload(n=n, qps=1000.0, seed=seed, prompt=prompt, output=output)


def test_two_stages_finish_a_saturated_workload_sooner_with_bubbles():
    """pp=2 has twice the GPUs (each stage half the layers): more throughput, but not twice --
    the pipeline has bubbles (stages of unequal time; stage 0 also pays the host time)."""
    reqs = _burst(300)
    spans = {}
    for pp in (1, 2):
        c = _pp_cluster(pp, max_num_seqs=128)
        res = c.run(reqs)
        _check_conservation(res, reqs)
        spans[pp] = (res.end_time, c.replicas[0])
    (end1, r1), (end2, r2) = spans[1], spans[2]
    print(f"\nsaturated mistral-7b sarathi: pp=1 makespan {end1:.2f} s, pp=2 {end2:.2f} s, "
          f"pp=2 bubble fraction {_bubble(r2, end2):.3f}")
    assert end2 < 0.9 * end1
    assert sum(r2.stage_busy_s) < 2 * end2 and _bubble(r2, end2) > 0.01
    assert _bubble(r1, end1) < 0.01   # one stage: always busy while there is work


def test_uniform_batches_leave_fewer_bubbles_than_vllm_under_saturation():
    """Sarathi's stall-free batches are alike (budget-sized), so micro-batches take about as long
    on every stage; vllm alternates whole-prompt prefills and decode-only batches, so a short
    batch waits behind a long one on the next stage."""
    reqs = _burst(300)
    got = {}
    for policy in ("sarathi", "vllm"):
        c = _pp_cluster(2, policy, max_num_seqs=128)
        res = c.run(reqs)
        _check_conservation(res, reqs)
        got[policy] = (res.end_time, _bubble(c.replicas[0], res.end_time))
    print(f"\npp=2 saturated: sarathi makespan {got['sarathi'][0]:.2f} s bubble {got['sarathi'][1]:.3f}; "
          f"vllm makespan {got['vllm'][0]:.2f} s bubble {got['vllm'][1]:.3f}")
    assert got["sarathi"][1] < got["vllm"][1]
    assert got["sarathi"][0] < got["vllm"][0]


def test_tp4_pp2_against_tp8_across_two_nodes():
    """Sarathi-Serve's hybrid-parallel point, Falcon-180B on two nodes of A100-80GB joined by
    100 GbE: TP8 spans both nodes (every all-reduce crosses 100 GbE); TP4+PP2 keeps TP inside a
    node on NVLink and sends only the activations between stages over 100 GbE.

    What the roofline says: a budget-sized hybrid batch is much faster through TP4+PP2 (a
    512-token all-reduce over 100 GbE costs more than the layer's GEMMs), so P99 TBT is far
    lower; and a decode step under TP8 pays 2 x 7 ring-step latencies per all-reduce over 100 GbE,
    so the median is lower too, as the paper reports (sim/README.md, "Pipeline parallelism")."""
    falcon = get_model("falcon-180b")
    tp8 = RooflineCost(falcon, A100, tp=8, tp_link=get_link("100gbe"))
    pp2 = RooflineCost(falcon, A100, tp=4, pp=2, pp_link=get_link("100gbe"))
    assert pp2.prefill_step_time(480, 0, 32, 1000) < 0.6 * tp8.prefill_step_time(480, 0, 32, 1000)
    cfg = dict(token_budget=512, max_num_seqs=128, max_model_len=2048, max_batched_tokens=2048)
    for qps in (0.25, 1.0):
        wl = build_workload(WorkloadConfig(num_requests=300, seed=0, length_dist="lognormal",
                                           prompt_len=800, output_len=150, sigma=0.8,
                                           max_prompt_tokens=1500, max_output_tokens=400), qps)
        reqs = [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in wl]
        stats = {}
        for name, cost, tp, pp in (("TP8", tp8, 8, 1), ("TP4+PP2", pp2, 4, 2)):
            blocks = num_kv_blocks(falcon, A100, tp, pp=pp)
            c = Cluster([SimReplica(name, "hybrid", _config("sarathi", **cfg), blocks, cost)])
            res = c.run(reqs)
            _check_conservation(res, reqs)
            tbt = sorted(g for r in res.run.requests for g in r.itl_s)
            stats[name] = (statistics.median(tbt), tbt[int(0.99 * len(tbt))], res.end_time)
        print(f"\nfalcon-180b sarathi qps {qps} on 2 x 8 A100-80GB: " + "; ".join(
            f"{k}: P50 TBT {v[0] * 1e3:.1f} ms, P99 TBT {v[1] * 1e3:.1f} ms, makespan {v[2]:.1f} s"
            for k, v in stats.items()))
        assert stats["TP4+PP2"][1] < 0.6 * stats["TP8"][1]
        assert stats["TP4+PP2"][0] < 0.8 * stats["TP8"][0]


def test_cli_pp(tmp_path, capsys):
    import json

    from sim.cli import add_sim_commands

    p = argparse.ArgumentParser()
    add_sim_commands(p.add_subparsers(dest="command", required=True))
    common = ["--num-requests", "60", "--length-dist", "lognormal", "--prompt-len", "600",
              "--output-len", "40", "--max-prompt-tokens", "3000", "--qps", "4"]
    out = tmp_path / "run.json"
    args = p.parse_args(["sim", "run", "--pp", "2", "--json", str(out), *common])
    args.func(args)
    s = json.loads(out.read_text())
    assert s["num_ok"] == 60 and s["sim"]["pp"] == 2 and s["sim"]["pp_link"] == "nvlink"
    args = p.parse_args(["sim", "run", "--model", "llama-2-70b", "--tp", "8", "--pp", "2",
                         "--max-model-len", "4096", "--json", str(out), *common])
    args.func(args)
    assert json.loads(out.read_text())["sim"]["pp_link"] == "100gbe"   # 16 GPUs: two nodes
    args = p.parse_args(["sim", "run", "--pp", "2", "--cost", "profiled", "--profile", "x.json", *common])
    with pytest.raises(SystemExit, match="--cost roofline"):
        args.func(args)
    capsys.readouterr()


def test_torch_is_never_imported_with_stages():
    run_without_torch("""
        import tests.test_sim as t
        import tests.test_sim_pp as tp
        for policy in ("sarathi", "vllm"):
            c = tp._pp_cluster(2, policy)
            res = c.run(t._workload(n=40))
            c.check_drained()
            assert all(r.ok for r in res.run.requests)
    """)
