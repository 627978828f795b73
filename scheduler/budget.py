"""Token-budget controllers: how many tokens the next iteration may process.

- `StaticBudget`: a fixed budget (`--token-budget`).
- `profiled`: a StaticBudget whose value comes from `pick_budget` over a fitted `StepTimeModel`.
- `FeedbackBudget`: adapts every iteration from measured step times (see its docstring).
- `SloBudget`: predicts every step's time before it runs and sizes each prefill chunk so the
  prediction stays under the TBT SLO (see its docstring).

No torch here: the simulator drives the same controllers.
"""
from __future__ import annotations

import gzip
import json
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from scheduler.telemetry import IterationStats


class BudgetController(Protocol):
    @property
    def value(self) -> int:
        """Most tokens the next iteration may process."""

    per_chunk: bool
    """Whether `chunk_room` caps prefill chunks (the scheduler asks it only then)."""
    infeasible_steps: int
    """Steps whose decodes alone were predicted over the TBT SLO (0 for controllers that do
    not predict)."""

    def chunk_room(self, chunks: list, start: int) -> int:
        """Most tokens a prefill chunk starting at token `start` of its request may add to the
        step already holding `chunks` (`ScheduledChunk`s)."""

    def observe(self, stats: IterationStats) -> None: ...


class StaticBudget:
    per_chunk = False
    infeasible_steps = 0

    def __init__(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"token budget must be >= 1, got {value}")
        self.value = value

    def chunk_room(self, chunks: list, start: int) -> int:
        return self.value

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

    per_chunk = False
    infeasible_steps = 0

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

    def chunk_room(self, chunks: list, start: int) -> int:
        return self.value

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

    def with_chunk(self, n: int, start: int) -> "StepFeatures":
        """These features plus one prefill chunk of `n` tokens starting at token `start`."""
        return StepFeatures(self.prefill_tokens + n, self.decodes, self.decode_context,
                            self.prefill_attention + n * (start + n / 2), self.sequences + 1)

    def decodes_only(self) -> "StepFeatures":
        """The same step without its prefill chunks."""
        return StepFeatures(0, self.decodes, self.decode_context, 0.0, self.decodes)

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

    (c1..c5 >= 0) fitted to profiled steps; the simulator's `profiled` cost model and the
    `profiled` budget both read it.
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
        # Marginal costs >= 0: on served steps decodes and sequences move together, and a free
        # fit trades a negative cost per decode against a large one per sequence.
        return cls(fit_nonnegative(x, y, 1.0 / np.maximum(y, 1e-6)).tolist())

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


def save_profile(samples: list[ProfileSample], path: str | Path) -> None:
    """A profile JSON (`tandem profile --out`): {"samples": [features + step_time, ...]};
    gzipped when the name ends in .gz (a profile fitted on served steps has thousands)."""
    text = json.dumps({"samples": samples_to_json(samples)}, indent=1)
    if str(path).endswith(".gz"):
        Path(path).write_bytes(gzip.compress(text.encode(), mtime=0))
    else:
        Path(path).write_text(text)


def load_profile(path: str | Path) -> list[ProfileSample]:
    data = Path(path).read_bytes()
    if str(path).endswith(".gz"):
        data = gzip.decompress(data)
    return samples_from_json(json.loads(data)["samples"])


PRIOR_CONTEXTS = (0, 128, 512, 1024, 2048)
PRIOR_DECODES = (0, 1, 4, 16, 32, 64)
PRIOR_CHUNKS = (0, 32, 128, 256, 512, 1024)


def prior_samples(model: StepTimeModel) -> list[ProfileSample]:
    """`model`'s predictions over a grid like `tandem profile`'s, as samples: what `SloBudget`
    refits with its own measurements. Samples rather than the coefficients, so the refit weighs
    the prior where measurements say little (feature directions the live load never varies)
    and gives way where they say a lot."""
    samples = []
    for ctx in PRIOR_CONTEXTS:
        for d in PRIOR_DECODES:
            for p in PRIOR_CHUNKS:
                if p + d:
                    f = StepFeatures.uniform(p, d, ctx)
                    samples.append(ProfileSample(f, max(model.predict(f), 1e-4)))
    return samples


def fit_nonnegative(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least squares with every coefficient but the intercept kept >= 0 (drop the most
    negative and refit until none is). Every feature adds work, so a negative marginal cost is
    a fitting artefact of collinear measurements; keeping them >= 0 also makes a step's
    predicted time grow with its prefill chunk, which `SloBudget.room` relies on."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        sol, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
        coef[active] = sol
        negative = [j for j in active if j > 0 and coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))


class SloBudget:
    """Sizes every prefill chunk so the step's predicted time stays under the TBT SLO.

    Before each prefill chunk is added, the step it would make (the decodes and chunks already
    in it plus this one) is predicted with a linear `StepTimeModel` and multiplied by the model's
    recent error; the chunk gets the largest size whose prediction is within `aim * SLO`.
    Asking per chunk, before the step, is what `FeedbackBudget` cannot do: it only reacts to
    steps that already ran long, starting from the static budget, so a burst overshoots first.

    - The model starts from `prior` (the start-up or `tandem profile` fit): its predictions over
      a grid of step shapes stay in the refit as `prior_weight` observations' worth of samples,
      so a few noisy steps cannot wreck it, and feature directions the live load never varies
      keep the profiled cost.
    - Every `refit_every` steps with decodes it refits on the prior plus the last `window`
      measured steps (non-negative marginal costs, relative error), so a machine that runs
      slower (or faster) than its profile is learned within a few hundred steps.
    - Residual correction: predictions are multiplied by the `quantile` of measured/predicted
      over the last `residual_window` steps with decodes *and prefill* -- the steps whose size a
      room chose. Decode-only steps are left out: they are many and short, a few ms of hiccup is
      a large ratio there, and their tail would scale down every chunk's prediction (measured:
      smaller chunks over more steps, a worse TTFT than a static budget with the same P99).
      Aiming under the SLO by the model's own recent tail error covers the noise the linear
      model cannot explain; the factor can go below 1 when the model overpredicts. Until
      `min_residuals` steps are measured it is 1.
    - Steps without a running decode are not capped (up to `value`): no token is waiting on
      them, the same reasoning as sarathi's `idle_token_budget`.
    - Infeasible steps: when the decodes alone are predicted over the SLO, counted in
      `infeasible_steps`. Decodes are never paused (stall-free), so the SLO is lost for such a
      step anyway; prefill then gets no tokens, except one chunk of `tile` tokens after every
      `starve_every` infeasible steps without prefill, so waiting prompts still progress (and
      running requests finish and free the load) instead of starving while decodes stay heavy.

    `value` (the step's token ceiling) is `max_budget`: the SLO, not a token count, limits steps.
    """

    per_chunk = True

    def __init__(self, prior: StepTimeModel, tbt_slo_s: float, max_budget: int, tile: int,
                 aim: float = 0.95, quantile: float = 0.95, residual_window: int = 128,
                 min_residuals: int = 8, window: int = 512, refit_every: int = 16,
                 prior_weight: float = 32.0, starve_every: int = 4) -> None:
        if not tbt_slo_s > 0:
            raise ValueError(f"tbt_slo_s must be > 0, got {tbt_slo_s!r}")
        if not 0 < aim <= 1:
            raise ValueError(f"aim must be in (0, 1], got {aim!r}")
        if not 0 < quantile <= 1:
            raise ValueError(f"quantile must be in (0, 1], got {quantile!r}")
        self.tbt_slo_s, self.target = tbt_slo_s, aim * tbt_slo_s
        self.value, self.tile = max_budget, tile
        self.quantile, self.min_residuals = quantile, min_residuals
        self.refit_every, self.starve_every = refit_every, starve_every
        prior_rows = prior_samples(prior)
        self._prior_x = np.array([s.features.vector() for s in prior_rows])
        self._prior_y = np.array([s.step_time for s in prior_rows])
        self._prior_w = np.full(len(prior_rows), prior_weight / len(prior_rows))
        self._x: deque[list[float]] = deque(maxlen=window)
        self._y: deque[float] = deque(maxlen=window)
        self._res_x: deque[list[float]] = deque(maxlen=residual_window)
        self._res_y: deque[float] = deque(maxlen=residual_window)
        self._since_fit = 0
        self._refit()
        self.correction = 1.0
        """Multiplier of predictions: the `quantile` of measured/predicted of recent steps."""
        self.infeasible_steps = 0
        self._starved = 0
        """Infeasible steps in a row that carried no prefill."""

    @property
    def model(self) -> StepTimeModel:
        return StepTimeModel(self._coef.tolist())

    def predict(self, features: StepFeatures) -> float:
        """Corrected seconds of a step with `features`."""
        return float(np.dot(self._coef, features.vector())) * self.correction

    def room(self, step: StepFeatures, start: int) -> int:
        """Largest n such that the step `step` plus a chunk of n tokens from `start` is predicted
        within the target (0 if none is). The prediction is quadratic in n with non-negative
        coefficients (monotone), so the root is exact up to float rounding, fixed by checking."""
        if step.decodes == 0:
            return self.value
        if self.predict(step.decodes_only()) > self.target:
            # decodes alone miss the SLO: only the anti-starvation tile (see the class docstring)
            if self._starved >= self.starve_every:
                return max(0, self.tile - step.prefill_tokens)
            return 0
        c = self._coef * self.correction
        base = self.predict(step) + c[5] - self.target   # the chunk is one more sequence
        lin, quad = c[1] + c[4] * start, c[4] / 2
        if base > 0:
            return 0
        if quad > 0:
            n = (-lin + np.sqrt(lin * lin - 4 * quad * base)) / (2 * quad)
        elif lin > 0:
            n = -base / lin
        else:
            return self.value
        n = int(min(n, self.value))
        while n > 0 and self.predict(step.with_chunk(n, start)) > self.target:
            n -= 1
        while n < self.value and self.predict(step.with_chunk(n + 1, start)) <= self.target:
            n += 1
        return n

    def chunk_room(self, chunks: list, start: int) -> int:
        return self.room(StepFeatures.of(chunks), start)

    def observe(self, stats: IterationStats) -> None:
        f = stats.features
        if f.decodes == 0:
            return   # nobody waited on this step: neither the SLO nor its model's tail matters
        if self.predict(f.decodes_only()) > self.target:
            self.infeasible_steps += 1
            self._starved = 0 if f.prefill_tokens else self._starved + 1
        else:
            self._starved = 0
        row = f.vector()
        self._x.append(row)
        self._y.append(stats.step_time)
        if f.prefill_tokens:   # the steps a room sized (see the class docstring)
            self._res_x.append(row)
            self._res_y.append(stats.step_time)
        self._since_fit += 1
        if self._since_fit >= self.refit_every:
            self._refit()
        self._update_correction()

    def _refit(self) -> None:
        x = np.vstack([self._prior_x, np.array(self._x).reshape(-1, self._prior_x.shape[1])])
        y = np.concatenate([self._prior_y, np.array(self._y)])
        w = np.concatenate([self._prior_w, np.ones(len(self._y))])
        # relative error, as `StepTimeModel.fit`: a decode-only step matters as much as a long one
        self._coef = fit_nonnegative(x, y, w / np.maximum(y, 1e-6))
        self._since_fit = 0

    def _update_correction(self) -> None:
        if len(self._res_y) < self.min_residuals:
            return
        predicted = np.maximum(np.array(self._res_x) @ self._coef, 1e-6)
        ratio = np.array(self._res_y) / predicted
        self.correction = float(np.quantile(ratio, self.quantile))


def samples_from_trace(rows: Iterable[dict]) -> list[ProfileSample]:
    """Profile samples from a replica's step telemetry (`tandem serve --trace-file`): every step
    that computed something, timed as the serving loop ran it -- in the server process, beside
    the gateway and its clients, detokenizing included -- which a grid profiled in isolation
    does not see. Rows are `IterationStats` records (plus the `replica` that wrote them); rows
    from replicas that did not record step features (`decode_context`, `prefill_attention`)
    cannot be fitted and are refused by name."""
    names = {f.name for f in fields(IterationStats)}
    samples = []
    for row in rows:
        if "decode_context" not in row:
            raise ValueError(f"trace row of iteration {row.get('iteration')!r} has no step features "
                             "(decode_context, prefill_attention): written by an older replica")
        stats = IterationStats(**{k: v for k, v in row.items() if k in names})
        if stats.num_seqs:
            samples.append(ProfileSample(stats.features, stats.step_time))
    return samples
