"""What the gateway knows about each replica (routing policies are in gateway/routing.py)."""
from __future__ import annotations

from collections import OrderedDict
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
    outstanding_tokens: int = 0
    """Prompt + max_tokens of the requests in flight here (least_loaded routing)."""
    prefill_queue: int = 0
    """Prefill replicas: prompts handed to it whose KV has not landed yet (pd routing)."""
    lost: bool = False
    """Its process exited or its socket dropped: out of routing until it reports ready again
    (a new process) or, after its socket reconnects, sends a frame (the same process)."""
    lost_pid: int | None = None
    """The pid that was lost: a `ReplicaReady` from it again does not re-admit it."""
    reconnected: bool = False
    """Its socket connected again since it was lost."""
    restarts: int = 0
    """New processes seen under this replica id since the first one."""
    prefix_blocks: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    """Prefix routing: the block-prefix hashes of the prompts routed here, least recently routed
    first (bounded; `gateway.routing.remember_prefix` keeps it) -- the gateway's guess of what this
    replica has cached, since it cannot see its cache. Emptied when the replica is lost or
    restarts: a new process starts with an empty cache."""

    @property
    def role(self) -> str:
        return self.ready.role if self.ready is not None else "hybrid"

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
        return (self.ready is not None and not self.timed_out and not self.lost
                and self.last_seen is not None and now - self.last_seen <= heartbeat_timeout_s)
