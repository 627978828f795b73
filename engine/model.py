"""Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) over a paged KV cache.

One forward takes the flattened rows of a whole hybrid batch (prefill chunks and decodes
together, T rows) with their absolute positions, and returns the final hidden states of only the
rows that need logits. State is explicit: the KV caches and the step's `AttentionInputs` come in
as arguments, so the same function runs eagerly or under torch.compile.

Projections are fused at load (q/k/v into `qkv_proj`, gate/up into `gate_up_proj`): one matmul
instead of three or two, which matters most at small batch where a step is launch-bound.
Checkpoints keep HF names; `load_weights` fuses them.

With parallelism (`shard`, engine/parallel.py) a rank holds its pipeline stage's layers and, in
each, its query/KV heads and MLP columns: q/k/v and gate/up are column-parallel (rows of the
weight sliced at load), o_proj and down are row-parallel, and `reduce` sums their partial outputs
over the stage's ranks. A later stage starts from `hidden_in` (the previous stage's activations)
instead of the embedding; only the last stage applies the final norm to the logit rows.
Embedding, final norm and LM head stay whole on every rank (small next to the layers; only the
driver uses the LM head).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionInputs
from engine.model_config import ModelConfig
from engine.parallel import Shard, make_shard


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies [head_dim/2] from rope_theta, with HF's linear / llama3 scaling."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).double() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv_freq.float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Normalise in fp32 whatever the model dtype, as HF does.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] rotated by the angles of its row (rotate-half convention, as HF)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard, reduce=None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        self.eps = cfg.rms_norm_eps
        self.reduce = reduce
        """Sums the row-parallel outputs over the ranks (None without tensor parallelism)."""
        h, q, kv = cfg.hidden_size, shard.num_heads * cfg.head_dim, shard.num_kv_heads * cfg.head_dim
        self.input_layernorm = nn.Parameter(torch.ones(h))
        self.qkv_proj = nn.Linear(h, q + 2 * kv, bias=cfg.qkv_bias)
        # The bias of a row-parallel layer is added once, by tp rank 0, not once per rank.
        self.o_proj = nn.Linear(q, h, bias=cfg.o_bias and shard.tp_rank == 0)
        self.post_attention_layernorm = nn.Parameter(torch.ones(h))
        self.gate_up_proj = nn.Linear(h, 2 * shard.ffn_size, bias=False)
        self.down_proj = nn.Linear(shard.ffn_size, h, bias=False)
        self.split = (q, kv, kv)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                attn: AttentionInputs, backend) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(rms_norm(x, self.input_layernorm, self.eps))       # [T, (Hq+2Hkv)*D]
        q, k, v = qkv.split(self.split, dim=-1)
        q = apply_rope(q.view(t, self.num_heads, self.head_dim), cos, sin)      # [T, Hq, D]
        k = apply_rope(k.view(t, self.num_kv_heads, self.head_dim), cos, sin)   # [T, Hkv, D]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        o = backend.forward(q, k, v, kv_cache, attn, self.head_dim ** -0.5)    # [T, Hq, D]
        attn_out = self.o_proj(o.reshape(t, -1))                                # [T, hidden]
        x = x + (attn_out if self.reduce is None else self.reduce(attn_out))
        gate, up = self.gate_up_proj(rms_norm(x, self.post_attention_layernorm, self.eps)).chunk(2, dim=-1)
        mlp_out = self.down_proj(F.silu(gate) * up)                             # [T, hidden]
        return x + (mlp_out if self.reduce is None else self.reduce(mlp_out))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, shard: Shard | None = None, reduce=None) -> None:
        super().__init__()
        self.cfg = cfg
        self.shard = shard or make_shard(cfg, 1, 0)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.shard, reduce)
                                    for _ in range(self.shard.num_layers))
        self.norm = nn.Parameter(torch.ones(cfg.hidden_size))
        # Tied checkpoints share the embedding; it is still a Linear of its own so that the LM
        # head can be quantized or prepacked independently of the embedding lookup.
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn: AttentionInputs, logit_rows: torch.Tensor, backend,
                hidden_in: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [T]; logit_rows [N] -> normalised hidden states [N, hidden]; a
        stage before the last returns its activations [T, hidden] instead, and a stage after
        the first starts from `hidden_in` [T, hidden] rather than the embedding."""
        x = self.embed_tokens(input_ids) if hidden_in is None else hidden_in    # [T, hidden]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]            # [T, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]                  # [T, 1, D]
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x = layer(x, cos, sin, kv_cache, attn, backend)
        if not self.shard.last_stage:
            return x
        return rms_norm(x[logit_rows], self.norm, self.cfg.rms_norm_eps)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab]."""
        return self.lm_head(hidden).float()

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load an HF `LlamaForCausalLM` state dict, fusing q/k/v and gate/up projections."""
        hf = dict(state_dict)
        if self.cfg.tie_word_embeddings or "lm_head.weight" not in hf:
            hf["lm_head.weight"] = hf["model.embed_tokens.weight"]
        state = {"embed_tokens.weight": hf.pop("model.embed_tokens.weight"),
                 "norm": hf.pop("model.norm.weight"), "lm_head.weight": hf.pop("lm_head.weight")}
        # This rank's slices (all of it without tensor parallelism): rows of q/k/v and gate/up,
        # columns of o_proj and down.
        d, sh = self.cfg.head_dim, self.shard
        rows = {"q": slice(sh.q_heads[0] * d, sh.q_heads[1] * d),
                "k": slice(sh.kv_heads[0] * d, sh.kv_heads[1] * d),
                "v": slice(sh.kv_heads[0] * d, sh.kv_heads[1] * d)}
        ffn = slice(*sh.ffn)
        first, last = sh.layers
        for i in range(self.cfg.num_layers):
            p = f"model.layers.{i}."
            if not first <= i < last:   # another stage's layer
                for key in [k for k in hf if k.startswith(p)]:
                    del hf[key]
                continue
            i -= first
            try:
                state[f"layers.{i}.input_layernorm"] = hf.pop(p + "input_layernorm.weight")
                state[f"layers.{i}.post_attention_layernorm"] = hf.pop(p + "post_attention_layernorm.weight")
                for kind in ("weight", "bias") if self.cfg.qkv_bias else ("weight",):
                    state[f"layers.{i}.qkv_proj.{kind}"] = torch.cat(
                        [hf.pop(f"{p}self_attn.{n}_proj.{kind}")[rows[n]] for n in "qkv"])
                state[f"layers.{i}.o_proj.weight"] = hf.pop(p + "self_attn.o_proj.weight")[:, rows["q"]]
                if self.cfg.o_bias:
                    bias = hf.pop(p + "self_attn.o_proj.bias")
                    if sh.tp_rank == 0:
                        state[f"layers.{i}.o_proj.bias"] = bias
                state[f"layers.{i}.gate_up_proj.weight"] = torch.cat(
                    [hf.pop(p + "mlp.gate_proj.weight")[ffn], hf.pop(p + "mlp.up_proj.weight")[ffn]])
                state[f"layers.{i}.down_proj.weight"] = hf.pop(p + "mlp.down_proj.weight")[:, ffn]
            except KeyError as e:
                raise ValueError(f"checkpoint does not match the model: missing {e.args[0]}") from None
        unexpected = [k for k in hf if "rotary_emb" not in k]
        if unexpected:
            raise ValueError(f"checkpoint does not match the model: unexpected {unexpected[:5]}")
        missing, _ = self.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}")
