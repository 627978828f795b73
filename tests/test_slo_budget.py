"""`--budget slo`: per-chunk room under a predicted step time, infeasible steps, the online
refit, and that the other budgets schedule exactly as before. Torch-free (the simulator drives
the same controller)."""
from __future__ import annotations

import random

import numpy as np
import pytest

from engine.protocol import ReplicaStats, StepOutputs, decode, encode
from gateway.metrics import GatewayMetrics
from scheduler.budget import FeedbackBudget, SloBudget, StaticBudget, StepFeatures, StepTimeModel
from scheduler.config import BUDGET_KINDS, BudgetConfig, SchedulerConfig
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams
from scheduler.sarathi import SarathiScheduler
from scheduler.telemetry import IterationStats, iteration_stats
from sim.cluster import Cluster
from sim.cost import ProfiledCost
from sim.replica import SimReplica
from tests.no_torch import run_without_torch

# A small model on a CPU: 10 ms a step, 0.4 ms a prefill token, 1 ms a decode.
MODEL = StepTimeModel([0.010, 4e-4, 1e-3, 1e-6, 2e-8, 5e-4])
SLO_S = 0.100


def _slo(model: StepTimeModel = MODEL, slo_s: float = SLO_S, **kw) -> SloBudget:
    return SloBudget(model, slo_s, max_budget=2048, tile=32, **kw)


def _stats(f: StepFeatures, step_time: float, i: int = 0) -> IterationStats:
    return IterationStats(iteration=i, time=0.0, step_time=step_time, token_budget=2048,
                          num_decode_tokens=f.decodes,
                          num_prefill_tokens=f.prefill_tokens, num_seqs=f.sequences,
                          num_preemptions=0, num_running=0, num_waiting=0, kv_cache_usage=0.0,
                          decode_context=f.decode_context, prefill_attention=f.prefill_attention)


def _config(**kw) -> SchedulerConfig:
    base = dict(policy="sarathi", token_budget=256, max_num_seqs=16, max_model_len=4096,
                budget=BudgetConfig(kind="slo", tbt_slo_ms=SLO_S * 1e3))
    base.update(kw)
    return SchedulerConfig(**base)


def _request(rid: str, prompt: int, output: int = 8) -> Request:
    return Request(rid, [1 + i % 100 for i in range(prompt)],
                   SamplingParams(max_tokens=output, ignore_eos=True), 0.0)


@pytest.mark.parametrize("decodes,ctx,start", [(0, 0, 0), (4, 300, 0), (8, 1000, 700),
                                               (20, 1000, 1500), (1, 50, 3000)])
def test_room_is_the_largest_chunk_predicted_within_the_slo(decodes, ctx, start):
    budget = _slo()
    step = StepFeatures.uniform(0, decodes, ctx)
    n = budget.room(step, start)
    if decodes == 0:
        assert n == budget.value   # nobody waits on a decode-free step
        return
    assert 0 < n < budget.value
    assert budget.predict(step.with_chunk(n, start)) <= budget.target
    assert budget.predict(step.with_chunk(n + 1, start)) > budget.target
    # with a chunk already in the step, the next one gets what is left
    half = budget.room(step.with_chunk(n // 2, start), 0)
    assert budget.predict(step.with_chunk(n // 2, start).with_chunk(half, 0)) <= budget.target
    assert budget.predict(step.with_chunk(n // 2, start).with_chunk(half + 1, 0)) > budget.target


def test_scheduler_caps_each_chunk_by_the_room():
    sched = make_scheduler(_config(), num_blocks=2000, step_model=MODEL)
    for i in range(4):
        sched.add_request(_request(f"s{i}", 16, output=50))
    out = sched.schedule(0.0)   # no decodes yet: not capped
    sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, 0.0)
    for i in range(3):
        sched.add_request(_request(f"long{i}", 1500))
    out = sched.schedule(0.1)
    f = StepFeatures.of(out.chunks)
    assert f.decodes == 4 and f.prefill_tokens > 0
    assert sched.budget.predict(f) <= sched.budget.target
    # the last chunk could not have been one token longer
    last = out.chunks[-1]
    before = StepFeatures.of(out.chunks[:-1])
    assert sched.budget.predict(before.with_chunk(last.num_tokens + 1, last.start)) > sched.budget.target
    assert out.features == f   # recorded by `schedule` for the telemetry


def test_decodes_alone_over_the_slo_count_as_infeasible_and_starve_prefill_only_boundedly():
    # 1 ms a decode: 120 decodes alone take 130 ms > 100 ms
    sched = make_scheduler(_config(max_num_seqs=128, token_budget=256), num_blocks=4000,
                           step_model=MODEL)
    for i in range(120):
        sched.add_request(_request(f"s{i}", 16, output=1000))
    out = sched.schedule(0.0)
    sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, 0.0)
    sched.add_request(_request("late", 1000))
    prefill = []
    for i in range(12):
        out = sched.schedule(float(i))
        prefill.append(out.num_prefill_tokens)
        assert out.num_decode_tokens == 120   # decodes are never paused
        sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, float(i))
        sched.observe(iteration_stats(sched, out, iteration=i, time=float(i),
                                      step_time=MODEL.predict(out.features)))
    assert sched.budget.infeasible_steps == 12
    # one tile of prefill after every `starve_every` (4) infeasible steps without one
    assert prefill == [0, 0, 0, 0, 32, 0, 0, 0, 0, 32, 0, 0]


def test_online_refit_tracks_a_machine_slower_than_its_profile():
    budget = _slo()
    truth = StepTimeModel([1.5 * c for c in MODEL.coef])
    rng = random.Random(0)
    probe = [StepFeatures.uniform(p, d, ctx) for p in (0, 64, 300) for d in (2, 8, 20)
             for ctx in (100, 900)]
    assert max(abs(budget.model.predict(f) / truth.predict(f) - 1) for f in probe) > 0.3
    for i in range(300):
        f = StepFeatures.uniform(rng.choice([0, 0, 32, 100, 250]), rng.randint(1, 24),
                                 rng.randint(20, 1500))
        budget.observe(_stats(f, truth.predict(f) * rng.uniform(0.97, 1.03), i))
    err = max(abs(budget.model.predict(f) / truth.predict(f) - 1) for f in probe)
    assert err < 0.1, err
    # the residual correction covers the rest: corrected predictions sit at the noise's top
    assert 0.95 < budget.correction < 1.1
    # and a room sized now keeps the *true* step under the SLO
    step = StepFeatures.uniform(0, 8, 500)
    n = budget.room(step, 0)
    assert n > 0 and truth.predict(step.with_chunk(n, 0)) <= SLO_S * 1.03


def test_a_few_wild_steps_do_not_wreck_the_model():
    budget = _slo()
    for i in range(16):   # one refit's worth, of steps 10x slower than anything plausible
        f = StepFeatures.uniform(0, 4, 200)
        budget.observe(_stats(f, 10 * MODEL.predict(f), i))
    f = StepFeatures.uniform(128, 4, 200)
    assert budget.model.predict(f) < 2 * MODEL.predict(f)


@pytest.mark.parametrize("budget", [StaticBudget(128), FeedbackBudget(128, 0.1, 32, 32, 512)])
def test_budgets_that_do_not_predict_never_cap_a_chunk(budget):
    sched = SarathiScheduler(_config(budget=BudgetConfig()), 500, budget)
    out = sched.schedule(0.0)
    assert sched.prefill_room(out, 0) is None
    assert budget.infeasible_steps == 0


def test_an_unbinding_slo_schedules_exactly_like_the_static_budget():
    """The cap plumbing changes nothing while it does not bind: an slo budget whose SLO is never
    reached schedules every step as a static budget of its ceiling does."""
    cfg = _config(budget=BudgetConfig(), token_budget=512, max_num_seqs=8)
    static = SarathiScheduler(cfg, 300, StaticBudget(512))
    slo = SarathiScheduler(cfg, 300, SloBudget(MODEL, 1e6, max_budget=512, tile=32))
    rng = random.Random(1)
    for step in range(200):
        if rng.random() < 0.3:
            prompt, output = rng.randint(5, 900), rng.randint(1, 30)
            for s in (static, slo):
                s.add_request(_request(f"r{step}", prompt, output))
        outs = [s.schedule(float(step)) for s in (static, slo)]
        assert [(c.request.request_id, c.start, c.num_tokens) for c in outs[0].chunks] == \
               [(c.request.request_id, c.start, c.num_tokens) for c in outs[1].chunks]
        for s, out in zip((static, slo), outs):
            s.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, float(step))


@pytest.mark.parametrize("policy", ["vllm", "orca", "request", "hybrid_only"])
def test_slo_with_a_whole_prompt_policy_is_an_error_naming_it(policy):
    with pytest.raises(ValueError, match=policy):
        SchedulerConfig(policy=policy, budget=BudgetConfig(kind="slo"), max_num_seqs=16)


def test_slo_is_a_budget_kind_of_every_command_line():
    from cluster.cli import build_parser

    assert "slo" in BUDGET_KINDS
    args = build_parser().parse_args(["serve", "--budget", "slo", "--tbt-slo-ms", "150"])
    assert args.budget == "slo"


def test_infeasible_steps_reach_the_gateway_counter():
    frame = StepOutputs("r0", [], ReplicaStats(slo_infeasible_steps=7))
    stats = decode(encode(frame)).stats
    assert stats.slo_infeasible_steps == 7
    m = GatewayMetrics()
    m.update_replica("r0", stats)
    m.update_replica("r0", ReplicaStats(slo_infeasible_steps=9))
    text = m.render().decode()
    assert 'tandem:slo_infeasible_steps_total{replica="r0"} 9.0' in text


def test_old_iteration_frames_still_decode():
    """A replica that predates step features sends IterationStats without them."""
    new = _stats(StepFeatures.uniform(64, 3, 100), 0.05)
    body = StepOutputs("r0", [], iterations=[new])
    assert decode(encode(body)).iterations[0].features == new.features
    import msgpack

    raw = msgpack.unpackb(encode(body), raw=False)
    for it in raw["iterations"]:
        del it["decode_context"], it["prefill_attention"]
    old = decode(msgpack.packb(raw, use_bin_type=True)).iterations[0]
    assert old.features.decodes == 3 and old.features.decode_context == 0


def _sim_gaps(config: SchedulerConfig, cost: ProfiledCost, prior: StepTimeModel | None,
              n: int = 120, qps: float = 3.0, seed: int = 3) -> list[float]:
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / qps, n))
    reqs = [(float(a), int(rng.integers(200, 1500)), int(rng.integers(20, 80))) for a in arrivals]
    c = Cluster([SimReplica("h0", "hybrid", config, 20000, cost, prior)])
    result = c.run(reqs)
    assert all(r.ok for r in result.run.requests)
    c.check_drained()
    return [g for r in result.run.requests for g in r.itl_s]


def test_sim_slo_budget_holds_the_slo_from_the_first_step_where_static_does_not():
    cost = ProfiledCost(MODEL)
    big = dict(token_budget=1024, max_num_seqs=32, idle_token_budget=0)
    static = _sim_gaps(_config(budget=BudgetConfig(), **big), cost, None)
    slo = _sim_gaps(_config(budget=BudgetConfig(kind="slo", tbt_slo_ms=100), **big), cost, MODEL)
    assert np.percentile(static, 99) > 1.5 * SLO_S
    assert max(slo) <= SLO_S * 1.0001   # the model is exact here: every gap, the first included


def test_sim_slo_budget_learns_a_cost_its_profile_underestimates():
    truth = StepTimeModel([1.3 * c for c in MODEL.coef])
    cfg = _config(budget=BudgetConfig(kind="slo", tbt_slo_ms=100), token_budget=1024,
                  max_num_seqs=32)
    gaps = _sim_gaps(cfg, ProfiledCost(truth), MODEL)
    assert np.percentile(gaps, 99) <= 1.1 * SLO_S


def test_the_slo_budget_imports_no_torch():
    run_without_torch("from scheduler.budget import SloBudget; import sim.cli")


def test_short_decode_only_hiccups_do_not_shrink_every_chunk():
    """The residual correction is taken over the steps that carried prefill, whose size a room
    chose: decode-only steps that now and then take twice their prediction (a few ms on a short
    step, a large ratio) must not scale down every chunk."""
    budget = _slo(refit_every=10**6)   # no refit: the correction alone is under test
    for i in range(120):
        f = StepFeatures.uniform(0, 8, 300)   # decode-only, every fourth one a 2x hiccup
        budget.observe(_stats(f, MODEL.predict(f) * (2.0 if i % 4 == 0 else 1.0), i))
        g = StepFeatures.uniform(128, 8, 300)   # a prefill-carrying step, as predicted
        budget.observe(_stats(g, MODEL.predict(g), i))
    assert budget.correction == pytest.approx(1.0)
    step = StepFeatures.uniform(0, 8, 300)
    assert budget.room(step, 0) == _slo().room(step, 0)
