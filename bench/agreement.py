"""Greedy agreement of engine variants (dtype, quantization) with a reference, on a fixed prompt set.

    tandem bench-agreement [--reference float32] [--variants bfloat16 bfloat16+int8] [--new-tokens 32]

Each variant runs the same chat prompts greedily for --new-tokens tokens. Per variant it prints the
share of tokens equal to the reference's up to each prompt's first difference (a difference ends
the comparison: later tokens follow another context), how many prompts were identical throughout,
and the largest logit error up to and including the first difference. The KV-codec accuracy
benchmark (`bench-kv-accuracy`) uses the same prompts and the same comparison.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace

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


@dataclass
class Agreement:
    """How a run's greedy tokens compare with the reference's, over all prompts."""

    agreeing: int = 0
    """Tokens equal to the reference's before each prompt's first difference."""
    total: int = 0
    identical: int = 0
    """Prompts whose tokens all match."""
    prompts: int = 0
    max_logit_error: float = 0.0
    """Largest |logit - reference logit| up to and including the first difference."""

    def add(self, tokens: list[int], logits: list, ref_tokens: list[int], ref_logits: list) -> None:
        same = next((k for k, (a, b) in enumerate(zip(tokens, ref_tokens)) if a != b), len(ref_tokens))
        self.agreeing += same
        self.total += len(ref_tokens)
        self.identical += same == len(ref_tokens)
        self.prompts += 1
        for k in range(min(same + 1, len(logits), len(ref_logits))):
            err = (logits[k].float() - ref_logits[k].float()).abs().max().item()
            self.max_logit_error = max(self.max_logit_error, err)

    def row(self, name: str, extra: str = "") -> str:
        return (f"{name:<18} {extra}{self.agreeing / max(self.total, 1):>15.1%} "
                f"{self.max_logit_error:>14.4f} {self.identical:>11}/{self.prompts}")


def chat_prompts(tokenizer) -> list[list[int]]:
    return [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in PROMPTS]


def greedy(engine, rid: str, prompt: list[int], new_tokens: int, after_prefill=None):
    """Greedy tokens and per-token logits of one request run alone; `after_prefill(request)` runs
    once, right after the step that completes the prompt."""
    from scheduler.request import SamplingParams  # noqa: PLC0415

    engine.add_request(rid, prompt, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    request = engine.scheduler.get(rid)
    tokens, logits = [], []
    while engine.has_work():
        prefilled = request.num_computed_tokens >= len(prompt)
        for o in engine.step():
            tokens += o.new_token_ids
        if engine.last_logits and rid in engine.last_logits:
            logits.append(engine.last_logits[rid])
        if after_prefill is not None and not prefilled and request.num_computed_tokens >= len(prompt):
            after_prefill(request)
    return tokens, logits


def _parse_variant(text: str) -> tuple[str, str]:
    dtype, _, quant = text.partition("+")
    return dtype, quant or "none"


def main(args: argparse.Namespace) -> None:
    import torch  # noqa: PLC0415 - the CLI must not load torch for other commands

    from cluster.cli import engine_config_from_args  # noqa: PLC0415
    from engine.core import EngineCore  # noqa: PLC0415

    if args.threads:
        torch.set_num_threads(args.threads)
    base = engine_config_from_args(args)
    results = {}
    for variant in [args.reference, *args.variants]:
        dtype, quant = _parse_variant(variant)
        engine = EngineCore(replace(base, dtype=dtype, quantization=quant), keep_logits=True)
        prompts = chat_prompts(engine.tokenizer)
        results[variant] = [greedy(engine, f"{variant}-{i}", p, args.new_tokens)
                            for i, p in enumerate(prompts)]
        del engine
    reference = results[args.reference]
    print(f"{len(PROMPTS)} chat prompts, {args.new_tokens} greedy tokens each; reference {args.reference}")
    print(f"{'variant':<18} {'token agreement':>15} {'max logit err':>14} {'prompts identical':>18}")
    for variant in args.variants:
        agreement = Agreement()
        for (tokens, logits), (ref_tokens, ref_logits) in zip(results[variant], reference):
            agreement.add(tokens, logits, ref_tokens, ref_logits)
        print(agreement.row(variant))


def add_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench-agreement", help="Greedy agreement of dtypes / int8 with a reference.",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--reference", default="float32", help="DTYPE[+QUANTIZATION] to compare with.")
    p.add_argument("--variants", nargs="+", default=["bfloat16", "bfloat16+int8", "float32+int8"],
                   help="DTYPE[+QUANTIZATION] of each variant, e.g. bfloat16+int8.")
    p.add_argument("--new-tokens", type=int, default=32)
    p.set_defaults(func=main)
