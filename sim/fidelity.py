"""How close the `profiled` simulator comes to the real server: `tandem sim fidelity DIR`.

DIR holds a recorded run (tests/fixtures/sim_fidelity/record.sh writes one):
  - `setup.json`: the engine, the policies and the workloads served;
  - calibration runs per policy, before and after the evaluated one:
    `cal-<tag>-steps-<policy>.jsonl.gz` (the server's per-step telemetry) and
    `cal-<tag>-bench-<policy>.json` (`tandem bench` of it);
  - `profile.json.gz`: the `StepTimeModel` samples, fitted on the calibration steps
    (`tandem profile --from-trace`);
  - `workload.jsonl` (the evaluated requests, with their arrival times) and per policy
    `bench-<policy>.json` (`tandem bench` of `tandem serve` serving it).
Everything the simulator is given comes from the calibration runs; the evaluated run is only
compared against.

The simulator replays the workload on one replica with the same scheduler configuration and the
profile's step-time model, plus what the calibration runs measured around it:
  - the gateway's two delays (`gateway_delays`), read by aligning the calibration bench's
    request times with the server's step records (same machine, same wall clock);
  - the step-time variation (`sim.noise.StepVariation`): each simulated step is the model's time
    times a factor replayed from the calibration steps, so the simulation is run with `seeds`
    seeds and each percentile is the median over them (with their range). The noiseless
    simulation is reported beside it.
"""
from __future__ import annotations

import bisect
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from bench.report import summarize
from bench.workload import load_jsonl_trace
from scheduler.config import SchedulerConfig
from scheduler.telemetry import read_step_trace
from sim.cluster import Cluster
from sim.cost import ProfiledCost
from sim.noise import StepVariation
from sim.replica import SimReplica

METRICS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("tbt_s", "p50"), ("tbt_s", "p99"))
DEFAULT_SEEDS = 16
PROFILE = "profile.json.gz"
"""The recorded run's profile (`tandem profile --from-trace` of its calibration steps)."""


@dataclass(frozen=True)
class Comparison:
    policy: str
    metric: str
    """e.g. "tbt_s.p99"."""
    real: float
    sim: float
    """Median over the seeds of the simulation with step-time variation."""
    sim_low: float
    """Lowest of the seeds."""
    sim_high: float
    """Highest of the seeds."""
    sim_fixed: float
    """The simulation without variation (every step the model's time)."""

    @property
    def error(self) -> float:
        """Relative error of the simulation, (sim - real) / real."""
        return (self.sim - self.real) / self.real

    @property
    def fixed_error(self) -> float:
        """The same for the simulation without variation."""
        return (self.sim_fixed - self.real) / self.real


@dataclass(frozen=True)
class GatewayDelays:
    arrival_s: float
    """Median, request sent -> the idle replica starts the step that takes it."""
    token_s: float
    """Median, end of the step that produced a first token -> the client has it."""


def scheduler_config(setup: dict, policy: str) -> SchedulerConfig:
    engine, flags = setup["engine"], dict(setup["policies"][policy])
    return SchedulerConfig(policy=flags.pop("scheduler"), max_model_len=engine["max_model_len"],
                           max_num_seqs=engine["max_num_seqs"], block_size=engine["block_size"],
                           **flags)


def gateway_delays(runs: list[tuple[dict, list[dict]]]) -> GatewayDelays:
    """The gateway's delays, from `(tandem bench JSON, that server's step records)` pairs, pooled.
    Token: each request's first token at the client minus the end of the latest prefill-carrying
    step before it. Arrival: for requests sent while the replica was idle (no step in progress),
    the next step's start minus the send."""
    token, arrival = [], []
    for bench, steps in runs:
        ends = [s["time"] for s in steps]
        t0 = bench["started_at"]
        for r in bench["requests"]:
            if r.get("ttft_s") is None or r.get("send_s") is None:
                continue
            sent = t0 + r["send_s"]
            first = sent + r["ttft_s"]
            i = bisect.bisect_right(ends, first) - 1
            while i >= 0 and steps[i]["num_prefill_tokens"] == 0:
                i -= 1
            if i >= 0:
                token.append(first - ends[i])
            j = bisect.bisect_right(ends, sent)
            if j < len(steps):
                start = ends[j] - steps[j]["step_time"]
                if start >= sent and steps[j]["num_prefill_tokens"]:
                    arrival.append(start - sent)
    if not token or not arrival:
        raise ValueError("the calibration bench and step records do not overlap in time")
    return GatewayDelays(statistics.median(arrival), statistics.median(token))


def calibration_runs(run_dir: Path, policy: str) -> list[tuple[dict, list[dict]]]:
    """`policy`'s calibration runs in `run_dir`: (bench JSON, step records) per
    cal-<tag>-bench-<policy>.json / cal-<tag>-steps-<policy>.jsonl.gz pair."""
    runs = []
    for bench in sorted(run_dir.glob(f"cal-*-bench-{policy}.json")):
        steps = bench.with_name(bench.name.replace("-bench-", "-steps-")).with_suffix(".jsonl.gz")
        runs.append((json.loads(bench.read_text()), read_step_trace(steps)))
    if not runs:
        raise ValueError(f"no calibration run of {policy} (cal-*-bench-{policy}.json) in {run_dir}")
    return runs


def compare(run_dir: str | Path, seeds: int = DEFAULT_SEEDS
            ) -> tuple[list[Comparison], dict[str, GatewayDelays]]:
    """Simulate every recorded policy; returns the comparisons and each policy's gateway delays
    (measured on that policy's calibration runs)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    d = Path(run_dir)
    setup = json.loads((d / "setup.json").read_text())
    cost = ProfiledCost.from_json(d / PROFILE)
    workload = load_jsonl_trace(d / "workload.jsonl")
    t0 = workload[0].arrival_s
    requests = [(r.arrival_s - t0, r.prompt_tokens, r.output_tokens) for r in workload]
    calibration = {p: calibration_runs(d, p) for p in setup["policies"]}
    variation = StepVariation.from_trace([steps for runs in calibration.values() for _, steps in runs],
                                         cost.model)
    rows, delays = [], {}
    for policy in setup["policies"]:
        real = json.loads((d / f"bench-{policy}.json").read_text())
        delay = delays[policy] = gateway_delays(calibration[policy])
        config = scheduler_config(setup, policy)

        def simulate(seed: int | None) -> dict:
            replica = SimReplica("hybrid-0", "hybrid", config, setup["engine"]["num_kv_blocks"], cost,
                                 noise=None if seed is None else variation.sampler(seed))
            result = Cluster([replica], token_delay_s=delay.token_s,
                             arrival_delay_s=delay.arrival_s).run(requests)
            return summarize(result.run, None, include_requests=False)

        fixed = simulate(None)
        noisy = [simulate(seed) for seed in range(seeds)]
        failed = max(s["num_errors"] for s in [fixed, *noisy])
        if failed or real["num_errors"]:
            raise ValueError(f"{policy}: {real['num_errors']} real and {failed} "
                             f"simulated requests failed; the comparison needs all of them")
        for group, q in METRICS:
            values = [s[group][q] for s in noisy]
            rows.append(Comparison(policy, f"{group}.{q}", real[group][q], statistics.median(values),
                                   min(values), max(values), fixed[group][q]))
    return rows, delays


def format_comparison(rows: list[Comparison], delays: dict[str, GatewayDelays]) -> str:
    lines = [f"{'policy':<8} {'metric':<10} {'real ms':>9} {'sim ms':>9} {'error':>7} "
             f"{'seeds range':>15} {'no variation':>15}"]
    for r in rows:
        lines.append(f"{r.policy:<8} {r.metric:<10} {r.real * 1e3:>9.1f} {r.sim * 1e3:>9.1f} "
                     f"{r.error:>+7.1%} {r.sim_low * 1e3:>7.1f}-{r.sim_high * 1e3:<7.1f} "
                     f"{r.sim_fixed * 1e3:>7.1f} ({r.fixed_error:+.0%})")
    lines.append("gateway delays (calibration runs): " + ", ".join(
        f"{p} arrival {v.arrival_s * 1e3:.1f} ms, token {v.token_s * 1e3:.1f} ms"
        for p, v in delays.items()))
    return "\n".join(lines)
