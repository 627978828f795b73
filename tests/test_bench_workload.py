"""Workload generators: distributions with fixed seeds, determinism, traces, scaling and caps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.workload import (
    PROMPT_WORDS, CsvTrace, PromptBuilder, Workload, WorkloadConfig, build_workload,
    constant_arrivals, gamma_arrivals, lognormal_lengths, poisson_arrivals, uniform_lengths,
    zipf_lengths, zipf_theta_for_mean,
)

FIXTURES = Path(__file__).parent / "fixtures"
CSV = FIXTURES / "trace_azure_small.csv"
JSONL = FIXTURES / "trace_small.jsonl"


def _gaps(arrivals: np.ndarray) -> np.ndarray:
    return np.diff(arrivals)


def test_poisson_mean_gap_and_cv():
    a = poisson_arrivals(2000, 4.0, np.random.default_rng(1))
    assert a[0] == 0 and np.all(np.diff(a) >= 0)
    g = _gaps(a)
    assert g.mean() == pytest.approx(0.25, rel=0.06)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("cv", [0.5, 2.0, 4.0])
def test_gamma_cv(cv):
    g = _gaps(gamma_arrivals(4000, 2.0, cv, np.random.default_rng(2)))
    assert g.mean() == pytest.approx(0.5, rel=0.12)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.15)


def test_constant_arrivals():
    assert np.allclose(constant_arrivals(5, 2.0), [0, 0.5, 1, 1.5, 2])
    with pytest.raises(ValueError, match="qps"):
        constant_arrivals(5, 0)


def test_uniform_and_lognormal():
    rng = np.random.default_rng(3)
    u = uniform_lengths(2000, 10, 20, rng)
    assert u.min() == 10 and u.max() == 20 and u.mean() == pytest.approx(15, rel=0.03)
    ln = lognormal_lengths(5000, 200, 0.5, rng)
    assert ln.mean() == pytest.approx(200, rel=0.05) and ln.min() >= 1
    capped = lognormal_lengths(5000, 200, 1.0, rng, cap=300)
    assert capped.max() == 300 and capped.min() >= 1


def test_zipf_mean_and_cap():
    theta = zipf_theta_for_mean(50, 1000)
    assert theta > 0
    z = zipf_lengths(5000, 50, 1000, np.random.default_rng(4))
    assert z.min() >= 1 and z.max() <= 1000
    assert z.mean() == pytest.approx(50, rel=0.15)
    assert np.median(z) < z.mean()  # heavy tail
    with pytest.raises(ValueError, match="mean"):
        zipf_theta_for_mean(800, 1000)


def test_config_caps_respected_for_each_dist():
    for dist in ("fixed", "uniform", "lognormal", "zipf", "chat-doc"):
        cfg = WorkloadConfig(num_requests=500, seed=5, length_dist=dist, prompt_len=300, output_len=80,
                             sigma=1.0, max_prompt_tokens=400, max_output_tokens=100)
        wl = build_workload(cfg, qps=10)
        assert len(wl) == 500
        assert max(r.prompt_tokens for r in wl) <= 400, dist
        assert max(r.output_tokens for r in wl) <= 100, dist
        assert min(min(r.prompt_tokens, r.output_tokens) for r in wl) >= 1


def test_determinism_and_seed_matters():
    cfg = WorkloadConfig(num_requests=50, seed=11, arrival="gamma", cv=2, length_dist="lognormal")
    assert build_workload(cfg, 3.0).requests == build_workload(cfg, 3.0).requests
    other = WorkloadConfig(num_requests=50, seed=12, arrival="gamma", cv=2, length_dist="lognormal")
    assert build_workload(other, 3.0).requests != build_workload(cfg, 3.0).requests


def test_same_lengths_at_every_rate():
    """Capacity trials at different rates must see the same requests, only spaced differently."""
    cfg = WorkloadConfig(num_requests=30, seed=1, length_dist="lognormal")
    a, b = build_workload(cfg, 1.0), build_workload(cfg, 4.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(r.prompt_tokens, r.output_tokens) for r in b]
    assert b.duration_s == pytest.approx(a.duration_s / 4)


def test_chat_doc_mix():
    cfg = WorkloadConfig(num_requests=2000, seed=6, length_dist="chat-doc", prompt_len=100,
                         doc_prompt_len=2000, doc_fraction=0.25)
    p = np.array([r.prompt_tokens for r in build_workload(cfg, 1.0)])
    assert (p > 800).mean() == pytest.approx(0.25, abs=0.04)
    assert np.median(p[p < 800]) == pytest.approx(100, rel=0.2)


def test_csv_trace_sampling_scaling_capping():
    trace = CsvTrace.load(CSV)
    assert len(trace) == 20 and trace.arrived_at is not None
    pairs = set(zip(trace.prompt_tokens.tolist(), trace.output_tokens.tolist()))
    cfg = WorkloadConfig(num_requests=200, seed=0, trace_csv=str(CSV), length_dist="trace")
    wl = build_workload(cfg, qps=5)
    assert all((r.prompt_tokens, r.output_tokens) in pairs for r in wl)  # rows kept together
    scaled = build_workload(WorkloadConfig(num_requests=200, seed=0, trace_csv=str(CSV),
                                           length_dist="trace", length_scale=0.1,
                                           max_prompt_tokens=300, max_output_tokens=20), qps=5)
    for r, s in zip(wl, scaled):
        assert s.prompt_tokens == min(300, max(1, round(r.prompt_tokens * 0.1)))
        assert s.output_tokens == min(20, max(1, round(r.output_tokens * 0.1)))


def test_csv_trace_arrivals_window():
    trace = CsvTrace.load(CSV)
    cfg = WorkloadConfig(num_requests=8, seed=3, trace_csv=str(CSV), arrival="trace", length_dist="trace")
    wl = build_workload(cfg)
    arr = trace.arrived_at.tolist()
    # the window starts at a seeded offset: find it by its first prompt length
    rows = [i for i in range(len(trace)) if trace.prompt_tokens[i] == wl.requests[0].prompt_tokens]
    start = rows[0]
    assert [r.prompt_tokens for r in wl] == trace.prompt_tokens[start:start + 8].tolist()
    assert [r.arrival_s for r in wl] == pytest.approx([a - arr[start] for a in arr[start:start + 8]])
    fast = build_workload(cfg, qps=20.0)
    assert fast.offered_qps == pytest.approx(20.0)
    with pytest.raises(ValueError, match="rows"):
        build_workload(WorkloadConfig(num_requests=21, trace_csv=str(CSV), arrival="trace"))


def test_csv_without_arrivals(tmp_path):
    p = tmp_path / "lens.csv"
    p.write_text("num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio\n"
                 "100,10,110,10\n200,20,220,10\n")
    with pytest.raises(ValueError, match="arrived_at"):
        build_workload(WorkloadConfig(num_requests=2, trace_csv=str(p), arrival="trace"))
    wl = build_workload(WorkloadConfig(num_requests=10, trace_csv=str(p), length_dist="trace"), qps=1)
    assert {(r.prompt_tokens, r.output_tokens) for r in wl} <= {(100, 10), (200, 20)}


def test_jsonl_replay_and_roundtrip(tmp_path):
    wl = build_workload(WorkloadConfig(num_requests=None, trace_jsonl=str(JSONL), arrival="trace",
                                       length_dist="trace"))
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in wl][:2] == [(0.0, 32, 8), (0.25, 64, 4)]
    assert len(wl) == 5
    out = tmp_path / "w.jsonl"
    wl.to_jsonl(out)
    again = build_workload(WorkloadConfig(num_requests=3, trace_jsonl=str(out), arrival="trace",
                                          length_dist="trace"))
    assert again.requests == wl.requests[:3]
    assert build_workload(WorkloadConfig(num_requests=None, trace_jsonl=str(JSONL), arrival="trace",
                                         length_dist="trace"), qps=8).offered_qps == pytest.approx(8)


def test_bad_config_names_the_value():
    with pytest.raises(ValueError, match="'bursty'"):
        WorkloadConfig(arrival="bursty")
    with pytest.raises(ValueError, match="length_scale"):
        WorkloadConfig(length_scale=0)
    with pytest.raises(ValueError, match="needs a qps"):
        build_workload(WorkloadConfig())


def test_prompt_builder():
    b = PromptBuilder(seed=0)
    text = b.build(50)
    assert isinstance(text, str) and text.count(" ") == 50
    assert all(" " + w in PROMPT_WORDS for w in text.split())
    assert b.build(50) != text  # a fresh sequence per request (no shared prefixes)
    assert PromptBuilder(tokens_per_word=2.0).build(50).count(" ") == 25
    ids = PromptBuilder(token_ids=True, seed=1).build(33)
    assert len(ids) == 33 and all(isinstance(i, int) and 1000 <= i < 10000 for i in ids)


def test_workload_offered_qps_empty():
    assert Workload([]).offered_qps is None
