"""Per-iteration telemetry: one record per engine step (also produced by the simulator)."""
from __future__ import annotations

from dataclasses import dataclass


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
