"""Step-time profiling for the `profiled` token-budget controller, `tandem profile` and the
simulator's `profiled` cost model.

Each sample is one real engine step of a chosen shape -- decodes at a context, prefill chunks
after a cached prefix, whole prompts up to max_model_len -- timed as the replica loop runs it:
`schedule` + `runner.execute` + `update`, on the real paged cache and a real scheduler. The
shape is built with `Scheduler.add_cached` (the prefix counts as cached; its KV is whatever the
blocks hold, which costs the same to read). The step's `StepFeatures` come from the scheduled
output itself, and `StepTimeModel` is fitted on them. A profile is machine-specific JSON.
"""
from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

from engine.runner import ModelRunner
from scheduler.budget import ProfileSample, StepFeatures, StepTimeModel, load_profile, save_profile
from scheduler.config import BudgetConfig, SchedulerConfig
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams

log = logging.getLogger("tandem.profiler")

CONTEXT_GRID = (0, 128, 512, 1024, 2048)
"""Tokens cached before every sequence of a step (capped below max_model_len)."""
DECODE_GRID = (0, 1, 4, 16, 32, 64)
"""Decodes per step (capped at max_num_seqs)."""
CHUNK_GRID = (0, 32, 128, 256, 512)
"""Prefill chunk sizes that ride along with the decodes (token budgets in use)."""
WHOLE_PROMPTS = (1024, 2048, 4096, 8192, 16384)
"""Whole-prompt prefills (what vllm-style policies run), up to max_model_len."""
SPLIT_CHUNKS = 4
"""Some steps split their prefill over this many chunks, so the per-sequence cost is identified."""


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int
    decodes: int
    context: int
    prefill_chunks: int = 1


def profile_shapes(config: SchedulerConfig, capacity_tokens: int, block_size: int) -> list[StepShape]:
    """The profile grid that fits this replica: context + prompt within max_model_len (up to a
    whole prompt of max_model_len - 1 tokens, the longest a request can have), every
    sequence's blocks within the cache, decodes within max_num_seqs."""
    limit = config.max_model_len - 1   # a prompt leaves room for the token it samples
    shapes = []
    for ctx in (c for c in CONTEXT_GRID if c < limit):
        for d in (d for d in DECODE_GRID if d <= config.max_num_seqs):
            for p in (p for p in CHUNK_GRID if ctx + p <= limit):
                if p + d:
                    shapes.append(StepShape(p, d, ctx))
                if p >= SPLIT_CHUNKS * 32 and d in (0, 16):
                    shapes.append(StepShape(p, d, ctx, SPLIT_CHUNKS))
    shapes += [StepShape(p, 0, 0) for p in sorted({*(p for p in WHOLE_PROMPTS if p < limit), limit})]

    def fits(s: StepShape) -> bool:
        per = -(-(s.context + 1) // block_size) * block_size
        chunk = s.prefill_tokens // max(s.prefill_chunks, 1)
        pre = -(-(s.context + chunk) // block_size) * block_size if s.prefill_tokens else 0
        return s.decodes * per + s.prefill_chunks * pre <= capacity_tokens
    return [s for s in shapes if fits(s)]


def _tokens(n: int, salt: int) -> list[int]:
    return [1 + (salt * 7919 + j) % 1000 for j in range(n)]


def time_step(runner: ModelRunner, config: SchedulerConfig, shape: StepShape,
              repeats: int = 3) -> ProfileSample:
    """Median seconds of `schedule` + `execute` + `update` for one step of `shape` (after one
    untimed warm-up), with the step's own features."""
    chunks = shape.prefill_chunks if shape.prefill_tokens else 0
    per_chunk = shape.prefill_tokens // chunks if chunks else 0
    budget = shape.decodes + per_chunk * chunks
    sched_config = replace(config, policy="sarathi", token_budget=budget, idle_token_budget=0,
                           max_num_seqs=shape.decodes + chunks,
                           budget=BudgetConfig(kind="static"),
                           # the "cached" prefixes hold no real KV: never offer them for reuse
                           enable_prefix_caching=False)
    times, features = [], None
    for rep in range(repeats + 1):
        sched = make_scheduler(sched_config, runner.num_blocks)
        ids = []
        for i in range(shape.decodes):
            r = Request(f"profile-{rep}-d{i}", _tokens(shape.context + 1, i),
                        SamplingParams(max_tokens=1, temperature=0.0), 0.0)
            sched.add_cached(r, shape.context)
            ids.append(r.request_id)
        for i in range(chunks):
            r = Request(f"profile-{rep}-p{i}", _tokens(shape.context + per_chunk, 100 + i),
                        SamplingParams(max_tokens=1, temperature=0.0), 0.0)
            if shape.context:
                sched.add_cached(r, shape.context)
            else:
                sched.add_request(r)   # a fresh prompt goes through admission, as in serving
            ids.append(r.request_id)
        start = time.perf_counter()
        out = sched.schedule(0.0)
        step = StepFeatures.of(out.chunks)
        result = runner.execute(out)
        sched.update(out, result.sampled, 0.0)
        elapsed = time.perf_counter() - start
        if step != StepFeatures.uniform(shape.prefill_tokens, shape.decodes, shape.context, chunks or 1):
            raise AssertionError(f"profile step scheduled as {step}, not {shape}")
        for rid in ids:
            runner.release(rid)
        if rep:   # the first run warms caches and kernels
            times.append(elapsed)
        features = step
    return ProfileSample(features, statistics.median(times))


def profile(runner: ModelRunner, config: SchedulerConfig, repeats: int = 3) -> list[ProfileSample]:
    shapes = profile_shapes(config, runner.num_blocks * runner.block_size, runner.block_size)
    samples = []
    for shape in shapes:
        sample = time_step(runner, config, shape, repeats)
        samples.append(sample)
        log.info("profile: prefill %5d (x%d) decode %3d context %5d -> %.1f ms",
                 shape.prefill_tokens, shape.prefill_chunks, shape.decodes, shape.context,
                 sample.step_time * 1e3)
    return samples


def load_or_profile(runner: ModelRunner, config: SchedulerConfig) -> StepTimeModel | None:
    """The step-time model of `--budget profiled` and `slo`, from --profile-file or a profile run now; None
    (with a warning) when there are too few samples to fit one (a small KV cache or context skips
    most of the grid), so the replica starts with the static budget instead of failing."""
    path = config.budget.profile_path
    if path and Path(path).exists():
        samples = load_profile(path)
        log.info("loaded %d profile samples from %s", len(samples), path)
    else:
        log.info("profiling step times (a minute or two; save it with `tandem profile`)")
        samples = profile(runner, config)
        if path:
            save_profile(samples, path)
    try:
        return StepTimeModel.fit(samples)
    except ValueError as e:
        log.warning("--budget %s: %s; using the static --token-budget %d instead",
                    config.budget.kind, e, config.token_budget)
        return None
