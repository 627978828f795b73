"""Tenants at the gateway (fake replica, real app under uvicorn): named API keys map to tenants,
the `user` field names the tenant of anonymous keys, the per-tenant quota answers 429, and the
per-tenant metrics appear in /metrics."""
from __future__ import annotations

import tempfile

import httpx
import pytest

from engine.protocol import AddRequest, decode, encode
from gateway.config import GatewayConfig, parse_api_key
from gateway.tenants import Tenants
from scheduler.request import SamplingParams
from tests.fake_replica import wait_until
from tests.test_gateway import HANG_S, MODEL, Server

BODY = {"model": MODEL, "prompt": "q", "max_tokens": 2}


def post(s: Server, key: str | None = None, **extra) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(s.url + "/v1/completions", json={**BODY, **extra}, headers=headers, timeout=10)


def tenants_received(s: Server) -> dict[str, str]:
    with s.replica._lock:
        return {m.request_id: m.tenant for m in s.replica.received}



@pytest.fixture(scope="module")
def tmpdir_short():
    # ipc paths must be short (108 bytes), so not pytest's deep tmp_path
    with tempfile.TemporaryDirectory(prefix="tt") as d:
        yield d

def test_api_key_values_parse_and_duplicates_are_named():
    assert parse_api_key("a=k1") == ("a", "k1")
    assert parse_api_key("sekret") == ("default", "sekret")
    assert parse_api_key("c2VrcmV0==") == ("default", "c2VrcmV0==")   # base64 padding, no name
    assert parse_api_key("x=abc==") == ("x", "abc==")
    cfg = GatewayConfig(model_name=MODEL, max_model_len=8, api_key="k0",
                        api_keys=(("a", "k1"), ("b", "k2")))
    assert cfg.all_api_keys == (("default", "k0"), ("a", "k1"), ("b", "k2"))
    with pytest.raises(ValueError, match=r"\['a'\] have more than one"):
        GatewayConfig(model_name=MODEL, max_model_len=8, api_keys=(("a", "k1"), ("a", "k2")))
    with pytest.raises(ValueError, match=r"\['a', 'b'\] share one API key") as e:
        GatewayConfig(model_name=MODEL, max_model_len=8, api_keys=(("a", "k1"), ("b", "k1")))
    assert "k1" not in str(e.value)    # the error names the tenants, never the secret
    with pytest.raises(ValueError, match="'bad name'"):
        GatewayConfig(model_name=MODEL, max_model_len=8, api_keys=(("bad name", "k"),))
    with pytest.raises(ValueError, match="tenant_max_waiting.*0"):
        GatewayConfig(model_name=MODEL, max_model_len=8, tenant_max_waiting=0)


def test_old_add_request_frames_decode_with_the_default_tenant():
    msg = AddRequest("r", [1, 2], SamplingParams(), 0.0, tenant="acme")
    assert decode(encode(msg)).tenant == "acme"
    import msgpack
    body = msgpack.unpackb(encode(msg), raw=False)
    del body["tenant"]     # what a gateway that predates tenants sends
    assert decode(msgpack.packb(body, use_bin_type=True)).tenant == "default"


def test_user_tenants_are_bounded():
    t = Tenants(GatewayConfig(model_name=MODEL, max_model_len=8, max_user_tenants=2,
                              api_keys=(("a", "k1"),)))
    assert t.resolve("a", "someone") == "a"          # a named key wins over `user`
    assert t.resolve("default", None) == "default"
    assert t.resolve(None, "u1") == "u1" and t.resolve(None, "u2") == "u2"
    assert t.resolve(None, "u3") == "other"          # past the cap
    assert t.resolve(None, "u1") == "u1"
    assert t.resolve(None, "a") == "other"           # may not pose as a keyed tenant


def test_named_keys_map_to_tenants(tmpdir_short):
    with Server(tmpdir_short, "tk", api_keys=(("a", "k1"), ("b", "k2"))) as s:
        assert post(s, "k1", user="ignored").status_code == 200
        assert post(s, "k2").status_code == 200
        bad = post(s, "k3")
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert post(s).status_code == 401
        assert sorted(tenants_received(s).values()) == ["a", "b"]


def test_user_field_names_the_tenant_of_anonymous_keys(tmpdir_short):
    with Server(tmpdir_short, "tu", api_key="anon", api_keys=(("a", "k1"),)) as s:
        assert post(s, "anon", user="alice").status_code == 200
        assert post(s, "anon").status_code == 200
        assert post(s, "k1", user="alice").status_code == 200
        got = sorted(tenants_received(s).values())
        assert got == ["a", "alice", "default"]
        text = httpx.get(s.url + "/metrics").text
        assert 'tandem:tenant_time_to_first_token_seconds_count{tenant="alice"} 1.0' in text
        assert 'tandem:tenant_generation_tokens_total{tenant="a"} 2.0' in text
        assert 'tandem:tenant_prompt_tokens_total{tenant="default"} 1.0' in text
        assert 'tandem:tenant_inter_token_latency_seconds_count{tenant="alice"} 1.0' in text


def test_tenant_quota_429_per_tenant_and_the_server_keeps_serving(tmpdir_short):
    """The fake runs one request at a time: tenant b's long request runs (it has its first token),
    tenant a's first waits behind it, so a's second is over a quota of 1 -- while b, whose
    request has started, may still queue one more."""
    with Server(tmpdir_short, "tq", {"step_s": 0.02, "max_running": 1}, tenant_max_waiting=1,
                max_waiting_per_replica=100) as s:
        long = {"model": MODEL, "prompt": "q", "max_tokens": 60, "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=10) as client:
            with client.stream("POST", s.url + "/v1/completions", json={**long, "user": "b"}) as b1:
                assert b1.status_code == 200
                lines = b1.iter_lines()
                assert next(lines).startswith("data: ")    # b1 has its first token
                with client.stream("POST", s.url + "/v1/completions",
                                   json={**long, "user": "a"}) as a1:
                    assert a1.status_code == 200
                    r = client.post(s.url + "/v1/completions", json={**BODY, "user": "a"})
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    err = r.json()["error"]
                    assert err["code"] == "tenant_quota_exceeded" and err["type"] == "rate_limit_error"
                    assert "'a'" in err["message"]
                    n = client.post(s.url + "/v1/completions", json={**BODY, "n": 2, "user": "c"})
                    assert n.status_code == 429    # two choices are two requests
                    with client.stream("POST", s.url + "/v1/completions",
                                       json={**long, "user": "b"}) as b2:
                        assert b2.status_code == 200
                    text = httpx.get(s.url + "/metrics").text
                    assert 'tandem:tenant_requests_rejected_total{reason="tenant_quota",tenant="a"} 1.0' in text
                    assert 'tandem:tenant_requests_waiting{tenant="a"} 1.0' in text
        assert wait_until(lambda: s.pool.num_outstanding == 0, HANG_S)
        assert post(s, user="a").status_code == 200
        text = httpx.get(s.url + "/metrics").text
        assert 'tandem:tenant_requests_waiting{tenant="a"} 0.0' in text


def test_serve_options_reach_the_gateway_and_scheduler_configs():
    from types import SimpleNamespace

    from cluster.cli import _api_keys, build_parser, gateway_config_from_args
    from cluster.spec import apply_overrides
    from engine.config import EngineConfig

    args = build_parser().parse_args([
        "serve", "--api-key", "a=k1", "--api-key", "b=k2", "--api-key", "anon==",
        "--tenant-max-waiting", "3", "--tenant-weights", "a=2,b=1", "--tenant-scheduling", "fcfs"])
    gw = gateway_config_from_args(args, SimpleNamespace(
        model_name=MODEL, scheduler=SimpleNamespace(max_model_len=64)))
    assert gw.api_key == "anon==" and gw.api_keys == (("a", "k1"), ("b", "k2"))
    assert gw.tenant_max_waiting == 3
    assert args.tenant_weights == "a=2,b=1" and args.tenant_scheduling == "fcfs"
    with pytest.raises(SystemExit, match="more than one anonymous"):
        _api_keys(["k1", "k2"])
    dup = build_parser().parse_args(["serve", "--api-key", "a=k1", "--api-key", "a=k2"])
    with pytest.raises(SystemExit, match=r"\['a'\]"):
        gateway_config_from_args(dup, SimpleNamespace(
            model_name=MODEL, scheduler=SimpleNamespace(max_model_len=64)))
    # A deployment spec's replica group may set the weights as a YAML mapping.
    cfg = apply_overrides(EngineConfig(model_dir="unused"), {"tenant_weights": {"b": 1, "a": 2}})
    assert cfg.scheduler.tenant_weights == (("a", 2.0), ("b", 1.0))
    assert EngineConfig.from_dict(cfg.to_dict()).scheduler.tenant_weights == (("a", 2.0), ("b", 1.0))


def test_a_stream_whose_body_never_ran_still_releases_its_tenant_quota():
    """A streaming response whose client is gone before the body starts never runs the body's
    `finally`; `SSEResponse.on_close` ends the request's timer instead, once, and with it the
    tenant's hold on its quota. Without it the tenant would be refused (429) for good."""
    import asyncio

    from gateway.errors import APIError
    from gateway.metrics import GatewayMetrics, RequestTimer
    from starlette.requests import ClientDisconnect

    from gateway.sse import SSEResponse

    tenants = Tenants(GatewayConfig(model_name=MODEL, max_model_len=8, tenant_max_waiting=1))
    metrics = GatewayMetrics()
    tenants.acquire("a", 1)
    with pytest.raises(APIError):
        tenants.acquire("a", 1)    # the quota is held
    timer = RequestTimer(metrics, "r0", 0.0, "a", on_started=lambda: tenants.release("a"))
    ran = []

    async def body():
        ran.append(True)
        yield "data: never\n\n"

    async def gone(message):
        raise OSError("client went away before the headers")

    async def receive():
        return {"type": "http.disconnect"}

    response = SSEResponse(body(), [], on_close=lambda: timer.on_finish(1.0, "abort", 3))
    with pytest.raises((OSError, ClientDisconnect)):   # Starlette reports it as a disconnect
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, gone))
    assert not ran and timer.finished
    timer.on_finish(2.0, "abort", 3)    # a second path ending it counts nothing twice
    tenants.acquire("a", 1)             # released exactly once: one more fits, a second does not
    with pytest.raises(APIError):
        tenants.acquire("a", 1)
    done = metrics.request_success.labels(replica="r0", finished_reason="abort")._value.get()
    assert done == 1
