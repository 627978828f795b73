"""What every replica scheduler shares: queues, admission checks, preemption, and `update`.

The replica loop is three calls and this module owns two of them:

    out = scheduler.schedule()            # plain data: which requests get how many tokens
    sampled = runner.execute(out)         # {request_id: token_id} for chunks that reach the end
    updated = scheduler.update(out, sampled)

`update` is the only place tokens are appended and requests finish by EOS/length; `finish` ends a
request from outside the step (client abort, stop string found by the detokenizer).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from scheduler.block_manager import BlockManager
from scheduler.config import SchedulerConfig
from scheduler.request import FinishReason, Request, RequestStatus


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
    """Base class: a policy implements `schedule()`; everything else is shared."""

    def __init__(self, config: SchedulerConfig, num_blocks: int) -> None:
        self.config = config
        self.token_budget = config.token_budget
        self.block_manager = BlockManager(num_blocks, config.block_size)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._by_id: dict[str, Request] = {}
        self.num_preemptions = 0

    # -- queue management -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
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
        self._by_id[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        return self._by_id.get(request_id)

    @property
    def num_unfinished(self) -> int:
        return len(self._by_id)

    def has_work(self) -> bool:
        return bool(self._by_id)

    def finish(self, request_id: str, reason: FinishReason) -> Request | None:
        """End a request now (abort, stop string); frees its blocks. Unknown ids are ignored."""
        request = self._by_id.get(request_id)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._release(request, reason)
        return request

    def _release(self, request: Request, reason: FinishReason) -> None:
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.block_manager.free(request)
        del self._by_id[request.request_id]

    # -- policy helpers ---------------------------------------------------------------------
    def admit(self, request: Request) -> bool:
        """Move the head of `waiting` to running if all its current tokens fit in free blocks."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        if not self.block_manager.can_allocate(request, request.num_tokens):
            return False
        self.block_manager.allocate(request, request.num_tokens)
        self.waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        return True

    def reserve_decode_slot(self, request: Request, out: SchedulerOutput) -> bool:
        """Make room for one more token of `request`, preempting the newest arrivals if needed.

        Returns False when `request` itself had to be preempted.
        """
        while not self.block_manager.can_allocate(request, request.num_tokens):
            victim = max(self.running, key=lambda r: r.arrival_time)
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

    def schedule(self, now: float) -> SchedulerOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- the only place tokens are appended -------------------------------------------------
    def update(self, out: SchedulerOutput, sampled: Mapping[str, int], now: float) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish on EOS/length.

        Returns the requests that got a token this step (finished ones included).
        """
        updated: list[Request] = []
        for chunk in out.chunks:
            request = chunk.request
            if request.is_finished:
                continue
            reaches_end = chunk.samples
            request.num_computed_tokens += chunk.num_tokens
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
        live: Iterable[Request] = [*self.running, *self.waiting]
        self.block_manager.check_integrity(live)
        for r in self.waiting:
            assert not r.block_ids, f"waiting request {r.request_id} holds blocks"
        for r in self.running:
            assert r.num_computed_tokens <= r.num_tokens
            assert len(r.block_ids) * self.block_manager.block_size >= r.num_computed_tokens
