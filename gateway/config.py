"""Gateway configuration: one frozen dataclass, validated on construction."""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

DEFAULT_TENANT = "default"
"""Tenant of an anonymous key (`--api-key KEY`) and of requests with no `user` field (the same
name as `scheduler.request.DEFAULT_TENANT`, which the replicas use)."""

TENANT_NAME = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
"""What a tenant name in `--api-key name=key` may look like (it becomes a metrics label)."""


def parse_api_key(text: str) -> tuple[str, str]:
    """`--api-key` value -> (tenant, key): `name=key` names the key's tenant, a bare `key` is the
    "default" tenant's. Keys often end in base64 padding (`abc==`), so the text is read as
    `name=key` only when what precedes the first "=" is a valid tenant name and what follows is
    not just more "=" signs."""
    name, sep, key = text.partition("=")
    if sep and TENANT_NAME.fullmatch(name) and key.strip("="):
        return name, key
    return DEFAULT_TENANT, text


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
    """If set, `/v1/*` requires `Authorization: Bearer <api_key>`; `/health` and `/metrics` stay
    open. Its requests belong to the "default" tenant (or to their `user` field)."""
    api_keys: tuple[tuple[str, str], ...] = ()
    """Named keys, ((tenant, key), ...): each accepted like `api_key`, and its requests belong to
    that tenant whatever their `user` field says. Names and keys must be unique (together with
    `api_key`, which is the "default" tenant's)."""
    tenant_max_waiting: int | None = None
    """Per-tenant admission quota: requests (choices) of one tenant admitted but not yet given
    their first token; beyond it 429 (`tenant_quota_exceeded`) with Retry-After. None: no quota."""
    max_user_tenants: int = 64
    """Most distinct tenants taken from the `user` field; later new values share the tenant
    "other". Bounds the metrics' label sets and the replicas' per-tenant state."""
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
        object.__setattr__(self, "api_keys", tuple((str(n), str(k)) for n, k in self.api_keys))
        for name, key in self.api_keys:
            if not TENANT_NAME.fullmatch(name):
                raise ValueError(f"tenant name {name!r} must match {TENANT_NAME.pattern}")
            if not key:
                raise ValueError(f"the API key of tenant {name!r} is empty")
        names = [n for n, _ in self.all_api_keys]
        dup_names = sorted(n for n, c in Counter(names).items() if c > 1)
        if dup_names:
            raise ValueError(f"tenant(s) {dup_names} have more than one API key")
        by_key: dict[str, list[str]] = {}
        for name, key in self.all_api_keys:
            by_key.setdefault(key, []).append(name)
        shared = sorted(names for names in by_key.values() if len(names) > 1)
        if shared:   # name the tenants, not the secret
            raise ValueError(f"tenants {shared[0]} share one API key; keys must be distinct")
        if self.tenant_max_waiting is not None and (
                not isinstance(self.tenant_max_waiting, int) or self.tenant_max_waiting < 1):
            raise ValueError(f"tenant_max_waiting must be None or an integer >= 1, "
                             f"got {self.tenant_max_waiting!r}")
        if not isinstance(self.max_user_tenants, int) or self.max_user_tenants < 0:
            raise ValueError(f"max_user_tenants must be an integer >= 0, got {self.max_user_tenants!r}")
        if not isinstance(self.max_waiting_per_replica, int) or self.max_waiting_per_replica < 1:
            raise ValueError(
                f"max_waiting_per_replica must be an integer >= 1, got {self.max_waiting_per_replica!r}")
        for name in ("request_timeout_s", "replica_ready_timeout_s", "heartbeat_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a number > 0, got {value!r}")

    @property
    def all_api_keys(self) -> tuple[tuple[str, str], ...]:
        """Every accepted key as (tenant, key): `api_key` (tenant "default") and `api_keys`."""
        anon = ((DEFAULT_TENANT, self.api_key),) if self.api_key else ()
        return anon + self.api_keys
