"""What every replica scheduler shares: queues, admission checks, preemption, and `update`.

The replica loop is three calls and this module owns two of them:

    out = scheduler.schedule()            # plain data: which requests get how many tokens
    sampled = runner.execute(out)         # {request_id: token_id} for chunks that reach the end
    updated = scheduler.update(out, sampled)

`update` is the only place tokens are appended and requests finish by EOS/length; `finish` ends a
request from outside the step (client abort, stop string found by the detokenizer).

Batches in flight: `schedule` records the batch's request ids in `in_flight` and `update` removes
them, so an engine that keeps several batches going at once (pipeline stages; the simulator's
`--pp`) may call `schedule` again before the earlier batches are updated. A request in flight is
skipped by every building block -- its computed count is not advanced yet, so one more chunk for
it would repeat work -- and is never a preemption victim, since a stage is writing its KV. An
engine that alternates `schedule`/`update` has an empty `in_flight` at every `schedule`, and then
all of this changes nothing.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.budget import BudgetController, StaticBudget, StepFeatures
from scheduler.config import SchedulerConfig
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.telemetry import IterationStats
from scheduler.tenants import WaitingQueue


@dataclass(frozen=True)
class ScheduledChunk:
    request: Request
    num_tokens: int
    """Tokens to compute this step, starting at `request.num_computed_tokens`."""

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the request, so the step samples its next token."""
        return self.request.num_computed_tokens + self.num_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    """Batch order: decodes first, then prefill chunks (the runner keeps this order)."""
    token_budget: int
    preempted_ids: list[str] = field(default_factory=list)
    features: StepFeatures | None = None
    """What the step's time depends on, recorded by `schedule` (chunk starts change at `update`)."""

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_decode_tokens(self) -> int:
        return sum(1 for c in self.chunks if c.num_tokens == 1 and c.samples)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - self.num_decode_tokens

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class AdmissionError(ValueError):
    """The request can never run on this replica (longer than the context or the whole cache)."""


class Scheduler:
    """Base class: a policy implements `plan()`; everything else is shared."""

    def __init__(self, config: SchedulerConfig, num_blocks: int,
                 budget: BudgetController | None = None) -> None:
        self.config = config
        self.budget = budget or StaticBudget(config.token_budget)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.watermark_blocks = int(config.watermark * num_blocks)
        self.waiting = WaitingQueue(dict(config.tenant_weights), config.tenant_fair_share)
        """Weighted-fair across tenants, FCFS within one; a plain FIFO with a single tenant."""
        self.running: list[Request] = []
        self.remote_prefill: dict[str, Request] = {}
        """Decode side of disaggregation: requests holding blocks while their KV is pushed here."""
        self._by_id: dict[str, Request] = {}
        self.in_flight: set[str] = set()
        """Ids of the requests in a batch that `schedule` returned and `update` has not seen yet."""
        self.num_preemptions = 0

    @property
    def token_budget(self) -> int:
        return self.budget.value

    def observe(self, stats: IterationStats) -> None:
        """Feed one step's telemetry to the budget controller (after `update`)."""
        self.budget.observe(stats)

    # -- queue management -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self._validate(request)
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def _validate(self, request: Request) -> None:
        if request.request_id in self._by_id:
            raise AdmissionError(f"duplicate request id {request.request_id!r}")
        if not request.prompt_token_ids:
            raise AdmissionError("prompt is empty")
        limit = self.config.max_model_len
        if request.num_tokens + request.sampling.max_tokens > limit:
            raise AdmissionError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling.max_tokens}) exceeds max_model_len {limit}"
            )
        # A request must be able to finish alone, or preemption could cycle forever.
        need = self.block_manager.blocks_for(request.num_tokens + request.sampling.max_tokens)
        if need > self.block_manager.num_blocks:
            raise AdmissionError(
                f"prompt ({request.num_prompt_tokens} tokens) + max_tokens "
                f"({request.sampling.max_tokens}) needs {need} KV blocks but the cache has "
                f"{self.block_manager.num_blocks}"
            )
        request.max_model_len = limit

    # -- disaggregated prefill (decode side) ------------------------------------------------
    def add_remote_prefill(self, request: Request) -> bool:
        """Reserve blocks for the whole prompt now; its KV will be pushed by a prefill replica.

        FCFS: the reservation may only use what the waiting queue does not need -- a batch slot
        and the prompt blocks of every waiting request stay free for them -- so it never delays a
        request that came earlier. Returns False (nothing changed) when that leaves no room; the
        caller then queues it, FCFS, for a local prefill with `add_request`. With prefix caching
        the request shares the blocks of its cached prefix, and `num_computed_tokens` says how
        many tokens those hold: their KV must not be pushed (nobody may write a shared block).
        """
        self._validate(request)
        if self.num_seqs_reserved + len(self.waiting) >= self.config.max_num_seqs:
            return False
        keep_free = self.watermark_blocks if self.running or self.waiting else 0
        keep_free += sum(self.block_manager.num_new_blocks(r, r.num_tokens) for r in self.waiting)
        reuse = self._reuses_cache(request)
        if not self.block_manager.can_allocate(request, request.num_tokens, reserve=keep_free,
                                               reuse=reuse):
            return False
        # The cached prefix counts as computed: the prefill replica sends only the rest.
        request.num_computed_tokens = self.block_manager.allocate(request, request.num_tokens, reuse=reuse)
        self._by_id[request.request_id] = request
        self.remote_prefill[request.request_id] = request
        return True

    @property
    def num_seqs_reserved(self) -> int:
        """Batch slots taken: running requests and those whose KV is being pushed here."""
        return len(self.running) + len(self.remote_prefill)

    def remote_prefill_done(self, request_id: str, now: float) -> bool:
        """The prompt's KV has landed: the request joins the running batch.

        All prompt tokens but the last count as computed; computing the last one here samples
        the first output token through the ordinary `update`, so sampling (seeds included) is
        exactly what a colocated replica would do. Returns False (and changes nothing) for a
        request that is no longer waiting for KV (it ended meanwhile): a late "done" is harmless.
        """
        request = self.remote_prefill.pop(request_id, None)
        if request is None:
            return False
        request.num_computed_tokens = request.num_prompt_tokens - 1
        request.status = RequestStatus.RUNNING
        request.first_scheduled_time = now
        self.running.append(request)
        return True

    def remote_prefill_failed(self, request_id: str) -> bool:
        """The transfer failed or timed out: drop the partial KV and prefill locally, first in line.
        Returns False (nothing changed) for a request no longer waiting for KV."""
        request = self.remote_prefill.pop(request_id, None)
        if request is None:
            return False
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        self.waiting.appendleft(request)
        return True

    def add_cached(self, request: Request, num_cached_tokens: int, now: float = 0.0) -> None:
        """Join the running batch with the first `num_cached_tokens` tokens counted as already in
        the KV cache (their blocks are allocated, not computed). `tandem profile` builds steps of
        a chosen shape this way: decodes at a given context, prefill chunks after a given prefix."""
        self._validate(request)
        if not 0 <= num_cached_tokens < request.num_tokens:
            raise ValueError(f"num_cached_tokens must be in [0, {request.num_tokens}), "
                             f"got {num_cached_tokens}")
        if not self.block_manager.can_allocate(request, request.num_tokens):
            raise AdmissionError(f"no room for {request.num_tokens} tokens of {request.request_id!r}")
        self.block_manager.allocate(request, request.num_tokens)
        request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.RUNNING
        request.first_scheduled_time = now
        self._by_id[request.request_id] = request
        self.running.append(request)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    def has_work(self) -> bool:
        """Whether a step would compute anything (requests awaiting remote KV do not count)."""
        return bool(self.running or self.waiting)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request now (abort, stop string); frees its blocks. Unknown ids are ignored."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        # In flight: the batch's later `update` skips it (finished), so this is its only release.
        self.in_flight.discard(request_id)
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif self.remote_prefill.pop(request_id, None) is None:
            self.waiting.remove(request)
        self._release(request, reason)
        return request

    def _release(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.block_manager.free(request)
        del self._by_id[request.request_id]

    # -- policy helpers ---------------------------------------------------------------------
    def _reuses_cache(self, request: Request) -> bool:
        """Whether admission may start `request` after its cached prefix: not when it asked for
        prompt logprobs, which only a prefill of the whole prompt computes."""
        return self.config.enable_prefix_caching and request.sampling.prompt_logprobs is None

    def cached_tokens(self, request: Request) -> int:
        """Tokens of a waiting `request` that `admit` would find in the prefix cache (and count as
        computed); 0 with caching off."""
        return self.block_manager.cached_tokens(request) if self._reuses_cache(request) else 0

    def admit(self, request: Request, now: float, reserve_tokens: int | None = None) -> bool:
        """Move `request` from waiting to running if blocks for `reserve_tokens` (default: its
        current tokens) can be allocated while keeping the watermark free. Its cached prefix, if
        any, is shared rather than allocated, and counts as computed."""
        if self.num_seqs_reserved >= self.config.max_num_seqs:
            return False
        tokens = request.num_tokens if reserve_tokens is None else reserve_tokens
        # With nothing running there is nobody to protect: the watermark would only block.
        keep_free = self.watermark_blocks if self.running else 0
        reuse = self._reuses_cache(request)
        if not self.block_manager.can_allocate(request, tokens, reserve=keep_free, reuse=reuse):
            return False
        cached = self.block_manager.allocate(request, tokens, reuse=reuse)
        if cached:   # its cached prefix is computed already: chunks start after it
            request.num_computed_tokens = cached
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        if request.first_scheduled_time is None:
            request.first_scheduled_time = now
        return True

    # -- building blocks the policies compose ------------------------------------------------
    def ready(self) -> list[Request]:
        """Running requests that may get a chunk now: all of them but those in flight."""
        if not self.in_flight:
            return list(self.running)
        return [r for r in self.running if r.request_id not in self.in_flight]

    def schedule_decodes(self, out: SchedulerOutput) -> int:
        """Give every running request that is decoding its one token (preempting if a block
        cannot be appended). Returns the tokens scheduled."""
        for request in [r for r in self.ready() if r.num_uncomputed_tokens == 1]:
            if request in self.running and self.reserve_decode_slot(request, out):
                out.chunks.append(ScheduledChunk(request, 1))
        return len(out.chunks)

    def prefill_room(self, out: SchedulerOutput, start: int) -> int | None:
        """Most tokens the budget controller lets a prefill chunk starting at token `start` of its
        request add to `out` (None: no cap but the token budget). A controller that predicts step
        times (`--budget slo`) sizes each chunk against the step it joins; the others never cap,
        so their schedules are exactly what the token budget alone gives."""
        if not self.budget.per_chunk:
            return None
        return self.budget.chunk_room(out.chunks, start)

    def _chunk(self, out: SchedulerOutput, start: int, want: int, left: int) -> int:
        """Tokens of the next prefill chunk: what it wants, within the budget left and the room."""
        room = self.prefill_room(out, start)
        return min(want, left) if room is None else min(want, left, room)

    def schedule_partial_prefills(self, out: SchedulerOutput, used: int, limit: int) -> int:
        """Chunks for running requests whose prompt is partly computed, within `limit` tokens
        (and the controller's `prefill_room`)."""
        for request in [r for r in self.ready() if r.num_uncomputed_tokens > 1]:
            if used >= limit:
                break
            n = self._chunk(out, request.num_computed_tokens, request.num_uncomputed_tokens,
                            limit - used)
            if n <= 0:
                break   # the step is full by the SLO: later chunks would only be longer steps
            out.chunks.append(ScheduledChunk(request, n))
            used += n
        return used

    def admit_waiting(self, out: SchedulerOutput, now: float, used: int, limit: int,
                      chunked: bool, oversize_first: bool = False) -> int:
        """Admit waiting requests FCFS while they fit; a head that does not fit blocks the queue.

        With several tenants the head is the fair one (`WaitingQueue.head`): FCFS within a
        tenant, weighted-fair across them, and a head that does not fit still blocks the queue.

        `chunked`: the last admitted prompt may be cut to the remaining tokens. Otherwise prompts
        go whole and must fit in `limit - used`, except that with `oversize_first` the first
        prompt of an iteration goes whole even past the limit (so long prompts are not starved).
        No admissions in a step that had to preempt: memory is already short. (Waiting requests
        are never in flight: only running ones are scheduled, and preemption spares those.)
        """
        first = True
        admitted: dict[str, int] = {}   # tokens per tenant this step, charged only at `schedule`
        while self.waiting and used < limit and not out.preempted_ids:
            request = self.waiting.head(admitted)
            cached = self.cached_tokens(request)
            need = request.num_uncomputed_tokens - cached
            if not chunked and need > limit - used and not (oversize_first and first):
                break
            # sized before `admit`, which would start the request: no room means it stays waiting
            n = self._chunk(out, cached, need, limit - used) if chunked else need
            if n <= 0 or not self.admit(request, now):
                break
            out.chunks.append(ScheduledChunk(request, n))
            used += n
            admitted[request.tenant] = admitted.get(request.tenant, 0) + n
            first = False
        return used

    def reserve_decode_slot(self, request: Request, out: SchedulerOutput) -> bool:
        """Make room for one more token of `request`, preempting the newest arrivals if needed.

        Returns False when `request` itself had to be preempted, or when the next victim is in
        flight: then `request` sits this batch out rather than preempt an older request in the
        victim's place, and the victim is preemptable at the first `schedule` after its batch's
        `update` (it is never in flight then), so the wait is bounded.
        """
        while not self.block_manager.can_allocate(request, request.num_tokens):
            victim = max(self.running, key=lambda r: r.arrival_time)
            if victim.request_id in self.in_flight:
                return False
            self.preempt(victim, out)
            if victim is request:
                return False
        self.block_manager.allocate(request, request.num_tokens)
        return True

    def preempt(self, request: Request, out: SchedulerOutput) -> None:
        """Preempt by recompute: drop its KV, put it at the front of the waiting queue."""
        self.running.remove(request)
        self.block_manager.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.chunks = [c for c in out.chunks if c.request is not request]
        out.preempted_ids.append(request.request_id)

    def schedule(self, now: float) -> SchedulerOutput:
        """The next batch (the policy's `plan`); its requests are in flight until `update`."""
        out = self.plan(now)
        out.features = StepFeatures.of(out.chunks)
        self.in_flight.update(c.request.request_id for c in out.chunks)
        # Fair-share service is what a batch computes for each tenant, prefill and decode alike.
        for c in out.chunks:
            self.waiting.charge(c.request.tenant, c.num_tokens)
        return out

    def plan(self, now: float) -> SchedulerOutput:  # pragma: no cover - abstract
        """The policy: build the next batch from the building blocks above."""
        raise NotImplementedError

    # -- the only place tokens are appended -------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: Mapping[str, int], now: float) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish on EOS/length.

        Returns the requests that got a token this step (finished ones included).
        """
        updated: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            if request.is_finished:   # ended while in flight: `finish` dropped it already
                continue
            self.in_flight.discard(request.request_id)
            reaches_end = chunk.samples
            request.num_computed_tokens += chunk.num_tokens
            self.block_manager.cache_computed(request)   # their KV is written now
            if not reaches_end:
                continue
            reason = request.append_token(sampled[request.request_id])
            if request.first_token_time is None:
                request.first_token_time = now
            if reason is not None:
                self.running.remove(request)
                self._release(request, reason)
            updated.append(request)
        return updated

    def check_integrity(self) -> None:
        live: Iterable[Request] = [*self.running, *self.waiting, *self.remote_prefill.values()]
        self.block_manager.check_integrity(live)
        for r in self.waiting:
            assert not r.block_ids, f"waiting request {r.request_id} holds blocks"
        running = {r.request_id for r in self.running}
        assert self.in_flight <= running, f"in flight but not running: {self.in_flight - running}"
        for r in self.running:
            assert r.num_computed_tokens <= r.num_tokens
            assert len(r.block_ids) * self.block_manager.block_size >= r.num_computed_tokens
