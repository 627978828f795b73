"""Sarathi-Serve stall-free hybrid batching.

Per iteration with token budget tau:
1. every running request that is decoding gets its one token (preempting the newest arrival by
   recompute if a KV block cannot be appended) -- decodes are never paused for a prefill;
2. then running requests whose prefill is partly done get `min(remaining, tau - used)` tokens;
3. then waiting requests, FCFS, are admitted while their blocks can be allocated, each getting
   `min(prompt, tau - used)` tokens. A head that does not fit blocks the queue (FCFS).
"""
from __future__ import annotations

from scheduler.core import ScheduledChunk, Scheduler, SchedulerOutput


class SarathiScheduler(Scheduler):
    def schedule(self, now: float) -> SchedulerOutput:
        budget = self.token_budget
        out = SchedulerOutput(chunks=[], token_budget=budget)

        decoding = [r for r in self.running if r.num_uncomputed_tokens == 1]
        for request in decoding:
            if request in self.running and self.reserve_decode_slot(request, out):
                out.chunks.append(ScheduledChunk(request, 1))
        used = len(out.chunks)

        for request in [r for r in self.running if r.num_uncomputed_tokens > 1]:
            if used >= budget:
                break
            n = min(request.num_uncomputed_tokens, budget - used)
            out.chunks.append(ScheduledChunk(request, n))
            used += n

        # No admissions in a step that had to preempt: memory is already short.
        while self.waiting and used < budget and not out.preempted_ids:
            request = self.waiting[0]
            if not self.admit(request):
                break
            if request.first_scheduled_time is None:
                request.first_scheduled_time = now
            n = min(request.num_uncomputed_tokens, budget - used)
            out.chunks.append(ScheduledChunk(request, n))
            used += n
        return out


def make_scheduler(config, num_blocks: int) -> Scheduler:
    """The scheduler for `config.policy` (the policy family grows here)."""
    if config.policy == "sarathi":
        return SarathiScheduler(config, num_blocks)
    raise ValueError(f"unknown scheduler policy {config.policy!r}")
