"""End to end: `tandem serve` as real processes (gateway + replica), HTTP on loopback, then stop."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import pytest

from bench.server import local_server


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    with local_server(["--model", str(tiny_model_dir), "--served-model-name", "tiny", "--threads", "1",
                       "--num-kv-blocks", "256", "--max-model-len", "512", "--token-budget", "32"],
                      quiet=False) as srv:
        yield srv.url, srv.proc


def test_streams_a_completion_over_http(server):
    base, _ = server
    body = {"model": "tiny", "prompt": "Hello, my name is", "max_tokens": 12,
            "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    events = []
    with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text_chunks = [c for c in chunks if c["choices"]]
    assert len(text_chunks) >= 2, "tokens did not stream one by one"
    assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
    usage = [c["usage"] for c in chunks if c.get("usage")][-1]
    assert usage["completion_tokens"] == 12

    # The same request without streaming gives the same greedy text.
    full = httpx.post(f"{base}/v1/completions", json={**body, "stream": False}, timeout=60).json()
    assert full["choices"][0]["text"] == "".join(c["choices"][0]["text"] for c in text_chunks)


def test_usage_prompt_tokens_match_hf_tokenizer(server, tiny_model_dir):
    from transformers import AutoTokenizer

    base, _ = server
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "Tandem serves 12345 tokens — fast! 🚀"
    r = httpx.post(f"{base}/v1/completions", timeout=60,
                   json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok(prompt)["input_ids"])

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"}]
    r = httpx.post(f"{base}/v1/chat/completions", timeout=60,
                   json={"model": "tiny", "messages": messages, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if not isinstance(expected, list):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert r.json()["usage"]["prompt_tokens"] == len(expected)


def test_concurrent_requests_and_clean_errors(server):
    base, _ = server
    import concurrent.futures as cf

    def one(i):
        return httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "word " * (10 + 40 * i), "max_tokens": 8,
            "temperature": 0.8, "seed": i, "ignore_eos": True}).json()

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    assert all(r["usage"]["completion_tokens"] == 8 for r in results)

    bad = httpx.post(f"{base}/v1/completions", timeout=10,
                     json={"model": "tiny", "prompt": "x", "temperature": -1})
    assert bad.status_code == 400 and "temperature" in bad.json()["error"]["message"]
    long = httpx.post(f"{base}/v1/completions", timeout=10,
                      json={"model": "tiny", "prompt": "word " * 600, "max_tokens": 4})
    assert long.status_code == 400 and "512" in long.json()["error"]["message"]
    assert httpx.get(f"{base}/health", timeout=5).status_code == 200
    metrics = httpx.get(f"{base}/metrics", timeout=5).text
    assert "tandem:time_to_first_token_seconds" in metrics


def test_stops_cleanly(server):
    base, proc = server
    children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert children, "the replica should be a child process"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(30) is not None
    deadline = time.monotonic() + 15
    while any(os.path.exists(f"/proc/{c}") and open(f"/proc/{c}/stat").read().split()[2] != "Z"
              for c in children):
        assert time.monotonic() < deadline, "replica process outlived the server"
        time.sleep(0.2)
