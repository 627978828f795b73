"""The generation-stall benchmark (Sarathi-Serve's motivating result) with the real server.

A few streams decode while long prompts arrive. Prefill-prioritising batching (`vllm`) pauses
every stream for each long prefill; stall-free batching (`sarathi`) keeps them flowing by chunking
the prompt into the token budget. For each policy it starts `tandem serve`, replays the same
workload, and prints P50/P99 time-between-tokens of the streams and TTFT of the long prompts.

    tandem bench-stall [--policies sarathi vllm ...] [--long-prompt 1536] [--token-budget 128]
"""
from __future__ import annotations

import argparse
import asyncio
import json

from bench.client import run_load
from bench.report import percentile
from bench.server import local_server
from bench.workload import PromptBuilder, RequestSpec, Workload

DEFAULT_POLICIES = ("sarathi", "vllm", "orca", "chunked_only", "hybrid_only", "request")


def stall_workload(streams: int, stream_prompt: int, stream_output: int, long_prompt: int,
                   num_long: int, first_long_s: float, long_gap_s: float) -> Workload:
    reqs = [RequestSpec(0.05 * i, stream_prompt, stream_output) for i in range(streams)]
    reqs += [RequestSpec(first_long_s + i * long_gap_s, long_prompt, 4) for i in range(num_long)]
    return Workload(reqs, f"{streams} streams + {num_long} x {long_prompt}-token prompts")


def run_policy(policy: str, args: argparse.Namespace, workload: Workload) -> dict:
    serve = ["--model", args.model] if args.model else []
    serve += ["--scheduler", policy, "--token-budget", str(args.token_budget),
              "--max-num-seqs", str(args.max_num_seqs), "--max-model-len", str(args.max_model_len),
              "--threads", str(args.threads)]
    with local_server(serve) as server:
        run = asyncio.run(run_load(workload, server.url, prompts=PromptBuilder(token_ids=True, seed=1),
                                   timeout_s=args.timeout))
    streams = [r for r in run.requests if r.prompt_tokens != args.long_prompt]
    longs = [r for r in run.requests if r.prompt_tokens == args.long_prompt]
    gaps = [g for r in streams for g in r.itl_s]
    errors = [r.error for r in run.requests if not r.ok]
    return {
        "policy": policy,
        "tbt_p50_s": percentile(gaps, 50), "tbt_p99_s": percentile(gaps, 99),
        "tbt_max_s": max(gaps) if gaps else None,
        "long_ttft_s": [r.ttft_s for r in longs],
        "long_ttft_mean_s": sum(r.ttft_s for r in longs if r.ttft_s) / max(1, len(longs)),
        "errors": errors,
    }


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(f"\n{args.streams} streams decoding; {args.num_long} prompts of {args.long_prompt} tokens "
          f"arrive every {args.long_gap:g}s; token budget {args.token_budget} "
          f"(sarathi/chunked_only/hybrid_only)")
    print(f"{'policy':<13} {'TBT p50 ms':>10} {'TBT p99 ms':>10} {'TBT max ms':>10} "
          f"{'long TTFT mean s':>16}  long TTFTs s")
    for r in rows:
        ttfts = ", ".join(f"{t:.2f}" if t is not None else "-" for t in r["long_ttft_s"])
        err = f"  ({len(r['errors'])} errors: {r['errors'][0]})" if r["errors"] else ""
        print(f"{r['policy']:<13} {r['tbt_p50_s'] * 1e3:>10.0f} {r['tbt_p99_s'] * 1e3:>10.0f} "
              f"{r['tbt_max_s'] * 1e3:>10.0f} {r['long_ttft_mean_s']:>16.2f}  {ttfts}{err}")


def main(args: argparse.Namespace) -> None:
    workload = stall_workload(args.streams, args.stream_prompt, args.stream_output,
                              args.long_prompt, args.num_long, args.first_long, args.long_gap)
    rows = []
    for policy in args.policies:
        print(f"running {policy} ...", flush=True)
        rows.append(run_policy(policy, args, workload))
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
    p.add_argument("--json", default=None, help="Write the rows here.")
    p.set_defaults(func=main)
