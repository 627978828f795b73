"""How a prefill or decode node moves KV (frozen; passed to the node as JSON by the launcher).

Torch-free: the CLI and the launcher import it without loading torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KVConfig:
    transport: str = "zmq"
    """`zmq` (any device; PUSH/PULL) or `torch` (torch.distributed send/recv; the backend follows
    the engine's device, see `kv_backend`: Gloo for CPU engines, NCCL for CUDA engines, one GPU
    per rank)."""
    codec: str = "raw"
    """raw | lz4 (lossless, byte-plane) | int8 | fp8 (lossy: accuracy measured, not assumed)."""
    kv_addr: str | None = None
    """Decode nodes, zmq: the address they bind for incoming KV."""
    timeout_s: float = 30.0
    """A transfer that makes no progress for this long fails (the decode node then recomputes)."""
    rank: int | None = None
    """torch transport: this node's rank in the KV process group."""
    world_size: int | None = None
    """torch transport: ranks in the KV process group (every prefill and decode replica)."""
    master_port: int | None = None
    """torch transport: the TCP port of rank 0's rendezvous store on 127.0.0.1."""
    peer_ranks: dict[str, int] = field(default_factory=dict)
    """torch transport: replica id -> rank of every prefill/decode node."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kv_backend(device: str) -> str:
    """The torch.distributed backend for KV transfer between engines on `device` (the one place
    it is chosen): `nccl` for CUDA engines (KV cache on the GPU; NCCL moves CUDA tensors only),
    `gloo` for every other device (CPU tensors)."""
    return "nccl" if _device_type(device) == "cuda" else "gloo"


def kv_transport_device(device: str, backend: str) -> str:
    """Where the torch transport's tensors live: the engine's CUDA device under NCCL, the CPU
    under Gloo. NCCL with a non-CUDA device is an error (it cannot send CPU tensors)."""
    if backend == "nccl":
        if _device_type(device) != "cuda":
            raise ValueError(f"the nccl backend moves CUDA tensors only; the engine device is "
                             f"{device!r} (use gloo, i.e. a CPU engine, or a cuda device)")
        return str(device)
    return "cpu"


def _device_type(device: str) -> str:
    return str(device).split(":", 1)[0].strip().lower()
