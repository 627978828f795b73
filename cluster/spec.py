"""Deployment spec: which replicas to start, in which roles, with which engine settings.

The same spec comes from `tandem serve` flags or from a YAML file (`tandem serve --spec FILE`):

    model: null                 # HF dir or .gguf; null = the embedded SmolLM2
    routing: pd                 # round_robin | least_loaded | prefix | pd
    offload_threshold: 512      # pd: prompts longer than this go to a prefill replica
    kv_transport: zmq           # zmq | torch
    kv_codec: raw               # raw | lz4 | int8 | fp8
    replicas:
      - {role: prefill, count: 1, token_budget: 512}
      - {role: decode, count: 1, token_budget: 128}
      - {role: hybrid, count: 0}

A group's other keys override the command line's engine and scheduler settings for its replicas
(`SCHEDULER_KEYS`, `ENGINE_KEYS` below), e.g. `tenant_weights: {a: 2, b: 1}` or
`tenant_fair_share: false` (= `--tenant-weights a=2,b=1`, `--tenant-scheduling fcfs`).

A group can span several devices (for a Ray cluster; until the parallel engine exists
`tandem serve` refuses tp or pp > 1):

    replicas:
      - role: prefill
        count: 1
        tp: 2                   # tensor parallel: KV heads split by whole GQA groups
        pp: 2                   # pipeline parallel: layers split into stages
        resources: {CPU: 1, GPU: 1}                     # per rank; tp * pp ranks per replica
      - role: decode
        count: 2
        tp: 2                   # prefill and decode groups must match (KV rank i -> rank i)
        pp: 2
        resources: {CPU: 1, GPU: 1, decode_node: 0.01}  # custom key: only nodes started with
                                                        # `--resources '{"decode_node": 1}'`

`resources` are Ray resource names (CPU, GPU, memory, custom), what each rank reserves; they
replace the default {CPU: 1}. Checks that need the model (tp <= KV heads, pp <= layers) are in
`DeploymentSpec.check_model`; `cluster.placement` turns a spec into placement-group requests.

Turning a spec into processes is the launcher's job; this module is pure and unit-tested.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from gateway.routing import ROUTING

ROLES = ("hybrid", "prefill", "decode")
KV_TRANSPORTS = ("zmq", "torch")
KV_CODECS = ("raw", "lz4", "int8", "fp8")
GROUP_KEYS = ("role", "count", "threads", "tp", "pp", "resources")
"""Replica-group keys of a YAML spec; any other key is an engine/scheduler override."""


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def _check_resources(resources: Any) -> None:
    """Ray's rules for a bundle, checked here so a bad spec fails before any cluster is asked."""
    if not isinstance(resources, dict) or not resources:
        raise ValueError(f"resources must be a non-empty mapping of resource name to amount "
                         f"per rank, e.g. {{CPU: 1, GPU: 1}}, got {resources!r}")
    for key, amount in resources.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"resources: a resource name must be a non-empty string, got {key!r}")
        if key in ("cpu", "gpu", "Cpu", "Gpu"):
            raise ValueError(f"resources: {key!r} is not a Ray resource; Ray spells it {key.upper()!r}")
        if isinstance(amount, bool) or not isinstance(amount, (int, float)) \
                or not (math.isfinite(amount) and amount >= 0):
            raise ValueError(f"resources: {key} must be a number >= 0, got {amount!r}")
        if amount > 1 and amount != int(amount):
            raise ValueError(f"resources: {key} above 1 must be a whole number (Ray's rule), got {amount!r}")
    if not any(resources.values()):
        raise ValueError(f"resources: at least one amount must be > 0 (Ray rejects an empty "
                         f"bundle), got {resources!r}")


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
    tp: int = 1
    """Tensor-parallel ranks per pipeline stage: each holds a share of the KV heads (whole GQA
    groups, see `engine.model_config.shard_heads`), so tp <= the model's KV heads. A TP group
    never spans nodes."""
    pp: int = 1
    """Pipeline stages per replica, each a contiguous slice of the layers (pp <= layers). A
    replica has tp * pp ranks, rank order (stage, tp_rank)."""
    resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1})
    """What each rank reserves, in Ray resource names: CPU, GPU, memory (bytes) or a custom
    resource; a small amount of a custom resource (`decode_node: 0.01`) pins ranks to the nodes
    that advertise it. Replaces the default {CPU: 1}, it is not added to it."""

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"replica role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.count, int) or self.count < 0:
            raise ValueError(f"replica count must be an integer >= 0, got {self.count!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}")
        _check_positive_int("tp", self.tp)
        _check_positive_int("pp", self.pp)
        _check_resources(self.resources)
        object.__setattr__(self, "resources", dict(self.resources))   # a copy: the spec is frozen

    @property
    def world_size(self) -> int:
        """Ranks (processes, usually devices) per replica."""
        return self.tp * self.pp


@dataclass(frozen=True)
class DeploymentSpec:
    groups: tuple[ReplicaGroup, ...]
    """Replica groups; at least one replica must be able to decode (hybrid or decode)."""
    routing: str | None = None
    """Gateway routing, one of `gateway.routing.ROUTING`: round_robin, least_loaded (fewest
    outstanding tokens), prefix (the replica that likely has the prompt's prefix cached, within a
    load bound) or pd (conditional disaggregation: long prompts to a prefill replica when its
    queue is short).
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
        # A prefill replica pushes each rank's KV shard to the same rank of whichever decode
        # replica the gateway picks, so every prefill and decode group must shard alike.
        kv_groups = [(i, g) for i, g in enumerate(self.groups)
                     if g.role in ("prefill", "decode") and g.count]
        for i, g in kv_groups[1:]:
            j, first = kv_groups[0]
            if (g.tp, g.pp) != (first.tp, first.pp):
                raise ValueError(
                    f"prefill and decode groups must have equal tp and pp (KV shards go rank i -> "
                    f"rank i): replicas[{j}] ({first.role}) has tp={first.tp}, pp={first.pp}, "
                    f"replicas[{i}] ({g.role}) has tp={g.tp}, pp={g.pp}")

    def check_model(self, model_config) -> None:
        """Checks that need the model (an `engine.model_config.ModelConfig`): every group's tp
        fits the KV heads (whole GQA groups) and its pp the layers. Raises ValueError naming the
        group, the field and the model's limit."""
        from engine.model_config import shard_heads  # noqa: PLC0415  (torch-free)

        for i, g in enumerate(self.groups):
            where = f"replicas[{i}] ({g.role})"
            if g.tp > model_config.num_kv_heads:
                raise ValueError(
                    f"{where}: tp={g.tp} exceeds the model's {model_config.num_kv_heads} KV heads "
                    f"({model_config.num_heads} query heads); tensor parallelism splits whole GQA "
                    f"groups, so tp <= {model_config.num_kv_heads}")
            shard_heads(model_config.num_heads, model_config.num_kv_heads, g.tp)
            if g.pp > model_config.num_layers:
                raise ValueError(f"{where}: pp={g.pp} exceeds the model's {model_config.num_layers} "
                                 f"layers; pp <= {model_config.num_layers}")

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
        for i, g in enumerate(data.get("replicas") or []):
            if not isinstance(g, dict):
                raise ValueError(f"replicas[{i}] must be a mapping (role, count, ...), got {g!r}")
            g = dict(g)
            fields = {k: g.pop(k) for k in GROUP_KEYS if k in g}
            try:
                groups.append(ReplicaGroup(**fields, overrides=g))
            except ValueError as e:
                raise ValueError(f"replicas[{i}]: {e}") from None
        rest = {k: v for k, v in data.items() if k != "replicas"}
        return cls(groups=tuple(groups), **rest)


ENGINE_KEYS = ("dtype", "kv_cache_gb", "num_kv_blocks", "threads")
SCHEDULER_KEYS = {"scheduler": "policy", "token_budget": "token_budget",
                  "idle_token_budget": "idle_token_budget", "max_num_seqs": "max_num_seqs",
                  "max_batched_tokens": "max_batched_tokens", "watermark": "watermark",
                  "enable_prefix_caching": "enable_prefix_caching",
                  "tenant_weights": "tenant_weights", "tenant_fair_share": "tenant_fair_share"}


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
