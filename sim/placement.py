"""`tandem sim placement`: which deployment of a cluster of nodes serves a model best.

Candidates (`enumerate_candidates`) are deployments of one replica shape (TP x PP) in a role mix:
hybrid only; prefill + decode; prefill + decode + hybrid (PD mixes also per offload threshold).
Every option of the search space is one entry of `SEARCH_OPTIONS`, which the command line, the
enumeration and the JSON all read. One shape per candidate because the deployment spec needs equal
tp and pp across prefill and decode groups (KV goes rank i -> rank i); a hybrid group of another
shape beside them is not tried. Pruned before anything runs:
  - shapes the hardware or the model rule out, each with its reason (TP larger than a node, tp
    over the KV heads, weights that leave no KV room: `num_kv_blocks`' ValueError);
  - fewer replicas than fit: adding a replica never takes capacity away under these routers (an
    assumption: round robin spreads the same load thinner; pd has more prefill or decode room),
    so a mix with fewer replicas is dominated by the full one;
  - mixes that round to the same counts, and the threshold of hybrid-only deployments (unused);
  - beyond `--max-candidates`, the later variants of every shape (the list is ordered variant by
    variant across shapes, so each shape keeps its first ones).

Packing (`pack`) is first-fit decreasing as `cluster.placement.plan_placement` packs a spec onto
Ray nodes: largest replica first, the whole replica on the first node with room, else (pp > 1) its
stages on separate nodes; a TP group never spans nodes. Those positions decide the links: KV
between nodes through the NICs (`sim.cluster`: shared FIFO queues), on one node over NVLink; a
pipeline whose stages sit on two nodes uses the inter-node link between them.

Capacity per candidate and SLO is `bench.capacity.find_capacity` over simulated trials
(`sim.cli.SimTrials`, the trial function `tandem sim capacity` uses), judged by P99 TBT <= SLO
and median scheduling delay <= 2 s. The SLOs share trials: a trial is simulated once per rate and
judged against each SLO; the search under a looser SLO starts at the stricter one's capacity
(which passes it too) and stops below the lowest rate that failed on scheduling delay or errors
(which fail it too). Each candidate's first search starts from the best capacity per GPU seen so
far times its GPUs (the first candidate's from --start-qps per replica), so the bracket is short;
the result is the same within the tolerance. Ranked by capacity under the strictest SLO, then the
next ones, then fewer GPUs. The table also shows the median TTFT at capacity: the criteria do not
see KV transfers, so a saturated NIC only shows there.
"""
from __future__ import annotations

import argparse
import math
import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

from cluster.spec import DeploymentSpec, ReplicaGroup, SCHEDULER_KEYS
from scheduler.config import STEP_MODEL_BUDGETS
from sim.specs import LINKS, Device, ModelSpec

Rank = tuple[int, int]
"""(node, GPU index on the node) of one rank of a replica (`sim.cluster.Rank`)."""

MIXES = ("hybrid", "pd", "pdh")
"""Role mixes: hybrid replicas only; prefill + decode; prefill + decode + hybrid."""

PLACEMENT_NUM_REQUESTS = 512
"""Fewest requests per trial of the search: a quarter of `tandem sim capacity`'s 2048, to try
dozens of candidates in minutes (confirm the winner with more)."""
PLACEMENT_MIN_TRIAL_S = 20.0
"""...and at least this many seconds of arrivals (qps x this many requests). A fixed count is a
burst, not a steady load, once the rate is high: 128 requests at 512 qps over 4 Mistral-7B
replicas are 32 each, which their batch slots absorb while the median waits for ~16 prompts'
prefill (under 2 s), so every rate passed. Over D seconds an overload of e grows the scheduling
delay by about e per second, so the median (of requests spread over D) exceeds 2 s once
e > 4 s / D: 20 s resolves a 20% overload. Sarathi-Serve's trials are minutes long; these are
short to afford dozens of candidates, so capacities are optimistic by up to that much."""
PLACEMENT_TOLERANCE = 0.1
"""Relative bisection tolerance of the search: coarse (capacity's is 2.5%), enough to rank."""
PLACEMENT_MAX_CANDIDATES = 24
"""Candidates simulated at most, by default (each takes about 10 trials)."""
SLO_DECODE_MULTIPLES = (5, 25)
"""Default strict and relaxed P99 TBT SLOs as multiples of the batch-1 decode step: the rule
Sarathi-Serve's evaluation states (and docs/results.md follows); the step is the roofline's."""
REFERENCE_CONTEXT = 1024
"""Context of that reference decode step (a short one: the step is mostly the weights' read)."""
RESOURCES_PER_RANK = {"CPU": 1, "GPU": 1}
"""What each rank reserves in the written spec (Ray names), so a Ray launch packs GPUs as here."""
PLOT_TOP = 12
"""Candidates in the bar chart."""


@dataclass(frozen=True)
class SearchOption:
    name: str
    """Key of the search space and of the parsed arguments; the flag is --name-with-dashes."""
    kind: type
    """Type of one value (the flag takes a comma-separated list)."""
    default: tuple
    """Values tried by default."""
    help: str
    """What the option varies."""
    choices: tuple | None = None
    """Allowed values, when a fixed set."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, text: str) -> tuple:
        try:
            values = tuple(self.kind(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"{self.flag}: expected comma-separated {self.kind.__name__} "
                                             f"values, got {text!r}") from None
        bad = [v for v in values if self.choices is not None and v not in self.choices]
        if not values or bad:
            raise argparse.ArgumentTypeError(f"{self.flag}: got {text!r}; choose from {self.choices}"
                                             if bad else f"{self.flag}: no values in {text!r}")
        return values


SEARCH_OPTIONS: tuple[SearchOption, ...] = (
    SearchOption("mixes", str, MIXES, "Role mixes: hybrid (hybrid replicas only), pd (prefill + "
                 "decode), pdh (prefill + decode + hybrid).", MIXES),
    SearchOption("tp", int, (1, 2, 4, 8), "Tensor-parallel GPUs per stage (a TP group stays on one "
                 "node)."),
    SearchOption("pp", int, (1, 2), "Pipeline stages per replica (stages may sit on different "
                 "nodes, linked by the inter-node link)."),
    SearchOption("offload_threshold", int, (512, 2048), "pd routing: prompts longer than this go "
                 "to a prefill replica (PD mixes only)."),
    SearchOption("prefill_shares", float, (0.25, 0.5, 0.75), "Prefill replicas as a share of the "
                 "non-hybrid replicas of a PD mix (rounded, at least one of each role)."),
    SearchOption("hybrid_shares", float, (0.5,), "pdh: hybrid replicas as a share of all replicas."),
)
"""The search space: every option the candidates vary, in one place."""


def default_space() -> dict[str, tuple]:
    return {o.name: o.default for o in SEARCH_OPTIONS}


@dataclass(frozen=True)
class Hardware:
    nodes: int | None = 2
    """Nodes of the cluster (None: as many as the replicas need, for `tandem sim run`)."""
    gpus_per_node: int = 8
    """GPUs per node."""
    device: str = "a100-80gb"
    """GPU (a key of `sim.specs.DEVICES`)."""
    inter_node_link: str = "100gbe"
    """Link between nodes, per NIC (a key of `sim.specs.LINKS`)."""
    nics_per_node: int = 1
    """NICs per node, each with the inter-node link's bandwidth; 1 by default (a DGX A100 has 8
    compute HCAs, one per GPU)."""

    def __post_init__(self) -> None:
        if self.nodes is not None and self.nodes < 1:
            raise ValueError(f"nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {self.gpus_per_node}")
        if not 1 <= self.nics_per_node <= self.gpus_per_node:
            raise ValueError(f"nics_per_node must be in 1..{self.gpus_per_node}, got {self.nics_per_node}")
        if self.inter_node_link not in LINKS:
            raise ValueError(f"unknown inter-node link {self.inter_node_link!r}; known: {sorted(LINKS)}")

    @property
    def gpus(self) -> int | None:
        return None if self.nodes is None else self.nodes * self.gpus_per_node


# -- packing -----------------------------------------------------------------------------------

class PackError(ValueError):
    """Replicas that do not fit the nodes; the message names the replica and what is short."""


def pack(shapes: Sequence[tuple[int, int]], gpus_per_node: int, nodes: int | None,
         names: Sequence[str] | None = None) -> list[tuple[Rank, ...]]:
    """The ranks of replicas of (tp, pp) `shapes` on `nodes` nodes (None: open as many as needed),
    first-fit decreasing (see the module doc); per replica, in its (stage, tp_rank) order. GPUs of
    a node are handed out in order from 0."""
    names = list(names) if names is not None else [f"replica {i}" for i in range(len(shapes))]
    for name, (tp, pp) in zip(names, shapes):
        if tp < 1 or pp < 1:
            raise PackError(f"{name}: tp and pp must be >= 1, got tp={tp}, pp={pp}")
        if tp > gpus_per_node:
            raise PackError(f"{name}: tp={tp} needs {tp} GPUs on one node (a TP group never spans "
                            f"nodes), a node has {gpus_per_node}")
    used = [0] * (nodes or 0)
    out: list[tuple[Rank, ...] | None] = [None] * len(shapes)
    placed: list[str] = []

    def first_fit(need: int, free: list[int]) -> int | None:
        for n, u in enumerate(free):
            if gpus_per_node - u >= need:
                return n
        if nodes is None:   # open a node
            free.append(0)
            return len(free) - 1
        return None

    for i in sorted(range(len(shapes)), key=lambda i: -shapes[i][0] * shapes[i][1]):
        tp, pp = shapes[i]
        world = tp * pp
        node = first_fit(world, used) if world <= gpus_per_node else None
        if node is not None:
            out[i] = tuple((node, used[node] + k) for k in range(world))
            used[node] += world
        else:   # one stage per group, each on the first node with room (all or nothing)
            trial, ranks = list(used), []
            for _ in range(pp):
                node = first_fit(tp, trial)
                if node is None:
                    most = max(gpus_per_node - u for u in used)
                    raise PackError(
                        f"cannot place {names[i]} (tp={tp}, pp={pp}: {world} GPUs, a stage of {tp} "
                        f"on one node): after {len(placed)} replica(s) the most free on a node is "
                        f"{most} of {gpus_per_node}, {sum(gpus_per_node - u for u in used)} free "
                        f"on {len(used)} node(s)")
                ranks += [(node, trial[node] + k) for k in range(tp)]
                trial[node] += tp
            used[:] = trial
            out[i] = tuple(ranks)
        placed.append(names[i])
    return out   # type: ignore[return-value]


# -- candidates --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    prefill: int
    """Prefill replicas."""
    decode: int
    """Decode replicas."""
    hybrid: int
    """Hybrid replicas."""
    tp: int
    """Tensor-parallel GPUs per stage of every replica."""
    pp: int
    """Pipeline stages of every replica."""
    offload_threshold: int | None = None
    """pd routing threshold (None: no prefill replicas, no offloading)."""

    def __post_init__(self) -> None:
        if min(self.prefill, self.decode, self.hybrid) < 0 or self.hybrid + self.decode < 1:
            raise ValueError(f"need >= 0 replicas of each role and a hybrid or decode one, got {self}")
        if self.prefill and (not self.decode or self.offload_threshold is None):
            raise ValueError(f"prefill replicas need decode replicas and an offload threshold: {self}")

    @property
    def replicas(self) -> int:
        return self.prefill + self.decode + self.hybrid

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp * self.pp

    @property
    def mix(self) -> str:
        parts = [f"{n}{r}" for n, r in ((self.prefill, "P"), (self.decode, "D"), (self.hybrid, "H")) if n]
        return "+".join(parts)

    @property
    def label(self) -> str:
        thr = f" thr{self.offload_threshold}" if self.offload_threshold is not None else ""
        return f"{self.mix} tp{self.tp} pp{self.pp}{thr}"

    def spec(self, overrides: dict | None = None, kv_codec: str = "raw",
             model: str | None = None) -> DeploymentSpec:
        """This deployment as a `cluster.spec.DeploymentSpec` (prefill, decode, hybrid groups;
        each rank reserving `RESOURCES_PER_RANK`; `overrides` on every group)."""
        groups = tuple(ReplicaGroup(role, n, tp=self.tp, pp=self.pp, resources=dict(RESOURCES_PER_RANK),
                                    overrides=dict(overrides or {}))
                       for role, n in (("prefill", self.prefill), ("decode", self.decode),
                                       ("hybrid", self.hybrid)) if n)
        kw = {} if self.offload_threshold is None else {"offload_threshold": self.offload_threshold}
        return DeploymentSpec(groups=groups, kv_codec=kv_codec, model=model, **kw)

    def shapes(self) -> list[tuple[str, tuple[int, int]]]:
        """(replica id, (tp, pp)) in the spec's replica order."""
        return [(rid, (g.tp, g.pp)) for rid, g, _ in self.spec().replicas(cores=1)]


def _mixes(n: int, space: dict[str, tuple]) -> list[tuple[int, int, int, bool]]:
    """(prefill, decode, hybrid, uses_threshold) of `n` replicas, in variant order."""
    out: list[tuple[int, int, int, bool]] = []

    def split(total: int, share: float) -> int:
        return min(max(round(total * share), 1), total - 1)

    for mix in space["mixes"]:
        if mix == "hybrid":
            out.append((0, 0, n, False))
        elif mix == "pd" and n >= 2:
            out += [(split(n, s), n - split(n, s), 0, True) for s in space["prefill_shares"]]
        elif mix == "pdh" and n >= 3:
            for hs in space["hybrid_shares"]:
                h = min(max(round(n * hs), 1), n - 2)
                out += [(split(n - h, s), n - h - split(n - h, s), h, True) for s in space["prefill_shares"]]
    return out


@dataclass
class Plan:
    candidate: Candidate
    ranks: list[tuple[Rank, ...]]
    """Per replica in the spec's order, where its ranks sit."""
    variant: int = 0
    """Position of the candidate among its shape's variants (truncation order)."""


def kv_blocks(model: ModelSpec, device: Device, tp: int, pp: int, block_size: int) -> int:
    """KV blocks of one replica (`sim.replica.num_kv_blocks`); raises ValueError when the
    model's weights leave no room."""
    from sim.replica import num_kv_blocks

    return num_kv_blocks(model, device, tp, block_size, pp=pp)


def enumerate_candidates(model: ModelSpec, hw: Hardware, space: dict[str, tuple],
                         block_size: int = 16) -> tuple[list[Plan], list[dict]]:
    """(plans, rejected shapes with reasons), plans ordered variant by variant across shapes."""
    device = _device(hw)
    per_shape: list[list[Plan]] = []
    rejected: list[dict] = []
    seen: set[Candidate] = set()
    for tp in space["tp"]:
        for pp in space["pp"]:
            shape = {"tp": tp, "pp": pp}
            try:
                # the deployment spec's own checks (tp within the KV heads, pp within the layers)
                Candidate(0, 0, 1, tp, pp).spec().check_model(model.model_config())
                kv_blocks(model, device, tp, pp, block_size)
                if tp > hw.gpus_per_node:
                    raise PackError(f"tp={tp} needs {tp} GPUs on one node (a TP group never spans "
                                    f"nodes), a node has {hw.gpus_per_node}")
                n = hw.gpus // (tp * pp)
                if n < 1:
                    raise PackError(f"a replica needs {tp * pp} GPUs, the cluster has {hw.gpus}")
                while True:
                    try:
                        ranks = pack([(tp, pp)] * n, hw.gpus_per_node, hw.nodes)
                        break
                    except PackError:
                        if n == 1:
                            raise
                        n -= 1
            except ValueError as e:   # PackError too
                rejected.append({**shape, "reason": str(e).removeprefix("replicas[0] (hybrid): ")})
                continue
            plans = []
            # thresholds vary slowest: truncation drops the later thresholds' mixes first
            for thr in space["offload_threshold"]:
                for p, d, h, pd in _mixes(n, space):
                    c = Candidate(p, d, h, tp, pp, thr if pd else None)
                    if c not in seen:
                        seen.add(c)
                        plans.append(Plan(c, ranks, len(plans)))
            per_shape.append(plans)
    ordered = sorted((p for plans in per_shape for p in plans), key=lambda p: p.variant)
    return ordered, rejected


def _device(hw: Hardware) -> Device:
    from sim.specs import get_device

    return get_device(hw.device)


# -- building and judging a candidate ---------------------------------------------------------

def cluster_factory(plan: Plan, model: ModelSpec, hw: Hardware, config, *, kv_codec: str = "raw",
                    model_name: str | None = None) -> Callable:
    """A function making a fresh `sim.cluster.Cluster` of `plan` (roofline costs per replica; a
    pipeline spanning nodes uses the inter-node link between its stages)."""
    from sim.cluster import Cluster, KVLink
    from sim.cost import RooflineCost
    from sim.replica import SimReplica
    from sim.specs import get_link

    c = plan.candidate
    device = _device(hw)
    name = model_name or model.name
    blocks = kv_blocks(model, device, c.tp, c.pp, config.block_size)
    spec = c.spec()
    shapes = c.shapes()
    inter, intra = get_link(hw.inter_node_link), get_link(device.intra_link)
    costs: dict[bool, tuple] = {}

    def cost_of(ranks: tuple[Rank, ...]):
        spans = len({node for node, _ in ranks}) > 1
        if spans not in costs:
            cost = RooflineCost(model, device, tp=c.tp, pp=c.pp, pp_link=inter if spans else intra)
            costs[spans] = (cost, cost.step_model() if config.budget.kind in STEP_MODEL_BUDGETS else None)
        return costs[spans]

    roles = {rid: g.role for rid, g, _ in spec.replicas(cores=1)}
    kv = KVLink(inter, model.kv_bytes_per_token(), kv_codec, intra_link=intra,
                nics_per_node=hw.nics_per_node, gpus_per_node=hw.gpus_per_node)

    def make() -> Cluster:
        replicas = [SimReplica(rid, roles[rid], config, blocks, *cost_of(ranks), name)
                    for (rid, _), ranks in zip(shapes, plan.ranks)]
        return Cluster(replicas, spec.routing, spec.offload_threshold, kv, model_name=name,
                       placement=plan.ranks)

    return make


def reference_decode_step_s(model: ModelSpec, device: Device, max_model_len: int,
                            block_size: int = 16) -> tuple[float, int]:
    """(batch-1 decode step time, its tp): the roofline of the smallest TP (pp 1) whose KV cache
    holds one `max_model_len` sequence, at `REFERENCE_CONTEXT` tokens of context."""
    from sim.cost import RooflineCost

    tp = 1
    while tp <= model.num_kv_heads:
        try:
            if kv_blocks(model, device, tp, 1, block_size) * block_size >= max_model_len:
                return RooflineCost(model, device, tp=tp).decode_step_time(1, REFERENCE_CONTEXT), tp
        except ValueError:
            pass
        tp *= 2
    raise ValueError(f"{model.name} does not fit on {model.num_kv_heads} x {device.name} with "
                     f"room for a {max_model_len}-token sequence; pass --tbt-slo-ms")


@dataclass
class Evaluation:
    plan: Plan
    capacity: dict[float, object] = field(default_factory=dict)
    """SLO in ms -> `bench.capacity.CapacityResult`."""
    requests: int = 0
    wall_s: float = 0.0
    error: str | None = None

    def capacity_qps(self, slo_ms: float) -> float | None:
        r = self.capacity.get(slo_ms)
        return None if r is None else r.capacity_qps

    def ttft_at_capacity(self, slo_ms: float) -> float | None:
        """Median TTFT of the trial at capacity: the scheduling delay criterion does not see KV
        transfers, so a saturated NIC shows here (TTFT growing) and nowhere else."""
        r = self.capacity.get(slo_ms)
        if r is None or r.capacity_qps is None:
            return None
        return next((t.p50_ttft_s for t in r.trials if t.qps == r.capacity_qps), None)

    def sort_key(self, slos_ms: Sequence[float]) -> tuple:
        caps = tuple(-(self.capacity_qps(s) or 0.0) for s in slos_ms)
        return (*caps, self.plan.candidate.gpus)

    def to_dict(self, slos_ms: Sequence[float]) -> dict:
        c = self.plan.candidate
        out = {**asdict(c), "mix": c.mix, "label": c.label, "replicas": c.replicas, "gpus": c.gpus,
               "ranks": [list(map(list, r)) for r in self.plan.ranks], "error": self.error,
               "sim": {"requests": self.requests, "wall_s": self.wall_s}, "capacity": {}}
        for s in slos_ms:
            r = self.capacity.get(s)
            if r is None:
                continue
            trials = [{"qps": t.qps, "p99_tbt_s": t.p99_tbt_s, "p50_sched_delay_s": t.p50_sched_delay_s,
                       "num_errors": t.num_errors, "passed": t.passed, "reason": t.reason}
                      for t in r.trials]
            cap = r.capacity_qps
            out["capacity"][f"{s:g}"] = {
                "capacity_qps": cap, "capacity_per_gpu": None if cap is None else cap / c.gpus,
                "p50_ttft_s_at_capacity": self.ttft_at_capacity(s),
                "status": r.status, "lo_qps": r.lo_qps, "hi_qps": r.hi_qps, "trials": trials}
        return out


@dataclass(frozen=True)
class Search:
    start_qps: float = 1.0
    """First rate tried when nothing better is known."""
    min_qps: float = 0.05
    """Lowest rate tried."""
    max_qps: float = 512.0
    """Highest rate tried."""
    tolerance: float = PLACEMENT_TOLERANCE
    """Relative bisection tolerance."""
    max_trials: int = 12
    """Most trials per SLO."""


def evaluate(plan: Plan, run_trial: Callable, slos_ms: Sequence[float], criteria,
             search: Search, start_qps: float | None = None) -> Evaluation:
    """Capacity of `plan` under every SLO (ascending), sharing trials (module doc).
    `run_trial(qps)` returns an unjudged `TrialResult`; `criteria` a `CapacityCriteria` whose
    tbt_slo_s is replaced per SLO."""
    from bench.capacity import find_capacity, judge

    ev = Evaluation(plan)
    seen: dict[float, object] = {}

    def raw(qps: float):
        if qps not in seen:
            seen[qps] = run_trial(qps)
        return seen[qps]

    start = min(max(start_qps or search.start_qps, search.min_qps), search.max_qps)
    ceiling = search.max_qps
    any_slo = replace(criteria, tbt_slo_s=math.inf)
    for slo in sorted(slos_ms):
        crit = replace(criteria, tbt_slo_s=slo / 1000)
        result = find_capacity(lambda q: judge(replace(raw(q)), crit), start_qps=start,
                               min_qps=search.min_qps, max_qps=ceiling,
                               tolerance=search.tolerance, max_trials=search.max_trials)
        ev.capacity[slo] = result
        if result.capacity_qps is None:
            continue
        # a looser SLO passes where this one did, and fails where the scheduling delay or errors
        # failed (no SLO changes those): its search starts and ends there, on trials already run
        start = min(max(result.capacity_qps, search.min_qps), search.max_qps)
        above = [q for q, t in seen.items() if q > start and not judge(replace(t), any_slo).passed]
        ceiling = min(above, default=search.max_qps)
    return ev


def rank(evals: list[Evaluation], slos_ms: Sequence[float]) -> list[Evaluation]:
    """Best first: capacity under the first SLO, then the next ones, then fewer GPUs."""
    return sorted(evals, key=lambda e: e.sort_key(slos_ms))


# -- outputs -----------------------------------------------------------------------------------

def format_table(evals: list[Evaluation], slos_ms: Sequence[float]) -> str:
    head = f"{'#':>3} {'mix':<12} {'tp':>2} {'pp':>2} {'GPUs':>4} {'thr':>5}"
    for s in slos_ms:
        head += f" {f'qps@{s:g}ms':>12} {'per GPU':>8} {'TTFT s':>7}"
    rows = [head]
    for i, e in enumerate(evals, 1):
        c = e.plan.candidate
        thr = "-" if c.offload_threshold is None else str(c.offload_threshold)
        row = f"{i:>3} {c.mix:<12} {c.tp:>2} {c.pp:>2} {c.gpus:>4} {thr:>5}"
        for s in slos_ms:
            cap = e.capacity_qps(s)
            ttft = e.ttft_at_capacity(s)
            # ">=": passed at --max-qps, never failed; "~": stopped by --max-trials
            mark = {"max_qps": ">=", "max_trials": "~"}.get(e.capacity[s].status, "") if cap else ""
            row += (f" {'-':>12} {'-':>8} {'-':>7}" if cap is None else
                    f" {mark + f'{cap:.2f}':>12} {cap / c.gpus:>8.3f} "
                    f"{'-' if ttft is None else f'{ttft:.2f}':>7}")
        rows.append(row + (f"  error: {e.error}" if e.error else ""))
    return "\n".join(rows)


def spec_yaml(spec: DeploymentSpec, header: str = "") -> str:
    """`spec` as YAML that `DeploymentSpec.from_yaml` reads back (group keys and overrides)."""
    import yaml

    from cluster.spec import GROUP_KEYS

    groups = []
    for g in spec.groups:
        d = {k: getattr(g, k) for k in GROUP_KEYS if getattr(g, k) is not None}
        groups.append({**d, **g.overrides})
    top = {k: v for k, v in asdict(spec).items() if k != "groups"}
    body = yaml.safe_dump({**top, "replicas": groups}, sort_keys=False, default_flow_style=None)
    lines = "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines())
    return lines + body


def layout(plan: Plan) -> str:
    """Where each replica sits, e.g. `prefill-0@0 decode-0@1 hybrid-0@0+1` (stages on nodes 0, 1)."""
    return " ".join(f"{rid}@{'+'.join(str(n) for n in sorted({n for n, _ in ranks}))}"
                    for (rid, _), ranks in zip(plan.candidate.shapes(), plan.ranks))


def scheduler_overrides(config) -> dict:
    """A `SchedulerConfig` as replica-group overrides (the spec's scheduler keys)."""
    return {key: getattr(config, attr) for key, attr in SCHEDULER_KEYS.items()}


def plot(evals: list[Evaluation], slos_ms: Sequence[float], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = evals[:PLOT_TOP]
    width = 0.8 / max(1, len(slos_ms))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(top) + 2), 4.5))
    for j, s in enumerate(slos_ms):
        xs = [i + (j - (len(slos_ms) - 1) / 2) * width for i in range(len(top))]
        ax.bar(xs, [e.capacity_qps(s) or 0.0 for e in top], width, label=f"P99 TBT <= {s:g} ms")
    ax.set_xticks(range(len(top)))
    ax.set_xticklabels([e.plan.candidate.label.replace(" ", "\n", 1) for e in top], rotation=45,
                       ha="right", fontsize=8)
    ax.set_ylabel("capacity (requests/s)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    from pathlib import Path

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -- the command -------------------------------------------------------------------------------

def add_placement_args(p: argparse.ArgumentParser) -> None:
    """Options of `tandem sim placement` (the workload and scheduling ones are `sim run`'s)."""
    from bench.cli import add_search_args
    from sim.cli import add_model_device_args, add_scheduling_args
    from sim.cluster import CODEC_RATIO

    h = p.add_argument_group("cluster")
    add_model_device_args(h)
    h.add_argument("--nodes", type=int, default=Hardware.nodes, help="Nodes (default 2).")
    h.add_argument("--gpus-per-node", type=int, default=Hardware.gpus_per_node, help="Default 8.")
    h.add_argument("--inter-node-link", choices=sorted(LINKS), default=Hardware.inter_node_link,
                   help="Link between nodes, per NIC (default 100gbe).")
    h.add_argument("--nics-per-node", type=int, default=Hardware.nics_per_node,
                   help="NICs per node, each with the inter-node link's bandwidth; GPU g uses NIC "
                        "g * nics / gpus-per-node (default 1; a DGX A100 has 8).")
    h.add_argument("--kv-codec", choices=sorted(CODEC_RATIO), default="raw")
    s = p.add_argument_group("search space (comma-separated lists)")
    for o in SEARCH_OPTIONS:
        s.add_argument(o.flag, dest=o.name, type=o.parse, default=o.default,
                       help=f"{o.help} Default {','.join(map(str, o.default))}.")
    s.add_argument("--max-candidates", type=int, default=PLACEMENT_MAX_CANDIDATES,
                   help=f"Simulate at most this many candidates (default {PLACEMENT_MAX_CANDIDATES}); "
                        f"beyond it the later variants of every shape are dropped.")
    add_search_args(p, tolerance=PLACEMENT_TOLERANCE, max_qps=Search.max_qps, max_trials=Search.max_trials,
                    delay_help="Median scheduling delay limit in s (the paper's 2 s; measured "
                               "directly in the simulator).")
    mult = " and ".join(f"{m}x" for m in SLO_DECODE_MULTIPLES)
    p.add_argument("--tbt-slo-ms", type=float, nargs="+", default=None,
                   help=f"P99 TBT SLOs in ms; candidates rank by the strictest, ties by the next "
                        f"(default: {mult} the roofline's batch-1 decode step at {REFERENCE_CONTEXT} "
                        f"tokens of context on the smallest TP that holds a --max-model-len sequence, "
                        f"to the ms: Sarathi-Serve's strict and relaxed rule; on a100-80gb 54 and 270 "
                        f"for mistral-7b, 229 and 1146 for llama-2-70b).")
    add_scheduling_args(p)
    s.add_argument("--min-trial-s", type=float, default=PLACEMENT_MIN_TRIAL_S,
                   help=f"A trial at Q qps simulates max(--num-requests, Q x this) requests (default "
                        f"{PLACEMENT_MIN_TRIAL_S:g} s; --num-requests defaults to "
                        f"{PLACEMENT_NUM_REQUESTS} here): a shorter trial is a burst that the batch "
                        f"slots absorb, and an overload of e only shows after ~4 s / e.")
    o = p.add_argument_group("outputs")
    o.add_argument("--json", dest="json_out", metavar="OUT", default=None, help="Write all results as JSON.")
    o.add_argument("--plot", default=None, metavar="OUT.png",
                   help=f"Bar chart of the top {PLOT_TOP} candidates' capacity per SLO.")
    o.add_argument("--spec-out", default=None, metavar="best.yaml",
                   help="Write the best candidate as a deployment spec (`tandem serve --spec`).")
    from bench.cli import add_workload_args

    add_workload_args(p)
    p.set_defaults(num_requests=PLACEMENT_NUM_REQUESTS)


def cmd_sim_placement(args: argparse.Namespace) -> None:
    from bench.capacity import CapacityCriteria
    from bench.cli import workload_config, write_json
    from bench.workload import build_workload
    from sim.cli import SimTrials, scheduler_config
    from sim.specs import get_model

    t0 = time.perf_counter()
    try:
        model = get_model(args.model)
        hw = Hardware(args.nodes, args.gpus_per_node, args.device, args.inter_node_link, args.nics_per_node)
        device = _device(hw)
        config = scheduler_config(args, 100.0)   # only the pre-SLO checks below read its budget
        if args.tbt_slo_ms:
            slos, slo_rule = sorted({float(s) for s in args.tbt_slo_ms}), "given"
        else:
            step, ref_tp = reference_decode_step_s(model, device, config.max_model_len, config.block_size)
            slos = [float(round(m * step * 1000)) for m in SLO_DECODE_MULTIPLES]
            slo_rule = (f"{' and '.join(f'{m}x' for m in SLO_DECODE_MULTIPLES)} the batch-1 decode "
                        f"step at tp={ref_tp} ({step * 1000:.1f} ms)")
        if any(not s > 0 for s in slos):
            raise ValueError(f"--tbt-slo-ms must be > 0, got {slos}")
        config = scheduler_config(args, min(slos))   # adaptive budgets aim at the strictest SLO
        if args.max_candidates < 1:
            raise ValueError(f"--max-candidates must be >= 1, got {args.max_candidates}")
        if not args.min_trial_s >= 0:
            raise ValueError(f"--min-trial-s must be >= 0, got {args.min_trial_s}")
        cfg = workload_config(args)
        criteria = CapacityCriteria(tbt_slo_s=min(slos) / 1000, max_p50_ttft_s=args.max_p50_ttft_s,
                                    max_error_fraction=args.max_error_fraction)
        search = Search(args.start_qps, args.min_qps, args.max_qps, args.tolerance, args.max_trials)
        build_workload(cfg, search.start_qps)   # fail on a bad workload before simulating
        space = {o.name: getattr(args, o.name) for o in SEARCH_OPTIONS}
        plans, rejected = enumerate_candidates(model, hw, space, config.block_size)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    print(f"placement of {model.name} on {hw.nodes} x {hw.gpus_per_node} {device.name} "
          f"({hw.inter_node_link}, {hw.nics_per_node} NIC(s) per node); SLOs: P99 TBT <= "
          f"{', '.join(f'{s:g}' for s in slos)} ms ({slo_rule}), P50 scheduling delay <= "
          f"{args.max_p50_ttft_s:g} s; max({cfg.num_requests}, qps x {args.min_trial_s:g} s) "
          f"requests per trial")
    for r in rejected:
        print(f"  skip tp={r['tp']} pp={r['pp']}: {r['reason']}")
    dropped = plans[args.max_candidates:]
    plans = plans[:args.max_candidates]
    print(f"{len(plans)} candidate(s)" + (f" ({len(dropped)} more dropped by --max-candidates: "
                                           f"{', '.join(p.candidate.label for p in dropped[:6])}"
                                           f"{' ...' if len(dropped) > 6 else ''})" if dropped else ""))
    if not plans:
        raise SystemExit("error: no candidate fits (see the reasons above)")
    evals: list[Evaluation] = []
    total_req, total_wall = 0, 0.0
    best_per_gpu = 0.0
    for i, plan in enumerate(plans, 1):
        c = plan.candidate
        make = cluster_factory(plan, model, hw, config, kv_codec=args.kv_codec, model_name=args.model)
        trials = SimTrials(make, cfg, c.label, min_trial_s=args.min_trial_s)
        hint = best_per_gpu * c.gpus or search.start_qps * c.replicas
        ev = evaluate(plan, trials, slos, criteria, search, start_qps=hint)
        ev.requests, ev.wall_s = trials.requests, trials.wall
        total_req += trials.requests
        total_wall += trials.wall
        evals.append(ev)
        caps = ", ".join(f"{s:g} ms: " + ("-" if ev.capacity_qps(s) is None else f"{ev.capacity_qps(s):.2f}")
                         for s in sorted(slos))
        best_per_gpu = max(best_per_gpu, *((ev.capacity_qps(s) or 0.0) / c.gpus for s in slos))
        print(f"[{i}/{len(plans)}] {c.label:<28} {c.gpus:>3} GPUs | {caps} qps | "
              f"{sum(len(r.trials) for r in ev.capacity.values())} trials, {trials.requests} requests "
              f"in {trials.wall:.1f} s ({trials.rate:,.0f}/s)", flush=True)
    ranked = rank(evals, slos)
    print()
    print(format_table(ranked, slos))
    wall = time.perf_counter() - t0
    rate = total_req / total_wall if total_wall else 0.0
    print(f"simulated {total_req} requests in {total_wall:.1f} s ({rate:,.0f} requests/s); "
          f"{wall:.1f} s in all")
    best = ranked[0]
    title = (f"{model.name} on {hw.nodes} x {hw.gpus_per_node} {device.name}, {hw.inter_node_link}: "
             f"capacity (P50 delay <= {args.max_p50_ttft_s:g} s)")
    if args.plot:
        plot(ranked, slos, args.plot, title)
        print(f"wrote {args.plot}")
    if args.spec_out:
        _write_spec(args.spec_out, best, args, slos, model.name)
    write_json(args.json_out, {
        "kind": "sim-placement", "model": args.model, "device": device.name, "hardware": asdict(hw),
        "tbt_slos_ms": slos, "slo_rule": slo_rule, "criteria": asdict(criteria),
        "workload": asdict(cfg), "scheduler": asdict(config), "kv_codec": args.kv_codec,
        "search": asdict(search), "space": {k: list(v) for k, v in space.items()},
        "max_candidates": args.max_candidates, "min_trial_s": args.min_trial_s,
        "dropped": [p.candidate.label for p in dropped],
        "rejected": rejected, "ranked": [e.to_dict(slos) for e in ranked],
        "best": best.plan.candidate.label,
        "sim": {"requests": total_req, "wall_s": total_wall, "requests_per_s": rate, "total_wall_s": wall}})


def _write_spec(path: str, best: Evaluation, args, slos: Sequence[float], model_name: str) -> None:
    from pathlib import Path

    from sim.cli import scheduler_config

    c = best.plan.candidate
    spec = c.spec(scheduler_overrides(scheduler_config(args, min(slos))), kv_codec=args.kv_codec)
    caps = ", ".join(f"{s:g} ms: {best.capacity_qps(s) or 0:.2f} qps" for s in slos)
    header = "\n".join([
        *textwrap.wrap(f"Best deployment of {model_name} found by `tandem sim placement` ({c.label}): "
                       f"simulated capacity {caps} on {args.nodes} x {args.gpus_per_node} {args.device}, "
                       f"{args.inter_node_link} between nodes. Replica@node as simulated (first fit, as "
                       f"cluster.placement packs it):", 96),
        *textwrap.wrap(layout(best.plan), 96),
        f"EDIT: set model to the model's HF dir; serve with --max-model-len {args.max_model_len}."])
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(spec_yaml(spec, header))
    print(f"wrote {path}")
