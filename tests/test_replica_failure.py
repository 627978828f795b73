"""A replica process dies (SIGKILL) under load: it leaves routing at once, its requests finish
elsewhere or end within seconds with a retryable error (503 + Retry-After, or an SSE error event
once streaming began; never a bare 500), its KV-transfer peers give up on it without waiting for
--kv-timeout, and the launcher restarts it and the gateway routes to it again."""
from __future__ import annotations

import concurrent.futures as cf
import contextlib
import json
import os
import signal
import time

import httpx

from bench.server import local_server
from tests.test_pd import THRESHOLD, base_args, complete, health, pd_args, prompts, wait_idle

LOST_WITHIN_S = 5.0
"""Liveness bound: a dead replica's requests end (or move) within this long."""


def metric(url: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` carrying all of `labels` (exposition order is not ours)."""
    want = [f'{k}="{v}"' for k, v in labels.items()]
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") and all(w in line for w in want))


def wait_for(predicate, timeout: float, what: str):
    """Poll until `predicate()` is truthy (a hang guard, not a timing assertion)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def plain(url: str, prompt: list[int], max_tokens: int) -> tuple[httpx.Response, float]:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True})
    return r, time.monotonic()


def streamed(url: str, prompt: list[int], max_tokens: int) -> tuple[list[dict], int, float]:
    """The SSE events of a streaming completion (parsed) and the HTTP status."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
            "model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append({"done": True} if data == "[DONE]" else json.loads(data))
        return events, r.status_code, time.monotonic()


def test_killed_hybrid_replica_requests_move_or_fail_retryably_then_it_comes_back(tiny_model_dir):
    args = [*base_args(tiny_model_dir), "--hybrid-replicas", "2", "--routing", "round_robin",
            "--max-num-seqs", "3"]
    ps = [[(31 * i + 7 * j) % 40000 + 100 for j in range(20)] for i in range(10)]
    with local_server(args) as srv:
        victim_id = "hybrid-0"
        victim = health(srv.url)["replicas"][victim_id]
        with cf.ThreadPoolExecutor(len(ps) + 2) as pool:
            # Long generations; with 3 running per replica, the rest wait in its queue.
            plains = [pool.submit(plain, srv.url, p, 120) for p in ps[:8]]
            streams = [pool.submit(streamed, srv.url, p, 120) for p in ps[8:]]
            wait_for(lambda: health(srv.url)["replicas"][victim_id]["num_running"] > 0, 30,
                     "the victim to run requests")
            time.sleep(0.3)   # some outputs delivered: those can no longer move
            os.kill(victim["pid"], signal.SIGKILL)
            killed_at = time.monotonic()
            h = wait_for(lambda: (lambda h: h if h["replicas"][victim_id]["lost"] else None)(
                health(srv.url)), LOST_WITHIN_S, "the gateway to see the replica lost")
            assert not h["replicas"][victim_id]["healthy"] and h["status"] == "degraded"
            # Nothing new goes to it while it is down.
            late = [pool.submit(plain, srv.url, p[:10], 5) for p in ps[:2]]
            wait_for(lambda: health(srv.url)["replicas"]["hybrid-1"]["outstanding"] >= 2, 10, "late requests")
            assert health(srv.url)["replicas"][victim_id]["outstanding"] == 0

            ok = retryable = 0
            for f in plains:
                r, ended = f.result(timeout=120)
                if r.status_code == 200:
                    assert r.json()["choices"][0]["finish_reason"] == "length"
                    ok += 1
                    continue
                assert r.status_code == 503, r.text          # never a bare 500
                assert r.headers["retry-after"] and r.json()["error"]["code"] == "service_unavailable"
                assert ended - killed_at < LOST_WITHIN_S
                retryable += 1
            for f in streams:
                events, status, ended = f.result(timeout=120)
                assert status == 200 and events[-1] == {"done": True}
                errors = [e for e in events if "error" in e]
                if errors:   # began streaming on the victim: an error event, then [DONE]
                    assert errors[0]["error"]["code"] == "service_unavailable"
                    assert ended - killed_at < LOST_WITHIN_S
                    retryable += 1
                else:
                    assert events[-2]["choices"][0]["finish_reason"] == "length"
                    ok += 1
            assert all(f.result(timeout=120)[0].status_code == 200 for f in late)
        h = health(srv.url)
        assert retryable >= 1, "the victim had running requests with outputs"
        assert h["requests_moved"] >= 1, "queued requests of the victim should have moved"
        assert ok + retryable == len(ps)

        # The launcher restarts it (new pid) and the gateway routes to it again.
        h = wait_for(lambda: (lambda h: h if h["status"] == "ok" else None)(health(srv.url)), 60,
                     "the replica to be restarted")
        back = h["replicas"][victim_id]
        assert back["pid"] != victim["pid"] and back["restarts"] == 1 and back["healthy"]
        before = metric(srv.url, "tandem:request_success_total", replica=victim_id)
        with cf.ThreadPoolExecutor(4) as pool:
            assert all(pool.map(lambda p: complete(srv.url, p[:10]), ps[:4]))
        assert metric(srv.url, "tandem:request_success_total", replica=victim_id) > before
        wait_idle(srv.url)


def test_killed_prefill_replica_pending_transfers_recompute_at_once(tiny_model_dir):
    """No stall injection: the prefill replica is frozen (SIGSTOP, as a hung node would be) while
    long prompts are offloaded to it, then killed. The decode replica recomputes them at once --
    kv-timeout is 60 s, far beyond the bound -- with the colocated tokens, and long prompts stop
    being offloaded while it is down."""
    long_prompts = [p for p in prompts() if len(p) > THRESHOLD]
    with local_server(base_args(tiny_model_dir)) as srv:
        with cf.ThreadPoolExecutor(len(long_prompts)) as pool:
            expected = list(pool.map(lambda p: complete(srv.url, p), long_prompts))
    with local_server(pd_args(tiny_model_dir, "raw", timeout=60.0)) as srv:
        prefill_id, prefill = next((rid, r) for rid, r in health(srv.url)["replicas"].items()
                                   if r["role"] == "prefill")
        os.kill(prefill["pid"], signal.SIGSTOP)
        try:
            with cf.ThreadPoolExecutor(len(long_prompts)) as pool:
                futures = [pool.submit(complete, srv.url, p) for p in long_prompts]
                wait_for(lambda: health(srv.url)["replicas"]["decode-0"]["num_live_transfers"]
                         == len(long_prompts), 8, "the decode replica to await every transfer")
                os.kill(prefill["pid"], signal.SIGKILL)
                killed_at = time.monotonic()
                wait_for(lambda: health(srv.url)["replicas"][prefill_id]["lost"], LOST_WITHIN_S,
                         "the prefill replica to leave routing")
                offloads = health(srv.url)["routing"]["offload"]
                assert complete(srv.url, long_prompts[0]) == expected[0]   # while it is down
                assert health(srv.url)["routing"]["offload"] == offloads
                assert [f.result(timeout=120) for f in futures] == expected
        finally:   # never leave a stopped process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(prefill["pid"], signal.SIGKILL)
        assert time.monotonic() - killed_at < 30, "recomputed only after the KV timeout"
        assert metric(srv.url, "tandem:kv_transfer_failures_total", replica="decode-0",
                      reason="peer_lost") == len(long_prompts)
        decode = wait_idle(srv.url)["replicas"]["decode-0"]
        assert decode["num_live_transfers"] == 0
