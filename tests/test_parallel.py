"""Tensor and pipeline parallelism through the HTTP API: `--tp 2`, `--pp 2` and `--tp 2 --pp 2`
give the tokens and logprobs of one rank (float32, greedy, several requests in flight), with even
and uneven GQA splits; a worker rank that dies takes its replica down whole, its requests end
retryably, and the replica comes back and serves. The shard arithmetic is tested without
processes."""
from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest

from bench.server import local_server
from engine.model_config import ModelConfig
from engine.step_batch import decode_forward, encode_forward, prepare_step
from engine.parallel import cache_model_config, make_shard
from tests.test_pd import base_args, complete, health, prompts


def run_all(url: str) -> list:
    with cf.ThreadPoolExecutor(6) as pool:
        return list(pool.map(lambda p: complete(url, p), prompts()))


def assert_same(got, want) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        problem = g.mismatch(w)
        assert problem is None, f"prompt {i}: differs from one rank: {problem}"


_REFERENCE: dict = {}


@pytest.mark.parametrize("heads, tp, pp", [((4, 2), 2, 1), ((6, 3), 2, 1), ((4, 2), 1, 2), ((4, 2), 2, 2)],
                         ids=["tp2-even", "tp2-uneven", "pp2", "tp2xpp2"])
def test_parallel_equals_one_rank_through_the_api(make_tiny_model, heads, tp, pp):
    q, kv = heads
    model = make_tiny_model(num_attention_heads=q, num_key_value_heads=kv, hidden_size=16 * q)
    args = [*base_args(model), "--threads", "1"]
    if heads not in _REFERENCE:
        with local_server(args) as srv:
            _REFERENCE[heads] = run_all(srv.url)
    with local_server([*args, "--tp", str(tp), "--pp", str(pp)]) as srv:
        assert_same(run_all(srv.url), _REFERENCE[heads])
        replica = health(srv.url)["replicas"]["hybrid-0"]
        assert replica["num_free_blocks"] == replica["num_blocks"]


def _worker_pids(driver_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(driver_pid), "-f", "engine.parallel"],
                         capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_dead_rank_restarts_the_replica_whole(tiny_model_dir):
    args = [*base_args(tiny_model_dir), "--threads", "1", "--tp", "2"]
    with local_server(args) as srv:
        driver = health(srv.url)["replicas"]["hybrid-0"]["pid"]
        (worker,) = _worker_pids(driver)
        os.kill(worker, signal.SIGKILL)
        r = httpx.post(f"{srv.url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": [5, 6, 7], "max_tokens": 4})
        # The step that finds the rank gone ends the request retryably (or the gateway saw the
        # replica go first and answers 503 for want of a replica).
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        deadline = time.monotonic() + 60
        while True:
            h = health(srv.url)["replicas"]["hybrid-0"]
            if h["healthy"] and h["pid"] != driver:
                break
            assert time.monotonic() < deadline, f"replica not back: {h}"
            time.sleep(0.2)
        assert h["restarts"] == 1 and len(_worker_pids(h["pid"])) == 1
        assert complete(srv.url, prompts()[0])
        assert not os.path.exists(f"/proc/{driver}"), "the old driver is gone"


def test_shards_cover_every_head_and_column_once():
    cfg = ModelConfig(model_type="llama", vocab_size=10, hidden_size=576, intermediate_size=1537,
                      num_layers=2, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
                      rope_theta=1e4, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=True, qkv_bias=False, o_bias=False, sliding_window=None)
    shards = [make_shard(cfg, 2, r) for r in range(2)]
    assert all(s.layers == (0, 2) for s in shards)
    assert [(s.num_heads, s.num_kv_heads) for s in shards] == [(6, 2), (3, 1)]
    assert shards[0].q_heads == (0, 6) and shards[1].q_heads == (6, 9)
    assert shards[0].kv_heads == (0, 2) and shards[1].kv_heads == (2, 3)
    assert shards[0].ffn == (0, 769) and shards[1].ffn == (769, 1537)
    assert cache_model_config(cfg, 2, 1).num_kv_heads == 2 and cache_model_config(cfg, 3, 1).num_kv_heads == 1
    # tp=2 x pp=2: ranks (stage, tp rank) = (0,0) (0,1) (1,0) (1,1); 2 layers -> one per stage.
    grid = [make_shard(cfg, 2, r, pp=2) for r in range(4)]
    assert [(s.stage, s.tp_rank, s.layers, s.num_kv_heads) for s in grid] == [
        (0, 0, (0, 1), 2), (0, 1, (0, 1), 1), (1, 0, (1, 2), 2), (1, 1, (1, 2), 1)]
    assert cache_model_config(cfg, 2, 2).num_layers == 1
    with pytest.raises(ValueError, match="pp=3 exceeds the model's 2 layers"):
        make_shard(cfg, 1, 0, pp=3)
    with pytest.raises(ValueError, match="tp=4 exceeds"):
        make_shard(cfg, 4, 0)


def test_step_batch_forward_frame_round_trip():
    from scheduler.config import SchedulerConfig
    from scheduler.policies import make_scheduler
    from scheduler.request import Request, SamplingParams

    sched = make_scheduler(SchedulerConfig(token_budget=16, max_num_seqs=4, block_size=4,
                                           max_model_len=64), 32)
    for i, n in enumerate((3, 9)):
        sched.add_request(Request(f"r{i}", list(range(1, n + 1)), SamplingParams(max_tokens=2), 0.0))
    batch = prepare_step(sched.schedule(0.0), 4)
    back = decode_forward(encode_forward(batch))
    for name in ("input_ids", "positions", "slot_mapping", "seq_info", "block_table", "logit_rows"):
        a, b = getattr(batch, name), getattr(back, name)
        assert a.dtype == b.dtype and (a == b).all() and b.flags.writeable, name
    assert back.num_short_seqs == batch.num_short_seqs and back.samples == ()


@pytest.mark.slow
@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_parallel_equals_one_rank_on_smollm2(smollm2_dir, parallel):
    """The real model in float32: tp=2 splits its 9 query / 3 KV heads unevenly (6+3 / 2+1), pp=2
    its 30 layers 15 + 15. Ranks sum partial products in another order, so a token may differ
    only after a near-tie (top-2 margin under 1e-4), which is printed."""
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(smollm2_dir)
    chats = [tok.encode_chat([{"role": "user", "content": t}]) for t in
             ["What is 2 + 2?", "Name three colours.", "Write a haiku about the sea."]]
    args = ["--served-model-name", "tiny", "--threads", "1", "--num-kv-blocks", "256",
            "--max-model-len", "1024", "--token-budget", "32", "--dtype", "float32", "--no-compile"]

    def run(url):
        with cf.ThreadPoolExecutor(len(chats)) as pool:
            return list(pool.map(lambda p: complete(url, p), chats))

    with local_server(args) as srv:
        want = run(srv.url)
    with local_server([*args, *parallel]) as srv:
        got = run(srv.url)
    for i, (g, w) in enumerate(zip(got, want)):
        problem = g.mismatch(w)
        if problem is None:
            continue
        first = next(j for j, (a, b) in enumerate(zip(g.tokens, w.tokens)) if a != b)
        margin = w.top[first][0] - w.top[first][1]
        print(f"prompt {i}: token {first} differs after a near-tie (top-2 margin {margin:.2e})")
        assert margin < 1e-4, f"prompt {i}: {problem}"
        assert g.tokens[:first] == w.tokens[:first]


@pytest.mark.parametrize("parallel", [["--tp", "2"], ["--pp", "2"]], ids=["tp2", "pp2"])
def test_disaggregation_with_parallel_replicas_moves_every_shard(tiny_model_dir, parallel):
    """1 prefill + 1 decode replica, each tp=2 (or pp=2): rank i of the prefill replica pushes
    its shard of each long prompt's KV to rank i of the decode replica; the decode replica
    decodes once every rank has its shard. Same tokens and logprobs as one colocated rank, every
    offloaded prompt through a transfer, no fallback, all blocks back."""
    from tests.test_pd import THRESHOLD, PROMPT_LENS, metric, pd_args, wait_idle
    from tests.test_pd import run_all as run_pd

    with local_server([*base_args(tiny_model_dir), "--threads", "1"]) as srv:
        want = run_pd(srv.url)
    with local_server([*pd_args(tiny_model_dir), "--threads", "1", *parallel]) as srv:
        assert_same(run_pd(srv.url), want)
        h = wait_idle(srv.url)
        offloaded = sum(n > THRESHOLD for n in PROMPT_LENS)
        assert h["routing"].get("offload", 0) == offloaded
        assert metric(srv.url, "tandem:kv_transfer_latency_seconds_count") == offloaded
        assert metric(srv.url, "tandem:kv_fallbacks_total") == 0
        assert all(r["num_live_transfers"] == 0 for r in h["replicas"].values())


def test_micro_batches_partition_the_step_and_its_logit_rows():
    from engine.step_batch import split_batch
    from scheduler.config import SchedulerConfig
    from scheduler.policies import make_scheduler
    from scheduler.request import Request, SamplingParams

    sched = make_scheduler(SchedulerConfig(token_budget=64, max_num_seqs=8, block_size=4,
                                           max_model_len=128), 64)
    for i, n in enumerate((5, 9, 3, 12, 7)):
        sched.add_request(Request(f"r{i}", list(range(1, n + 1)),
                                  SamplingParams(max_tokens=3, prompt_logprobs=1 if i == 1 else None), 0.0))
    out = sched.schedule(0.0)
    sched.update(out, {c.request.request_id: 7 for c in out.chunks if c.samples}, 0.0)
    sched.add_request(Request("late", list(range(1, 30)), SamplingParams(max_tokens=2), 0.0))
    batch = prepare_step(sched.schedule(1.0), 4)          # decodes first, then a prefill chunk
    parts = split_batch(batch, 2)
    assert len(parts) == 2
    where = np.concatenate([w for _, w in parts])
    assert sorted(where.tolist()) == list(range(len(batch.logit_rows)))
    row0 = 0
    for mb, w in parts:
        assert (mb.logit_rows + row0 == batch.logit_rows[w]).all()
        assert mb.seq_info[0, 0] == 0 and mb.num_tokens == mb.seq_info[:, 1].sum()
        assert (mb.input_ids == batch.input_ids[row0:row0 + mb.num_tokens]).all()
        assert all(mb.seq_info[:mb.num_short_seqs, 1] <= 1) and all(mb.seq_info[mb.num_short_seqs:, 1] > 1)
        row0 += mb.num_tokens
    assert row0 == batch.num_tokens
    assert 2 <= len(split_batch(batch, 99)) <= batch.num_seqs   # "up to": whole sequences only
