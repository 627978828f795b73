"""`tandem bench --tenant`: per-tenant arrival streams, keys or `user` fields on the wire, and
the per-tenant report."""
from __future__ import annotations

import asyncio
import tempfile

import pytest

from bench.client import run_load
from bench.report import format_table, summarize
from bench.results import RequestResult, RunResult
from bench.workload import TenantStream, WorkloadConfig, tenant_workload
from tests.test_gateway import Server



@pytest.fixture(scope="module")
def tmpdir_short():
    # ipc paths must be short (108 bytes), so not pytest's deep tmp_path
    with tempfile.TemporaryDirectory(prefix="tt") as d:
        yield d

def test_tenant_streams_parse_and_split_by_rate():
    assert TenantStream.parse("flood=10") == TenantStream("flood", 10.0, None)
    assert TenantStream.parse("a=2.5:sk-a") == TenantStream("a", 2.5, "sk-a")
    for bad, words in (("flood", "name=qps"), ("a=x", "'x'"), ("a=0", "> 0")):
        with pytest.raises(ValueError, match=words):
            TenantStream.parse(bad)
    wl = tenant_workload(WorkloadConfig(num_requests=110, prompt_len=8, output_len=4),
                         [TenantStream("flood", 10.0), TenantStream("quiet", 1.0)])
    tenants = [r.tenant for r in wl]
    assert tenants.count("flood") == 100 and tenants.count("quiet") == 10
    assert [r.arrival_s for r in wl] == sorted(r.arrival_s for r in wl)
    with pytest.raises(ValueError, match="distinct"):
        tenant_workload(WorkloadConfig(), [TenantStream("a", 1.0), TenantStream("a", 2.0)])


def test_per_tenant_report():
    reqs = [RequestResult(0, 4, 2, 0.0, send_s=0.0, ttft_s=0.1, itl_s=[0.01], e2e_s=0.2,
                          output_tokens=2, tenant="a"),
            RequestResult(1, 4, 2, 0.0, send_s=0.0, status=429, error="HTTP 429: quota", tenant="b"),
            RequestResult(2, 4, 2, 0.0, send_s=0.0, ttft_s=0.3, itl_s=[0.02], e2e_s=0.4,
                          output_tokens=2, tenant="b")]
    s = summarize(RunResult("u", "m", reqs, wall_s=2.0, started_at=0.0))
    assert s["tenants"]["a"]["output_token_throughput"] == 1.0
    assert s["tenants"]["b"]["num_429"] == 1 and s["tenants"]["b"]["ttft_s"]["p99"] == 0.3
    table = format_table(s)
    assert "tenant" in table and "300.0" in table
    untagged = [RequestResult(0, 4, 2, 0.0, error="x")]
    assert "tenants" not in summarize(RunResult("u", "m", untagged, 1.0, 0.0))


def test_tenants_go_out_as_keys_or_user_fields(tmpdir_short):
    with Server(tmpdir_short, "bt", api_key="anon", api_keys=(("a", "k1"),)) as s:
        wl = tenant_workload(WorkloadConfig(num_requests=4, prompt_len=4, output_len=2),
                             [TenantStream("a", 50.0, "k1"), TenantStream("bob", 50.0)])
        run = asyncio.run(run_load(wl, s.url, api_key="anon", tenant_keys={"a": "k1"}))
        assert all(r.ok for r in run.requests), [r.error for r in run.requests]
        with s.replica._lock:
            got = sorted(m.tenant for m in s.replica.received)
        assert got == ["a", "a", "bob", "bob"]
