"""Routing policies: which replica streams a request, and whether a prefill replica computes its
prompt first (conditional disaggregation).

    round_robin   cycle through the decode-capable replicas (hybrid or decode)
    least_loaded  the decode-capable replica with the fewest outstanding tokens
    pd            least_loaded, and a prompt longer than `offload_threshold` goes to the prefill
                  replica with the shortest queue -- if that queue is short; else it is prefilled
                  where it decodes (stall-free chunking keeps that cheap)

The policies read the counters of `ReplicaState` that `charge`, `release` and `prefill_landed`
keep: the gateway's `ReplicaPool` calls them as requests are placed, finish and get their first
token, and a simulator can drive the same accounting without sockets.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.replica_state import ReplicaState

ROUTING = ("round_robin", "least_loaded", "pd")


@dataclass
class Placement:
    replica: ReplicaState
    """Where the request runs and streams its tokens from."""
    prefill: ReplicaState | None = None
    """pd only: the prefill replica that computes the prompt and pushes its KV to `replica`."""
    decision: str = "local"
    """Why: local (no choice to make) | offload | local_short | local_prefill_busy."""


class Router(Protocol):
    def place(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> Placement | None:
        """Choose among healthy replicas with room; None if none can take the request."""


def decode_capable(replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    return [r for r in replicas if r.role != "prefill"]


class RoundRobin:
    def __init__(self) -> None:
        self._counter = 0

    def place(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> Placement | None:
        ordered = sorted(decode_capable(replicas), key=lambda r: r.replica_id)
        if not ordered:
            return None
        choice = ordered[self._counter % len(ordered)]
        self._counter += 1
        return Placement(choice)


class LeastLoaded:
    """Fewest outstanding tokens (prompt + max_tokens of requests in flight); ties by id."""

    def place(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> Placement | None:
        candidates = decode_capable(replicas)
        if not candidates:
            return None
        return Placement(min(candidates, key=lambda r: (r.outstanding_tokens, r.replica_id)))


class ConditionalDisaggregation(LeastLoaded):
    def __init__(self, offload_threshold: int, max_prefill_queue: int = 4) -> None:
        self.offload_threshold = offload_threshold
        self.max_prefill_queue = max_prefill_queue

    def place(self, replicas: Sequence[ReplicaState], prompt_tokens: int) -> Placement | None:
        placement = super().place(replicas, prompt_tokens)
        if placement is None:
            return None
        if prompt_tokens <= self.offload_threshold:
            placement.decision = "local_short"
            return placement
        prefills = [r for r in replicas if r.role == "prefill"]
        if placement.replica.role != "decode" and not any(r.role == "decode" for r in replicas):
            return placement
        if placement.replica.role != "decode":  # KV can only be pushed to decode replicas
            placement = Placement(min((r for r in replicas if r.role == "decode"),
                                      key=lambda r: (r.outstanding_tokens, r.replica_id)))
        queue = min(prefills, key=lambda r: (r.prefill_queue, r.replica_id), default=None)
        if queue is None or queue.prefill_queue >= self.max_prefill_queue:
            placement.decision = "local_prefill_busy"
            return placement
        placement.prefill = queue
        placement.decision = "offload"
        return placement


def charge(placement: Placement, load_tokens: int) -> None:
    """Count a request just placed by `placement` against its replicas: one more outstanding
    request and `load_tokens` (prompt + max_tokens) on the streaming replica, and one more prompt
    in the queue of its prefill replica, if any."""
    placement.replica.outstanding += 1
    placement.replica.outstanding_tokens += load_tokens
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


def make_router(name: str, offload_threshold: int = 512):
    if name == "round_robin":
        return RoundRobin()
    if name == "least_loaded":
        return LeastLoaded()
    if name == "pd":
        return ConditionalDisaggregation(offload_threshold)
    raise ValueError(f"unknown routing {name!r}; choose from {ROUTING}")
