"""Deployment spec: which replicas to start, in which roles, with which engine settings.

The same spec comes from `tandem serve` flags or from a YAML file (`tandem serve --spec FILE`):

    model: null                 # HF dir or .gguf; null = the embedded SmolLM2
    routing: pd                 # round_robin | least_loaded | pd
    offload_threshold: 512      # pd: prompts longer than this go to a prefill replica
    kv_transport: zmq           # zmq | torch
    kv_codec: raw               # raw | lz4 | int8 | fp8
    replicas:
      - {role: prefill, count: 1, token_budget: 512}
      - {role: decode, count: 1, token_budget: 128}
      - {role: hybrid, count: 0}

Turning a spec into processes is the launcher's job; this module is pure and unit-tested.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import yaml

ROLES = ("hybrid", "prefill", "decode")
ROUTING = ("round_robin", "least_loaded", "pd")
KV_TRANSPORTS = ("zmq", "torch")
KV_CODECS = ("raw", "lz4", "int8", "fp8")


@dataclass(frozen=True)
class ReplicaGroup:
    role: str = "hybrid"
    """`hybrid` prefills and decodes; `prefill` only computes prompts and pushes their KV;
    `decode` receives KV (and can still prefill short prompts itself)."""
    count: int = 1
    """How many replicas of this group."""
    threads: int | None = None
    """torch threads per replica (default: the machine's cores split evenly between replicas)."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Engine/scheduler settings that differ from the command line, e.g. token_budget, scheduler."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"replica role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"replica count must be an integer >= 0, got {self.count!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")


@dataclass(frozen=True)
class DeploymentSpec:
    groups: tuple[ReplicaGroup, ...]
    """Replica groups; at least one replica must be able to decode (hybrid or decode)."""
    routing: str | None = None
    """Gateway routing: round_robin, least_loaded (fewest outstanding tokens), or pd
    (conditional disaggregation: long prompts to a prefill replica when its queue is short).
    Default, as on the command line: pd when there are prefill replicas, else round_robin."""
    offload_threshold: int = 512
    """pd routing: offload prompts longer than this many tokens."""
    kv_transport: str = "zmq"
    kv_codec: str = "raw"
    """KV codec for prefill -> decode pushes; lossless raw by default (lz4 only pays on slow links)."""
    model: str | None = None

    def __post_init__(self) -> None:
        counts = {role: sum(g.count for g in self.groups if g.role == role) for role in ROLES}
        if self.routing is None:   # frozen: the default is filled in once, here
            object.__setattr__(self, "routing", "pd" if counts["prefill"] else "round_robin")
        if self.routing not in ROUTING:
            raise ValueError(f"routing must be one of {ROUTING}, got {self.routing!r}")
        if self.kv_transport not in KV_TRANSPORTS:
            raise ValueError(f"kv_transport must be one of {KV_TRANSPORTS}, got {self.kv_transport!r}")
        if self.kv_codec not in KV_CODECS:
            raise ValueError(f"kv_codec must be one of {KV_CODECS}, got {self.kv_codec!r}")
        if self.offload_threshold < 1:
            raise ValueError(f"offload_threshold must be >= 1, got {self.offload_threshold!r}")
        if counts["hybrid"] + counts["decode"] == 0:
            raise ValueError("the deployment needs at least one hybrid or decode replica")
        if counts["prefill"] and not counts["decode"]:
            raise ValueError("prefill replicas need at least one decode replica to push KV to")
        if self.routing == "pd" and not counts["prefill"]:
            raise ValueError("routing 'pd' needs at least one prefill replica")

    @property
    def num_replicas(self) -> int:
        return sum(g.count for g in self.groups)

    def replicas(self, cores: int | None = None) -> list[tuple[str, ReplicaGroup, int]]:
        """(replica id, group, threads) for every replica; threads split the cores evenly."""
        cores = cores or os.cpu_count() or 1
        share = max(1, cores // max(1, self.num_replicas))
        out = []
        # Numbered per role across groups: ids key the gateway's pool, the launcher and the ipc
        # paths, so two groups of one role (say, different budgets) must not both get `hybrid-0`.
        seen = dict.fromkeys(ROLES, 0)
        for g in self.groups:
            for _ in range(g.count):
                out.append((f"{g.role}-{seen[g.role]}", g, g.threads or share))
                seen[g.role] += 1
        return out

    @classmethod
    def from_yaml(cls, text: str) -> "DeploymentSpec":
        data = yaml.safe_load(text) or {}
        if not isinstance(data, dict):
            raise ValueError("a deployment spec must be a YAML mapping")
        unknown = set(data) - {"model", "routing", "offload_threshold", "kv_transport", "kv_codec", "replicas"}
        if unknown:
            raise ValueError(f"unknown deployment spec keys: {sorted(unknown)}")
        groups = []
        for g in data.get("replicas") or []:
            g = dict(g)
            groups.append(ReplicaGroup(role=g.pop("role", "hybrid"), count=g.pop("count", 1),
                                       threads=g.pop("threads", None), overrides=g))
        rest = {k: v for k, v in data.items() if k != "replicas"}
        return cls(groups=tuple(groups), **rest)


ENGINE_KEYS = ("dtype", "kv_cache_gb", "num_kv_blocks", "threads")
SCHEDULER_KEYS = {"scheduler": "policy", "token_budget": "token_budget",
                  "idle_token_budget": "idle_token_budget", "max_num_seqs": "max_num_seqs",
                  "max_batched_tokens": "max_batched_tokens", "watermark": "watermark"}


def apply_overrides(engine_cfg, overrides: dict[str, Any]):
    """A replica group's engine config: the command line's, with the group's overrides."""
    from dataclasses import replace  # noqa: PLC0415

    unknown = set(overrides) - set(ENGINE_KEYS) - set(SCHEDULER_KEYS)
    if unknown:
        raise ValueError(f"unknown replica settings {sorted(unknown)}; allowed: "
                         f"{sorted([*ENGINE_KEYS, *SCHEDULER_KEYS])}")
    try:
        sched = replace(engine_cfg.scheduler, **{SCHEDULER_KEYS[k]: v for k, v in overrides.items()
                                                if k in SCHEDULER_KEYS})
        return replace(engine_cfg, scheduler=sched,
                       **{k: v for k, v in overrides.items() if k in ENGINE_KEYS})
    except (TypeError, ValueError) as e:
        # A YAML value of the wrong type (`watermark: high`) fails a comparison with a TypeError
        # that names nothing; either way, say which replica settings were being applied.
        raise ValueError(f"bad replica settings {overrides}: {e}") from None
