"""How a prefill or decode node moves KV (frozen; passed to the node as JSON by the launcher)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class KVConfig:
    transport: str = "zmq"
    """`zmq` (any device; PUSH/PULL) or `torch` (torch.distributed send/recv: Gloo on CPU,
    NCCL on GPU)."""
    codec: str = "raw"
    """raw | lz4 (lossless, byte-plane) | int8 | fp8 (lossy: accuracy measured, not assumed)."""
    kv_addr: str | None = None
    """Decode nodes, zmq: the address they bind for incoming KV."""
    timeout_s: float = 30.0
    """A transfer that makes no progress for this long fails (the decode node then recomputes)."""
    rank: int | None = None
    """torch transport: this node's rank in the KV process group."""
    world_size: int | None = None
    master_port: int | None = None
    peer_ranks: dict[str, int] = field(default_factory=dict)
    """torch transport: replica id -> rank of every prefill/decode node."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
