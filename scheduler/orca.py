"""Orca-style iteration-level batching: running decodes plus whole new prompts in one iteration.

Prompts are never chunked, so an iteration that admits a long prompt is as long as that prompt's
prefill; the only caps are `max_batched_tokens` and `max_num_seqs`.
"""
from __future__ import annotations

from scheduler.core import Scheduler, SchedulerOutput


class OrcaScheduler(Scheduler):
    def plan(self, now: float) -> SchedulerOutput:
        limit = self.config.max_batched_tokens
        out = SchedulerOutput(chunks=[], token_budget=limit)
        used = self.schedule_decodes(out)
        self.admit_waiting(out, now, used, limit, chunked=False)
        return out
