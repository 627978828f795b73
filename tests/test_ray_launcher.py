"""Replicas as Ray actors on a 2-node loopback Ray cluster (127.0.0.2 advertises `prefill_node`,
127.0.0.3 `decode_node`): a PD deployment pinned by custom resources lands on the nodes the spec
says, gives the colocated tokens, and a SIGKILLed actor is restarted in its placement group and
serves again. Ray is started per the project's rules: private ports and temp dir, RAY_AUTH_MODE
disabled, stopped by SIGTERM to each `ray start --block` (never `ray stop`)."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from bench.server import local_server
from cluster.net import free_port
from tests.test_pd import THRESHOLD, base_args, health, metric, wait_idle
from tests.test_pd import run_all as run_pd

pytest.importorskip("ray", reason="Ray is in the test extra: pip install -e '.[test]'")

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", *args], env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    temp = f"/tmp/rt{os.getpid()}"   # short: AF_UNIX paths are limited to 107 bytes
    port = free_port()
    head = _start(["--head", "--node-ip-address=127.0.0.2", f"--port={port}", "--include-dashboard=false",
                   f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={free_port()}",
                   f"--temp-dir={temp}", "--num-cpus=2", '--resources={"prefill_node":1}'], env)
    procs = [head]
    try:
        worker = _start([f"--address=127.0.0.2:{port}", "--node-ip-address=127.0.0.3",
                         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={temp}",
                         "--num-cpus=2", '--resources={"decode_node":1}'], env)
        procs.insert(0, worker)
        deadline = time.monotonic() + 90
        while True:
            out = subprocess.run([RAY, "status", "--address", f"127.0.0.2:{port}"], env=env,
                                 capture_output=True, text=True).stdout
            if "decode_node" in out and "prefill_node" in out:
                break
            assert time.monotonic() < deadline, f"Ray cluster did not come up: {out}"
            assert all(p.poll() is None for p in procs), "a `ray start` exited"
            time.sleep(1)
        yield f"127.0.0.2:{port}"
    finally:
        for p in procs:   # workers first, each `ray start --block` only
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(5)
        shutil.rmtree(temp, ignore_errors=True)


def test_pd_replicas_as_ray_actors_land_where_the_spec_says_and_come_back(ray_cluster, tiny_model_dir, tmp_path,
                                                                          monkeypatch):
    """PD with tp=2 on both sides (and a hybrid replica): each replica's placement group on the
    node its custom resource pins; the same tokens as one colocated rank; KV bytes counted. Then
    the decode actor is SIGKILLed under load: every request ends (200, or a clean 503) within 5 s
    of the kill, /health stays 200 (the hybrid replica serves), the replica comes back on its node
    and serves, nothing leaks."""
    import concurrent.futures as cf

    import httpx

    from tests.test_replica_failure import LOST_WITHIN_S, plain

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"""
routing: pd
offload_threshold: {THRESHOLD}
replicas:
  - {{role: prefill, count: 1, tp: 2, threads: 1, resources: {{CPU: 0.5, prefill_node: 0.01}}}}
  - {{role: decode, count: 1, tp: 2, threads: 1, resources: {{CPU: 0.5, decode_node: 0.01}}}}
  - {{role: hybrid, count: 1, threads: 1, resources: {{CPU: 1, prefill_node: 0.01}}}}
""")
    args = base_args(tiny_model_dir)
    with local_server(args) as srv:
        want = run_pd(srv.url)
    with local_server([*args, "--spec", str(spec), "--ray-address", ray_cluster, "--kv-timeout", "10"]) as srv:
        replicas = health(srv.url)["replicas"]
        assert replicas["prefill-0"]["address"].startswith("tcp://127.0.0.2:")
        assert replicas["decode-0"]["address"].startswith("tcp://127.0.0.3:")
        assert run_pd(srv.url) == want
        assert metric(srv.url, "tandem:kv_fallbacks_total") == 0
        assert health(srv.url)["routing"].get("offload", 0) > 0
        assert metric(srv.url, "tandem:kv_transfer_bytes_total") > 0

        old = health(srv.url)["replicas"]["decode-0"]
        prompts = [[(31 * i + 7 * j) % 40000 + 100 for j in range(20)] for i in range(6)]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            running = [pool.submit(plain, srv.url, p, 200) for p in prompts]
            deadline = time.monotonic() + 30
            while health(srv.url)["replicas"]["decode-0"]["num_running"] == 0:
                assert time.monotonic() < deadline, "no load on the decode replica"
                time.sleep(0.05)
            os.kill(old["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            statuses = set()
            while not all(f.done() for f in running):   # the hybrid replica still serves
                statuses.add(httpx.get(f"{srv.url}/health").status_code)
                time.sleep(0.1)
            assert statuses == {200}, statuses
            for f in running:
                r, ended = f.result(timeout=120)
                assert r.status_code in (200, 503), r.text           # never a bare 500
                if r.status_code == 503:
                    assert r.headers["retry-after"] and ended - killed_at < LOST_WITHIN_S
        deadline = time.monotonic() + 90
        while True:
            h = health(srv.url)
            new = h["replicas"]["decode-0"]
            if new["healthy"] and new["pid"] != old["pid"]:
                break
            assert time.monotonic() < deadline, f"decode replica not back: {new}"
            time.sleep(0.3)
        assert new["restarts"] == 1 and new["address"].startswith("tcp://127.0.0.3:")
        assert run_pd(srv.url) == want
        wait_idle(srv.url)


def test_ray_local_starts_a_private_ray_and_serves(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    with local_server([*base_args(tiny_model_dir), "--ray", "local", "--hybrid-replicas", "2"]) as srv:
        replicas = health(srv.url)["replicas"]
        assert all(r["address"].startswith("tcp://") for r in replicas.values())
        assert len(run_pd(srv.url)) == 6
