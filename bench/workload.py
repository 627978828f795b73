"""Benchmark workloads: when each request arrives and how long its prompt and output are.

A `Workload` is a list of `RequestSpec(arrival_s, prompt_tokens, output_tokens)`. Arrivals come from a
process (Poisson, gamma with a given coefficient of variation for burstiness, constant rate) or are
replayed from a trace (JSONL, or the `arrived_at` column of the Azure CSV traces); lengths are fixed,
uniform, lognormal, bounded zipf, a "chat + long document" mix, synthetic arXiv-summarization
lengths (`arxiv`, `arxiv-paper`), or sampled from a CSV trace. Every
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
LENGTH_DISTS = ("fixed", "uniform", "lognormal", "zipf", "chat-doc", "arxiv", "arxiv-paper", "trace")


@dataclass(frozen=True)
class RequestSpec:
    arrival_s: float
    """Seconds after the start of the run at which the request is sent."""
    prompt_tokens: int
    """Prompt length in tokens (>= 1)."""
    output_tokens: int
    """Tokens to generate (sent as max_tokens with ignore_eos)."""
    conversation: int | None = None
    """Multi-turn chat: the conversation this request is a turn of. Its prompt is the previous
    turn's prompt followed by new tokens (`PromptBuilder.prompt`)."""
    shared_prefix_tokens: int = 0
    """Tokens at the start of the prompt that every request of the workload shares (a system
    prompt)."""
    tenant: str | None = None
    """Per-tenant runs (`--tenant`): whose request it is (sent as its tenant's API key, or as the
    `user` field)."""


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
                line = {"arrival_s": round(r.arrival_s, 6), "prompt_tokens": r.prompt_tokens,
                        "output_tokens": r.output_tokens}
                if r.conversation is not None:
                    line["conversation"] = r.conversation
                if r.shared_prefix_tokens:
                    line["shared_prefix_tokens"] = r.shared_prefix_tokens
                if r.tenant is not None:
                    line["tenant"] = r.tenant
                f.write(json.dumps(line) + "\n")

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


# ---- synthetic arXiv-summarization lengths ---------------------------------------------------------
# Two stand-ins for the arXiv-summarization workload of Sarathi-Serve, for when no trace file is at
# hand. `arxiv` reproduces the 4k-filtered trace TRACES/arxiv_summarization_stats_llama2_tokenizer_
# filtered_v2.csv; `arxiv-paper` the much longer prompts of the paper's own arXiv workload.
#
# `arxiv`: every number below was measured from that file (28,257 rows; numpy.percentile, linear).
# Its statistics: prompt median 2730 / p90 3702 / max 4054 (mean 2588), output median 167 / p90 372
# / p99 3271 / max 4056 (mean 291), prompt + output <= 4096 on every row, Pearson correlation of
# prompt and output -0.46 (Spearman -0.11): the file is the full dataset filtered at 4096 tokens in
# all, so the rare long outputs come with short prompts. The generator draws the output from its
# quantile table, then the prompt as a share f of the room left, p = f * (4096 - o), with f from
# the table measured over the rows of the same output class (o <= 736, the output p95, or above):
# measured f barely depends on o within a class (Spearman 0.003 over all rows), and the product
# keeps every total within 4096 and gives the correlation (Pearson -0.47 on 200k samples). What it
# does not reproduce: the rank correlation (-0.21 against -0.11) and the exact prompt p10 (about
# 1220 against 1242); between table points the inverse CDF is linear.
ARXIV_QUANTILE_LEVELS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95,
                         0.97, 0.98, 0.99, 0.995, 1.0)
ARXIV_OUTPUT_QUANTILES = (5, 36, 44, 60, 78, 104, 125, 145, 167, 192, 222, 268, 372, 736, 2200,
                          2775, 3271, 3582, 4056)
"""Output tokens of the 4k-filtered trace at `ARXIV_QUANTILE_LEVELS` (measured)."""
ARXIV_LONG_OUTPUT = 736
"""Output p95 of the trace: above it, prompts are much shorter (the 4096-token filter)."""
ARXIV_PROMPT_SHARE_QUANTILES = (0.0002, 0.1624, 0.203, 0.2891, 0.3816, 0.492, 0.5738, 0.6475,
                                0.7134, 0.7791, 0.8421, 0.8994, 0.9511, 0.9753, 0.9847, 0.9897,
                                0.9951, 0.9977, 1.0)
"""prompt / (4096 - output) over the trace's rows with output <= ARXIV_LONG_OUTPUT (measured)."""
ARXIV_PROMPT_SHARE_QUANTILES_LONG = (0.0003, 0.0005, 0.0007, 0.007, 0.0258, 0.0746, 0.1352, 0.2076,
                                     0.3067, 0.4268, 0.5554, 0.6979, 0.8439, 0.9151, 0.9477, 0.9677,
                                     0.991, 0.9946, 1.0)
"""The same over the rows with longer outputs (1,413 rows, 5%)."""
ARXIV_MAX_TOTAL = 4096
"""The trace's filter: prompt + output <= 4096 tokens."""
ARXIV_MAX_PROMPT = 4054
"""Longest prompt in the trace."""

# `arxiv-paper`: Sarathi-Serve (OSDI'24) ran arXiv-summarization from another file of the same
# publisher, arxiv_summarization_filtered_stats_llama2_tokenizer.csv, with max_seq_len 16384 (its
# capacity configs, osdi-experiments/figure-5-6/*.yml in microsoft/sarathi-serve); that file is not
# here. Its statistics are quoted from the paper's dataset table AS RECALLED, not checked against
# the text in this session (the summary in shared/ gives none): prompt median 7059 / p90 12985 (std
# 3638), output median 208 / p90 371 (std 265). Treat them as uncertain by ~10%. Of the shape only
# the median and p90 are known, so both lengths are lognormal through those two quantiles (an
# assumption: the real output tail is longer, std 265 against ~110 here), prompt + output is held
# to 16384 (max_seq_len) by redrawing the prompt, and the prompt's lognormal is solved so that the
# quantiles hold after that truncation. No correlation is modelled besides the cap.
ARXIV_PAPER_PROMPT_MEDIAN = 7059
ARXIV_PAPER_PROMPT_P90 = 12985
ARXIV_PAPER_OUTPUT_MEDIAN = 208
ARXIV_PAPER_OUTPUT_P90 = 371
ARXIV_PAPER_MAX_TOTAL = 16384
"""max_seq_len of the paper's arXiv runs: prompt + output <= this."""

_Z90 = 1.2815515655446004  # standard normal quantile at 0.9


def _inverse_cdf(u: np.ndarray, values: tuple) -> np.ndarray:
    return np.interp(u, ARXIV_QUANTILE_LEVELS, values)


def arxiv_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompts, outputs) with the 4k-filtered arXiv trace's statistics (see the constants)."""
    out = np.maximum(np.rint(_inverse_cdf(rng.random(n), ARXIV_OUTPUT_QUANTILES)), 1)
    u = rng.random(n)
    share = np.where(out <= ARXIV_LONG_OUTPUT, _inverse_cdf(u, ARXIV_PROMPT_SHARE_QUANTILES),
                     _inverse_cdf(u, ARXIV_PROMPT_SHARE_QUANTILES_LONG))
    prompt = np.clip(np.rint(share * (ARXIV_MAX_TOTAL - out)), 1, ARXIV_MAX_PROMPT)
    return prompt.astype(np.int64), out.astype(np.int64)


def _truncated_lognormal(median: float, p90: float, cap: float) -> tuple[float, float]:
    """(mu, sigma) of the lognormal whose part below `cap` has this median and p90."""
    from statistics import NormalDist

    z = NormalDist()
    mu, sigma = math.log(median), math.log(p90 / median) / _Z90
    for _ in range(200):  # fixed point; converges in a few dozen steps for caps past the p90
        kept = z.cdf((math.log(cap) - mu) / sigma)
        sigma = (math.log(p90) - math.log(median)) / (z.inv_cdf(0.9 * kept) - z.inv_cdf(0.5 * kept))
        mu = math.log(median) - sigma * z.inv_cdf(0.5 * kept)
    return mu, sigma


def arxiv_paper_lengths(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(prompts, outputs) with the statistics of the Sarathi-Serve paper's arXiv workload (as
    recalled; see the constants): lognormal, prompt + output <= ARXIV_PAPER_MAX_TOTAL."""
    cap = ARXIV_PAPER_MAX_TOTAL
    o_sigma = math.log(ARXIV_PAPER_OUTPUT_P90 / ARXIV_PAPER_OUTPUT_MEDIAN) / _Z90
    out = np.clip(np.rint(rng.lognormal(math.log(ARXIV_PAPER_OUTPUT_MEDIAN), o_sigma, n)), 1, cap - 1)
    mu, sigma = _truncated_lognormal(ARXIV_PAPER_PROMPT_MEDIAN, ARXIV_PAPER_PROMPT_P90,
                                     cap - ARXIV_PAPER_OUTPUT_MEDIAN)
    prompt = np.maximum(np.rint(rng.lognormal(mu, sigma, n)), 1)
    for _ in range(1000):  # redraw the prompts that do not fit (a few % per round)
        over = prompt + out > cap
        if not over.any():
            break
        prompt[over] = np.maximum(np.rint(rng.lognormal(mu, sigma, int(over.sum()))), 1)
    prompt = np.minimum(prompt, cap - out)
    return prompt.astype(np.int64), out.astype(np.int64)


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
                                       int(d["output_tokens"]), d.get("conversation"),
                                       int(d.get("shared_prefix_tokens", 0))))
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
    """fixed | uniform | lognormal | zipf | chat-doc | arxiv | arxiv-paper (synthetic arXiv-summarization
    lengths: the 4k-filtered trace's statistics, or the paper's; prompt_len/output_len unused) |
    trace (sample rows of `trace_csv`)."""
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
    turns: int = 1
    """Multi-turn chats (> 1): requests come in conversations of this many turns (`as_chats`).
    The lengths above are then each turn's new message and answer; turn k's prompt is the
    system prompt, every earlier turn's message and answer, and its own message."""
    system_prompt_len: int = 0
    """Tokens of a system prompt that every request starts with (all conversations share it)."""
    turn_gap_s: float = 10.0
    """Multi-turn chats: seconds from one turn's arrival to the next one's (the user's reading and
    typing time, open loop: sent whether or not the answer has arrived)."""

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
        if self.turns < 1:
            raise ValueError(f"turns must be >= 1, got {self.turns}")
        if self.system_prompt_len < 0:
            raise ValueError(f"system_prompt_len must be >= 0, got {self.system_prompt_len}")
        if not self.turn_gap_s > 0:
            raise ValueError(f"turn_gap_s must be > 0, got {self.turn_gap_s}")


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
    elif cfg.length_dist == "arxiv":
        prompts, outputs = arxiv_lengths(n, len_rng)
        parts.append("synthetic arXiv-summarization lengths (statistics of the 4k-filtered trace)")
    elif cfg.length_dist == "arxiv-paper":
        prompts, outputs = arxiv_paper_lengths(n, len_rng)
        parts.append("synthetic arXiv-summarization lengths (the Sarathi-Serve paper's statistics)")
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
    wl = wl.with_qps(qps) if (qps is not None and cfg.arrival == "trace") else wl
    return as_chats(cfg, wl) if cfg.turns > 1 or cfg.system_prompt_len else wl


def as_chats(cfg: WorkloadConfig, wl: Workload) -> Workload:
    """Regroup `wl`, whose lengths are read as each turn's new message and answer, into
    conversations of `cfg.turns` turns behind a shared `cfg.system_prompt_len`-token system prompt.

    Conversation c starts at the arrival time of request c stretched by `turns` (the same arrival
    process at 1/turns the rate, so requests arrive at the workload's mean rate in the long run;
    a short run offers less, ramping up and down over a conversation's span) and its turn k
    follows `k * turn_gap_s` later. Turn k takes the lengths of request `c * turns + k`;
    its prompt is the system prompt, every earlier turn's message and answer, and its message
    (the answer is a stand-in of the asked output length: the real one is unknown before the
    run). A conversation whose prompt would pass `max_prompt_tokens` ends before that turn.
    """
    turns, reqs = cfg.turns, wl.requests
    chats: list[RequestSpec] = []
    for c in range(-(-len(reqs) // turns)):
        start = reqs[c].arrival_s * turns
        prompt = cfg.system_prompt_len
        for k, spec in enumerate(reqs[c * turns:(c + 1) * turns]):
            prompt += spec.prompt_tokens
            if cfg.max_prompt_tokens is not None and prompt > cfg.max_prompt_tokens:
                break
            chats.append(RequestSpec(start + k * cfg.turn_gap_s, prompt, spec.output_tokens,
                                     c if turns > 1 else None, cfg.system_prompt_len))
            prompt += spec.output_tokens
    chats.sort(key=lambda r: r.arrival_s)
    t0 = chats[0].arrival_s if chats else 0.0
    chats = [replace(r, arrival_s=r.arrival_s - t0) for r in chats]
    desc = (f"{-(-len(reqs) // turns)} conversations of up to {turns} turns {cfg.turn_gap_s:g} s "
            f"apart, " if turns > 1 else "")
    return Workload(chats, f"{desc}a {cfg.system_prompt_len}-token shared system prompt; per "
                           f"turn: {wl.description}")


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
    servers with prefix caching cannot reuse one request's KV cache for another -- except what
    the workload shares on purpose (`prompt`): a system prompt and multi-turn conversations."""
    tokens_per_word: float = 1.0
    """Tokens the server's tokenizer makes of one prompt word (1.0 for SmolLM2, Llama, GPT-2)."""
    token_ids: bool = False
    """Send prompts as lists of token ids (exact lengths; the server must accept them)."""
    id_range: tuple[int, int] = (1000, 10000)
    """Token ids are drawn from [lo, hi) when `token_ids` is set."""
    seed: int = 0
    _rng: np.random.Generator = field(init=False, repr=False)
    _system: list = field(init=False, repr=False, default_factory=list)
    _history: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if not self.tokens_per_word > 0:
            raise ValueError(f"tokens_per_word must be > 0, got {self.tokens_per_word}")
        self._rng = np.random.default_rng(self.seed)

    def _units(self, num_tokens: int) -> int:
        """Ids, or words, that make `num_tokens` tokens."""
        return num_tokens if self.token_ids else max(1, round(num_tokens / self.tokens_per_word))

    def _draw(self, units: int) -> list:
        if self.token_ids:
            return [int(x) for x in self._rng.integers(*self.id_range, size=units)]
        return [PROMPT_WORDS[i] for i in self._rng.integers(0, len(PROMPT_WORDS), size=units)]

    def _join(self, units: list) -> str | list[int]:
        return list(units) if self.token_ids else "".join(units)

    def build(self, num_tokens: int) -> str | list[int]:
        return self._join(self._draw(self._units(num_tokens)))

    def prompt(self, spec) -> str | list[int]:
        """The prompt of a `RequestSpec`: `build(prompt_tokens)`, unless the workload shares
        prefixes. Then it starts with the workload's system prompt (the same for every request)
        and, for a turn of a conversation, with the conversation's previous prompt: its history
        grows by fresh words or ids (the previous answer's stand-in and the new message) up to
        `prompt_tokens`. Call it in arrival order, so each turn follows the one before."""
        if spec.conversation is None and not spec.shared_prefix_tokens:
            return self.build(spec.prompt_tokens)
        system_units = self._units(spec.shared_prefix_tokens) if spec.shared_prefix_tokens else 0
        if len(self._system) < system_units:
            self._system += self._draw(system_units - len(self._system))
        history = [] if spec.conversation is None else self._history.setdefault(spec.conversation, [])
        missing = self._units(spec.prompt_tokens) - system_units - len(history)
        history += self._draw(max(1, missing))
        return self._join(self._system[:system_units] + history)


# ---- several tenants -----------------------------------------------------------------------------

@dataclass(frozen=True)
class TenantStream:
    """One tenant of a per-tenant run: its own arrival stream at `qps`."""

    name: str
    qps: float
    api_key: str | None = None
    """Sent as `Authorization: Bearer` (the server maps it to the tenant); None: the tenant is
    sent as the request's `user` field, with the run's --api-key if any."""

    @classmethod
    def parse(cls, text: str) -> "TenantStream":
        """`name=qps[:api_key]`, e.g. `flood=10` or `a=2:sk-a`. Errors name the bad value."""
        name, sep, rest = text.partition("=")
        qps_text, _, key = rest.partition(":")
        if not sep or not name:
            raise ValueError(f"--tenant {text!r} must be name=qps[:api_key]")
        try:
            qps = float(qps_text)
        except ValueError:
            raise ValueError(f"--tenant {text!r}: qps {qps_text!r} is not a number") from None
        if not qps > 0:
            raise ValueError(f"--tenant {text!r}: qps must be > 0")
        return cls(name, qps, key or None)


def tenant_workload(cfg: WorkloadConfig, tenants: list[TenantStream]) -> Workload:
    """One workload of `cfg` per tenant at its own rate (its own seed, so the streams are
    independent), merged in arrival order. `cfg.num_requests` is the total, split in proportion
    to the rates so every stream spans about the same time."""
    names = [t.name for t in tenants]
    if len(set(names)) != len(names):
        raise ValueError(f"--tenant names must be distinct, got {names}")
    if cfg.arrival == "trace" or cfg.trace_jsonl:
        raise ValueError("--tenant needs generated arrivals (poisson, gamma or constant)")
    if cfg.turns > 1:   # conversation ids would collide across the tenants' streams
        raise ValueError("--tenant does not combine with --turns")
    total_qps = sum(t.qps for t in tenants)
    n = cfg.num_requests or 100
    merged: list[RequestSpec] = []
    parts = []
    for i, t in enumerate(tenants):
        n_t = max(1, round(n * t.qps / total_qps))
        wl = build_workload(replace(cfg, num_requests=n_t, seed=cfg.seed + 1000 * i), t.qps)
        merged.extend(replace(r, tenant=t.name) for r in wl)
        parts.append(f"{t.name} {n_t} req at {t.qps:g} qps")
    merged.sort(key=lambda r: r.arrival_s)
    lengths = wl.description.split(", ", 1)[-1]   # the arrivals part is per tenant, above
    return Workload(merged, f"tenants: {', '.join(parts)}; {cfg.arrival} arrivals, {lengths}")
