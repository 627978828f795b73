"""Prefill/decode disaggregation end to end: real gateway, prefill and decode processes, KV over
ZeroMQ. Greedy outputs must equal a colocated replica token for token, with the same logprobs
(top alternatives included, within fp32 noise), raw and lz4, for prompts above and below the
offload threshold, several in flight, every offloaded prompt through a real transfer; a
deliberately wrong but well-formed handoff must make that comparison fail (negative control);
int8/fp8 move every offloaded prompt and are accounted under the codec the frames carried; faults
(corrupt or lost frames, a stalled prefill replica; a killed one is in test_replica_failure.py)
end in a local recompute with the same tokens, no leaked blocks, and a gateway that keeps
serving."""
from __future__ import annotations

import concurrent.futures as cf
import re
import time
from dataclasses import dataclass

import httpx
import pytest

from bench.server import local_server
from prefill_node.server import FAULT_ENV, PREFILL_SUFFIX

THRESHOLD = 48
PROMPT_LENS = (12, 30, 60, 150, 400, 90)   # both sides of the threshold
OFFLOADED = sum(n > THRESHOLD for n in PROMPT_LENS)
NEW_TOKENS = 10
TOP_LOGPROBS = 5      # alternatives per token (the completions API's maximum)
LOGPROB_ATOL = 1e-4
"""fp32: PD and colocated chunk and batch differently, so sums differ in the last bits (measured:
<= 1e-6). 1e-3 would let int8-quantized KV pass (it moves logprobs of the tiny random model by
3e-4..8e-4, whose distributions are near uniform)."""
LOSSY_FIRST_ATOL = 5e-3
"""int8/fp8: the first generated token's logprobs move by at most ~1.2e-3 (measured); KV scrambled
in transit moves them by 1e-2..5e-2."""


def base_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", "tiny", "--threads", "1",
            "--num-kv-blocks", "512", "--max-model-len", "1024", "--token-budget", "32",
            "--dtype", "float32", "--no-compile"]


def pd_args(model_dir, codec="raw", timeout=10.0) -> list[str]:
    return [*base_args(model_dir), "--prefill-replicas", "1", "--decode-replicas", "1",
            "--offload-threshold", str(THRESHOLD), "--kv-codec", codec, "--kv-timeout", str(timeout)]


def prompts() -> list[list[int]]:
    return [[(97 * i + 13 * j) % 40000 + 100 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]


@dataclass(eq=False)
class Completion:
    """A greedy completion as the API returns it: its tokens, each one's logprob and the logprobs
    of its top alternatives (highest first). `==` is parity: the same tokens exactly, every
    logprob within LOGPROB_ATOL (`mismatch` says where not)."""

    tokens: list[str]
    logprobs: list[float]
    top: list[list[float]]

    def mismatch(self, other: "Completion") -> str | None:
        if self.tokens != other.tokens:
            return f"tokens {self.tokens} != {other.tokens}"
        for i, (a, b, top_a, top_b) in enumerate(zip(self.logprobs, other.logprobs, self.top, other.top)):
            if (abs(a - b) > LOGPROB_ATOL or len(top_a) != len(top_b)
                    or any(abs(x - y) > LOGPROB_ATOL for x, y in zip(top_a, top_b))):
                return f"token {i} {self.tokens[i]!r}: logprob {a:.6f} vs {b:.6f}, top {top_a} vs {top_b}"
        return None

    def __eq__(self, other: object) -> bool:
        return self.mismatch(other) is None if isinstance(other, Completion) else NotImplemented


def complete(url: str, prompt: list[int]) -> Completion:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "ignore_eos": True, "logprobs": TOP_LOGPROBS})
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS
    return Completion(lp["tokens"], lp["token_logprobs"],
                      [sorted(alts.values(), reverse=True) for alts in lp["top_logprobs"]])


def assert_parity(got: list[Completion], want: list[Completion], which=None) -> None:
    for i in range(len(PROMPT_LENS)) if which is None else which:
        problem = got[i].mismatch(want[i])
        assert problem is None, f"prompt {i} ({PROMPT_LENS[i]} tokens) differs from colocated: {problem}"


def run_all(url: str) -> list[Completion]:
    """Every prompt in flight at once, the long ones sent first: the short ones follow once the
    gateway has placed (and so sent, in order, over its one socket to the replica) all the long
    ones. An offloaded prompt reaching the decode replica while another request waits there is
    prefilled locally instead (FCFS: it may not reserve blocks ahead of the queue); this order
    keeps the decode queue empty when the long prompts arrive, so each really goes by a transfer."""
    todo = prompts()
    longs = [i for i, n in enumerate(PROMPT_LENS) if n > THRESHOLD]
    placed = sum(health(url)["routing"].values())
    with cf.ThreadPoolExecutor(len(PROMPT_LENS)) as pool:
        futures = {i: pool.submit(complete, url, todo[i]) for i in longs}
        deadline = time.monotonic() + 30
        while sum(health(url)["routing"].values()) < placed + len(longs):
            assert time.monotonic() < deadline, "the gateway did not place the long prompts"
            time.sleep(0.01)
        futures.update({i: pool.submit(complete, url, p) for i, p in enumerate(todo) if i not in futures})
        return [futures[i].result() for i in range(len(todo))]


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def wait_idle(url: str, timeout: float = 20.0) -> dict:
    """Every live replica back to all blocks free (nothing leaked on either side)."""
    deadline = time.monotonic() + timeout
    while True:
        h = health(url)
        live = [r for r in h["replicas"].values() if r["healthy"]]
        if all(r["num_free_blocks"] == r["num_blocks"] and r["num_running"] == 0 for r in live):
            return h
        assert time.monotonic() < deadline, f"blocks not returned: {h['replicas']}"
        time.sleep(0.2)


def metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and not line.startswith("#"))


def kv_stats(url: str) -> dict:
    """The KV handoffs the decode replicas reported, from /metrics: transfers done (the latency
    histogram's count), failures, fallbacks, and wire/raw bytes by codec label."""
    stats = {"transfers": 0.0, "failures": 0.0, "fallbacks": 0.0, "bytes": {}, "raw_bytes": {}}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, labels = head.partition("{")
        codec = dict(re.findall(r'(\w+)="([^"]*)"', labels)).get("codec")
        if name == "tandem:kv_transfer_latency_seconds_count":
            stats["transfers"] += float(value)
        elif name == "tandem:kv_transfer_failures_total":
            stats["failures"] += float(value)
        elif name == "tandem:kv_fallbacks_total":
            stats["fallbacks"] += float(value)
        elif name == "tandem:kv_transfer_bytes_total":
            stats["bytes"][codec] = stats["bytes"].get(codec, 0.0) + float(value)
        elif name == "tandem:kv_transfer_raw_bytes_total":
            stats["raw_bytes"][codec] = stats["raw_bytes"].get(codec, 0.0) + float(value)
    return stats


def assert_all_transferred(url: str, codec: str) -> dict:
    """Every offloaded prompt's KV came by a completed transfer -- none failed, none fell back to
    a local prefill -- and all bytes are accounted under `codec`, the label of the frames' codec."""
    h = wait_idle(url)
    assert h["routing"].get("offload", 0) == OFFLOADED, h["routing"]
    kv = kv_stats(url)
    assert kv["transfers"] == OFFLOADED and kv["failures"] == 0 and kv["fallbacks"] == 0, kv
    assert set(kv["bytes"]) == set(kv["raw_bytes"]) == {codec} and kv["bytes"][codec] > 0, kv
    return kv


@pytest.fixture(scope="module")
def colocated(tiny_model_dir):
    with local_server(base_args(tiny_model_dir)) as srv:
        return run_all(srv.url)


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_pd_equals_colocated_token_for_token(tiny_model_dir, colocated, codec):
    """Lossless codecs: the same tokens and logprobs as colocated, every long prompt's KV moved."""
    with local_server(pd_args(tiny_model_dir, codec)) as srv:
        assert_parity(run_all(srv.url), colocated)
        assert_all_transferred(srv.url, codec)
        assert health(srv.url)["routing"].get("local_short", 0) == sum(n <= THRESHOLD for n in PROMPT_LENS)


def test_parity_check_catches_a_wrong_handoff(tiny_model_dir, colocated, monkeypatch):
    """Negative control of the test above: KV scrambled in transit and encoded again (FaultyTransport
    `scramble`: well formed, fresh checksums) passes every transport check, so every long prompt
    completes through a transfer with no fallback -- and the parity comparison must then fail for
    exactly those prompts (the short ones, prefilled on the decode replica, still match)."""
    monkeypatch.setenv(FAULT_ENV, "scramble")
    with local_server([*pd_args(tiny_model_dir), "--idle-token-budget", "0"]) as srv:
        got = run_all(srv.url)
        assert_all_transferred(srv.url, "raw")
    for i, n in enumerate(PROMPT_LENS):
        problem = got[i].mismatch(colocated[i])
        if n > THRESHOLD:
            assert problem is not None, f"prompt {i} ({n} tokens): scrambled KV went unnoticed"
        else:
            assert problem is None, f"prompt {i} ({n} tokens, not offloaded): {problem}"


def test_pd_over_torch_distributed_gloo(tiny_model_dir, colocated):
    """The same handoff over torch.distributed point-to-point (Gloo here, NCCL on GPUs): the same
    tokens and logprobs, and every long prompt really went over it (no failure, no fallback)."""
    with local_server([*pd_args(tiny_model_dir), "--kv-transport", "torch"]) as srv:
        assert_parity(run_all(srv.url), colocated)
        assert_all_transferred(srv.url, "raw")


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_pd_lossy_codecs_transfer_every_prompt(tiny_model_dir, colocated, codec):
    """Lossy codecs end to end: every long prompt completes through a real transfer (no failure,
    no fallback), its bytes are labelled by the codec the frames carried, and the wire holds the
    quantized KV (about a quarter of the fp32 bytes). Quantization may move tokens, so only the
    prompts prefilled on the decode replica itself must match colocated exactly; the long ones'
    first token, computed from the transferred KV, must stay close."""
    with local_server(pd_args(tiny_model_dir, codec)) as srv:
        got = run_all(srv.url)          # each completes with NEW_TOKENS tokens
        kv = assert_all_transferred(srv.url, codec)
    assert kv["bytes"][codec] < 0.35 * kv["raw_bytes"][codec], kv
    assert_parity(got, colocated, [i for i, n in enumerate(PROMPT_LENS) if n <= THRESHOLD])
    for i in (i for i, n in enumerate(PROMPT_LENS) if n > THRESHOLD):
        # The first token is computed from the transferred KV alone: close, if not exact.
        first, want = [got[i].logprobs[0], *got[i].top[0]], [colocated[i].logprobs[0], *colocated[i].top[0]]
        assert max(abs(a - b) for a, b in zip(first, want)) < LOSSY_FIRST_ATOL, (i, first, want)


@pytest.mark.parametrize("fault, reason", [("corrupt:2", "checksum"), ("drop:2", "sequence"),
                                           ("stall:4", "timeout")])
def test_transfer_faults_fall_back_to_recompute(tiny_model_dir, colocated, fault, reason, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, fault)
    # Chunks of --token-budget even on an idle prefill replica: the prompt's KV goes out over
    # several frames, so the fault hits one in the middle of a transfer.
    args = [*pd_args(tiny_model_dir, "raw", timeout=1.5), "--idle-token-budget", "0"]
    with local_server(args) as srv:
        long_prompt = prompts()[4]
        assert complete(srv.url, long_prompt) == colocated[4]
        assert metric(srv.url, "tandem:kv_fallbacks_total") >= 1
        assert metric(srv.url, f'tandem:kv_transfer_failures_total{{reason="{reason}"') >= 1
        wait_idle(srv.url)
        assert complete(srv.url, prompts()[0]) == colocated[0]   # still serving


@pytest.mark.slow
def test_pd_equals_colocated_on_smollm2(smollm2_dir):
    """The real model in fp32: greedy outputs through a prefill -> decode handoff are the
    colocated ones, for chat prompts on both sides of the threshold, several in flight."""
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    texts = ["What is 2 + 2?", "Name three colours.",
             "Summarise in one sentence: " + "Stall-free batching admits decodes first. " * 12,
             "Write a haiku about the sea, then explain it: " + "waves and salt and wind. " * 10]
    chats = [tok.encode_chat([{"role": "user", "content": t}]) for t in texts]
    args = ["--served-model-name", "tiny", "--threads", "1", "--num-kv-blocks", "512",
            "--max-model-len", "1024", "--token-budget", "32", "--dtype", "float32", "--no-compile"]

    def run(url):
        with cf.ThreadPoolExecutor(len(chats)) as pool:
            return list(pool.map(lambda p: complete(url, p), chats))

    with local_server(args) as srv:
        colocated_out = run(srv.url)
    with local_server([*args, "--prefill-replicas", "1", "--decode-replicas", "1",
                       "--offload-threshold", "64", "--kv-codec", "raw"]) as srv:
        assert run(srv.url) == colocated_out
        assert health(srv.url)["routing"].get("offload", 0) == sum(len(c) > 64 for c in chats) >= 2


def test_failed_prefill_step_aborts_its_pushes(tiny_model_dir, tmp_path):
    """In process: after a step fails on a prefill node, the decode side is told at once (abort),
    and the next loop turn pushes nothing from the freed blocks (it used to raise there, failing
    every following step until the sender timed out)."""
    from engine import protocol
    from engine.config import EngineConfig
    from kv_transfer import KVSender
    from kv_transfer.config import KVConfig
    from kv_transfer.transport import FakeTransport
    from prefill_node.server import PrefillServer
    from scheduler.config import SchedulerConfig
    from scheduler.request import SamplingParams

    cfg = EngineConfig(model_dir=str(tiny_model_dir), dtype="float32", num_kv_blocks=64, scheduler=SchedulerConfig(
        token_budget=32, idle_token_budget=0, max_num_seqs=8, max_model_len=512))
    server = PrefillServer("prefill-t", cfg, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out", KVConfig())
    try:
        sender = KVSender(FakeTransport.pair()[0], background=False)
        server._senders["decode-t"] = sender
        target = {"transfer_id": "t1", "request_id": "r1", "dst_block_ids": list(range(7)),
                  "kv_addr": "decode-t", "decode_replica": "decode-t"}
        server.handle_add(protocol.AddRequest("r1" + PREFILL_SUFFIX, list(range(100, 200)),
                                              SamplingParams(max_tokens=1), time.time(), kv_target=target))
        server.before_step()
        server.engine.step()
        server.after_step()                          # the first 32-token chunk went out
        failed = server._fail_all("replica step failed: injected")
        assert [o.finish_reason for o in failed] == ["error"]
        assert [(e.transfer_id, e.reason) for e in sender.poll()] == [("t1", "abort")]
        server.before_step()
        server.after_step()                          # nothing left to push, nothing raised
        assert server.engine.scheduler.block_manager.num_free_blocks == server.engine.runner.num_blocks
    finally:
        server.close()


def test_failed_decode_step_cancels_pending_transfers(tiny_model_dir, tmp_path):
    """In process: a failed step on a decode node ends its remote-prefill requests through the
    node's abort: the transfer writing into their blocks is cancelled and the prefill replica told,
    so a late "done" is dropped instead of reaching a request that no longer exists."""
    import zmq

    from decode_node.server import DecodeServer
    from engine import protocol
    from engine.config import EngineConfig
    from kv_transfer import KVSender
    from kv_transfer.config import KVConfig
    from kv_transfer.transport import make_transport
    from scheduler.config import SchedulerConfig
    from scheduler.request import SamplingParams

    cfg = EngineConfig(model_dir=str(tiny_model_dir), dtype="float32", num_kv_blocks=64, scheduler=SchedulerConfig(
        token_budget=32, max_num_seqs=8, max_model_len=512))
    server = DecodeServer("decode-t", cfg, f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out",
                          KVConfig(kv_addr=f"ipc://{tmp_path}/kv"))
    prefill_inbox = server.ctx.socket(zmq.PULL)
    prefill_inbox.bind(f"ipc://{tmp_path}/prefill")
    sender = KVSender(make_transport("zmq", "sender", address=server.kv_addr), background=False)
    try:
        prompt = list(range(100, 200))
        server.handle_add(protocol.AddRequest(
            "r1", prompt, SamplingParams(max_tokens=4), time.time(),
            remote_prefill={"transfer_id": "t1", "prefill_addr": f"ipc://{tmp_path}/prefill",
                            "prefill_replica": "prefill-0"}))
        assert prefill_inbox.poll(5000), "the prefill replica was not asked"
        asked = protocol.decode(prefill_inbox.recv())
        failed = server._fail_all("replica step failed: injected")
        assert [(o.request_id, o.finish_reason) for o in failed] == [("r1", "error")]
        assert prefill_inbox.poll(5000)
        told = protocol.decode(prefill_inbox.recv())
        assert isinstance(told, protocol.AbortRequests) and told.request_ids == [asked.request_id]
        # The prefill side's KV arrives anyway: it is dropped, not written into freed blocks.
        target = asked.kv_target
        sender.send_chunk("t1", "r1", server.engine.runner.kv_caches, target["dst_block_ids"],
                          target["dst_block_ids"], 0, len(prompt))
        sender.send_done("t1", "r1", 7, len(prompt))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            assert server.before_step() == []
            time.sleep(0.05)
        assert server.engine.scheduler.block_manager.num_free_blocks == server.engine.runner.num_blocks
    finally:
        sender.close()
        prefill_inbox.close(linger=0)
        server.close()
