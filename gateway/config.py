"""Gateway configuration: one frozen dataclass, validated on construction."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class GatewayConfig:
    """Settings of the OpenAI-compatible HTTP gateway (not of the replicas it talks to)."""

    host: str = "127.0.0.1"
    """Interface the HTTP server listens on."""
    port: int = 8000
    """TCP port the HTTP server listens on (0 lets the OS pick one)."""
    model_name: str
    """The served model id: the only accepted `model` value and what `/v1/models` lists."""
    max_model_len: int
    """Context limit in tokens: prompt tokens + max_tokens above this is rejected with 400."""
    api_key: str | None = None
    """If set, `/v1/*` requires `Authorization: Bearer <api_key>`; `/health` and `/metrics` stay open."""
    max_waiting_per_replica: int = 256
    """Admission limit: requests accepted but not yet running (as estimated from the replica's
    latest stats), per healthy replica; beyond it 429 with Retry-After."""
    request_timeout_s: float = 600.0
    """Longest a request may take end to end before it is failed (and aborted on its replica)."""
    replica_ready_timeout_s: float = 300.0
    """How long startup code waits for every replica's ReplicaReady frame."""
    heartbeat_timeout_s: float = 10.0
    """A replica that sent no frame for this long leaves routing until it sends again; its requests
    with no output yet move to another replica, the others end with a retryable error (503)."""

    def __post_init__(self) -> None:
        if not isinstance(self.host, str) or not self.host:
            raise ValueError(f"host must be a non-empty string, got {self.host!r}")
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ValueError(f"port must be an integer in [0, 65535], got {self.port!r}")
        if not isinstance(self.model_name, str) or not self.model_name.strip():
            raise ValueError(f"model_name must be a non-empty string, got {self.model_name!r}")
        if not isinstance(self.max_model_len, int) or self.max_model_len < 1:
            raise ValueError(f"max_model_len must be an integer >= 1, got {self.max_model_len!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError(f"api_key must be None or a non-empty string, got {self.api_key!r}")
        if not isinstance(self.max_waiting_per_replica, int) or self.max_waiting_per_replica < 1:
            raise ValueError(
                f"max_waiting_per_replica must be an integer >= 1, got {self.max_waiting_per_replica!r}")
        for name in ("request_timeout_s", "replica_ready_timeout_s", "heartbeat_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")
