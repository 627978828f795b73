"""Statistics of a load run: latency percentiles, throughput and goodput, as JSON and as a table.

- TTFT: send to first token, per successful request.
- TBT: every gap between streamed chunks, pooled over all successful requests.
- E2E: send to end of stream.
- Throughput: successful requests and their output tokens divided by the run's wall time (first send
  to last end).
- Goodput: requests (out of all sent, failures count as misses) whose TTFT is within the TTFT SLO and
  whose own P99 gap is within the TBT SLO; as a share and as a rate over the wall time.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from bench.results import RequestResult, RunResult

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The q-th percentile (linear interpolation between order statistics); None if empty."""
    a = np.asarray(values, dtype=np.float64)
    return float(np.percentile(a, q)) if a.size else None


def latency_stats(values: Iterable[float]) -> dict[str, float | int | None]:
    a = np.asarray(list(values), dtype=np.float64)
    out: dict[str, float | int | None] = {f"p{q}": percentile(a, q) for q in PERCENTILES}
    out["mean"] = float(a.mean()) if a.size else None
    out["max"] = float(a.max()) if a.size else None
    out["count"] = int(a.size)
    return out


@dataclass(frozen=True)
class SLO:
    ttft_s: float | None = None
    """Largest acceptable time to first token (None: not checked)."""
    tbt_s: float | None = None
    """Largest acceptable P99 of a request's own inter-token gaps (None: not checked)."""

    def __post_init__(self) -> None:
        for name in ("ttft_s", "tbt_s"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"SLO {name} must be > 0, got {v}")

    @property
    def active(self) -> bool:
        return self.ttft_s is not None or self.tbt_s is not None


def request_p99_tbt(r: RequestResult) -> float | None:
    return percentile(r.itl_s, 99)


def meets_slo(r: RequestResult, slo: SLO) -> bool:
    """A successful request within both SLOs (a request with no gaps meets the TBT SLO)."""
    if not r.ok or r.ttft_s is None:
        return False
    if slo.ttft_s is not None and r.ttft_s > slo.ttft_s:
        return False
    p99 = request_p99_tbt(r)
    return not (slo.tbt_s is not None and p99 is not None and p99 > slo.tbt_s)


def goodput(requests: Sequence[RequestResult], slo: SLO, wall_s: float) -> dict:
    good = sum(meets_slo(r, slo) for r in requests)
    return {"ttft_slo_s": slo.ttft_s, "tbt_slo_s": slo.tbt_s, "num_good": good,
            "fraction": good / len(requests) if requests else None,
            "rate_rps": good / wall_s if wall_s > 0 else None}


def summarize(run: RunResult, slo: SLO | None = None, label: str | None = None,
              workload: dict | None = None, include_requests: bool = True) -> dict:
    """Everything a bench JSON holds (`kind: "bench"`); `requests` has the raw per-request data."""
    ok = [r for r in run.requests if r.ok]
    errors: dict[str, int] = {}
    for r in run.requests:
        if not r.ok:
            key = r.error.split(":")[0] if r.error.startswith("HTTP") else r.error[:80]
            errors[key] = errors.get(key, 0) + 1
    out_tokens = sum(r.output_tokens for r in ok)
    out = {
        "kind": "bench", "label": label, "url": run.url, "model": run.model,
        "started_at": run.started_at, "workload": workload or {},
        "num_requests": len(run.requests), "num_ok": len(ok),
        "num_errors": len(run.requests) - len(ok), "num_429": run.num_429, "num_503": run.num_503,
        "errors": errors, "timed_out": run.timed_out, "wall_s": run.wall_s,
        "request_throughput": len(ok) / run.wall_s, "output_token_throughput": out_tokens / run.wall_s,
        "output_tokens": out_tokens,
        "bundled_tokens": sum(r.bundled_tokens for r in ok),
        "short_outputs": sum(r.output_tokens < r.max_tokens for r in ok),
        "ttft_s": latency_stats(r.ttft_s for r in ok if r.ttft_s is not None),
        "tbt_s": latency_stats(g for r in ok for g in r.itl_s),
        "e2e_s": latency_stats(r.e2e_s for r in ok if r.e2e_s is not None),
        "goodput": goodput(run.requests, slo, run.wall_s) if slo is not None and slo.active else None,
    }
    tenants = sorted({r.tenant for r in run.requests if r.tenant is not None})
    if tenants:
        out["tenants"] = {t: tenant_stats([r for r in run.requests if r.tenant == t], run.wall_s)
                          for t in tenants}
    if include_requests:
        out["requests"] = [r.to_dict() for r in run.requests]
    return out


def tenant_stats(requests: Sequence[RequestResult], wall_s: float) -> dict:
    """One tenant's share of a run: its latencies, its output tokens/s over the run's wall time
    (so tenants' rates compare directly), and its rejections."""
    ok = [r for r in requests if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {"num_requests": len(requests), "num_ok": len(ok),
            "num_429": sum(r.status == 429 for r in requests),
            "num_errors": len(requests) - len(ok), "output_tokens": tokens,
            "output_token_throughput": tokens / wall_s,
            "ttft_s": latency_stats(r.ttft_s for r in ok if r.ttft_s is not None),
            "tbt_s": latency_stats(g for r in ok for g in r.itl_s)}


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.1f}"


def format_table(s: dict) -> str:
    """A plain-text table of a summary (fixed width, fine in logs and in a terminal)."""
    w = s.get("workload") or {}
    lines = [f"{s.get('label') or 'bench'}: {s['model']} at {s['url']}"]
    if w.get("description"):
        lines.append(f"workload: {w['description']}")
    lines.append(f"requests: {s['num_ok']}/{s['num_requests']} ok, {s['num_errors']} errors "
                 f"(429: {s['num_429']}, 503: {s['num_503']})"
                 + (", RUN TIMED OUT" if s["timed_out"] else ""))
    for k, v in (s.get("errors") or {}).items():
        lines.append(f"  error x{v}: {k}")
    lines.append(f"wall {s['wall_s']:.2f} s | {s['request_throughput']:.3f} req/s | "
                 f"{s['output_token_throughput']:.1f} output tok/s"
                 + (f" | offered {w['offered_qps']:.3f} qps" if w.get("offered_qps") else ""))
    lines.append("")
    lines.append(f"{'metric (ms)':<12}{'p50':>10}{'p90':>10}{'p99':>10}{'mean':>10}{'max':>10}{'n':>8}")
    for name, key in (("TTFT", "ttft_s"), ("TBT", "tbt_s"), ("E2E", "e2e_s")):
        st = s[key]
        cols = "".join(f"{_ms(st[c]):>10}" for c in ("p50", "p90", "p99", "mean", "max"))
        lines.append(f"{name:<12}{cols}{st['count']:>8}")
    if s.get("tenants"):
        lines.append("")
        lines.append(f"{'tenant':<12}{'ok/sent':>10}{'429':>6}{'TTFT p50':>10}{'TTFT p99':>10}"
                     f"{'TBT p99':>10}{'out tok/s':>11}   (ms)")
        for name, t in s["tenants"].items():
            lines.append(f"{name[:12]:<12}{str(t['num_ok']) + '/' + str(t['num_requests']):>10}"
                         f"{t['num_429']:>6}{_ms(t['ttft_s']['p50']):>10}{_ms(t['ttft_s']['p99']):>10}"
                         f"{_ms(t['tbt_s']['p99']):>10}{t['output_token_throughput']:>11.1f}")
    g = s.get("goodput")
    if g:
        slos = ", ".join(x for x in (f"TTFT <= {_ms(g['ttft_slo_s'])} ms" if g["ttft_slo_s"] else "",
                                     f"P99 TBT <= {_ms(g['tbt_slo_s'])} ms" if g["tbt_slo_s"] else "") if x)
        lines.append("")
        lines.append(f"goodput ({slos}): {g['num_good']}/{s['num_requests']} = "
                     f"{(g['fraction'] or 0):.1%}, {(g['rate_rps'] or 0):.3f} req/s")
    if s.get("bundled_tokens"):
        lines.append(f"note: {s['bundled_tokens']} tokens arrived bundled in a chunk with another "
                     f"token; TBT is per chunk")
    if s.get("short_outputs"):
        lines.append(f"note: {s['short_outputs']} requests got fewer tokens than asked "
                     f"(server ignores ignore_eos?)")
    return "\n".join(lines)
