"""Ablation: hybrid batching without chunked prefills.

Sarathi's order -- running decodes first, then new prompts FCFS under the token budget -- but a
prompt is never split: it joins only if it fits whole in what is left of the budget, except the
first prompt of an iteration, which goes whole even past the budget (else long prompts would
starve). Prompts share iterations with decodes (good TTFT) but a long one makes that iteration
long (bad TBT).
"""
from __future__ import annotations

from scheduler.core import Scheduler, SchedulerOutput


class HybridOnlyScheduler(Scheduler):
    def plan(self, now: float) -> SchedulerOutput:
        budget = self.token_budget
        out = SchedulerOutput(chunks=[], token_budget=budget)
        used = self.schedule_decodes(out)
        self.admit_waiting(out, now, used, budget, chunked=False, oversize_first=True)
        return out
