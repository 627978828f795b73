"""What the gateway knows about each replica, and the default routing policy over them."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from engine.protocol import ReplicaReady, ReplicaStats


@dataclass
class ReplicaState:
    """What the gateway knows about one replica."""

    replica_id: str
    address: str
    ready: ReplicaReady | None = None
    last_seen: float | None = None
    """`time.monotonic()` of the last frame from this replica."""
    stats: ReplicaStats = field(default_factory=ReplicaStats)
    outstanding: int = 0
    """Requests sent to this replica and not yet finished."""
    timed_out: bool = False
    """Set when the heartbeat timeout fired; cleared by the next frame."""

    @property
    def num_waiting(self) -> int:
        """Requests sent here and not running, as far as the gateway can tell from the latest
        report: beyond the running ones, a replica that had nobody waiting can still start up to
        `max_num_seqs`; one that had a queue (KV or batch full) starts none."""
        s = self.stats
        running = s.num_running if s.num_waiting or s.max_num_seqs <= 0 else max(
            s.num_running, s.max_num_seqs)
        return max(0, self.outstanding - running)

    def is_healthy(self, now: float, heartbeat_timeout_s: float) -> bool:
        return (self.ready is not None and not self.timed_out and self.last_seen is not None
                and now - self.last_seen <= heartbeat_timeout_s)


Router = Callable[[Sequence[ReplicaState]], ReplicaState]
"""Routing policy: picks one of the healthy replicas (never called with an empty list)."""


class RoundRobinRouter:
    """Cycle through the healthy replicas in id order."""

    def __init__(self) -> None:
        self._counter = 0

    def __call__(self, candidates: Sequence[ReplicaState]) -> ReplicaState:
        ordered = sorted(candidates, key=lambda r: r.replica_id)
        choice = ordered[self._counter % len(ordered)]
        self._counter += 1
        return choice
