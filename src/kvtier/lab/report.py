"""The report directory of a lab run: report.md and the plots beside results.json / .csv.

    <out>/results.json   every record (runner.py writes it after each run)
    <out>/results.csv    one row per configuration × workload
    <out>/report.md      what ran, on what machine, the article tables, counters, plots, failures
    <out>/plots/*.png    see plots.py
    <out>/logs/*.log     each started server's output
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.lab.plots import plot_all, regime_points
from kvtier.lab.records import machine_info
from kvtier.lab.table import format_tables

if TYPE_CHECKING:
    from kvtier.lab.runner import LabRun


def names(lab: LabRun) -> tuple[list[str], list[str]]:
    """(server names, workload names) in experiment order."""
    return ([s.name for s in lab.experiment.servers], [w.name for w in lab.experiment.workloads])


def write_report(lab: LabRun) -> Path:
    """Plots, then report.md; returns report.md's path."""
    servers, workloads = names(lab)
    plots = plot_all(lab.records, servers, workloads, lab.out_dir / "plots")
    path = lab.out_dir / "report.md"
    path.write_text(render_report(lab, plots), encoding="utf-8")
    return path


def render_report(lab: LabRun, plots: list[Path]) -> str:
    experiment = lab.experiment
    servers, workloads = names(lab)
    machine = machine_info()
    lines = [f"# Lab report: {experiment.name}", ""]
    if experiment.description:
        lines += [experiment.description.strip(), ""]
    lines += [f"- source: {experiment.source or '-'}",
              f"- machine: {machine['hostname']}, {machine['platform']}, "
              f"{machine['cpu_count']} CPUs, Python {machine['python']}",
              f"- wall time: {lab.wall_s:.1f} s (server starts included)", "",
              "## Configurations", ""]
    lines += [_server_line(lab, spec_index) for spec_index in range(len(servers))]
    lines += ["", "## Workloads", ""]
    for workload in experiment.workloads:
        fields = ", ".join(f"{k}={v}" for k, v in workload.fields.items())
        working_set = workload.prefix_working_set_tokens()
        extra = f" (prefix working set {working_set:,} tokens)" if working_set else ""
        lines.append(f"- **{workload.name}**: {fields}{extra}")
    lines += ["", "## Results", "",
              "Changes are relative to the first configuration; for latencies negative is "
              "better. 'hit tokens' are prompt tokens the server matched in each cache level "
              "(kvtier's /metrics, measured phase only).", "",
              format_tables(lab.records, servers, workloads, markdown=True), ""]
    lines += _regime_section(lab, servers, workloads)
    lines += ["## Plots", ""]
    lines += [f"![{p.stem}](plots/{p.name})" for p in plots]
    return "\n".join(lines) + "\n"


def _server_line(lab: LabRun, index: int) -> str:
    spec = lab.experiment.servers[index]
    if spec.kind == "url":
        how = f"given server at {spec.base_url}"
    elif spec.kind == "launch":
        how = f"`{spec.launch}`"
    else:
        model = f"--model {spec.model} " if spec.model else ""
        how = f"`kvtier serve {model}{' '.join(spec.engine)}`"
    starts = [r.server_start_s for r in lab.records if r.server == spec.name and r.server_start_s]
    start = f", healthy after {starts[0]:.1f} s" if starts else ""
    logs = [r.server_log for r in lab.records if r.server == spec.name and r.server_log]
    log = f", log `{Path(logs[0]).relative_to(lab.out_dir)}`" if logs and Path(
        logs[0]).is_relative_to(lab.out_dir) else ""
    return f"{index + 1}. **{spec.name}**: {how}{start}{log}"


def _regime_section(lab: LabRun, servers: list[str], workloads: list[str]) -> list[str]:
    points = regime_points(lab.records, servers, workloads)
    if not points:
        return []
    lines = ["## Regime", "",
             "| configuration | workload | working set / device pool | mean TTFT gain |",
             "|---|---|---:|---:|"]
    lines += [f"| {p.server} | {p.workload} | {p.ratio:.2f}× | {p.gain:.2f}× |" for p in points]
    return [*lines, ""]
