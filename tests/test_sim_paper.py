"""sim/paper.py, the driver of docs/sim-results.md: a tiny run of every experiment with torch
blocked, checking that the JSON holds what the page reads; and the pieces it is built from."""
from __future__ import annotations

import json

import pytest

import sim.paper as paper
from sim.paper import MISTRAL, PaperConfig, cluster_factory, roofline, workloads
from tests.no_torch import run_without_torch


TINY = ["--num-requests", "24", "--sensitivity-requests", "16", "--sensitivity-constants",
        "host_step_s,e_gemm", "--run-requests", "16", "--table6-requests", "8", "--max-trials", "2"]


def _check_capacity(d: dict) -> None:
    assert set(d["workloads"]) == {"arxiv-4k", "arxiv-paper"}
    for cell in d["workloads"].values():
        assert cell["workload_source"]
        for pol in ("sarathi", "vllm"):
            c = cell[pol]
            assert c["policy"] == pol and c["status"] in ("found", "max_qps", "below_min", "max_trials")
            assert 1 <= len(c["trials"]) <= 2 and c["sim_requests"] == 24 * len(c["trials"])
            for t in c["trials"]:
                assert {"qps", "passed", "reason", "p99_tbt_s", "p50_sched_delay_s", "p50_ttft_s",
                        "frac_tbt_over_slo", "sampled_per_step"} <= set(t)
                assert 0 <= t["frac_tbt_over_slo"] <= 1 and t["sampled_per_step"] > 0
        s, v = cell["sarathi"]["capacity_qps"], cell["vllm"]["capacity_qps"]
        assert cell["ratio"] == (s / v if s and v else None)
        st = cell["steps"]
        for b in paper.DECODE_BATCHES:
            # more decodes, longer steps; a 512-token hybrid step outlasts a decode-only one
            assert 0 < st["decode_step_s"][str(b)] < st["hybrid_step_s"][str(b)]
        assert st["decode_step_s"]["32"] < st["decode_step_s"]["128"]
        assert st["prefill_step_s"]["p50"] < st["prefill_step_s"]["p90"]


def test_driver_every_experiment_torch_blocked(tmp_path):
    out = tmp_path / "out"
    p = run_without_torch(f"""
        from sim.paper import main
        main({[*TINY, "--out", str(out)]!r})
    """, timeout=300)
    assert "sarathi-512 qps" in p.stdout and "requests/s" in p.stdout

    docs = {n: json.loads((out / f"paper-{n}.json").read_text()) for n in paper.EXPERIMENTS}
    for name, d in docs.items():
        assert d["kind"] == "sim-paper" and d["experiment"] == name
        m = d["meta"]
        assert m["command"].startswith("python -m sim.paper ") and "--num-requests 24" in m["command"]
        assert m["wall_s"] > 0 and m["roofline_constants"]["E_GEMM"] > 0 and "commit" in m["git"]
        if name != "pp" or d["ran"]:
            assert m["sim_requests"] > 0 and m["sim_requests_per_s"] > 0

    _check_capacity(docs["capacity"])
    _check_capacity(docs["yi34b"])
    assert docs["capacity"]["deployment"]["tbt_slo_ms"] == 100
    assert (docs["yi34b"]["deployment"]["tp"], docs["yi34b"]["deployment"]["tbt_slo_ms"]) == (2, 200)

    rows = docs["sensitivity"]["rows"]
    assert len(rows) == 2 * (1 + 2 * 2)  # per workload: baseline + 2 constants x 2 factors
    assert {(r["constant"], r["factor"]) for r in rows} == {
        (None, 1.0), ("HOST_STEP_S", 0.5), ("HOST_STEP_S", 2.0), ("E_GEMM", 0.5), ("E_GEMM", 2.0)}
    assert [r["unphysical"] for r in rows if r["constant"] == "E_GEMM"] == [False, True, False, True]
    assert all("ratio" in r and "capacity_qps" in r["sarathi"] for r in rows)

    runs = docs["ablation"]["runs"]
    assert {r["policy"] for r in runs} == {"hybrid_only", "chunked_only", "sarathi"}
    assert all(r["num_errors"] == 0 and r["p99_tbt_s"] and r["p50_ttft_s"] and r["p99_ttft_s"]
               and r["p50_tbt_s"] for r in runs)

    pp = docs["pp"]
    if pp["ran"]:
        assert {r["parallel"] for r in pp["runs"]} >= {"tp8", "tp4-pp2"}
        assert all(r["p50_tbt_s"] > 0 and r["p99_tbt_s"] and r["num_errors"] == 0 and r["sampled_per_step"]
                   for r in pp["runs"])
    else:
        assert pp["why"]

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for name, d in docs.items():
        if name != "pp" or d["ran"]:
            assert d["meta"]["plots"] == [f"paper-{name}.png"]
            assert (out / f"paper-{name}.png").stat().st_size > 1000


def test_cost_constants_reach_the_step_times():
    base = roofline(MISTRAL)
    assert roofline(MISTRAL, e_gemm=0.35).prefill_step_time(2048) > base.prefill_step_time(2048)
    assert roofline(MISTRAL, host_step_s=4e-3).decode_step_time(8, 100) == pytest.approx(
        base.decode_step_time(8, 100) + 2e-3)
    make, info = cluster_factory(MISTRAL, "vllm", e_mem=0.4)
    rep = make().replicas[0]
    assert rep.cost.e_mem == 0.4 and info["constants"] == {"e_mem": 0.4}
    assert rep.sched.config.max_batched_tokens == rep.sched.config.max_model_len == 16384
    # the paper's requests share no prefixes; the simulator's are all token 0
    assert getattr(rep.sched.config, "enable_prefix_caching", False) is False


def test_workloads_fall_back_to_synthetic_lengths(tmp_path, monkeypatch):
    monkeypatch.setattr(paper, "DEFAULT_TRACE", tmp_path / "absent.csv")
    w = workloads(PaperConfig())
    assert w["arxiv-4k"][0].length_dist == "arxiv" and "synthetic" in w["arxiv-4k"][1]
    assert w["arxiv-paper"][0].length_dist == "arxiv-paper"
    with pytest.raises(ValueError, match="nope.csv"):
        workloads(PaperConfig(trace_csv=str(tmp_path / "nope.csv")))


def test_config_names_the_bad_value():
    with pytest.raises(ValueError, match="'capacty'"):
        PaperConfig(experiments=("capacty",))
    with pytest.raises(ValueError, match="'e_flops'"):
        PaperConfig(sensitivity_constants=("e_flops",))
    with pytest.raises(ValueError, match="num_requests"):
        PaperConfig(num_requests=0)
