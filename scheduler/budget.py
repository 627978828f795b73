"""Token-budget controllers: how many tokens the next iteration may process.

- `StaticBudget`: a fixed budget (`--token-budget`).
- `profiled`: a StaticBudget whose value comes from `pick_budget` over a fitted `StepTimeModel`.
- `FeedbackBudget`: adapts every iteration from measured step times (see its docstring).

No torch here: the simulator drives the same controllers.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Protocol

import numpy as np

from scheduler.telemetry import IterationStats


class BudgetController(Protocol):
    @property
    def value(self) -> int: ...

    def observe(self, stats: IterationStats) -> None: ...


class StaticBudget:
    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"token budget must be >= 1, got {value}")
        self.value = value

    def observe(self, stats: IterationStats) -> None:
        pass


class FeedbackBudget:
    """AIMD on the tail of measured step times, which is what a decoding request sees as TBT.

    Every iteration it looks at the P99 step time of the last `window` iterations. Above
    `headroom * SLO` it cuts the budget multiplicatively (x`decrease`, a fast retreat when load
    rises); when the tail is comfortably below (< `grow_below * SLO`) and the budget was actually
    used up by prefill work, it grows by one tile (a slow probe for more throughput).
    The budget stays a multiple of the tile, within [min_budget, max_budget].
    """

    def __init__(self, initial: int, tbt_slo_s: float, tile: int, min_budget: int, max_budget: int,
                 window: int = 32, headroom: float = 0.9, grow_below: float = 0.7,
                 decrease: float = 0.75, cooldown: int = 4) -> None:
        self.tbt_slo_s, self.tile = tbt_slo_s, tile
        self.min_budget, self.max_budget = min_budget, max_budget
        self.headroom, self.grow_below, self.decrease = headroom, grow_below, decrease
        self.cooldown = cooldown
        self._recent: deque[float] = deque(maxlen=window)
        self._since_change = 0
        self.value = self._clamp(initial)

    def _clamp(self, budget: float) -> int:
        aligned = int(budget) // self.tile * self.tile
        return max(self.min_budget, min(self.max_budget, max(aligned, self.tile)))

    def observe(self, stats: IterationStats) -> None:
        if stats.num_decode_tokens == 0:
            return  # no request was waiting for its next token during this step
        self._recent.append(stats.step_time)
        self._since_change += 1
        if self._since_change < self.cooldown:
            return  # let a change show up in the measurements before judging it
        tail = float(np.percentile(self._recent, 99))
        used = stats.num_decode_tokens + stats.num_prefill_tokens
        if tail > self.headroom * self.tbt_slo_s and self.value > self.min_budget:
            self.value = self._clamp(self.value * self.decrease)
            self._recent.clear()
            self._since_change = 0
        elif (tail < self.grow_below * self.tbt_slo_s and stats.num_prefill_tokens
              and used >= stats.token_budget and self.value < self.max_budget):
            self.value = self._clamp(self.value + self.tile)
            self._since_change = 0


@dataclass(frozen=True)
class StepFeatures:
    """What one step's time depends on, read from its chunks before `update` (a chunk's start is
    then the number of tokens already cached for its request). Linear layers scale with tokens,
    decode attention with the context it reads, prefill attention with p * (ctx + p/2) (every new
    token attends to the cached prefix and, causally, to half the chunk), and the host pays a
    little per sequence (its rows in the inputs, sampling, output)."""

    prefill_tokens: int
    """Tokens of chunks that are not a single sampled decode token."""
    decodes: int
    """Requests computing their one next token."""
    decode_context: int
    """Sum over decodes of the tokens already cached (KV read per layer)."""
    prefill_attention: float
    """Sum over prefill chunks of p * (start + p / 2)."""
    sequences: int
    """Chunks in the step."""

    @classmethod
    def of(cls, chunks: Iterable) -> "StepFeatures":
        """Features of a step's `ScheduledChunk`s (before `update`)."""
        p = d = d_ctx = seqs = 0
        attn = 0.0
        for c in chunks:
            n, start = c.num_tokens, c.start
            seqs += 1
            if n == 1 and c.samples:
                d += 1
                d_ctx += start
            else:
                p += n
                attn += n * (start + n / 2)
        return cls(p, d, d_ctx, attn, seqs)

    @classmethod
    def uniform(cls, prefill_tokens: int, decodes: int, context: int,
                prefill_chunks: int = 1) -> "StepFeatures":
        """`decodes` decodes and `prefill_tokens` split over `prefill_chunks` equal chunks, every
        sequence with `context` tokens cached (the shape `tandem profile` times)."""
        chunks = prefill_chunks if prefill_tokens else 0
        per = prefill_tokens / chunks if chunks else 0.0
        return cls(prefill_tokens, decodes, decodes * context,
                   chunks * per * (context + per / 2), decodes + chunks)

    def vector(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.decodes, self.decode_context,
                self.prefill_attention, self.sequences]


FEATURE_NAMES = ("1", "P", "D", "sum(decode ctx)", "sum(p*(ctx+p/2))", "seqs")


@dataclass(frozen=True)
class ProfileSample:
    features: StepFeatures
    step_time: float
    """Seconds of schedule + forward + sampling + update for this step."""


class StepTimeModel:
    """Least-squares step-time predictor over `StepFeatures`:

        t = c0 + c1*P + c2*D + c3*sum(decode ctx) + c4*sum(p*(ctx+p/2)) + c5*seqs

    fitted to profiled steps; the simulator's `profiled` cost model and the `profiled` budget both
    read it.
    """

    def __init__(self, coef: list[float]) -> None:
        if len(coef) != len(FEATURE_NAMES):
            raise ValueError(f"a StepTimeModel has {len(FEATURE_NAMES)} coefficients "
                             f"({', '.join(FEATURE_NAMES)}), got {len(coef)}")
        self.coef = list(coef)

    @classmethod
    def fit(cls, samples: list[ProfileSample]) -> "StepTimeModel":
        if len(samples) < len(FEATURE_NAMES):
            raise ValueError(f"need at least {len(FEATURE_NAMES)} profile samples to fit, "
                             f"got {len(samples)}")
        x = np.array([s.features.vector() for s in samples])
        y = np.array([s.step_time for s in samples])
        # Minimise relative error: steps span 100x, and small ones matter as much as big ones.
        w = 1.0 / np.maximum(y, 1e-6)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        return cls(coef.tolist())

    def predict(self, features: StepFeatures) -> float:
        return float(np.dot(self.coef, features.vector()))

    def describe(self) -> str:
        return " + ".join(f"{c:.3g}*{f}" for c, f in zip(self.coef, FEATURE_NAMES))


def pick_budget(model: StepTimeModel, tbt_slo_s: float, decode_tokens: int, context: int,
                tile: int, min_budget: int, max_budget: int) -> int:
    """Largest tile-aligned budget whose predicted step (with `decode_tokens` decodes and the
    rest prefill, all at `context`) stays under the SLO; `min_budget` if none does."""
    best = min_budget
    for budget in range(tile, max_budget + 1, tile):
        if budget < min_budget:
            continue
        prefill = max(0, budget - decode_tokens)
        step = StepFeatures.uniform(prefill, min(decode_tokens, budget), context)
        if model.predict(step) <= tbt_slo_s:
            best = budget
    return best


def samples_to_json(samples: list[ProfileSample]) -> list[dict]:
    return [{**asdict(s.features), "step_time": s.step_time} for s in samples]


def samples_from_json(rows: list[dict]) -> list[ProfileSample]:
    """Rows of a profile JSON. Profiles written before per-step features (prefill_tokens,
    decode_tokens, context: one prefill chunk, every sequence at one context) still load."""
    samples = []
    for r in rows:
        r = dict(r)
        t = r.pop("step_time")
        if "decode_tokens" in r:
            f = StepFeatures.uniform(r["prefill_tokens"], r["decode_tokens"], r["context"])
        else:
            f = StepFeatures(**r)
        samples.append(ProfileSample(f, t))
    return samples
