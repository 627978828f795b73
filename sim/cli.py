"""`tandem sim run`, `tandem sim capacity` and `tandem sim placement` (sim/placement.py): the
simulator from the command line.

The workload and capacity-search options are bench's own (`bench.cli.add_workload_args`,
`add_search_args`); results go through `bench.report.summarize` and `bench.capacity`, so the
JSON and tables are those of `tandem bench` / `tandem capacity`.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict

from cluster.spec import KV_CODECS
from scheduler.config import BUDGET_KINDS, STEP_MODEL_BUDGETS
from sim.specs import DEVICES, LINKS, MODELS

SIM_NUM_REQUESTS = 2048
"""Requests per run / capacity trial (Sarathi-Serve's capacity search)."""
GPUS_PER_NODE = 8
"""GPUs of one node (DGX/HGX A100 and H100): a replica of more spans nodes, and its pipeline
stages then talk over the network (`--pp-link` default)."""


def add_model_device_args(g) -> None:
    """--model and --device (every sim command)."""
    g.add_argument("--model", default="mistral-7b", choices=sorted(MODELS), help="Model (default mistral-7b).")
    g.add_argument("--device", default="a100-80gb", help=f"GPU: {', '.join(sorted(DEVICES))} (default a100-80gb).")


def add_scheduling_args(p: argparse.ArgumentParser) -> None:
    """The replicas' scheduler options (every sim command); `scheduler_config` reads them."""
    from scheduler.config import POLICIES

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
    s.add_argument("--budget", choices=list(BUDGET_KINDS), default="static",
                   help="Budget controller (profiled and slo start from the cost model fitted over "
                        "the profile grid).")


def scheduler_config(args: argparse.Namespace, tbt_slo_ms: float | None = None):
    """The `SchedulerConfig` of `add_scheduling_args` options; adaptive budgets aim at
    `tbt_slo_ms` (default: --tbt-slo-ms, else 100)."""
    from scheduler.config import BudgetConfig, SchedulerConfig

    target = tbt_slo_ms or getattr(args, "tbt_slo_ms", None) or 100.0
    return SchedulerConfig(
        policy=args.scheduler, token_budget=args.token_budget,
        idle_token_budget=args.idle_token_budget, max_num_seqs=args.max_batch_size,
        max_batched_tokens=args.max_batched_tokens or args.max_model_len,
        block_size=args.block_size, max_model_len=args.max_model_len,
        budget=BudgetConfig(kind=args.budget, tbt_slo_ms=target))


def _add_sim_args(p: argparse.ArgumentParser) -> None:
    from bench.cli import add_workload_args
    from gateway.routing import ROUTING

    g = p.add_argument_group("model and hardware")
    add_model_device_args(g)
    g.add_argument("--tp", type=int, default=1, help="Tensor-parallel GPUs per replica (default 1).")
    g.add_argument("--pp", type=int, default=1,
                   help="Pipeline stages per replica, each of --tp GPUs (default 1). With N > 1 up "
                        "to N micro-batches are in flight; layers are split evenly over the "
                        "stages. Roofline cost only.")
    g.add_argument("--pp-link", choices=sorted(LINKS), default=None,
                   help="Link between consecutive pipeline stages, for the activations (default: "
                        f"the device's own GPU link when tp*pp fits one node of {GPUS_PER_NODE} "
                        "GPUs, else 100gbe).")
    g.add_argument("--cost", choices=["roofline", "profiled"], default="roofline",
                   help="Step-time model: roofline (from --model/--device/--tp) or profiled (a "
                        "`tandem profile` JSON, --profile).")
    g.add_argument("--profile", default=None, metavar="PATH", help="Profile JSON for --cost profiled.")
    g.add_argument("--step-variation", nargs="+", default=None, metavar="STEPS",
                   help="With --cost profiled: per-step telemetry of served runs (`tandem serve "
                        "--trace-file`, .jsonl or .jsonl.gz). Every simulated step is then the "
                        "profile's time x a factor replayed from how those steps varied around it "
                        "(the machine's slow stretches and each step's jitter; sim/noise.py), "
                        "drawn with --seed. Default: every step takes the profile's time.")
    g.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV blocks per replica (default: device memory minus weights and reserve).")
    add_scheduling_args(p)
    c = p.add_argument_group("replicas and routing")
    c.add_argument("--hybrid-replicas", type=int, default=None,
                   help="Replicas that prefill and decode (default 1 without prefill/decode ones).")
    c.add_argument("--prefill-replicas", type=int, default=0)
    c.add_argument("--decode-replicas", type=int, default=0)
    c.add_argument("--routing", choices=ROUTING, default=None,
                   help="Default: pd with prefill replicas, else round_robin. prefix routes as "
                        "least_loaded here: simulated prompts carry no real token ids and the "
                        "simulated replicas cache no prefixes.")
    c.add_argument("--offload-threshold", type=int, default=512)
    c.add_argument("--kv-link", choices=sorted(LINKS), default="infiniband",
                   help="Link between prefill and decode replicas (default infiniband).")
    c.add_argument("--kv-codec", choices=KV_CODECS, default="raw",
                   help="KV codec on the wire (its byte ratio: sim/cluster.py CODEC_RATIO).")
    c.add_argument("--gateway-delay-ms", type=float, default=0.0,
                   help="Per-token delay from a replica's step end to the client (output framing, "
                        "ZeroMQ, the gateway, HTTP), added to TTFT and end-to-end latency (default "
                        "0; `tandem sim fidelity` measures it for this machine's server).")
    c.add_argument("--arrival-delay-ms", type=float, default=0.0,
                   help="Delay from a request's arrival at the gateway to its replica (HTTP, "
                        "routing, ZeroMQ), added to TTFT and end-to-end latency (default 0).")
    c.add_argument("--label", default=None, help="Name of the run in JSON and plots.")
    c.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="Write results as JSON here.")
    add_workload_args(p)
    p.set_defaults(num_requests=SIM_NUM_REQUESTS)


def build_cluster_factory(args: argparse.Namespace):
    """A function making a fresh `Cluster` from the options (one per run or trial)."""
    from scheduler.telemetry import read_step_trace
    from sim.cluster import Cluster, KVLink
    from sim.cost import ProfiledCost, RooflineCost
    from sim.noise import StepVariation
    from sim.replica import SimReplica, num_kv_blocks
    from sim.specs import get_device, get_link, get_model

    model, device = get_model(args.model), get_device(args.device)
    if args.pp < 1:
        raise ValueError(f"--pp must be >= 1, got {args.pp}")
    for flag in ("gateway_delay_ms", "arrival_delay_ms"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    pp_link = args.pp_link or (device.intra_link if args.tp * args.pp <= GPUS_PER_NODE else "100gbe")
    if args.cost == "profiled":
        if not args.profile:
            raise ValueError("--cost profiled needs --profile PATH (a `tandem profile` JSON)")
        if args.pp > 1:
            raise ValueError(f"--pp {args.pp} needs --cost roofline (a profile times whole steps "
                             "of one stage)")
        cost = ProfiledCost.from_json(args.profile)
    else:
        cost = RooflineCost(model, device, tp=args.tp, pp=args.pp, pp_link=get_link(pp_link))
    variation = None
    if args.step_variation:
        if args.cost != "profiled":
            raise ValueError("--step-variation needs --cost profiled: the variation is measured "
                             "around the profile's step-time model")
        variation = StepVariation.from_trace([read_step_trace(p) for p in args.step_variation],
                                             cost.model)
    blocks = args.num_kv_blocks or num_kv_blocks(model, device, args.tp, args.block_size,
                                                 pp=args.pp)
    config = scheduler_config(args)
    step_model = cost.step_model() if args.budget in STEP_MODEL_BUDGETS else None
    hybrid = args.hybrid_replicas
    if hybrid is None:
        hybrid = 0 if (args.prefill_replicas or args.decode_replicas) else 1
    roles = ["prefill"] * args.prefill_replicas + ["decode"] * args.decode_replicas + ["hybrid"] * hybrid
    if not roles or all(r == "prefill" for r in roles):
        raise ValueError("need at least one hybrid or decode replica")
    routing = args.routing or ("pd" if args.prefill_replicas else "round_robin")
    kv = KVLink(get_link(args.kv_link), model.kv_bytes_per_token(), args.kv_codec)

    def make() -> Cluster:
        replicas = [SimReplica(f"{role}-{i}", role, config, blocks, cost, step_model, args.model,
                               noise=variation.sampler(args.seed + i) if variation else None)
                    for i, role in enumerate(roles)]
        return Cluster(replicas, routing, args.offload_threshold, kv, model_name=args.model,
                       token_delay_s=args.gateway_delay_ms / 1e3,
                       arrival_delay_s=args.arrival_delay_ms / 1e3)

    info = {"model": args.model, "device": device.name, "tp": args.tp, "pp": args.pp,
            "pp_link": pp_link if args.pp > 1 else None, "cost": args.cost,
            "step_variation": args.step_variation,
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


class SimTrials:
    """The capacity trial of `tandem sim capacity` and `tandem sim placement`: `trials(qps)`
    simulates the workload `cfg` at `qps` on a fresh cluster from `make` and returns its
    `TrialResult`, not yet judged (the measured median scheduling delay in it); `requests` and
    `wall` add up the simulated requests and the wall time they took. With `min_trial_s`, a
    trial has at least qps x that many requests (arrivals spanning that long)."""

    def __init__(self, make, cfg, label: str | None, min_trial_s: float = 0.0) -> None:
        self.make, self.cfg, self.label, self.min_trial_s = make, cfg, label, min_trial_s
        self.requests = 0
        self.wall = 0.0

    def __call__(self, qps: float):
        from dataclasses import replace

        from bench.capacity import TrialResult
        from bench.report import summarize

        cfg = self.cfg
        if self.min_trial_s and cfg.num_requests < qps * self.min_trial_s:
            cfg = replace(cfg, num_requests=math.ceil(qps * self.min_trial_s))
        result, workload, wall = simulate(None, self.make, cfg, qps)
        self.requests += len(workload)
        self.wall += wall
        s = summarize(result.run, None, label=self.label, workload=workload.summary(),
                      include_requests=False)
        s["sim"] = _sim_section(result, wall, {})
        return TrialResult(qps, s["tbt_s"]["p99"], s["ttft_s"]["p50"], s["num_requests"],
                           s["num_errors"], summary=s, p50_sched_delay_s=result.p50_sched_delay_s)

    @property
    def rate(self) -> float:
        """Simulated requests per wall second so far."""
        return self.requests / self.wall if self.wall else 0.0


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
    sim_trials = SimTrials(make, cfg, label)

    def run_trial(qps: float) -> TrialResult:
        return judge(sim_trials(qps), criteria)

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
    rate = sim_trials.rate
    print(f"capacity: {cap} [{result.status}; bracket {result.lo_qps} .. {result.hi_qps}]")
    print(f"simulated {sim_trials.requests} requests in {sim_trials.wall:.1f} s of wall time: "
          f"{rate:,.0f} requests/s")
    write_json(args.json_out, {
        "kind": "capacity", "label": label, "url": "sim://", "model": args.model, "simulated": True,
        "tbt_slo_ms": args.tbt_slo_ms, "criteria": asdict(criteria), "workload": asdict(cfg),
        "sim": {**info, "requests": sim_trials.requests, "wall_s": sim_trials.wall,
                "requests_per_s": rate},
        "search": {"start_qps": args.start_qps, "min_qps": args.min_qps, "max_qps": args.max_qps,
                   "tolerance": args.tolerance, "max_trials": args.max_trials},
        **result.to_dict()})


def cmd_sim_fidelity(args: argparse.Namespace) -> None:
    from sim.fidelity import compare, format_comparison

    try:
        rows, delays = compare(args.run_dir, seeds=args.seeds)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {args.run_dir}: {e}") from None
    print(format_comparison(rows, delays))
    worst = max(rows, key=lambda r: abs(r.error))
    print(f"largest error: {worst.policy} {worst.metric} {worst.error:+.1%}")


def add_sim_commands(subparsers) -> None:
    """Register `sim run`, `sim capacity` and `sim placement` on an argparse subparsers object."""
    from bench.cli import WORKLOAD_EPILOG, add_search_args
    from sim.fidelity import DEFAULT_SEEDS

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
    from sim.placement import add_placement_args, cmd_sim_placement

    # conflict_handler: placement's --tbt-slo-ms (several SLOs) replaces add_search_args' own
    pl = sub.add_parser(
        "placement", help="Search deployments (role mix, TP, PP, replicas, offload threshold) of a "
                          "cluster of nodes for the most capacity under strict and relaxed SLOs.",
        formatter_class=fmt, epilog=WORKLOAD_EPILOG, conflict_handler="resolve",
        description="Candidates packed onto --nodes x --gpus-per-node GPUs (TP groups within a "
                    "node; KV between nodes through shared NICs), each one's capacity found as "
                    "`tandem sim capacity` does, ranked. See sim/placement.py. Example: tandem sim "
                    "placement --model mistral-7b --nodes 2 --gpus-per-node 8 --trace-csv "
                    "TRACES/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv --json "
                    "p.json --plot p.png --spec-out best.yaml")
    add_placement_args(pl)
    pl.set_defaults(func=cmd_sim_placement)
    f = sub.add_parser(
        "fidelity", help="Compare the profiled simulator with a recorded real run (P50/P99 TTFT, TBT).",
        description="Replays a recorded run's workload on the simulator with the profile, gateway "
                    "delays and step-time variation measured on its calibration runs, and prints "
                    "real vs simulated P50/P99 TTFT and TBT (the median over --seeds simulations, "
                    "their range, and the simulation without variation). Record one with "
                    "tests/fixtures/sim_fidelity/record.sh. See sim/fidelity.py.")
    f.add_argument("run_dir", nargs="?", default="tests/fixtures/sim_fidelity",
                   help="Directory of the recorded run (default: the committed one).")
    f.add_argument("--seeds", type=int, default=DEFAULT_SEEDS,
                   help="Simulations with step-time variation, one seed each (default: %(default)s).")
    f.set_defaults(func=cmd_sim_fidelity)
    from sim.paper import add_paper_command

    add_paper_command(sub)
