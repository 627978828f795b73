"""`tandem profile`: real steps of chosen shapes through schedule + execute + update, the
features they are fitted on, and the grid up to whole prompts of max_model_len."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.model_config import ModelConfig
from engine.profiler import StepShape, profile, profile_shapes, time_step
from engine.runner import ModelRunner
from scheduler.budget import StepFeatures, StepTimeModel
from scheduler.config import SchedulerConfig
from scheduler.core import AdmissionError
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    cfg = EngineConfig(model_dir=str(tiny_model_dir), dtype="float32", num_kv_blocks=256,
                       scheduler=SchedulerConfig(max_model_len=1024, max_num_seqs=16))
    return ModelRunner(cfg, ModelConfig.from_dir(cfg.model_dir))


def test_grid_reaches_whole_prompts_of_max_model_len_and_fits_the_cache():
    cfg = SchedulerConfig(max_model_len=2048, max_num_seqs=32)
    shapes = profile_shapes(cfg, capacity_tokens=64 * 1024, block_size=16)
    assert StepShape(2047, 0, 0) in shapes and all(s.prefill_tokens <= 2047 for s in shapes)
    assert all(s.decodes <= 32 and s.context + s.prefill_tokens // s.prefill_chunks <= 2047
               for s in shapes)
    assert any(s.prefill_chunks > 1 for s in shapes) and any(s.prefill_tokens == 0 for s in shapes)
    small = profile_shapes(cfg, capacity_tokens=4096, block_size=16)
    assert small and all(s.decodes * (s.context + 16) <= 4096 for s in small)
    assert StepShape(2047, 0, 0) in small and StepShape(0, 32, 1024) not in small


@pytest.mark.parametrize("shape", [StepShape(0, 8, 200), StepShape(96, 4, 0),
                                   StepShape(128, 3, 300, prefill_chunks=4)])
def test_a_timed_step_has_the_shape_asked_for(runner, shape):
    sample = time_step(runner, SchedulerConfig(max_model_len=1024, max_num_seqs=16), shape, repeats=1)
    assert sample.features == StepFeatures.uniform(shape.prefill_tokens, shape.decodes,
                                                   shape.context, shape.prefill_chunks)
    assert sample.step_time > 0
    # everything it allocated was given back: the next shape starts from an empty cache
    assert runner.num_blocks == 256


def test_profile_fits_and_predicts_the_steps_it_timed(runner):
    cfg = SchedulerConfig(max_model_len=1024, max_num_seqs=16)
    samples = profile(runner, cfg, repeats=1)
    assert {s.features.prefill_tokens for s in samples} >= {1023, 512, 0}
    model = StepTimeModel.fit(samples)
    errors = sorted(abs(model.predict(s.features) / s.step_time - 1) for s in samples)
    assert errors[len(errors) // 2] < 0.5, errors   # tiny model on a busy CPU: noisy, not wild


def test_add_cached_counts_the_prefix_as_computed():
    sched = make_scheduler(SchedulerConfig(token_budget=64, max_model_len=256), num_blocks=8)
    r = Request("a", list(range(1, 41)), SamplingParams(max_tokens=2), 0.0)
    sched.add_cached(r, 39)
    out = sched.schedule(0.0)
    assert [(c.request.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 39, 1)]
    sched.check_integrity()
    big = Request("b", list(range(1, 200)), SamplingParams(max_tokens=1), 0.0)
    with pytest.raises(AdmissionError):
        sched.add_cached(big, 10)   # 13 blocks needed, 8 in the cache
    with pytest.raises(ValueError, match="num_cached_tokens"):
        sched.add_cached(Request("c", [1, 2], SamplingParams(max_tokens=1), 0.0), 2)
