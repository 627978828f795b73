"""Hardware and model facts the cost models read: devices, links, models. Plain data, no torch.

Every number is a public spec-sheet or config value (source in the comment next to it); nothing
here is fitted to any benchmark result. The efficiency factors that turn peaks into achievable
rates are in `sim/cost.py`, each with its reasoning.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.model_config import DTYPE_BYTES, ModelConfig, shard_heads

GiB = 1024 ** 3
GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    peak_flops: float
    """Dense (no sparsity) bf16/fp16 tensor-core FLOP/s."""
    mem_bw: float
    """Device memory bandwidth, bytes/s."""
    memory_bytes: float
    """Device memory, bytes."""
    intra_link: str
    """The link between GPUs of one node used for TP all-reduces (a key of LINKS)."""


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float
    """Bytes/s in one direction, per GPU (or per NIC for network links)."""
    latency_s: float
    """Fixed cost of one transfer or collective step on this link (software + wire)."""


# Sources: NVIDIA A100 datasheet (2021): bf16 tensor 312 TFLOPS dense; 40GB SXM HBM2 1,555 GB/s,
# 80GB SXM HBM2e 2,039 GB/s; NVLink 3 600 GB/s (bidirectional, 12 links). NVIDIA A40 datasheet:
# bf16 tensor 149.7 TFLOPS dense, 48 GB GDDR6 at 696 GB/s, PCIe Gen4. NVIDIA H100 SXM5 datasheet:
# bf16 tensor 989 TFLOPS dense (1,979 with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 4 900 GB/s.
DEVICES: dict[str, Device] = {
    "a100-40gb": Device("a100-40gb", 312e12, 1555 * GB, 40 * GiB, "nvlink"),
    "a100-80gb": Device("a100-80gb", 312e12, 2039 * GB, 80 * GiB, "nvlink"),
    "a40": Device("a40", 149.7e12, 696 * GB, 48 * GiB, "pcie"),
    "h100": Device("h100", 989e12, 3350 * GB, 80 * GiB, "nvlink4"),
}
DEVICE_ALIASES = {"a100": "a100-80gb", "h100-80gb": "h100"}

# Bandwidths per direction. NVLink 3: 600 GB/s bidirectional -> 300 GB/s each way per A100;
# NVLink 4: 900 -> 450. PCIe 4.0 x16: 16 GT/s x 16 lanes, 128b/130b -> 31.5 GB/s each way.
# 100 GbE: 12.5 GB/s line rate. InfiniBand HDR (200 Gb/s per port, the usual A100 NIC): 25 GB/s.
# Latencies are orders of magnitude from NCCL/perftest small-message numbers (a few us on
# NVLink and IB verbs, more through PCIe switches and a TCP/RoCE stack on Ethernet).
LINKS: dict[str, Link] = {
    "nvlink": Link("nvlink", 300 * GB, 5e-6),
    "nvlink4": Link("nvlink4", 450 * GB, 5e-6),
    "pcie": Link("pcie", 31.5 * GB, 10e-6),
    "100gbe": Link("100gbe", 12.5 * GB, 30e-6),
    "infiniband": Link("infiniband", 25 * GB, 5e-6),
}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    gated_mlp: bool = True
    """SwiGLU (3 matrices: gate, up, down) vs a plain 2-matrix MLP (Falcon)."""
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096

    @property
    def attn_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        return q + kv + o

    @property
    def mlp_params_per_layer(self) -> int:
        return (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size

    @property
    def params_per_layer(self) -> int:
        """Matrix parameters of one block (norms and biases are negligible)."""
        return self.attn_params_per_layer + self.mlp_params_per_layer

    @property
    def lm_head_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        return self.num_layers * self.params_per_layer + embed * (1 if self.tie_word_embeddings else 2)

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.num_params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """K and V of one token over all layers: 2 * layers * kv_heads * head_dim * dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def max_kv_heads_per_rank(self, tp: int) -> int:
        return max(kv for _, kv in shard_heads(self.num_heads, self.num_kv_heads, tp))

    def model_config(self) -> ModelConfig:
        """The engine's own architecture record (for `kv_bytes_per_block`)."""
        return ModelConfig(
            model_type="llama", vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings, qkv_bias=False, o_bias=False,
            sliding_window=None)


# From each model's public HF config.json.
MODELS: dict[str, ModelSpec] = {
    # mistralai/Mistral-7B-v0.1
    "mistral-7b": ModelSpec("mistral-7b", 32, 4096, 32, 8, 14336, 32000, 128,
                            max_position_embeddings=32768),
    # meta-llama/Meta-Llama-3-8B
    "llama-3-8b": ModelSpec("llama-3-8b", 32, 4096, 32, 8, 14336, 128256, 128,
                            max_position_embeddings=8192),
    # 01-ai/Yi-34B
    "yi-34b": ModelSpec("yi-34b", 60, 7168, 56, 8, 20480, 64000, 128, max_position_embeddings=4096),
    # meta-llama/Llama-2-70b-hf
    "llama-2-70b": ModelSpec("llama-2-70b", 80, 8192, 64, 8, 28672, 32000, 128,
                             max_position_embeddings=4096),
    # tiiuae/falcon-180B: 232 query heads of 64, 8 KV heads, ffn 4 x hidden, GELU (not gated)
    "falcon-180b": ModelSpec("falcon-180b", 80, 14848, 232, 8, 4 * 14848, 65024, 64,
                             gated_mlp=False, max_position_embeddings=2048),
    # HuggingFaceTB/SmolLM2-135M
    "smollm2-135m": ModelSpec("smollm2-135m", 30, 576, 9, 3, 1536, 49152, 64,
                              tie_word_embeddings=True, max_position_embeddings=8192),
}


def _lookup(table: dict, aliases: dict, name: str, what: str):
    key = aliases.get(name.lower(), name.lower())
    if key not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {sorted(table)}")
    return table[key]


def get_device(name: str) -> Device:
    return _lookup(DEVICES, DEVICE_ALIASES, name, "device")


def get_link(name: str) -> Link:
    return _lookup(LINKS, {"ib": "infiniband", "100g": "100gbe", "nvlink3": "nvlink"}, name, "link")


def get_model(name: str) -> ModelSpec:
    return _lookup(MODELS, {}, name, "model")
