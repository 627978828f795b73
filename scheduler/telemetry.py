"""Per-iteration telemetry: one record per engine step (also produced by the simulator)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # scheduler.core imports this module: no runtime import back
    from scheduler.budget import StepFeatures
    from scheduler.core import Scheduler, SchedulerOutput


@dataclass
class IterationStats:
    iteration: int
    """Step counter of the replica, from 0."""
    time: float
    """Wall-clock (Unix) time at the end of the step."""
    step_time: float
    """Seconds the step took: schedule + forward + sampling + update + detokenize."""
    token_budget: int
    """The budget the scheduler used for this step."""
    num_decode_tokens: int
    num_prefill_tokens: int
    num_seqs: int
    num_preemptions: int
    """Requests preempted (by recompute) in this step."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    decode_context: int = 0
    """Sum over the step's decodes of the tokens they had cached (`StepFeatures.decode_context`;
    defaults keep frames from replicas that did not send it decodable)."""
    prefill_attention: float = 0.0
    """Sum over the step's prefill chunks of p * (start + p/2) (`StepFeatures.prefill_attention`)."""

    @property
    def features(self) -> "StepFeatures":
        """What this step's time depends on, for step-time models learning online."""
        from scheduler.budget import StepFeatures  # noqa: PLC0415 - scheduler.budget imports this module

        return StepFeatures(self.num_prefill_tokens, self.num_decode_tokens, self.decode_context,
                            self.prefill_attention, self.num_seqs)


def iteration_stats(scheduler: "Scheduler", out: "SchedulerOutput", *, iteration: int,
                    time: float, step_time: float) -> IterationStats:
    """The record of one step that ran `out`, read after `scheduler.update` (queues and KV usage
    as the step left them; its features as `schedule` recorded them, before `update`). EngineCore builds its records here, so that a simulator
    stepping the same scheduler records identical ones."""
    return IterationStats(
        iteration=iteration, time=time, step_time=step_time,
        token_budget=out.token_budget, num_decode_tokens=out.num_decode_tokens,
        num_prefill_tokens=out.num_prefill_tokens, num_seqs=len(out.chunks),
        num_preemptions=len(out.preempted_ids), num_running=len(scheduler.running),
        num_waiting=len(scheduler.waiting), kv_cache_usage=scheduler.block_manager.usage,
        decode_context=out.features.decode_context if out.features else 0,
        prefill_attention=out.features.prefill_attention if out.features else 0.0,
    )


def read_step_trace(path: str | os.PathLike[str]) -> list[dict]:
    """The records a `tandem serve --trace-file` wrote (one JSON object per step, each with the
    replica id and the `IterationStats` fields); gzipped when the name ends in .gz."""
    import gzip
    import json

    with (gzip.open if str(path).endswith(".gz") else open)(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]
