"""Benchmark workloads: when each request arrives and how long its prompt and output are.

A `Workload` is a list of `RequestSpec(arrival_s, prompt_tokens, output_tokens)`. Arrivals come from a
process (Poisson, gamma with a given coefficient of variation for burstiness, constant rate) or are
replayed from a trace (JSONL, or the `arrived_at` column of the Azure CSV traces); lengths are fixed,
uniform, lognormal, bounded zipf, a "chat + long document" mix, or sampled from a CSV trace. Every
generator is deterministic given the seed. Lengths are scaled (`length_scale`) and then capped
(`max_prompt_tokens`, `max_output_tokens`) so public traces fit a small served model.

`PromptBuilder` turns a token count into a request prompt: text made of common one-token English words
(exact for GPT-2/Llama style BPE tokenizers such as SmolLM2's) or, with `token_ids=True`, a list of
token ids (exact on servers that accept them, as Tandem does).
"""
from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

ARRIVALS = ("poisson", "gamma", "constant", "trace")
LENGTH_DISTS = ("fixed", "uniform", "lognormal", "zipf", "chat-doc", "trace")


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    """Seconds after the start of the run at which the request is sent."""
    prompt_tokens: int
    """Prompt length in tokens (>= 1)."""
    output_tokens: int
    """Tokens to generate (sent as max_tokens with ignore_eos)."""


@dataclass
class Workload:
    requests: list[RequestSpec]
    description: str = ""

    def __len__(self) -> int:
        return len(self.requests)

    def __iter__(self):
        return iter(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].arrival_s if self.requests else 0.0

    @property
    def offered_qps(self) -> float | None:
        """Mean arrival rate: (n - 1) / span of arrivals (None with fewer than 2 requests)."""
        if len(self.requests) < 2 or self.duration_s <= 0:
            return None
        return (len(self.requests) - 1) / self.duration_s

    def with_qps(self, qps: float) -> Workload:
        """The same requests with arrival times stretched so the mean rate is `qps`."""
        cur = self.offered_qps
        if cur is None:
            return self
        k = cur / qps
        return Workload([replace(r, arrival_s=r.arrival_s * k) for r in self.requests],
                        f"{self.description}, rescaled to {qps:g} qps")

    def to_jsonl(self, path: str | Path) -> None:
        with open(path, "w") as f:
            for r in self.requests:
                f.write(json.dumps({"arrival_s": round(r.arrival_s, 6), "prompt_tokens": r.prompt_tokens,
                                    "output_tokens": r.output_tokens}) + "\n")

    def summary(self) -> dict:
        p = np.array([r.prompt_tokens for r in self.requests] or [0])
        o = np.array([r.output_tokens for r in self.requests] or [0])
        return {"description": self.description, "num_requests": len(self.requests),
                "duration_s": self.duration_s, "offered_qps": self.offered_qps,
                "prompt_tokens_mean": float(p.mean()), "prompt_tokens_max": int(p.max()),
                "output_tokens_mean": float(o.mean()), "output_tokens_max": int(o.max())}


# ---- arrival processes ---------------------------------------------------------------------------

def _check_rate(n: int, qps: float) -> None:
    if n < 0:
        raise ValueError(f"number of requests must be >= 0, got {n}")
    if not qps > 0:
        raise ValueError(f"qps must be > 0, got {qps}")


def _from_gaps(gaps: np.ndarray) -> np.ndarray:
    """Arrival times from inter-arrival gaps; the first request arrives at t = 0."""
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])]) if len(gaps) else np.zeros(0)


def poisson_arrivals(n: int, qps: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson process: exponential gaps with mean 1/qps."""
    _check_rate(n, qps)
    return _from_gaps(rng.exponential(1.0 / qps, size=n))


def gamma_arrivals(n: int, qps: float, cv: float, rng: np.random.Generator) -> np.ndarray:
    """Gamma-distributed gaps with mean 1/qps and coefficient of variation `cv` (cv = 1 is Poisson,
    cv > 1 is burstier, cv < 1 more regular)."""
    _check_rate(n, qps)
    if not cv > 0:
        raise ValueError(f"cv must be > 0, got {cv}")
    shape = 1.0 / cv ** 2
    return _from_gaps(rng.gamma(shape, 1.0 / (qps * shape), size=n))


def constant_arrivals(n: int, qps: float) -> np.ndarray:
    _check_rate(n, qps)
    return np.arange(n) / qps


# ---- length distributions ------------------------------------------------------------------------

def _clip(x: np.ndarray, cap: int | None) -> np.ndarray:
    x = np.maximum(np.rint(x).astype(np.int64), 1)
    return np.minimum(x, cap) if cap is not None else x


def fixed_lengths(n: int, value: int) -> np.ndarray:
    if value < 1:
        raise ValueError(f"length must be >= 1, got {value}")
    return np.full(n, value, dtype=np.int64)


def uniform_lengths(n: int, lo: int, hi: int, rng: np.random.Generator) -> np.ndarray:
    """Integers uniform on [lo, hi]."""
    if not 1 <= lo <= hi:
        raise ValueError(f"uniform lengths need 1 <= lo <= hi, got lo={lo} hi={hi}")
    return rng.integers(lo, hi + 1, size=n)


def lognormal_lengths(n: int, mean: float, sigma: float, rng: np.random.Generator,
                      cap: int | None = None) -> np.ndarray:
    """Lognormal with the given mean (before capping) and log-space sigma, rounded, in [1, cap]."""
    if not mean >= 1 or not sigma >= 0:
        raise ValueError(f"lognormal needs mean >= 1 and sigma >= 0, got mean={mean} sigma={sigma}")
    mu = math.log(mean) - sigma ** 2 / 2
    return _clip(rng.lognormal(mu, sigma, size=n), cap)


def _zipf_probs(theta: float, cap: int) -> np.ndarray:
    w = np.arange(1, cap + 1, dtype=np.float64) ** -theta
    return w / w.sum()


def zipf_theta_for_mean(mean: float, cap: int) -> float:
    """Exponent theta of the bounded zipf P(k) ~ k^-theta on 1..cap whose mean is `mean`."""
    if not 1 < mean <= (cap + 1) / 2:
        raise ValueError(f"a zipf on 1..{cap} has a mean in (1, {(cap + 1) / 2}], asked {mean}")
    ks = np.arange(1, cap + 1, dtype=np.float64)
    lo, hi = 0.0, 20.0  # the mean falls as theta grows
    for _ in range(80):
        mid = (lo + hi) / 2
        if float((_zipf_probs(mid, cap) * ks).sum()) > mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def zipf_lengths(n: int, mean: float, cap: int, rng: np.random.Generator) -> np.ndarray:
    """Bounded zipf on 1..cap (heavy tail of long requests), exponent chosen to give `mean`."""
    if mean <= 1:
        return np.ones(n, dtype=np.int64)
    theta = zipf_theta_for_mean(mean, cap)
    return rng.choice(np.arange(1, cap + 1), size=n, p=_zipf_probs(theta, cap))


# ---- traces --------------------------------------------------------------------------------------

@dataclass
class CsvTrace:
    """A length trace in the Sarathi-Serve / Splitwise CSV format: `num_prefill_tokens`,
    `num_decode_tokens`, and (Azure traces) `arrived_at` in seconds."""
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    arrived_at: np.ndarray | None
    path: str

    @classmethod
    def load(cls, path: str | Path) -> CsvTrace:
        p, o, a = [], [], []
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            cols = set(reader.fieldnames or ())
            missing = {"num_prefill_tokens", "num_decode_tokens"} - cols
            if missing:
                raise ValueError(f"{path}: missing column(s) {sorted(missing)}; has {sorted(cols)}")
            has_arrivals = "arrived_at" in cols
            for row in reader:
                p.append(int(float(row["num_prefill_tokens"])))
                o.append(int(float(row["num_decode_tokens"])))
                if has_arrivals:
                    a.append(float(row["arrived_at"]))
        if not p:
            raise ValueError(f"{path}: no rows")
        return cls(np.array(p), np.array(o), np.array(a) if has_arrivals else None, str(path))

    def __len__(self) -> int:
        return len(self.prompt_tokens)


def load_jsonl_trace(path: str | Path) -> list[RequestSpec]:
    """Lines of {"arrival_s", "prompt_tokens", "output_tokens"}, sorted by arrival."""
    out: list[RequestSpec] = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(RequestSpec(float(d["arrival_s"]), int(d["prompt_tokens"]),
                                       int(d["output_tokens"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{i}: bad trace line ({e!r}): {line.strip()[:120]}") from None
    out.sort(key=lambda r: r.arrival_s)
    return out


# ---- the workload recipe -------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkloadConfig:
    num_requests: int | None = 100
    """Requests to generate (None with a JSONL trace: all of its lines)."""
    seed: int = 0
    """Seed of every random choice (arrivals, lengths, trace offsets, prompt words)."""
    arrival: str = "poisson"
    """poisson | gamma | constant | trace (the CSV's `arrived_at` or the JSONL's `arrival_s`)."""
    cv: float = 1.0
    """Coefficient of variation of the gaps for `gamma` arrivals (burstiness)."""
    length_dist: str = "fixed"
    """fixed | uniform | lognormal | zipf | chat-doc | trace (sample rows of `trace_csv`)."""
    prompt_len: int = 128
    """Prompt tokens: the value (fixed) or the mean (other distributions; chat part of chat-doc)."""
    output_len: int = 64
    """Output tokens: the value (fixed) or the mean."""
    spread: float = 0.5
    """uniform: lengths on [mean * (1 - spread), mean * (1 + spread)]."""
    sigma: float = 0.5
    """lognormal (and chat-doc): sigma of log(length)."""
    zipf_cap_factor: float = 10.0
    """zipf: support is 1..mean * this factor (the max-*-tokens caps then clip it)."""
    doc_prompt_len: int | None = None
    """chat-doc: mean prompt of the long-document requests (default 8 x prompt_len)."""
    doc_fraction: float = 0.2
    """chat-doc: share of requests that are long documents."""
    trace_csv: str | None = None
    """CSV length trace (read in place, e.g. TRACES/splitwise_conv.csv)."""
    trace_jsonl: str | None = None
    """JSONL trace replayed as is (arrivals and lengths)."""
    length_scale: float = 1.0
    """Multiply every length by this (after sampling, before the caps), e.g. 0.1 for a small model."""
    max_prompt_tokens: int | None = None
    """Cap on prompt tokens (applied last)."""
    max_output_tokens: int | None = None
    """Cap on output tokens (applied last)."""

    def __post_init__(self) -> None:
        if self.arrival not in ARRIVALS:
            raise ValueError(f"arrival must be one of {ARRIVALS}, got {self.arrival!r}")
        if self.length_dist not in LENGTH_DISTS:
            raise ValueError(f"length_dist must be one of {LENGTH_DISTS}, got {self.length_dist!r}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if self.prompt_len < 1 or self.output_len < 1:
            raise ValueError(f"prompt_len and output_len must be >= 1, got {self.prompt_len}, "
                             f"{self.output_len}")
        if not self.length_scale > 0:
            raise ValueError(f"length_scale must be > 0, got {self.length_scale}")
        for name in ("max_prompt_tokens", "max_output_tokens"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if not 0 <= self.doc_fraction <= 1:
            raise ValueError(f"doc_fraction must be in [0, 1], got {self.doc_fraction}")
        if not self.zipf_cap_factor >= 2:
            raise ValueError(f"zipf_cap_factor must be >= 2, got {self.zipf_cap_factor}")
        if not 0 <= self.spread < 1:
            raise ValueError(f"spread must be in [0, 1), got {self.spread}")
        if self.length_dist == "trace" and not (self.trace_csv or self.trace_jsonl):
            raise ValueError("length_dist 'trace' needs trace_csv (or trace_jsonl)")
        if self.arrival == "trace" and not (self.trace_csv or self.trace_jsonl):
            raise ValueError("arrival 'trace' needs trace_csv with an arrived_at column or trace_jsonl")


def _lengths(cfg: WorkloadConfig, n: int, mean: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of the parametric distributions, before scaling and capping."""
    d = cfg.length_dist
    if d == "fixed":
        return fixed_lengths(n, mean)
    if d == "uniform":
        lo, hi = max(1, round(mean * (1 - cfg.spread))), max(1, round(mean * (1 + cfg.spread)))
        return uniform_lengths(n, lo, hi, rng)
    if d == "lognormal":
        return lognormal_lengths(n, mean, cfg.sigma, rng)
    if d == "zipf":
        return zipf_lengths(n, mean, max(3, round(mean * cfg.zipf_cap_factor)), rng)
    raise AssertionError(d)


def build_workload(cfg: WorkloadConfig, qps: float | None = None) -> Workload:
    """The workload `cfg` describes at rate `qps` (needed unless arrivals come from a trace; with a
    trace, a given qps rescales the trace's arrival times to that mean rate)."""
    rng = np.random.default_rng(cfg.seed)
    arr_rng, len_rng = (np.random.default_rng(s) for s in rng.integers(0, 2**63, size=2))
    if cfg.trace_jsonl:
        reqs = load_jsonl_trace(cfg.trace_jsonl)
        if cfg.num_requests is not None:
            if cfg.num_requests > len(reqs):
                raise ValueError(f"{cfg.trace_jsonl} has {len(reqs)} requests, asked {cfg.num_requests}")
            reqs = reqs[: cfg.num_requests]
        t0 = reqs[0].arrival_s if reqs else 0.0
        arrivals = np.array([r.arrival_s - t0 for r in reqs])
        prompts = np.array([r.prompt_tokens for r in reqs])
        outputs = np.array([r.output_tokens for r in reqs])
        # a JSONL trace is replayed whole: the arrival and length options do not apply to it
        wl = _finish(cfg, arrivals, prompts, outputs, f"replay of {cfg.trace_jsonl}")
        return wl.with_qps(qps) if qps is not None else wl

    n = cfg.num_requests or 100
    trace = CsvTrace.load(cfg.trace_csv) if cfg.trace_csv else None
    rows = None  # the trace rows this workload uses, when arrivals come from the trace
    parts = []
    if cfg.arrival == "trace":
        assert trace is not None
        if trace.arrived_at is None:
            raise ValueError(f"{trace.path} has no arrived_at column; choose another arrival process")
        if n > len(trace):
            raise ValueError(f"{trace.path} has {len(trace)} rows, asked {n} requests")
        start = int(arr_rng.integers(0, len(trace) - n + 1))
        rows = np.arange(start, start + n)
        arrivals = trace.arrived_at[rows] - trace.arrived_at[start]
        parts.append(f"arrivals of {Path(trace.path).name} rows {start}..{start + n - 1}")
    else:
        if qps is None:
            raise ValueError(f"arrival {cfg.arrival!r} needs a qps")
        if cfg.arrival == "poisson":
            arrivals = poisson_arrivals(n, qps, arr_rng)
        elif cfg.arrival == "gamma":
            arrivals = gamma_arrivals(n, qps, cfg.cv, arr_rng)
        else:
            arrivals = constant_arrivals(n, qps)
        parts.append(f"{cfg.arrival} arrivals at {qps:g} qps" +
                     (f" (cv {cfg.cv:g})" if cfg.arrival == "gamma" else ""))

    if cfg.length_dist == "trace":
        assert trace is not None
        if rows is None:
            rows = len_rng.integers(0, len(trace), size=n)
        prompts, outputs = trace.prompt_tokens[rows], trace.output_tokens[rows]
        parts.append(f"lengths from {Path(trace.path).name}")
    elif cfg.length_dist == "chat-doc":
        doc_len = cfg.doc_prompt_len or 8 * cfg.prompt_len
        is_doc = len_rng.random(n) < cfg.doc_fraction
        chat_p = lognormal_lengths(n, cfg.prompt_len, cfg.sigma, len_rng)
        doc_p = lognormal_lengths(n, doc_len, cfg.sigma / 2, len_rng)
        prompts = np.where(is_doc, doc_p, chat_p)
        outputs = lognormal_lengths(n, cfg.output_len, cfg.sigma, len_rng)
        parts.append(f"chat (prompt ~{cfg.prompt_len}) + {cfg.doc_fraction:.0%} long documents "
                     f"(prompt ~{doc_len}), output ~{cfg.output_len}")
    else:
        prompts = _lengths(cfg, n, cfg.prompt_len, len_rng)
        outputs = _lengths(cfg, n, cfg.output_len, len_rng)
        parts.append(f"{cfg.length_dist} lengths (prompt {cfg.prompt_len}, output {cfg.output_len})")
    wl = _finish(cfg, arrivals, prompts, outputs, ", ".join(parts))
    return wl.with_qps(qps) if (qps is not None and cfg.arrival == "trace") else wl


def _finish(cfg: WorkloadConfig, arrivals, prompts, outputs, desc: str) -> Workload:
    p = _clip(np.asarray(prompts, dtype=np.float64) * cfg.length_scale, cfg.max_prompt_tokens)
    o = _clip(np.asarray(outputs, dtype=np.float64) * cfg.length_scale, cfg.max_output_tokens)
    if cfg.length_scale != 1:
        desc += f", lengths x{cfg.length_scale:g}"
    if cfg.max_prompt_tokens or cfg.max_output_tokens:
        desc += f", capped at prompt {cfg.max_prompt_tokens or '-'} / output {cfg.max_output_tokens or '-'}"
    reqs = [RequestSpec(float(a), int(pp), int(oo)) for a, pp, oo in zip(arrivals, p, o)]
    return Workload(reqs, desc)


# ---- prompts -------------------------------------------------------------------------------------

# Common English words that are one token each (with the leading space) in GPT-2/Llama/SmolLM2 style
# BPE vocabularies; a space-separated sequence of them tokenizes to one token per word there.
PROMPT_WORDS = (" hello", " world", " cat", " dog", " sun", " tree", " red", " blue", " book",
                " house", " water", " time", " day", " man", " good", " new", " big", " old",
                " car", " city", " one", " two", " three", " green", " light", " road", " fish")


@dataclass
class PromptBuilder:
    """Prompts of a given token count. Each request gets its own random word (or id) sequence, so
    servers with prefix caching cannot reuse one request's KV cache for another."""
    tokens_per_word: float = 1.0
    """Tokens the server's tokenizer makes of one prompt word (1.0 for SmolLM2, Llama, GPT-2)."""
    token_ids: bool = False
    """Send prompts as lists of token ids (exact lengths; the server must accept them)."""
    id_range: tuple[int, int] = (1000, 10000)
    """Token ids are drawn from [lo, hi) when `token_ids` is set."""
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tokens_per_word > 0:
            raise ValueError(f"tokens_per_word must be > 0, got {self.tokens_per_word}")
        self._rng = np.random.default_rng(self.seed)

    def build(self, num_tokens: int) -> str | list[int]:
        if self.token_ids:
            return [int(x) for x in self._rng.integers(*self.id_range, size=num_tokens)]
        words = max(1, round(num_tokens / self.tokens_per_word))
        idx = self._rng.integers(0, len(PROMPT_WORDS), size=words)
        return "".join(PROMPT_WORDS[i] for i in idx)
