"""The scheduling benchmarks run end to end (tiny model, seconds); their numbers are not asserted."""
from __future__ import annotations

import json

import pytest

from bench.stall import stall_workload
from cluster.cli import build_parser


def test_stall_workload_shape():
    w = stall_workload(streams=3, stream_prompt=16, stream_output=50, long_prompt=512, num_long=2,
                       first_long_s=1.0, long_gap_s=2.0)
    assert [r.prompt_tokens for r in w.requests] == [16, 16, 16, 512, 512]
    assert [r.arrival_s for r in w.requests][-2:] == [1.0, 3.0]


def test_bench_feedback_runs_and_reports_both_controllers(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "fb.json"
    args = build_parser().parse_args([
        "bench-feedback", "--model", str(tiny_model_dir), "--threads", "1", "--num-kv-blocks", "512",
        "--phase-a", "1.0", "--phase-b", "1.0", "--light-streams", "1", "--heavy-streams", "3",
        "--long-prompt", "64", "--light-long-every", "0.5", "--heavy-long-every", "0.5",
        "--static-budget", "64", "--tbt-slo-ms", "50", "--max-model-len", "512", "--json", str(out)])
    args.func(args)
    printed = capsys.readouterr().out
    assert "static 64" in printed and "feedback" in printed
    results = json.loads(out.read_text())["results"]
    assert [r["label"] for r in results] == ["static 64", "feedback"]
    assert all(r["iterations"] for r in results)


def test_bench_attention_times_every_alternative(capsys):
    args = build_parser().parse_args(["bench-attention", "--context", "48", "--repeats", "1",
                                      "--threads", "1", "--dtype", "float32"])
    args.func(args)
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [r[0] for r in rows] == ["decode", "decode", "8"]
    assert all(float(x) > 0 for r in rows for x in r[-3:])


@pytest.mark.slow
def test_bench_stall_against_the_real_server(tiny_model_dir, capsys):
    args = build_parser().parse_args([
        "bench-stall", "--model", str(tiny_model_dir), "--policies", "sarathi", "vllm",
        "--streams", "2", "--stream-output", "30", "--long-prompt", "256", "--num-long", "1",
        "--threads", "1", "--max-model-len", "512"])
    args.func(args)
    assert "vllm" in capsys.readouterr().out
