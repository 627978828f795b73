"""Sarathi-Serve stall-free hybrid batching.

Per iteration with token budget tau:
1. every running request that is decoding gets its one token (preempting the newest arrival by
   recompute if a KV block cannot be appended) -- decodes are never paused for a prefill;
2. then running requests whose prefill is partly done get `min(remaining, tau - used)` tokens;
3. then waiting requests, FCFS, are admitted while their blocks can be allocated, each getting
   `min(prompt, tau - used)` tokens. A head that does not fit blocks the queue (FCFS).

tau bounds how long a step that carries decodes may take, i.e. the time between their tokens. In
an iteration with no decode there is no such gap to protect, so prefill may use
`idle_token_budget` tokens instead (when it is larger): a prompt that reaches an idle replica is
prefilled in fewer, more efficient chunks. Not while other batches are in flight (pipeline
parallelism): a long batch now holds up the stages their decodes need next.
"""
from __future__ import annotations

from scheduler.core import Scheduler, SchedulerOutput


class SarathiScheduler(Scheduler):
    def plan(self, now: float) -> SchedulerOutput:
        budget = self.token_budget
        out = SchedulerOutput(chunks=[], token_budget=budget)
        used = self.schedule_decodes(out)
        # With batches in flight (pipeline stages) this batch delays their decodes' next tokens.
        if not used and not self.in_flight and self.config.idle_token_budget > budget:
            budget = out.token_budget = self.config.idle_token_budget
        used = self.schedule_partial_prefills(out, used, budget)
        self.admit_waiting(out, now, used, budget, chunked=True)
        return out
