"""Bench statistics on hand-made latencies with known answers."""
from __future__ import annotations

import pytest

from bench.results import RequestResult, RunResult
from bench.report import SLO, format_table, goodput, latency_stats, meets_slo, percentile, summarize


def _req(i, ttft, gaps, out=None, error=None, status=200):
    r = RequestResult(index=i, prompt_tokens=10, max_tokens=len(gaps) + 1, scheduled_s=float(i),
                      send_s=float(i), ttft_s=ttft, itl_s=list(gaps),
                      e2e_s=None if ttft is None else ttft + sum(gaps),
                      output_tokens=out if out is not None else (len(gaps) + 1 if ttft is not None else 0),
                      num_chunks=len(gaps) + 1 if ttft is not None else 0, status=status, error=error)
    return r


def test_percentile_known_values():
    xs = list(range(1, 101))
    assert percentile(xs, 50) == pytest.approx(50.5)
    assert percentile(xs, 90) == pytest.approx(90.1)
    assert percentile(xs, 99) == pytest.approx(99.01)
    assert percentile([3.0], 99) == 3.0
    assert percentile([], 50) is None
    s = latency_stats([0.1, 0.2, 0.3, 0.4])
    assert s["p50"] == pytest.approx(0.25) and s["mean"] == pytest.approx(0.25)
    assert s["max"] == 0.4 and s["count"] == 4
    assert latency_stats([])["p99"] is None


def test_meets_slo():
    slo = SLO(ttft_s=1.0, tbt_s=0.1)
    assert meets_slo(_req(0, 0.5, [0.05] * 10), slo)
    assert not meets_slo(_req(0, 1.5, [0.05] * 10), slo)          # TTFT too slow
    assert not meets_slo(_req(0, 0.5, [0.05] * 9 + [0.5]), slo)    # its P99 gap 0.455 s
    assert meets_slo(_req(0, 0.5, []), slo)                        # one token: no gap to judge
    assert not meets_slo(_req(0, None, [], error="HTTP 429: busy", status=429), slo)
    assert meets_slo(_req(0, 5.0, [0.05]), SLO(tbt_s=0.1))        # TTFT not checked
    with pytest.raises(ValueError, match="tbt_s"):
        SLO(tbt_s=0)


def test_goodput_and_summary():
    reqs = [_req(0, 0.2, [0.1, 0.1, 0.1]),          # good
            _req(1, 0.4, [0.1, 0.3, 0.1]),          # P99 gap 0.296 > 0.25
            _req(2, 3.0, [0.1, 0.1]),               # TTFT 3 > 2
            _req(3, 0.2, [0.2, 0.2], out=6),         # good; 3 chunks carried 6 tokens
            _req(4, None, [], error="HTTP 429: over capacity", status=429)]
    run = RunResult("http://x/v1/completions", "m", reqs, wall_s=10.0, started_at=0.0)
    g = goodput(reqs, SLO(ttft_s=2.0, tbt_s=0.25), run.wall_s)
    assert g["num_good"] == 2 and g["fraction"] == pytest.approx(0.4) and g["rate_rps"] == pytest.approx(0.2)

    s = summarize(run, SLO(ttft_s=2.0, tbt_s=0.25), label="sarathi")
    assert s["num_ok"] == 4 and s["num_errors"] == 1 and s["num_429"] == 1 and s["num_503"] == 0
    assert s["errors"] == {"HTTP 429": 1}
    assert s["request_throughput"] == pytest.approx(0.4)
    assert s["output_tokens"] == 4 + 4 + 3 + 6
    assert s["output_token_throughput"] == pytest.approx(1.7)
    assert s["bundled_tokens"] == 3
    assert s["ttft_s"]["p50"] == pytest.approx(0.3)     # of 0.2, 0.4, 3.0, 0.2
    assert s["tbt_s"]["count"] == 10                   # gaps pooled over successful requests
    assert s["tbt_s"]["max"] == pytest.approx(0.3)
    assert s["e2e_s"]["p50"] == pytest.approx(0.75)    # of 0.5, 0.9, 3.2, 0.6
    assert len(s["requests"]) == 5 and s["goodput"]["num_good"] == 2
    table = format_table(s)
    for needle in ("TTFT", "TBT", "E2E", "goodput", "429: 1", "sarathi"):
        assert needle in table
    assert "goodput" not in format_table(summarize(run))


def test_bench_does_not_import_torch():
    import subprocess
    import sys

    code = ("import sys, bench.cli, bench.client, bench.report, bench.capacity, bench.workload, "
            "bench.plots; assert 'torch' not in sys.modules, 'bench imported torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
