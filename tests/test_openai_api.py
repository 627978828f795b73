"""The OpenAI surface, checked with the official `openai` client against the real `tandem serve`
(gateway + replica processes) on a tiny random Llama with SmolLM2's tokenizer; then a bad-input
suite (each case: the right 4xx and OpenAI error body, and the server still serves) and
cancellation (a client that goes away frees its KV blocks on the replica)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from bench.server import local_server

MODEL = "tiny"
MAX_LEN = 8192


@pytest.fixture(scope="module")
def base(make_tiny_model):
    model_dir = make_tiny_model(max_position_embeddings=MAX_LEN)
    with local_server(["--model", str(model_dir), "--served-model-name", MODEL, "--threads", "1",
                       "--num-kv-blocks", "1024", "--max-model-len", str(MAX_LEN), "--token-budget", "64",
                       "--dtype", "float32", "--no-compile"],
                      quiet=False) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)


GREEDY = dict(model=MODEL, temperature=0, extra_body={"ignore_eos": True})


def complete(client, prompt, **kw):
    return client.completions.create(**{**GREEDY, "prompt": prompt, "max_tokens": 8, **kw})


# ---- completions -----------------------------------------------------------------------------

def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_completion_string_prompt_usage_and_finish_reason(client):
    r = complete(client, "Hello, my name is", max_tokens=6)
    assert r.object == "text_completion" and len(r.choices) == 1 and r.choices[0].index == 0
    assert r.choices[0].finish_reason == "length" and r.choices[0].logprobs is None
    assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + 6
    assert r.choices[0].text


def test_batched_prompts_strings_and_token_ids(client):
    prompts = ["The sky is", "Once upon a time", "2 + 2 ="]
    batched = complete(client, prompts)
    singles = [complete(client, p) for p in prompts]
    assert [c.index for c in batched.choices] == [0, 1, 2]
    assert [c.text for c in batched.choices] == [s.choices[0].text for s in singles]
    assert batched.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    assert batched.usage.completion_tokens == 24

    ids = [[504, 2365, 314], [1, 2, 3, 4]]
    by_ids = complete(client, ids)
    assert [c.text for c in by_ids.choices] == [complete(client, i).choices[0].text for i in ids]
    assert complete(client, ids[0]).usage.prompt_tokens == 3


def test_echo_and_prompt_logprobs(client):
    prompt = "The capital of France is"
    r = complete(client, prompt, echo=True, max_tokens=4, logprobs=2)
    plain = complete(client, prompt, max_tokens=4)
    assert r.choices[0].text == prompt + plain.choices[0].text
    lp = r.choices[0].logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 4 == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens[:n_prompt]) == prompt
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for top in lp.top_logprobs[1:]:
        assert 1 <= len(top) <= 3  # top 2 + the chosen token

    chunks = [c.choices[0] for c in complete(client, prompt, echo=True, max_tokens=4, logprobs=2,
                                              stream=True) if c.choices]
    assert "".join(c.text for c in chunks) == r.choices[0].text
    assert [t for c in chunks for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks for o in c.logprobs.text_offset] == lp.text_offset

    scored = complete(client, prompt, echo=True, max_tokens=0, logprobs=0)
    assert scored.choices[0].text == prompt and scored.usage.completion_tokens == 0
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        lp.token_logprobs[1:n_prompt], abs=1e-5)


def test_logprobs_of_greedy_tokens_are_the_top(client):
    r = complete(client, "Tandem is", max_tokens=8, logprobs=5)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 8 and "".join(lp.tokens) == r.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 5
        assert chosen == pytest.approx(max(top.values()))


def test_stream_with_usage_and_n(client):
    chunks = list(client.completions.create(
        **GREEDY, prompt="Streaming works", max_tokens=5, n=2, stream=True,
        stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks[:-1]:
        assert c.usage is None
        for ch in c.choices:
            texts[ch.index] += ch.text
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert finishes == {0: "length", 1: "length"}
    assert texts[0] == texts[1] == complete(client, "Streaming works", max_tokens=5).choices[0].text
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 10
    assert last.usage.prompt_tokens == complete(client, "Streaming works").usage.prompt_tokens


def test_n_greedy_identical_and_seeded_reproducible(client):
    r = complete(client, "Pick a word:", n=2)
    assert r.choices[0].text == r.choices[1].text and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens == 16
    sampled = dict(model=MODEL, prompt="Pick a word:", max_tokens=8, n=3, temperature=1.0, seed=42,
                   extra_body={"ignore_eos": True})
    a = client.completions.create(**sampled)
    b = client.completions.create(**sampled)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seeds 42, 43, 44 differ
    one = client.completions.create(**{**sampled, "n": 1, "seed": 43})
    assert one.choices[0].text == a.choices[1].text  # choice i uses seed + i


def test_stop_strings(client):
    full = complete(client, "Count with me:", max_tokens=16).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    assert stop.strip(), full
    r = complete(client, "Count with me:", max_tokens=16, stop=[stop, "\x00never"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == full[:full.index(stop)]
    r = complete(client, "Count with me:", max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].text for c in r if c.choices) == full[:full.index(stop)]


def test_sampling_extensions_reduce_to_greedy(client):
    greedy = complete(client, "Extensions:", max_tokens=8).choices[0].text
    for extra in [{"top_k": 1}, {"min_p": 1.0}]:
        r = client.completions.create(model=MODEL, prompt="Extensions:", max_tokens=8,
                                      temperature=1.0, extra_body={"ignore_eos": True, **extra})
        assert r.choices[0].text == greedy, extra
    r = client.completions.create(model=MODEL, prompt="Extensions:", max_tokens=8, top_p=1e-6,
                                  temperature=1.0, user="tester", extra_body={"ignore_eos": True})
    assert r.choices[0].text == greedy


def _tokens(client, **kw):
    r = complete(client, "one two three four five six", **{"max_tokens": 128, "logprobs": 0, **kw})
    return r.choices[0].logprobs.tokens


def test_penalties_change_outputs_in_the_expected_direction(client):
    prompt_tokens = set(_tokens(client, echo=True, max_tokens=0))
    plain = _tokens(client)
    assert len(set(plain)) < len(plain), "precondition: unpenalised greedy output repeats"
    # Negative frequency penalty rewards repeats: greedy locks onto one token.
    assert len(set(_tokens(client, frequency_penalty=-2.0)[-32:])) == 1
    # Positive presence / frequency / repetition penalties remove the repeats (the tiny model's
    # logits span < 2, so one occurrence is enough to push a token out of reach).
    for kw in [{"presence_penalty": 2.0}, {"frequency_penalty": 2.0},
               {"extra_body": {"ignore_eos": True, "repetition_penalty": 10.0}}]:
        out = _tokens(client, **kw)
        assert len(set(out)) == len(out), kw
        assert not set(out) & prompt_tokens


# ---- chat ------------------------------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


def test_chat_logprobs_n_and_max_completion_tokens(client):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                       max_completion_tokens=5, logprobs=True, top_logprobs=3,
                                       n=2, extra_body={"ignore_eos": True})
    assert r.object == "chat.completion" and [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].message.content == r.choices[1].message.content
    assert r.usage.completion_tokens == 10
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    assert "".join(t.token for t in content) == r.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob == pytest.approx(t.top_logprobs[0].logprob)
        assert bytes(t.bytes).decode("utf-8", "replace") == t.token
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           max_tokens=5, extra_body={"ignore_eos": True})
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == r.choices[0].message.content


def test_chat_stream_with_usage_and_logprobs(client):
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=4, stream=True,
        logprobs=True, top_logprobs=1, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    n_lp = sum(len(c.choices[0].logprobs.content) for c in chunks
               if c.choices and c.choices[0].logprobs)
    assert n_lp == 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 4 and chunks[-1].choices == []
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                          max_tokens=4, extra_body={"ignore_eos": True})
    assert text == full.choices[0].message.content


# ---- bad inputs: the right 4xx, the OpenAI body, and the server keeps serving -----------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_C = {"model": MODEL, "prompt": "ok", "max_tokens": 2}
OK_CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
BAD = [  # (path, body patch, status, param, needle in message)
    (C, {"temperature": -1}, 400, "temperature", "-1"),
    (C, {"temperature": 2.5}, 400, "temperature", "2.5"),
    (C, {"temperature": "hot"}, 400, "temperature", "hot"),
    (C, {"top_p": 0}, 400, "top_p", "0"),
    (C, {"top_k": -2}, 400, "top_k", "-2"),
    (C, {"min_p": 1.5}, 400, "min_p", "1.5"),
    (C, {"presence_penalty": 2.5}, 400, "presence_penalty", "2.5"),
    (C, {"frequency_penalty": -3}, 400, "frequency_penalty", "-3"),
    (C, {"repetition_penalty": 0}, 400, "repetition_penalty", "0"),
    (C, {"max_tokens": 0}, 400, "max_tokens", "echo"),
    (C, {"max_tokens": "10"}, 400, "max_tokens", '"10"'),
    (C, {"max_tokens": True}, 400, "max_tokens", "true"),
    (C, {"n": 0}, 400, "n", "0"),
    (C, {"n": 17}, 400, "n", "17"),
    (C, {"n": 16, "prompt": ["a"] * 8}, 400, "n", "128"),
    (C, {"logprobs": 6}, 400, "logprobs", "6"),
    (C, {"seed": 2**64}, 400, "seed", str(2**64)),
    (C, {"stop": ["s"] * 9}, 400, "stop", "9"),
    (C, {"stop": "x" * 300}, 400, "stop", "300"),
    (C, {"stop": [""]}, 400, "stop", "non-empty"),
    (C, {"prompt": ""}, 400, "prompt", "empty"),
    (C, {"prompt": []}, 400, "prompt", "empty"),
    (C, {"prompt": [[]]}, 400, "prompt", "empty"),
    (C, {"prompt": 123}, 400, "prompt", "123"),
    (C, {"prompt": [49152]}, 400, "prompt", "49152"),
    (C, {"prompt": [-1]}, 400, "prompt", "-1"),
    (C, {"prompt": ["a"] * 33}, 400, "prompt", "33"),
    (C, {"prompt": "word " * 9000}, 400, "prompt", "maximum context length is 8192"),
    (C, {"max_tokens": 9000}, 400, "prompt", "9001"),
    (C, {"model": "gpt-5"}, 404, "model", "gpt-5"),
    (C, {"echo": "yes"}, 400, "echo", "yes"),
    (C, {"user": "u" * 300}, 400, "user", "256"),
    (C, {"logit_bias": {"5": 1}}, 400, "logit_bias", "not supported"),
    (C, {"best_of": 3}, 400, "best_of", "best_of"),
    (CHAT, {"messages": []}, 400, "messages", "at least 1"),
    (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages.0.role", "robot"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages.0.content.0.type", "image_url"),
    (CHAT, {"top_logprobs": 3}, 400, "top_logprobs", "logprobs=true"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, 400, "top_logprobs", "21"),
    (CHAT, {"max_completion_tokens": 9000}, 400, "messages", "maximum context length"),
    (CHAT, {"model": "nope"}, 404, "model", "nope"),
]


def _assert_error(r: httpx.Response, status: int, param: str | None, needle: str) -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"], err


@pytest.mark.parametrize("path,patch,status,param,needle", BAD,
                         ids=[f"{'chat' if p == CHAT else 'cmpl'}-{str(b)[:40]}" for p, b, *_ in BAD])
def test_bad_inputs(base, path, patch, status, param, needle):
    body = {**(OK_C if path == C else OK_CHAT), **patch}
    _assert_error(httpx.post(base + path, json=body, timeout=10), status, param, needle)
    r = httpx.post(base + C, json={**OK_C, "max_tokens": 1}, timeout=10)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


def test_bad_bodies_and_methods(base):
    def post(content: bytes, **headers):
        return httpx.post(base + C, content=content, timeout=10,
                          headers={"content-type": "application/json", **headers})

    r = post(b'{"model": ')
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    assert post(b"[1, 2]").status_code == 400
    assert post(b'"just a string"').status_code == 400
    r = post(b'{"model": "tiny", "prompt": "' + b"a" * (5 * 2**20) + b'"}')
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.get(base + C, timeout=10)
    assert r.status_code == 405 and "message" in r.json()["error"]
    r = httpx.get(base + "/v1/nothing", timeout=10)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert httpx.post(base + C, json=OK_C, timeout=10).status_code == 200


# ---- cancellation: a client that goes away frees its blocks ----------------------------------

def _replica(base) -> dict:
    return next(iter(httpx.get(base + "/health", timeout=5).json()["replicas"].values()))


def _wait_idle(base, timeout: float = 30.0) -> dict:   # returns as soon as idle
    deadline = time.monotonic() + timeout
    while True:
        rep = _replica(base)
        if rep["kv_cache_usage"] == 0 and rep["num_running"] == 0 and rep["outstanding"] == 0:
            return rep
        assert time.monotonic() < deadline, f"replica not idle after {timeout}s: {rep}"
        time.sleep(0.05)


def _aborts(base) -> float:
    for line in httpx.get(base + "/metrics", timeout=5).text.splitlines():
        if line.startswith("tandem:request_success_total") and 'finished_reason="abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


LONG = {"model": MODEL, "prompt": "Tell me everything.", "max_tokens": 8000, "temperature": 0,
        "ignore_eos": True}


def test_stream_disconnect_frees_blocks(base):
    _wait_idle(base)
    aborts = _aborts(base)
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", base + C, json={**LONG, "stream": True}) as r:
            assert r.status_code == 200
            lines = (line for line in r.iter_lines() if line.startswith("data: {"))
            got = [json.loads(next(lines)[6:]) for _ in range(10)]
            assert all(c["choices"][0]["finish_reason"] is None for c in got)
            busy = _replica(base)
            assert busy["kv_cache_usage"] > 0 and busy["num_running"] == 1
    free = _wait_idle(base)
    assert free["num_free_blocks"] == free["num_blocks"]
    assert _aborts(base) == aborts + 1


def test_non_stream_client_timeout_frees_blocks(base):
    _wait_idle(base)
    aborts = _aborts(base)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base + C, json=LONG, timeout=1.0)
    _wait_idle(base)
    assert _aborts(base) == aborts + 1
