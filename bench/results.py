"""What a load run records: one `RequestResult` per request and the `RunResult` around them.

Plain data with no HTTP client, so that `bench.report` and a simulator can build and summarise
runs without httpx (`bench.client` fills them in from real streams).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class RequestResult:
    index: int
    """Position of the request in the workload."""
    prompt_tokens: int
    """Prompt tokens asked (the server's own count may differ slightly for text prompts)."""
    max_tokens: int
    """Output tokens asked (max_tokens, with ignore_eos)."""
    scheduled_s: float
    """Intended send time, seconds after the run start."""
    send_s: float | None = None
    """Actual send time, seconds after the run start (None: never sent)."""
    ttft_s: float | None = None
    """Send to first chunk with text."""
    itl_s: list[float] = field(default_factory=list)
    """Gaps between successive chunks with text (seconds)."""
    e2e_s: float | None = None
    """Send to end of the stream."""
    output_tokens: int = 0
    """Tokens generated: the usage chunk's completion_tokens, else the number of text chunks."""
    num_chunks: int = 0
    """SSE chunks that carried text."""
    usage_reported: bool = False
    """The server sent a usage chunk (so output_tokens is exact)."""
    server_prompt_tokens: int | None = None
    """prompt_tokens from the usage chunk (checks the prompt builder's token estimate)."""
    status: int | None = None
    """HTTP status of the response (None: no response)."""
    error: str | None = None
    """What went wrong (None: success)."""
    tenant: str | None = None
    """Per-tenant runs: the tenant it was sent as."""

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def bundled_tokens(self) -> int:
        """Tokens that arrived in a chunk together with another token."""
        return max(0, self.output_tokens - self.num_chunks)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["itl_s"] = [round(x, 6) for x in self.itl_s]
        return d


@dataclass
class RunResult:
    url: str
    model: str
    requests: list[RequestResult]
    wall_s: float
    """First send to the last request's end (or the run deadline)."""
    started_at: float
    """Unix time of the run start."""
    timed_out: bool = False
    """The run deadline cut the run short."""

    @property
    def num_429(self) -> int:
        return sum(r.status == 429 for r in self.requests)

    @property
    def num_503(self) -> int:
        return sum(r.status == 503 for r in self.requests)
