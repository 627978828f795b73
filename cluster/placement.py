"""Placement: a deployment spec -> Ray placement-group requests, one bundle per rank.

A replica has tp * pp ranks in the order (stage, tp_rank); each rank reserves its group's
`resources` (one bundle). A replica that fits one node asks for one STRICT_PACK group of all its
bundles (pipeline links stay on the node); one that fits no node asks for a STRICT_PACK group per
pipeline stage (tp bundles each), so stages may land on different nodes but a TP group, whose
all-reduces run every layer, never spans nodes.

Given the cluster's nodes (`NodeResources`: what the deployment may use on each), the plan is
checked before Ray is asked, because Ray leaves a placement group that cannot be placed pending
forever without saying why: a TP group larger than every node, or replicas that do not fit
together (first-fit decreasing), raise `PlacementError` naming the replica, the stage and the
resource that is short. First-fit decreasing is a heuristic: it can reject a cluster that a
cleverer packing would fill, and Ray packs in its own way, so the launcher still needs a timeout
on pending groups.

Pure: Ray is not imported here; the launcher passes `request.bundle_dicts()`, `request.strategy`
and `request.name` to `ray.util.placement_group`, and `ray.nodes()` resources as `nodes`.
"""
from __future__ import annotations

from dataclasses import dataclass

from cluster.spec import DeploymentSpec

STRICT_PACK = "STRICT_PACK"
_UNIT = 10_000
"""Ray accounts resources in units of 0.0001; so does the feasibility check (no float drift
when a hundred ranks each take `decode_node: 0.01`)."""


class PlacementError(ValueError):
    """The spec cannot be placed on the given nodes; the message names replica and resource."""


@dataclass(frozen=True)
class NodeResources:
    name: str
    """Any label for messages (Ray's node id, a host name)."""
    resources: dict[str, float]
    """Resources the deployment may use on this node, in Ray names (`ray.nodes()[i]
    ["Resources"]`, less anything reserved for other work); a missing key means 0."""


@dataclass(frozen=True)
class Bundle:
    resources: dict[str, float]
    """What one rank reserves (its group's `resources`)."""


@dataclass(frozen=True)
class PlacementGroupRequest:
    replica_id: str
    bundles: tuple[Bundle, ...]
    ranks: tuple[tuple[int, int], ...]
    """ranks[i] = (stage, tp_rank) of the rank that runs in bundles[i]; global rank =
    stage * tp + tp_rank."""
    stage: int | None = None
    """None: the group holds the whole replica; else the one pipeline stage it holds."""
    strategy: str = STRICT_PACK

    @property
    def name(self) -> str:
        """A placement-group name unique within a deployment."""
        return f"tandem-{self.replica_id}" + ("" if self.stage is None else f"-stage{self.stage}")

    def bundle_dicts(self) -> list[dict[str, float]]:
        """The `bundles` argument of `ray.util.placement_group`."""
        return [dict(b.resources) for b in self.bundles]

    def total(self) -> dict[str, float]:
        """Everything the group reserves, which STRICT_PACK needs on a single node."""
        return _from_units(_sum_units(b.resources for b in self.bundles))


def plan_placement(spec: DeploymentSpec,
                   nodes: list[NodeResources] | None = None) -> list[PlacementGroupRequest]:
    """Placement-group requests for every replica of `spec`, in replica order (a replica's stage
    groups in stage order). Without `nodes` every replica asks for one STRICT_PACK group (nothing
    is known about node sizes); with them, replicas too big for any node are split per stage and
    the whole plan is checked to fit (raises `PlacementError`)."""
    if nodes is not None and not nodes:
        raise PlacementError("no nodes to place the deployment on")
    plans: list[list[PlacementGroupRequest]] = []
    for rid, group, _ in spec.replicas(cores=1):
        whole = _request(rid, group.resources, group.tp, range(group.pp), None)
        if nodes is None or _fits_some_node(_units(whole.total()), nodes):
            plans.append([whole])
            continue
        stages = [_request(rid, group.resources, group.tp, [s], s) for s in range(group.pp)]
        need = _units(stages[0].total())
        if not _fits_some_node(need, nodes):
            raise PlacementError(_too_big(rid, 0, group.tp, need, nodes))
        plans.append(stages)
    if nodes is not None:
        plans = _first_fit_decreasing(plans, nodes)
    return [r for plan in plans for r in plan]


def _request(rid: str, per_rank: dict[str, float], tp: int, stages, stage: int | None):
    ranks = tuple((s, t) for s in stages for t in range(tp))
    return PlacementGroupRequest(rid, tuple(Bundle(dict(per_rank)) for _ in ranks), ranks, stage)


def _first_fit_decreasing(plans: list[list[PlacementGroupRequest]],
                          nodes: list[NodeResources]) -> list[list[PlacementGroupRequest]]:
    """Packs every group onto `nodes`, largest (dominant share of the cluster) first, each on the
    first node with room. A whole replica that no longer fits anywhere is split into its stages
    when it has several. Returns the plans with such splits; raises when a group cannot be placed."""
    free = [_units(n.resources) for n in nodes]
    cluster = _sum_units(n.resources for n in nodes)

    def share(req: PlacementGroupRequest) -> float:
        need = _units(req.total())
        return max((v / cluster[k] if cluster.get(k) else float("inf")) for k, v in need.items())

    order = sorted(range(len(plans)), key=lambda i: max(share(r) for r in plans[i]), reverse=True)
    placed_before: list[str] = []
    for i in order:
        plan = plans[i]
        if plan[0].stage is None:       # the whole replica on one node, else split it if it can
            whole = plan[0]
            if not _place(_units(whole.total()), free):
                stages = _split(whole, free)
                if stages is None:
                    raise PlacementError(_no_room(whole, plans, nodes, free, cluster, placed_before))
                plans[i] = stages
        else:
            for req in plan:
                if not _place(_units(req.total()), free):
                    raise PlacementError(_no_room(req, plans, nodes, free, cluster, placed_before))
        placed_before.append(plan[0].replica_id)
    return plans


def _split(whole: PlacementGroupRequest, free: list[dict[str, int]]):
    """`whole`'s stages as separate groups, placed into `free`, or None (and `free` untouched)
    when the replica has one stage or its stages do not all fit."""
    pp = max(s for s, _ in whole.ranks) + 1
    if pp == 1:
        return None
    tp = len(whole.ranks) // pp
    stages = [_request(whole.replica_id, whole.bundles[0].resources, tp, [s], s) for s in range(pp)]
    trial = [dict(f) for f in free]
    if not all(_place(_units(r.total()), trial) for r in stages):
        return None
    free[:] = trial
    return stages


def _place(need: dict[str, int], free: list[dict[str, int]]) -> bool:
    for f in free:
        if all(f.get(k, 0) >= v for k, v in need.items()):
            for k, v in need.items():
                f[k] = f.get(k, 0) - v
            return True
    return False


def _fits_some_node(need: dict[str, int], nodes: list[NodeResources]) -> bool:
    return any(all(_units(n.resources).get(k, 0) >= v for k, v in need.items()) for n in nodes)


def _too_big(rid: str, stage: int, tp: int, need: dict[str, int], nodes: list[NodeResources]) -> str:
    head = f"replica {rid} stage {stage} needs {_fmt(need)} on one node (tp={tp})"
    short = [k for k, v in need.items() if v > max(_units(n.resources).get(k, 0) for n in nodes)]
    if short:
        most = {k: max(_units(n.resources).get(k, 0) for n in nodes) for k in short}
        return f"{head}; the largest node has {_fmt(most)}"
    lacks = _lacks(need, [n.name for n in nodes], [_units(n.resources) for n in nodes])
    return f"{head}; no node has all of it ({lacks})"


def _no_room(req: PlacementGroupRequest, plans, nodes: list[NodeResources],
             free: list[dict[str, int]], cluster: dict[str, int], placed_before: list[str]) -> str:
    need = _units(req.total())
    what = f"replica {req.replica_id}" + ("" if req.stage is None else f" stage {req.stage}")
    most = {k: max(f.get(k, 0) for f in free) for k in need}
    short = {k: most[k] for k, v in need.items() if v > most[k]}
    left = (f"at most {_fmt(short)} is free on any node" if short else
            f"no node has all of it free ({_lacks(need, [n.name for n in nodes], free)})")
    total = _sum_units(r.total() for plan in plans for r in plan)
    over = {k: total[k] for k in need if total[k] > cluster.get(k, 0)}
    before = ", ".join(placed_before[:4]) + (f" and {len(placed_before) - 4} more"
                                             if len(placed_before) > 4 else "")
    msg = (f"cannot place {what}: it needs {_fmt(need)} on one node, but once {before or 'nothing'} "
           f"{'is' if len(placed_before) < 2 else 'are'} placed {left}")
    if over:
        msg += (f"; the spec needs {_fmt(over)} in all, the nodes have "
                f"{_fmt({k: cluster.get(k, 0) for k in over})}")
    return msg + " (Ray would leave its placement group pending)"


def _lacks(need: dict[str, int], names: list[str], have: list[dict[str, int]]) -> str:
    """What each node is short of, e.g. `a has GPU: 0; b has decode_node: 0`."""
    return "; ".join(f"{name} has " + _fmt({k: h.get(k, 0) for k, v in need.items() if h.get(k, 0) < v})
                     for name, h in zip(names, have))


def _units(resources: dict[str, float]) -> dict[str, int]:
    return {k: round(v * _UNIT) for k, v in resources.items() if round(v * _UNIT)}


def _sum_units(many) -> dict[str, int]:
    out: dict[str, int] = {}
    for resources in many:
        for k, v in _units(resources).items():
            out[k] = out.get(k, 0) + v
    return out


def _from_units(units: dict[str, int]) -> dict[str, float]:
    return {k: (v // _UNIT if v % _UNIT == 0 else v / _UNIT) for k, v in units.items()}


def _fmt(units: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in _from_units(units).items())
