"""Overload: a burst far past capacity against a real replica process (tiny model) behind the
gateway with a small waiting bound. Some requests get 429 + Retry-After, every accepted one
finishes, nothing hangs. Prints accepted/rejected counts and the P99 time between tokens of the
accepted streams (printed, not asserted: tests do not assert on wall-clock time)."""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn

BURST = 64
MAX_WAITING = 4
MAX_NUM_SEQS = 8
MAX_TOKENS = 128


@pytest.fixture(scope="module")
def overload_server(tiny_model_dir):
    from cluster.launcher import LocalLauncher, ReplicaSpec
    from engine.config import EngineConfig
    from engine.tokenizer import Tokenizer
    from gateway.app import create_app
    from gateway.config import GatewayConfig
    from gateway.replica_client import ReplicaPool
    from scheduler.config import SchedulerConfig

    engine = EngineConfig(model_dir=str(tiny_model_dir), model_name="tiny", threads=1,
                          num_kv_blocks=256, scheduler=SchedulerConfig(
                              token_budget=32, max_num_seqs=MAX_NUM_SEQS, max_model_len=512))
    config = GatewayConfig(model_name="tiny", max_model_len=512, port=0,
                           max_waiting_per_replica=MAX_WAITING, request_timeout_s=60)
    launcher = LocalLauncher()
    launcher.start(ReplicaSpec("replica-0", engine, launcher.ipc_addr("replica-0-in")))
    pool = ReplicaPool.from_config(config, launcher.output_addr,
                                   {"replica-0": launcher.specs["replica-0"].input_addr})
    app = create_app(config, Tokenizer.from_dir(tiny_model_dir), pool)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while True:
            assert not launcher.dead(), "replica exited during start-up"
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "replica not ready within 120 s"
            time.sleep(0.2)
        # Admission counts the replica's running slots once its first stats frame arrived.
        while not pool.replicas["replica-0"].stats.max_num_seqs:
            assert time.monotonic() < deadline, "no stats frame from the replica"
            time.sleep(0.05)
        yield url, pool
    finally:
        server.should_exit = True
        thread.join(15)
        launcher.stop(grace=0.5)


async def _one(http: httpx.AsyncClient, url: str, i: int) -> dict:
    body = {"model": "tiny", "prompt": f"request {i}: " + "word " * (i % 7 * 5), "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "error": r.json()["error"]}
        times, finish = [], None
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            times.append(time.perf_counter())
            finish = chunk["choices"][0]["finish_reason"] or finish
        return {"status": 200, "times": times, "finish": finish}


def test_burst_past_capacity_sheds_load_and_finishes_the_rest(overload_server):
    url, pool = overload_server

    async def burst() -> list[dict]:
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(*[_one(http, url, i) for i in range(BURST)])

    results = asyncio.run(asyncio.wait_for(burst(), 120))
    accepted = [r for r in results if r["status"] == 200]
    rejected = [r for r in results if r["status"] != 200]
    assert rejected and accepted
    for r in rejected:
        assert r["status"] == 429 and r["retry_after"] == "1", r
        assert r["error"]["code"] == "rate_limit_exceeded" and r["error"]["type"] == "rate_limit_error"
    for r in accepted:
        assert r["finish"] == "length"
    assert len(accepted) <= MAX_NUM_SEQS + MAX_WAITING * 2  # bounded, not queued without end

    gaps = sorted(b - a for r in accepted for a, b in zip(r["times"], r["times"][1:]))
    p99 = gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps else float("nan")
    print(f"\noverload: burst={BURST} accepted={len(accepted)} rejected={len(rejected)} "
          f"(429) P99 TBT of accepted={p99 * 1000:.1f} ms over {len(gaps)} gaps")

    deadline = time.monotonic() + 30   # a hang guard: the loop ends as soon as the pool drains
    while pool.num_outstanding:
        assert time.monotonic() < deadline, "requests still outstanding after the burst"
        time.sleep(0.05)
    r = httpx.post(url + "/v1/completions", timeout=30,
                   json={"model": "tiny", "prompt": "after", "max_tokens": 2})
    assert r.status_code == 200
    metrics = httpx.get(url + "/metrics", timeout=5).text
    assert f'tandem:requests_rejected_total{{reason="overloaded"}} {float(len(rejected))}' in metrics
