"""Automatic prefix caching without torch: the block manager's refcounts, eviction and hash index
under random operations (hypothesis), and the scheduler with a fake runner that really reads and
writes a paged cache, so a block handed to the wrong request, shared while written, or evicted
while held changes the sampled tokens."""
from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import scheduler.block_manager as block_manager_module
from scheduler.block_manager import BlockManager
from scheduler.config import POLICIES, SchedulerConfig
from scheduler.policies import make_scheduler
from scheduler.request import Request, SamplingParams


def request(rid: str, prompt: list[int], max_tokens: int = 4, arrival: float = 0.0, **sampling) -> Request:
    return Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                     ignore_eos=True, **sampling), arrival)


# -- the block manager alone, under random operations ------------------------------------------
def kv_of(r: Request, pos: int) -> int:
    """What a model's KV at `pos` depends on: the token there and every token before it."""
    return hash(tuple(r.token_ids(0, pos + 1)))


class BlockManagerMachine(RuleBasedStateMachine):
    """Requests drawn from a few shared prefixes are allocated (reusing their cached prefix),
    computed chunk by chunk, grown by decoded tokens and freed in any order. A shadow cache holds
    the KV each slot was computed for (`kv_of`): every computed position a request can see through
    its block table must hold its own (a wrong hit, an eviction of a held block or a write into a
    shared block breaks that), and nobody writes a block that is cached or shared."""

    BLOCK = 4
    BLOCKS = 12
    # Shared first blocks, and the same block content after different prefixes.
    PREFIXES = ([7, 7, 7, 7, 8, 8, 8, 8, 9], [7, 7, 7, 7, 5, 5], [5, 5, 7, 7, 8, 8, 8, 8, 9],
                [8, 8, 8, 8, 7, 7, 7, 7, 5])

    def __init__(self) -> None:
        super().__init__()
        self.bm = BlockManager(self.BLOCKS, self.BLOCK, enable_caching=True)
        self.live: dict[str, Request] = {}
        self.kv: dict[int, int] = {}   # slot -> token whose KV it holds
        self.n = 0

    def _slot(self, r: Request, pos: int) -> int:
        return r.block_ids[pos // self.BLOCK] * self.BLOCK + pos % self.BLOCK

    @rule(prefix=st.integers(0, 3), cut=st.integers(1, 9), tail=st.lists(st.integers(0, 3), max_size=6))
    def add(self, prefix, cut, tail):
        r = request(f"r{self.n}", self.PREFIXES[prefix][:cut] + tail)
        self.n += 1
        if not self.bm.can_allocate(r, r.num_tokens, reuse=True):
            return
        expect = self.bm.cached_tokens(r)
        free_before = self.bm.num_free_blocks
        held = {b for q in self.live.values() for b in q.block_ids}
        hits = self.bm.allocate(r, r.num_tokens, reuse=True)
        assert hits == expect and hits % self.BLOCK == 0 and hits < r.num_tokens
        new = r.block_ids[hits // self.BLOCK:]
        assert not set(new) & held, "a block another request holds was handed out again"
        assert free_before - self.bm.num_free_blocks == len(new) + sum(
            b not in held for b in r.block_ids[:hits // self.BLOCK])
        r.num_computed_tokens = hits
        for pos in range(hits):   # the cache's KV is this request's own prefix
            assert self.kv[self._slot(r, pos)] == kv_of(r, pos)
        self.live[r.request_id] = r

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def compute(self, data):
        r = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda q: q.request_id)))
        if r.num_uncomputed_tokens == 0:
            return
        n = data.draw(st.integers(1, r.num_uncomputed_tokens))
        for pos in range(r.num_computed_tokens, r.num_computed_tokens + n):
            block = r.block_ids[pos // self.BLOCK]
            assert self.bm._ref[block] == 1 and block not in self.bm._hash_of, \
                f"{r.request_id} writes position {pos} into shared or cached block {block}"
            self.kv[self._slot(r, pos)] = kv_of(r, pos)
        r.num_computed_tokens += n
        self.bm.cache_computed(r)

    @precondition(lambda self: self.live)
    @rule(data=st.data(), token=st.integers(0, 3))
    def grow(self, data, token):
        """A decoded token joins a fully computed request (a block appended if needed)."""
        r = data.draw(st.sampled_from(sorted(self.live.values(), key=lambda q: q.request_id)))
        if r.num_uncomputed_tokens or not self.bm.can_allocate(r, r.num_tokens + 1):
            return
        r.output_token_ids.append(token)
        self.bm.allocate(r, r.num_tokens)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.bm.free(self.live.pop(rid))

    @invariant()
    def consistent(self):
        self.bm.check_integrity(self.live.values())
        for r in self.live.values():
            for pos in range(r.num_computed_tokens):
                assert self.kv[self._slot(r, pos)] == kv_of(r, pos), \
                    f"{r.request_id}: the KV at position {pos} is another prefix's"
        held = {b for r in self.live.values() for b in r.block_ids}
        assert self.bm.num_free_blocks == self.BLOCKS - len(held)

    def teardown(self):
        for r in list(self.live.values()):
            self.bm.free(r)
        self.bm.check_integrity()
        assert self.bm.num_free_blocks == self.BLOCKS and all(ref == 0 for ref in self.bm._ref)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_block_manager_refcounts_eviction_and_hashes = BlockManagerMachine.TestCase


def test_shared_blocks_are_refcounted_and_freed_blocks_stay_cached_until_evicted_lru():
    bm = BlockManager(6, 4, enable_caching=True)
    a = request("a", list(range(10)))                  # blocks: [0..3] [4..7] [8, 9]
    bm.allocate(a, a.num_tokens, reuse=True)
    a.num_computed_tokens = 10
    bm.cache_computed(a)
    assert bm.num_cached_blocks == 2
    b = request("b", list(range(8)) + [42])
    assert bm.allocate(b, b.num_tokens, reuse=True) == 8
    b.num_computed_tokens = 8
    assert b.block_ids[:2] == a.block_ids[:2] and bm._ref[a.block_ids[0]] == 2
    bm.free(a)                                         # b still holds the shared two
    assert bm._ref[b.block_ids[0]] == 1 and bm.num_free_blocks == 3
    bm.check_integrity([b])
    bm.free(b)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 2   # free, and still cached
    # Uncached free blocks go first; then the least recently freed cached block: b freed its
    # tail first, so the prefix's second block is evicted before its first.
    c = request("c", [100 + i for i in range(20)])      # 5 blocks: 4 uncached + 1 evicted
    bm.allocate(c, c.num_tokens, reuse=True)
    assert bm.num_cached_blocks == 1
    d = request("d", list(range(9)))
    assert bm.cached_tokens(d) == 4                    # only the prefix's first block is left
    bm.check_integrity([c])


def test_a_whole_cached_prompt_leaves_its_last_block_to_compute():
    """Exact multiples of the block size: the last token must be computed (the step samples), so
    its block is allocated fresh, never written while shared."""
    bm = BlockManager(8, 4, enable_caching=True)
    a = request("a", list(range(8)))
    bm.allocate(a, 8, reuse=True)
    a.num_computed_tokens = 8
    bm.cache_computed(a)
    b = request("b", list(range(8)))
    assert bm.allocate(b, 8, reuse=True) == 4
    assert b.block_ids[0] == a.block_ids[0] and b.block_ids[1] != a.block_ids[1]
    c = request("c", list(range(9)))
    assert bm.allocate(c, 9, reuse=True) == 8           # one token past the blocks: both reused


def test_caching_off_registers_and_reuses_nothing():
    bm = BlockManager(8, 4)
    a = request("a", list(range(8)))
    bm.allocate(a, 8, reuse=True)
    a.num_computed_tokens = 8
    bm.cache_computed(a)
    bm.free(a)
    b = request("b", list(range(8)))
    assert bm.allocate(b, 8, reuse=True) == 0 and bm.num_cached_blocks == 0
    assert bm.num_queried_tokens == bm.num_hit_tokens == 0


def test_integrity_check_catches_a_shared_block_freed_and_a_stale_hash():
    bm = BlockManager(6, 4, enable_caching=True)
    a = request("a", list(range(9)))
    bm.allocate(a, 9, reuse=True)
    a.num_computed_tokens = 9
    bm.cache_computed(a)
    b = request("b", list(range(9)))
    b.num_computed_tokens = bm.allocate(b, 9, reuse=True)
    bm._free.append(a.block_ids[0])        # freed while two requests hold it
    with pytest.raises(AssertionError, match="duplicated"):
        bm.check_integrity([a, b])
    bm._free.pop()
    bm.check_integrity([a, b])
    bm._cached[b"stale"] = a.block_ids[0]  # the index names a block under two hashes
    with pytest.raises(AssertionError, match="hash index"):
        bm.check_integrity([a, b])
    del bm._cached[b"stale"]
    b.num_computed_tokens = 0              # would recompute (write) a cached block
    with pytest.raises(AssertionError, match="write into a cached block"):
        bm.check_integrity([a, b])


# -- the scheduler ------------------------------------------------------------------------------
SYSTEM = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24]   # 14 tokens: 3 blocks of 4 + 2


def config(policy="sarathi", caching=True, **kw) -> SchedulerConfig:
    base = dict(policy=policy, token_budget=32, max_num_seqs=8, block_size=4, max_model_len=256,
                max_batched_tokens=256, enable_prefix_caching=caching)
    return SchedulerConfig(**{**base, **kw})


def finish_all(sched, now: float = 0.0) -> None:
    while sched.has_work():
        out = sched.schedule(now)
        sched.update(out, {c.request.request_id: 5 for c in out.chunks if c.samples}, now)
        sched.check_integrity()
        now += 1.0


@pytest.mark.parametrize("caching", [True, False])
def test_a_request_sharing_a_prefix_starts_with_it_computed(caching):
    sched = make_scheduler(config(caching=caching), 64)
    sched.add_request(first := request("a", SYSTEM + [1, 2, 3]))
    finish_all(sched)
    sched.add_request(second := request("b", SYSTEM + [7, 8, 9, 10, 11]))
    out = sched.schedule(100.0)
    [chunk] = out.chunks
    # The system prompt's 3 full blocks (12 tokens) come from the cache: only the rest is computed.
    assert second.num_computed_tokens == (12 if caching else 0)
    assert chunk.num_tokens == second.num_tokens - (12 if caching else 0) and chunk.samples
    bm = sched.block_manager
    assert (bm.num_queried_tokens, bm.num_hit_tokens) == ((17 + 19, 12) if caching else (0, 0))
    assert first.is_finished


def test_prompt_logprobs_requests_compute_their_whole_prompt():
    sched = make_scheduler(config(), 64)
    sched.add_request(request("a", SYSTEM + [1]))
    finish_all(sched)
    sched.add_request(r := request("b", SYSTEM + [2], prompt_logprobs=1))
    sched.schedule(100.0)
    assert r.num_computed_tokens == 0


def test_running_requests_share_blocks_and_preemption_returns_them_to_the_cache():
    """Three requests share the system prompt's blocks while running; a tiny cache forces
    preemptions (recompute), whose victims find their prefix cached again when they resume."""
    sched = make_scheduler(config(watermark=0.0), 14)
    sched.add_request(request("a", SYSTEM + [1, 2], max_tokens=2))
    finish_all(sched)
    reqs = [request(f"r{i}", SYSTEM + [30 + i] * 3, max_tokens=14, arrival=float(i)) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    sched.update(out := sched.schedule(50.0), {c.request.request_id: 5 for c in out.chunks if c.samples}, 50.0)
    shared = {r.block_ids[0] for r in reqs}
    assert len(shared) == 1 and sched.block_manager._ref[shared.pop()] == 3
    sched.check_integrity()
    finish_all(sched)
    assert sched.num_preemptions > 0, "the cache was big enough: nothing was preempted"
    assert all(r.is_finished and r.num_output_tokens == 14 for r in reqs)
    assert sched.block_manager.num_free_blocks == 14


def test_a_hit_on_blocks_a_running_request_holds_takes_no_free_block():
    """A request whose cached prefix is held by a running one needs only its own new blocks:
    admission counts the shared ones as there already (here one block is left, and it fits)."""
    sched = make_scheduler(config(watermark=0.0), 6)
    sched.add_request(a := request("a", SYSTEM + [1, 2], max_tokens=4))   # 4 blocks
    sched.update(sched.schedule(0.0), {"a": 5}, 0.0)
    assert a.num_computed_tokens == 16 and sched.block_manager.num_free_blocks == 2
    sched.add_request(b := request("b", SYSTEM[:12] + [9, 9], max_tokens=1))  # 3 shared + 1 new
    out = sched.schedule(1.0)                       # a's next token takes a block first
    assert [c.request for c in out.chunks] == [a, b]
    assert b.num_computed_tokens == 12 and b.block_ids[:3] == a.block_ids[:3]
    assert sched.block_manager.num_free_blocks == 0
    sched.check_integrity()


def test_remote_prefill_reservation_shares_the_cached_prefix():
    sched = make_scheduler(config(), 32)
    sched.add_request(request("a", SYSTEM + [1]))
    finish_all(sched)
    r = request("b", SYSTEM + [5, 6, 7])
    assert sched.add_remote_prefill(r)
    assert r.num_computed_tokens == 12     # the KV of these is not to be pushed
    sched.check_integrity()
    sched.remote_prefill_done("b", 1.0)
    finish_all(sched)
    assert sched.block_manager.num_free_blocks == 32


# -- the scheduler and a fake runner over a real paged cache ------------------------------------
class FakeRunner:
    """Writes, for every computed position, its `kv_of` into its slot of a paged cache, and
    samples from what the request reads back through its block table: a token determined by the
    whole context as stored. Wrong KV anywhere in the context changes the token."""

    def __init__(self, block_size: int) -> None:
        self.b = block_size
        self.kv: dict[int, int] = {}
        self.computed = 0

    def execute(self, out) -> dict[str, int]:
        slot = lambda r, p: r.block_ids[p // self.b] * self.b + p % self.b   # noqa: E731
        for c in out.chunks:
            for p in range(c.start, c.start + c.num_tokens):
                self.kv[slot(c.request, p)] = kv_of(c.request, p)
            self.computed += c.num_tokens
        return {c.request.request_id: hash(tuple(self.kv.get(slot(c.request, p))
                                                 for p in range(c.request.num_tokens))) % 50 + 1
                for c in out.chunks if c.samples}


def chat_workload(rng: random.Random, n: int) -> list[tuple[float, list[int], int]]:
    """(arrival, prompt, max_tokens): a shared system prompt, conversations whose prompts grow
    turn by turn, repeated prompts, prompts of exact multiples of the block size, and the same
    blocks after different prefixes."""
    convs: dict[int, list[int]] = {}
    items = []
    for i in range(n):
        kind = rng.random()
        if kind < 0.5:
            c = rng.randrange(3)
            convs[c] = convs.get(c, SYSTEM[:]) + [rng.randrange(1, 60) for _ in range(rng.randrange(1, 9))]
            prompt = convs[c][:]
        elif kind < 0.7 and items:
            prompt = rng.choice(items)[1][:]                       # a repeated prompt
        elif kind < 0.8:
            prompt = SYSTEM[:12] + [rng.randrange(1, 60) for _ in range(4 * rng.randrange(0, 4))]
        elif kind < 0.9:   # the system prompt's blocks after another first block
            prompt = [rng.choice((1, 2))] * 4 + SYSTEM[:12] + [rng.randrange(1, 60)]
        else:
            prompt = [rng.randrange(1, 60) for _ in range(rng.randrange(1, 30))]
        items.append((i * rng.choice([0.0, 1.0, 3.0]) + i * 1e-3, prompt, rng.randrange(1, 10)))
    return sorted(items, key=lambda x: x[0])


def run(policy: str, caching: bool, workload, num_blocks: int, budget: int = 16):
    cfg = config(policy, caching, token_budget=budget, max_num_seqs=4)
    sched = make_scheduler(cfg, num_blocks)
    runner = FakeRunner(cfg.block_size)
    pending = [request(f"q{i}", p, m, arrival=a) for i, (a, p, m) in enumerate(workload)]
    reqs = list(pending)
    step = 0
    while pending or sched.has_work():
        while pending and pending[0].arrival_time <= step:
            sched.add_request(pending.pop(0))
        out = sched.schedule(float(step))
        sched.update(out, runner.execute(out), float(step))
        sched.check_integrity()
        step += 1
        assert step < 20_000, "no progress"
    assert sched.block_manager.num_free_blocks == num_blocks
    return {r.request_id: r.output_token_ids for r in reqs}, runner.computed, sched


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 40),
       policy=st.sampled_from(POLICIES))
def test_every_policy_gives_the_same_tokens_with_and_without_caching(seed, num_blocks, policy):
    workload = chat_workload(random.Random(seed), 12)
    if any(-(-(len(p) + m) // 4) > num_blocks for _, p, m in workload):
        return
    budget = 64 if policy in ("vllm", "orca", "request", "hybrid_only") else 16
    want, computed_off, _ = run(policy, False, workload, num_blocks, budget)
    got, computed_on, sched = run(policy, True, workload, num_blocks, budget)
    assert got == want
    assert computed_on <= computed_off


def test_chat_workload_computes_fewer_tokens_with_caching_and_under_preemption():
    workload = chat_workload(random.Random(5), 40)
    want, off, _ = run("sarathi", False, workload, 14)   # the longest request needs 11 blocks
    got, on, sched = run("sarathi", True, workload, 14)
    assert got == want
    assert sched.num_preemptions > 0 and sched.block_manager.num_hit_tokens > 0
    assert on < 0.8 * off, (on, off)


def test_the_parity_check_catches_a_broken_cache(monkeypatch):
    """Negative control: a block hash that ignores the block's tokens reuses other prefixes' KV,
    and the fake runner's tokens then differ from the run without caching."""
    monkeypatch.setattr(block_manager_module, "block_hash", lambda parent, tokens: parent + b"x")
    workload = chat_workload(random.Random(5), 40)
    want, *_ = run("sarathi", False, workload, 14)
    got, *_ = run("sarathi", True, workload, 14)
    assert got != want


# -- the benchmark's multi-turn chat workload ---------------------------------------------------
def test_chat_workload_prompts_extend_the_previous_turn_behind_one_system_prompt():
    from bench.workload import PromptBuilder, WorkloadConfig, build_workload

    cfg = WorkloadConfig(num_requests=10, seed=1, turns=3, system_prompt_len=20, turn_gap_s=5.0,
                         prompt_len=7, output_len=4)
    wl = build_workload(cfg, qps=1.0)
    assert len(wl) == 10 and [r.arrival_s for r in wl] == sorted(r.arrival_s for r in wl)
    convs: dict[int, list] = {}
    for r in wl:
        convs.setdefault(r.conversation, []).append(r)
    assert sorted(map(len, convs.values())) == [1, 3, 3, 3]
    for turns in convs.values():
        # turn k: system + k * (message + answer) + message
        assert [r.prompt_tokens for r in turns] == [20 + 7 + k * 11 for k in range(len(turns))]
        assert all(b.arrival_s - a.arrival_s == pytest.approx(5.0) for a, b in zip(turns, turns[1:]))
    for token_ids in (True, False):
        builder = PromptBuilder(token_ids=token_ids, seed=3)
        prompts = [builder.prompt(r) for r in wl]
        first = {}
        for r, p in zip(wl, prompts):
            if token_ids:
                assert len(p) == r.prompt_tokens
            else:
                assert p.count(" ") == r.prompt_tokens   # one token per word
            prev = first.get(r.conversation)
            if prev is not None:
                assert p[:len(prev)] == prev and len(p) > len(prev)   # the previous turn, then more
            first[r.conversation] = p
        # One system prompt for all, and each conversation's own words after it.
        units = [p if token_ids else p.split(" ")[1:] for p in prompts]
        assert all(u[:20] == units[0][:20] for u in units)
        assert len({tuple(u[20:27]) for u in units}) == len(convs)


def test_plain_workloads_build_the_same_prompts_as_before():
    """No system prompt and one turn: `prompt` is `build`, so other benchmarks are unchanged."""
    from bench.workload import PromptBuilder, RequestSpec

    a, b = PromptBuilder(token_ids=True, seed=5), PromptBuilder(token_ids=True, seed=5)
    assert [a.prompt(RequestSpec(0.0, n, 1)) for n in (3, 9)] == [b.build(n) for n in (3, 9)]
