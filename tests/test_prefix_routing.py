"""Prefix-aware routing (`--routing prefix`, and pd's choice of the decode replica): the router on
bare `ReplicaState`s, through `ReplicaPool` with fake replicas, the option registry, the simulator,
and end to end with two real replicas, where multi-turn chats find more of their prompts cached
under `prefix` than under `least_loaded`."""
from __future__ import annotations

import asyncio
import tempfile

import httpx
import pytest

from engine.protocol import ReplicaReady
from gateway.replica_state import ReplicaState
from gateway.routing import (
    ROUTING, ConditionalDisaggregation, PrefixAffinity, PrefixConfig, RouteRequest, charge,
    make_router, release,
)
from scheduler.block_manager import BlockManager, prefix_hashes
from scheduler.request import Request, SamplingParams

BLOCK = 16


def replica(rid: str, role: str = "hybrid", tokens: int = 0, num_blocks: int = 64) -> ReplicaState:
    ready = ReplicaReady(rid, "m", 1024, num_blocks=num_blocks, block_size=BLOCK, pid=1, role=role)
    return ReplicaState(rid, f"ipc://{rid}", ready=ready, outstanding_tokens=tokens)


def ids(n: int, seed: int) -> list[int]:
    return [(seed * 7919 + 31 * j) % 40000 + 100 for j in range(n)]


SYSTEM = ids(4 * BLOCK, 1)


def route(prompt: list[int], max_tokens: int = 16) -> RouteRequest:
    return RouteRequest.of(prompt, max_tokens)


def place(router, reps, prompt, max_tokens=16):
    """Place and charge, as the pool does; returns the placement."""
    r = route(prompt, max_tokens)
    placement = router.place(reps, r)
    charge(placement, r.load_tokens)
    return placement


# -- hashes -----------------------------------------------------------------------------------
def test_the_gateway_hashes_prompts_as_the_block_manager_caches_them():
    """A prompt's hashes from `prefix_hashes` find exactly the blocks a replica cached for it."""
    prompt = SYSTEM + ids(40, 2)                                       # 6 full blocks + 8
    bm = BlockManager(num_blocks=32, block_size=BLOCK, enable_caching=True)
    first = Request("a", list(prompt), SamplingParams(max_tokens=1), 0.0)
    bm.allocate(first, first.num_tokens, reuse=True)
    first.num_computed_tokens = first.num_tokens
    bm.cache_computed(first)
    bm.free(first)
    again = Request("b", prompt + [5], SamplingParams(max_tokens=1), 0.0)
    assert bm.cached_tokens(again) == 6 * BLOCK
    hashes = prefix_hashes(prompt, BLOCK, 6)
    assert len(set(hashes)) == 6
    # Chained: a change in block 0 changes every hash; one in block 5 only the last.
    assert not set(prefix_hashes([0] + prompt[1:], BLOCK, 6)) & set(hashes)
    changed = prompt[:5 * BLOCK] + [0] + prompt[5 * BLOCK + 1:]
    assert prefix_hashes(changed, BLOCK, 6)[:5] == hashes[:5] != prefix_hashes(changed, BLOCK, 6)


# -- the router -------------------------------------------------------------------------------
def test_a_conversation_goes_back_to_the_replica_that_holds_its_prefix():
    router = make_router("prefix")
    a, b = replica("a"), replica("b")
    chat1, chat2 = SYSTEM + ids(40, 2), SYSTEM + ids(40, 3)
    p1 = place(router, [a, b], chat1)
    p2 = place(router, [a, b], chat2)
    assert (p1.replica, p1.decision) == (a, "prefix_miss")
    # chat2 shares only the system prompt with chat1; a is one request ahead: still within bound.
    assert (p2.replica, p2.decision) == (a, "prefix_hit")
    release(a, None, route(chat1).load_tokens)
    release(a, None, route(chat2).load_tokens)
    p3 = place(router, [a, b], SYSTEM + ids(40, 4))   # a third chat while a and b are idle
    assert p3.replica is a
    # The next turn of chat1 goes to a although b has less load: least_loaded would pick b.
    next_turn = chat1 + ids(30, 9)
    assert make_router("least_loaded").place([a, b], route(next_turn)).replica is b
    p4 = place(router, [a, b], next_turn)
    assert (p4.replica, p4.decision) == (a, "prefix_hit")
    # A prompt nobody was sent goes to the least loaded.
    p5 = place(router, [a, b], ids(80, 5))
    assert (p5.replica, p5.decision) == (b, "prefix_miss")


def test_the_longest_match_wins_and_ties_go_to_the_less_loaded():
    router = PrefixAffinity()
    a, b = replica("a"), replica("b")
    chat = SYSTEM + ids(40, 2)
    place(router, [b], SYSTEM + ids(20, 7))        # b holds the system prompt only
    place(router, [a], chat)                        # a holds the whole chat
    a.outstanding_tokens = b.outstanding_tokens = 0
    a.outstanding_tokens = 10
    assert router.place([a, b], route(chat + [1, 2, 3])).replica is a        # 6 blocks beat 4
    assert router.place([a, b], route(SYSTEM + ids(50, 8))).replica is b      # 4 and 4: less load
    b.outstanding_tokens = 20
    assert router.place([a, b], route(SYSTEM + ids(50, 8))).replica is a


def test_a_hot_prefix_spreads_once_its_holder_is_over_the_load_bound():
    """Every request starts with the same system prompt and stays in flight: the first holder
    takes requests while within (1 + slack) x the others' mean + one request, then the other
    replica gets one, holds the prefix too, and the two share the load."""
    router = make_router("prefix")
    a, b = replica("a"), replica("b")
    placements = [place(router, [a, b], SYSTEM + ids(20, i)) for i in range(12)]
    load = route(SYSTEM + ids(20, 0)).load_tokens
    decisions = [p.decision for p in placements]
    assert decisions[:3] == ["prefix_miss", "prefix_hit", "prefix_overloaded"]
    assert [p.replica.replica_id for p in placements[:3]] == ["a", "a", "b"]
    assert set(decisions[3:]) == {"prefix_hit"}
    assert abs(a.outstanding_tokens - b.outstanding_tokens) <= load
    # A larger slack lets the holder run further ahead before the other replica gets one.
    loose = PrefixAffinity(PrefixConfig(load_slack=1.0))
    c, d = replica("c"), replica("d")
    d.outstanding_tokens = 2 * load      # busy with something else
    # c holds the prefix from the first on, and takes requests while it has <= (1 + 1) x 2 + 1
    assert [place(loose, [c, d], SYSTEM + ids(20, i)).replica.replica_id for i in range(7)] == \
        ["c"] * 6 + ["d"]


def test_a_holder_over_the_bound_yields_to_a_shorter_holder_within_it():
    router = PrefixAffinity(PrefixConfig(load_slack=0.0))
    a, b, c = replica("a"), replica("b"), replica("c")
    chat = SYSTEM + ids(40, 2)
    place(router, [a], chat)
    place(router, [b], SYSTEM + ids(20, 3))
    a.outstanding_tokens, b.outstanding_tokens, c.outstanding_tokens = 1000, 100, 0
    p = router.place([a, b, c], route(chat + [9], max_tokens=16))
    assert (p.replica, p.decision) == (b, "prefix_hit")        # a (6 blocks) is over 50 + 137
    b.outstanding_tokens = 900
    p = router.place([a, b, c], route(chat + [9], max_tokens=16))
    assert (p.replica, p.decision) == (c, "prefix_overloaded")


def test_what_is_remembered_is_bounded_by_the_replicas_kv_blocks_and_most_recent_first():
    router = make_router("prefix")
    small = replica("s", num_blocks=10)
    chats = [ids(6 * BLOCK, i) for i in range(3)]
    for chat in chats:
        place(router, [small], chat)
    assert len(small.prefix_blocks) == 10
    # The newest chat is whole; of the one before, its first 4 blocks (a prefix's end goes first).
    assert router.place([small, replica("t", tokens=10**6)], route(chats[2] + [1])).decision == "prefix_hit"
    kept = prefix_hashes(chats[1], BLOCK, 6)
    assert [h in small.prefix_blocks for h in kept] == [True] * 4 + [False] * 2
    assert not any(h in small.prefix_blocks for h in prefix_hashes(chats[0], BLOCK, 6))
    capped = PrefixAffinity(PrefixConfig(max_blocks=2))
    r = replica("r")
    place(capped, [r], ids(6 * BLOCK, 9))
    assert len(r.prefix_blocks) == 2


def test_without_token_ids_prefix_routes_as_least_loaded():
    """The simulator's requests carry no ids: every one is a miss, placed like least_loaded."""
    router, ll = make_router("prefix"), make_router("least_loaded")
    reps = [replica(r, tokens=t) for r, t in (("a", 50), ("b", 10), ("c", 10))]
    for n in (1, 100, 1000):
        p = router.place(reps, RouteRequest(n, max_tokens=8))
        want = ll.place(reps, RouteRequest(n)).replica
        assert (p.replica, p.decision, p.prefix_hashes) == (want, "prefix_miss", [])


def test_route_request_names_a_length_that_does_not_match_its_ids():
    with pytest.raises(ValueError, match="num_prompt_tokens is 5 but prompt_token_ids has 3"):
        RouteRequest(5, [1, 2, 3])
    with pytest.raises(ValueError, match="-1"):
        RouteRequest(-1)
    with pytest.raises(ValueError, match="load_slack.*-0.5"):
        PrefixConfig(load_slack=-0.5)


def test_pd_chooses_the_decode_replica_by_prefix():
    router = ConditionalDisaggregation(offload_threshold=48)
    d1, d2, p = replica("d1", "decode"), replica("d2", "decode"), replica("p", "prefill")
    long_chat = SYSTEM + ids(60, 2)
    first = place(router, [d1, d2, p], long_chat)
    assert (first.replica, first.prefill, first.decision) == (d1, p, "offload")
    release(d1, first.prefill, route(long_chat).load_tokens)
    d1.outstanding_tokens = 100          # d1 is busier, but holds the conversation
    nxt = place(router, [d1, d2, p], long_chat + ids(20, 3))
    assert (nxt.replica, nxt.prefill, nxt.decision) == (d1, p, "offload")
    # least_loaded-based pd (before prefix routing) would have picked d2; a new prompt still does.
    other = place(router, [d1, d2, p], ids(120, 4))
    assert (other.replica, other.decision) == (d2, "offload")
    # Short prompts stay local, also placed by prefix (once d1 is within the bound again).
    release(d1, None, route(long_chat + ids(20, 3)).load_tokens)
    short = router.place([d1, d2, p], route(long_chat[:40]))
    assert (short.replica, short.prefill, short.decision) == (d1, None, "local_short")


# -- through the pool -------------------------------------------------------------------------
@pytest.fixture
def tmpdir_short():
    # ipc paths must be short (108 bytes), so not pytest's deep tmp_path
    with tempfile.TemporaryDirectory(prefix="tr") as d:
        yield d


def test_the_pool_routes_by_prefix_and_forgets_a_lost_replica(tmpdir_short):
    from gateway.replica_client import ReplicaPool
    from tests.fake_replica import FakeReplica
    from tests.test_gateway import HANG_S

    reps = {rid: FakeReplica(rid, f"ipc://{tmpdir_short}/pr-{rid}", step_s=0.5) for rid in "ab"}

    async def main():
        pool = ReplicaPool(f"ipc://{tmpdir_short}/pr-out", {rid: r.input_addr for rid, r in reps.items()},
                           router=make_router("prefix"))
        for r in reps.values():
            r.start(pool.output_addr)
        try:
            await pool.wait_ready(HANG_S)
            sampling = SamplingParams(max_tokens=1000)
            chat_a, chat_b = ids(64, 1), ids(64, 2)
            s1 = await pool.submit("1", chat_a, sampling)
            s2 = await pool.submit("2", chat_b, sampling)
            assert (s1.replica_id, s2.replica_id) == ("a", "b")
            # b is idle again, a still busy: the conversation on a goes back to a all the same.
            s2.abort()
            assert (await pool.submit("3", chat_a + [7] * 20, sampling)).replica_id == "a"
            assert pool.route_decisions["prefix_hit"] == 1 and pool.replicas["a"].prefix_blocks
            pool.replica_lost("a", "test")
            assert not pool.replicas["a"].prefix_blocks and pool.replicas["b"].prefix_blocks
        finally:
            await pool.close()

    try:
        asyncio.run(asyncio.wait_for(main(), 2 * HANG_S))
    finally:
        for r in reps.values():
            r.stop()


# -- the option registry ----------------------------------------------------------------------
def test_every_routing_name_is_accepted_everywhere_and_a_bad_one_is_named(capsys):
    from cluster.cli import _deployment, build_parser
    from cluster.spec import DeploymentSpec

    assert "prefix" in ROUTING
    parser = build_parser()
    for name in ROUTING:
        prefill = ["--prefill-replicas", "1", "--decode-replicas", "1"] if name == "pd" else []
        spec = _deployment(parser.parse_args(["serve", "--routing", name, *prefill]))
        assert spec.routing == name and make_router(spec.routing) is not None
        yaml = f"routing: {name}\nreplicas: [{{role: prefill}}, {{role: decode}}]"
        assert DeploymentSpec.from_yaml(yaml).routing == name
        assert parser.parse_args(["sim", "run", "--routing", name]).routing == name
    capsys.readouterr()
    for argv in (["serve", "--routing", "nearest"], ["sim", "run", "--routing", "nearest"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
        assert "'nearest'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="'nearest'"):
        DeploymentSpec.from_yaml("routing: nearest\nreplicas: [{role: hybrid}]")
    with pytest.raises(ValueError, match="'nearest'.*prefix"):
        make_router("nearest")
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--help"])
    assert "prefix: the replica that was sent the longest" in " ".join(capsys.readouterr().out.split())


def test_the_simulator_runs_prefix_routing_as_least_loaded():
    from tests.test_sim import _hybrid, _workload

    wl = _workload(n=60, qps=8.0, seed=3)
    ll = _hybrid(n=2, routing="least_loaded").run(wl)
    res = _hybrid(n=2, routing="prefix").run(wl)
    timing = [(r.ttft_s, r.e2e_s, r.itl_s) for r in res.run.requests]
    assert timing == [(r.ttft_s, r.e2e_s, r.itl_s) for r in ll.run.requests]
    assert res.decisions == {"prefix_miss": len(wl)}


# -- end to end: two real replicas ------------------------------------------------------------
CHATS, TURNS = 4, 4
E2E_SYSTEM = ids(2 * BLOCK, 11)        # shared by every request
MESSAGE, ANSWER = 2 * BLOCK, BLOCK      # each turn's new message, and a stand-in of its answer


def conversation(c: int) -> list[list[int]]:
    """The prompts of conversation c, turn by turn: the system prompt, every earlier message and
    answer, and the new message -- turn k+1 starts with the whole prompt of turn k."""
    prompts, history = [], list(E2E_SYSTEM)
    for k in range(TURNS):
        history += ids(MESSAGE, 100 + 10 * c + k)
        prompts.append(list(history))
        history += ids(ANSWER, 500 + 10 * c + k)
    return prompts


def serve_chats(model_dir, routing: str) -> tuple[float, float, dict]:
    """Run the chats on 2 replicas: turn k of every conversation in one batched request (so the
    gateway places them in list order, before any runs), the list rotated by one each turn --
    least_loaded, alternating replicas in list order, then sends every conversation to the other
    replica each turn. Returns prefix-cache (hits, queries) in tokens and the routing decisions."""
    from bench.server import local_server
    from tests.test_pd import base_args, metric, wait_idle

    chats = [conversation(c) for c in range(CHATS)]
    with local_server([*base_args(model_dir), "--hybrid-replicas", "2", "--routing", routing]) as srv:
        for k in range(TURNS):
            order = [(c + k) % CHATS for c in range(CHATS)]
            r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
                "model": "tiny", "prompt": [chats[c][k] for c in order], "max_tokens": 4,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
        h = wait_idle(srv.url)
        hits, queries = (metric(srv.url, f"tandem:prefix_cache_{n}_total") for n in ("hits", "queries"))
    return hits, queries, h["routing"]


def test_multi_turn_chats_hit_the_prefix_cache_more_with_prefix_routing(tiny_model_dir):
    """~15 s here: two servers of 2 tiny replicas, 16 requests each."""
    prompts = [p for c in range(CHATS) for p in conversation(c)]
    ll_hits, ll_queries, _ = serve_chats(tiny_model_dir, "least_loaded")
    hits, queries, decisions = serve_chats(tiny_model_dir, "prefix")
    assert queries == ll_queries == sum(map(len, prompts))
    # prefix: every later turn went back to its conversation's replica and found the whole
    # previous prompt there (whole blocks: 64, 112, 160 tokens).
    assert decisions.get("prefix_hit", 0) >= CHATS * (TURNS - 1), decisions
    previous = sum(len(p) // BLOCK * BLOCK for c in range(CHATS) for p in conversation(c)[:-1])
    assert hits >= previous, (hits, previous)
    # least_loaded moved each conversation every turn: it found the turn before last, at most.
    assert ll_hits / ll_queries + 0.15 < hits / queries, (ll_hits, ll_queries, hits, queries)
