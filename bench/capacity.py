"""Capacity: the largest request rate a server sustains within a latency SLO (Sarathi-Serve's
definition: P99 time between tokens <= the TBT SLO and median scheduling delay <= 2 s).

Scheduling delay is not visible to a client; the proxy for a load run is the median TTFT (scheduling
delay plus the prefill time), so its check is slightly stricter than the paper's. A trial that
measured the delay itself (`TrialResult.p50_sched_delay_s`, e.g. from a simulator) is judged on that
instead. Requests that fail (timeouts, 429/503, ...) beyond `max_error_fraction` also fail a trial.

`find_capacity` is a pure search over a `run_trial(qps) -> TrialResult` callable: double the rate
from `start_qps` until a trial fails (or halve it until one passes), then bisect between the highest
passing and the lowest failing rate until they are within the tolerance. Capacity is the highest
passing rate. Tests drive it with a fake `run_trial`; `bench.cli` gives it real load runs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class CapacityCriteria:
    tbt_slo_s: float
    """Largest acceptable P99 time between tokens (pooled over the trial's requests)."""
    max_p50_ttft_s: float = 2.0
    """Largest acceptable median scheduling delay (the paper's 2 s): checked against the trial's
    median TTFT, its client-side proxy, unless the trial measured the delay itself."""
    max_error_fraction: float = 0.0
    """Largest acceptable share of failed requests in a trial."""

    def __post_init__(self) -> None:
        if not self.tbt_slo_s > 0:
            raise ValueError(f"tbt_slo_s must be > 0, got {self.tbt_slo_s}")
        if not self.max_p50_ttft_s > 0:
            raise ValueError(f"max_p50_ttft_s must be > 0, got {self.max_p50_ttft_s}")
        if not 0 <= self.max_error_fraction < 1:
            raise ValueError(f"max_error_fraction must be in [0, 1), got {self.max_error_fraction}")


@dataclass
class TrialResult:
    qps: float
    """Offered request rate of the trial."""
    p99_tbt_s: float | None
    """P99 of all inter-token gaps (None: no gaps measured)."""
    p50_ttft_s: float | None
    """Median TTFT of successful requests (None: none succeeded)."""
    num_requests: int = 0
    num_errors: int = 0
    passed: bool = False
    """Filled in by `judge`."""
    reason: str = ""
    """Why it failed (or "ok")."""
    summary: dict = field(default_factory=dict)
    """Full bench summary of the trial (without per-request data), when there is one."""
    p50_sched_delay_s: float | None = None
    """Median scheduling delay (arrival to first schedule), where the trial can see it (a
    simulator); `judge` then checks it instead of the TTFT proxy. None: not measured."""

    def to_dict(self) -> dict:
        return asdict(self)


def judge(t: TrialResult, c: CapacityCriteria) -> TrialResult:
    """Set `passed` and `reason` of `t` from the criteria."""
    why = []
    if t.num_requests and t.num_errors / t.num_requests > c.max_error_fraction:
        why.append(f"{t.num_errors}/{t.num_requests} requests failed")
    # The measured delay, when there is one, is the paper's criterion; TTFT only stands in for it.
    delay, name = ((t.p50_sched_delay_s, "P50 scheduling delay") if t.p50_sched_delay_s is not None
                   else (t.p50_ttft_s, "P50 TTFT"))
    if delay is None:
        why.append("no successful request")
    elif delay > c.max_p50_ttft_s:
        why.append(f"{name} {delay:.3f} s > {c.max_p50_ttft_s:g} s")
    if t.p99_tbt_s is not None and t.p99_tbt_s > c.tbt_slo_s:
        why.append(f"P99 TBT {t.p99_tbt_s * 1000:.1f} ms > {c.tbt_slo_s * 1000:g} ms")
    t.passed, t.reason = not why, "; ".join(why) or "ok"
    return t


@dataclass
class CapacityResult:
    capacity_qps: float | None
    """Highest passing rate (None: even the lowest rate tried failed)."""
    status: str
    """"found" (bracketed and bisected), "max_qps" (never failed up to max_qps), "below_min"
    (failed down to min_qps), or "max_trials" (stopped by the trial budget)."""
    lo_qps: float | None
    """Highest passing rate."""
    hi_qps: float | None
    """Lowest failing rate above it."""
    trials: list[TrialResult]

    def to_dict(self) -> dict:
        return {"capacity_qps": self.capacity_qps, "status": self.status, "lo_qps": self.lo_qps,
                "hi_qps": self.hi_qps, "trials": [t.to_dict() for t in self.trials]}


def find_capacity(run_trial: Callable[[float], TrialResult], *, start_qps: float = 1.0,
                  min_qps: float = 0.05, max_qps: float = 256.0, tolerance: float = 0.1,
                  max_trials: int = 20,
                  on_trial: Callable[[TrialResult], None] | None = None) -> CapacityResult:
    """Bracket then bisect. `run_trial(qps)` must return a judged `TrialResult` (`passed` set).
    Stops when hi - lo <= tolerance * lo (relative tolerance) or after `max_trials` trials."""
    if not 0 < min_qps <= start_qps <= max_qps:
        raise ValueError(f"need 0 < min_qps <= start_qps <= max_qps, got {min_qps}, {start_qps}, {max_qps}")
    if not tolerance > 0 or max_trials < 1:
        raise ValueError(f"need tolerance > 0 and max_trials >= 1, got {tolerance}, {max_trials}")
    trials: list[TrialResult] = []

    def trial(qps: float) -> bool:
        t = run_trial(qps)
        trials.append(t)
        if on_trial is not None:
            on_trial(t)
        return t.passed

    def out(status: str) -> CapacityResult:
        return CapacityResult(lo, status, lo, hi, trials)

    lo: float | None = None
    hi: float | None = None
    q = start_qps
    # bracket upwards from a passing rate, or downwards from a failing one
    if trial(q):
        lo = q
        while hi is None:
            if lo >= max_qps:
                return out("max_qps")
            if len(trials) >= max_trials:
                return out("max_trials")
            q = min(lo * 2, max_qps)
            if trial(q):
                lo = q
            else:
                hi = q
    else:
        hi = q
        while lo is None:
            if hi <= min_qps:
                return out("below_min")
            if len(trials) >= max_trials:
                return out("max_trials")
            q = max(hi / 2, min_qps)
            if trial(q):
                lo = q
            else:
                hi = q
    # bisect
    while hi - lo > tolerance * lo:
        if len(trials) >= max_trials:
            return out("max_trials")
        q = (lo + hi) / 2
        if trial(q):
            lo = q
        else:
            hi = q
    return out("found")
