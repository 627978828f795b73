"""Paged attention: the `tandem::paged_attention` op (the native decode and prefill kernels, and the
all-torch fallback) against a plain fp32 reference on gathered K/V."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402

import engine.attention as attention  # noqa: E402
from bench.attention_bench import random_paged_step  # noqa: E402
from engine.kernels import load_paged_attention  # noqa: E402

BLOCK = 16


def reference(q, cache, seqs, tables):
    """fp32 attention of each sequence's rows over its blocks (causal, aligned to the end)."""
    out = torch.empty(q.shape, dtype=torch.float32)
    hkv = cache.shape[3]
    for (q0, rows, kv_len), table in zip(seqs, tables):
        blocks = cache[torch.tensor(table)].float()
        k = blocks[:, 0].reshape(-1, hkv, cache.shape[4])[:kv_len]
        v = blocks[:, 1].reshape(-1, hkv, cache.shape[4])[:kv_len]
        group = q.shape[1] // hkv
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[q0:q0 + rows].float(), k) * q.shape[2] ** -0.5
        mask = torch.ones(rows, kv_len, dtype=torch.bool).tril(kv_len - rows)
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        out[q0:q0 + rows] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def make_step(seq_shapes, heads, kv_heads, head_dim, dtype, seed=0, short_rows=16):
    return random_paged_step(seq_shapes, heads, kv_heads, head_dim, dtype, seed, short_rows, BLOCK)


SHAPES = {
    "smollm2": (9, 3, 64),       # GQA group 3
    "tiny": (4, 2, 16),          # the test model
    "mha": (4, 4, 32),
    "one-kv-head": (8, 1, 128),
}
STEPS = {
    "decodes": [(1, 1), (1, 17), (1, 300), (1, 16), (1, 257)],
    "long-context": [(1, 1000), (1, 513), (1, 2)],                   # several key partitions
    "short-chunks": [(1, 40), (5, 5), (3, 270), (16, 600), (2, 33)],  # rows cross partitions
    "with-prefill": [(1, 50), (2, 20), (40, 40), (33, 300)],
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("step", list(STEPS))
@pytest.mark.parametrize("short_rows", [1, 16], ids=["decode-kernel-1-row", "decode-kernel-16-rows"])
def test_paged_attention_matches_reference(dtype, shape, step, short_rows):
    heads, kv_heads, head_dim = SHAPES[shape]
    steps = STEPS[step]
    steps = [x for x in steps if x[0] <= short_rows] + [x for x in steps if x[0] > short_rows]
    inputs, (seqs, tables) = make_step(steps, heads, kv_heads, head_dim, dtype, short_rows=short_rows)
    q, k, v, cache, slots = inputs[:5]
    out = torch.ops.tandem.paged_attention(*inputs, head_dim ** -0.5)
    # The step's K/V are in the cache now, where the reference reads them.
    rows = cache.view(-1, kv_heads, head_dim)
    k_rows = (slots // BLOCK) * 2 * BLOCK + slots % BLOCK
    assert torch.equal(rows[k_rows], k) and torch.equal(rows[k_rows + BLOCK], v)
    ref = reference(q, cache, seqs, tables)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (out.float() - ref).abs().max().item() < tol


def test_native_kernel_is_built_here():
    """The development machine and CI have a C compiler: the fast path must really be in use."""
    assert load_paged_attention(64, 3, 3) is not None


def test_torch_fallback_matches_native(monkeypatch):
    inputs, _ = make_step(STEPS["short-chunks"], 9, 3, 64, torch.float32, seed=3)
    native = torch.ops.tandem.paged_attention(*inputs, 0.125)
    inputs, _ = make_step(STEPS["short-chunks"], 9, 3, 64, torch.float32, seed=3)
    monkeypatch.setattr(attention, "_NATIVE", {})
    monkeypatch.setattr(attention, "load_paged_attention", lambda *a: None)
    fallback = torch.ops.tandem.paged_attention(*inputs, 0.125)
    assert (native - fallback).abs().max().item() < 1e-5


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("step", list(STEPS))
def test_flashinfer_backend_matches_reference(dtype, step):
    """FlashInfer's paged prefill kernel over the same cache layout, planned from a StepBatch."""
    import numpy as np

    from engine.step_batch import StepBatch

    heads, kv_heads, head_dim = SHAPES["smollm2"]
    (q, k, v, cache, slots, *_), (seqs, tables) = make_step(STEPS[step], heads, kv_heads, head_dim, dtype)
    width = max(len(t) for t in tables)
    batch = StepBatch(
        input_ids=np.zeros(len(q), np.int64),
        positions=np.concatenate([np.arange(kv - rows, kv) for _, rows, kv in seqs]),
        slot_mapping=slots.numpy(), seq_info=np.array(seqs, np.int32),
        block_table=np.array([t + [0] * (width - len(t)) for t in tables], np.int32),
        num_short_seqs=0, logit_rows=np.zeros(0, np.int64))
    cuda = torch.device("cuda")
    backend = attention.make_attention_backend("flashinfer", cuda, max_seqs=8, max_blocks_per_seq=width,
                                               block_size=BLOCK)
    gpu_cache = cache.to(cuda)
    attn = backend.plan(batch, heads, kv_heads, head_dim, dtype)
    out = backend.forward(q.to(cuda), k.to(cuda), v.to(cuda), gpu_cache, attn, head_dim ** -0.5)
    cache = gpu_cache.cpu()
    rows = cache.view(-1, kv_heads, head_dim)
    k_rows = (slots // BLOCK) * 2 * BLOCK + slots % BLOCK
    assert torch.equal(rows[k_rows], k) and torch.equal(rows[k_rows + BLOCK], v)
    assert (out.float().cpu() - reference(q, cache, seqs, tables)).abs().max().item() < 2e-2


def test_flashinfer_backend_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        attention.make_attention_backend("flashinfer", torch.device("cpu"), 8, 8, BLOCK)
