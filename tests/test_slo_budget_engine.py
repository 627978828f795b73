"""`--budget slo` through the real engine: a tiny random Llama, in process, no mocks. It starts
from a profile file, learns from the steps it runs, and reports infeasible steps in ReplicaStats."""
from __future__ import annotations

from engine.config import EngineConfig
from engine.core import EngineCore
from scheduler.budget import save_profile
from engine.protocol import StepOutputs, decode, encode
from scheduler.budget import (PRIOR_CHUNKS, PRIOR_DECODES, ProfileSample, SloBudget, StepFeatures,
                              StepTimeModel)
from scheduler.config import BudgetConfig, SchedulerConfig
from scheduler.request import SamplingParams


def _engine(model_dir, profile_path, slo_ms: float) -> EngineCore:
    return EngineCore(EngineConfig(
        model_dir=str(model_dir), dtype="float32", num_kv_blocks=256,
        scheduler=SchedulerConfig(token_budget=64, max_num_seqs=8, max_model_len=512,
                                  budget=BudgetConfig(kind="slo", tbt_slo_ms=slo_ms,
                                                      profile_path=str(profile_path)))))


def _run(engine: EngineCore, prompts: list[int], max_steps: int = 3000) -> dict[str, int]:
    sp = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, n in enumerate(prompts):
        assert engine.add_request(f"r{i}", [5 + j % 50 for j in range(n)], sp) is None
    done: dict[str, int] = {}
    for _ in range(max_steps):
        if not engine.has_work():
            break
        for o in engine.step():
            done[o.request_id] = o.num_output_tokens
    return done


def test_slo_budget_learns_on_the_real_engine_and_reports_infeasible_steps(tiny_model_dir, tmp_path):
    # A profile claiming every step costs ~1 s: ten times slower than any real step of a tiny
    # model. Decodes alone are then "over" a 100 ms SLO until the controller has learnt better.
    path = tmp_path / "profile.json"
    save_profile([ProfileSample(StepFeatures.uniform(p, d, ctx), 1.0 + 1e-3 * p + 1e-2 * d)
                  for ctx in (0, 128) for d in PRIOR_DECODES for p in PRIOR_CHUNKS if p + d], path)
    engine = _engine(tiny_model_dir, path, slo_ms=100)
    budget = engine.scheduler.budget
    assert isinstance(budget, SloBudget)
    prior = list(budget.model.coef)

    done = _run(engine, [40, 300, 300, 200, 250])
    assert done == {f"r{i}": 40 for i in range(5)}   # nobody starved
    stats = engine.stats()
    assert stats.slo_infeasible_steps == budget.infeasible_steps > 0
    # learnt: real steps are far faster than the profile said
    assert budget.model.coef != prior
    step = StepFeatures.uniform(0, 4, 100)
    assert budget.predict(step) < 0.1 < 1.0 < StepTimeModel(prior).predict(step)
    # the count travels to the gateway in the replica's frames
    assert decode(encode(StepOutputs("r", [], stats))).stats.slo_infeasible_steps == stats.slo_infeasible_steps
    # and the telemetry carries the step features the controller learns from
    assert engine.last_step is not None and engine.last_step.features.sequences >= 1

    # Once it has learnt, a second batch of prompts is chunked under the SLO instead.
    before = budget.infeasible_steps
    done = _run(engine, [300, 300, 40])
    assert len(done) == 3
    assert budget.infeasible_steps == before
