"""How close the `profiled` simulator comes to the real server: `tandem sim fidelity DIR`.

DIR holds a recorded run (tests/fixtures/sim_fidelity/record.sh writes one): `setup.json` (the
engine, the policies and the workload served), `profile.json` (`tandem profile` of that engine),
`workload.jsonl` (the requests, with their arrival times), and per policy `bench-<policy>.json`
(`tandem bench` against `tandem serve`) and `probe-<policy>.json` (a light probe of short
prompts). The simulator replays the same workload on one replica with the same scheduler
configuration and the profile's step-time model, and adds the gateway's per-token delay: the
probe's median TTFT minus the profiled time of the probe's own prefill step (what a token spends
between the replica's step end and the client: output framing, ZeroMQ, the gateway, HTTP).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.report import summarize
from bench.workload import load_jsonl_trace
from scheduler.budget import StepFeatures
from scheduler.config import SchedulerConfig
from sim.cluster import Cluster
from sim.cost import ProfiledCost
from sim.replica import SimReplica

METRICS = (("ttft_s", "p50"), ("ttft_s", "p99"), ("tbt_s", "p50"), ("tbt_s", "p99"))


@dataclass(frozen=True)
class Comparison:
    policy: str
    metric: str
    """e.g. "tbt_s.p99"."""
    real: float
    sim: float

    @property
    def error(self) -> float:
        """Relative error of the simulation, (sim - real) / real."""
        return (self.sim - self.real) / self.real


def scheduler_config(setup: dict, policy: str) -> SchedulerConfig:
    engine, flags = setup["engine"], dict(setup["policies"][policy])
    return SchedulerConfig(policy=flags.pop("scheduler"), max_model_len=engine["max_model_len"],
                           max_num_seqs=engine["max_num_seqs"], block_size=engine["block_size"],
                           **flags)


def gateway_delay_s(cost: ProfiledCost, probe: dict, prompt_tokens: int) -> float:
    """Per-token delay outside the replica's step: probe TTFT (P50) minus its prefill step."""
    step = cost.model.predict(StepFeatures.uniform(prompt_tokens, 0, 0))
    return max(0.0, probe["ttft_s"]["p50"] - step)


def compare(run_dir: str | Path) -> tuple[list[Comparison], dict[str, float]]:
    """Simulate every recorded policy; returns the comparisons and each policy's gateway delay."""
    d = Path(run_dir)
    setup = json.loads((d / "setup.json").read_text())
    cost = ProfiledCost.from_json(d / "profile.json")
    workload = load_jsonl_trace(d / "workload.jsonl")
    t0 = workload[0].arrival_s
    requests = [(r.arrival_s - t0, r.prompt_tokens, r.output_tokens) for r in workload]
    rows, delays = [], {}
    for policy in setup["policies"]:
        real = json.loads((d / f"bench-{policy}.json").read_text())
        probe = json.loads((d / f"probe-{policy}.json").read_text())
        delay = delays[policy] = gateway_delay_s(cost, probe, setup["probe"]["prompt_len"])
        replica = SimReplica("hybrid-0", "hybrid", scheduler_config(setup, policy),
                             setup["engine"]["num_kv_blocks"], cost)
        result = Cluster([replica], token_delay_s=delay).run(requests)
        sim = summarize(result.run, None, include_requests=False)
        if sim["num_errors"] or real["num_errors"]:
            raise ValueError(f"{policy}: {real['num_errors']} real and {sim['num_errors']} "
                             f"simulated requests failed; the comparison needs all of them")
        for group, q in METRICS:
            rows.append(Comparison(policy, f"{group}.{q}", real[group][q], sim[group][q]))
    return rows, delays


def format_comparison(rows: list[Comparison], delays: dict[str, float]) -> str:
    lines = [f"{'policy':<8} {'metric':<10} {'real ms':>9} {'sim ms':>9} {'error':>7}"]
    for r in rows:
        lines.append(f"{r.policy:<8} {r.metric:<10} {r.real * 1e3:>9.1f} {r.sim * 1e3:>9.1f} "
                     f"{r.error:>+7.1%}")
    lines.append("gateway per-token delay (probe TTFT - profiled step): " +
                 ", ".join(f"{p} {v * 1e3:.1f} ms" for p, v in delays.items()))
    return "\n".join(lines)

