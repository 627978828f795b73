"""`tandem sim run` and `tandem sim capacity`: the simulator from the command line.

The workload and capacity-search options are bench's own (`bench.cli.add_workload_args`,
`add_search_args`); results go through `bench.report.summarize` and `bench.capacity`, so the
JSON and tables are those of `tandem bench` / `tandem capacity`.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict

from sim.specs import DEVICES, LINKS, MODELS

SIM_NUM_REQUESTS = 2048
"""Requests per run / capacity trial (Sarathi-Serve's capacity search)."""


def _add_sim_args(p: argparse.ArgumentParser) -> None:
    from bench.cli import add_workload_args
    from scheduler.config import POLICIES

    g = p.add_argument_group("model and hardware")
    g.add_argument("--model", default="mistral-7b", choices=sorted(MODELS), help="Model (default mistral-7b).")
    g.add_argument("--device", default="a100-80gb", help=f"GPU: {', '.join(sorted(DEVICES))} (default a100-80gb).")
    g.add_argument("--tp", type=int, default=1, help="Tensor-parallel GPUs per replica (default 1).")
    g.add_argument("--cost", choices=["roofline", "profiled"], default="roofline",
                   help="Step-time model: roofline (from --model/--device/--tp) or profiled (a "
                        "`tandem profile` JSON, --profile).")
    g.add_argument("--profile", default=None, metavar="PATH", help="Profile JSON for --cost profiled.")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per replica (default: device memory minus weights and reserve).")
    s = p.add_argument_group("scheduling (defaults: Sarathi-Serve's capacity experiments)")
    s.add_argument("--scheduler", choices=POLICIES, default="sarathi", help="Batching policy.")
    s.add_argument("--token-budget", type=int, default=512, help="Token budget (default 512).")
    s.add_argument("--idle-token-budget", type=int, default=0,
                   help="sarathi: prefill budget of decode-free steps (default 0 = --token-budget).")
    s.add_argument("--max-batch-size", type=int, default=128, help="max_num_seqs (default 128).")
    s.add_argument("--max-model-len", type=int, default=16384, help="Default 16384.")
    s.add_argument("--max-batched-tokens", type=int, default=None,
                   help="Whole-prompt policies' token cap (default: --max-model-len).")
    s.add_argument("--block-size", type=int, default=16)
    s.add_argument("--budget", choices=["static", "profiled", "feedback"], default="static",
                   help="Budget controller (profiled fits the cost model over the profile grid).")
    c = p.add_argument_group("replicas and routing")
    c.add_argument("--hybrid-replicas", type=int, default=None,
                   help="Replicas that prefill and decode (default 1 without prefill/decode ones).")
    c.add_argument("--prefill-replicas", type=int, default=0)
    c.add_argument("--decode-replicas", type=int, default=0)
    c.add_argument("--routing", choices=["round_robin", "least_loaded", "pd"], default=None,
                   help="Default: pd with prefill replicas, else round_robin.")
    c.add_argument("--offload-threshold", type=int, default=512)
    c.add_argument("--kv-link", choices=sorted(LINKS), default="infiniband",
                   help="Link between prefill and decode replicas (default infiniband).")
    c.add_argument("--kv-codec", choices=["raw", "lz4", "int8", "fp8"], default="raw")
    c.add_argument("--label", default=None, help="Name of the run in JSON and plots.")
    c.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="Write results as JSON here.")
    add_workload_args(p)
    p.set_defaults(num_requests=SIM_NUM_REQUESTS)


def build_cluster_factory(args: argparse.Namespace):
    """A function making a fresh `Cluster` from the options (one per run or trial)."""
    from scheduler.config import BudgetConfig, SchedulerConfig
    from sim.cluster import Cluster, KVLink
    from sim.cost import ProfiledCost, RooflineCost
    from sim.replica import SimReplica, num_kv_blocks
    from sim.specs import get_device, get_link, get_model

    model, device = get_model(args.model), get_device(args.device)
    if args.cost == "profiled":
        if not args.profile:
            raise ValueError("--cost profiled needs --profile PATH (a `tandem profile` JSON)")
        cost = ProfiledCost.from_json(args.profile)
    else:
        cost = RooflineCost(model, device, tp=args.tp)
    blocks = args.num_kv_blocks or num_kv_blocks(model, device, args.tp, args.block_size)
    config = SchedulerConfig(
        policy=args.scheduler, token_budget=args.token_budget,
        idle_token_budget=args.idle_token_budget, max_num_seqs=args.max_batch_size,
        max_batched_tokens=args.max_batched_tokens or args.max_model_len,
        block_size=args.block_size, max_model_len=args.max_model_len,
        budget=BudgetConfig(kind=args.budget, tbt_slo_ms=getattr(args, "tbt_slo_ms", None) or 100.0))
    step_model = cost.step_model() if args.budget == "profiled" else None
    hybrid = args.hybrid_replicas
    if hybrid is None:
        hybrid = 0 if (args.prefill_replicas or args.decode_replicas) else 1
    roles = ["prefill"] * args.prefill_replicas + ["decode"] * args.decode_replicas + ["hybrid"] * hybrid
    if not roles or all(r == "prefill" for r in roles):
        raise ValueError("need at least one hybrid or decode replica")
    routing = args.routing or ("pd" if args.prefill_replicas else "round_robin")
    kv = KVLink(get_link(args.kv_link), model.kv_bytes_per_token(), args.kv_codec)

    def make() -> Cluster:
        replicas = [SimReplica(f"{role}-{i}", role, config, blocks, cost, step_model, args.model)
                    for i, role in enumerate(roles)]
        return Cluster(replicas, routing, args.offload_threshold, kv, model_name=args.model)

    info = {"model": args.model, "device": device.name, "tp": args.tp, "cost": args.cost,
            "num_kv_blocks": blocks, "replicas": roles, "routing": routing,
            "kv_link": args.kv_link, "kv_codec": args.kv_codec, "scheduler": asdict(config)}
    return make, info


def simulate(args: argparse.Namespace, make, cfg, qps: float | None):
    """One simulated run: (SimResult, workload, seconds of wall time it took)."""
    from bench.workload import build_workload

    workload = build_workload(cfg, qps)
    cluster = make()
    t0 = time.perf_counter()
    result = cluster.run((r.arrival_s, r.prompt_tokens, r.output_tokens) for r in workload)
    return result, workload, time.perf_counter() - t0


def _sim_section(result, wall: float, info: dict) -> dict:
    n = len(result.run.requests)
    return {**info, "p50_sched_delay_s": result.p50_sched_delay_s, "route_decisions": result.decisions,
            "kv_wire_bytes": result.kv_bytes, "num_steps": result.num_steps,
            "sim_wall_s": wall, "sim_requests_per_s": n / wall if wall > 0 else None}


def cmd_sim_run(args: argparse.Namespace) -> None:
    from bench.cli import write_json, workload_config
    from bench.report import SLO, format_table, summarize

    try:
        cfg = workload_config(args)
        if args.qps is None and cfg.arrival != "trace":
            raise ValueError(f"--qps is needed with --arrival {cfg.arrival}")
        make, info = build_cluster_factory(args)
        result, workload, wall = simulate(args, make, cfg, args.qps)
        slo = SLO(tbt_s=args.tbt_slo_ms / 1000 if args.tbt_slo_ms else None)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    summary = summarize(result.run, slo, label=args.label or args.scheduler,
                        workload={**workload.summary(), "qps": args.qps, "config": asdict(cfg)})
    summary["sim"] = _sim_section(result, wall, info)
    print(format_table(summary))
    delay = result.p50_sched_delay_s
    print(f"P50 scheduling delay {'-' if delay is None else f'{delay:.3f} s'} | "
          f"{result.num_steps} steps | decisions {result.decisions or '-'}")
    print(f"simulated {len(workload)} requests in {wall:.2f} s of wall time: "
          f"{len(workload) / wall:,.0f} requests/s")
    write_json(args.json_out, summary)


def cmd_sim_capacity(args: argparse.Namespace) -> None:
    from bench.capacity import TrialResult, find_capacity, judge
    from bench.cli import write_json, search_config
    from bench.report import summarize
    from bench.workload import build_workload

    try:
        cfg, criteria = search_config(args)
        make, info = build_cluster_factory(args)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    label = args.label or args.scheduler
    print(f"simulated capacity of {label}: {args.model} on {args.tp} x {info['device']} "
          f"({args.cost}), {len(info['replicas'])} replica(s): P99 TBT <= {args.tbt_slo_ms:g} ms, "
          f"P50 scheduling delay <= {args.max_p50_ttft_s:g} s")
    print(f"{'trial':>5} {'qps':>8} {'achieved':>9} {'p99 TBT ms':>11} {'p50 delay s':>12} "
          f"{'sim req/s':>10}  result")
    trials: list[TrialResult] = []
    total = {"requests": 0, "wall": 0.0}

    def run_trial(qps: float) -> TrialResult:
        result, workload, wall = simulate(args, make, cfg, qps)
        total["requests"] += len(workload)
        total["wall"] += wall
        s = summarize(result.run, None, label=label, workload=workload.summary(), include_requests=False)
        s["sim"] = _sim_section(result, wall, {})
        t = TrialResult(qps, s["tbt_s"]["p99"], s["ttft_s"]["p50"], s["num_requests"], s["num_errors"],
                        summary=s, p50_sched_delay_s=result.p50_sched_delay_s)
        return judge(t, criteria)

    def on_trial(t: TrialResult) -> None:
        trials.append(t)
        tbt = "-" if t.p99_tbt_s is None else f"{t.p99_tbt_s * 1000:.1f}"
        delay = "-" if t.p50_sched_delay_s is None else f"{t.p50_sched_delay_s:.3f}"
        print(f"{len(trials):>5} {t.qps:>8.3f} {t.summary.get('request_throughput', 0):>9.3f} {tbt:>11} "
              f"{delay:>12} {t.summary['sim']['sim_requests_per_s']:>10,.0f}  "
              f"{'PASS' if t.passed else 'FAIL: ' + t.reason}", flush=True)

    result = find_capacity(run_trial, start_qps=args.start_qps, min_qps=args.min_qps,
                           max_qps=args.max_qps, tolerance=args.tolerance, max_trials=args.max_trials,
                           on_trial=on_trial)
    cap = ("none (even the lowest rate failed)" if result.capacity_qps is None
           else f"{result.capacity_qps:.3f} qps")
    rate = total["requests"] / total["wall"] if total["wall"] else 0.0
    print(f"capacity: {cap} [{result.status}; bracket {result.lo_qps} .. {result.hi_qps}]")
    print(f"simulated {total['requests']} requests in {total['wall']:.1f} s of wall time: "
          f"{rate:,.0f} requests/s")
    write_json(args.json_out, {
        "kind": "capacity", "label": label, "url": "sim://", "model": args.model, "simulated": True,
        "tbt_slo_ms": args.tbt_slo_ms, "criteria": asdict(criteria), "workload": asdict(cfg),
        "sim": {**info, "requests": total["requests"], "wall_s": total["wall"],
                "requests_per_s": rate},
        "search": {"start_qps": args.start_qps, "min_qps": args.min_qps, "max_qps": args.max_qps,
                   "tolerance": args.tolerance, "max_trials": args.max_trials},
        **result.to_dict()})


def add_sim_commands(subparsers) -> None:
    """Register `sim run` and `sim capacity` on an argparse subparsers object."""
    from bench.cli import WORKLOAD_EPILOG, add_search_args

    fmt = argparse.RawDescriptionHelpFormatter
    sim = subparsers.add_parser(
        "sim", help="Simulate replicas (the real schedulers and router, a cost model instead of "
                    "the GPU): one run, or a capacity search.",
        description="Discrete-event simulator over Tandem's own schedulers and router; never "
                    "imports torch. See sim/README.md.")
    sub = sim.add_subparsers(dest="sim_command", required=True)
    r = sub.add_parser("run", help="Simulate one workload; print the bench summary table.",
                       formatter_class=fmt, epilog=WORKLOAD_EPILOG,
                       description="Example: tandem sim run --model mistral-7b --scheduler sarathi "
                                   "--qps 2 --length-dist lognormal --prompt-len 1500 --output-len 200")
    r.add_argument("--qps", type=float, default=None, help="Mean request rate.")
    r.add_argument("--tbt-slo-ms", type=float, default=None,
                   help="Goodput SLO on each request's P99 TBT, and the adaptive budgets' target.")
    _add_sim_args(r)
    r.set_defaults(func=cmd_sim_run)
    c = sub.add_parser("capacity", help="Largest rate with P99 TBT <= SLO and P50 scheduling delay <= 2 s.",
                       formatter_class=fmt, epilog=WORKLOAD_EPILOG,
                       description="Sarathi-Serve's capacity over simulated runs. Example: tandem sim "
                                   "capacity --model mistral-7b --device a100-80gb --tp 1 --scheduler "
                                   "sarathi --token-budget 512 --tbt-slo-ms 100 --json cap.json")
    add_search_args(c, tolerance=0.025, max_qps=256.0, max_trials=24,
                    delay_help="Median scheduling delay limit in s (the paper's 2 s; measured "
                               "directly in the simulator).")
    _add_sim_args(c)
    c.set_defaults(func=cmd_sim_capacity)
