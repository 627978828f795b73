"""Scheduler and budget-controller factory: `--scheduler` and `--budget` map here."""
from __future__ import annotations

from scheduler.budget import (BudgetController, FeedbackBudget, SloBudget, StaticBudget, StepTimeModel,
                              pick_budget)
from scheduler.chunked_only import ChunkedOnlyScheduler
from scheduler.config import SchedulerConfig
from scheduler.core import Scheduler
from scheduler.hybrid_only import HybridOnlyScheduler
from scheduler.orca import OrcaScheduler
from scheduler.request_level import RequestLevelScheduler
from scheduler.sarathi import SarathiScheduler
from scheduler.vllm import VllmScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    "sarathi": SarathiScheduler,
    "vllm": VllmScheduler,
    "orca": OrcaScheduler,
    "request": RequestLevelScheduler,
    "chunked_only": ChunkedOnlyScheduler,
    "hybrid_only": HybridOnlyScheduler,
}


PROFILE_DECODES = 8
PROFILE_CONTEXT = 512


def profiled_budget(config: SchedulerConfig, model: StepTimeModel) -> int:
    """The budget `profiled` picks: a step with a moderate decode load (min(max_num_seqs, 8)
    decodes with min(512, max_model_len/2) tokens cached) plus prefill filling the rest of the
    budget must stay under the TBT SLO. Decodes are always scheduled, so the budget only governs
    how much prefill rides along with them; heavier decode loads than this reference are what
    the feedback controller is for."""
    b = config.budget
    return pick_budget(model, b.tbt_slo_ms / 1e3,
                       decode_tokens=min(config.max_num_seqs, PROFILE_DECODES),
                       context=min(PROFILE_CONTEXT, config.max_model_len // 2), tile=b.tile,
                       min_budget=config.min_budget, max_budget=b.max_budget)


def make_budget(config: SchedulerConfig, step_model: StepTimeModel | None = None) -> BudgetController:
    b = config.budget
    if b.kind == "static":
        return StaticBudget(config.token_budget)
    if b.kind == "profiled":
        if step_model is None:
            raise ValueError("the profiled budget needs a step-time profile (run `tandem profile`)")
        return StaticBudget(profiled_budget(config, step_model))
    if b.kind == "slo":
        if step_model is None:
            raise ValueError("the slo budget needs a step-time model to start from "
                             "(a `tandem profile` file, or the start-up profile)")
        return SloBudget(step_model, b.tbt_slo_ms / 1e3, max(b.max_budget, config.min_budget), b.tile)
    return FeedbackBudget(config.token_budget, b.tbt_slo_ms / 1e3, b.tile,
                          config.min_budget, b.max_budget)


def make_scheduler(config: SchedulerConfig, num_blocks: int,
                   step_model: StepTimeModel | None = None) -> Scheduler:
    return SCHEDULERS[config.policy](config, num_blocks, make_budget(config, step_model))
