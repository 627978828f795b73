"""Accuracy of the lossy KV codecs with the real model: what a decode replica would compute from
KV that crossed the wire as int8 or fp8, against the lossless handoff.

For each prompt of a fixed set: prefill, then (lossy runs) pass the prompt's KV through the codec
in place, then decode greedily. Prints per codec: compression ratio of the prompt KV, greedy-token
agreement with the lossless run (tokens equal up to the first difference, over all prompts) and
the max logit error before the first difference.

    tandem bench-kv-accuracy [--new-tokens 32]
"""
from __future__ import annotations

import argparse
from dataclasses import replace

from bench.agreement import Agreement, chat_prompts, greedy


def _roundtrip(engine, block_ids: list[int], codec) -> float:
    import torch  # noqa: PLC0415 - the CLI must not load torch for other commands

    raw = wire = 0
    idx = torch.tensor(block_ids)
    for cache in engine.runner.kv_caches:
        blocks = cache.index_select(0, idx)
        meta, buffers = codec.encode(blocks)
        wire += sum(memoryview(b).nbytes for b in buffers)
        raw += blocks.numel() * blocks.element_size()
        out = torch.empty_like(blocks)
        codec.decode(meta, buffers, out)
        cache.index_copy_(0, idx, out)
    return raw / wire


def main(args: argparse.Namespace) -> None:
    from cluster.cli import engine_config_from_args  # noqa: PLC0415
    from engine.core import EngineCore  # noqa: PLC0415
    from kv_transfer.codecs import get_codec  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = engine_config_from_args(args)
    # Every run must prefill its prompt itself and round-trip KV that only it holds: with prefix
    # caching a run would share (and round-trip in place) the reference run's cached blocks.
    cfg = replace(cfg, scheduler=replace(cfg.scheduler, enable_prefix_caching=False))
    engine = EngineCore(cfg, keep_logits=True)
    prompts = chat_prompts(engine.tokenizer)
    reference = [greedy(engine, f"ref-{i}", p, args.new_tokens) for i, p in enumerate(prompts)]
    print(f"{len(prompts)} prompts, {args.new_tokens} greedy tokens each, "
          f"{str(engine.runner.dtype).removeprefix('torch.')} KV")
    print(f"{'codec':<18} {'ratio':>6} {'token agreement':>15} {'max logit err':>14} {'prompts identical':>18}")
    for name in args.codecs:
        codec = get_codec(name)
        agreement, ratios = Agreement(), []

        def roundtrip(request) -> None:
            ratios.append(_roundtrip(engine, request.block_ids, codec))

        for i, p in enumerate(prompts):
            tokens, logits = greedy(engine, f"{name}-{i}", p, args.new_tokens, roundtrip)
            agreement.add(tokens, logits, *reference[i])
        print(agreement.row(name, f"{sum(ratios) / len(ratios):>6.2f} "))


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench-kv-accuracy", help="Greedy agreement and logit error of lossy KV codecs.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--codecs", nargs="+", default=["raw", "lz4", "int8", "fp8"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(func=main)
