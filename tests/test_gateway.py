"""Gateway tests: the real app under uvicorn on a loopback port, a FakeReplica over ZeroMQ ipc
sockets, a byte-level stub tokenizer, and the official `openai` client plus raw httpx."""
from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from gateway.app import create_app
from gateway.config import GatewayConfig
from gateway.replica_client import ReplicaPool
from gateway.routing import RouteRequest
from scheduler.request import SamplingParams
from tests.fake_replica import FakeReplica, wait_until

MODEL = "SmolLM2-135M-Instruct"
HANG_S = 30.0
"""Waits for something that must happen return as soon as it does; this only bounds a hang
(short windows flake on a loaded machine)."""
MAX_LEN = 128
REPO = Path(__file__).resolve().parents[1]


class StubTokenizer:
    """Bytes are tokens (vocab 300); chat = 'role: content\\n' per message."""

    vocab_size = 300

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(t for t in ids if t < 256).decode(errors="replace")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if any(m["role"] == "system" for m in messages[1:]):
            raise ValueError("a system message may only come first")
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        return self.encode(text + ("assistant: " if add_generation_prompt else ""))


class Server:
    """App + pool + fake replica + uvicorn in a background thread."""

    def __init__(self, tmp: str, name: str, replica_kwargs: dict | None = None, **cfg) -> None:
        self.replica = FakeReplica("r0", f"ipc://{tmp}/{name}-in", model=MODEL,
                                   **(replica_kwargs or {}))
        cfg.setdefault("heartbeat_timeout_s", 10.0)
        self.config = GatewayConfig(model_name=MODEL, max_model_len=MAX_LEN, port=0, **cfg)
        self.pool = ReplicaPool.from_config(self.config, f"ipc://{tmp}/{name}-out",
                                            {"r0": self.replica.input_addr})
        self.replica.start(self.pool.output_addr)
        self.app = create_app(self.config, StubTokenizer(), self.pool)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        deadline = time.monotonic() + HANG_S
        while time.monotonic() < deadline:
            if self.server.started:
                try:
                    if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
            time.sleep(0.02)
        raise TimeoutError(f"gateway did not become healthy within {HANG_S:g}s")

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(HANG_S)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.replica.stop()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kw.pop("api_key", "x"),
                             max_retries=0, timeout=10, **kw)


@pytest.fixture(scope="module")
def tmpdir_short():
    # ipc paths must be short (108 bytes), so avoid pytest's deep tmp_path
    with tempfile.TemporaryDirectory(prefix="tg") as d:
        yield d


@pytest.fixture(scope="module")
def srv(tmpdir_short):
    with Server(tmpdir_short, "main") as s:
        yield s




# ---- basics ------------------------------------------------------------------------------------

def test_gateway_does_not_import_torch():
    code = "import sys, gateway.app; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


def test_config_validation_names_bad_value():
    with pytest.raises(ValueError, match="max_model_len.*-3"):
        GatewayConfig(model_name=MODEL, max_model_len=-3)
    with pytest.raises(ValueError, match="heartbeat_timeout_s.*0"):
        GatewayConfig(model_name=MODEL, max_model_len=8, heartbeat_timeout_s=0)
    with pytest.raises(ValueError, match="port.*70000"):
        GatewayConfig(model_name=MODEL, max_model_len=8, port=70000)


def test_completion_non_stream(srv):
    r = srv.client().completions.create(model=MODEL, prompt="abc", max_tokens=5)
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == MODEL
    assert r.choices[0].text == "97 98 99 97 98 "
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (3, 5, 8)


def test_completion_token_prompt_stops_at_eos(srv):
    r = srv.client().completions.create(model=MODEL, prompt=[7, 8, 2], max_tokens=10)
    assert r.choices[0].text == "7 8 "
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 3


def test_completion_stream_with_usage(srv):
    chunks = list(srv.client().completions.create(
        model=MODEL, prompt="xy", max_tokens=4, stream=True, stream_options={"include_usage": True}))
    texts = "".join(c.choices[0].text for c in chunks if c.choices)
    assert texts == "120 121 120 121 "
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
    assert chunks[-1].usage.prompt_tokens == 2


def test_chat_non_stream(srv):
    r = srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
        max_completion_tokens=3)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    prompt = StubTokenizer().encode("system: s\nuser: hi\nassistant: ")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == " ".join(map(str, prompt[:3])) + " "
    assert r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(prompt) and r.usage.completion_tokens == 3


def test_chat_stream_and_content_parts(srv):
    stream = srv.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": [{"type": "text", "text": "ab"}]}],
        max_tokens=4, stream=True)
    chunks = list(stream)
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    prompt = StubTokenizer().encode("user: ab\nassistant: ")
    assert text == " ".join(map(str, prompt[:4])) + " "
    assert chunks[-1].choices[0].finish_reason == "length"


def test_models_and_request_id(srv):
    models = srv.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    r = httpx.get(srv.url + "/v1/models", headers={"x-request-id": "abc123"})
    assert r.headers["x-request-id"] == "abc123"
    r = httpx.post(srv.url + "/v1/completions", headers={"x-request-id": "rid-7"},
                   json={"model": MODEL, "prompt": "a", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-rid-7"
    assert len(httpx.get(srv.url + "/health").headers["x-request-id"]) >= 16


def test_metrics_names(srv):
    srv.client().completions.create(model=MODEL, prompt="m", max_tokens=2)
    body = httpx.get(srv.url + "/metrics").text
    for name in ["tandem:time_to_first_token_seconds", "tandem:inter_token_latency_seconds",
                 "tandem:e2e_request_latency_seconds", "tandem:request_queue_time_seconds",
                 "tandem:prompt_tokens_total", "tandem:generation_tokens_total",
                 "tandem:request_success_total", "tandem:num_requests_running",
                 "tandem:num_requests_waiting", "tandem:kv_cache_usage_perc"]:
        assert name in body, name
    assert 'tandem:request_success_total{finished_reason="length",replica="r0"}' in body


# ---- bad inputs ------------------------------------------------------------------------------

BAD = [
    ({"temperature": -1}, 400, "temperature", "-1"),
    ({"top_p": 0}, 400, "top_p", "0"),
    ({"max_tokens": 0}, 400, "max_tokens", "0"),
    ({"n": 17}, 400, "n", "17"),
    ({"model": "gpt-5"}, 404, "model", "gpt-5"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": [1, 300]}, 400, "prompt", "300"),
    ({"prompt": [-1]}, 400, "prompt", "-1"),
    ({"prompt": ["a"] * 33}, 400, "prompt", "at most 32 prompts"),
    ({"prompt": "a" * 120, "max_tokens": 20}, 400, "prompt", "maximum context length is 128"),
    ({"stop": ["s"] * 9}, 400, "stop", "9"),
    ({"top_k": -2}, 400, "top_k", "-2"),
]


@pytest.mark.parametrize("patch,status,param,needle", BAD, ids=[str(b[0])[:40] for b in BAD])
def test_bad_completion_inputs(srv, patch, status, param, needle):
    body = {"model": MODEL, "prompt": "ok", "max_tokens": 2, **patch}
    r = httpx.post(srv.url + "/v1/completions", json=body, timeout=5)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"], err
    if status == 404:
        assert err["code"] == "model_not_found"


def test_too_long_message_states_lengths(srv):
    r = httpx.post(srv.url + "/v1/completions",
                   json={"model": MODEL, "prompt": "a" * 120, "max_tokens": 20})
    msg = r.json()["error"]["message"]
    assert "128" in msg and "140" in msg and "120" in msg and "20" in msg
    assert r.json()["error"]["code"] == "context_length_exceeded"


def test_bad_chat_inputs(srv):
    url = srv.url + "/v1/chat/completions"
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.role"
    assert "robot" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL, "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"model": MODEL, "messages": [
        {"role": "user", "content": "x"}, {"role": "system", "content": "late"}]})
    assert r.status_code == 400 and "system message" in r.json()["error"]["message"]
    r = httpx.post(url, json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 500})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_malformed_json_and_missing_field(srv):
    r = httpx.post(srv.url + "/v1/completions", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_openai_client_sees_bad_request_and_server_still_serves(srv):
    c = srv.client()
    with pytest.raises(openai.BadRequestError) as ei:
        c.completions.create(model=MODEL, prompt="x", temperature=-1)
    assert "temperature" in str(ei.value)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert c.completions.create(model=MODEL, prompt="z", max_tokens=1).choices[0].text == "122 "


def test_replica_error_is_500_or_sse_error(srv):
    c = srv.client()
    with pytest.raises(openai.InternalServerError) as ei:
        c.completions.create(model=MODEL, prompt=[1, 250], max_tokens=3)
    assert "fake replica failure" in str(ei.value)
    with pytest.raises(openai.APIError, match="fake replica failure"):
        list(c.completions.create(model=MODEL, prompt=[1, 250], max_tokens=3, stream=True))
    with httpx.stream("POST", srv.url + "/v1/completions", json={
            "model": MODEL, "prompt": [250], "max_tokens": 3, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line]
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == "replica_error"
    assert events[-1] == "data: [DONE]"


# ---- disconnects abort the request on the replica ----------------------------------------------

def test_stream_disconnect_aborts_on_replica(srv):
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", srv.url + "/v1/completions",
                           headers={"x-request-id": "disc-stream"},
                           json={"model": MODEL, "prompt": "q", "max_tokens": 100,
                                 "ignore_eos": True, "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    assert wait_until(lambda: "cmpl-disc-stream" in srv.replica.aborted_ids(), HANG_S)
    assert wait_until(lambda: srv.pool.num_outstanding == 0, HANG_S)


def test_non_stream_disconnect_aborts_on_replica(srv):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", headers={"x-request-id": "disc-plain"},
                   json={"model": MODEL, "prompt": "q", "max_tokens": 100}, timeout=0.2)
    assert wait_until(lambda: "cmpl-disc-plain" in srv.replica.aborted_ids(), HANG_S)
    assert wait_until(lambda: srv.pool.num_outstanding == 0, HANG_S)


# ---- servers with other settings ---------------------------------------------------------------

def test_auth(tmpdir_short):
    with Server(tmpdir_short, "auth", api_key="sekret") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "a"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/health").status_code == 200
        out = s.client(api_key="sekret").completions.create(model=MODEL, prompt="a", max_tokens=1)
        assert out.choices[0].text == "97 "


def test_over_capacity_429(tmpdir_short):
    """One request runs (the fake runs one at a time), one may wait; the third gets 429."""
    with Server(tmpdir_short, "cap", {"step_s": 0.02, "max_running": 1},
                max_waiting_per_replica=1) as s:
        body = {"model": MODEL, "prompt": "q", "max_tokens": 40, "stream": True}
        with httpx.Client(timeout=5) as client:
            with client.stream("POST", s.url + "/v1/completions", json=body) as first:
                assert first.status_code == 200
                lines = first.iter_lines()  # keep the iterator: dropping it closes the stream
                assert next(lines).startswith("data: ")  # it is running now
                with client.stream("POST", s.url + "/v1/completions", json=body) as second:
                    assert second.status_code == 200
                    r = client.post(s.url + "/v1/completions",
                                    json={"model": MODEL, "prompt": "q", "max_tokens": 1})
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert r.json()["error"]["type"] == "rate_limit_error"
        assert wait_until(lambda: s.pool.num_outstanding == 0, HANG_S)
        r = httpx.post(s.url + "/v1/completions",
                       json={"model": MODEL, "prompt": "q", "max_tokens": 1}, timeout=5)
        assert r.status_code == 200


def test_health_503_when_replica_goes_silent(tmpdir_short):
    with Server(tmpdir_short, "hb", {"step_s": 0.02}, heartbeat_timeout_s=0.6) as s:
        body = httpx.get(s.url + "/health").json()
        assert body["status"] == "ok" and body["replicas"]["r0"]["healthy"]
        result: dict = {}

        def long_request():
            result["r"] = httpx.post(s.url + "/v1/completions", timeout=10, json={
                "model": MODEL, "prompt": "q", "max_tokens": 100, "ignore_eos": True})

        t = threading.Thread(target=long_request)
        t.start()
        assert wait_until(lambda: s.replica.received_ids(), HANG_S)
        s.replica.silence()
        assert wait_until(lambda: httpx.get(s.url + "/health").status_code == 503, HANG_S)
        t.join(HANG_S)
        r = result["r"]
        # Not the request's fault: retryable, so 503 + Retry-After rather than a 500.
        assert r.status_code == 503 and r.headers["retry-after"]
        assert "heartbeat" in r.json()["error"]["message"]
        r = httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "q"})
        assert r.status_code == 503 and r.headers["retry-after"]


# ---- ReplicaPool on its own ---------------------------------------------------------------------

def test_pool_wait_ready_timeout_names_missing(tmpdir_short):
    async def main():
        pool = ReplicaPool(f"ipc://{tmpdir_short}/wr-out", {"ghost": f"ipc://{tmpdir_short}/wr-in"})
        try:
            with pytest.raises(TimeoutError, match="ghost"):
                await pool.wait_ready(0.2)
        finally:
            await pool.close()
    asyncio.run(asyncio.wait_for(main(), 2 * HANG_S))


def test_pool_generate_early_close_aborts_and_shutdown(tmpdir_short):
    replica = FakeReplica("a", f"ipc://{tmpdir_short}/pg-in")

    async def main():
        pool = ReplicaPool(f"ipc://{tmpdir_short}/pg-out", {"a": replica.input_addr})
        replica.start(pool.output_addr)
        try:
            info = await pool.wait_ready(HANG_S)
            assert info["a"].model == "fake-model" and pool.healthy()
            gen = pool.generate("g1", [5, 6], SamplingParams(max_tokens=1000, ignore_eos=True))
            got = [out async for out in _take(gen, 3)]
            await gen.aclose()
            assert [o.new_token_ids for o in got] == [[5], [6], [5]]
            outs = [o async for o in pool.generate("g2", [3], SamplingParams(max_tokens=2))]
            assert outs[-1].finish_reason == "length" and pool.num_outstanding == 0
        finally:
            await pool.close(shutdown_replicas=True)

    asyncio.run(asyncio.wait_for(main(), 2 * HANG_S))
    assert "g1" in replica.aborted_ids()
    assert replica.got_shutdown.wait(HANG_S)
    replica.stop()


async def _take(agen, n):
    i = 0
    async for item in agen:
        yield item
        i += 1
        if i == n:
            return


def test_pool_request_timeout_fails_with_error_and_aborts(tmpdir_short):
    replica = FakeReplica("a", f"ipc://{tmpdir_short}/to-in", step_s=0.05)

    async def main():
        pool = ReplicaPool(f"ipc://{tmpdir_short}/to-out", {"a": replica.input_addr},
                           request_timeout_s=0.3)
        replica.start(pool.output_addr)
        try:
            await pool.wait_ready(HANG_S)
            outs = [o async for o in pool.generate("slow", [4], SamplingParams(max_tokens=1000))]
            assert outs[-1].finish_reason == "error" and "timed out" in outs[-1].error
            assert 0 < len(outs) - 1 < 20 and pool.num_outstanding == 0
        finally:
            await pool.close()

    asyncio.run(asyncio.wait_for(main(), 2 * HANG_S))
    assert wait_until(lambda: "slow" in replica.aborted_ids(), HANG_S)
    replica.stop()


# ---- fan-out, access log -----------------------------------------------------------------------

def test_n_stream_disconnect_aborts_every_choice(srv):
    with httpx.Client(timeout=5) as client:
        with client.stream("POST", srv.url + "/v1/completions", headers={"x-request-id": "fan"},
                           json={"model": MODEL, "prompt": ["q", "r"], "n": 2, "max_tokens": 100,
                                 "stream": True}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
    wanted = {f"cmpl-fan-{i}" for i in range(4)}
    assert wait_until(lambda: wanted <= set(srv.replica.aborted_ids()), HANG_S)
    assert wait_until(lambda: srv.pool.num_outstanding == 0, HANG_S)


def test_batched_prompts_with_n_and_fake_logprobs(srv):
    r = srv.client().completions.create(model=MODEL, prompt=["ab", "cd"], n=2, max_tokens=2,
                                        logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert [c.text for c in r.choices] == ["ab97 98 "] * 2 + ["cd99 100 "] * 2
    lp = r.choices[0].logprobs
    assert lp.tokens == ["a", "b", "a", "b"] and lp.token_logprobs == [None, -0.5, -0.5, -0.5]
    assert lp.text_offset == [0, 1, 2, 3] and lp.top_logprobs[2] == {"a": -0.5, "b": -1.5}
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (4, 8)
    ids = srv.client().completions.create(model=MODEL, prompt=[[7, 8], [9]], max_tokens=1)
    assert [c.text for c in ids.choices] == ["7 ", "9 "] and ids.usage.prompt_tokens == 3


def test_access_log_is_one_json_line_per_request(srv, caplog):
    with caplog.at_level("INFO", logger="tandem.access"):
        httpx.post(srv.url + "/v1/completions", headers={"x-request-id": "logged-1"},
                   json={"model": MODEL, "prompt": "abc", "max_tokens": 3}, timeout=5)
        httpx.post(srv.url + "/v1/completions", headers={"x-request-id": "logged-2"},
                   json={"model": MODEL, "prompt": "abc", "temperature": 9}, timeout=5)
        assert wait_until(lambda: len([r for r in caplog.records if r.name == "tandem.access"]) >= 2,
                          HANG_S)
    lines = {}
    for rec in caplog.records:
        if rec.name == "tandem.access":
            entry = json.loads(rec.getMessage())
            lines[entry["request_id"]] = entry
    ok, bad = lines["logged-1"], lines["logged-2"]
    assert ok["status"] == 200 and ok["method"] == "POST" and ok["path"] == "/v1/completions"
    assert (ok["prompt_tokens"], ok["completion_tokens"], ok["finish_reason"]) == (3, 3, "length")
    assert ok["latency_s"] > 0
    assert bad["status"] == 400 and bad["prompt_tokens"] is None


# ---- routing -----------------------------------------------------------------------------------

def _replica_state(rid: str, role: str = "hybrid", tokens: int = 0, requests: int = 0):
    from engine.protocol import ReplicaReady
    from gateway.replica_state import ReplicaState

    ready = ReplicaReady(rid, MODEL, MAX_LEN, num_blocks=64, block_size=16, pid=0, role=role)
    return ReplicaState(rid, f"ipc://{rid}", ready=ready, outstanding_tokens=tokens,
                        outstanding=requests)


def test_least_loaded_picks_fewest_outstanding_tokens_not_requests():
    from gateway.routing import make_router

    router = make_router("least_loaded")
    # c has the most requests in flight but the fewest tokens: tokens are what cost time.
    reps = [_replica_state("a", tokens=900, requests=1), _replica_state("b", tokens=300, requests=1),
            _replica_state("c", tokens=120, requests=6)]
    for order in (reps, reps[::-1], reps[1:] + reps[:1]):
        assert router.place(order, RouteRequest(10)).replica.replica_id == "c"


def test_least_loaded_never_places_a_request_on_a_prefill_replica():
    from gateway.routing import make_router

    router = make_router("least_loaded")
    idle_prefill = _replica_state("a-prefill", role="prefill")   # least loaded, and first by id
    busy = [_replica_state("b", role="decode", tokens=500), _replica_state("c", tokens=400)]
    assert router.place([idle_prefill, *busy], RouteRequest(10)).replica.replica_id == "c"
    assert router.place([idle_prefill, busy[0]], RouteRequest(10)).replica.replica_id == "b"
    assert router.place([idle_prefill], RouteRequest(10)) is None     # nothing can decode: the pool says 429


def test_least_loaded_ties_go_by_id_so_equal_requests_spread_evenly():
    from gateway.routing import make_router

    router = make_router("least_loaded")
    reps = [_replica_state(rid) for rid in ("c", "a", "b")]
    placed = []
    for _ in range(6):   # the pool charges each request's tokens to its replica (routing.charge)
        choice = router.place(reps, RouteRequest(10)).replica
        choice.outstanding_tokens += 10 + 16
        placed.append(choice.replica_id)
    assert placed == ["a", "b", "c", "a", "b", "c"]


def test_routing_accounting_without_a_pool_steers_pd_like_the_pool_does():
    """charge / prefill_landed / release keep the counters the routers read (what ReplicaPool
    calls on place / first output / finish), so a simulator can drive them with no sockets."""
    from gateway.routing import ConditionalDisaggregation, charge, prefill_landed, release

    router = ConditionalDisaggregation(offload_threshold=100, max_prefill_queue=2)
    reps = [_replica_state("d", role="decode"), _replica_state("p", role="prefill")]
    decode, prefill = reps
    placed = []
    for _ in range(3):
        placement = router.place(reps, RouteRequest(500))
        charge(placement, 500 + 16)
        placed.append(placement)
    assert [p.decision for p in placed] == ["offload", "offload", "local_prefill_busy"]
    assert (decode.outstanding, decode.outstanding_tokens, prefill.prefill_queue) == (3, 3 * 516, 2)
    assert (prefill.outstanding, prefill.outstanding_tokens) == (0, 0)
    prefill_landed(placed[0].prefill)          # first token of the first request: its slot frees
    assert prefill.prefill_queue == 1 and router.place(reps, RouteRequest(500)).decision == "offload"
    release(decode, None, 516)                 # ... and it finishes (its prefill already landed)
    release(decode, placed[1].prefill, 516)    # the second ends before its first token
    release(decode, None, 516)                 # the local one
    assert (decode.outstanding, decode.outstanding_tokens, prefill.prefill_queue) == (0, 0, 0)
    release(None, None, 516)                   # a replica the pool no longer knows: no-op


def test_make_router_names_an_unknown_routing():
    from gateway.routing import make_router

    with pytest.raises(ValueError, match="'fastest'.*least_loaded"):
        make_router("fastest")


def test_pool_with_least_loaded_routes_by_the_tokens_it_has_in_flight(tmpdir_short):
    """Through ReplicaPool: its accounting of prompt + max_tokens per replica steers placement,
    and a finished request's tokens stop counting."""
    from gateway.routing import make_router

    # Slow steps and long outputs: nothing finishes on its own, so the accounting stays put.
    reps = {rid: FakeReplica(rid, f"ipc://{tmpdir_short}/ll-{rid}", step_s=0.5) for rid in "ab"}

    async def main():
        pool = ReplicaPool(f"ipc://{tmpdir_short}/ll-out",
                           {rid: r.input_addr for rid, r in reps.items()},
                           router=make_router("least_loaded"))
        for r in reps.values():
            r.start(pool.output_addr)
        try:
            await pool.wait_ready(HANG_S)
            big = SamplingParams(max_tokens=1000)
            small = SamplingParams(max_tokens=100)
            long_one = await pool.submit("long", [5] * 10, big)     # tie: a (by id)
            placed = [(await pool.submit(f"s{i}", [5] * 5, small)).replica_id for i in range(3)]
            assert long_one.replica_id == "a" and placed == ["b", "b", "b"]   # round robin: b, a, b
            long_one.abort()                                        # a's 1010 tokens are gone
            assert (await pool.submit("after", [5] * 5, small)).replica_id == "a"
        finally:
            await pool.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 2 * HANG_S))
    finally:
        for r in reps.values():
            r.stop()
