"""Step-time variation replayed from a served run, for the `profiled` cost model.

A `StepTimeModel` predicts a step's typical time; a real replica's steps scatter around it, and
not independently: on the 2-core CI VM the same decode step runs 15-30% slower for tens of seconds
at a time (stolen CPU, other tenants), then recovers. Percentiles of TTFT depend on that scatter
(a prompt that lands on a slow stretch waits behind longer steps, and the TTFT distribution has
cliffs where prompts start to need two steps), so a deterministic simulation lands its median on
one side of a cliff the real run straddles.

`StepVariation.from_trace` measures the scatter on served steps (`tandem serve --trace-file`,
a calibration run, never the run being predicted): each step's ratio measured / predicted,
split into
  - a slow component, the machine's speed over time: the median log-ratio of the decode-only
    steps within `window_s` around each moment (decode-only steps are many and alike, so their
    median tracks the machine rather than the model's error on one shape), and
  - jitter, what is left of each step's log-ratio, kept per step kind (prefill-carrying or
    decode-only: the model's error differs between them).
`StepNoise` (one per simulated replica and seed) multiplies each simulated step by the slow
component at the step's start time, read from the recorded timeline at a random offset
(circularly), times a jitter drawn from that step kind's recorded jitter.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scheduler.budget import StepTimeModel, samples_from_trace

GRID_S = 0.5
"""Resolution of the recorded slow component's timeline, seconds."""


@dataclass(frozen=True)
class StepVariation:
    """The step-time scatter of served runs, relative to a step-time model."""

    slow_log: np.ndarray
    """Slow component's log-ratio on a GRID_S grid over the recorded runs, end to end."""
    jitter_prefill: np.ndarray
    """Log-ratios left after the slow component, of steps that carried prefill tokens."""
    jitter_decode: np.ndarray
    """The same, of decode-only steps."""

    @property
    def duration_s(self) -> float:
        return len(self.slow_log) * GRID_S

    @classmethod
    def from_trace(cls, runs: Sequence[Sequence[dict]], model: StepTimeModel,
                   window_s: float = 5.0) -> "StepVariation":
        """`runs`: the per-step records of each served run (`--trace-file` rows); each replica's
        steps are a timeline of their own."""
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        slow, jitter = [], {True: [], False: []}
        for rows in _per_replica(runs):
            samples = samples_from_trace(rows)
            if not samples:
                continue
            ends = np.array([r["time"] for r in rows])
            starts = ends - np.array([r["step_time"] for r in rows])
            log_ratio = np.log([s.step_time / max(model.predict(s.features), 1e-6) for s in samples])
            prefill = np.array([s.features.prefill_tokens > 0 for s in samples])
            decode_t, decode_lr = starts[~prefill], log_ratio[~prefill]
            grid = np.arange(starts[0], max(ends[-1], starts[0] + GRID_S), GRID_S)
            lo = np.searchsorted(decode_t, grid - window_s / 2)
            hi = np.searchsorted(decode_t, grid + window_s / 2)
            overall = float(np.median(decode_lr)) if len(decode_lr) else 0.0
            run_slow = np.array([np.median(decode_lr[a:b]) if b > a else overall
                                 for a, b in zip(lo, hi)])
            slow.append(run_slow)
            at = np.minimum(((starts - starts[0]) / GRID_S).astype(int), len(run_slow) - 1)
            left = log_ratio - run_slow[at]
            for kind in (True, False):
                jitter[kind].append(left[prefill == kind])
        if not slow:
            raise ValueError("no served steps to measure step-time variation on")
        return cls(np.concatenate(slow), np.concatenate(jitter[True]),
                   np.concatenate(jitter[False]))

    def sampler(self, seed: int) -> "StepNoise":
        return StepNoise(self, seed)


def _per_replica(runs: Sequence[Sequence[dict]]) -> list[list[dict]]:
    """Each run's steps that computed something, one time-ordered list per replica (replicas of
    one server append to the same trace file)."""
    out = []
    for rows in runs:
        by_replica: dict[str, list[dict]] = {}
        for r in rows:
            if r.get("num_seqs"):   # the steps samples_from_trace keeps
                by_replica.setdefault(r.get("replica", ""), []).append(r)
        out += [sorted(steps, key=lambda r: r["time"]) for steps in by_replica.values()]
    return out


class StepNoise:
    """One replica's draw of the variation: a random start on the recorded timeline, and a
    random jitter per step. Deterministic for a seed."""

    def __init__(self, variation: StepVariation, seed: int) -> None:
        self.variation = variation
        self._rng = random.Random(seed)
        self._offset = self._rng.uniform(0.0, variation.duration_s)

    def factor(self, now: float, prefill: bool) -> float:
        """What a step starting at `now` (simulated seconds) takes, relative to the model."""
        v = self.variation
        slot = int((now + self._offset) / GRID_S) % len(v.slow_log)
        jitter = v.jitter_prefill if prefill and len(v.jitter_prefill) else v.jitter_decode
        drawn = jitter[self._rng.randrange(len(jitter))] if len(jitter) else 0.0
        return float(np.exp(v.slow_log[slot] + drawn))
