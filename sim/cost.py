"""Step-time cost models: how long one engine step running a `SchedulerOutput` takes.

One interface, `CostModel.step_time(out) -> seconds`, read *before* `scheduler.update(out, ...)`
(a chunk's `start` is then still the number of tokens cached before it). Two models:

`ProfiledCost` wraps the `scheduler.budget.StepTimeModel` fitted from a `tandem profile` JSON:
    t = c0 + c1*P + c2*D + c3*sum(decode ctx) + c4*sum(p * start over prefill chunks)
which is the fitted model's own formula with each sequence's context used instead of one context
per batch (the profile times steps whose sequences share one context, so both agree there).

`RooflineCost` is a per-layer roofline for a Llama-style decoder on a GPU (`sim/specs.py`):
  - GEMMs: max(2 * params * tokens / (peak * E_GEMM), (weight + activation bytes) / (bw * E_MEM));
  - attention: max(4 * heads * head_dim * sum p * (ctx + p/2) / (peak * E_ATTN),
                   KV bytes read (each chunk's prefix + itself, every decode's context) / (bw * E_MEM));
  - the LM head for the rows that sample (one per chunk that reaches the end of its request);
  - TP over n GPUs: every matrix, head and KV head is split n ways (KV heads by whole GQA groups,
    the most loaded rank sets the pace), plus 2 all-reduces of tokens * hidden per layer:
    ring 2(n-1)/n * S / (link bw * E_LINK) + the link's latency;
  - host time: HOST_STEP_S per step + HOST_SEQ_S per sequence (Python scheduling, input
    preparation, sampling, output framing; not overlapped with the GPU, as in this engine).

Limits: no kernel-launch or wave-quantisation effects, no pipeline parallelism yet (one stage),
no overlap of communication with compute, the same efficiencies at every shape. The efficiency
factors below are a priori estimates with their reasons, not fitted to any result.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from engine.model_config import DTYPE_BYTES
from scheduler.budget import ProfileSample, StepTimeModel, samples_from_json
from scheduler.core import SchedulerOutput
from sim.specs import Device, Link, ModelSpec, get_link

E_GEMM = 0.7
"""Share of peak tensor FLOP/s that large bf16 GEMMs reach: cuBLAS on A100/H100 runs LLM-shaped
GEMMs (thousands of rows) at roughly 70-80% of peak; the low end, since the rows are fewer."""
E_ATTN = 0.5
"""Share of peak that prefill attention reaches: FlashAttention-2 reports 50-73% of A100 peak in
the forward pass; the low end, since chunked prefill over a paged cache is less regular."""
E_MEM = 0.8
"""Share of peak memory bandwidth that streaming kernels (weight and KV reads) reach: bandwidth
tests on HBM GPUs typically measure 80-90% of the datasheet figure."""
E_LINK = 0.8
"""Share of a link's bandwidth a ring all-reduce gets as bus bandwidth (nccl-tests on NVLink
A100 systems report about 230-240 GB/s of the 300 GB/s per direction)."""
HOST_STEP_S = 2e-3
"""Host work of one step in a Python engine (scheduling, building inputs, launching, sampling,
framing outputs), not overlapped with the GPU: a few ms in synchronous Python engines."""
HOST_SEQ_S = 10e-6
"""Host work per sequence in a step (its slot in the input tensors, sampling, detokenising)."""


class CostModel(Protocol):
    def step_time(self, out: SchedulerOutput) -> float:
        """Seconds the step running `out` takes (called before `update`)."""


class ProfiledCost:
    """A `StepTimeModel` (from `tandem profile`) as a cost model."""

    def __init__(self, model: StepTimeModel) -> None:
        if len(model.coef) != 5:
            raise ValueError(f"expected a 5-coefficient StepTimeModel, got {len(model.coef)}")
        self.model = model
        self.coef = tuple(model.coef)

    @classmethod
    def from_json(cls, path: str | Path) -> "ProfiledCost":
        """Fit from a `tandem profile` JSON ({"samples": [...]})."""
        rows = json.loads(Path(path).read_text())["samples"]
        return cls(StepTimeModel.fit(samples_from_json(rows)))

    def step_time(self, out: SchedulerOutput) -> float:
        c0, c1, c2, c3, c4 = self.coef
        p = d = 0
        d_ctx = p_ctx = 0.0
        for c in out.chunks:
            n = c.num_tokens
            start = c.request.num_computed_tokens
            if n == 1 and c.samples:
                d += 1
                d_ctx += start
            else:
                p += n
                p_ctx += n * start
        return max(0.0, c0 + c1 * p + c2 * d + c3 * d_ctx + c4 * p_ctx)

    def step_model(self) -> StepTimeModel:
        return self.model


class RooflineCost:
    """Per-layer roofline of one replica (TP over `tp` GPUs of `device`); see the module doc."""

    def __init__(self, model: ModelSpec, device: Device, tp: int = 1, dtype: str = "bfloat16",
                 tp_link: Link | None = None, host_step_s: float = HOST_STEP_S,
                 host_seq_s: float = HOST_SEQ_S, e_gemm: float = E_GEMM, e_attn: float = E_ATTN,
                 e_mem: float = E_MEM, e_link: float = E_LINK) -> None:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.model, self.device, self.tp, self.dtype = model, device, tp, dtype
        self.link = tp_link or get_link(device.intra_link)
        self.host_step_s, self.host_seq_s = host_step_s, host_seq_s
        self.e_gemm, self.e_attn, self.e_mem, self.e_link = e_gemm, e_attn, e_mem, e_link
        b = DTYPE_BYTES[dtype]
        m = model
        kv_heads = m.max_kv_heads_per_rank(tp)
        heads = kv_heads * (m.num_heads // m.num_kv_heads)
        self._flops = device.peak_flops
        self._bw = device.mem_bw
        self._gemm_params = m.params_per_layer / tp
        self._gemm_weight_bytes = m.params_per_layer * b / tp
        io = (m.hidden_size + (m.num_heads + 2 * m.num_kv_heads) * m.head_dim  # qkv in/out
              + m.num_heads * m.head_dim + m.hidden_size                        # o in/out
              + m.hidden_size + (2 if m.gated_mlp else 1) * m.intermediate_size  # up(/gate)
              + m.intermediate_size + m.hidden_size)                             # down
        self._act_bytes_per_token = io * b / tp
        self._attn_flops_unit = 4 * heads * m.head_dim          # x p * (ctx + p/2)
        self._kv_bytes_per_token = 2 * kv_heads * m.head_dim * b  # per layer, this rank
        self._ar_bytes_per_token = m.hidden_size * b
        self._lm_params = m.lm_head_params / tp
        self._lm_bytes = m.lm_head_params * b / tp

    # -- the pure formula (tests and the budget fit call it directly) ----------------------------
    def layer_time(self, tokens: int, attn_units: float, kv_read_tokens: float) -> float:
        gemm = max(2 * self._gemm_params * tokens / (self._flops * self.e_gemm),
                   (self._gemm_weight_bytes + self._act_bytes_per_token * tokens)
                   / (self._bw * self.e_mem))
        attn = max(self._attn_flops_unit * attn_units / (self._flops * self.e_attn),
                   self._kv_bytes_per_token * kv_read_tokens / (self._bw * self.e_mem))
        return gemm + attn + 2 * self.allreduce_time(tokens)

    def allreduce_time(self, tokens: int) -> float:
        n = self.tp
        if n == 1 or tokens == 0:
            return 0.0
        size = self._ar_bytes_per_token * tokens
        return 2 * (n - 1) / n * size / (self.link.bandwidth * self.e_link) + self.link.latency_s

    def lm_head_time(self, sampled_rows: int) -> float:
        if not sampled_rows:
            return 0.0
        return max(2 * self._lm_params * sampled_rows / (self._flops * self.e_gemm),
                   self._lm_bytes / (self._bw * self.e_mem))

    def time(self, tokens: int, sampled_rows: int, attn_units: float, kv_read_tokens: float,
             num_seqs: int) -> float:
        if tokens == 0:
            return 0.0
        return (self.model.num_layers * self.layer_time(tokens, attn_units, kv_read_tokens)
                + self.lm_head_time(sampled_rows) + self.host_step_s + self.host_seq_s * num_seqs)

    def step_time(self, out: SchedulerOutput) -> float:
        tokens = sampled = 0
        attn_units = kv_read = 0.0
        for c in out.chunks:
            n = c.num_tokens
            start = c.request.num_computed_tokens
            tokens += n
            sampled += c.start + n == c.request.num_tokens
            attn_units += n * (start + n / 2)
            kv_read += start + n
        return self.time(tokens, sampled, attn_units, kv_read, len(out.chunks))

    # -- convenience --------------------------------------------------------------------------
    def decode_step_time(self, batch: int, context: int) -> float:
        """A step of `batch` decodes, each with `context` tokens cached."""
        return self.time(batch, batch, batch * (context + 0.5), batch * (context + 1), batch)

    def prefill_step_time(self, tokens: int, context: int = 0, decodes: int = 0,
                          decode_context: int = 0) -> float:
        """One prefill chunk of `tokens` after `context` cached tokens, plus `decodes` decodes."""
        return self.time(tokens + decodes, decodes + 1,
                         tokens * (context + tokens / 2) + decodes * (decode_context + 0.5),
                         context + tokens + decodes * (decode_context + 1), 1 + decodes)

    def step_model(self) -> StepTimeModel:
        """A `StepTimeModel` fitted to this roofline (what `--budget profiled` would measure),
        over the grid `tandem profile` uses."""
        samples = []
        for ctx in (0, 512, 2048):
            for d in (0, 1, 8, 32, 128):
                for p in (0, 32, 128, 256, 512, 1024, 2048):
                    if p + d:
                        t = self.prefill_step_time(p, ctx, d, ctx) if p else self.decode_step_time(d, ctx)
                        samples.append(ProfileSample(p, d, ctx, t))
        return StepTimeModel.fit(samples)
