"""sweep.py: deriving the sweep experiment, pairing records, where the tier pays."""

from __future__ import annotations

import pytest

from kvtier.lab.experiment import ExperimentError, load_experiment
from kvtier.lab.sweep import (
    parse_values,
    plan_sweep,
    sweep_grid,
    sweep_points,
    where_it_pays,
)
from tests.unit.lab.helpers import kvtier_stats, record


def test_parse_values():
    assert parse_values("1, 2,4") == (1, 2, 4)
    with pytest.raises(ExperimentError, match=r"--values: 'x' is not an integer"):
        parse_values("1,x")
    with pytest.raises(ExperimentError, match=r"--values: 0 must be >= 1"):
        parse_values("0")
    with pytest.raises(ExperimentError, match=r"--values: 2 is given twice"):
        parse_values("2,4,2")


def test_workload_knob_makes_one_workload_per_value_with_its_own_seed():
    base = load_experiment("smoke")
    plan = plan_sweep(base, "num_prefixes", (2, 8))
    exp = plan.experiment
    assert [s.name for s in exp.servers] == ["prefix cache only", "+ cpu tier"]
    assert [w.name for w in exp.workloads] == ["num_prefixes=2", "num_prefixes=8"]
    assert [w.fields["prefix_repetition_num_prefixes"] for w in exp.workloads] == [2, 8]
    assert [w.fields["seed"] for w in exp.workloads] == [0, 1]
    assert plan.pairs[1] == ("prefix cache only", "+ cpu tier", "num_prefixes=8")


def test_server_knob_makes_server_pairs_with_the_flag_replaced():
    plan = plan_sweep(load_experiment("smoke"), "num_gpu_blocks", (16, 64))
    servers = plan.experiment.servers
    assert [s.name for s in servers] == [
        "prefix cache only @ num-gpu-blocks-override=16", "+ cpu tier @ num-gpu-blocks-override=16",
        "prefix cache only @ num-gpu-blocks-override=64", "+ cpu tier @ num-gpu-blocks-override=64"]
    assert servers[3].engine.count("--num-gpu-blocks-override") == 1
    assert servers[3].engine_value("num-gpu-blocks-override") == "64"
    assert [w.name for w in plan.experiment.workloads] == ["prefix_repetition"]


def test_bad_sweeps_name_the_flag():
    base = load_experiment("smoke")
    with pytest.raises(ExperimentError, match=r"--knob: 'bogus'"):
        plan_sweep(base, "bogus", (1,))
    with pytest.raises(ExperimentError, match=r"--on: no server named 'x'"):
        plan_sweep(base, "num_prefixes", (1,), on="x")
    with pytest.raises(ExperimentError, match=r"--workload: no workload named 'x'"):
        plan_sweep(base, "num_prefixes", (1,), workload="x")
    # used to plan a sweep of one configuration against itself, both records under one name
    first = base.servers[0].name
    with pytest.raises(ExperimentError, match=rf"--off and --on both name {first!r}"):
        plan_sweep(base, "num_prefixes", (1,), off=first, on=first)
    with pytest.raises(ExperimentError, match=rf"--off and --on both name {first!r}"):
        plan_sweep(base, "num_gpu_blocks", (8,), on=first)
    remote = base.replace(servers=(base.servers[0].__class__("r", base_url="http://h:1"),
                                   base.servers[1]))
    with pytest.raises(ExperimentError, match=r"server 'r' is not a kvtier configuration"):
        plan_sweep(remote, "num_gpu_blocks", (8,))


def test_pairs_give_the_gain_and_where_it_pays():
    plan = plan_sweep(load_experiment("smoke"), "num_prefixes", (2, 8))
    ws = {"device_kv_tokens": 512}
    records = [
        record("prefix cache only", "num_prefixes=2", [1.0], prefix_working_set_tokens=256, **ws),
        record("+ cpu tier", "num_prefixes=2", [1.0], prefix_working_set_tokens=256, **ws),
        record("prefix cache only", "num_prefixes=8", [3.0], prefix_working_set_tokens=1024, **ws),
        record("+ cpu tier", "num_prefixes=8", [1.0], prefix_working_set_tokens=1024,
               kvtier=kvtier_stats(1000, 100, 600), **ws)]
    points = sweep_points(plan, records)
    assert [(p.ratio, round(p.gain, 2)) for p in points] == [(0.5, 1.0), (2.0, 3.0)]
    grid = sweep_grid(plan, records)
    assert grid[2][:5] == ["8", "2.00×", "3.00 s", "1.00 s", "3.00×"] and grid[2][-1] == "60%"
    assert "starts to pay at num_prefixes=8" in where_it_pays(plan, records)
    assert "never" in where_it_pays(plan, records[:2])
