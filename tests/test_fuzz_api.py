"""Fuzz the gateway's own OpenAPI schema with schemathesis (valid and invalid bodies, bounded in
examples) against the real app + a fake replica: no request may get a 5xx."""
from __future__ import annotations

import tempfile

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402

from tests.test_gateway import MODEL, Server  # noqa: E402

MAX_EXAMPLES = 50


@pytest.fixture(scope="module")
def fuzz_server():
    with tempfile.TemporaryDirectory(prefix="tf") as tmp:
        # error_token_id=-1: the fake never fails on purpose, so any 5xx is the gateway's.
        with Server(tmp, "fuzz", {"step_s": 0.001, "error_token_id": -1}) as s:
            yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.url + "/openapi.json", timeout=10)


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_server_errors(api_schema, fuzz_server, mode):
    """Every operation of the schema, MAX_EXAMPLES generated requests each (schemathesis'
    lazy pytest loader does not run on this pytest, so hypothesis drives the strategies)."""
    from schemathesis.generation.modes import GenerationMode

    seen: dict[str, set[int]] = {}
    for result in api_schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(GenerationMode(mode)))
        def check(case) -> None:
            if mode == "positive" and isinstance(case.body, dict) and "model" in case.body:
                case.body["model"] = MODEL  # else nearly every case stops at the 404
            response = case.call(base_url=fuzz_server.url, timeout=10)
            seen.setdefault(operation.label, set()).add(response.status_code)
            assert response.status_code < 500, (response.status_code, response.text[:500],
                                                case.as_curl_command())
            if response.status_code >= 400:
                err = response.json()["error"]
                assert set(err) == {"message", "type", "param", "code"} and err["message"]

        try:
            check()
        except Unsatisfiable:  # nothing invalid to send (an operation without inputs)
            assert mode == "negative" and operation.method.upper() == "GET", operation.label
    print(f"\nfuzz ({mode}) status codes per operation: {seen}")
    assert {"POST /v1/completions", "POST /v1/chat/completions"} <= set(seen)
