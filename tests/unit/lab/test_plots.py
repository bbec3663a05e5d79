"""plots.py and report.py: every PNG is written (Agg backend) and the regime map is right."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.lab.experiment import Experiment, ServerSpec, WorkloadSpec
from kvtier.lab.plots import plot_all, plot_sweep, regime_points
from kvtier.lab.records import SERVER_FAILED, RunRecord
from kvtier.lab.report import write_report
from kvtier.lab.runner import LabRun
from tests.unit.lab.helpers import kvtier_stats, record

PNG = b"\x89PNG"


def records() -> list[RunRecord]:
    pool = {"device_kv_tokens": 512, "prefix_working_set_tokens": 2048}
    return [record("off", "P", [1.0, 2.0, 3.0], kvtier=kvtier_stats(900, 100, 0), **pool),
            record("on", "P", [0.5, 1.0, 1.5], kvtier=kvtier_stats(900, 100, 500), **pool),
            record("off", "S", [0.2, 0.3], device_kv_tokens=512),
            RunRecord("on", "S", status=SERVER_FAILED, error="exited with code 1")]


def test_regime_points_compare_each_config_with_the_first():
    points = regime_points(records(), ["off", "on"], ["P", "S"])
    assert len(points) == 1  # S has no working set, and its tier run failed
    assert points[0].server == "on" and points[0].ratio == pytest.approx(4.0)
    assert points[0].gain == pytest.approx(2.0)


def test_plot_all_writes_every_png(tmp_path: Path):
    written = plot_all(records(), ["off", "on"], ["P", "S"], tmp_path)
    names = sorted(p.name for p in written)
    assert names == ["itl_p.png", "itl_s.png", "regime_map.png", "throughput.png",
                     "ttft_cdf_p.png", "ttft_cdf_s.png"]
    assert all(p.read_bytes()[:4] == PNG and p.stat().st_size > 5000 for p in written)


def test_plots_survive_runs_without_data(tmp_path: Path):
    empty = [RunRecord("off", "P", status=SERVER_FAILED), RunRecord("on", "P", status="failed")]
    written = plot_all(empty, ["off", "on"], ["P"], tmp_path)
    assert all(p.read_bytes()[:4] == PNG for p in written)
    path = plot_sweep("num_prefixes", [2, 4], [records()[0], None], [records()[1], None],
                      ("off", "on"), tmp_path / "sweep.png")
    assert path.read_bytes()[:4] == PNG


def test_report_links_plots_and_names_configurations(tmp_path: Path):
    experiment = Experiment(
        name="t", source="test", description="A test.",
        servers=(ServerSpec("off", engine=("--num-gpu-blocks-override", "32")),
                 ServerSpec("on", base_url="http://127.0.0.1:9")),
        workloads=(WorkloadSpec("P", {"dataset_name": "prefix_repetition"}),
                   WorkloadSpec("S", {"dataset_name": "sharegpt"})))
    lab = LabRun(experiment, tmp_path, records(), wall_s=12.5)
    text = write_report(lab).read_text()
    assert text.startswith("# Lab report: t\n\nA test.")
    assert "`kvtier serve --num-gpu-blocks-override 32`" in text
    assert "given server at http://127.0.0.1:9" in text
    assert "| Mean TTFT | 2.00 s | 1.00 s | −50.0% |" in text
    assert "| on | P | 4.00× | 2.00× |" in text
    assert "![regime_map](plots/regime_map.png)" in text
    assert "! on: server-failed: exited with code 1" in text
    assert (tmp_path / "plots" / "ttft_cdf_p.png").is_file()


def test_itl_plot_skips_a_run_whose_chunks_all_arrived_at_once(tmp_path: Path):
    """A fast server can stream every chunk in one clock tick: all its ITLs are 0 ms.

    The histogram must still be drawn for the other run instead of taking a percentile of nothing.
    """
    from dataclasses import replace

    from kvtier.lab.plots import plot_itl
    slow, instant = records()[0], records()[1]
    slow = replace(slow, itls_ms=[4.0, 5.0, 6.0])
    instant = replace(instant, itls_ms=[0.0, 0.0])
    path = plot_itl([slow, instant], ["off", "on"], "P", tmp_path / "itl.png")
    assert path.read_bytes()[:4] == PNG


def test_itl_legend_counts_zero_gaps_as_the_reported_itl_does(tmp_path: Path, monkeypatch):
    """Chunks read together give 0 ms gaps: the log axis cannot draw them, but the legend's
    median and p99 include them, as the reported median and p99 ITL do."""
    from dataclasses import replace

    from kvtier.lab import plots
    labels: list[str] = []
    save = plots._save

    def capture(fig, path):  # noqa: ANN001, ANN202
        labels.extend(fig.axes[0].get_legend_handles_labels()[1])
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", capture)
    run = replace(records()[0], itls_ms=[0.0, 0.0, 0.0, 4.0, 6.0])
    plots.plot_itl([run], ["off"], "P", tmp_path / "itl.png")
    assert labels == ["off (median 0.0 ms, p99 5.9 ms; 3 gaps of 0 not drawn)"]
