"""`tandem sim paper` (or `python -m sim.paper`): the simulator against Sarathi-Serve's headline
results, written for docs/sim-results.md.

Experiments (`--only` picks some), all on the roofline cost model (`sim.cost.RooflineCost`):
  capacity     Mistral-7B on 1 x A100-80GB, P99 TBT SLO 100 ms: capacity of sarathi (token budget
               512) and vllm (whole prompts, max_batched_tokens = max_model_len 16384), batch 128,
               on the 4k-filtered arXiv trace and on the paper-length synthetic arXiv workload; and
               the step times behind them (decode-only, budget-512 hybrid, whole prefills).
  sensitivity  The sarathi / vllm capacity ratio with each roofline constant halved and doubled.
  yi34b        Yi-34B, TP2 over NVLink on 2 x A100-80GB, P99 TBT SLO 200 ms: the same ratio.
  ablation     hybrid_only vs chunked_only vs sarathi at fixed loads: P50/P99 TTFT and TBT.
  pp           TP4+PP2 vs TP8 across two nodes; runs only where the cost model has pipeline
               parallelism (`RooflineCost(pp=...)`), else it is recorded as not run.

The capacity search is `bench.capacity.find_capacity` with the paper's criteria (pooled P99 TBT
<= SLO, median scheduling delay <= 2 s, as `tandem sim capacity`), Poisson arrivals, one seed:
the same requests at every rate. Each experiment writes docs/data/sim/paper-<name>.json (every
number the page quotes, the trials behind each capacity, wall time and simulated requests per
second) and a PNG beside it, and prints its table.

No constant here is tuned to the paper: the efficiencies are sim/cost.py's, the paper's numbers
(`PAPER`) are only printed beside ours.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRACE_NAME = "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv"
DEFAULT_TRACE = ROOT.parent / "shared" / "traces" / TRACE_NAME
"""Where the shared traces sit beside a checkout (read in place, never copied into the repo)."""
DEFAULT_OUT = ROOT / "docs" / "data" / "sim"
EXPERIMENTS = ("capacity", "sensitivity", "yi34b", "ablation", "pp")

PAPER = {
    "mistral_7b_ratio": 2.6,
    "yi_34b_ratio": 3.7,
}
"""Sarathi-Serve's abstract: capacity up to 2.6x vLLM's for Mistral-7B on one A100 and 3.7x for
Yi-34B on two, under its SLOs (the cell each comes from is not restated here)."""

SENSITIVITY = {"e_gemm": "E_GEMM", "e_attn": "E_ATTN", "e_mem": "E_MEM",
               "host_step_s": "HOST_STEP_S", "host_seq_s": "HOST_SEQ_S"}
"""RooflineCost argument -> the sim/cost.py constant it defaults to."""
SENSITIVITY_FACTORS = (0.5, 2.0)

DECODE_BATCHES = (32, 64, 128)
HYBRID_BUDGET = 512


@dataclass(frozen=True)
class Deployment:
    """One replica of the experiments: model, GPUs, parallelism, SLO and scheduler limits."""

    model: str
    """A key of sim/specs.py MODELS."""
    device: str = "a100-80gb"
    """A key of sim/specs.py DEVICES (per GPU)."""
    tp: int = 1
    """Tensor-parallel GPUs (per pipeline stage)."""
    tbt_slo_ms: float = 100.0
    """P99 TBT SLO of the capacity search (the paper's strict SLO for the model)."""
    max_num_seqs: int = 128
    """Sarathi-Serve's capacity configs: batch 128 for vllm and sarathi."""
    max_model_len: int = 16384
    """max_seq_len of the paper's arXiv runs; vllm's max_batched_tokens is the same."""
    pp: int = 1
    """Pipeline stages, each of `tp` GPUs."""
    tp_link: str | None = None
    """Link of the TP all-reduces (None: the device's own GPU link)."""
    pp_link: str | None = None
    """Link between pipeline stages (None: the device's own GPU link)."""
    link_latency_s: float | None = None
    """A probe: this latency instead of sim/specs.py's for tp_link and pp_link."""


MISTRAL = Deployment("mistral-7b")
YI = Deployment("yi-34b", tp=2, tbt_slo_ms=200.0)


@dataclass(frozen=True)
class PaperConfig:
    num_requests: int = 2048
    """Requests per capacity trial (the paper's 2048)."""
    sensitivity_requests: int = 512
    """Requests per trial in the sensitivity sweep: 44 searches, so a quarter of the paper's 2048
    keeps the sweep to about 15 minutes on two shared cores; its baseline rows use the same number
    (so each row compares like with like)."""
    tolerance: float = 0.025
    """Capacity search: stop when the failing rate is within this fraction above the passing one."""
    max_trials: int = 24
    """Most trials of one capacity search (`tandem sim capacity`'s default)."""
    start_qps: float = 1.0
    """First rate of each capacity search."""
    seed: int = 0
    """Seed of every workload (arrivals and lengths): the same requests at every rate."""
    trace_csv: str | None = None
    """The 4k-filtered arXiv trace; None: DEFAULT_TRACE if present, else the synthetic `arxiv`."""
    out_dir: str = str(DEFAULT_OUT)
    """Where paper-<experiment>.json and .png are written."""
    experiments: tuple[str, ...] = EXPERIMENTS
    """Which of EXPERIMENTS to run, in this order."""
    sensitivity_constants: tuple[str, ...] = tuple(SENSITIVITY)
    """RooflineCost arguments the sensitivity sweep varies (keys of SENSITIVITY)."""
    ablation_qps: tuple[float, ...] = (1.0, 2.0)
    """Fixed loads of the Mistral-7B ablation (4k trace): about 1/4 and 1/2 of sarathi's simulated
    capacity there, and 1x and 2x vllm's."""
    run_requests: int = 2048
    """Requests of each fixed-load run (the Mistral-7B ablation, the PP runs)."""
    table6_requests: int = 128
    """The paper's own ablation (Table 6): Yi-34B TP2, 128 requests at 0.5 qps on arXiv."""
    table6_qps: float = 0.5
    """Rate of the Table 6 runs (the paper's, for arXiv)."""
    plots: bool = True
    """Write a PNG per experiment (needs matplotlib; skipped with a note without it)."""

    def __post_init__(self) -> None:
        bad = set(self.experiments) - set(EXPERIMENTS)
        if bad:
            raise ValueError(f"unknown experiment(s) {sorted(bad)}; known: {EXPERIMENTS}")
        bad = set(self.sensitivity_constants) - set(SENSITIVITY)
        if bad:
            raise ValueError(f"unknown constant(s) {sorted(bad)}; known: {sorted(SENSITIVITY)}")
        for name in ("num_requests", "sensitivity_requests", "run_requests", "table6_requests",
                     "max_trials"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---- workloads ---------------------------------------------------------------------------------

def workloads(cfg: PaperConfig) -> dict[str, tuple[object, str]]:
    """name -> (WorkloadConfig without num_requests, where its lengths come from)."""
    from bench.workload import WorkloadConfig

    trace = Path(cfg.trace_csv) if cfg.trace_csv else DEFAULT_TRACE
    if trace.is_file():
        w4k = WorkloadConfig(seed=cfg.seed, length_dist="trace", trace_csv=str(trace))
        src = f"trace file {trace.name}"
    elif cfg.trace_csv:
        raise ValueError(f"--trace-csv {cfg.trace_csv}: no such file")
    else:
        w4k = WorkloadConfig(seed=cfg.seed, length_dist="arxiv")
        src = f"synthetic `arxiv` lengths ({TRACE_NAME} not found)"
    return {"arxiv-4k": (w4k, src),
            "arxiv-paper": (WorkloadConfig(seed=cfg.seed, length_dist="arxiv-paper"),
                            "synthetic `arxiv-paper` lengths (the paper's statistics, as recalled)")}


# ---- one simulated replica ---------------------------------------------------------------------

def roofline(dep: Deployment, **constants):
    from sim.cost import RooflineCost
    from sim.specs import get_device, get_link, get_model

    def link(name: str | None):
        if name is None:
            return None
        spec = get_link(name)
        return spec if dep.link_latency_s is None else replace(spec, latency_s=dep.link_latency_s)

    links = {"tp_link": link(dep.tp_link)}
    if dep.pp > 1:  # only where the cost model has stages (see exp_pp)
        links.update(pp=dep.pp, pp_link=link(dep.pp_link))
    return RooflineCost(get_model(dep.model), get_device(dep.device), tp=dep.tp, **links, **constants)


def cluster_factory(dep: Deployment, policy: str, token_budget: int = HYBRID_BUDGET,
                    **constants) -> tuple[Callable, dict]:
    """A function making a fresh one-replica `Cluster`, and what it is (for the JSON)."""
    from scheduler.config import SchedulerConfig
    from sim.cluster import Cluster
    from sim.replica import SimReplica, num_kv_blocks
    from sim.specs import get_device, get_model

    cost = roofline(dep, **constants)
    stages = {"pp": dep.pp} if dep.pp > 1 else {}
    blocks = num_kv_blocks(get_model(dep.model), get_device(dep.device), dep.tp, **stages)
    extra = {}
    if "enable_prefix_caching" in {f.name for f in fields(SchedulerConfig)}:
        # The paper's requests share no prefixes, and the simulator's prompts are all token 0:
        # a prefix cache would make every prompt after the first a hit.
        extra["enable_prefix_caching"] = False
    config = SchedulerConfig(policy=policy, token_budget=token_budget, max_num_seqs=dep.max_num_seqs,
                             max_batched_tokens=dep.max_model_len, max_model_len=dep.max_model_len,
                             **extra)

    def make():
        return Cluster([SimReplica("r0", "hybrid", config, blocks, cost, None, dep.model)],
                       "round_robin", model_name=dep.model)

    return make, {"policy": policy, "token_budget": token_budget, "num_kv_blocks": blocks,
                  "max_num_seqs": dep.max_num_seqs, "max_model_len": dep.max_model_len,
                  "constants": constants}


@dataclass
class Counter:
    requests: int = 0
    wall_s: float = 0.0

    def add(self, requests: int, wall: float) -> None:
        self.requests += requests
        self.wall_s += wall

    @property
    def rate(self) -> float | None:
        return self.requests / self.wall_s if self.wall_s > 0 else None


def run_once(make: Callable, wcfg, qps: float, counter: Counter, slo_s: float | None = None) -> dict:
    """One simulated run: the latency figures the page uses, and what explains them: the share
    of token gaps over the SLO (`slo_s`), tokens sampled per step (about the decode batch), and
    the share of the run the replica was busy."""
    from bench.report import summarize
    from bench.workload import build_workload

    wl = build_workload(wcfg, qps)
    cluster = make()
    t0 = time.perf_counter()
    res = cluster.run((r.arrival_s, r.prompt_tokens, r.output_tokens) for r in wl)
    wall = time.perf_counter() - t0
    counter.add(len(wl), wall)
    s = summarize(res.run, None, include_requests=False)
    ttft, tbt = s["ttft_s"], s["tbt_s"]
    gaps = [g for r in res.run.requests if r.ok for g in r.itl_s]
    over = sum(g > slo_s for g in gaps) / len(gaps) if slo_s and gaps else None
    span = len(res.replicas) * res.end_time
    busy = sum(r.busy_s for r in res.replicas) / span if span else None
    return {"qps": qps, "num_requests": s["num_requests"], "num_errors": s["num_errors"],
            "achieved_qps": s["request_throughput"], "p50_ttft_s": ttft["p50"],
            "p99_ttft_s": ttft["p99"], "p50_tbt_s": tbt["p50"], "p99_tbt_s": tbt["p99"],
            "max_tbt_s": tbt["max"], "p50_sched_delay_s": res.p50_sched_delay_s,
            "num_steps": res.num_steps, "frac_tbt_over_slo": over,
            "sampled_per_step": s["output_tokens"] / res.num_steps if res.num_steps else None,
            "busy_fraction": busy, "sim_wall_s": wall,
            "sim_requests_per_s": len(wl) / wall if wall > 0 else None}


def capacity(dep: Deployment, policy: str, wcfg, num_requests: int, cfg: PaperConfig,
             counter: Counter, **constants) -> dict:
    """Capacity search of one scheduler on one workload."""
    from bench.capacity import CapacityCriteria, TrialResult, find_capacity, judge

    make, info = cluster_factory(dep, policy, **constants)
    wcfg = replace(wcfg, num_requests=num_requests)
    criteria = CapacityCriteria(tbt_slo_s=dep.tbt_slo_ms / 1000)
    rows: list[dict] = []
    mine = Counter()

    def trial(qps: float) -> TrialResult:
        r = run_once(make, wcfg, qps, mine, criteria.tbt_slo_s)
        t = judge(TrialResult(qps, r["p99_tbt_s"], r["p50_ttft_s"], r["num_requests"],
                              r["num_errors"], p50_sched_delay_s=r["p50_sched_delay_s"]), criteria)
        rows.append({**r, "passed": t.passed, "reason": t.reason})
        return t

    res = find_capacity(trial, start_qps=cfg.start_qps, max_qps=256.0, tolerance=cfg.tolerance,
                        max_trials=cfg.max_trials)
    counter.add(mine.requests, mine.wall_s)
    return {**info, "capacity_qps": res.capacity_qps, "status": res.status, "lo_qps": res.lo_qps,
            "hi_qps": res.hi_qps, "requests_per_trial": num_requests, "trials": rows,
            "sim_requests": mine.requests, "sim_wall_s": mine.wall_s,
            "sim_requests_per_s": mine.rate}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def compare(dep: Deployment, wcfg, num_requests: int, cfg: PaperConfig, counter: Counter,
            **constants) -> dict:
    """sarathi (budget 512) vs vllm capacity on one workload."""
    s = capacity(dep, "sarathi", wcfg, num_requests, cfg, counter, **constants)
    v = capacity(dep, "vllm", wcfg, num_requests, cfg, counter, **constants)
    return {"sarathi": s, "vllm": v, "ratio": _ratio(s["capacity_qps"], v["capacity_qps"])}


# ---- step times --------------------------------------------------------------------------------

def step_times(dep: Deployment, wcfg) -> dict:
    """Roofline step times at this workload's typical shapes: decode-only batches at the median
    context, budget-512 hybrid steps (a prompt chunk halfway through the median prompt plus
    decodes), and the whole-prompt prefills that stall vllm's decodes."""
    import numpy as np

    from bench.workload import build_workload

    wl = build_workload(replace(wcfg, num_requests=4096), 1.0)
    p = np.array([r.prompt_tokens for r in wl])
    o = np.array([r.output_tokens for r in wl])
    ctx = int(np.median(p) + np.median(o) / 2)
    cost = roofline(dep)
    mid = int(np.median(p) // 2)
    return {
        "prompt_p50": int(np.median(p)), "prompt_p90": int(np.percentile(p, 90)),
        "output_p50": int(np.median(o)), "decode_context": ctx,
        "decode_step_s": {str(b): cost.decode_step_time(b, ctx) for b in DECODE_BATCHES},
        "hybrid_step_s": {str(d): cost.prefill_step_time(HYBRID_BUDGET - d, mid, d, ctx)
                          for d in DECODE_BATCHES},
        "hybrid_chunk_context": mid,
        "prefill_step_s": {"p50": cost.prefill_step_time(int(np.median(p))),
                           "p90": cost.prefill_step_time(int(np.percentile(p, 90)))},
    }


# ---- experiments -------------------------------------------------------------------------------

def exp_capacity(cfg: PaperConfig, wls: dict, counter: Counter, dep: Deployment = MISTRAL,
                 paper_ratio: float = PAPER["mistral_7b_ratio"]) -> dict:
    cells = {}
    for name, (wcfg, src) in wls.items():
        cells[name] = {"workload_source": src, "steps": step_times(dep, wcfg),
                       **compare(dep, wcfg, cfg.num_requests, cfg, counter)}
    return {"deployment": asdict(dep), "paper_ratio": paper_ratio, "workloads": cells}


def exp_sensitivity(cfg: PaperConfig, wls: dict, counter: Counter) -> dict:
    import sim.cost as sc

    rows = []
    for name, (wcfg, src) in wls.items():
        base = compare(MISTRAL, wcfg, cfg.sensitivity_requests, cfg, counter)
        rows.append(_sens_row(name, None, 1.0, None, base))
        for arg in cfg.sensitivity_constants:
            default = getattr(sc, SENSITIVITY[arg])
            for f in SENSITIVITY_FACTORS:
                r = compare(MISTRAL, wcfg, cfg.sensitivity_requests, cfg, counter,
                            **{arg: default * f})
                rows.append(_sens_row(name, SENSITIVITY[arg], f, default * f, r))
    return {"deployment": asdict(MISTRAL), "requests_per_trial": cfg.sensitivity_requests,
            "factors": list(SENSITIVITY_FACTORS), "rows": rows}


def _sens_row(workload: str, constant: str | None, factor: float, value: float | None, r: dict) -> dict:
    def brief(c: dict) -> dict:
        return {k: c[k] for k in ("capacity_qps", "status", "lo_qps", "hi_qps", "sim_requests",
                                  "sim_wall_s")} | {"trials": len(c["trials"])}

    return {"workload": workload, "constant": constant, "factor": factor, "value": value,
            # an efficiency above 1 claims more than the peak: a probe of the model, not a machine
            "unphysical": constant is not None and constant.startswith("E_") and value > 1,
            "sarathi": brief(r["sarathi"]), "vllm": brief(r["vllm"]), "ratio": r["ratio"]}


ABLATION_POLICIES = (("hybrid_only", HYBRID_BUDGET), ("hybrid_only", 16384),
                     ("chunked_only", HYBRID_BUDGET), ("sarathi", HYBRID_BUDGET))
"""hybrid_only at 512 is ours (prompts never split; the first of a step goes whole past the
budget); at 16384 it is the paper's (Sarathi-Serve with chunk size = max_model_len)."""


def exp_ablation(cfg: PaperConfig, wls: dict, counter: Counter) -> dict:
    runs = []
    wcfg, src = wls["arxiv-4k"]
    for qps in cfg.ablation_qps:
        for policy, budget in ABLATION_POLICIES:
            make, _ = cluster_factory(MISTRAL, policy, budget)
            r = run_once(make, replace(wcfg, num_requests=cfg.run_requests), qps, counter,
                         MISTRAL.tbt_slo_ms / 1000)
            runs.append({"setup": "mistral-7b/arxiv-4k", "policy": policy, "token_budget": budget,
                         **r})
    wcfg, _ = wls["arxiv-paper"]
    for policy, budget in ABLATION_POLICIES:
        make, _ = cluster_factory(YI, policy, budget)
        r = run_once(make, replace(wcfg, num_requests=cfg.table6_requests), cfg.table6_qps, counter,
                     YI.tbt_slo_ms / 1000)
        runs.append({"setup": "yi-34b-tp2/arxiv-paper (Table 6)", "policy": policy,
                     "token_budget": budget, **r})
    return {"mistral": asdict(MISTRAL), "yi": asdict(YI), "arxiv_4k_source": src, "runs": runs}


PP_MODEL = "llama-2-70b"
PP_NODE_GPUS = 4
"""The paper's hybrid-parallel runs: two nodes of 4 A100s (Azure NC96ads v4) joined by 100 GbE."""
PP_BATCHES = (8, 32, 128)
"""max_num_seqs of the runs (the paper's Figure 8a sweeps 8..128)."""
PP_QPS = 0.25
"""Fixed load of the PP runs, below what TP8 sustains here (a short trial at 0.5 qps already had a
median TTFT over 2 s); the paper's 0.75 qps was Falcon-180B on ShareGPT."""
PP_SLOW_LATENCY_S = 300e-6
"""A probe, not a claim: 10x sim/specs.py's 100 GbE latency (30 us), the order of a collective
that crosses the network through a software stack (NCCL over TCP or RoCE) in several ring steps
rather than once over a bare wire."""


def pp_deployments() -> dict[str, Deployment]:
    """TP8 across the two nodes (every all-reduce crosses 100 GbE) against TP4 within a node and
    two pipeline stages, one per node, whose activations cross 100 GbE once per micro-batch."""
    base = Deployment(PP_MODEL, tbt_slo_ms=1000.0)
    tp8 = replace(base, tp=2 * PP_NODE_GPUS, tp_link="100gbe")
    tp4pp2 = replace(base, tp=PP_NODE_GPUS, pp=2, pp_link="100gbe")
    return {"tp8": tp8, "tp4-pp2": tp4pp2,
            "tp8 (latency x10)": replace(tp8, link_latency_s=PP_SLOW_LATENCY_S),
            "tp4-pp2 (latency x10)": replace(tp4pp2, link_latency_s=PP_SLOW_LATENCY_S)}


def exp_pp(cfg: PaperConfig, wls: dict, counter: Counter) -> dict:
    import inspect

    from sim.cost import RooflineCost

    if "pp" not in inspect.signature(RooflineCost).parameters:
        return {"ran": False, "why": "RooflineCost has no pipeline parallelism (pp) in this checkout"}
    wcfg, src = wls["arxiv-4k"]
    wcfg = replace(wcfg, num_requests=cfg.run_requests)
    runs = []
    for name, dep in pp_deployments().items():
        for policy in ("sarathi", "vllm"):
            for batch in PP_BATCHES if policy == "sarathi" else PP_BATCHES[-1:]:
                make, info = cluster_factory(replace(dep, max_num_seqs=batch), policy)
                r = run_once(make, wcfg, PP_QPS, counter)
                runs.append({"parallel": name, "policy": policy, "max_num_seqs": batch,
                             "num_kv_blocks": info["num_kv_blocks"], **r})
    return {"ran": True, "model": PP_MODEL, "qps": PP_QPS, "workload_source": src,
            "deployments": {k: asdict(v) for k, v in pp_deployments().items()}, "runs": runs}


RUNNERS = {"capacity": exp_capacity, "sensitivity": exp_sensitivity,
           "yi34b": lambda c, w, n: exp_capacity(c, w, n, YI, PAPER["yi_34b_ratio"]),
           "ablation": exp_ablation, "pp": exp_pp}


# ---- output ------------------------------------------------------------------------------------

def _git() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "sim", "scheduler", "bench"],
                               cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        return {"commit": head or None, "dirty_paths": dirty.splitlines()}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty_paths": []}


def _meta(cfg: PaperConfig, counter: Counter, wall: float, argv: list[str]) -> dict:
    import sim.cost as sc

    return {"command": "python -m sim.paper " + " ".join(argv), "config": asdict(cfg),
            "roofline_constants": {k: getattr(sc, k) for k in
                                   ("E_GEMM", "E_ATTN", "E_MEM", "E_LINK", "HOST_STEP_S", "HOST_SEQ_S")},
            "git": _git(), "wall_s": wall, "sim_requests": counter.requests,
            "sim_wall_s": counter.wall_s, "sim_requests_per_s": counter.rate,
            "paper": PAPER}


def _q(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f}"


def print_tables(name: str, d: dict) -> None:
    if name in ("capacity", "yi34b"):
        dep = d["deployment"]
        print(f"\n## {dep['model']} TP{dep['tp']} on {dep['device']}, P99 TBT <= {dep['tbt_slo_ms']:g} ms "
              f"(paper ratio ~{d['paper_ratio']}x)")
        print("| workload | sarathi-512 qps | vllm qps | ratio | trials | sim req/s |")
        print("|---|---|---|---|---|---|")
        for w, c in d["workloads"].items():
            s, v = c["sarathi"], c["vllm"]
            print(f"| {w} | {_q(s['capacity_qps'])} | {_q(v['capacity_qps'])} | {_q(c['ratio'])}x | "
                  f"{len(s['trials'])}+{len(v['trials'])} | "
                  f"{_q(s['sim_requests_per_s'], '.0f')}/{_q(v['sim_requests_per_s'], '.0f')} |")
        print("| workload | ctx | " + " | ".join(f"decode x{b} ms" for b in DECODE_BATCHES) + " | "
              + " | ".join(f"512: {b} dec ms" for b in DECODE_BATCHES)
              + " | prefill p50 ms | prefill p90 ms |")
        print("|---" * (4 + 2 * len(DECODE_BATCHES)) + "|")
        for w, c in d["workloads"].items():
            st = c["steps"]
            print(f"| {w} | {st['decode_context']} | "
                  + " | ".join(_ms(st["decode_step_s"][str(b)]) for b in DECODE_BATCHES) + " | "
                  + " | ".join(_ms(st["hybrid_step_s"][str(b)]) for b in DECODE_BATCHES)
                  + f" | {_ms(st['prefill_step_s']['p50'])} | {_ms(st['prefill_step_s']['p90'])} |")
    elif name == "sensitivity":
        print(f"\n## Sensitivity (Mistral-7B, 100 ms, {d['requests_per_trial']} requests per trial)")
        print("| workload | constant | x | value | sarathi qps | vllm qps | ratio |")
        print("|---|---|---|---|---|---|---|")
        for r in d["rows"]:
            flag = " (above peak)" if r["unphysical"] else ""
            print(f"| {r['workload']} | {r['constant'] or 'baseline'} | {r['factor']:g} | "
                  f"{'-' if r['value'] is None else format(r['value'], 'g')}{flag} | "
                  f"{_q(r['sarathi']['capacity_qps'])} | {_q(r['vllm']['capacity_qps'])} | "
                  f"{_q(r['ratio'])}x |")
    elif name == "ablation":
        print("\n## Ablation")
        print("| setup | qps | policy | budget | P50 TTFT s | P99 TTFT s | P50 TBT ms | P99 TBT ms | "
              "P50 sched delay s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in d["runs"]:
            print(f"| {r['setup']} | {r['qps']:g} | {r['policy']} | {r['token_budget']} | "
                  f"{_q(r['p50_ttft_s'])} | {_q(r['p99_ttft_s'])} | {_ms(r['p50_tbt_s'])} | "
                  f"{_ms(r['p99_tbt_s'])} | {_q(r['p50_sched_delay_s'])} |")
    elif name == "pp":
        if not d["ran"]:
            print(f"\n## PP: not run: {d['why']}")
            return
        print(f"\n## {d['model']} on 2 nodes x {PP_NODE_GPUS} GPUs (100 GbE), {d['qps']:g} qps")
        print("| parallel | policy | batch | P50 TBT ms | P99 TBT ms | P50 TTFT s | P50 sched delay s |")
        print("|---|---|---|---|---|---|---|")
        for r in d["runs"]:
            print(f"| {r['parallel']} | {r['policy']} | {r['max_num_seqs']} | {_ms(r['p50_tbt_s'])} | "
                  f"{_ms(r['p99_tbt_s'])} | {_q(r['p50_ttft_s'])} | {_q(r['p50_sched_delay_s'])} |")


# ---- plots -------------------------------------------------------------------------------------

def plot(name: str, d: dict, out: Path) -> list[str]:
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []

    def save(fig, stem: str) -> None:
        fig.tight_layout()
        path = out / f"paper-{stem}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(str(path))

    if name in ("capacity", "yi34b"):
        ws = list(d["workloads"])
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for i, w in enumerate(ws):
            c = d["workloads"][w]
            for j, pol in enumerate(("sarathi", "vllm")):
                q = c[pol]["capacity_qps"] or 0
                ax.bar(i + (j - 0.5) * 0.38, q, 0.38, color=("C0", "C1")[j],
                       label=pol if i == 0 else None)
            ax.text(i, max(c["sarathi"]["capacity_qps"] or 0, c["vllm"]["capacity_qps"] or 0) * 1.02,
                    f"{_q(c['ratio'])}x (paper ~{d['paper_ratio']}x)", ha="center", fontsize=8)
            for pol, mk in (("sarathi", "o"), ("vllm", "s")):
                tr = c[pol]["trials"]
                color = f"C{2 * i + (pol == 'vllm')}"
                ax2.scatter([t["qps"] for t in tr], [(t["p99_tbt_s"] or 0) * 1000 for t in tr],
                            marker=mk, facecolors=[color if t["passed"] else "none" for t in tr],
                            edgecolors=color, label=f"{pol} / {w}")
        dep = d["deployment"]
        ax.set_xticks(range(len(ws)), ws)
        ax.set_ylabel("capacity (requests/s)")
        ax.set_title(f"{dep['model']} TP{dep['tp']}, P99 TBT <= {dep['tbt_slo_ms']:g} ms")
        ax.legend()
        ax2.axhline(dep["tbt_slo_ms"], color="k", lw=0.8, ls="--")
        ax2.set_xscale("log")
        ax2.set_yscale("log")
        ax2.set_xlabel("offered rate (requests/s)")
        ax2.set_ylabel("pooled P99 TBT (ms)")
        ax2.set_title("capacity-search trials (hollow: failed)")
        ax2.legend(fontsize=7)
        save(fig, name)
    elif name == "sensitivity":
        ws = sorted({r["workload"] for r in d["rows"]})
        fig, axes = plt.subplots(1, len(ws), figsize=(5.5 * len(ws), 4), squeeze=False)
        for ax, w in zip(axes[0], ws):
            rows = [r for r in d["rows"] if r["workload"] == w]
            base = next(r["ratio"] for r in rows if r["constant"] is None)
            rest = [r for r in rows if r["constant"] is not None]
            labels = [f"{r['constant']} x{r['factor']:g}" for r in rest]
            ax.barh(range(len(rest)), [r["ratio"] or 0 for r in rest],
                    color=["C3" if r["unphysical"] else "C0" for r in rest])
            ax.axvline(base or 0, color="k", lw=1, label=f"baseline {_q(base)}x")
            ax.set_yticks(range(len(rest)), labels, fontsize=8)
            ax.set_xlabel("sarathi / vllm capacity")
            ax.set_title(f"{w} (red: efficiency above peak)")
            ax.legend(fontsize=8)
        save(fig, "sensitivity")
    elif name == "ablation":
        setups = list(dict.fromkeys((r["setup"], r["qps"]) for r in d["runs"]))
        fig, axes = plt.subplots(2, len(setups), figsize=(3.6 * len(setups), 6), squeeze=False)
        for k, (setup, qps) in enumerate(setups):
            rows = [r for r in d["runs"] if (r["setup"], r["qps"]) == (setup, qps)]
            names = [f"{r['policy']}\n{r['token_budget']}" for r in rows]
            x = range(len(rows))
            axes[0][k].bar([i - 0.2 for i in x], [r["p50_ttft_s"] or 0 for r in rows], 0.4, label="P50")
            axes[0][k].bar([i + 0.2 for i in x], [r["p99_ttft_s"] or 0 for r in rows], 0.4, label="P99")
            axes[0][k].set_title(f"{setup}\n{qps:g} qps: TTFT (s)", fontsize=8)
            for dx, key, label in ((-0.2, "p50_tbt_s", "P50"), (0.2, "p99_tbt_s", "P99")):
                axes[1][k].bar([i + dx for i in x], [(r[key] or 0) * 1000 for r in rows], 0.4, label=label)
            axes[1][k].set_title("TBT (ms)", fontsize=8)
            for ax in (axes[0][k], axes[1][k]):
                ax.set_xticks(list(x), names, fontsize=6)
                ax.set_yscale("log")
            axes[0][k].legend(fontsize=7)
        save(fig, "ablation")
    elif name == "pp" and d["ran"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for k, par in enumerate(d["deployments"]):
            rows = [r for r in d["runs"] if r["parallel"] == par and r["policy"] == "sarathi"]
            ax.plot([r["max_num_seqs"] for r in rows], [r["p50_tbt_s"] * 1000 for r in rows],
                    marker="o", color=f"C{k}", label=f"{par} sarathi-512")
            for r in d["runs"]:
                if r["parallel"] == par and r["policy"] == "vllm":
                    ax.scatter([r["max_num_seqs"]], [r["p50_tbt_s"] * 1000], marker="s",
                               color=f"C{k}", label=f"{par} vllm")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (max_num_seqs)")
        ax.set_ylabel("median TBT (ms)")
        ax.set_title(f"{d['model']}, 2 nodes x {PP_NODE_GPUS} A100 over 100 GbE, {d['qps']:g} qps")
        ax.legend(fontsize=8)
        save(fig, "pp")
    return files


# ---- driver ------------------------------------------------------------------------------------

def run(cfg: PaperConfig, argv: list[str] | None = None) -> dict[str, dict]:
    """Run the chosen experiments; write paper-<name>.json (and .png) into cfg.out_dir."""
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    wls = workloads(cfg)
    results = {}
    for name in cfg.experiments:
        counter = Counter()
        t0 = time.perf_counter()
        d = RUNNERS[name](cfg, wls, counter)
        wall = time.perf_counter() - t0
        d = {"kind": "sim-paper", "experiment": name, **d,
             "meta": _meta(cfg, counter, wall, argv if argv is not None else [])}
        print_tables(name, d)
        rate = counter.rate
        print(f"[{name}] {wall:.1f} s wall; simulated {counter.requests} requests in "
              f"{counter.wall_s:.1f} s: {'-' if rate is None else f'{rate:,.0f}'} requests/s",
              flush=True)
        d["meta"]["plots"] = plot(name, d, out) if cfg.plots else []
        d["meta"]["plots"] = [os.path.relpath(p, out) for p in d["meta"]["plots"]]
        (out / f"paper-{name}.json").write_text(json.dumps(d, indent=1) + "\n")
        results[name] = d
    return results


def add_paper_args(p: argparse.ArgumentParser) -> None:
    d = PaperConfig()
    p.add_argument("--only", default=",".join(EXPERIMENTS),
                   help=f"Comma-separated experiments (default all: {','.join(EXPERIMENTS)}).")
    p.add_argument("--out", default=d.out_dir,
                   help="Folder of the JSON and PNG files (default docs/data/sim).")
    p.add_argument("--trace-csv", default=None, metavar="PATH",
                   help=f"The 4k-filtered arXiv trace (default: {DEFAULT_TRACE} if present, else "
                        "synthetic `arxiv` lengths).")
    p.add_argument("--num-requests", type=int, default=d.num_requests, help="Requests per capacity trial.")
    p.add_argument("--sensitivity-requests", type=int, default=d.sensitivity_requests,
                   help="Requests per trial in the sensitivity sweep.")
    p.add_argument("--sensitivity-constants", default=",".join(d.sensitivity_constants),
                   help=f"RooflineCost arguments to vary (default all: {','.join(SENSITIVITY)}).")
    p.add_argument("--run-requests", type=int, default=d.run_requests,
                   help="Requests of each fixed-load run (ablation, pp).")
    p.add_argument("--table6-requests", type=int, default=d.table6_requests)
    p.add_argument("--tolerance", type=float, default=d.tolerance)
    p.add_argument("--max-trials", type=int, default=d.max_trials)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-plots", action="store_true")


def config_from_args(args: argparse.Namespace) -> PaperConfig:
    def names(s: str) -> tuple[str, ...]:
        return tuple(x.strip() for x in s.split(",") if x.strip())

    return PaperConfig(num_requests=args.num_requests, sensitivity_requests=args.sensitivity_requests,
                       tolerance=args.tolerance, max_trials=args.max_trials, seed=args.seed,
                       trace_csv=args.trace_csv, out_dir=args.out, experiments=names(args.only),
                       sensitivity_constants=names(args.sensitivity_constants),
                       run_requests=args.run_requests,
                       table6_requests=args.table6_requests, plots=not args.no_plots)


def cmd_sim_paper(args: argparse.Namespace) -> None:
    try:
        cfg = config_from_args(args)
        run(cfg, getattr(args, "argv", None) or [])
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None


def add_paper_command(sub) -> None:
    """Register `sim paper` on the `tandem sim` subparsers."""
    p = sub.add_parser("paper", help="Sarathi-Serve's headline experiments in the simulator "
                                     "(docs/sim-results.md).",
                       description=__doc__.split("\n\n")[0])
    add_paper_args(p)
    p.set_defaults(func=cmd_sim_paper)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog="python -m sim.paper", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paper_args(p)
    args = p.parse_args(argv)
    args.argv = argv
    cmd_sim_paper(args)


if __name__ == "__main__":
    main()
