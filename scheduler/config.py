"""Scheduler configuration (frozen; every field documented; errors name the bad value)."""
from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("sarathi",)


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "sarathi"
    """Batching policy: `sarathi` = stall-free hybrid batching (decodes, then partial prefills,
    then new prefills, under a token budget)."""
    token_budget: int = 256
    """Most tokens (decodes + prefill chunks) one iteration may process. Smaller keeps time
    between tokens low; larger raises prefill throughput."""
    max_num_seqs: int = 64
    """Most requests running (holding KV blocks) at once."""
    block_size: int = 16
    """Tokens per KV-cache block (page)."""
    max_model_len: int = 2048
    """Longest sequence (prompt + output) a request may reach."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {self.policy!r}; choose from {POLICIES}")
        for name in ("token_budget", "max_num_seqs", "block_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.token_budget < self.max_num_seqs:
            # Stall-free batching gives every running decode its token each step; a budget below
            # the number of running requests would have to pause some of them.
            raise ValueError(
                f"token_budget ({self.token_budget}) must be >= max_num_seqs ({self.max_num_seqs}) "
                "so no running decode is ever paused"
            )
