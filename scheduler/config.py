"""Scheduler configuration (frozen; every field documented; errors name the bad value)."""
from __future__ import annotations

from dataclasses import dataclass, field

POLICIES = ("sarathi", "vllm", "orca", "request", "chunked_only", "hybrid_only")
# Policies whose decodes share the token budget with prefill tokens.
BUDGETED_WITH_DECODES = ("sarathi", "hybrid_only")
# Policies that never split a prompt: an iteration must be able to hold the longest one.
WHOLE_PROMPT = ("vllm", "orca", "request")
BUDGET_KINDS = ("static", "profiled", "feedback", "slo")
# Budget controllers that start from a fitted step-time model (a profile or a start-up profile run).
STEP_MODEL_BUDGETS = ("profiled", "slo")
# Policies that cut prompts into chunks: the only ones a per-chunk (slo) budget can size.
CHUNKING = ("sarathi", "chunked_only")
BUDGET_HELP = {
    "static": "the token budget never changes (--token-budget)",
    "profiled": "at start-up time steps over a grid (or load --profile-file), fit a step-time "
                "model, and use the largest tile-aligned budget whose predicted step keeps "
                "--tbt-slo-ms",
    "feedback": "adjust the budget every iteration from measured step times (AIMD on their P99) "
                "to hold --tbt-slo-ms",
    "slo": "predict every step's time before it runs (the profiled model, refitted online, times "
           "its recent error) and give each prefill chunk the most tokens that keep the step "
           "under --tbt-slo-ms; counts steps whose decodes alone exceed it "
           "(tandem:slo_infeasible_steps_total); chunking policies only (sarathi, chunked_only)",
}


@dataclass(frozen=True)
class BudgetConfig:
    kind: str = "static"
    """`static`: the token budget never changes. `profiled`: at start-up the replica times steps
    over a grid, fits a step-time model and uses the largest tile-aligned budget whose predicted
    step keeps `tbt_slo_ms`. `feedback`: the budget follows measured step times every iteration.
    `slo`: every prefill chunk gets the most tokens whose step is predicted within `tbt_slo_ms`
    (`scheduler.budget.SloBudget`), starting from the profiled model."""
    tbt_slo_ms: float = 100.0
    """Time-between-tokens target the profiled, feedback and slo controllers hold (P99)."""
    tile: int = 32
    """Budgets are multiples of this (matmul tile alignment)."""
    min_budget: int | None = None
    """Floor of the feedback controller (default: max_num_seqs rounded up to the tile)."""
    max_budget: int = 2048
    """Ceiling of the profiled and feedback controllers; the token budget of slo (whose steps
    the SLO limits, not a token count)."""
    profile_path: str | None = None
    """Step-time profile to load (`tandem profile` writes one); profiled and slo run one if
    absent."""

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ValueError(f"unknown budget controller {self.kind!r}; choose from {BUDGET_KINDS}")
        if not self.tbt_slo_ms > 0:
            raise ValueError(f"tbt_slo_ms must be > 0, got {self.tbt_slo_ms!r}")
        if self.tile < 1:
            raise ValueError(f"tile must be >= 1, got {self.tile!r}")
        if self.max_budget < self.tile:
            raise ValueError(f"max_budget ({self.max_budget}) must be >= tile ({self.tile})")


def parse_tenant_weights(value) -> tuple[tuple[str, float], ...]:
    """Tenant weights as sorted (name, weight) pairs, from pairs (lists after msgpack/JSON), a
    mapping, or the command line's "a=2,b=1". Errors name the bad entry."""
    if isinstance(value, str):
        pairs = []
        for item in filter(None, (p.strip() for p in value.split(","))):
            name, sep, weight = item.partition("=")
            if not sep:
                raise ValueError(f"tenant weight {item!r} must be name=weight")
            try:
                pairs.append((name.strip(), float(weight)))
            except ValueError:
                raise ValueError(f"tenant weight {item!r}: {weight!r} is not a number") from None
        value = pairs
    elif isinstance(value, dict):
        value = list(value.items())
    out: dict[str, float] = {}
    for entry in value:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise ValueError(f"tenant weight {entry!r} must be a (name, weight) pair")
        name, weight = entry
        if not isinstance(name, str) or not name:
            raise ValueError(f"tenant name must be a non-empty string, got {name!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
            raise ValueError(f"weight of tenant {name!r} must be a number > 0, got {weight!r}")
        if name in out:
            raise ValueError(f"tenant {name!r} has more than one weight")
        out[name] = float(weight)
    return tuple(sorted(out.items()))


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = "sarathi"
    """Batching policy. `sarathi`: stall-free hybrid batching (decodes, then partial prefills,
    then new prefills, under a token budget). Baselines: `vllm` (prefill-prioritising, decodes
    stall), `orca` (whole prompts mixed with decodes), `request` (request-level batching).
    Ablations: `chunked_only` (chunked prefills never share an iteration with decodes),
    `hybrid_only` (decodes and whole prompts share iterations, prompts never chunked)."""
    token_budget: int = 256
    """Most tokens (decodes + prefill chunks) one iteration may process (the initial value
    under the profiled/feedback controllers). Smaller keeps time between tokens low."""
    idle_token_budget: int = 0
    """`sarathi`: most prefill tokens of an iteration in which no request is decoding. Such an
    iteration delays nobody's next token, so a prompt arriving at an idle replica can be
    prefilled in fewer, larger chunks (lower TTFT); 0 means `token_budget` (the paper's rule)."""
    max_num_seqs: int = 64
    """Most requests running (holding KV blocks) at once: the batch size cap of every policy."""
    max_batched_tokens: int = 8192
    """Token cap of one iteration for the whole-prompt policies (vllm, orca, request)."""
    block_size: int = 16
    """Tokens per KV-cache block (page)."""
    max_model_len: int = 2048
    """Longest sequence (prompt + output) a request may reach."""
    watermark: float = 0.01
    """Share of KV blocks kept free when admitting, so running requests can still grow."""
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    """How the token budget is chosen and adapted."""
    enable_prefix_caching: bool = True
    """Automatic prefix caching: KV blocks full of computed tokens stay cached (keyed by a hash of
    the whole prefix up to their end) and are shared, refcounted, by later requests with the same
    prefix, which then start with those tokens computed; unused cached blocks are evicted least
    recently used first when memory is needed (scheduler/block_manager.py). Off: every request
    computes its whole prompt."""
    tenant_weights: tuple[tuple[str, float], ...] = ()
    """Weighted fair share of admission across tenants (`Request.tenant`): ((name, weight), ...),
    or a mapping, normalised to pairs sorted by name. A backlogged tenant gets tokens computed in
    proportion to its weight; tenants not listed weigh 1 (scheduler/tenants.py)."""
    tenant_fair_share: bool = True
    """Admit weighted-fair across tenants, FCFS within each. False: one FCFS queue whatever the
    tenant (the behaviour before tenants existed; the baseline the fair share is measured against).
    With a single tenant both are the same."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "tenant_weights", parse_tenant_weights(self.tenant_weights))
        if not isinstance(self.tenant_fair_share, bool):
            raise ValueError(f"tenant_fair_share must be a bool, got {self.tenant_fair_share!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"unknown scheduler policy {self.policy!r}; choose from {POLICIES}")
        if not isinstance(self.idle_token_budget, int) or self.idle_token_budget < 0:
            raise ValueError(f"idle_token_budget must be an integer >= 0, got {self.idle_token_budget!r}")
        for name in ("token_budget", "max_num_seqs", "max_batched_tokens", "block_size", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark!r}")
        if self.policy in BUDGETED_WITH_DECODES and self.token_budget < self.max_num_seqs:
            # Stall-free batching gives every running decode its token each step; a budget below
            # the number of running requests would have to pause some of them.
            raise ValueError(
                f"token_budget ({self.token_budget}) must be >= max_num_seqs ({self.max_num_seqs}) "
                "so no running decode is ever paused"
            )
        if self.budget.kind == "slo" and self.policy not in CHUNKING:
            raise ValueError(
                f"--budget slo sizes prefill chunks, but policy {self.policy!r} never cuts a "
                f"prompt into chunks; use it with {' or '.join(CHUNKING)}")
        if self.policy in WHOLE_PROMPT and self.max_batched_tokens < self.max_model_len:
            raise ValueError(
                f"policy {self.policy!r} never chunks prompts, so max_batched_tokens "
                f"({self.max_batched_tokens}) must be >= max_model_len ({self.max_model_len})"
            )

    @property
    def min_budget(self) -> int:
        """Floor of adaptive budgets: every running decode must still fit."""
        tile = self.budget.tile
        floor = self.budget.min_budget or -(-self.max_num_seqs // tile) * tile
        return max(floor, self.max_num_seqs if self.policy in BUDGETED_WITH_DECODES else 1)
