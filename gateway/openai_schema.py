"""OpenAI API request models: every field typed (strict: no "1" for 1, no true for 1) and bounded.

Unknown fields are ignored, as OpenAI-compatible servers usually do; fields that would change the
result and are not implemented (logit_bias, suffix, tools, best_of != n) are rejected instead of
silently ignored. Response shapes live in `gateway.responses`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from scheduler.request import SamplingParams

MAX_STOP_STRINGS = 8
MAX_STOP_LEN = 256
MAX_N = 16
"""Most choices per prompt."""
MAX_PROMPTS = 32
"""Most prompts in one batched /v1/completions request."""
MAX_CHOICES = 64
"""Most sub-requests (n x prompts) one HTTP request may fan out to."""
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
MAX_MESSAGES = 1024
MAX_SHORT_STRING = 256
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_INT32_MAX = 2**31 - 1


class ParamError(ValueError):
    """A cross-field check failed; `param` names the field the error is reported under."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = False


class _SamplingFields(_Strict):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: str = Field(max_length=MAX_SHORT_STRING)
    temperature: float | None = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=_INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    n: int | None = Field(default=1, ge=1, le=MAX_N)
    user: str | None = Field(default=None, max_length=MAX_SHORT_STRING)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences are allowed, got {len(items)}")
        for s in items:
            if not s:
                raise ValueError("stop sequences must be non-empty strings")
            if len(s) > MAX_STOP_LEN:
                raise ValueError(f"stop sequences must be at most {MAX_STOP_LEN} characters, "
                                 f"got one of {len(s)}")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, v: dict | None) -> dict | None:
        if v:
            raise ValueError("logit_bias is not supported by this server")
        return v

    @property
    def num_choices(self) -> int:
        return 1 if self.n is None else self.n

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def is_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def requested_max_tokens(self) -> int | None:
        raise NotImplementedError

    def to_sampling(self, max_tokens: int, choice: int = 0, logprobs: int | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
        """Sampling of choice `choice`: seeded choices get seed + choice (wrapped to int64)."""
        seed = self.seed
        if seed is not None:
            seed = (seed + choice - INT64_MIN) % 2**64 + INT64_MIN
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            seed=seed,
            stop=tuple(self.stop_list),
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: Prompt
    max_tokens: int | None = Field(default=16, ge=0, le=_INT32_MAX)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: Any) -> Any:
        if isinstance(v, str):
            if not v:
                raise ValueError("prompt must not be empty")
            return v
        if not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v[0], int):
            return v
        if len(v) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts may be batched in one request, "
                             f"got {len(v)}")
        for i, p in enumerate(v):
            if not p:
                raise ValueError(f"prompt {i} of the batch is empty")
        return v

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix is not supported by this server")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> "CompletionRequest":
        if self.best_of is not None and self.best_of != self.num_choices:
            raise ParamError("best_of", f"best_of={self.best_of} is not supported: only best_of "
                                        f"== n ({self.num_choices}) is accepted")
        if self.max_tokens == 0 and not self.echo:
            raise ParamError("max_tokens", "max_tokens=0 is only allowed with echo=true "
                                           "(prompt scoring)")
        total = self.num_choices * len(self.prompts())
        if total > MAX_CHOICES:
            raise ParamError("n", f"n ({self.num_choices}) x prompts ({len(self.prompts())}) = "
                                  f"{total} exceeds the limit of {MAX_CHOICES} choices per request")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: strings or token-id lists."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = Field(default=None, max_length=MAX_SHORT_STRING)

    @model_validator(mode="after")
    def _content_required(self) -> "ChatMessage":
        if self.content is None and self.role != "assistant":
            raise ParamError("content", f"content is required for a {self.role} message")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: int | None = Field(default=None, ge=1, le=_INT32_MAX)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=_INT32_MAX)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, v: list | None) -> list | None:
        if v:
            raise ValueError("tools are not supported by this server")
        return v

    @model_validator(mode="after")
    def _check_combination(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "top_logprobs requires logprobs=true")
        return self

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        # The chat templates know system/user/assistant; OpenAI's "developer" is the system role.
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in self.messages]
