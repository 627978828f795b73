"""Workload generators: distributions with fixed seeds, determinism, traces, scaling and caps."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bench.workload import (
    ARXIV_MAX_PROMPT, ARXIV_MAX_TOTAL, ARXIV_OUTPUT_QUANTILES, ARXIV_PAPER_MAX_TOTAL,
    ARXIV_QUANTILE_LEVELS, PROMPT_WORDS, CsvTrace, PromptBuilder, Workload, WorkloadConfig,
    arxiv_lengths, arxiv_paper_lengths, build_workload, constant_arrivals, gamma_arrivals,
    lognormal_lengths, poisson_arrivals, uniform_lengths, zipf_lengths, zipf_theta_for_mean,
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


# ---- synthetic arXiv-summarization lengths -------------------------------------------------------

ARXIV_TRACE = (Path(__file__).resolve().parents[2] / "shared" / "traces"
               / "arxiv_summarization_stats_llama2_tokenizer_filtered_v2.csv")
ARXIV_4K_STATED = {"prompt": {50: 2730, 90: 3702}, "output": {50: 167, 90: 372}}
"""The 4k-filtered trace's statistics as the traces README states them."""
ARXIV_PAPER_STATED = {"prompt": {50: 7059, 90: 12985}, "output": {50: 208, 90: 371}}
"""The paper's arXiv statistics that `arxiv-paper` is built to (bench/workload.py)."""


def _quantile_misses(prompts, outputs, stated: dict, rel: float) -> list[str]:
    """The stated quantiles the samples miss by more than `rel` (relative)."""
    misses = []
    for name, x in (("prompt", prompts), ("output", outputs)):
        for q, want in stated[name].items():
            got = float(np.percentile(x, q))
            if abs(got - want) > rel * want:
                misses.append(f"{name} p{q}: {got:.0f}, stated {want}")
    return misses


def _lengths_of(dist: str, n: int = 20000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    wl = build_workload(WorkloadConfig(num_requests=n, seed=seed, length_dist=dist), qps=1.0)
    return (np.array([r.prompt_tokens for r in wl]), np.array([r.output_tokens for r in wl]))


def test_arxiv_lengths_match_the_trace_statistics():
    p, o = _lengths_of("arxiv")
    assert _quantile_misses(p, o, ARXIV_4K_STATED, 0.02) == []
    assert p.min() >= 1 and o.min() >= 1
    assert 4000 <= p.max() <= ARXIV_MAX_PROMPT and (p + o).max() <= ARXIV_MAX_TOTAL
    # the trace's filter makes long outputs come with short prompts (Pearson -0.46 in the file)
    assert np.corrcoef(p, o)[0, 1] == pytest.approx(-0.46, abs=0.05)
    assert np.median(p[o > 1000]) < 0.5 * np.median(p)
    # the check can fail: lognormals with the trace's means, or the paper's lengths, miss it
    rng = np.random.default_rng(0)
    ln_p, ln_o = lognormal_lengths(20000, 2588, 0.5, rng), lognormal_lengths(20000, 291, 0.5, rng)
    assert len(_quantile_misses(ln_p, ln_o, ARXIV_4K_STATED, 0.02)) >= 2
    # (3 of 4: the two workloads' output p90s agree)
    assert len(_quantile_misses(*_lengths_of("arxiv-paper"), ARXIV_4K_STATED, 0.02)) == 3


def test_arxiv_paper_lengths_match_the_stated_statistics():
    p, o = _lengths_of("arxiv-paper")
    assert _quantile_misses(p, o, ARXIV_PAPER_STATED, 0.03) == []
    assert p.min() >= 1 and (p + o).max() <= ARXIV_PAPER_MAX_TOTAL
    assert len(_quantile_misses(*_lengths_of("arxiv"), ARXIV_PAPER_STATED, 0.03)) == 3  # p90 outputs agree


@pytest.mark.parametrize("dist", ["arxiv", "arxiv-paper"])
def test_arxiv_lengths_deterministic(dist):
    assert _lengths_of(dist, 300, seed=4)[0].tolist() == _lengths_of(dist, 300, seed=4)[0].tolist()
    assert _lengths_of(dist, 300, seed=4)[0].tolist() != _lengths_of(dist, 300, seed=5)[0].tolist()
    cfg = WorkloadConfig(num_requests=50, seed=2, length_dist=dist)
    a, b = build_workload(cfg, 1.0), build_workload(cfg, 3.0)
    assert [(r.prompt_tokens, r.output_tokens) for r in a] == [(r.prompt_tokens, r.output_tokens) for r in b]
    # the arrays themselves (no workload wrapper) follow the same rng
    p, o = (arxiv_lengths if dist == "arxiv" else arxiv_paper_lengths)(10, np.random.default_rng(1))
    assert len(p) == len(o) == 10 and p.dtype == o.dtype == np.int64


@pytest.mark.skipif(not ARXIV_TRACE.is_file(), reason="shared traces not beside this checkout")
def test_arxiv_lengths_against_the_trace_file():
    """The constants' stated source: the file's own statistics, and the generator's quantiles
    against the file's over the whole range."""
    trace = CsvTrace.load(ARXIV_TRACE)
    tp, to = trace.prompt_tokens, trace.output_tokens
    assert (len(trace), int(np.median(tp)), int(np.percentile(tp, 90)), int(tp.max())) == (
        28257, 2730, 3702, 4054)
    assert (int(np.median(to)), int(np.percentile(to, 90)), int((tp + to).max())) == (167, 372, 4096)
    levels = np.array(ARXIV_QUANTILE_LEVELS) * 100
    assert list(ARXIV_OUTPUT_QUANTILES) == np.rint(np.percentile(to, levels)).tolist()
    p, o = _lengths_of("arxiv", 40000)
    for q in (5, 10, 25, 50, 75, 90):
        assert np.percentile(p, q) == pytest.approx(np.percentile(tp, q), rel=0.04), f"prompt p{q}"
        assert np.percentile(o, q) == pytest.approx(np.percentile(to, q), rel=0.04, abs=3), f"output p{q}"
    # in the sparse tails a value's quantile is steadier than a quantile's value (the output's
    # p95-p97 spans 736..2200 tokens): compare the share of samples below the file's quantiles
    for q in (1, 5, 10, 50, 90, 95, 97, 99):
        for name, x, ref in (("prompt", p, tp), ("output", o, to)):
            share = float(np.mean(x <= np.percentile(ref, q)))
            assert share == pytest.approx(q / 100, abs=0.01), f"{name}: {share:.4f} <= the file's p{q}"
    assert np.corrcoef(p, o)[0, 1] == pytest.approx(np.corrcoef(tp, to)[0, 1], abs=0.05)
