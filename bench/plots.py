"""Plots of bench and capacity JSON results (matplotlib, Agg backend, PNG files).

- `latency_throughput.png`: P99 TBT and P50 TTFT against the offered request rate, one line per
  `label` (a policy, a budget...), from bench JSONs and from the trials inside capacity JSONs.
- `capacity.png`: capacity (QPS) bars per label, grouped by TBT SLO, from capacity JSONs.
- `tbt_cdf.png`: CDF of all inter-token gaps per bench JSON (needs its per-request data).
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402



def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def load_results(paths: list[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        d = json.loads(Path(p).read_text())
        if d.get("kind") not in ("bench", "capacity"):
            raise ValueError(f"{p}: not a bench or capacity result (kind={d.get('kind')!r})")
        d.setdefault("label", None)
        d["_path"] = str(p)
        out.append(d)
    return out


def _label(d: dict) -> str:
    return d.get("label") or Path(d["_path"]).stem


def _points(results: list[dict]) -> dict[str, list[tuple[float, float | None, float | None]]]:
    """label -> [(offered load req/s, p99 TBT s, p50 TTFT s)]. The offered rate (not the achieved
    throughput, which is noisy on short runs) is the x axis, as in the Sarathi-Serve paper."""
    pts: dict[str, list] = defaultdict(list)
    for d in results:
        if d["kind"] == "bench":
            w = d.get("workload") or {}
            x = w.get("qps") or w.get("offered_qps") or d["request_throughput"]
            pts[_label(d)].append((x, d["tbt_s"]["p99"], d["ttft_s"]["p50"]))
        else:
            for t in d.get("trials", []):
                pts[_label(d)].append((t["qps"], t.get("p99_tbt_s"), t.get("p50_ttft_s")))
    return pts


def plot_latency_throughput(results: list[dict], out: Path) -> Path | None:
    pts = _points(results)
    if not pts:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, p in sorted(pts.items()):
        p = sorted(p)
        xs = [x for x, *_ in p]
        ax1.plot(xs, [np.nan if t is None else t * 1000 for _, t, _ in p], "o-", label=label)
        ax2.plot(xs, [np.nan if t is None else t for *_, t in p], "o-", label=label)
    slos = sorted({d["tbt_slo_ms"] for d in results if d["kind"] == "capacity" and d.get("tbt_slo_ms")})
    for s in slos:
        ax1.axhline(s, color="grey", ls=":", lw=1)
    ax1.set(xlabel="offered load (requests/s)", ylabel="P99 time between tokens (ms)",
            title="P99 TBT vs load")
    ax2.set(xlabel="offered load (requests/s)", ylabel="P50 TTFT (s)", title="median TTFT vs load")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, out / "latency_throughput.png")


def plot_capacity(results: list[dict], out: Path) -> Path | None:
    caps = [d for d in results if d["kind"] == "capacity"]
    if not caps:
        return None
    slos = sorted({d.get("tbt_slo_ms") for d in caps}, key=lambda v: (v is None, v))
    labels = sorted({_label(d) for d in caps})
    value = {(d.get("tbt_slo_ms"), _label(d)): d.get("capacity_qps") or 0.0 for d in caps}
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.6 * len(slos) * len(labels) ** 0.5 + 2), 4.2))
    for i, lab in enumerate(labels):
        xs = np.arange(len(slos)) + (i - (len(labels) - 1) / 2) * width
        ys = [value.get((s, lab), np.nan) for s in slos]
        bars = ax.bar(xs, ys, width, label=lab)
        ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_xticks(np.arange(len(slos)), [f"P99 TBT <= {s:g} ms" if s else "?" for s in slos])
    ax.set(ylabel="capacity (requests/s)", title="capacity per policy and SLO")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, out / "capacity.png")


def plot_tbt_cdf(results: list[dict], out: Path) -> Path | None:
    benches = [d for d in results if d["kind"] == "bench" and d.get("requests")]
    if not benches:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for d in benches:
        gaps = np.sort([g for r in d["requests"] if not r.get("error") for g in r["itl_s"]])
        if gaps.size == 0:
            continue
        qps = (d.get("workload") or {}).get("offered_qps")
        name = _label(d) + (f" @ {qps:.2f} qps" if qps else "")
        ax.plot(gaps * 1000, np.arange(1, gaps.size + 1) / gaps.size, label=name)
    ax.set(xlabel="time between tokens (ms)", ylabel="CDF", title="TBT distribution")
    ax.set_xscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "tbt_cdf.png")


def make_plots(paths: list[str | Path], out_dir: str | Path) -> list[Path]:
    """Every plot the given results allow; returns the files written."""
    results = load_results(paths)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = [plot_latency_throughput(results, out), plot_capacity(results, out),
            plot_tbt_cdf(results, out)]
    return [p for p in made if p is not None]
