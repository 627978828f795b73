"""Prefix caching through the real engine (tiny random Llama, fp32, greedy): the same tokens, token
for token, with the cache on and off -- for a shared system prompt, a conversation whose next turn
repeats the last one and its answer, repeated prompts, prompts of exact multiples of the block
size, and a KV cache small enough to force preemptions -- while the cached run computes fewer
tokens. Through disaggregation: the prefill replica skips what it has cached, the decode replica
receives only what it lacks, and the tokens are still those of a colocated replica without cache.
"""
from __future__ import annotations

import pytest
import torch

from engine.config import EngineConfig
from engine.core import EngineCore
from scheduler.config import SchedulerConfig
from scheduler.request import SamplingParams

NEW_TOKENS = 8


def tokens(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (n,), generator=g).tolist()


def run(model_dir, waves, caching: bool, num_kv_blocks=64, block_size=16, budget=32, sampling=None):
    """Each wave's prompts are added at once, and run until done before the next wave. Returns
    ({request id: output tokens}, {request id: output}, tokens computed, engine)."""
    cfg = EngineConfig(model_dir=str(model_dir), dtype="float32", num_kv_blocks=num_kv_blocks,
                       scheduler=SchedulerConfig(token_budget=budget, max_num_seqs=8, block_size=block_size,
                                                 max_model_len=512, enable_prefix_caching=caching))
    engine = EngineCore(cfg)
    sampling = sampling or SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    out: dict[str, list[int]] = {}
    firsts = {}
    computed = 0
    for w, wave in enumerate(waves):
        for i, prompt in enumerate(wave(out) if callable(wave) else wave):
            assert engine.add_request(f"w{w}-{i}", prompt, sampling) is None
        while engine.has_work():
            for o in engine.step():
                out.setdefault(o.request_id, []).extend(o.new_token_ids)
                firsts.setdefault(o.request_id, o)
            engine.scheduler.check_integrity()
            computed += engine.last_step.num_prefill_tokens + engine.last_step.num_decode_tokens
    assert engine.scheduler.block_manager.num_free_blocks == engine.runner.num_blocks
    return out, firsts, computed, engine


SYSTEM = tokens(40, 1)   # 2 full blocks of 16, and 8 tokens more


def chat_waves():
    users = [tokens(n, 10 + i) for i, n in enumerate((5, 23, 9, 17))]
    return [
        [SYSTEM + users[0]],
        [SYSTEM + users[1], SYSTEM + users[2], SYSTEM + users[0]],     # a repeated prompt too
        # The next turn: the whole first exchange (its answer included), then a new question.
        lambda out: [SYSTEM + users[0] + out["w0-0"] + users[3]],
    ]


def block_multiple_waves():
    p, other = tokens(48, 2), tokens(16, 9)            # exactly 3 blocks, and 1
    return [[p, other + [1, 2]], [p, p[:32], p + [7]],
            # p's blocks again after another first block: the same tokens, other positions.
            [p[:32] + tokens(16, 3), other + p[:32] + [5]]]


@pytest.mark.parametrize("waves", [chat_waves, block_multiple_waves])
def test_same_tokens_with_and_without_prefix_caching(tiny_model_dir, waves):
    want, _, computed_off, _ = run(tiny_model_dir, waves(), caching=False)
    got, _, computed_on, engine = run(tiny_model_dir, waves(), caching=True)
    assert got == want
    bm = engine.scheduler.block_manager
    assert bm.num_hit_tokens >= 64, bm.num_hit_tokens
    assert computed_on <= computed_off - bm.num_hit_tokens


def test_same_tokens_under_preemption_with_a_tiny_cache(tiny_model_dir):
    """16 blocks of 4 tokens for 8 requests that each want 6-9: preempted requests drop their
    blocks (shared ones stay, held by the others) and find their prefix cached when they resume."""
    system = tokens(12, 4)
    waves = [[system + tokens(3, 5)], [system + tokens(n, 20 + n) for n in (1, 6, 9, 14, 2, 11, 7, 4)]]
    want, _, _, off = run(tiny_model_dir, waves, caching=False, num_kv_blocks=16, block_size=4)
    got, _, _, on = run(tiny_model_dir, waves, caching=True, num_kv_blocks=16, block_size=4)
    assert off.scheduler.num_preemptions > 0 and on.scheduler.num_preemptions > 0
    assert got == want
    assert on.scheduler.block_manager.num_hit_tokens > 0


def test_prompt_logprobs_are_computed_for_the_whole_prompt_even_when_cached(tiny_model_dir):
    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    waves = [[SYSTEM + [5, 6]], [SYSTEM + [7, 8, 9]]]
    _, want, _, _ = run(tiny_model_dir, waves, caching=False, sampling=sampling)
    _, got, _, _ = run(tiny_model_dir, waves, caching=True, sampling=sampling)
    for rid in want:
        a, b = want[rid].prompt_logprobs, got[rid].prompt_logprobs
        assert len(a) == len(b) == len(waves[int(rid[1])][0])
        assert all(x == y or abs(x[1] - y[1]) < 1e-5 for x, y in zip(a[1:], b[1:]))


# -- disaggregation, end to end ----------------------------------------------------------------
def pd_prompts() -> list[list[int]]:
    """Long prompts (offloaded) sharing a 96-token prefix, the second and third sent after the
    first has finished, so both replicas have it cached."""
    shared = [(31 * j) % 40000 + 100 for j in range(96)]
    return [shared + [(7 * j + 1000 * i) % 40000 + 200 for j in range(n)]
            for i, n in enumerate((30, 45, 61))]


def test_pd_with_prefix_caching_equals_colocated_without(tiny_model_dir):
    from bench.server import local_server
    from engine.model_config import ModelConfig, kv_bytes_per_block
    from tests.test_pd import THRESHOLD, base_args, complete, kv_stats, metric, wait_idle

    prompts = pd_prompts()
    with local_server([*base_args(tiny_model_dir), "--no-enable-prefix-caching"]) as srv:
        want = [complete(srv.url, p) for p in prompts]
    args = [*base_args(tiny_model_dir), "--prefill-replicas", "1", "--decode-replicas", "1",
            "--offload-threshold", str(THRESHOLD), "--kv-codec", "raw", "--kv-timeout", "10"]
    with local_server(args) as srv:
        got = [complete(srv.url, p) for p in prompts]
        h = wait_idle(srv.url)
        kv = kv_stats(srv.url)
        hits, queries = (metric(srv.url, f"tandem:prefix_cache_{n}_total") for n in ("hits", "queries"))
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.mismatch(w) is None, f"prompt {i}: {g.mismatch(w)}"
    assert h["routing"].get("offload", 0) == len(prompts), h["routing"]
    assert kv["transfers"] == len(prompts) and kv["failures"] == 0 and kv["fallbacks"] == 0, kv
    roles = {r["role"]: r for r in h["replicas"].values()}
    # Both replicas found the shared 96 tokens (6 blocks) for the later two prompts.
    for role in ("prefill", "decode"):
        assert roles[role]["prefix_cache_hits"] >= 2 * 96, (role, roles[role])
        assert 0 < roles[role]["prefix_cache_hit_rate"] < 1
    # The same totals reach Prometheus: tokens, both replicas together.
    assert hits == sum(r["prefix_cache_hits"] for r in roles.values()) >= 4 * 96
    assert queries == sum(r["prefix_cache_queries"] for r in roles.values()) == 2 * sum(map(len, prompts))
    # The decode replica received only what it lacked: the first prompt whole (8 blocks of 16),
    # the later two from their 7th block on (3 + 4 blocks), not 9 + 10 blocks.
    per_block = kv_bytes_per_block(ModelConfig.from_dir(tiny_model_dir), 16, "float32")
    assert kv["raw_bytes"]["raw"] == 15 * per_block, kv["raw_bytes"]["raw"] / per_block
