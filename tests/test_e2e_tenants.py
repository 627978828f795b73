"""End to end with two tenants: `tandem serve` as real processes (gateway + a tiny random Llama
replica), named API keys, one tenant flooding. With fair share the quiet tenant's request jumps
the flood's backlog; with `--tenant-scheduling fcfs` it waits behind all of it. Completion order
is asserted, not wall-clock time."""
from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from bench.server import local_server

FLOOD = 10


@pytest.fixture(scope="module", params=["fair", "fcfs"])
def server(request, tiny_model_dir):
    with local_server(["--model", str(tiny_model_dir), "--served-model-name", "tiny",
                       "--threads", "1", "--num-kv-blocks", "256", "--max-model-len", "512",
                       "--token-budget", "32", "--max-num-seqs", "1",
                       "--api-key", "flood=k-flood", "--api-key", "quiet=k-quiet",
                       "--tenant-weights", "flood=2,quiet=1",
                       "--tenant-scheduling", request.param]) as srv:
        yield srv.url, request.param


async def _complete(http: httpx.AsyncClient, url: str, key: str, done: list, tag: str,
                    max_tokens: int = 24) -> None:
    r = await http.post(url + "/v1/completions", headers={"Authorization": f"Bearer {key}"},
                        json={"model": "tiny", "prompt": "Once upon a time",
                              "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    done.append(tag)


async def _scenario(url: str) -> list[str]:
    done: list[str] = []
    async with httpx.AsyncClient(timeout=120) as http:
        # Long enough that the tiny model cannot drain the flood before its backlog is seen.
        flood = [asyncio.ensure_future(_complete(http, url, "k-flood", done, f"flood{i}", 240))
                 for i in range(FLOOD)]
        deadline = time.monotonic() + 60
        while True:   # the flood's backlog is queued on the replica before the quiet one comes
            health = (await http.get(url + "/health")).json()
            if sum(r["num_waiting"] for r in health["replicas"].values()) >= FLOOD - 3:
                break
            assert time.monotonic() < deadline, f"the flood never queued: {health}"
            await asyncio.sleep(0.05)
        await _complete(http, url, "k-quiet", done, "quiet")
        await asyncio.gather(*flood)
    return done


def test_the_quiet_tenant_jumps_the_flood_only_with_fair_share(server):
    url, mode = server
    bad = httpx.post(url + "/v1/completions", headers={"Authorization": "Bearer nope"},
                     json={"model": "tiny", "prompt": "x", "max_tokens": 1}, timeout=30)
    assert bad.status_code == 401
    done = asyncio.run(_scenario(url))
    position = done.index("quiet")
    if mode == "fair":   # behind at most the running request and the flood's head
        assert position <= 3, done
    else:                # behind every flood request already queued
        assert position >= FLOOD - 3, done
    metrics = httpx.get(url + "/metrics", timeout=30).text
    for tenant in ("flood", "quiet"):
        assert f'tandem:tenant_time_to_first_token_seconds_count{{tenant="{tenant}"}}' in metrics
    assert 'tandem:tenant_generation_tokens_total{tenant="quiet"} 24.0' in metrics
