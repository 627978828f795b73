"""Routing policies: which replica streams a request, and whether a prefill replica computes its
prompt first (conditional disaggregation).

    round_robin   cycle through the decode-capable replicas (hybrid or decode)
    least_loaded  the decode-capable replica with the fewest outstanding tokens
    prefix        the decode-capable replica that was sent the longest run of the prompt's leading
                  KV blocks (so its prefix cache likely holds them), unless that replica carries
                  more than its share of the load; else least_loaded (`PrefixAffinity`)
    pd            a prompt longer than `offload_threshold` goes to the prefill replica with the
                  shortest queue -- if that queue is short; else it is prefilled where it decodes
                  (stall-free chunking keeps that cheap). The replica that decodes is chosen as
                  `prefix` chooses (the decode replica skips the KV it has cached)

The policies read the counters of `ReplicaState` that `charge`, `release` and `prefill_landed`
keep: the gateway's `ReplicaPool` calls them as requests are placed, finish and get their first
token, and a simulator can drive the same accounting without sockets. `charge` also records the
prompt's block hashes on the chosen replica for `prefix` (`remember_prefix`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.replica_state import ReplicaState
from scheduler.block_manager import prefix_hashes

ROUTING_HELP = {
    "round_robin": "cycle through the replicas that decode",
    "least_loaded": "the replica with the fewest outstanding tokens (prompt + max_tokens in flight)",
    "prefix": "the replica that was sent the longest leading run of the prompt's KV blocks, as its "
              "prefix cache likely holds them (multi-turn chats stay on one replica), unless its "
              "outstanding tokens exceed 1.25 x the other replicas' mean plus this request's; "
              "else least_loaded",
    "pd": "conditional disaggregation: prompts over --offload-threshold go to a prefill replica "
          "when its queue is short; the decode replica is chosen as by prefix",
}
"""Every routing policy `make_router` knows, with the line the command-line help shows for it."""
ROUTING = tuple(ROUTING_HELP)
"""Names of the routing policies: the one list every option and spec check derives from."""

MAX_REMEMBERED_BLOCKS = 1 << 16
"""Most block hashes prefix routing remembers per replica (~10 MB), whatever its KV size."""


@dataclass(frozen=True)
class RouteRequest:
    """What a router sees of a request."""

    num_prompt_tokens: int
    """Prompt length in tokens."""
    prompt_token_ids: Sequence[int] | None = None
    """The prompt; None where the ids mean nothing (the simulator's prompts are placeholders),
    and `prefix` then routes as least_loaded."""
    max_tokens: int = 0
    """Most tokens it generates."""

    def __post_init__(self) -> None:
        if isinstance(self.num_prompt_tokens, bool) or not isinstance(self.num_prompt_tokens, int) \
                or self.num_prompt_tokens < 0:
            raise ValueError(f"num_prompt_tokens must be an integer >= 0, got {self.num_prompt_tokens!r}")
        if self.prompt_token_ids is not None and len(self.prompt_token_ids) != self.num_prompt_tokens:
            raise ValueError(f"num_prompt_tokens is {self.num_prompt_tokens} but prompt_token_ids has "
                             f"{len(self.prompt_token_ids)} ids")

    @classmethod
    def of(cls, prompt_token_ids: Sequence[int], max_tokens: int = 0) -> "RouteRequest":
        return cls(len(prompt_token_ids), prompt_token_ids, max_tokens)

    @property
    def load_tokens(self) -> int:
        """What it adds to its replica's outstanding tokens (as the pool charges it)."""
        return self.num_prompt_tokens + self.max_tokens


@dataclass
class Placement:
    replica: ReplicaState
    """Where the request runs and streams its tokens from."""
    prefill: ReplicaState | None = None
    """pd only: the prefill replica that computes the prompt and pushes its KV to `replica`."""
    decision: str = "local"
    """Why: local (no choice to make) | prefix_hit | prefix_miss | prefix_overloaded (prefix) |
    offload | local_short | local_prefill_busy (pd)."""
    prefix_hashes: Sequence[bytes] = ()
    """prefix and pd: the prompt's block hashes at `replica`'s block size, which `charge`
    remembers there."""


class Router(Protocol):
    def place(self, replicas: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        """Choose among healthy replicas with room; None if none can take the request."""


def decode_capable(replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    return [r for r in replicas if r.role != "prefill"]


class RoundRobin:
    def __init__(self) -> None:
        self._counter = 0

    def place(self, replicas: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        ordered = sorted(decode_capable(replicas), key=lambda r: r.replica_id)
        if not ordered:
            return None
        choice = ordered[self._counter % len(ordered)]
        self._counter += 1
        return Placement(choice)


class LeastLoaded:
    """Fewest outstanding tokens (prompt + max_tokens of requests in flight); ties by id."""

    def place(self, replicas: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        candidates = decode_capable(replicas)
        if not candidates:
            return None
        return Placement(least_loaded(candidates))


def least_loaded(candidates: Sequence[ReplicaState]) -> ReplicaState:
    """Fewest outstanding tokens; ties by id, so equal requests spread evenly."""
    return min(candidates, key=lambda r: (r.outstanding_tokens, r.replica_id))


@dataclass(frozen=True)
class PrefixConfig:
    """Settings of prefix routing (`PrefixAffinity`, and pd's choice of the decode replica)."""

    load_slack: float = 0.25
    """A replica that holds the prompt's prefix is chosen only while its outstanding tokens are at
    most (1 + load_slack) x the mean of the other candidates' plus this request's tokens. Without
    a bound one hot prefix (a system prompt every request starts with) would pile every request
    onto the replica that saw it first; a tight one gives up hits at the first imbalance. 0.25
    lets a holder run a quarter above the others (a middle ground, not tuned: see
    docs/results.md for the one benchmark; the --routing help quotes 1.25). The one request
    added lets a lightly loaded cluster keep a conversation where it is: one request ahead of an
    idle replica costs little queueing, and a hit saves a prefill. The others' mean, not the
    minimum: with many replicas one idle one must not make every holder look overloaded; and not
    the mean of all, which the holder's own load raises (with two replicas that would let a
    holder run to 1.67x the other)."""
    max_blocks: int = 256
    """Leading blocks of a prompt hashed and remembered (4096 tokens at block size 16): bounds the
    hashing per request; further blocks rarely tell two replicas apart."""

    def __post_init__(self) -> None:
        if isinstance(self.load_slack, bool) or not isinstance(self.load_slack, (int, float)) \
                or not self.load_slack >= 0:
            raise ValueError(f"load_slack must be a number >= 0, got {self.load_slack!r}")
        if isinstance(self.max_blocks, bool) or not isinstance(self.max_blocks, int) or self.max_blocks < 1:
            raise ValueError(f"max_blocks must be an integer >= 1, got {self.max_blocks!r}")


class PrefixAffinity:
    """Prefix-aware routing: send a request where its prompt's leading KV blocks likely are cached.

    The gateway cannot see the replicas' caches, so it remembers what it routed: `charge` records
    the chained hashes of each prompt's full blocks (the block manager's own `prefix_hashes`, at
    the replica's block size, so they name exactly what the replica caches) on the replica it
    went to, in a bounded LRU (`ReplicaState.prefix_blocks`). A request's match on a replica is
    the number of its leading block hashes found there -- tokens, where block sizes differ. It
    goes to the longest match among the replicas within the load bound (`PrefixConfig.load_slack`;
    ties: the less loaded, then by id); with no match it goes to the least loaded (`prefix_miss`),
    as it does when every replica with a match is over the bound (`prefix_overloaded`): it then
    lands elsewhere, is remembered there, and the hot prefix has two holders to share the load.

    Asking replicas for their cached hashes instead would cost a protocol change and a stream of
    hashes; a remembered prefix the replica has since evicted costs only a missed hit, never a
    wrong answer (the replica checks its own cache). Without prompt ids (`RouteRequest`: the
    simulator's placeholders) every request is a miss, i.e. least_loaded.
    """

    def __init__(self, config: PrefixConfig | None = None) -> None:
        self.config = config or PrefixConfig()

    def place(self, replicas: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        return self.choose(decode_capable(replicas), request)

    def choose(self, candidates: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        """The prefix choice among `candidates` (all of them may run the request)."""
        if not candidates:
            return None
        ids = request.prompt_token_ids
        by_block_size: dict[int, list[bytes]] = {}

        def hashes(replica: ReplicaState) -> list[bytes]:
            if ids is None or replica.ready is None:
                return []
            size = replica.ready.block_size
            if size not in by_block_size:
                by_block_size[size] = prefix_hashes(ids, size, min(len(ids) // size, self.config.max_blocks))
            return by_block_size[size]

        matched: dict[str, int] = {}   # replica id -> tokens of the prompt's longest remembered prefix
        for r in candidates:
            blocks = 0
            if r.prefix_blocks:
                for h in hashes(r):
                    if h not in r.prefix_blocks:
                        break
                    blocks += 1
            matched[r.replica_id] = blocks * r.ready.block_size if blocks else 0
        total, n = sum(r.outstanding_tokens for r in candidates), len(candidates)

        def within_bound(r: ReplicaState) -> bool:
            if n == 1:
                return True
            others = (total - r.outstanding_tokens) / (n - 1)
            return r.outstanding_tokens <= (1 + self.config.load_slack) * others + request.load_tokens

        holders = [r for r in candidates if matched[r.replica_id]]
        within = [r for r in holders if within_bound(r)]
        if within:
            choice = min(within, key=lambda r: (-matched[r.replica_id], r.outstanding_tokens, r.replica_id))
            decision = "prefix_hit"
        else:
            choice = least_loaded(candidates)
            decision = "prefix_overloaded" if holders else "prefix_miss"
        return Placement(choice, decision=decision, prefix_hashes=hashes(choice))


class ConditionalDisaggregation:
    def __init__(self, offload_threshold: int, max_prefill_queue: int = 4,
                 prefix: PrefixConfig | None = None) -> None:
        self.offload_threshold = offload_threshold
        self.max_prefill_queue = max_prefill_queue
        self.affinity = PrefixAffinity(prefix)
        """Chooses the replica that decodes: one holding the prompt's prefix is sent less KV
        (a decode replica asks only for what it lacks) or prefills less."""

    def place(self, replicas: Sequence[ReplicaState], request: RouteRequest) -> Placement | None:
        placement = self.affinity.place(replicas, request)
        if placement is None:
            return None
        placement.decision = "local"   # pd's decisions are counted, not the prefix ones
        if request.num_prompt_tokens <= self.offload_threshold:
            placement.decision = "local_short"
            return placement
        prefills = [r for r in replicas if r.role == "prefill"]
        decodes = [r for r in replicas if r.role == "decode"]
        if placement.replica.role != "decode" and not decodes:
            return placement
        if placement.replica.role != "decode":  # KV can only be pushed to decode replicas
            placement = self.affinity.choose(decodes, request)
        queue = min(prefills, key=lambda r: (r.prefill_queue, r.replica_id), default=None)
        if queue is None or queue.prefill_queue >= self.max_prefill_queue:
            placement.decision = "local_prefill_busy"
            return placement
        placement.prefill = queue
        placement.decision = "offload"
        return placement


def remember_prefix(replica: ReplicaState, hashes: Sequence[bytes]) -> None:
    """Record that a prompt with these leading block hashes went to `replica` (prefix routing):
    most recent first, at most min(its KV blocks, `MAX_REMEMBERED_BLOCKS`) kept -- it cannot
    cache more blocks than it has. A prompt's last block is marked least recent of its blocks,
    so, as in the replica's cache, a prefix's end is forgotten before its start."""
    blocks = replica.prefix_blocks
    for h in reversed(hashes):
        blocks[h] = None
        blocks.move_to_end(h)
    capacity = MAX_REMEMBERED_BLOCKS
    if replica.ready is not None:
        capacity = min(replica.ready.num_blocks, capacity)
    while len(blocks) > capacity:
        blocks.popitem(last=False)


def charge(placement: Placement, load_tokens: int) -> None:
    """Count a request just placed by `placement` against its replicas: one more outstanding
    request and `load_tokens` (prompt + max_tokens) on the streaming replica, and one more prompt
    in the queue of its prefill replica, if any; and remember the prompt's blocks on the
    streaming replica (prefix routing)."""
    placement.replica.outstanding += 1
    placement.replica.outstanding_tokens += load_tokens
    if placement.prefix_hashes:
        remember_prefix(placement.replica, placement.prefix_hashes)
    if placement.prefill is not None:
        placement.prefill.prefill_queue += 1


def release(replica: ReplicaState | None, prefill: ReplicaState | None, load_tokens: int) -> None:
    """Undo `charge` for a request that finished (or moves elsewhere). `prefill` is None once its
    prefill has landed (`prefill_landed` already freed that slot); either is None when the
    replica is no longer known."""
    if replica is not None:
        replica.outstanding -= 1
        replica.outstanding_tokens -= load_tokens
    prefill_landed(prefill)


def prefill_landed(prefill: ReplicaState | None) -> None:
    """The prompt a pd request handed to `prefill` is done (its first output arrived, it ended,
    or the prefill replica was lost): free its slot in that queue. Call at most once per
    request -- the caller forgets the prefill replica afterwards."""
    if prefill is not None:
        prefill.prefill_queue -= 1


def make_router(name: str, offload_threshold: int = 512, prefix: PrefixConfig | None = None) -> Router:
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "prefix":
        return PrefixAffinity(prefix)
    if name == "pd":
        return ConditionalDisaggregation(offload_threshold, prefix=prefix)
    raise ValueError(f"unknown routing {name!r}; choose from {ROUTING}")
