"""The prefill-prioritising baseline (vLLM before chunked prefill).

Whenever the head of the waiting queue fits, the iteration is a prefill-only batch of whole
prompts (FCFS, up to `max_batched_tokens` and `max_num_seqs`): every running decode stalls for
it -- the "generation stall" Sarathi-Serve removes. Otherwise the iteration decodes every running
request.
"""
from __future__ import annotations

from scheduler.core import Scheduler, SchedulerOutput


class VllmScheduler(Scheduler):
    def plan(self, now: float) -> SchedulerOutput:
        out = SchedulerOutput(chunks=[], token_budget=self.config.max_batched_tokens)
        self.admit_waiting(out, now, 0, self.config.max_batched_tokens, chunked=False)
        if out.chunks:
            return out
        self.schedule_decodes(out)
        return out
