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

from scheduler.request import SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def quicksort(arr):\n    ",
    "Explain the difference between a process and a thread in one paragraph.",
    "List three prime numbers greater than 100:",
    "Once upon a time, in a village at the edge of a forest, there lived",
    "Translate to French: 'The weather is nice today.'",
    "The three laws of thermodynamics are",
]


def _run(engine, rid: str, prompt: list[int], new_tokens: int, codec) -> tuple[list[int], list, float]:
    """Greedy decode; with `codec`, the prompt's KV is encoded+decoded in place after prefill."""
    engine.add_request(rid, prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    tokens, logits, ratio = [], [], 1.0
    request = engine.scheduler.get(rid)
    while engine.has_work():
        prefilled = request.num_computed_tokens >= len(prompt)
        outs = engine.step()
        for o in outs:
            tokens += o.new_token_ids
        if engine.last_logits and rid in engine.last_logits:
            logits.append(engine.last_logits[rid])
        if codec is not None and not prefilled and request.num_computed_tokens >= len(prompt):
            ratio = _roundtrip(engine, request.block_ids, codec)
    return tokens, logits, ratio


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
    from cluster.cli import _engine_config  # noqa: PLC0415
    from engine.core import EngineCore  # noqa: PLC0415
    from kv_transfer.codecs import get_codec  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    engine = EngineCore(_engine_config(args), keep_logits=True)
    prompts = [engine.tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]
    reference = [_run(engine, f"ref-{i}", p, args.new_tokens, None) for i, p in enumerate(prompts)]
    print(f"{len(prompts)} prompts, {args.new_tokens} greedy tokens each, {engine.config.dtype} KV")
    print(f"{'codec':<6} {'ratio':>6} {'token agreement':>16} {'max logit err':>14} {'prompts identical':>18}")
    for name in args.codecs:
        codec = get_codec(name)
        agree = total = identical = 0
        max_err, ratios = 0.0, []
        for i, p in enumerate(prompts):
            tokens, logits, ratio = _run(engine, f"{name}-{i}", p, args.new_tokens, codec)
            ref_tokens, ref_logits, _ = reference[i]
            ratios.append(ratio)
            same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(tokens))
            agree += same
            total += len(ref_tokens)
            identical += same == len(ref_tokens)
            for k in range(min(same + 1, len(logits))):   # up to and including the first difference
                max_err = max(max_err, (logits[k] - ref_logits[k]).abs().max().item())
        print(f"{name:<6} {sum(ratios) / len(ratios):>6.2f} {agree / total:>15.1%} {max_err:>14.4f} "
              f"{identical:>11}/{len(prompts)}")


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench-kv-accuracy", help="Greedy agreement and logit error of lossy KV codecs.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--codecs", nargs="+", default=["raw", "lz4", "int8", "fp8"])
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(func=main)
