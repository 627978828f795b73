"""Capacity search against a fake server whose P99 TBT grows with load."""
from __future__ import annotations

import pytest

from bench.capacity import CapacityCriteria, TrialResult, find_capacity, judge


def fake_server(limit: float, base_tbt: float = 0.05, ttft: float = 0.2):
    """P99 TBT = base / (1 - qps / limit); beyond the limit the server is saturated."""
    calls: list[float] = []

    def run_trial(qps: float) -> TrialResult:
        calls.append(qps)
        tbt = base_tbt / (1 - qps / limit) if qps < limit else 1e9
        return TrialResult(qps, tbt, ttft, num_requests=20, num_errors=0)
    return run_trial, calls


def judged(run_trial, criteria):
    return lambda q: judge(run_trial(q), criteria)


def known_capacity(limit, base, slo):
    return limit * (1 - base / slo)   # where base / (1 - q / limit) == slo


@pytest.mark.parametrize("limit,slo", [(10.0, 0.1), (3.3, 0.2), (40.0, 0.06), (0.7, 0.1)])
def test_finds_known_capacity(limit, slo):
    run, calls = fake_server(limit)
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=slo)), start_qps=1.0, tolerance=0.02,
                        max_qps=1000, max_trials=40)
    true = known_capacity(limit, 0.05, slo)
    assert res.status == "found"
    assert res.lo_qps <= true < res.hi_qps          # bracket holds the truth
    assert res.hi_qps - res.lo_qps <= 0.02 * res.lo_qps
    assert res.capacity_qps == pytest.approx(true, rel=0.03)
    assert all(t.passed == (t.qps <= true) for t in res.trials)
    assert len(res.trials) == len(calls)


def test_brackets_by_doubling_then_bisects():
    run, calls = fake_server(10.0)
    find_capacity(judged(run, CapacityCriteria(tbt_slo_s=0.1)), start_qps=1.0, tolerance=0.05)
    assert calls[:4] == [1.0, 2.0, 4.0, 8.0]         # 8 > capacity 5 fails
    assert calls[4] == 6.0                           # then the midpoint of 4..8
    assert all(4.0 <= q <= 8.0 for q in calls[4:])


def test_first_trial_fails_search_goes_down():
    run, calls = fake_server(1.0)                    # capacity 0.5
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=0.1)), start_qps=4.0, tolerance=0.05)
    assert calls[:4] == [4.0, 2.0, 1.0, 0.5]
    assert res.status == "found" and res.capacity_qps == pytest.approx(0.5, rel=0.06)


def test_even_lowest_rate_fails():
    run, calls = fake_server(10.0, ttft=5.0)        # TTFT always over 2 s
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=1.0)), start_qps=1.0, min_qps=0.1)
    assert res.status == "below_min" and res.capacity_qps is None and res.lo_qps is None
    assert calls[-1] == pytest.approx(0.1) and min(calls) == pytest.approx(0.1)
    assert all("TTFT" in t.reason for t in res.trials)


def test_never_fails_up_to_max():
    run, calls = fake_server(1e6)
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=1.0)), start_qps=1.0, max_qps=20.0)
    assert res.status == "max_qps" and res.capacity_qps == 20.0
    assert calls == [1.0, 2.0, 4.0, 8.0, 16.0, 20.0]


def test_trial_budget():
    run, calls = fake_server(10.0)
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=0.1)), start_qps=1.0, tolerance=1e-6,
                        max_trials=7)
    assert res.status == "max_trials" and len(calls) == 7 and 4.0 <= res.capacity_qps <= 5.0


def test_judge_reasons():
    c = CapacityCriteria(tbt_slo_s=0.1, max_p50_ttft_s=2.0, max_error_fraction=0.1)
    assert judge(TrialResult(1, 0.05, 0.5, 20, 2), c).passed
    t = judge(TrialResult(1, 0.2, 3.0, 20, 5), c)
    assert not t.passed and "TBT" in t.reason and "TTFT" in t.reason and "5/20" in t.reason
    assert not judge(TrialResult(1, None, None, 20, 20), c).passed
    with pytest.raises(ValueError, match="tbt_slo_s"):
        CapacityCriteria(tbt_slo_s=-1)


def test_judge_uses_the_measured_scheduling_delay_when_there_is_one():
    c = CapacityCriteria(tbt_slo_s=0.1, max_p50_ttft_s=2.0)
    # Without it, the median TTFT stands in for the delay.
    t = judge(TrialResult(1, 0.05, 2.5, 20, 0), c)
    assert not t.passed and t.reason == "P50 TTFT 2.500 s > 2 s"
    assert judge(TrialResult(1, 0.05, 1.5, 20, 0), c).passed
    # With it, the delay decides, whatever the TTFT (prefill time is not scheduling delay).
    t = judge(TrialResult(1, 0.05, 2.5, 20, 0, p50_sched_delay_s=1.0), c)
    assert t.passed and t.reason == "ok"
    t = judge(TrialResult(1, 0.05, 1.5, 20, 0, p50_sched_delay_s=2.1), c)
    assert not t.passed and t.reason == "P50 scheduling delay 2.100 s > 2 s"
    assert TrialResult(1, 0.05, 1.5).to_dict()["p50_sched_delay_s"] is None


def test_progress_callback_and_json():
    run, _ = fake_server(10.0)
    seen = []
    res = find_capacity(judged(run, CapacityCriteria(tbt_slo_s=0.1)), on_trial=seen.append)
    assert seen == res.trials
    d = res.to_dict()
    assert d["capacity_qps"] == res.capacity_qps and len(d["trials"]) == len(seen)
    assert {"qps", "passed", "p99_tbt_s", "p50_ttft_s", "reason"} <= set(d["trials"][0])
