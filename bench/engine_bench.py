"""In-process engine benchmark: decode step time per batch size and prefill throughput, each beside
a bare model forward on the same shapes (contiguous KV, no scheduler, metadata or sampler), so the
cost of paging and batching is visible.

    tandem bench-engine [--batch-sizes 1 8 32] [--context 128] [--prefill-len 512]
"""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from engine.config import EngineConfig
from engine.core import EngineCore
from scheduler.request import SamplingParams


class ContiguousAttention:
    """Attention over one dense [B, Hkv, L, D] cache per layer: the 'bare model' reference."""

    name = "contiguous"

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.layer = 0

    def reset(self, batch: int, context: int, num_kv_heads: int, head_dim: int, dtype) -> None:
        shape = (batch, num_kv_heads, context, head_dim)
        self.keys = [torch.randn(shape, dtype=dtype) for _ in range(self.num_layers)]
        self.values = [torch.randn(shape, dtype=dtype) for _ in range(self.num_layers)]

    def plan(self, meta, num_heads, num_kv_heads, head_dim) -> None:
        self.layer = 0
        self.scale = head_dim ** -0.5

    def forward(self, q, k, v, kv_cache, meta):
        i, self.layer = self.layer, self.layer + 1
        b = self.keys[i].shape[0] if self.keys else 1
        if q.shape[0] == b and self.keys:  # decode: one new token per sequence
            keys = torch.cat([self.keys[i], k.view(b, 1, *k.shape[1:]).transpose(1, 2)], dim=2)
            values = torch.cat([self.values[i], v.view(b, 1, *v.shape[1:]).transpose(1, 2)], dim=2)
            o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, scale=self.scale, enable_gqa=True)
            return o.squeeze(2)
        o = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           is_causal=True, scale=self.scale, enable_gqa=True)
        return o.transpose(0, 1)


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _bare_forward(engine: EngineCore, backend: ContiguousAttention, positions, logit_rows: slice) -> None:
    """One model forward with contiguous attention, LM head on `logit_rows` (as the engine does)."""
    model = engine.runner.model
    ids = torch.randint(0, engine.model_config.vocab_size, positions.shape)
    with torch.inference_mode():
        hidden = model(ids, positions, engine.runner.kv_caches, None, backend)
        model.compute_logits(hidden[logit_rows])


def run_engine_bench(config: EngineConfig, batch_sizes: list[int], context: int,
                     prefill_len: int, repeats: int) -> None:
    engine = EngineCore(config)
    mc = engine.model_config
    dtype = engine.runner.dtype
    print(f"model {config.model_name}: {mc.num_layers} layers, hidden {mc.hidden_size}, "
          f"dtype {config.dtype}, {torch.get_num_threads()} threads, token budget "
          f"{config.scheduler.token_budget}, block size {config.scheduler.block_size}")
    bare = ContiguousAttention(mc.num_layers)
    rows = []
    for b in batch_sizes:
        sampling = SamplingParams(max_tokens=4 * repeats + 8, temperature=0.0, ignore_eos=True)
        for i in range(b):
            err = engine.add_request(f"bench-{b}-{i}", [(7 * i + j) % mc.vocab_size + 1 for j in range(context)], sampling)
            if err:
                raise SystemExit(f"cannot add request: {err.error}")
        while any(r.num_uncomputed_tokens > 1 for r in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill everything (not timed)
        step = _time(engine.step, repeats)
        engine.abort([f"bench-{b}-{i}" for i in range(b)])
        bare.reset(b, context, mc.num_kv_heads, mc.head_dim, dtype)
        positions = torch.full((b,), context)
        bare_t = _time(lambda: _bare_forward(engine, bare, positions, slice(None)), repeats)
        rows.append((b, step, bare_t))

    print(f"\ndecode step (context {context} tokens), median of {repeats}:")
    print(f"{'batch':>6} {'engine ms':>10} {'bare ms':>9} {'overhead':>9} {'engine tok/s':>13}")
    for b, step, bare_t in rows:
        print(f"{b:>6} {step * 1e3:>10.2f} {bare_t * 1e3:>9.2f} {step / bare_t - 1:>8.0%} {b / step:>13.1f}")

    sampling = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def engine_prefill() -> None:
        engine.add_request("bench-prefill", [(3 * j) % mc.vocab_size + 1 for j in range(prefill_len)], sampling)
        while engine.has_work():
            engine.step()

    t_engine = _time(engine_prefill, max(1, repeats // 3))
    bare.keys, bare.values = [], []
    t_bare = _time(lambda: _bare_forward(engine, bare, torch.arange(prefill_len), slice(-1, None)),
                   max(1, repeats // 3))
    print(f"\nprefill of {prefill_len} tokens (engine chunks it by the token budget):")
    print(f"  engine {prefill_len / t_engine:>9.0f} tok/s  ({t_engine * 1e3:.1f} ms)")
    print(f"  bare   {prefill_len / t_bare:>9.0f} tok/s  ({t_bare * 1e3:.1f} ms, one forward)")
