"""Prefill/decode disaggregation end to end: real gateway, prefill and decode processes, KV over
ZeroMQ. Greedy outputs must equal a colocated replica token for token (raw and lz4), for prompts
above and below the offload threshold, several in flight; faults (corrupt or lost frames, a
stalled or killed prefill replica) end in a local recompute with the same tokens, no leaked
blocks, and a gateway that keeps serving."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import time

import httpx
import pytest

from bench.server import local_server
from prefill_node.server import FAULT_ENV, PREFILL_SUFFIX

THRESHOLD = 48
PROMPT_LENS = (12, 30, 60, 150, 400, 90)   # both sides of the threshold
NEW_TOKENS = 10


def base_args(model_dir) -> list[str]:
    return ["--model", str(model_dir), "--served-model-name", "tiny", "--threads", "1",
            "--num-kv-blocks", "512", "--max-model-len", "1024", "--token-budget", "32",
            "--dtype", "float32", "--no-compile"]


def pd_args(model_dir, codec="raw", timeout=10.0) -> list[str]:
    return [*base_args(model_dir), "--prefill-replicas", "1", "--decode-replicas", "1",
            "--offload-threshold", str(THRESHOLD), "--kv-codec", codec, "--kv-timeout", str(timeout)]


def prompts() -> list[list[int]]:
    return [[(97 * i + 13 * j) % 40000 + 100 for j in range(n)] for i, n in enumerate(PROMPT_LENS)]


def complete(url: str, prompt: list[int]) -> list[str]:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "model": "tiny", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
        "ignore_eos": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert r.json()["usage"]["completion_tokens"] == NEW_TOKENS
    return choice["logprobs"]["tokens"]


def run_all(url: str) -> list[list[str]]:
    with cf.ThreadPoolExecutor(len(PROMPT_LENS)) as pool:   # several in flight at once
        return list(pool.map(lambda p: complete(url, p), prompts()))


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


@pytest.fixture(scope="module")
def colocated(tiny_model_dir):
    with local_server(base_args(tiny_model_dir)) as srv:
        return run_all(srv.url)


@pytest.mark.parametrize("codec", ["raw", "lz4"])
def test_pd_equals_colocated_token_for_token(tiny_model_dir, colocated, codec):
    with local_server(pd_args(tiny_model_dir, codec)) as srv:
        assert run_all(srv.url) == colocated
        h = wait_idle(srv.url)
        assert h["routing"].get("offload", 0) == sum(n > THRESHOLD for n in PROMPT_LENS)
        assert h["routing"].get("local_short", 0) == sum(n <= THRESHOLD for n in PROMPT_LENS)
        assert metric(srv.url, "tandem:kv_transfer_bytes_total") > 0
        assert metric(srv.url, "tandem:kv_fallbacks_total") == 0


def test_pd_over_torch_distributed_gloo(tiny_model_dir, colocated):
    """The same handoff over torch.distributed point-to-point (Gloo here, NCCL on GPUs)."""
    with local_server([*pd_args(tiny_model_dir), "--kv-transport", "torch"]) as srv:
        assert run_all(srv.url) == colocated
        assert health(srv.url)["routing"].get("offload", 0) == sum(n > THRESHOLD for n in PROMPT_LENS)
        assert metric(srv.url, "tandem:kv_transfer_bytes_total") > 0
        wait_idle(srv.url)


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


def test_killed_prefill_replica_mid_transfer(tiny_model_dir, colocated, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "stall:60")   # the first frame goes out, then nothing
    with local_server(pd_args(tiny_model_dir, "raw", timeout=2.0)) as srv:
        prefill = next(r for r in health(srv.url)["replicas"].values() if r["role"] == "prefill")
        with cf.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(complete, srv.url, prompts()[4])
            time.sleep(0.5)
            os.kill(prefill["pid"], signal.SIGKILL)
            assert pending.result(timeout=60) == colocated[4]
        h = wait_idle(srv.url)
        assert h["status"] in ("ok", "degraded") and httpx.get(f"{srv.url}/health").status_code == 200
        # Long prompts keep working without the prefill replica (prefilled on the decode one).
        assert run_all(srv.url) == colocated


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
                  "kv_addr": "decode-t"}
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
