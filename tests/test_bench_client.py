"""The load client against a tiny fake OpenAI streaming server on a loopback port.

The fake's behaviour is picked by the requested model: "fake" streams one token per chunk after
TTFT_S and then every GAP_S; "bundle" sends two tokens per chunk; "busy" answers 429; "hang" sends one
token and then stalls; "broken" sends an error event in the stream.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.client import completions_url, models_url, run_load
from bench.server import free_port
from bench.report import summarize
from bench.workload import PromptBuilder, RequestSpec, Workload

TTFT_S = 0.3
GAP_S = 0.1
payloads: list[dict] = []


def _app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "fake", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        payloads.append(body)
        model, n = body["model"], body["max_tokens"]
        if model == "busy":
            return JSONResponse({"error": {"message": "over capacity", "type": "rate_limit_error"}},
                                status_code=429)

        def sse(obj) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        def chunk(text: str) -> str:
            return sse({"choices": [{"index": 0, "text": text, "finish_reason": None}], "usage": None})

        async def gen():
            await asyncio.sleep(TTFT_S)
            if model == "broken":
                yield sse({"error": {"message": "replica error: boom"}})
                yield "data: [DONE]\n\n"
                return
            per = 2 if model == "bundle" else 1
            for i in range(0, n, per):
                if i:
                    await asyncio.sleep(GAP_S)
                yield chunk(" hi" * min(per, n - i))
                if model == "hang":
                    await asyncio.sleep(3600)
            yield sse({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": n,
                                                "total_tokens": 7 + n}})
            yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_url():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_app(), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + 30   # a hang guard: returns as soon as it has started
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    th.join(timeout=5)


def _wl(n: int, out: int, qps: float = 20.0) -> Workload:
    return Workload([RequestSpec(i / qps, 16, out) for i in range(n)])


def _run(coro, limit_s: float = 20.0):
    return asyncio.run(asyncio.wait_for(coro, limit_s))


def test_urls():
    assert completions_url("http://h:1") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/") == "http://h:1/v1/completions"
    assert completions_url("http://h:1/v1/completions") == "http://h:1/v1/completions"
    assert models_url("http://h:1/v1/completions") == "http://h:1/v1/models"


def test_timings_tokens_and_payload(fake_url):
    payloads.clear()
    done = []
    run = _run(run_load(_wl(4, 5), fake_url, on_done=done.append, prompts=PromptBuilder(seed=1)))
    assert run.model == "fake" and len(done) == 4 and not run.timed_out
    for r in run.requests:
        assert r.ok, r.error
        assert r.status == 200 and r.usage_reported and r.output_tokens == 5 and r.num_chunks == 5
        assert r.server_prompt_tokens == 7
        assert TTFT_S * 0.9 <= r.ttft_s < TTFT_S + 0.5
        assert len(r.itl_s) == 4 and all(GAP_S * 0.7 <= g < GAP_S + 0.3 for g in r.itl_s)
        assert r.e2e_s >= r.ttft_s + sum(r.itl_s) - 1e-6
        assert r.send_s >= r.scheduled_s - 1e-3   # open loop: sent at (not before) its arrival
    p = payloads[0]
    assert p["stream"] is True and p["ignore_eos"] is True and p["max_tokens"] == 5
    assert p["stream_options"] == {"include_usage": True} and p["temperature"] == 0
    assert isinstance(p["prompt"], str) and p["prompt"].count(" ") == 16
    s = summarize(run)
    assert s["num_ok"] == 4 and s["tbt_s"]["count"] == 16 and s["bundled_tokens"] == 0


def test_token_id_prompts(fake_url):
    payloads.clear()
    run = _run(run_load(_wl(1, 1), fake_url, model="fake", prompts=PromptBuilder(token_ids=True)))
    assert run.requests[0].ok and run.requests[0].itl_s == []
    assert isinstance(payloads[0]["prompt"], list) and len(payloads[0]["prompt"]) == 16


def test_bundled_chunks(fake_url):
    run = _run(run_load(_wl(2, 6), fake_url, model="bundle"))
    for r in run.requests:
        assert r.ok and r.output_tokens == 6 and r.num_chunks == 3 and r.bundled_tokens == 3


def test_429_recorded(fake_url):
    run = _run(run_load(_wl(3, 4), fake_url, model="busy"))
    assert run.num_429 == 3 and run.num_503 == 0
    assert all(not r.ok and r.error.startswith("HTTP 429") and "over capacity" in r.error
               for r in run.requests)


def test_stream_error_recorded(fake_url):
    run = _run(run_load(_wl(1, 4), fake_url, model="broken"))
    assert "boom" in run.requests[0].error


def test_request_timeout_does_not_hang(fake_url):
    t = time.monotonic()
    run = _run(run_load(_wl(2, 4), fake_url, model="hang", timeout_s=1.0))
    assert time.monotonic() - t < 5
    for r in run.requests:
        assert r.error.startswith("timeout") and r.ttft_s is not None


def test_run_deadline(fake_url):
    wl = Workload([RequestSpec(0.0, 8, 3), RequestSpec(30.0, 8, 3)])
    t = time.monotonic()
    run = _run(run_load(wl, fake_url, model="hang", timeout_s=60, run_timeout_s=1.0))
    assert time.monotonic() - t < 5 and run.timed_out
    first, second = run.requests
    assert first.error == "cancelled at the run deadline"
    assert second.error == "not sent before the run deadline" and second.send_s is None


def test_connection_refused():
    url = f"http://127.0.0.1:{free_port()}"
    run = _run(run_load(_wl(2, 4), url, model="x", timeout_s=3))
    assert all(not r.ok and "Connect" in r.error for r in run.requests)


def test_cli_bench_capacity_plot(fake_url, tmp_path, capsys):
    from bench.cli import main

    out = tmp_path / "b.json"
    main(["bench", "--url", fake_url, "--qps", "20", "--num-requests", "3", "--prompt-len", "8",
          "--output-len", "3", "--json", str(out), "--label", "fake", "--tbt-slo-ms", "500",
          "--no-progress"])
    text = capsys.readouterr().out
    assert "TTFT" in text and "goodput" in text
    b = json.loads(out.read_text())
    assert b["kind"] == "bench" and b["label"] == "fake" and b["num_ok"] == 3
    assert b["goodput"]["num_good"] == 3 and len(b["requests"]) == 3

    cap = tmp_path / "c.json"
    main(["capacity", "--url", fake_url, "--tbt-slo-ms", "500", "--num-requests", "3",
          "--prompt-len", "8", "--output-len", "2", "--start-qps", "4", "--max-qps", "8",
          "--cooldown", "0", "--json", str(cap), "--label", "fake", "--no-progress"])
    c = json.loads(cap.read_text())
    assert c["kind"] == "capacity" and c["capacity_qps"] == 8 and c["status"] == "max_qps"
    assert [t["qps"] for t in c["trials"]] == [4, 8] and c["tbt_slo_ms"] == 500
    assert "PASS" in capsys.readouterr().out

    main(["plot", str(out), str(cap), "--out", str(tmp_path / "plots")])
    names = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert names == ["capacity.png", "latency_throughput.png", "tbt_cdf.png"]
