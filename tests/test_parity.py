"""Parity with HF transformers on the same weights, through the real engine path.

A batch of prompts of different lengths runs with a token budget smaller than the longest prompt,
so prefills are chunked and mixed with decodes; every sampled position must give HF's logits (fp32,
tight tolerance) and HF's own greedy tokens for each request alone (up to the first near-tie) --
also when a KV cache too small for the batch forces preemptions (recompute).
"""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams

PROMPT_LENS = (5, 37, 70, 130, 17)
NEW_TOKENS = 12
NEAR_TIE = 1e-3

CONFIGS = {
    "gqa-untied": {},
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "gqa-bias-theta": dict(attention_bias=True, rope_theta=500000.0, num_key_value_heads=1),
    "llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
}


def run_engine(model_dir, prompts, budget=32, num_kv_blocks=64, block_size=16, stats=None, **options):
    """Greedy decode of every prompt at once -> (tokens, logits at sampled positions, steps that
    mixed a prefill chunk with decodes, graphs compiled after warm-up); `stats`, a dict if given,
    gets the scheduler's `preemptions`."""
    options.setdefault("dtype", "float32")
    cfg = EngineConfig(model_dir=str(model_dir), num_kv_blocks=num_kv_blocks, **options,
                       scheduler=SchedulerConfig(token_budget=budget, max_num_seqs=8,
                                                 block_size=block_size, max_model_len=512))
    engine = EngineCore(cfg, keep_logits=True)
    sampling = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(prompts):
        assert engine.add_request(f"r{i}", p, sampling) is None
    logits = {f"r{i}": [] for i in range(len(prompts))}
    tokens = {f"r{i}": [] for i in range(len(prompts))}
    mixed_steps = 0
    while engine.has_work():
        outs = engine.step()
        engine.scheduler.check_integrity()
        s = engine.last_step
        mixed_steps += s.num_prefill_tokens > 0 and s.num_decode_tokens > 0
        for rid, row in (engine.last_logits or {}).items():
            logits[rid].append(row)
        for o in outs:
            tokens[o.request_id].extend(o.new_token_ids)
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks
    if stats is not None:
        stats["preemptions"] = engine.scheduler.num_preemptions
    return tokens, logits, mixed_steps, engine.runner.recompiles_since_warmup


def random_prompts(vocab, lens, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lens]


def compare_with_hf(hf, prompts, tokens, logits, atol):
    for i, prompt in enumerate(prompts):
        rid = f"r{i}"
        out = tokens[rid]
        assert len(out) == NEW_TOKENS
        ids = torch.tensor([prompt + out[:-1]])
        with torch.no_grad():
            ref = hf(ids).logits[0, len(prompt) - 1:].float()
        mine = torch.stack(logits[rid])
        err = (ref - mine).abs().max().item()
        assert err < atol, f"{rid}: max logit error {err:.2e}"

        gen = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                          return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
        hf_tokens = gen.sequences[0, len(prompt):].tolist()
        for step, raw in enumerate(gen.logits):
            top2 = raw[0].float().topk(2).values
            if (top2[0] - top2[1]).item() < NEAR_TIE:
                break
            assert out[step] == hf_tokens[step], f"{rid}: token {step} differs from HF generate"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_llama_matches_hf_with_chunked_mixed_batches(make_tiny_model, name):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(**CONFIGS[name])
    prompts = random_prompts(49152, PROMPT_LENS)
    tokens, logits, mixed, _ = run_engine(model_dir, prompts, budget=32)
    assert mixed > 0, "no step mixed a prefill chunk with decodes"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    compare_with_hf(hf, prompts, tokens, logits, atol=1e-4)


def test_preemption_by_recompute_matches_hf(tiny_model_dir):
    """A KV cache too small for the batch (16 blocks of 4 tokens for 8 requests wanting 40 blocks):
    requests are preempted mid-decode, their KV dropped, and recomputed (prompt + tokens so far)
    when they resume. Each still gets HF's logits at every sampled position and HF's own greedy
    tokens for that prompt alone."""
    from transformers import AutoModelForCausalLM

    prompts = random_prompts(49152, (9, 14, 21, 30, 17, 25, 12, 6), seed=3)
    stats = {}
    tokens, logits, _, _ = run_engine(tiny_model_dir, prompts, budget=32, num_kv_blocks=16, block_size=4,
                                      stats=stats)
    assert stats["preemptions"] > 0, "the cache was big enough: nothing was preempted"
    hf = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    compare_with_hf(hf, prompts, tokens, logits, atol=1e-4)
    for i, prompt in enumerate(prompts):   # every token, not only up to a near-tie (none is closer than 5e-5)
        gen = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert tokens[f"r{i}"] == gen[0, len(prompt):].tolist(), f"r{i} differs from HF generate"


def test_block_size_and_budget_do_not_change_results(tiny_model_dir):
    prompts = random_prompts(49152, PROMPT_LENS, seed=7)
    a, *_ = run_engine(tiny_model_dir, prompts, budget=16, block_size=4, num_kv_blocks=256)
    b, *_ = run_engine(tiny_model_dir, prompts, budget=256, block_size=16, num_kv_blocks=64)
    assert a == b


def test_compiled_forward_matches_hf_without_recompiling(make_tiny_model):
    """The serving path (`--compile`: inductor, frozen weights, dynamic rows) in fp32: HF's logits
    and tokens over steps of 1 to 5 sequences and 5 to 32 rows, all on the warm-up's graph."""
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model()
    prompts = random_prompts(49152, PROMPT_LENS, seed=5)
    tokens, logits, mixed, recompiles = run_engine(model_dir, prompts, budget=32, compile=True)
    assert mixed > 0
    assert recompiles == 0, f"{recompiles} graph(s) compiled while serving"
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    compare_with_hf(hf, prompts, tokens, logits, atol=1e-4)


def test_compiled_int8_matches_eager_int8(make_tiny_model):
    """int8 linears branch on the row count (int8 kernel or dequantized GEMM): both graphs are
    compiled at warm-up, and compiled and eager agree."""
    model_dir = make_tiny_model()
    prompts = random_prompts(49152, PROMPT_LENS, seed=6)
    eager, eager_logits, *_ = run_engine(model_dir, prompts, quantization="int8")
    compiled, compiled_logits, _, recompiles = run_engine(model_dir, prompts, quantization="int8",
                                                          compile=True)
    assert recompiles == 0
    assert compiled == eager
    err = max((torch.stack(compiled_logits[r]) - torch.stack(eager_logits[r])).abs().max().item()
              for r in eager)
    assert err < 1e-3


@pytest.mark.slow
def test_smollm2_from_gguf_matches_hf(smollm2_dir):
    """Our GGUF conversion (dequantize, undo llama.cpp's Q/K permutation) against transformers
    loading the same GGUF file itself: the two paths share no conversion code."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.weights import default_gguf_path

    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    texts = ["The capital of France is", "def fibonacci(n):\n    ",
             "Once upon a time, in a land far away, there lived a " * 6]
    prompts = [tok(t)["input_ids"] for t in texts]
    tokens, logits, mixed, _ = run_engine(smollm2_dir, prompts, budget=64, num_kv_blocks=128)
    assert mixed > 0
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    compare_with_hf(hf, prompts, tokens, logits, atol=5e-4)
