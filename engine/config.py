"""Replica engine configuration: frozen, one docstring per field, errors name the bad value."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from scheduler.config import BudgetConfig, SchedulerConfig

DTYPES = ("auto", "float32", "bfloat16", "float16")
"""`auto` picks bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32."""
QUANTIZATIONS = ("none", "int8")
"""Weight quantization of the linear layers and LM head (engine/quant.py)."""
ATTENTION_BACKENDS = ("torch", "flashinfer")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    """HF-style model directory (a GGUF is converted into one before the engine starts)."""
    model_name: str = "model"
    """Id the model is served under (what `/v1/models` lists)."""
    dtype: str = "auto"
    """Weights, activations and KV cache. `auto`: bfloat16 on CUDA and on CPUs with AVX512-BF16 or
    AMX (bf16 GEMMs ~2.5x faster than fp32 there), float32 elsewhere. Parity tests use float32."""
    device: str = "cpu"
    """torch device of the replica: cpu, cuda, cuda:N (the CLI gives each replica its own GPU)."""
    attention: str = "torch"
    """Attention backend: `torch` (the tandem::paged_attention op: native C kernels reading the
    paged cache in place for decodes and prefill chunks, a torch fallback without a compiler) or
    `flashinfer` (CUDA only)."""
    compile: bool = False
    """torch.compile the forward (inductor, frozen weights, dynamic row counts) and warm it up at
    start; `tandem serve` turns it on. CPU only (CUDA runs eagerly)."""
    quantization: str = "none"
    """`int8`: weight-only int8 with per-output-channel scales for every linear and the LM head."""
    threads: int = 0
    """torch intra-op threads for this process; 0 = all cores. Give each process its own share."""
    kv_cache_gb: float = 1.0
    """Memory for the paged KV cache; ignored when num_kv_blocks is set."""
    num_kv_blocks: int | None = None
    """Exact number of KV blocks (overrides kv_cache_gb)."""
    seed: int = 0
    """Seed of the shared sampling generator (requests with their own seed use that)."""
    trace_file: str | None = None
    """Append one JSON line of telemetry per iteration here (see scheduler.telemetry)."""
    tp: int = 1
    """Tensor-parallel ranks per pipeline stage: attention heads split by whole GQA groups and the
    MLP by columns, two all-reduces per layer (engine/parallel.py)."""
    pp: int = 1
    """Pipeline stages: the layers split into `pp` contiguous runs, activations passed on."""
    rank: int = 0
    """This process's rank in the replica, `stage * tp + tp_rank`. Rank 0, the driver, schedules,
    samples and starts the other `tp * pp - 1` ranks as worker processes (which get theirs)."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.num_kv_blocks is None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"tp must be an integer >= 1, got {self.tp!r}")
        if isinstance(self.pp, bool) or not isinstance(self.pp, int) or self.pp < 1:
            raise ValueError(f"pp must be an integer >= 1, got {self.pp!r}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, tp * pp = {self.world_size}), got {self.rank!r}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    @property
    def world_size(self) -> int:
        """Processes of the replica: tp * pp."""
        return self.tp * self.pp

    @property
    def stage(self) -> int:
        return self.rank // self.tp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        d = dict(d)
        sched = dict(d.get("scheduler", {}))
        sched["budget"] = BudgetConfig(**sched.get("budget", {}))
        d["scheduler"] = SchedulerConfig(**sched)
        return cls(**d)
