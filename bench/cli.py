"""`tandem bench`, `tandem capacity` and `tandem plot`: load runs against any OpenAI-compatible
server, the capacity search, and plots of their JSON results. `add_bench_commands(subparsers)`
registers them on the `tandem` CLI; `python -m bench.cli ...` runs them standalone."""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import textwrap
import time
from dataclasses import asdict
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8000"

WORKLOAD_EPILOG = """\
workload examples (TRACES: a folder of Sarathi-Serve / Splitwise length-trace CSVs):
  --qps 4 --prompt-len 256 --output-len 64                        fixed lengths, Poisson arrivals
  --arrival gamma --cv 3 --qps 4                                   bursty arrivals
  --length-dist lognormal --prompt-len 256 --sigma 0.8             lognormal lengths (means given)
  --length-dist zipf --prompt-len 200 --max-prompt-tokens 2000     heavy-tailed lengths
  --length-dist chat-doc --doc-fraction 0.2 --doc-prompt-len 2048  chat + long documents
  --trace-csv TRACES/arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv \\
      --length-scale 0.25 --max-prompt-tokens 1024 --max-output-tokens 128 --qps 1
  --trace-csv TRACES/splitwise_conv.csv --arrival trace --length-scale 0.25
  --trace-jsonl trace.jsonl            replay {"arrival_s", "prompt_tokens", "output_tokens"} lines
  --turns 4 --system-prompt-len 256 --prompt-len 64 --output-len 32 --qps 2 --token-ids
                                       multi-turn chats behind a shared system prompt
Prompts are words that are one token each for SmolLM2/Llama/GPT-2 style tokenizers (see
--tokens-per-word), or exact token ids with --token-ids."""


def _add_client_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server and client")
    g.add_argument("--url", default=DEFAULT_URL,
                   help=f"Server base URL, .../v1, or .../v1/completions (default {DEFAULT_URL}).")
    g.add_argument("--model", default=None, help="Model id to request (default: first id of /v1/models).")
    g.add_argument("--api-key", default=None,
                   help="Bearer token (default: $OPENAI_API_KEY or $TANDEM_API_KEY if set).")
    g.add_argument("--timeout", type=float, default=120.0,
                   help="Seconds one request may take in total before it counts as failed (default 120).")
    g.add_argument("--tokens-per-word", type=float, default=1.0,
                   help="Tokens the server's tokenizer makes of one prompt word (default 1.0: exact for "
                        "SmolLM2, Llama, GPT-2 vocabularies).")
    g.add_argument("--token-ids", action="store_true",
                   help="Send prompts as lists of token ids (exact lengths; Tandem and vLLM accept them).")
    g.add_argument("--label", default=None,
                   help="Name of this run in the JSON and in plots (e.g. the policy: sarathi, vllm).")
    g.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="Write results as JSON here.")
    g.add_argument("--no-progress", action="store_true", help="Do not show a progress bar.")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--num-requests", type=int, default=None,
                   help="Requests per run (default 100; with --trace-jsonl: all of its lines).")
    g.add_argument("--seed", type=int, default=0, help="Seed of all random choices (default 0).")
    g.add_argument("--arrival", choices=["poisson", "gamma", "constant", "trace"], default=None,
                   help="Arrival process (default poisson; trace with --trace-jsonl). 'trace' replays the "
                        "arrived_at column of an Azure CSV (a window of rows at a seeded offset).")
    g.add_argument("--cv", type=float, default=1.0,
                   help="Gamma arrivals: coefficient of variation of the gaps (1 = Poisson, >1 burstier).")
    g.add_argument("--length-dist", default=None,
                   choices=["fixed", "uniform", "lognormal", "zipf", "chat-doc", "arxiv", "arxiv-paper",
                            "trace"],
                   help="Length distribution (default fixed; trace with --trace-csv). --prompt-len and "
                        "--output-len are the values (fixed) or the means. arxiv / arxiv-paper: "
                        "synthetic arXiv-summarization lengths (the 4k-filtered trace's statistics / "
                        "the Sarathi-Serve paper's), no trace file needed.")
    g.add_argument("--prompt-len", type=int, default=128, help="Prompt tokens, value or mean (default 128).")
    g.add_argument("--output-len", type=int, default=64, help="Output tokens, value or mean (default 64).")
    g.add_argument("--spread", type=float, default=0.5,
                   help="uniform: lengths on mean x [1 - spread, 1 + spread] (default 0.5).")
    g.add_argument("--sigma", type=float, default=0.5, help="lognormal/chat-doc: sigma of log(length).")
    g.add_argument("--doc-prompt-len", type=int, default=None,
                   help="chat-doc: mean prompt of the long documents (default 8 x --prompt-len).")
    g.add_argument("--doc-fraction", type=float, default=0.2, help="chat-doc: share of long documents.")
    g.add_argument("--trace-csv", default=None, metavar="PATH",
                   help="Sample lengths (and with --arrival trace, arrivals) from a CSV trace with columns "
                        "num_prefill_tokens, num_decode_tokens[, arrived_at] (read in place).")
    g.add_argument("--trace-jsonl", default=None, metavar="PATH",
                   help="Replay a JSONL trace of {arrival_s, prompt_tokens, output_tokens}; --qps, if given, "
                        "rescales its arrival times to that mean rate.")
    g.add_argument("--length-scale", type=float, default=1.0,
                   help="Multiply all lengths by this before capping (e.g. 0.25 to fit a small model).")
    g.add_argument("--max-prompt-tokens", type=int, default=None, help="Cap on prompt tokens.")
    g.add_argument("--max-output-tokens", type=int, default=None, help="Cap on output tokens.")
    g.add_argument("--turns", type=int, default=1,
                   help="Multi-turn chats: requests come in conversations of this many turns; "
                        "--prompt-len/--output-len are then each turn's new message and answer, and "
                        "turn k's prompt repeats the conversation so far (earlier messages and "
                        "stand-ins of their answers) before its message, so a prefix cache can "
                        "reuse it. Conversations start at --qps / --turns (default 1: no chats).")
    g.add_argument("--system-prompt-len", type=int, default=0,
                   help="Tokens of a system prompt every request starts with, the same for all "
                        "(default 0).")
    g.add_argument("--turn-gap-s", type=float, default=10.0,
                   help="Multi-turn chats: seconds between a conversation's turns (default 10).")
    g.add_argument("--dump-workload", default=None, metavar="PATH",
                   help="Also write the generated workload as JSONL (replayable with --trace-jsonl).")


def add_search_args(p: argparse.ArgumentParser, *, tolerance: float = 0.1, max_qps: float = 64.0,
                    max_trials: int = 12,
                    delay_help: str = "Median TTFT limit in s (proxy for the paper's 2 s median "
                                      "scheduling delay).") -> None:
    """The capacity criteria and search options (`tandem capacity`, `tandem sim capacity`)."""
    p.add_argument("--tbt-slo-ms", type=float, required=True, help="P99 time-between-tokens SLO in ms.")
    p.add_argument("--max-p50-ttft-s", type=float, default=2.0, help=delay_help)
    p.add_argument("--max-error-fraction", type=float, default=0.0,
                   help="Share of failed requests (timeouts, 429/503...) a passing trial may have "
                        "(default 0).")
    p.add_argument("--start-qps", type=float, default=1.0, help="First rate tried (default 1).")
    p.add_argument("--min-qps", type=float, default=0.05, help="Lowest rate tried (default 0.05).")
    p.add_argument("--max-qps", type=float, default=max_qps, help=f"Highest rate tried (default {max_qps:g}).")
    p.add_argument("--tolerance", type=float, default=tolerance,
                   help=f"Stop when the failing rate is within this fraction above the passing one "
                        f"({tolerance:g}).")
    p.add_argument("--max-trials", type=int, default=max_trials, help=f"Most trials (default {max_trials}).")


def workload_config(args: argparse.Namespace):
    from bench.workload import WorkloadConfig

    arrival = args.arrival or ("trace" if args.trace_jsonl else "poisson")
    dist = args.length_dist or ("trace" if (args.trace_csv or args.trace_jsonl) else "fixed")
    return WorkloadConfig(
        num_requests=args.num_requests if (args.num_requests or args.trace_jsonl) else 100,
        seed=args.seed, arrival=arrival, cv=args.cv, length_dist=dist, prompt_len=args.prompt_len,
        output_len=args.output_len, spread=args.spread, sigma=args.sigma,
        doc_prompt_len=args.doc_prompt_len, doc_fraction=args.doc_fraction, trace_csv=args.trace_csv,
        trace_jsonl=args.trace_jsonl, length_scale=args.length_scale,
        max_prompt_tokens=args.max_prompt_tokens, max_output_tokens=args.max_output_tokens,
        turns=args.turns, system_prompt_len=args.system_prompt_len, turn_gap_s=args.turn_gap_s)


def _api_key(args) -> str | None:
    return args.api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("TANDEM_API_KEY")


def _prompts(args):
    from bench.workload import PromptBuilder

    return PromptBuilder(tokens_per_word=args.tokens_per_word, token_ids=args.token_ids, seed=args.seed)


def _run(args, workload, model: str | None, run_timeout_s: float | None, title: str,
         tenant_keys: dict[str, str] | None = None):
    """One load run with a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from bench.client import run_load

    console = Console(stderr=True)
    show = not args.no_progress and console.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True, disable=not show) as bar:
        task = bar.add_task(title, total=len(workload))
        errors = 0

        def on_done(r) -> None:
            nonlocal errors
            errors += not r.ok
            bar.update(task, advance=1, description=f"{title} ({errors} errors)" if errors else title)

        return asyncio.run(run_load(workload, args.url, model=model, api_key=_api_key(args),
                                    timeout_s=args.timeout, run_timeout_s=run_timeout_s,
                                    prompts=_prompts(args), on_done=on_done,
                                    tenant_keys=tenant_keys))


def write_json(path: str | None, data: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=1) + "\n")
        print(f"wrote {path}")


def cmd_bench(args: argparse.Namespace) -> None:
    from bench.report import SLO, format_table, summarize
    from bench.workload import TenantStream, build_workload, tenant_workload

    try:
        cfg = workload_config(args)
        tenants = [TenantStream.parse(t) for t in args.tenant or ()]
        if tenants:
            if args.qps is not None:
                raise ValueError("--qps and --tenant exclude each other: each tenant has its rate")
            workload = tenant_workload(cfg, tenants)
        else:
            if args.qps is None and cfg.arrival != "trace":
                raise ValueError(f"--qps is needed with --arrival {cfg.arrival}")
            workload = build_workload(cfg, args.qps)
        slo = SLO(ttft_s=args.ttft_slo_ms / 1000 if args.ttft_slo_ms else None,
                  tbt_s=args.tbt_slo_ms / 1000 if args.tbt_slo_ms else None)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    if args.dump_workload:
        workload.to_jsonl(args.dump_workload)
    run = _run(args, workload, args.model, args.run_timeout, f"{len(workload)} requests",
               {t.name: t.api_key for t in tenants if t.api_key})
    wl = {**workload.summary(), "qps": args.qps, "config": asdict(cfg),
          "prompt_mode": "token_ids" if args.token_ids else f"words x{args.tokens_per_word:g}"}
    summary = summarize(run, slo, label=args.label, workload=wl)
    print(format_table(summary))
    write_json(args.json_out, summary)


def search_config(args: argparse.Namespace):
    """(WorkloadConfig, CapacityCriteria) of `add_workload_args` + `add_search_args` options,
    the workload built once to validate it; ValueError/OSError name what is wrong."""
    from bench.capacity import CapacityCriteria
    from bench.workload import build_workload

    cfg = workload_config(args)
    criteria = CapacityCriteria(tbt_slo_s=args.tbt_slo_ms / 1000, max_p50_ttft_s=args.max_p50_ttft_s,
                                max_error_fraction=args.max_error_fraction)
    build_workload(cfg, args.start_qps)
    return cfg, criteria


def cmd_capacity(args: argparse.Namespace) -> None:
    from bench.capacity import TrialResult, find_capacity, judge
    from bench.client import fetch_model
    from bench.report import summarize
    from bench.workload import build_workload

    try:
        cfg, criteria = search_config(args)   # validated before touching the server
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    model = args.model or asyncio.run(fetch_model(args.url, _api_key(args)))
    print(f"capacity of {model} at {args.url}: P99 TBT <= {args.tbt_slo_ms:g} ms, "
          f"P50 TTFT <= {args.max_p50_ttft_s:g} s, errors <= {args.max_error_fraction:.0%}")
    print(f"{'trial':>5} {'qps':>8} {'achieved':>9} {'p99 TBT ms':>11} {'p50 TTFT s':>11} "
          f"{'errors':>7}  result")

    def run_trial(qps: float) -> TrialResult:
        workload = build_workload(cfg, qps)
        run = _run(args, workload, model, args.trial_timeout, f"trial at {qps:.3g} qps")
        s = summarize(run, None, label=args.label, workload=workload.summary(), include_requests=False)
        t = TrialResult(qps, s["tbt_s"]["p99"], s["ttft_s"]["p50"], s["num_requests"], s["num_errors"],
                        summary=s)
        time.sleep(args.cooldown)
        return judge(t, criteria)

    def on_trial(t: TrialResult) -> None:
        tbt = "-" if t.p99_tbt_s is None else f"{t.p99_tbt_s * 1000:.1f}"
        ttft = "-" if t.p50_ttft_s is None else f"{t.p50_ttft_s:.3f}"
        print(f"{len(trials_seen) + 1:>5} {t.qps:>8.3f} {t.summary.get('request_throughput', 0):>9.3f} "
              f"{tbt:>11} {ttft:>11} {t.num_errors:>7}  {'PASS' if t.passed else 'FAIL: ' + t.reason}",
              flush=True)
        trials_seen.append(t)

    trials_seen: list[TrialResult] = []
    result = find_capacity(run_trial, start_qps=args.start_qps, min_qps=args.min_qps,
                           max_qps=args.max_qps, tolerance=args.tolerance, max_trials=args.max_trials,
                           on_trial=on_trial)
    cap = ("none (even the lowest rate failed)" if result.capacity_qps is None
           else f"{result.capacity_qps:.3f} qps")
    print(f"capacity: {cap} [{result.status}; bracket {result.lo_qps} .. {result.hi_qps}]")
    write_json(args.json_out, {
        "kind": "capacity", "label": args.label, "url": args.url, "model": model,
        "tbt_slo_ms": args.tbt_slo_ms, "criteria": asdict(criteria), "workload": asdict(cfg),
        "search": {"start_qps": args.start_qps, "min_qps": args.min_qps, "max_qps": args.max_qps,
                   "tolerance": args.tolerance, "max_trials": args.max_trials},
        **result.to_dict()})


def cmd_plot(args: argparse.Namespace) -> None:
    from bench.plots import make_plots

    try:
        made = make_plots(args.results, args.out)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    for p in made:
        print(f"wrote {p}")
    if not made:
        print("nothing to plot")


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def add_bench_commands(subparsers) -> None:
    """Register `bench`, `capacity` and `plot` on an argparse subparsers object."""
    fmt = argparse.RawDescriptionHelpFormatter
    b = subparsers.add_parser(
        "bench", help="Load-test an OpenAI-compatible server; latency percentiles and goodput.",
        formatter_class=fmt, epilog=WORKLOAD_EPILOG,
        description=_wrap("Send a workload to /v1/completions open loop (each request at its arrival time, "
                    "streaming, ignore_eos, temperature 0) and report P50/P90/P99 TTFT, time between "
                    "tokens (all gaps pooled) and end-to-end latency, throughput, and goodput under "
                    "optional SLOs. Example: tandem bench --url http://127.0.0.1:8000 --qps 2 "
                    "--num-requests 50 --prompt-len 256 --output-len 64 --json out.json"))
    b.add_argument("--qps", type=float, default=None,
                   help="Mean request rate (needed unless arrivals come from a trace, where it "
                        "rescales them).")
    b.add_argument("--tenant", action="append", default=None, metavar="NAME=QPS[:API_KEY]",
                   help="Per-tenant load (repeatable, instead of --qps): each tenant its own "
                        "arrival stream at QPS, sent with API_KEY (a server key named for the "
                        "tenant) or else with the `user` field set to NAME. --num-requests is the "
                        "total, split in proportion to the rates. The report adds per-tenant TTFT, "
                        "TBT, tokens/s and 429s. Example: --tenant flood=10 --tenant quiet=1")
    b.add_argument("--run-timeout", type=float, default=None,
                   help="Seconds for the whole run (default: last arrival + --timeout + 5); unfinished "
                        "requests then count as failed.")
    b.add_argument("--ttft-slo-ms", type=float, default=None, help="Goodput: TTFT SLO in ms.")
    b.add_argument("--tbt-slo-ms", type=float, default=None,
                   help="Goodput: SLO on each request's own P99 time between tokens, in ms.")
    add_workload_args(b)
    _add_client_args(b)
    b.set_defaults(func=cmd_bench)

    c = subparsers.add_parser(
        "capacity", help="Largest request rate that keeps P99 TBT and median TTFT within SLO.",
        formatter_class=fmt, epilog=WORKLOAD_EPILOG,
        description=_wrap("Sarathi-Serve's capacity: the largest QPS whose run keeps P99 time between tokens "
                    "<= --tbt-slo-ms and median scheduling delay <= 2 s. A client cannot see scheduling "
                    "delay, so this checks median TTFT (scheduling delay + prefill) <= --max-p50-ttft-s "
                    "instead, which is slightly stricter. Trials double the rate from --start-qps until one "
                    "fails (or halve it until one passes), then bisect to --tolerance. Each trial is one "
                    "bench run of --num-requests requests (same seed, so the same lengths at every rate), "
                    "bounded by --trial-timeout. Example: tandem capacity --url http://127.0.0.1:8000 "
                    "--tbt-slo-ms 200 --num-requests 40 --prompt-len 256 --output-len 32 --json cap.json"))
    add_search_args(c)
    c.add_argument("--trial-timeout", type=float, default=None,
                   help="Seconds per trial (default: last arrival + --timeout + 5).")
    c.add_argument("--cooldown", type=float, default=1.0, help="Seconds of idle between trials (default 1).")
    add_workload_args(c)
    _add_client_args(c)
    c.set_defaults(func=cmd_capacity)

    pl = subparsers.add_parser(
        "plot", help="Plot bench/capacity JSON results (PNG).",
        description="From bench and capacity JSONs (runs labelled with --label): latency-throughput "
                    "curves per label, capacity bars per label and TBT SLO, and TBT CDFs. Example: "
                    "tandem plot results/*.json --out docs/img")
    pl.add_argument("results", nargs="+", help="bench or capacity JSON files.")
    pl.add_argument("--out", default="plots", help="Output directory (default ./plots).")
    pl.set_defaults(func=cmd_plot)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="tandem", description="Tandem benchmarks.")
    add_bench_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main(sys.argv[1:])
