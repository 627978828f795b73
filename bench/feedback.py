"""Feedback token budget vs a static one across a step change in load (in-process engine).

Phase A is light (a couple of streams, an occasional long prompt); phase B adds many streams and
more long prompts. A static budget tuned so phase A meets the TBT SLO misses it in phase B, where
every step already carries many decodes; the feedback controller shrinks the budget and holds the
SLO (at the cost of slower prefills). Prints P50/P99 TBT per phase for both and can plot the step
time and budget traces.

    tandem bench-feedback --tbt-slo-ms 300 --static-budget 96
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, replace

import numpy as np

from scheduler.config import BudgetConfig
from scheduler.request import SamplingParams


def _workload(args) -> list[tuple[float, str, int, int]]:
    """(arrival s, request id, prompt tokens, max tokens), sorted by arrival."""
    long_out = 4
    stream_out = 10_000  # streams run until the end of the experiment (aborted there)
    reqs = [(0.0, f"a-stream-{i}", 32, stream_out) for i in range(args.light_streams)]
    t = 1.0
    while t < args.phase_a:
        reqs.append((t, f"a-long-{t:.1f}", args.long_prompt, long_out))
        t += args.light_long_every
    reqs += [(args.phase_a, f"b-stream-{i}", 32, stream_out) for i in range(args.heavy_streams)]
    t = args.phase_a + 0.5
    while t < args.phase_a + args.phase_b:
        reqs.append((t, f"b-long-{t:.1f}", args.long_prompt, long_out))
        t += args.heavy_long_every
    return sorted(reqs)


def run_one(engine_cfg, args, label: str) -> dict:
    from engine.core import EngineCore  # noqa: PLC0415 - torch only when running

    engine = EngineCore(engine_cfg)
    vocab = engine.model_config.vocab_size
    pending = _workload(args)
    token_times: dict[str, list[float]] = {}
    iterations = []
    end = args.phase_a + args.phase_b
    t0 = time.perf_counter()
    while True:
        now = time.perf_counter() - t0
        if now >= end:
            break
        while pending and pending[0][0] <= now:
            _, rid, plen, out_len = pending.pop(0)
            prompt = [(hash(rid) + 31 * j) % (vocab - 10) + 5 for j in range(plen)]
            sp = SamplingParams(max_tokens=min(out_len, engine_cfg.scheduler.max_model_len - plen - 1),
                                temperature=0.0, ignore_eos=True)
            err = engine.add_request(rid, prompt, sp)
            if err:
                raise SystemExit(f"{rid}: {err.error}")
            token_times[rid] = []
        if not engine.has_work():
            time.sleep(0.005)
            continue
        outs = engine.step()
        t = time.perf_counter() - t0
        iterations.append({"t": t, **asdict(engine.last_step)})
        for o in outs:
            if o.new_token_ids:
                token_times[o.request_id].append(t)
    engine.abort(list(token_times))

    phases = {"A (light)": (0.0, args.phase_a), "B (heavy)": (args.phase_a, end)}
    rows = {}
    for name, (lo, hi) in phases.items():
        gaps = [b - a for times in token_times.values() for a, b in zip(times, times[1:]) if lo <= b < hi]
        ttfts = [times[0] - arr for arr, rid, *_ in _workload(args)
                 if "long" in rid and lo <= arr < hi and (times := token_times.get(rid))]
        budgets = [it["token_budget"] for it in iterations if lo <= it["t"] < hi]
        rows[name] = {
            "tbt_p50_ms": float(np.percentile(gaps, 50) * 1e3) if gaps else None,
            "tbt_p99_ms": float(np.percentile(gaps, 99) * 1e3) if gaps else None,
            "slo_met_share": float(np.mean(np.array(gaps) <= args.tbt_slo_ms / 1e3)) if gaps else None,
            "long_ttft_mean_s": float(np.mean(ttfts)) if ttfts else None,
            "long_done": len(ttfts),
            "budget_mean": float(np.mean(budgets)) if budgets else None,
            "budget_min": min(budgets) if budgets else None,
        }
    return {"label": label, "phases": rows, "iterations": iterations}


def plot(results: list[dict], slo_ms: float, phase_a: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for r in results:
        ts = [it["t"] for it in r["iterations"]]
        ax1.plot(ts, [it["step_time"] * 1e3 for it in r["iterations"]], lw=0.8, label=r["label"])
        ax2.plot(ts, [it["token_budget"] for it in r["iterations"]], lw=1.2, label=r["label"])
    for ax in (ax1, ax2):
        ax.axvline(phase_a, color="gray", ls=":", lw=1)
    ax1.axhline(slo_ms, color="red", ls="--", lw=1, label=f"TBT SLO {slo_ms:g} ms")
    ax1.set_ylabel("step time (ms) ~ TBT")
    ax2.set_ylabel("token budget")
    ax2.set_xlabel("seconds (load steps up at the dotted line)")
    ax1.legend(loc="upper left", fontsize=8)
    ax2.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(args: argparse.Namespace) -> None:
    from cluster.cli import engine_config_from_args  # noqa: PLC0415 - same flags as `tandem serve`

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    base = engine_config_from_args(args)
    sched = base.scheduler
    static = replace(base, scheduler=replace(sched, token_budget=args.static_budget,
                                             budget=BudgetConfig(kind="static")))
    feedback = replace(base, scheduler=replace(sched, token_budget=args.static_budget,
                                               budget=BudgetConfig(kind="feedback", tbt_slo_ms=args.tbt_slo_ms,
                                                                   tile=args.tile)))
    results = []
    for label, cfg in ((f"static {args.static_budget}", static), ("feedback", feedback)):
        print(f"running {label} ...", flush=True)
        results.append(run_one(cfg, args, label))
    print(f"\nTBT SLO {args.tbt_slo_ms:g} ms; phase A {args.light_streams} streams + a {args.long_prompt}-token "
          f"prompt every {args.light_long_every:g}s; phase B adds {args.heavy_streams} streams, prompts every "
          f"{args.heavy_long_every:g}s")
    print(f"{'controller':<12} {'phase':<10} {'TBT p50 ms':>10} {'TBT p99 ms':>10} {'gaps<=SLO':>9} "
          f"{'budget mean':>11} {'min':>5} {'long TTFT s':>11} {'done':>5}")
    for r in results:
        for phase, row in r["phases"].items():
            print(f"{r['label']:<12} {phase:<10} {row['tbt_p50_ms']:>10.0f} {row['tbt_p99_ms']:>10.0f} "
                  f"{row['slo_met_share']:>9.1%} {row['budget_mean']:>11.0f} {row['budget_min']:>5} "
                  f"{(row['long_ttft_mean_s'] or float('nan')):>11.2f} {row['long_done']:>5}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "feedback", "results": results}, f)
    if args.plot:
        plot(results, args.tbt_slo_ms, args.phase_a, args.plot)
        print(f"plot: {args.plot}")


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench-feedback", help="Feedback vs static token budget across a load step.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.set_defaults(tbt_slo_ms=300.0, max_num_seqs=24, max_model_len=2048)
    p.add_argument("--static-budget", type=int, default=96,
                   help="Budget of the static run, and the feedback run's starting point.")
    p.add_argument("--tile", type=int, default=16, help="Budget granularity of the feedback controller.")
    p.add_argument("--phase-a", type=float, default=15.0, help="Seconds of light load.")
    p.add_argument("--phase-b", type=float, default=20.0, help="Seconds of heavy load.")
    p.add_argument("--light-streams", type=int, default=2)
    p.add_argument("--heavy-streams", type=int, default=14)
    p.add_argument("--long-prompt", type=int, default=768)
    p.add_argument("--light-long-every", type=float, default=4.0)
    p.add_argument("--heavy-long-every", type=float, default=3.0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG of step time and budget over time.")
    p.set_defaults(func=main)
