"""Step-time variation replayed from served steps (sim/noise.py), and the gateway's delays in
the simulator and the fidelity comparison."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from bench.report import summarize
from scheduler.budget import StepFeatures, StepTimeModel
from scheduler.config import SchedulerConfig
from sim.cluster import Cluster
from sim.cost import ProfiledCost
from sim.fidelity import gateway_delays
from sim.noise import GRID_S, StepVariation
from sim.replica import SimReplica

MODEL = StepTimeModel([0.02, 1e-3, 2e-3, 0.0, 0.0, 0.0])
"""20 ms a step + 1 ms a prefill token + 2 ms a decode."""


def _row(t_end: float, step: float, prefill: int, decodes: int) -> dict:
    return {"replica": "hybrid-0", "iteration": 0, "time": t_end, "step_time": step,
            "token_budget": 256, "num_decode_tokens": decodes, "num_prefill_tokens": prefill,
            "num_seqs": decodes + (prefill > 0), "num_preemptions": 0, "num_running": 1,
            "num_waiting": 0, "kv_cache_usage": 0.1, "decode_context": 100 * decodes,
            "prefill_attention": float(prefill * prefill / 2)}


def _served(duration: float, slow_after: float, slow: float, jitter: float = 0.0, seed: int = 0):
    """Back-to-back steps, decode-only except every 10th (64 prefill tokens); from `slow_after`
    on every step takes `slow` x the model; each step also x exp(N(0, jitter))."""
    rng, rows, t = random.Random(seed), [], 1000.0
    while t < 1000.0 + duration:
        prefill = 64 if len(rows) % 10 == 9 else 0
        base = MODEL.predict(StepFeatures(prefill, 4, 400, prefill * prefill / 2, 4 + (prefill > 0)))
        step = base * (slow if t - 1000.0 >= slow_after else 1.0) * math.exp(rng.gauss(0, jitter))
        t += step
        rows.append(_row(t, step, prefill, 4))
    return rows


def test_the_slow_stretch_is_recovered_on_its_timeline():
    v = StepVariation.from_trace([_served(60, slow_after=30, slow=1.5)], MODEL, window_s=2.0)
    assert v.duration_s == pytest.approx(60, abs=1)
    fast = v.slow_log[: int(28 / GRID_S)]
    slowed = v.slow_log[int(32 / GRID_S):]
    assert np.allclose(fast, 0.0, atol=1e-9) and np.allclose(slowed, math.log(1.5), atol=1e-9)
    # no jitter was recorded: everything is in the slow component, but for the steps within
    # half a window of the change
    for jitter in (v.jitter_decode, v.jitter_prefill):
        assert np.mean(np.abs(jitter) < 1e-9) > 0.95


def test_jitter_is_kept_per_step_kind_and_reproduces_the_spread():
    v = StepVariation.from_trace([_served(120, slow_after=1e9, slow=1.0, jitter=0.1)], MODEL)
    assert len(v.jitter_prefill) and len(v.jitter_decode) > 5 * len(v.jitter_prefill)
    assert np.std(v.jitter_decode) == pytest.approx(0.1, rel=0.25)
    noise = v.sampler(3)
    factors = [noise.factor(t * 0.05, prefill=False) for t in range(2000)]
    assert np.std(np.log(factors)) == pytest.approx(0.1, rel=0.3)


def test_a_sampler_is_deterministic_for_its_seed():
    v = StepVariation.from_trace([_served(60, slow_after=30, slow=1.5, jitter=0.1)], MODEL)
    draws = lambda seed: [v.sampler(seed).factor(t, t % 2 == 0) for t in range(50)]  # noqa: E731
    assert draws(1) == draws(1) and draws(1) != draws(2)


def test_replicas_sharing_a_trace_file_are_timelines_of_their_own():
    slow = [dict(r, replica="hybrid-1") for r in _served(40, slow_after=0, slow=2.0)]
    mixed = sorted(_served(40, slow_after=1e9, slow=1.0) + slow, key=lambda r: r["time"])
    v = StepVariation.from_trace([mixed], MODEL)
    assert v.duration_s == pytest.approx(80, abs=2)
    assert np.sort(np.exp(v.slow_log))[[5, -5]] == pytest.approx([1.0, 2.0])
    assert np.mean(np.abs(v.jitter_decode) < 1e-9) > 0.95


def test_rows_without_work_are_skipped_and_empty_traces_refused():
    rows = _served(20, slow_after=1e9, slow=1.0)
    idle = dict(rows[0], num_seqs=0, num_decode_tokens=0, step_time=5.0)
    v = StepVariation.from_trace([[*rows[:5], idle, *rows[5:]]], MODEL)
    assert np.abs(v.jitter_decode).max() < 0.05
    with pytest.raises(ValueError, match="no served steps"):
        StepVariation.from_trace([[idle]], MODEL)


def _one_request_cluster(noise=None, **kw) -> Cluster:
    config = SchedulerConfig(policy="sarathi", token_budget=256, max_model_len=2048, block_size=16)
    return Cluster([SimReplica("hybrid-0", "hybrid", config, 512, ProfiledCost(MODEL), noise=noise)], **kw)


def test_variation_scales_every_simulated_step():
    doubled = StepVariation(np.full(10, math.log(2.0)), np.zeros(1), np.zeros(1))
    plain = summarize(_one_request_cluster().run([(0.0, 100, 5)]).run, None)
    slow = summarize(_one_request_cluster(noise=doubled.sampler(0)).run([(0.0, 100, 5)]).run, None)
    assert slow["ttft_s"]["p50"] == pytest.approx(2 * plain["ttft_s"]["p50"])
    assert slow["tbt_s"]["p50"] == pytest.approx(2 * plain["tbt_s"]["p50"])


def test_gateway_delays_shift_ttft_but_not_token_gaps():
    plain = summarize(_one_request_cluster().run([(0.0, 100, 5)]).run, None)
    late = summarize(_one_request_cluster(arrival_delay_s=0.004, token_delay_s=0.002)
                     .run([(0.0, 100, 5)]).run, None)
    assert late["ttft_s"]["p50"] == pytest.approx(plain["ttft_s"]["p50"] + 0.006)
    assert late["tbt_s"]["p50"] == pytest.approx(plain["tbt_s"]["p50"])
    with pytest.raises(ValueError, match="arrival_delay_s must be >= 0, got -1"):
        _one_request_cluster(arrival_delay_s=-1)


def test_gateway_delays_are_read_off_the_step_records():
    # an idle replica; a request sent at t=10.000 starts its step at 10.004, the step ends at
    # 10.104 and the client has the first token at 10.106; two decode steps follow
    steps = [_row(10.104, 0.100, 100, 0), _row(10.134, 0.030, 0, 1), _row(10.164, 0.030, 0, 1)]
    bench = {"started_at": 9.0, "requests": [
        {"send_s": 1.0, "ttft_s": 0.106}, {"send_s": None, "ttft_s": None}]}
    d = gateway_delays([(bench, steps)])
    assert d.arrival_s == pytest.approx(0.004) and d.token_s == pytest.approx(0.002)
    with pytest.raises(ValueError, match="do not overlap"):
        gateway_delays([({"started_at": 0.0, "requests": [{"send_s": 1.0, "ttft_s": 0.1}]}, steps)])


def test_cli_run_with_step_variation_from_a_served_trace(tmp_path):
    import argparse
    import json
    from pathlib import Path

    from sim.cli import add_sim_commands

    run = Path(__file__).resolve().parent / "fixtures" / "sim_fidelity"
    p = argparse.ArgumentParser()
    add_sim_commands(p.add_subparsers(dest="command", required=True))
    common = ["sim", "run", "--cost", "profiled", "--profile", str(run / "profile.json.gz"),
              "--model", "smollm2-135m", "--num-kv-blocks", "2048", "--max-model-len", "2048",
              "--scheduler", "sarathi", "--token-budget", "256", "--num-requests", "60",
              "--length-dist", "lognormal", "--prompt-len", "250", "--output-len", "40",
              "--max-prompt-tokens", "1000", "--qps", "0.4", "--arrival-delay-ms", "4"]
    variation = ["--step-variation", *map(str, sorted(run.glob("cal-*-steps-*.jsonl.gz")))]

    def ttft(*extra: str) -> dict:
        out = tmp_path / "run.json"
        args = p.parse_args([*common, *extra, "--json", str(out)])
        args.func(args)
        result = json.loads(out.read_text())
        assert result["num_ok"] == 60
        return result["ttft_s"]

    plain, varied = ttft(), ttft(*variation, "--seed", "1")
    assert varied == ttft(*variation, "--seed", "1") and varied != plain
    assert varied != ttft(*variation, "--seed", "2")
    with pytest.raises(SystemExit, match="--step-variation needs --cost profiled"):
        roofline = [a if a != "profiled" else "roofline" for a in common]
        build = p.parse_args([*roofline, *variation])
        build.func(build)
