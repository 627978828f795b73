"""The `profiled` simulator against a recorded real run (tests/fixtures/sim_fidelity, recorded by
its record.sh): the same workload and scheduler settings under sarathi and vllm; the simulator
gets the profile, gateway delays and step-time variation measured on calibration runs that
bracket the evaluated one, never the evaluated run's own steps. The target, 15% on P50/P99 TTFT
and TBT, is what the test holds (sim/README.md has the table and how it was recorded)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scheduler.budget import ProfileSample, load_profile, save_profile
from sim.fidelity import PROFILE, compare, format_comparison
from tests.no_torch import run_without_torch

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "tests" / "fixtures" / "sim_fidelity"
TOLERANCE = 0.15
SEEDS = 8
"""Fewer than `tandem sim fidelity`'s 16, for time; the medians move by a few percent."""


def _off(rows) -> list[str]:
    return [f"{r.policy} {r.metric}: real {r.real * 1e3:.1f} ms, sim {r.sim * 1e3:.1f} ms ({r.error:+.1%})"
            for r in rows if abs(r.error) > TOLERANCE]


def test_profiled_simulator_matches_the_recorded_server():
    rows, delays = compare(RUN, seeds=SEEDS)
    print(format_comparison(rows, delays))
    assert {r.policy for r in rows} == {"sarathi", "vllm"} and len(rows) == 8
    assert not _off(rows)


def test_wrong_scheduler_settings_are_caught(tmp_path):
    """The check can fail: simulating sarathi with a 64-token budget instead of the served 256
    is off by more than the tolerance."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    setup = json.loads((run / "setup.json").read_text())
    setup["policies"]["sarathi"]["token_budget"] = 64
    (run / "setup.json").write_text(json.dumps(setup))
    rows, _ = compare(run, seeds=SEEDS)
    assert {r.policy for r in rows if abs(r.error) > TOLERANCE} == {"sarathi"}


def test_a_uniformly_mis_scaled_profile_is_corrected_by_the_variation(tmp_path):
    """The variation is measured against the profile's own predictions, so a profile 30% slow
    everywhere (a machine that was busy while profiling) changes nothing once the calibration
    steps are read: the simulated steps follow what was measured."""
    run = tmp_path / "run"
    shutil.copytree(RUN, run)
    save_profile([ProfileSample(s.features, s.step_time * 1.3) for s in load_profile(run / PROFILE)],
                 run / PROFILE)
    slow, _ = compare(run, seeds=2)
    rows, _ = compare(RUN, seeds=2)
    for a, b in zip(rows, slow):
        assert b.sim == pytest.approx(a.sim, rel=1e-6)
        assert b.sim_fixed > 1.2 * a.sim_fixed or "tbt" not in b.metric


def test_fidelity_runs_without_torch():
    run_without_torch(f"""
        from sim.fidelity import compare
        rows, _ = compare({str(RUN)!r}, seeds=1)
        assert len(rows) == 8
    """)
