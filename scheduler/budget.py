"""Token-budget controllers: how many tokens the next iteration may process.

- `StaticBudget`: a fixed budget (`--token-budget`).
- `profiled`: a StaticBudget whose value comes from `pick_budget` over a fitted `StepTimeModel`.
- `FeedbackBudget`: adapts every iteration from measured step times (see its docstring).

No torch here: the simulator drives the same controllers.
"""
from __future__ import annotations

from collections import deque
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


@dataclass
class ProfileSample:
    prefill_tokens: int
    decode_tokens: int
    context: int
    """Tokens already in the cache of each sequence in the step."""
    step_time: float


class StepTimeModel:
    """Least-squares step-time predictor over features that mirror the cost of a hybrid batch:

        t = c0 + c1*P + c2*D + c3*D*ctx + c4*P*ctx

    (P prefill tokens, D decode tokens, ctx tokens already cached per sequence: linear layers
    scale with P + D, attention with the tokens read from the cache.)
    """

    def __init__(self, coef: list[float]) -> None:
        self.coef = list(coef)

    @staticmethod
    def _features(p: float, d: float, ctx: float) -> list[float]:
        return [1.0, p, d, d * ctx, p * ctx]

    @classmethod
    def fit(cls, samples: list[ProfileSample]) -> "StepTimeModel":
        if len(samples) < 5:
            raise ValueError(f"need at least 5 profile samples to fit, got {len(samples)}")
        x = np.array([cls._features(s.prefill_tokens, s.decode_tokens, s.context) for s in samples])
        y = np.array([s.step_time for s in samples])
        # Minimise relative error: steps span 100x, and small ones matter as much as big ones.
        w = 1.0 / np.maximum(y, 1e-6)
        coef, *_ = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)
        return cls(coef.tolist())

    def predict(self, prefill_tokens: float, decode_tokens: float, context: float) -> float:
        return float(np.dot(self.coef, self._features(prefill_tokens, decode_tokens, context)))


def pick_budget(model: StepTimeModel, tbt_slo_s: float, decode_tokens: int, context: int,
                tile: int, min_budget: int, max_budget: int) -> int:
    """Largest tile-aligned budget whose predicted step (with `decode_tokens` decodes and the
    rest prefill, all at `context`) stays under the SLO; `min_budget` if none does."""
    best = min_budget
    for budget in range(tile, max_budget + 1, tile):
        if budget < min_budget:
            continue
        prefill = max(0, budget - decode_tokens)
        if model.predict(prefill, min(decode_tokens, budget), context) <= tbt_slo_s:
            best = budget
    return best


def samples_to_json(samples: list[ProfileSample]) -> list[dict]:
    return [asdict(s) for s in samples]


def samples_from_json(rows: list[dict]) -> list[ProfileSample]:
    return [ProfileSample(**r) for r in rows]
