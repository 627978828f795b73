"""The architecture of a Llama-family checkpoint, read from its HF `config.json` (no torch)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    """HF model_type; Llama, Mistral and Qwen2 share this architecture."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    """Fewer than num_heads means grouped-query attention."""
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None, or HF's {"rope_type": "linear" | "llama3", ...}."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    """lm_head shares the input embedding matrix."""
    qkv_bias: bool
    """Bias on the q/k/v projections (Qwen2, or Llama with attention_bias)."""
    o_bias: bool
    sliding_window: int | None
    """Mistral's window; sequences must stay within it (no windowed attention here)."""

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        with open(Path(model_dir) / "config.json") as f:
            return cls.from_hf(json.load(f))

    @classmethod
    def from_hf(cls, c: dict[str, Any]) -> "ModelConfig":
        model_type = c.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}"
            )
        if c.get("hidden_act", "silu") != "silu":
            raise ValueError(f"unsupported hidden_act {c['hidden_act']!r}; only silu (SwiGLU)")
        heads = c["num_attention_heads"]
        # transformers >= 5 writes `rope_parameters` (theta + scaling together); older configs
        # write `rope_theta` and `rope_scaling` at the top level.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("linear", "llama3", "default"):
            raise ValueError(f"unsupported rope type {kind!r}; supported: default, linear, llama3")
        rope_scaling = rope if kind != "default" else None
        attention_bias = bool(c.get("attention_bias", False))
        use_sliding = c.get("use_sliding_window", model_type == "mistral")
        return cls(
            model_type=model_type,
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=c.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=attention_bias and model_type == "llama",
            sliding_window=c.get("sliding_window") if use_sliding else None,
        )


DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Bytes per element of each KV cache dtype, by name (sizing the cache needs no torch)."""


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: str) -> int:
    """Bytes one KV block takes over all layers: K and V of `block_size` tokens; `dtype` is a
    name in DTYPE_BYTES ("bfloat16", not torch.bfloat16)."""
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown KV cache dtype {dtype!r}; known: {sorted(DTYPE_BYTES)}")
    return cfg.num_layers * 2 * block_size * cfg.num_kv_heads * cfg.head_dim * DTYPE_BYTES[dtype]


def shard_heads(num_heads: int, num_kv_heads: int, tp: int) -> list[tuple[int, int]]:
    """(query heads, KV heads) per tensor-parallel rank, in rank order.

    Ranks split the KV heads, each with its whole GQA group of query heads (a query head must sit
    with the KV head it reads), as evenly as possible: the first `num_kv_heads % tp` ranks get one
    KV head more. SmolLM2's 9 query / 3 KV heads at tp=2 -> [(6, 2), (3, 1)]. Torch-free, so the
    deployment spec can check a TP degree against a model before anything is loaded.
    """
    if isinstance(tp, bool) or not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be an integer >= 1, got {tp!r}")
    if num_kv_heads < 1 or num_heads % num_kv_heads:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if tp > num_kv_heads:
        raise ValueError(f"tp={tp} exceeds the model's {num_kv_heads} KV heads "
                         f"(tensor parallelism splits whole GQA groups)")
    group = num_heads // num_kv_heads
    base, extra = divmod(num_kv_heads, tp)
    return [((base + (r < extra)) * group, base + (r < extra)) for r in range(tp)]
