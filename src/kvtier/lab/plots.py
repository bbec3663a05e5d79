"""PNG plots of a lab run (matplotlib, Agg backend: no display needed).

    ttft_cdf_<workload>.png   TTFT CDF, one line per configuration
    itl_<workload>.png        ITL distribution (log-spaced histogram), one line per configuration
    throughput.png            request and output-token throughput bars, per workload
    regime_map.png            TTFT gain vs the first configuration against prefix working set /
                              device KV pool: where a tier starts to pay
    sweep_<knob>.png          (sweeps) mean/p99 TTFT tier-off vs tier-on and the gain per value
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from kvtier.lab.records import RunRecord  # noqa: E402
from kvtier.lab.server import slug  # noqa: E402
from kvtier.lab.table import workload_records  # noqa: E402


@dataclass(frozen=True)
class RegimePoint:
    """One configuration on one workload, relative to the baseline configuration."""

    server: str
    workload: str
    ratio: float
    """Prefix working set / device KV pool (both in tokens)."""
    gain: float
    """Baseline mean TTFT / this configuration's mean TTFT (>1: faster first tokens)."""


def regime_points(records: Sequence[RunRecord], servers: Sequence[str],
                  workloads: Sequence[str]) -> list[RegimePoint]:
    """Points for every non-baseline server on every workload with a known working set."""
    points = []
    for workload in workloads:
        row = workload_records(records, servers, workload)
        base = row[0]
        base_ttft = base.metric("mean_ttft_ms") if base is not None and base.succeeded else None
        for record in row[1:]:
            if record is None or not record.succeeded or not base_ttft:
                continue
            ttft = record.metric("mean_ttft_ms")
            pool = record.device_kv_tokens or (base.device_kv_tokens if base else None)
            working_set = record.prefix_working_set_tokens
            if ttft and pool and working_set:
                points.append(RegimePoint(record.server, workload, working_set / pool,
                                          base_ttft / ttft))
    return points


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_ttft_cdf(records: Sequence[RunRecord], servers: Sequence[str], workload: str,
                  path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for record in workload_records(records, servers, workload):
        if record is None or not record.ttfts_ms:
            continue
        values = np.sort(np.asarray(record.ttfts_ms))
        ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                label=f"{record.server} (mean {np.mean(values):,.0f} ms)")
    ax.set(title=f"TTFT CDF: {workload}", xlabel="TTFT (ms)", ylabel="fraction of requests",
           ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_itl(records: Sequence[RunRecord], servers: Sequence[str], workload: str,
             path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    present = [r for r in workload_records(records, servers, workload) if r and r.itls_ms]
    positive = [v for r in present for v in r.itls_ms if v > 0]
    if positive:
        bins = np.geomspace(max(min(positive), 1e-3), max(positive) * 1.01, 40)
        for record in present:
            values = np.asarray([v for v in record.itls_ms if v > 0])
            if values.size == 0:  # every chunk arrived in the same clock tick
                continue
            # The log axis cannot show zero gaps (chunks read together); the legend's figures
            # include them, as the reported median and p99 ITL do.
            every = np.asarray(record.itls_ms)
            zeros = every.size - values.size
            ax.hist(values, bins=bins, histtype="step", density=False, linewidth=1.5,
                    label=f"{record.server} (median {np.median(every):,.1f} ms, "
                          f"p99 {np.percentile(every, 99):,.1f} ms"
                          + (f"; {zeros:,} gaps of 0 not drawn)" if zeros else ")"))
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    ax.set(title=f"Inter-token latency: {workload}", xlabel="ITL (ms, log scale)",
           ylabel="chunks")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_throughput(records: Sequence[RunRecord], servers: Sequence[str],
                    workloads: Sequence[str], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    width = 0.8 / max(len(servers), 1)
    x = np.arange(len(workloads))
    for i, server in enumerate(servers):
        for ax, key in zip(axes, ("request_throughput", "output_throughput"), strict=True):
            values = []
            for workload in workloads:
                record = workload_records(records, [server], workload)[0]
                value = record.metric(key) if record is not None and record.succeeded else None
                values.append(value or 0.0)
            ax.bar(x + (i - (len(servers) - 1) / 2) * width, values, width, label=server)
    for ax, title in zip(axes, ("Requests/sec", "Output tokens/sec"), strict=True):
        ax.set_xticks(x, workloads, rotation=15)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_regime_map(points: Sequence[RegimePoint], path: Path, title: str = "") -> Path:
    """Gain vs ratio, log x; one marker series per configuration, joined when several."""
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.axhline(1.0, color="grey", linewidth=1, linestyle="--")
    ax.axvline(1.0, color="grey", linewidth=1, linestyle=":")
    for server in dict.fromkeys(p.server for p in points):
        mine = sorted((p for p in points if p.server == server), key=lambda p: p.ratio)
        ax.plot([p.ratio for p in mine], [p.gain for p in mine], marker="o", label=server)
        for p in mine:
            ax.annotate(p.workload, (p.ratio, p.gain), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
    if points:
        ratios, gains = [p.ratio for p in points], [p.gain for p in points]
        ax.set_xscale("log", base=2)
        ax.set_xlim(min(0.5, min(ratios) / 1.5), max(2.0, max(ratios) * 1.5))
        ax.set_ylim(0, max(1.5, max(gains) * 1.15))
        ax.axvspan(1.0, ax.get_xlim()[1], color="tab:green", alpha=0.06,
                   label="working set > device pool")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no workload with a prefix working set\nand a known device KV pool",
                ha="center", va="center", transform=ax.transAxes)
    ax.set(title=title or "Regime map: TTFT gain vs prefix pressure",
           xlabel="prefix working set / device KV pool (tokens, log scale)",
           ylabel="mean TTFT gain vs first configuration (×)")
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_sweep(knob: str, values: Sequence[float], off: Sequence[RunRecord | None],
               on: Sequence[RunRecord | None], names: tuple[str, str], path: Path) -> Path:
    """Mean and p99 TTFT for tier-off and tier-on per knob value, and their ratio."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))

    def series(records: Sequence[RunRecord | None], key: str) -> list[float]:
        return [(r.metric(key) or np.nan) if r is not None and r.succeeded else np.nan
                for r in records]

    for records, name, color in ((off, names[0], "tab:blue"), (on, names[1], "tab:orange")):
        left.plot(values, series(records, "mean_ttft_ms"), marker="o", color=color,
                  label=f"{name}: mean")
        left.plot(values, series(records, "p99_ttft_ms"), marker="x", linestyle="--",
                  color=color, label=f"{name}: p99")
    gain = np.asarray(series(off, "mean_ttft_ms")) / np.asarray(series(on, "mean_ttft_ms"))
    right.plot(values, gain, marker="o", color="tab:green")
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set(title=f"TTFT vs {knob}", xlabel=knob, ylabel="TTFT (ms)")
    right.set(title="mean TTFT gain (off / on)", xlabel=knob, ylabel="×")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    return _save(fig, path)


def plot_all(records: Sequence[RunRecord], servers: Sequence[str], workloads: Sequence[str],
             out_dir: Path) -> list[Path]:
    """Every per-run plot of an experiment into `out_dir`; returns the files written."""
    written = []
    for workload in workloads:
        name = slug(workload)
        written.append(plot_ttft_cdf(records, servers, workload, out_dir / f"ttft_cdf_{name}.png"))
        written.append(plot_itl(records, servers, workload, out_dir / f"itl_{name}.png"))
    written.append(plot_throughput(records, servers, workloads, out_dir / "throughput.png"))
    written.append(plot_regime_map(regime_points(records, servers, workloads),
                                   out_dir / "regime_map.png"))
    return written
