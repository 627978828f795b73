"""Replica engine configuration: frozen, one docstring per field, errors name the bad value."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from scheduler.config import BudgetConfig, SchedulerConfig

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    """HF-style model directory (a GGUF is converted into one before the engine starts)."""
    model_name: str = "model"
    """Id the model is served under (what `/v1/models` lists)."""
    dtype: str = "float32"
    """Weights and activations; float32 is the CPU default (fp32 matmul is ~2x bf16 on this CPU)."""
    device: str = "cpu"
    attention: str = "torch"
    """Attention backend: `torch` (any device) or `flashinfer` (CUDA only)."""
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
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")
        if self.num_kv_blocks is None and not self.kv_cache_gb > 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EngineConfig":
        d = dict(d)
        sched = dict(d.get("scheduler", {}))
        sched["budget"] = BudgetConfig(**sched.get("budget", {}))
        d["scheduler"] = SchedulerConfig(**sched)
        return cls(**d)
