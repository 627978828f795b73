"""The waiting queue: weighted-fair across tenants, FCFS within each tenant.

A tenant is whatever the gateway put in `Request.tenant` (an API key's name or the request's
`user` field; "default" otherwise). Each tenant has its own FIFO; the queue's head -- the request
admission looks at next -- is the head of the backlogged tenant with the least *normalized
service*: tokens computed for that tenant (prefill and decode chunks, charged when a batch is
scheduled) divided by its weight. Ties go to the earlier arrival, then the tenant name, so the
order is deterministic. This is start-time fair queueing over tokens, which is what makes the
token throughput of saturated tenants follow their weights; counting requests instead would let
a tenant with long prompts take more than its share.

Idle tenants do not bank credit: when a tenant's FIFO goes from empty to non-empty, its service is
raised to at least the current virtual time (the least normalized service among the tenants
backlogged at that moment, remembered when nobody is), so a tenant that was quiet for an hour
cannot then monopolise the replica for an hour. It only gets its share from now on.

The head never skips: if the chosen head does not fit (blocks, batch slots), admission stops, as
the single FCFS queue always did. Skipping to a smaller request of another tenant would starve
large requests under load.

With one tenant -- or `fair=False` (the FCFS baseline: every request in one FIFO whatever its
tenant) -- this is exactly the old `deque`: same head, same order, same iteration.

Deque-like API for the rest of the scheduler: `append`, `appendleft` (back to the head of the
request's own tenant: preemption, a failed remote prefill), `remove`, `len`, truthiness,
iteration (tenant by tenant, each FIFO in order; callers only count or sum over it), `[0]`.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping

from scheduler.request import Request

_ONE_QUEUE = ""
"""The FIFO key of every request when fairness is off."""


class WaitingQueue:
    def __init__(self, weights: Mapping[str, float] | None = None, fair: bool = True) -> None:
        self.weights = dict(weights or {})
        """Tenant -> weight; tenants not listed weigh 1."""
        self.fair = fair
        self._queues: dict[str, deque[Request]] = {}
        self._len = 0
        self.service: dict[str, float] = {}
        """Tenant -> tokens charged so far (raised to the virtual time when it becomes backlogged)."""
        self._vtime = 0.0
        """Virtual time: the least normalized service among the backlogged tenants, taken when a
        tenant joins them (and when the last backlog drains); never decreases."""

    # -- fairness ---------------------------------------------------------------------------
    def weight(self, tenant: str) -> float:
        return self.weights.get(tenant, 1.0)

    def _key(self, request: Request) -> str:
        return request.tenant if self.fair else _ONE_QUEUE

    def _normalized(self, tenant: str, pending: Mapping[str, int] | None = None) -> float:
        extra = pending.get(tenant, 0) if pending else 0
        return (self.service.get(tenant, 0.0) + extra) / self.weight(tenant)

    def charge(self, tenant: str, tokens: int) -> None:
        """Count `tokens` computed for `tenant` (called for every chunk of a scheduled batch)."""
        if self.fair:
            self.service[tenant] = self.service.get(tenant, 0.0) + tokens

    def head(self, pending: Mapping[str, int] | None = None) -> Request:
        """The next request to admit. `pending`: tokens admitted in the current step but not yet
        charged (admission charges a whole batch at once), so one step's admissions already
        alternate between tenants."""
        if len(self._queues) == 1:
            return next(iter(self._queues.values()))[0]
        if not self._queues:
            raise IndexError("the waiting queue is empty")
        best = min(self._queues, key=lambda t: (self._normalized(t, pending),
                                               self._queues[t][0].arrival_time, t))
        return self._queues[best][0]

    def _backlogged(self, key: str) -> deque[Request]:
        """`key`'s FIFO, created (and its service raised to the virtual time) if it was empty."""
        q = self._queues.get(key)
        if q is None:
            if self.fair:
                if self._queues:
                    self._vtime = max(self._vtime, min(self._normalized(t) for t in self._queues))
                floor = self._vtime * self.weight(key)
                if self.service.get(key, 0.0) < floor:
                    self.service[key] = floor
            q = self._queues[key] = deque()
        return q

    # -- deque-like API ---------------------------------------------------------------------
    def append(self, request: Request) -> None:
        self._backlogged(self._key(request)).append(request)
        self._len += 1

    def appendleft(self, request: Request) -> None:
        self._backlogged(self._key(request)).appendleft(request)
        self._len += 1

    def remove(self, request: Request) -> None:
        key = self._key(request)
        q = self._queues.get(key)
        if q is None:
            raise ValueError(f"request {request.request_id!r} is not waiting")
        q.remove(request)
        self._len -= 1
        if not q:
            del self._queues[key]
            if self.fair and not self._queues:
                # The last backlog drained: remember where it was, so that the next tenant to
                # queue does not start from an old, lower virtual time.
                self._vtime = max(self._vtime, self._normalized(key))

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        for q in list(self._queues.values()):
            yield from q

    def __getitem__(self, index: int) -> Request:
        if index != 0:
            raise IndexError("only the head ([0]) of the waiting queue can be indexed")
        return self.head()

    def tenant_lengths(self) -> dict[str, int]:
        """Waiting requests per FIFO (one entry, "", when fairness is off)."""
        return {t: len(q) for t, q in self._queues.items()}
