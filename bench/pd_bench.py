"""Colocated vs disaggregated on the same cores: a mixed workload of short chats and long
documents against (a) hybrid replicas only and (b) prefill + decode replicas with pd routing.

Both deployments get the same number of replica processes and threads, so the comparison is of
placement, not of hardware. Prints TTFT of short and long requests and TBT (P50/P99) per setup.

    tandem bench-pd [--qps 0.5] [--num-requests 30] [--doc-prompt-len 1024] [--kv-codec raw]
"""
from __future__ import annotations

import argparse
import asyncio
import json

from bench.client import run_load
from bench.report import percentile
from bench.server import local_server
from bench.workload import PromptBuilder, WorkloadConfig, build_workload


def setups(args) -> dict[str, list[str]]:
    common = ["--threads", "1", "--max-model-len", "2048", "--token-budget", str(args.token_budget),
              "--max-num-seqs", "16"]
    if args.model:
        common += ["--model", args.model]
    return {
        "colocated (2 hybrid)": [*common, "--hybrid-replicas", "2", "--routing", "least_loaded"],
        "pd (1 prefill + 1 decode)": [*common, "--prefill-replicas", "1", "--decode-replicas", "1",
                                      "--offload-threshold", str(args.offload_threshold),
                                      "--kv-codec", args.kv_codec],
    }


def main(args: argparse.Namespace) -> None:
    cfg = WorkloadConfig(num_requests=args.num_requests, seed=args.seed, length_dist="chat-doc",
                         prompt_len=args.prompt_len, output_len=args.output_len,
                         doc_prompt_len=args.doc_prompt_len, doc_fraction=args.doc_fraction,
                         max_prompt_tokens=1900)
    workload = build_workload(cfg, qps=args.qps)
    rows = []
    for label, serve in setups(args).items():
        print(f"running {label} ...", flush=True)
        with local_server(serve) as srv:
            run = asyncio.run(run_load(workload, srv.url, prompts=PromptBuilder(token_ids=True, seed=1),
                                       timeout_s=args.timeout))
        ok = [r for r in run.requests if r.ok]
        long_ = [r for r in ok if r.prompt_tokens > args.offload_threshold]
        short = [r for r in ok if r.prompt_tokens <= args.offload_threshold]
        gaps = [g for r in ok for g in r.itl_s]
        rows.append({
            "setup": label, "ok": len(ok), "n": len(run.requests),
            "ttft_short_p50": percentile([r.ttft_s for r in short], 50),
            "ttft_short_p99": percentile([r.ttft_s for r in short], 99),
            "ttft_long_p50": percentile([r.ttft_s for r in long_], 50),
            "ttft_long_p99": percentile([r.ttft_s for r in long_], 99),
            "tbt_p50": percentile(gaps, 50), "tbt_p99": percentile(gaps, 99),
            "throughput_tok_s": sum(r.output_tokens for r in ok) / run.wall_s,
        })
    print(f"\n{workload.description}; offload threshold {args.offload_threshold}, codec {args.kv_codec}")
    print(f"{'setup':<27} {'ok':>6} {'TTFT short p50/p99 s':>21} {'TTFT long p50/p99 s':>20} "
          f"{'TBT p50/p99 ms':>15} {'out tok/s':>9}")
    for r in rows:
        def pair(a, b, scale=1.0, fmt="{:.2f}"):
            return "/".join("-" if v is None else fmt.format(v * scale) for v in (a, b))
        print(f"{r['setup']:<27} {r['ok']:>3}/{r['n']:<2} {pair(r['ttft_short_p50'], r['ttft_short_p99']):>21} "
              f"{pair(r['ttft_long_p50'], r['ttft_long_p99']):>20} "
              f"{pair(r['tbt_p50'], r['tbt_p99'], 1e3, '{:.0f}'):>15} {r['throughput_tok_s']:>9.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"kind": "pd", "rows": rows}, f, indent=1)


def add_parser(sub) -> None:
    p = sub.add_parser("bench-pd", help="Colocated (hybrid) vs prefill/decode disaggregation, same cores.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--qps", type=float, default=0.5)
    p.add_argument("--num-requests", type=int, default=30)
    p.add_argument("--prompt-len", type=int, default=64, help="Mean prompt of the chat requests.")
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--doc-prompt-len", type=int, default=1024, help="Mean prompt of the documents.")
    p.add_argument("--doc-fraction", type=float, default=0.25)
    p.add_argument("--offload-threshold", type=int, default=256)
    p.add_argument("--token-budget", type=int, default=64)
    p.add_argument("--kv-codec", choices=["raw", "lz4", "int8", "fp8"], default="raw")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--json", default=None)
    p.set_defaults(func=main)
