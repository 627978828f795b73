"""Node placement in the simulator: packing replicas onto nodes, KV transfers sharing a node's
NIC, the candidate search of `tandem sim placement` and the deployment spec it writes. Fast and
torch-free like tests/test_sim.py."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace

import pytest

from bench.capacity import CapacityCriteria, TrialResult
from bench.workload import WorkloadConfig
from cluster.placement import NodeResources, PlacementError, plan_placement
from cluster.spec import DeploymentSpec
from scheduler.config import SchedulerConfig
from sim.cluster import Cluster, KVLink
from sim.cost import RooflineCost
from sim.placement import (
    Candidate, Evaluation, Hardware, PackError, Plan, Search, SEARCH_OPTIONS, cluster_factory,
    default_space, enumerate_candidates, evaluate, pack, rank, scheduler_overrides, spec_yaml)
from sim.replica import SimReplica
from sim.specs import get_device, get_link, get_model
from tests.no_torch import run_without_torch

MISTRAL, A100 = get_model("mistral-7b"), get_device("a100-80gb")


def _config(**kw) -> SchedulerConfig:
    base = dict(policy="sarathi", token_budget=256, max_num_seqs=32, max_model_len=4096,
                max_batched_tokens=4096)
    return SchedulerConfig(**{**base, **kw})


def _nodes_used(ranks) -> list[set[int]]:
    return [{n for n, _ in r} for r in ranks]


# -- packing -----------------------------------------------------------------------------------

def test_pack_keeps_tp_groups_on_one_node_and_respects_gpu_counts():
    ranks = pack([(4, 1)] * 4, gpus_per_node=8, nodes=2)
    assert all(len(nodes) == 1 for nodes in _nodes_used(ranks))
    flat = [r for rs in ranks for r in rs]
    assert len(flat) == len(set(flat)) == 16
    assert all(0 <= g < 8 and n in (0, 1) for n, g in flat)
    with pytest.raises(PackError, match="cannot place"):
        pack([(4, 1)] * 5, gpus_per_node=8, nodes=2)


def test_pack_splits_a_pipeline_across_nodes_but_never_a_tp_group():
    (ranks,) = pack([(8, 2)], gpus_per_node=8, nodes=2)
    assert [n for n, _ in ranks] == [0] * 8 + [1] * 8     # stage 0 on node 0, stage 1 on node 1
    # two TP4 x PP2 replicas fill a node each, whole
    assert _nodes_used(pack([(4, 2)] * 2, 8, 2)) == [{0}, {1}]
    # 6 + 6 GPUs used: a TP2 x PP2 replica only fits as two stages on two nodes
    ranks = pack([(1, 6), (1, 6), (2, 2)], 8, 2)
    assert _nodes_used(ranks) == [{0}, {1}, {0, 1}]
    assert ranks[2] == ((0, 6), (0, 7), (1, 6), (1, 7))
    with pytest.raises(PackError, match="never spans"):
        pack([(16, 1)], gpus_per_node=8, nodes=4)
    # with open-ended nodes it opens as many as needed
    assert {n for rs in pack([(8, 1)] * 3, 8, None) for n, _ in rs} == {0, 1, 2}


def test_pack_agrees_with_the_ray_placement_check():
    nodes = [NodeResources(f"n{i}", {"CPU": 64, "GPU": 8}) for i in range(2)]
    fits = Candidate(2, 1, 0, tp=4, pp=1, offload_threshold=512)
    pack([s for _, s in fits.shapes()], 8, 2)
    plan_placement(fits.spec(), nodes)
    too_big = Candidate(3, 2, 0, tp=4, pp=1, offload_threshold=512)   # 20 GPUs
    with pytest.raises(PackError):
        pack([s for _, s in too_big.shapes()], 8, 2)
    with pytest.raises(PlacementError):
        plan_placement(too_big.spec(), nodes)


def test_candidates_prune_and_explain():
    llama70 = get_model("llama-2-70b")
    space = {**default_space(), "tp": (1, 2, 4, 16)}
    plans, rejected = enumerate_candidates(llama70, Hardware(), space)
    reasons = {(r["tp"], r["pp"]): r["reason"] for r in rejected}
    assert "does not fit" in reasons[(1, 1)]                      # num_kv_blocks' ValueError
    assert "KV heads" in reasons[(16, 1)] and "KV heads" in reasons[(16, 2)]
    assert plans and all(p.candidate.gpus <= 16 for p in plans)
    cands = [p.candidate for p in plans]
    assert len(cands) == len(set(cands))
    assert all((c.offload_threshold is None) == (c.prefill == 0) for c in cands)
    # no dominated mix: every candidate fills the cluster's replica slots of its shape
    assert all(c.gpus == 16 for c in cands)
    # TP larger than a node
    _, rejected = enumerate_candidates(MISTRAL, Hardware(gpus_per_node=4), {**default_space(), "tp": (8,)})
    assert all("never spans" in r["reason"] for r in rejected) and len(rejected) == 2
    # the order is variant by variant: every shape's first variant comes first
    firsts = [p for p in plans if p.variant == 0]
    assert plans[:len(firsts)] == firsts


def test_search_options_are_one_registry():
    from sim.cli import add_sim_commands

    p = argparse.ArgumentParser()
    add_sim_commands(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(["sim", "placement", "--tp", "1,2", "--mixes", "pd"])
    assert {o.name for o in SEARCH_OPTIONS} == set(default_space())
    assert args.tp == (1, 2) and args.mixes == ("pd",) and args.pp == default_space()["pp"]
    with pytest.raises(SystemExit):
        p.parse_args(["sim", "placement", "--mixes", "pd,colocated"])


# -- the deployment spec -----------------------------------------------------------------------

def test_spec_yaml_round_trip():
    from cluster.spec import apply_overrides
    from engine.config import EngineConfig

    config = _config(token_budget=384)
    c = Candidate(3, 1, 2, tp=2, pp=2, offload_threshold=2048)
    text = spec_yaml(c.spec(scheduler_overrides(config), kv_codec="lz4"), header="a comment\nline 2")
    assert text.startswith("# a comment\n# line 2\n")
    spec = DeploymentSpec.from_yaml(text)
    assert [(g.role, g.count, g.tp, g.pp) for g in spec.groups] == [
        ("prefill", 3, 2, 2), ("decode", 1, 2, 2), ("hybrid", 2, 2, 2)]
    assert spec.routing == "pd" and spec.offload_threshold == 2048 and spec.kv_codec == "lz4"
    assert spec.groups[0].resources == {"CPU": 1, "GPU": 1}
    engine = apply_overrides(EngineConfig(model_dir="unused"), spec.groups[1].overrides)
    assert engine.scheduler.token_budget == 384 and engine.scheduler.max_num_seqs == 32
    hybrid = DeploymentSpec.from_yaml(spec_yaml(Candidate(0, 0, 4, tp=4, pp=1).spec()))
    assert hybrid.routing == "round_robin" and hybrid.num_replicas == 4


# -- NICs --------------------------------------------------------------------------------------

HEAVY = 100
"""KV bytes per token x this: transfers dwarf the prefill compute, so TTFT ~ the landing time."""


def _pd_nodes(n: int, *, prefill_node: int, decode_node: int, nics: int = 1, link="100gbe",
              placement: bool = True) -> Cluster:
    cost = RooflineCost(MISTRAL, A100)
    reps = ([SimReplica(f"p{i}", "prefill", _config(), 4000, cost) for i in range(n)]
            + [SimReplica(f"d{i}", "decode", _config(), 4000, cost) for i in range(n)])
    kv = KVLink(get_link(link), MISTRAL.kv_bytes_per_token() * HEAVY, intra_link=get_link("nvlink"),
                nics_per_node=nics)
    first_decode_gpu = n if prefill_node == decode_node else 0
    ranks = ([[(prefill_node, i)] for i in range(n)]
             + [[(decode_node, first_decode_gpu + i)] for i in range(n)])
    return Cluster(reps, "pd", offload_threshold=64, kv_link=kv, placement=ranks if placement else None)


def _ttfts(cluster: Cluster, n: int) -> list[float]:
    res = cluster.run([(0.0, 2000, 4)] * n)
    cluster.check_drained()
    assert res.decisions == {"offload": n} and all(r.ok for r in res.run.requests)
    return [r.ttft_s for r in res.run.requests]


def test_concurrent_transfers_share_one_nic():
    one = max(_ttfts(_pd_nodes(1, prefill_node=0, decode_node=1), 1))
    transfer = 2000 * MISTRAL.kv_bytes_per_token() * HEAVY / get_link("100gbe").bandwidth
    assert one == pytest.approx(transfer, rel=0.15)         # the transfer is most of the TTFT
    four = max(_ttfts(_pd_nodes(4, prefill_node=0, decode_node=1), 4))
    assert four == pytest.approx(4 * one, rel=0.15)
    # one NIC per GPU: no sharing, as fast as one alone
    own = max(_ttfts(_pd_nodes(4, prefill_node=0, decode_node=1, nics=8), 4))
    assert own == pytest.approx(one, rel=0.1)
    # the same node: NVLink, 24x the bandwidth of 100 GbE
    nvlink = max(_ttfts(_pd_nodes(4, prefill_node=0, decode_node=0), 4))
    assert nvlink < one / 5


def test_one_transfer_across_nodes_is_the_old_link_model():
    """One prefill and one decode replica on two nodes, one transfer at a time: exactly the
    latencies of the model without nodes (every transfer on a link of its own)."""
    reqs = [(3.0 * i, 1500, 8) for i in range(5)]      # 3 s apart: transfers (1.6 s) never overlap
    with_nodes = _pd_nodes(1, prefill_node=0, decode_node=1)
    without = _pd_nodes(1, prefill_node=0, decode_node=1, placement=False)
    a, b = with_nodes.run(reqs).run.requests, without.run(reqs).run.requests
    assert [r.ttft_s for r in a] == [r.ttft_s for r in b]
    assert [r.itl_s for r in a] == [r.itl_s for r in b]
    assert without.replicas[0].node == 0 and with_nodes.replicas[1].node == 1


def test_placement_must_be_consistent():
    cost = RooflineCost(MISTRAL, A100)
    reps = [SimReplica("p", "prefill", _config(), 1000, cost),
            SimReplica("d", "decode", _config(), 1000, cost)]
    kv = KVLink(get_link("100gbe"), MISTRAL.kv_bytes_per_token())
    with pytest.raises(ValueError, match="both p and d"):
        Cluster(reps, "pd", kv_link=kv, placement=[[(0, 0)], [(0, 0)]])
    with pytest.raises(ValueError, match="as many ranks"):
        Cluster(reps, "pd", kv_link=kv, placement=[[(0, 0)], [(1, 0), (1, 1)]])
    with pytest.raises(ValueError, match="2 replicas"):
        Cluster(reps, "pd", kv_link=kv, placement=[[(0, 0)]])
    with pytest.raises(ValueError, match="nics_per_node"):
        KVLink(get_link("100gbe"), 1.0, nics_per_node=9, gpus_per_node=8)


# -- the search --------------------------------------------------------------------------------

def _fake_trials(capacity_by_slo: dict[float, float], delay_limit_qps: float):
    """A run_trial whose P99 TBT grows with the rate (under s ms up to capacity_by_slo[s]) and
    whose scheduling delay exceeds 2 s above delay_limit_qps; counts calls."""
    calls = []
    points = sorted(capacity_by_slo.items())

    def run(qps: float) -> TrialResult:
        calls.append(qps)
        tbt_ms = next((s for s, cap in points if qps <= cap), points[-1][0] * 10)
        delay = 0.1 if qps <= delay_limit_qps else 5.0
        return TrialResult(qps, tbt_ms / 1000 * 0.99, delay, 100, 0, p50_sched_delay_s=delay)

    return run, calls


def test_evaluate_shares_trials_between_slos():
    run, calls = _fake_trials({100: 10.0, 500: 20.0}, delay_limit_qps=14.0)
    search = Search(start_qps=1.0, tolerance=0.05, max_trials=30)
    ev = evaluate(Plan(Candidate(0, 0, 1, 1, 1), [((0, 0),)]), run, [500, 100],
                  CapacityCriteria(tbt_slo_s=0.1), search)
    assert ev.capacity_qps(100) == pytest.approx(10.0, rel=0.05) and ev.capacity_qps(100) <= 10.0
    # the relaxed SLO would allow 20, but the scheduling delay fails above 14
    assert ev.capacity_qps(500) == pytest.approx(14.0, rel=0.05) and ev.capacity_qps(500) <= 14.0
    assert len(calls) == len(set(calls))                   # every rate simulated once
    strict_only, strict_calls = _fake_trials({100: 10.0, 500: 20.0}, delay_limit_qps=14.0)
    evaluate(Plan(Candidate(0, 0, 1, 1, 1), [((0, 0),)]), strict_only, [100],
             CapacityCriteria(tbt_slo_s=0.1), search)
    # the relaxed search starts at 10 and stops under 16 (failed on delay): a few bisections
    assert len(calls) - len(strict_calls) <= 5


def test_rank_orders_by_the_strictest_slo_then_the_next_then_fewer_gpus():
    def ev(c: Candidate, caps: dict[float, float | None]) -> Evaluation:
        e = Evaluation(Plan(c, []))
        for s, q in caps.items():
            e.capacity[s] = type("R", (), {"capacity_qps": q, "trials": []})()
        return e

    a = ev(Candidate(0, 0, 2, 1, 1), {50: 4.0, 250: 9.0})
    b = ev(Candidate(0, 0, 4, 1, 1), {50: 4.0, 250: 9.0})
    c = ev(Candidate(0, 0, 4, 2, 1), {50: 4.0, 250: 12.0})
    d = ev(Candidate(1, 1, 0, 1, 1, 512), {50: 6.0, 250: 7.0})
    e = ev(Candidate(0, 0, 1, 1, 1), {50: None, 250: 3.0})
    assert rank([e, a, b, c, d], [50, 250]) == [d, c, a, b, e]


def test_ranking_simulated_candidates_picks_the_higher_capacity():
    """Two hybrid replicas against one, in the real simulator (few requests)."""
    hw = Hardware(nodes=1, gpus_per_node=2)
    cfg = WorkloadConfig(num_requests=96, seed=0, length_dist="fixed", prompt_len=600, output_len=24)
    from sim.cli import SimTrials

    evals = []
    for n in (1, 2):
        plan = Plan(Candidate(0, 0, n, 1, 1), pack([(1, 1)] * n, 2, 1))
        make = cluster_factory(plan, MISTRAL, hw, _config())
        evals.append(evaluate(plan, SimTrials(make, cfg, plan.candidate.label), [100],
                              CapacityCriteria(tbt_slo_s=0.1),
                              Search(start_qps=4.0, tolerance=0.2, max_trials=10)))
    best, worst = rank(evals, [100])
    assert best.plan.candidate.hybrid == 2 and best.capacity_qps(100) > worst.capacity_qps(100)


def test_a_pipeline_across_nodes_uses_the_inter_node_link():
    hw = Hardware(nodes=2, gpus_per_node=8, inter_node_link="infiniband")
    plan = Plan(Candidate(1, 1, 0, tp=8, pp=2, offload_threshold=512), pack([(8, 2)] * 2, 8, 4))
    cluster = cluster_factory(plan, MISTRAL, replace(hw, nodes=4), _config())()
    assert {r.cost.pp_link.name for r in cluster.replicas} == {"infiniband"}
    plan = Plan(Candidate(0, 0, 2, tp=4, pp=2), pack([(4, 2)] * 2, 8, 2))
    cluster = cluster_factory(plan, MISTRAL, hw, _config())()
    assert {r.cost.pp_link.name for r in cluster.replicas} == {"nvlink"}
    assert [r.node for r in cluster.replicas] == [0, 1]


# -- the command -------------------------------------------------------------------------------

def _parser():
    from sim.cli import add_sim_commands

    p = argparse.ArgumentParser(prog="tandem")
    add_sim_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(["sim", "placement", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--nodes", "--gpus-per-node", "--inter-node-link", "--nics-per-node", "--tbt-slo-ms",
                 "--max-candidates", "--spec-out", "--plot", *(o.flag for o in SEARCH_OPTIONS)):
        assert flag in text


def test_cli_end_to_end(tmp_path, capsys):
    out, png, yml = tmp_path / "p.json", tmp_path / "p.png", tmp_path / "best.yaml"
    args = _parser().parse_args([
        "sim", "placement", "--model", "mistral-7b", "--nodes", "1", "--gpus-per-node", "2",
        "--tp", "1,2", "--pp", "1", "--mixes", "hybrid,pd", "--offload-threshold", "256",
        "--prefill-shares", "0.5", "--num-requests", "48", "--min-trial-s", "4",
        "--length-dist", "fixed", "--prompt-len", "600", "--output-len", "16",
        "--tbt-slo-ms", "500", "100", "--tolerance", "0.3", "--max-trials", "6",
        "--max-candidates", "3", "--json", str(out), "--plot", str(png), "--spec-out", str(yml)])
    args.func(args)
    text = capsys.readouterr().out
    assert "requests/s" in text and "qps@100ms" in text
    data = json.loads(out.read_text())
    assert data["kind"] == "sim-placement" and data["tbt_slos_ms"] == [100, 500]
    ranked = data["ranked"]
    assert len(ranked) == 3 and data["best"] == ranked[0]["label"]
    assert {r["label"] for r in ranked} == {"2H tp1 pp1", "1H tp2 pp1", "1P+1D tp1 pp1 thr256"}
    caps = [r["capacity"]["100"]["capacity_qps"] or 0 for r in ranked]
    assert caps == sorted(caps, reverse=True) and caps[0] > 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = DeploymentSpec.from_yaml(yml.read_text())
    best = ranked[0]
    expected = [(role, best[role], best["tp"], best["pp"]) for role in ("prefill", "decode", "hybrid")
                if best[role]]
    assert [(g.role, g.count, g.tp, g.pp) for g in spec.groups] == expected


def test_torch_is_never_imported():
    run_without_torch("""
        import sim.placement, sim.cli
        import tests.test_sim_placement as t
        t.test_concurrent_transfers_share_one_nic()
    """)
