"""Scheduler and budget-controller factory: `--scheduler` and `--budget` map here."""
from __future__ import annotations

from scheduler.budget import BudgetController, FeedbackBudget, StaticBudget, StepTimeModel, pick_budget
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


def profiled_budget(config: SchedulerConfig, model: StepTimeModel) -> int:
    """The budget `profiled` picks: a step with `max_num_seqs` decodes at half the context plus
    prefill filling the rest must stay under the TBT SLO."""
    b = config.budget
    return pick_budget(model, b.tbt_slo_ms / 1e3, decode_tokens=config.max_num_seqs,
                       context=config.max_model_len // 2, tile=b.tile,
                       min_budget=config.min_budget, max_budget=b.max_budget)


def make_budget(config: SchedulerConfig, step_model: StepTimeModel | None = None) -> BudgetController:
    b = config.budget
    if b.kind == "static":
        return StaticBudget(config.token_budget)
    if b.kind == "profiled":
        if step_model is None:
            raise ValueError("the profiled budget needs a step-time profile (run `tandem profile`)")
        return StaticBudget(profiled_budget(config, step_model))
    return FeedbackBudget(config.token_budget, b.tbt_slo_ms / 1e3, b.tile,
                          config.min_budget, b.max_budget)


def make_scheduler(config: SchedulerConfig, num_blocks: int,
                   step_model: StepTimeModel | None = None) -> Scheduler:
    return SCHEDULERS[config.policy](config, num_blocks, make_budget(config, step_model))
