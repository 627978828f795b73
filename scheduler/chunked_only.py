"""Ablation: chunked prefills without hybrid batching.

Prompts are cut into chunks under the token budget, but a chunk never shares an iteration with
decodes: iterations alternate between a decode-only batch and a prefill-only batch of chunks
(partial prefills first, then new prompts), so a decode waits at most one chunk -- low TBT --
while prompts get only every other iteration -- higher TTFT.
"""
from __future__ import annotations

from scheduler.core import Scheduler, SchedulerOutput


class ChunkedOnlyScheduler(Scheduler):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._last_was_prefill = False

    def _has_prefill_work(self) -> bool:
        return bool(self.waiting) or any(r.num_uncomputed_tokens > 1 for r in self.ready())

    def plan(self, now: float) -> SchedulerOutput:
        budget = self.token_budget
        out = SchedulerOutput(chunks=[], token_budget=budget)
        decoding = any(r.num_uncomputed_tokens == 1 for r in self.ready())
        if self._has_prefill_work() and not (decoding and self._last_was_prefill):
            used = self.schedule_partial_prefills(out, 0, budget)
            self.admit_waiting(out, now, used, budget, chunked=True)
            if out.chunks:
                self._last_was_prefill = True
                return out
        self._last_was_prefill = False
        self.schedule_decodes(out)
        return out
