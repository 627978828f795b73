"""`Request` and `SamplingParams`: the one object that flows scheduler -> runner -> update.

A request has no prefill/decode phase flag. It holds `num_tokens` tokens (prompt + generated) and
`num_computed_tokens` of them already have KV in the cache; each step the scheduler gives it up to
`num_tokens - num_computed_tokens` more, within the token budget. "Prefilling" simply means that gap
is larger than one.
"""
from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field
from typing import Any

DEFAULT_TENANT = "default"
"""The tenant of a request that names none (an anonymous API key and no `user` field)."""

MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for per token (OpenAI chat allows 20)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop. Validated here; the gateway maps HTTP fields onto it."""

    max_tokens: int = 16
    """Most tokens to generate; the request finishes with reason "length" after that many."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability mass reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 (or -1) disables."""
    seed: int | None = None
    """Per-request RNG seed; the same seed gives the same tokens whatever else is in the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends before the first occurrence, which is not returned."""
    stop_token_ids: tuple[int, ...] = ()
    """Extra token ids that end generation (besides the model's EOS ids)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to get exact output lengths)."""
    presence_penalty: float = 0.0
    """OpenAI semantics: subtract this from the logit of every token already generated (-2..2)."""
    frequency_penalty: float = 0.0
    """OpenAI semantics: subtract this times the token's count in the output so far (-2..2)."""
    repetition_penalty: float = 1.0
    """HF/vLLM semantics: tokens seen in prompt or output get logit/p if positive, logit*p if
    not; > 1 discourages repeats, 1 disables."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's; 0 disables."""
    logprobs: int | None = None
    """Return the chosen token's logprob plus this many top alternatives per generated token
    (0..MAX_LOGPROBS); None returns none."""
    prompt_logprobs: int | None = None
    """Same for the prompt tokens (the first has none); computed during prefill (echo)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or positive, got {self.top_k!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty!r}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be None or an integer in [0, {MAX_LOGPROBS}], "
                                 f"got {value!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must be non-empty, got {list(self.stop)!r}")
        # Lists arrive from msgpack/JSON; keep the object hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def to_wire(self) -> dict[str, Any]:
        d = asdict(self)
        d["stop"] = list(self.stop)
        d["stop_token_ids"] = list(self.stop_token_ids)
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> "SamplingParams":
        return cls(**d)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    """OpenAI's finish_reason values plus the two ways a request ends without completing."""

    STOP = "stop"        # EOS, a stop token or a stop string
    LENGTH = "length"    # max_tokens or the model's context length reached
    ABORT = "abort"      # the client went away or the request was cancelled
    ERROR = "error"      # the replica could not serve it


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    arrival_time: float
    eos_token_ids: frozenset[int] = frozenset()
    """Model EOS ids (from its config); ignored when `sampling.ignore_eos`."""
    max_model_len: int | None = None
    """Context limit: the request finishes with "length" when it holds this many tokens."""
    tenant: str = DEFAULT_TENANT
    """Who the request is for (the gateway's API key name or `user`); admission is weighted-fair
    across tenants and FCFS within one (scheduler/tenants.py)."""

    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without building the concatenation."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]

    def append_token(self, token_id: int) -> FinishReason | None:
        """Append one sampled token; return why the request is now finished, if it is."""
        self.output_token_ids.append(token_id)
        s = self.sampling
        if not s.ignore_eos and token_id in self.eos_token_ids:
            return FinishReason.STOP
        if token_id in s.stop_token_ids:
            return FinishReason.STOP
        if self.num_output_tokens >= s.max_tokens:
            return FinishReason.LENGTH
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
