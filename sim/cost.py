"""Step-time cost models: how long one engine step running a `SchedulerOutput` takes.

One interface, `CostModel.step_time(out) -> seconds`, read *before* `scheduler.update(out, ...)`
(a chunk's `start` is then still the number of tokens cached before it), and for pipeline
parallelism `pp` (stages) with `stage_times(out)`: how long each stage is busy with that batch
(`step_time` is then the batch's latency through all of them). Two models:

`ProfiledCost` is the `scheduler.budget.StepTimeModel` fitted from a `tandem profile` JSON,
evaluated on the step's own `StepFeatures` (prefill tokens, decodes, sum of decode contexts,
sum of p * (ctx + p/2) over prefill chunks, sequences): the features the profile was fitted on.

`RooflineCost` is a per-layer roofline for a Llama-style decoder on a GPU (`sim/specs.py`):
  - GEMMs: max(2 * params * tokens / (peak * E_GEMM), (weight + activation bytes) / (bw * E_MEM));
  - attention: max(4 * heads * head_dim * sum p * (ctx + p/2) / (peak * E_ATTN),
                   KV bytes read (each chunk's prefix + itself, every decode's context) / (bw * E_MEM));
  - the LM head for the rows that sample (one per chunk that reaches the end of its request);
  - TP over n GPUs: every matrix, head and KV head is split n ways (KV heads by whole GQA groups,
    the most loaded rank sets the pace), plus 2 all-reduces of tokens * hidden per layer:
    ring 2(n-1)/n * S / (link bw * E_LINK) + 2(n-1) x the link's latency (one per ring step);
  - host time: HOST_STEP_S per step + HOST_SEQ_S per sequence (Python scheduling, input
    preparation, sampling, output framing; not overlapped with the GPU, as in this engine);
  - PP over `pp` stages of `tp` GPUs each: layers split evenly (`stage_layers`: the remainder
    goes to the first stages); host time once per micro-batch, before stage 0 (it is counted in
    stage 0's time); the LM head on the last stage; every other stage then sends the batch's
    activations (tokens * hidden * dtype bytes) to the next over `pp_link`: latency +
    bytes / bandwidth. That is the whole activation crossing the link once (Megatron's
    scatter/gather split: each TP rank sends 1/tp of it; the re-gather over NVLink is ignored).

Limits: no kernel-launch or wave-quantisation effects, no overlap of communication with compute
(the activation send included), the same efficiencies at every shape. The efficiency factors
below are a priori estimates with their reasons, not fitted to any result.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

from engine.model_config import DTYPE_BYTES
from scheduler.budget import ProfileSample, StepFeatures, StepTimeModel, load_profile
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
    pp: int
    """Pipeline stages (1: the whole model in one step). Models without it are single-stage."""

    def step_time(self, out: SchedulerOutput) -> float:
        """Seconds the step running `out` takes (called before `update`); with stages, the
        batch's latency through all of them."""

    def stage_times(self, out: SchedulerOutput) -> list[float]:
        """Seconds each of the `pp` stages is busy with the batch `out` (its send included)."""


def stage_layers(num_layers: int, pp: int) -> list[int]:
    """Layers per pipeline stage: an even split, the remainder to the first stages."""
    if not 1 <= pp <= num_layers:
        raise ValueError(f"pp must be between 1 and the model's {num_layers} layers, got {pp}")
    base, extra = divmod(num_layers, pp)
    return [base + (s < extra) for s in range(pp)]


class ProfiledCost:
    """A `StepTimeModel` (from `tandem profile`) as a cost model."""

    def __init__(self, model: StepTimeModel) -> None:
        self.model = model

    @classmethod
    def from_json(cls, path: str | Path) -> "ProfiledCost":
        """Fit from a `tandem profile` JSON ({"samples": [...]})."""
        return cls(StepTimeModel.fit(load_profile(path)))

    def step_time(self, out: SchedulerOutput) -> float:
        return max(0.0, self.model.predict(StepFeatures.of(out.chunks)))

    def step_model(self) -> StepTimeModel:
        return self.model

    def stage_times(self, out: SchedulerOutput) -> list[float]:
        return [self.step_time(out)]


class RooflineCost:
    """Per-layer roofline of one replica (TP over `tp` GPUs of `device`, in `pp` pipeline stages
    joined by `pp_link`); see the module doc."""

    def __init__(self, model: ModelSpec, device: Device, tp: int = 1, dtype: str = "bfloat16",
                 tp_link: Link | None = None, host_step_s: float = HOST_STEP_S,
                 host_seq_s: float = HOST_SEQ_S, e_gemm: float = E_GEMM, e_attn: float = E_ATTN,
                 e_mem: float = E_MEM, e_link: float = E_LINK, pp: int = 1,
                 pp_link: Link | None = None) -> None:
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        self.model, self.device, self.tp, self.dtype = model, device, tp, dtype
        self.link = tp_link or get_link(device.intra_link)
        self.pp = pp
        self.stage_layers = stage_layers(model.num_layers, pp)
        self.pp_link = pp_link or get_link(device.intra_link)
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
        self._send_bytes_per_token = m.hidden_size * b

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
        # ring all-reduce (reduce-scatter + all-gather): 2(n-1) steps, each a send of S/n bytes
        # that pays the link's latency once
        return (2 * (n - 1) / n * size / (self.link.bandwidth * self.e_link)
                + 2 * (n - 1) * self.link.latency_s)

    def lm_head_time(self, sampled_rows: int) -> float:
        if not sampled_rows:
            return 0.0
        return max(2 * self._lm_params * sampled_rows / (self._flops * self.e_gemm),
                   self._lm_bytes / (self._bw * self.e_mem))

    def send_time(self, tokens: int) -> float:
        """One stage handing `tokens` rows of activations to the next over `pp_link`."""
        return (self.pp_link.latency_s
                + self._send_bytes_per_token * tokens / self.pp_link.bandwidth)

    def time(self, tokens: int, sampled_rows: int, attn_units: float, kv_read_tokens: float,
             num_seqs: int) -> float:
        """A batch's latency through the model (through every stage, without waiting)."""
        if tokens == 0:
            return 0.0
        if self.pp > 1:
            return sum(self.stages(tokens, sampled_rows, attn_units, kv_read_tokens, num_seqs))
        return (self.model.num_layers * self.layer_time(tokens, attn_units, kv_read_tokens)
                + self.lm_head_time(sampled_rows) + self.host_step_s + self.host_seq_s * num_seqs)

    def stages(self, tokens: int, sampled_rows: int, attn_units: float, kv_read_tokens: float,
               num_seqs: int) -> list[float]:
        """Busy time of each stage: its layers; stage 0 the host time before them, the last the
        LM head, every other one the send to the next stage."""
        if tokens == 0:
            return [0.0] * self.pp
        if self.pp == 1:
            return [self.time(tokens, sampled_rows, attn_units, kv_read_tokens, num_seqs)]
        layer = self.layer_time(tokens, attn_units, kv_read_tokens)
        last = self.pp - 1
        times = [n * layer + (self.lm_head_time(sampled_rows) if s == last else self.send_time(tokens))
                 for s, n in enumerate(self.stage_layers)]
        times[0] += self.host_step_s + self.host_seq_s * num_seqs
        return times

    def _features(self, out: SchedulerOutput) -> tuple[int, int, float, float, int]:
        tokens = sampled = 0
        attn_units = kv_read = 0.0
        for c in out.chunks:
            n = c.num_tokens
            start = c.request.num_computed_tokens
            tokens += n
            sampled += c.start + n == c.request.num_tokens
            attn_units += n * (start + n / 2)
            kv_read += start + n
        return tokens, sampled, attn_units, kv_read, len(out.chunks)

    def step_time(self, out: SchedulerOutput) -> float:
        return self.time(*self._features(out))

    def stage_times(self, out: SchedulerOutput) -> list[float]:
        return self.stages(*self._features(out))

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
                        samples.append(ProfileSample(StepFeatures.uniform(p, d, ctx), t))
        return StepTimeModel.fit(samples)
