"""Step-time profiling for the `profiled` token-budget controller and `tandem profile`.

Times real forwards of this replica's runner over a grid of (prefill tokens, decode tokens,
context length) with dummy requests on the real paged cache, then fits the scheduler's
`StepTimeModel`. A profile is a JSON list of samples; it is machine-specific.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from engine.runner import ModelRunner
from scheduler.block_manager import BlockManager
from scheduler.budget import (ProfileSample, StepTimeModel, samples_from_json, samples_to_json)
from scheduler.config import SchedulerConfig
from scheduler.core import ScheduledChunk, SchedulerOutput
from scheduler.request import Request, SamplingParams

log = logging.getLogger("tandem.profiler")

PREFILL_GRID = (0, 64, 256, 512)
DECODE_GRID = (0, 8, 32)
CONTEXT_GRID = (128, 1024)


def _dummy(i: int, total: int, computed: int, bm: BlockManager) -> Request:
    r = Request(f"profile-{i}", [1 + (j % 1000) for j in range(total)],
                SamplingParams(max_tokens=1, temperature=0.0), arrival_time=0.0)
    r.num_computed_tokens = computed
    bm.allocate(r, total)
    return r


def time_step(runner: ModelRunner, prefill: int, decodes: int, context: int, repeats: int = 3) -> float:
    """Median seconds of one forward with `decodes` decodes and one `prefill`-token chunk, every
    sequence having `context` tokens cached."""
    bm = BlockManager(runner.num_blocks, runner.block_size)
    chunks = [ScheduledChunk(_dummy(i, context + 1, context, bm), 1) for i in range(decodes)]
    if prefill:
        chunks.append(ScheduledChunk(_dummy(decodes, context + prefill, context, bm), prefill))
    out = SchedulerOutput(chunks=chunks, token_budget=prefill + decodes)
    runner.execute(out)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.execute(out)
        times.append(time.perf_counter() - start)
    for c in chunks:
        runner.release(c.request.request_id)
    return statistics.median(times)


def profile(runner: ModelRunner, config: SchedulerConfig, repeats: int = 3) -> list[ProfileSample]:
    samples = []
    capacity = runner.num_blocks * runner.block_size
    for context in CONTEXT_GRID:
        if context >= config.max_model_len:
            continue
        for decodes in DECODE_GRID:
            for prefill in PREFILL_GRID:
                if prefill == decodes == 0 or decodes > config.max_num_seqs:
                    continue
                if (decodes + 1) * (context + prefill + runner.block_size) > capacity:
                    continue
                t = time_step(runner, prefill, decodes, context, repeats)
                samples.append(ProfileSample(prefill, decodes, context, t))
                log.info("profile: prefill %4d decode %3d context %5d -> %.1f ms",
                         prefill, decodes, context, t * 1e3)
    return samples


def save_profile(samples: list[ProfileSample], path: str | Path) -> None:
    Path(path).write_text(json.dumps({"samples": samples_to_json(samples)}, indent=1))


def load_profile(path: str | Path) -> list[ProfileSample]:
    return samples_from_json(json.loads(Path(path).read_text())["samples"])


def load_or_profile(runner: ModelRunner, config: SchedulerConfig) -> StepTimeModel | None:
    """The step-time model of `--budget profiled`, from --profile-file or a profile run now; None
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
        log.warning("--budget profiled: %s; using the static --token-budget %d instead",
                    e, config.token_budget)
        return None
