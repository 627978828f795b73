"""The simulator (sim/): torch-free, conservation, PD, routing accounting, roofline sanity,
determinism, the CLI. Fast: small workloads on cost models, no model runs."""
from __future__ import annotations

import argparse
import json

import pytest

from bench.report import summarize
from bench.workload import WorkloadConfig, build_workload
from scheduler.budget import StepFeatures
from scheduler.config import POLICIES, SchedulerConfig
from sim.cluster import Cluster, KVLink
from sim.cost import ProfiledCost, RooflineCost
from sim.replica import SimReplica, num_kv_blocks
from sim.specs import LINKS, MODELS, get_device, get_link, get_model
from tests.no_torch import run_without_torch

MISTRAL, A100 = get_model("mistral-7b"), get_device("a100-80gb")


def _config(policy: str = "sarathi", **kw) -> SchedulerConfig:
    base = dict(policy=policy, token_budget=256, max_num_seqs=32, max_model_len=4096,
                max_batched_tokens=4096)
    base.update(kw)
    return SchedulerConfig(**base)


def _workload(n: int = 200, qps: float = 4.0, seed: int = 0, prompt: int = 600, output: int = 40):
    wl = build_workload(WorkloadConfig(num_requests=n, seed=seed, length_dist="lognormal",
                                       prompt_len=prompt, output_len=output, sigma=0.8,
                                       max_prompt_tokens=3000, max_output_tokens=200), qps)
    return [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in wl]


def _hybrid(n: int = 1, policy: str = "sarathi", blocks: int | None = None, routing="round_robin",
            **kw) -> Cluster:
    cost = RooflineCost(MISTRAL, A100)
    nb = blocks or num_kv_blocks(MISTRAL, A100)
    reps = [SimReplica(f"h{i}", "hybrid", _config(policy, **kw), nb, cost) for i in range(n)]
    return Cluster(reps, routing)


def _pd(blocks: int, prefill: int = 1, decode: int = 1, threshold: int = 256) -> Cluster:
    cost = RooflineCost(MISTRAL, A100)
    roles = ["prefill"] * prefill + ["decode"] * decode
    reps = [SimReplica(f"{r}{i}", r, _config(), blocks, cost) for i, r in enumerate(roles)]
    kv = KVLink(get_link("infiniband"), MISTRAL.kv_bytes_per_token())
    return Cluster(reps, "pd", offload_threshold=threshold, kv_link=kv)


def _check_conservation(result, reqs) -> None:
    assert len(result.run.requests) == len(reqs)
    for rr, (arrival, prompt, output) in zip(result.run.requests, reqs):
        assert rr.ok, rr.error
        assert rr.output_tokens == output and len(rr.itl_s) == output - 1
        assert rr.ttft_s > 0 and all(g > 0 for g in rr.itl_s)
        assert rr.e2e_s == pytest.approx(rr.ttft_s + sum(rr.itl_s))
    assert len(result.sched_delays) == len(reqs) and min(result.sched_delays) >= 0


def test_torch_is_never_imported():
    run_without_torch("""
        from sim.cli import add_sim_commands
        import tests.test_sim as t
        for make in (lambda: t._hybrid(), lambda: t._pd(blocks=4000)):
            c = make()
            res = c.run(t._workload(n=40))
            c.check_drained()
            assert all(r.ok for r in res.run.requests)
        try:
            import torch
        except ImportError:
            pass
        else:
            raise AssertionError("torch imported")
    """)


@pytest.mark.parametrize("policy", POLICIES)
def test_conservation_every_policy(policy):
    reqs = _workload(n=120, qps=6.0)
    c = _hybrid(policy=policy)
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    s = summarize(res.run)
    assert s["num_ok"] == len(reqs) and s["output_tokens"] == sum(o for _, _, o in reqs)
    assert s["tbt_s"]["count"] == sum(o - 1 for _, _, o in reqs)


def test_preemption_under_memory_pressure_still_conserves():
    reqs = _workload(n=150, qps=50.0)
    c = _hybrid(blocks=400)     # 6400 tokens of KV for a burst of long prompts
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    assert c.replicas[0].sched.num_preemptions > 0


@pytest.mark.parametrize("blocks", [20000, 300])
def test_pd_every_offloaded_prompt_completes_and_frees_its_blocks(blocks):
    reqs = _workload(n=150, qps=8.0 if blocks > 1000 else 40.0)
    c = _pd(blocks)
    res = c.run(reqs)
    _check_conservation(res, reqs)
    c.check_drained()
    offloaded = [t for t in c._tracked.values() if t.offloaded]
    assert res.decisions.get("offload", 0) > 0 and offloaded
    for t in offloaded:
        assert t.prefill_request.is_finished and t.prefill_request.num_output_tokens == 1
    assert res.kv_bytes >= sum(t.prompt for t in offloaded) * MISTRAL.kv_bytes_per_token() * 0.999
    if blocks == 300:   # a small decode cache: some reservations fail and prefill locally
        assert len(offloaded) < res.decisions["offload"]


def test_pd_kv_transfer_time_shows_in_ttft():
    reqs = [(0.0, 2000, 5)]
    fast = _pd(20000).run(reqs).run.requests[0].ttft_s
    c = _pd(20000)
    c.kv_link = KVLink(get_link("100gbe"), MISTRAL.kv_bytes_per_token() * 10)
    slow = c.run(reqs).run.requests[0].ttft_s
    assert slow > fast


def test_routing_accounting_returns_to_zero():
    reqs = _workload(n=200, qps=20.0)
    for routing in ("round_robin", "least_loaded"):
        c = _hybrid(n=3, routing=routing)
        res = c.run(reqs)
        _check_conservation(res, reqs)
        c.check_drained()   # outstanding, outstanding_tokens, prefill_queue all 0
        assert all(r.iteration > 0 for r in c.replicas)


def test_determinism_with_a_seed():
    def times(seed):
        res = _hybrid(n=2, routing="least_loaded").run(_workload(n=100, qps=10.0, seed=seed))
        return [(r.ttft_s, tuple(r.itl_s)) for r in res.run.requests]

    assert times(1) == times(1)
    assert times(1) != times(2)


def test_roofline_decode_is_memory_bound_and_big_prefill_compute_bound():
    cost = RooflineCost(MISTRAL, A100, host_step_s=0, host_seq_s=0)
    weights_s = MISTRAL.weight_bytes() / (A100.mem_bw * 0.8)
    d1, d32 = cost.decode_step_time(1, 512), cost.decode_step_time(32, 512)
    assert d1 == pytest.approx(weights_s, rel=0.1)      # reading the weights dominates
    assert d32 < 1.5 * d1                                # 32x the tokens, nearly the same time
    p2k, p4k = cost.prefill_step_time(2048), cost.prefill_step_time(4096)
    flops_s = 2 * MISTRAL.num_params * 4096 / (A100.peak_flops * 0.7)
    assert p4k > flops_s * 0.9 and p4k / p2k > 1.9       # scales with tokens (and attention)
    assert p4k > 10 * d1


def test_roofline_tp_all_reduce_adds_time():
    tp1 = RooflineCost(MISTRAL, A100, tp=1)
    tp2 = RooflineCost(MISTRAL, A100, tp=2)
    tp2_free = RooflineCost(MISTRAL, A100, tp=2, tp_link=LINKS["nvlink"].__class__("free", 1e30, 0.0))
    assert tp2.allreduce_time(512) > 0 and tp1.allreduce_time(512) == 0
    for t in (tp2.prefill_step_time(512), tp2.decode_step_time(8, 512)):
        assert t > 0
    assert tp2.prefill_step_time(512) > tp2_free.prefill_step_time(512)
    assert tp2.decode_step_time(8, 512) > tp2_free.decode_step_time(8, 512)
    assert tp2.prefill_step_time(2048) < tp1.prefill_step_time(2048)
    slow = RooflineCost(MISTRAL, A100, tp=2, tp_link=get_link("100gbe"))
    assert slow.prefill_step_time(512) > tp2.prefill_step_time(512)


def test_model_facts_and_kv_blocks():
    assert 7.0e9 < MISTRAL.num_params < 7.5e9
    assert 8.0e9 < get_model("llama-3-8b").num_params < 8.1e9
    assert 68e9 < get_model("llama-2-70b").num_params < 70e9
    assert 33e9 < get_model("yi-34b").num_params < 35e9
    assert 175e9 < get_model("falcon-180b").num_params < 185e9
    assert 0.13e9 < get_model("smollm2-135m").num_params < 0.14e9
    assert MISTRAL.kv_bytes_per_token() == 2 * 32 * 8 * 128 * 2
    blocks = num_kv_blocks(MISTRAL, A100)
    assert blocks == int((80 * 2**30 * 0.9 - MISTRAL.weight_bytes()) // (16 * MISTRAL.kv_bytes_per_token()))
    assert num_kv_blocks(MISTRAL, A100, tp=2) > 2 * blocks
    with pytest.raises(ValueError, match="does not fit"):
        num_kv_blocks(get_model("falcon-180b"), A100)
    assert set(MODELS) >= {"mistral-7b", "llama-3-8b", "yi-34b", "llama-2-70b", "falcon-180b",
                           "smollm2-135m"}


def test_profiled_cost_matches_the_step_time_model(tmp_path):
    rows = [{"prefill_tokens": p, "decode_tokens": d, "context": ctx,
             "step_time": 0.002 + 1e-5 * p + 2e-4 * d + 1e-7 * d * ctx + 2e-8 * p * ctx}
            for p in (0, 64, 256) for d in (1, 8) for ctx in (0, 512)]
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"samples": rows}))
    cost = ProfiledCost.from_json(path)
    reqs = _workload(n=30, qps=5.0)
    cfg = _config()
    c = Cluster([SimReplica("p", "hybrid", cfg, 5000, cost)])
    _check_conservation(c.run(reqs), reqs)
    # one context for all sequences: the same as the fitted model's own prediction
    from scheduler.core import ScheduledChunk, SchedulerOutput
    from sim.replica import make_request

    chunks = []
    for i in range(4):
        r = make_request(str(i), 300, 5, 0.0)
        r.num_computed_tokens = 299
        chunks.append(ScheduledChunk(r, 1))
    assert cost.step_time(SchedulerOutput(chunks, 256)) == pytest.approx(
        cost.model.predict(StepFeatures.uniform(0, 4, 299)), rel=1e-6)


def test_cli_capacity_and_run(tmp_path, capsys):
    from sim.cli import add_sim_commands

    p = argparse.ArgumentParser()
    add_sim_commands(p.add_subparsers(dest="command", required=True))
    common = ["--model", "mistral-7b", "--num-requests", "150", "--length-dist", "lognormal",
              "--prompt-len", "800", "--output-len", "60", "--max-prompt-tokens", "4000"]
    out = tmp_path / "cap.json"
    args = p.parse_args(["sim", "capacity", "--scheduler", "sarathi", "--tbt-slo-ms", "100",
                         "--tolerance", "0.2", "--max-trials", "8", "--json", str(out), *common])
    args.func(args)
    cap = json.loads(out.read_text())
    assert cap["kind"] == "capacity" and cap["capacity_qps"] and cap["capacity_qps"] > 0
    assert all(t["p50_sched_delay_s"] is not None for t in cap["trials"])
    run_out = tmp_path / "run.json"
    args = p.parse_args(["sim", "run", "--qps", "2", "--prefill-replicas", "1", "--decode-replicas",
                         "1", "--json", str(run_out), *common])
    args.func(args)
    text = capsys.readouterr().out
    assert "requests/s" in text and "TBT" in text
    s = json.loads(run_out.read_text())
    assert s["kind"] == "bench" and s["num_ok"] == 150 and s["sim"]["routing"] == "pd"
