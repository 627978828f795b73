"""Request-level batching (FasterTransformer style): a batch runs to completion.

When nothing runs, admit up to `max_num_seqs` waiting requests FCFS, reserving blocks for their
whole sequence (prompt + max_tokens, so nothing is ever preempted), and prefill them together;
then decode that batch until every request in it has finished. Nobody joins a running batch.
"""
from __future__ import annotations

from scheduler.core import ScheduledChunk, Scheduler, SchedulerOutput


class RequestLevelScheduler(Scheduler):
    def plan(self, now: float) -> SchedulerOutput:
        limit = self.config.max_batched_tokens
        out = SchedulerOutput(chunks=[], token_budget=limit)
        if self.running:
            self.schedule_decodes(out)
            return out
        used = 0
        admitted: dict[str, int] = {}   # tokens per tenant this step (see `admit_waiting`)
        while self.waiting:
            request = self.waiting.head(admitted)
            need = request.num_uncomputed_tokens - self.cached_tokens(request)
            full = request.num_tokens + request.sampling.max_tokens - request.num_output_tokens
            if used + need > limit or not self.admit(request, now, reserve_tokens=full):
                break
            out.chunks.append(ScheduledChunk(request, need))
            used += need
            admitted[request.tenant] = admitted.get(request.tenant, 0) + need
        return out
