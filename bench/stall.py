r"""The generation-stall benchmark (Sarathi-Serve's motivating result) with the real server.

A few streams decode while long prompts arrive. Prefill-prioritising batching (`vllm`) pauses
every stream for each long prefill; stall-free batching (`sarathi`) keeps them flowing by chunking
the prompt into the token budget. For each policy (and each token-budget controller of
`--budgets`) it starts `tandem serve`, replays the same workload, and prints P50/P99
time-between-tokens of the streams -- over the whole run and within its first `--early-s`
seconds, where a controller that starts from the wrong budget shows -- and P50/P99 TTFT of the
long prompts (the cost of holding a TBT SLO, made visible).

`--poisson QPS` replays Poisson arrivals of `--prompt-len`/`--output-len` requests instead (no
streams): then every request's gaps and TTFT count.

    tandem bench-stall [--policies sarathi vllm ...] [--long-prompt 1536] [--token-budget 128]
    tandem bench-stall --policies sarathi --budgets static feedback slo --tbt-slo-ms 300 \
        --long-prompt 700 --long-gap 2 --profile-file prof.json
    tandem bench-stall --policies sarathi --budgets static feedback slo --tbt-slo-ms 150 \
        --poisson 0.25 --num-requests 30 --profile-file prof.json
"""
from __future__ import annotations

import argparse
import asyncio
import json

from bench.client import run_load
from bench.report import percentile
from bench.server import local_server
from bench.workload import PromptBuilder, RequestSpec, Workload, WorkloadConfig, build_workload
from scheduler.config import BUDGET_KINDS, CHUNKING

DEFAULT_POLICIES = ("sarathi", "vllm", "orca", "chunked_only", "hybrid_only", "request")


def stall_workload(streams: int, stream_prompt: int, stream_output: int, long_prompt: int,
                   num_long: int, first_long_s: float, long_gap_s: float) -> Workload:
    reqs = [RequestSpec(0.05 * i, stream_prompt, stream_output) for i in range(streams)]
    reqs += [RequestSpec(first_long_s + i * long_gap_s, long_prompt, 4) for i in range(num_long)]
    return Workload(reqs, f"{streams} streams + {num_long} x {long_prompt}-token prompts")


def poisson_workload(args: argparse.Namespace) -> Workload:
    return build_workload(WorkloadConfig(num_requests=args.num_requests, seed=args.seed,
                                         arrival="poisson", prompt_len=args.prompt_len,
                                         output_len=args.output_len), args.poisson)


def token_times(r) -> list[float]:
    """Seconds after the run start at which each of the request's text chunks arrived."""
    if r.send_s is None or r.ttft_s is None:
        return []
    t = [r.send_s + r.ttft_s]
    for g in r.itl_s:
        t.append(t[-1] + g)
    return t


def run_policy(policy: str, args: argparse.Namespace, workload: Workload, budget: str = "static") -> dict:
    serve = ["--model", args.model] if args.model else []
    serve += ["--scheduler", policy, "--token-budget", str(args.token_budget),
              "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
              "--threads", str(args.threads), "--budget", budget, "--tbt-slo-ms", str(args.tbt_slo_ms)]
    if args.profile_file:
        serve += ["--profile-file", args.profile_file]
    with local_server(serve) as server:
        run = asyncio.run(run_load(workload, server.url, prompts=PromptBuilder(token_ids=True, seed=1),
                                   timeout_s=args.timeout))
    if args.poisson:
        streams = longs = run.requests
    else:
        streams = [r for r in run.requests if r.prompt_tokens != args.long_prompt]
        longs = [r for r in run.requests if r.prompt_tokens == args.long_prompt]
    gaps = [g for r in streams for g in r.itl_s]
    # a gap belongs to the moment its token arrived
    early = [g for r in streams for g, t in zip(r.itl_s, token_times(r)[1:]) if t <= args.early_s]
    ttfts = [r.ttft_s for r in longs if r.ttft_s is not None]
    errors = [r.error for r in run.requests if not r.ok]
    return {
        "policy": policy, "budget": budget, "tbt_slo_ms": args.tbt_slo_ms,
        "tbt_p50_s": percentile(gaps, 50), "tbt_p99_s": percentile(gaps, 99),
        "tbt_max_s": max(gaps) if gaps else None,
        "early_tbt_p50_s": percentile(early, 50), "early_tbt_p99_s": percentile(early, 99),
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "long_ttft_s": [r.ttft_s for r in longs],
        "long_ttft_mean_s": sum(r.ttft_s for r in longs if r.ttft_s) / max(1, len(longs)),
        "errors": errors,
    }


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    if args.poisson:
        print(f"\nPoisson {args.poisson:g} req/s, {args.num_requests} requests of {args.prompt_len} "
              f"prompt / {args.output_len} output tokens; TBT SLO {args.tbt_slo_ms:g} ms (feedback, slo)")
    else:
        print(f"\n{args.streams} streams decoding; {args.num_long} prompts of {args.long_prompt} tokens "
              f"arrive every {args.long_gap:g}s; token budget {args.token_budget} "
              f"(sarathi/chunked_only/hybrid_only); TBT SLO {args.tbt_slo_ms:g} ms (feedback, slo)")
    what = "TTFT" if args.poisson else "long TTFT"
    early = f"first {args.early_s:g}s"
    print(f"{'policy':<13} {'budget':<9} {'TBT p50 ms':>10} {'TBT p99 ms':>10} {'TBT max ms':>10} "
          f"{early + ' p50':>13} {early + ' p99':>13} {what + ' p50 s':>15} {what + ' p99 s':>15}")
    for r in rows:
        err = f"  ({len(r['errors'])} errors: {r['errors'][0]})" if r["errors"] else ""
        print(f"{r['policy']:<13} {r.get('budget', 'static'):<9} {_ms(r['tbt_p50_s']):>10} "
              f"{_ms(r['tbt_p99_s']):>10} {_ms(r['tbt_max_s']):>10} {_ms(r['early_tbt_p50_s']):>13} "
              f"{_ms(r['early_tbt_p99_s']):>13} {_s(r['ttft_p50_s']):>15} {_s(r['ttft_p99_s']):>15}{err}")


def main(args: argparse.Namespace) -> None:
    if args.poisson:
        workload = poisson_workload(args)
    else:
        workload = stall_workload(args.streams, args.stream_prompt, args.stream_output,
                                  args.long_prompt, args.num_long, args.first_long, args.long_gap)
    rows = []
    for policy in args.policies:
        for budget in args.budgets:
            if budget == "slo" and policy not in CHUNKING:
                print(f"skipping {policy} / slo: {policy} never chunks a prompt", flush=True)
                continue
            print(f"running {policy} / {budget} budget ...", flush=True)
            rows.append(run_policy(policy, args, workload, budget))
    print_table(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "stall", "args": vars(args) | {"func": None}, "rows": rows}, f, indent=1)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench-stall", help="Reproduce the generation-stall result: TBT of streams vs long prompts.",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES))
    p.add_argument("--model", default=None, help="Model for `tandem serve` (default: embedded SmolLM2).")
    p.add_argument("--streams", type=int, default=4, help="Requests decoding throughout.")
    p.add_argument("--stream-prompt", type=int, default=32)
    p.add_argument("--stream-output", type=int, default=64)
    p.add_argument("--long-prompt", type=int, default=1536, help="Tokens of each long prompt.")
    p.add_argument("--num-long", type=int, default=4)
    p.add_argument("--first-long", type=float, default=1.0, help="Seconds until the first long prompt.")
    p.add_argument("--long-gap", type=float, default=3.0, help="Seconds between long prompts.")
    p.add_argument("--token-budget", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the server's replica.")
    p.add_argument("--timeout", type=float, default=300.0, help="Per-request timeout (s).")
    p.add_argument("--budgets", nargs="+", choices=list(BUDGET_KINDS), default=["static"],
                   help="Token-budget controllers to run each policy with (`tandem serve --budget`), "
                        "side by side.")
    p.add_argument("--tbt-slo-ms", type=float, default=300.0,
                   help="TBT SLO of the profiled, feedback and slo budgets.")
    p.add_argument("--profile-file", default=None,
                   help="`tandem profile` output for the profiled and slo budgets (else each server "
                        "profiles at start-up, a minute or two).")
    p.add_argument("--early-s", type=float, default=10.0,
                   help="Also report TBT of the tokens that arrived within this many seconds.")
    p.add_argument("--poisson", type=float, default=None, metavar="QPS",
                   help="Instead of streams + long prompts: Poisson arrivals at this rate.")
    p.add_argument("--num-requests", type=int, default=30, help="--poisson: requests.")
    p.add_argument("--prompt-len", type=int, default=512, help="--poisson: prompt tokens.")
    p.add_argument("--output-len", type=int, default=128, help="--poisson: output tokens.")
    p.add_argument("--seed", type=int, default=13, help="--poisson: arrival seed.")
    p.add_argument("--json", default=None, help="Write the rows here.")
    p.set_defaults(func=main)
