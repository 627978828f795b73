"""The chaos run, CI-sized: 200 requests of hostile traffic (cancelled streams, client timeouts,
bad inputs, 429 bursts, long prompts through a KV transfer) against 1 hybrid + 1 prefill + 1
decode replica of a tiny model, the prefill replica SIGKILLed midway and one KV frame corrupted.
Nothing may hang or end without a proper answer, no KV block or transfer may be left over, the
killed replica must come back, and the server must still answer. `make chaos` is the full run."""
from __future__ import annotations

import json

from bench.chaos import ChaosConfig, build_plan, parse_metrics
from cluster.cli import main as tandem


def test_plan_is_seeded_and_mixes_every_ingredient():
    cfg = ChaosConfig(num_requests=200, seed=3)
    a, b = build_plan(cfg, "m"), build_plan(cfg, "m")
    assert [(s.kind, s.path, s.body) for s in a] == [(s.kind, s.path, s.body) for s in b]
    assert len(a) == 200 and [s.index for s in a] == list(range(200))
    kinds = {s.kind for s in a}
    assert kinds == {"completion", "completion_stream", "chat", "chat_stream", "cancel", "timeout", "bad",
                     "burst"}
    assert sum(s.burst is not None for s in a) == cfg.burst_size
    assert any(s.long for s in a) and {s.n for s in a if s.kind != "bad"} == {1, 2, 3}
    assert build_plan(ChaosConfig(num_requests=200, seed=4), "m") != a


def test_parse_metrics_sums_labels():
    text = ('# HELP x\ntandem:kv_fallbacks_total{replica="decode-0",fallback="local"} 2.0\n'
            'tandem:kv_fallbacks_total{replica="decode-0",fallback="recompute"} 1.0\n'
            'tandem:kv_fallbacks_created{replica="decode-0",fallback="local"} 17e8\n')
    m = parse_metrics(text)
    assert m["kv_fallbacks"] == 3.0 and m['kv_fallbacks{fallback="recompute"}'] == 1.0


def test_chaos_run(tiny_model_dir, tmp_path):
    out = tmp_path / "chaos.json"
    argv = ["bench-chaos", "--model", str(tiny_model_dir), "--dtype", "float32", "--no-compile",
            "--num-requests", "200", "--seed", "0", "--kill-role", "prefill", "--deadline", "60",
            "--quiet", "--json", str(out), "--server-log", str(tmp_path / "server.log")]
    try:
        tandem(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    r = json.loads(out.read_text())
    print({k: r[k] for k in ("sent", "ok", "cancelled", "failed_by_status", "hung", "bare_failures",
                             "server_errors", "leaked_blocks", "live_transfers", "recovery_s", "wall_s")})
    defects = [(d["index"], d["kind"], d["key"], d["detail"]) for d in r["defects"]]
    assert r["sent"] == 200
    assert r["hung"] == 0, defects
    assert r["bare_failures"] == 0, defects
    # A clean body but still the server's fault (a 500, a replica_error event): none expected.
    assert r["server_errors"] == 0, r["server_error_requests"]
    assert r["leaked_blocks"] == 0 and r["live_transfers"] == 0, r["final_health"]
    assert r["unhealthy_replicas"] == []
    assert r["killed_replica"] == "prefill-0" and r["recovery_s"] is not None, r["kill"]
    assert r["final_request_ok"], r["final_request_detail"]
    assert code == 0, r["problems"]
    # Every ingredient was really exercised.
    assert r["ok"] > 0
    assert r["cancelled_mid_stream"] > 0 and r["cancelled_client_timeout"] > 0
    assert r["status_429"] > 0
    assert r["bad_inputs"] > 0 and r["bad_inputs_4xx"] == r["bad_inputs"]
    assert r["metrics"].get("kv_fallbacks", 0) >= 1
    assert r["metrics"].get('kv_transfer_failures{reason="checksum"}', 0) >= 1   # the corrupted frame
    assert r["metrics"].get("routing_offload", 0) > 0 and r["metrics"].get("kv_transfer_bytes", 0) > 0
