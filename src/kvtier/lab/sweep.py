"""`kvtier lab sweep`: vary one pressure knob, tier-off vs tier-on, and find where the tier pays.

The sweep derives an ordinary experiment from a base one (a preset or file): two of its server
configurations (tier off, tier on; by default the first two) and one workload (by default the
first prefix_repetition one). Workload knobs become one workload per value (each value gets
a fresh pair of servers, off then on, so the two runs compared are adjacent in time); the
device-pool knob becomes one server pair per value. Each value uses its own seed (base seed +
index). A value "pays" only where the tiers served tokens: a gain without tier hits is noise.

    knob             what changes
    num_prefixes     prefix_repetition_num_prefixes
    prefix_len       prefix_repetition_prefix_len
    output_len       output_len (every dataset's output length)
    max_concurrency  max_concurrency
    num_gpu_blocks   --num-gpu-blocks-override of both servers (device KV pool)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from kvtier.lab.experiment import (
    Experiment,
    ExperimentError,
    ServerSpec,
    WorkloadSpec,
    validate_bench_fields,
)
from kvtier.lab.plots import RegimePoint, plot_regime_map, plot_sweep
from kvtier.lab.records import RunRecord
from kvtier.lab.table import format_value, percent_change, render_text

WORKLOAD_KNOBS = {"num_prefixes": "prefix_repetition_num_prefixes",
                  "prefix_len": "prefix_repetition_prefix_len",
                  "output_len": "output_len", "max_concurrency": "max_concurrency"}
SERVER_KNOBS = {"num_gpu_blocks": "num-gpu-blocks-override"}
KNOBS = (*WORKLOAD_KNOBS, *SERVER_KNOBS)
PAYS_THRESHOLD = 1.10
"""A tier 'pays' where tier-off mean TTFT / tier-on mean TTFT reaches this."""


@dataclass(frozen=True)
class SweepPlan:
    """The derived experiment and how to pair its records back up per knob value."""

    knob: str
    values: tuple[int, ...]
    experiment: Experiment
    off: str
    on: str
    pairs: tuple[tuple[str, str, str], ...]
    """Per value: (off server name, on server name, workload name)."""


def parse_values(text: str) -> tuple[int, ...]:
    """"1,2,4" -> (1, 2, 4); raises ExperimentError naming the bad item."""
    values = []
    for item in text.replace(" ", "").split(","):
        try:
            value = int(item)
        except ValueError:
            raise ExperimentError(f"--values: {item!r} is not an integer") from None
        if value < 1:
            raise ExperimentError(f"--values: {value} must be >= 1")
        if value in values:
            raise ExperimentError(f"--values: {value} is given twice")
        values.append(value)
    if not values:
        raise ExperimentError("--values: give at least one value")
    return tuple(values)


def _pick_server(base: Experiment, name: str | None, index: int, flag: str) -> ServerSpec:
    if name is None:
        if len(base.servers) <= index:
            raise ExperimentError(f"{base.source}: a sweep needs two servers (tier off, tier on)"
                                  f", found {len(base.servers)}")
        return base.servers[index]
    for spec in base.servers:
        if spec.name == name:
            return spec
    raise ExperimentError(f"{flag}: no server named {name!r} in {base.source} (servers: "
                          f"{', '.join(s.name for s in base.servers)})")


def _pick_workload(base: Experiment, name: str | None) -> WorkloadSpec:
    if name is not None:
        for workload in base.workloads:
            if workload.name == name:
                return workload
        raise ExperimentError(f"--workload: no workload named {name!r} in {base.source} "
                              f"(workloads: {', '.join(w.name for w in base.workloads)})")
    for workload in base.workloads:
        if workload.fields.get("dataset_name") == "prefix_repetition":
            return workload
    return base.workloads[0]


def plan_sweep(base: Experiment, knob: str, values: tuple[int, ...], off: str | None = None,
               on: str | None = None, workload: str | None = None) -> SweepPlan:
    """Derive the sweep's experiment; every problem is an ExperimentError naming the flag."""
    if knob not in KNOBS:
        raise ExperimentError(f"--knob: {knob!r} is not one of {', '.join(KNOBS)}")
    off_spec, on_spec = _pick_server(base, off, 0, "--off"), _pick_server(base, on, 1, "--on")
    if off_spec.name == on_spec.name:  # its records would share one name, its gains be noise
        raise ExperimentError(f"--off and --on both name {off_spec.name!r}: a sweep compares "
                              "two server configurations")
    chosen = _pick_workload(base, workload)
    seed = int(chosen.fields.get("seed", 0))
    name = f"{base.name}-sweep-{knob}"
    if knob in WORKLOAD_KNOBS:
        field = WORKLOAD_KNOBS[knob]
        workloads = tuple(WorkloadSpec(f"{knob}={v}", validate_bench_fields(
            {**chosen.fields, field: v, "seed": seed + i}, f"{knob}={v}"))
            for i, v in enumerate(values))
        pairs = tuple((off_spec.name, on_spec.name, w.name) for w in workloads)
        # A fresh server pair per value, off then on: adjacent in time, cold caches.
        experiment = replace(base, name=name, servers=(off_spec, on_spec), workloads=workloads,
                             restart_per_workload=True)
        return SweepPlan(knob, values, experiment, off_spec.name, on_spec.name, pairs)
    for spec in (off_spec, on_spec):
        if spec.kind != "kvtier":
            raise ExperimentError(f"--knob {knob}: server {spec.name!r} is not a kvtier "
                                  "configuration the lab starts")
    servers: list[ServerSpec] = []
    for value in values:
        servers += [_with_flag(s, SERVER_KNOBS[knob], value) for s in (off_spec, on_spec)]
    pairs = tuple((servers[2 * i].name, servers[2 * i + 1].name, chosen.name)
                  for i in range(len(values)))
    experiment = replace(base, name=name, servers=tuple(servers), workloads=(chosen,))
    return SweepPlan(knob, values, experiment, off_spec.name, on_spec.name, pairs)


def _with_flag(spec: ServerSpec, flag: str, value: int) -> ServerSpec:
    """`spec` with `--flag value` replacing any earlier value, renamed `name @ flag=value`."""
    engine: list[str] = []
    skip = False
    for item in spec.engine:
        if skip:
            skip = False
            continue
        if item == f"--{flag}":
            skip = True
            continue
        engine.append(item)
    return replace(spec, name=f"{spec.name} @ {flag}={value}",
                   engine=(*engine, f"--{flag}", str(value)))


def paired_records(plan: SweepPlan, records: list[RunRecord]
                   ) -> list[tuple[RunRecord | None, RunRecord | None]]:
    by_key = {(r.server, r.workload): r for r in records}
    return [(by_key.get((off, w)), by_key.get((on, w))) for off, on, w in plan.pairs]


def sweep_points(plan: SweepPlan, records: list[RunRecord]) -> list[RegimePoint]:
    """Regime-map points: tier-on vs tier-off at each value (where both succeeded)."""
    points = []
    for value, (off, on) in zip(plan.values, paired_records(plan, records), strict=True):
        if off is None or on is None or not (off.succeeded and on.succeeded):
            continue
        ttft_off, ttft_on = off.metric("mean_ttft_ms"), on.metric("mean_ttft_ms")
        pool = on.device_kv_tokens or off.device_kv_tokens
        working_set = on.prefix_working_set_tokens
        if ttft_off and ttft_on and pool and working_set:
            points.append(RegimePoint(plan.on, f"{plan.knob}={value}", working_set / pool,
                                      ttft_off / ttft_on))
    return points


def sweep_grid(plan: SweepPlan, records: list[RunRecord]) -> list[list[str]]:
    """One row per value: pressure, TTFT off/on, gain, req/s change, tier hit share."""
    grid = [[plan.knob, "working set / pool", f"mean TTFT {plan.off}", f"mean TTFT {plan.on}",
             "gain", f"p99 TTFT {plan.on} vs off", "req/s on vs off", "matched by tiers"]]
    for value, (off, on) in zip(plan.values, paired_records(plan, records), strict=True):
        def metric(r: RunRecord | None, key: str) -> float | None:
            return r.metric(key) if r is not None and r.succeeded else None

        ttft_off, ttft_on = metric(off, "mean_ttft_ms"), metric(on, "mean_ttft_ms")
        ref = on or off
        pool = ref.device_kv_tokens if ref else None
        ws = ref.prefix_working_set_tokens if ref else None
        ratio = f"{ws / pool:.2f}×" if ws and pool else "—"
        gain = f"{ttft_off / ttft_on:.2f}×" if ttft_off and ttft_on else "—"
        grid.append([str(value), ratio, format_value(ttft_off, "ms"), format_value(ttft_on, "ms"),
                     gain, percent_change(metric(on, "p99_ttft_ms"), metric(off, "p99_ttft_ms")),
                     percent_change(metric(on, "request_throughput"),
                                    metric(off, "request_throughput")),
                     _tier_share(on)])
    return grid


def _tier_tokens(record: RunRecord | None) -> int:
    """Prompt tokens that lower tiers (not the device cache) served in this run."""
    stats = (record.kvtier or {}) if record is not None else {}
    return sum(v for k, v in stats.get("tier_hit_tokens", {}).items() if k != "device")


def _tier_share(record: RunRecord | None) -> str:
    stats = (record.kvtier or {}) if record is not None else {}
    sent = stats.get("prompt_tokens") or 0
    return f"{_tier_tokens(record) / sent:.0%}" if sent else "—"


def where_it_pays(plan: SweepPlan, records: list[RunRecord]) -> str:
    """One sentence: the first value whose gain reaches PAYS_THRESHOLD, or that none did."""
    for value, (off, on) in zip(plan.values, paired_records(plan, records), strict=True):
        if off and on and off.succeeded and on.succeeded:
            ttft_off, ttft_on = off.metric("mean_ttft_ms"), on.metric("mean_ttft_ms")
            served = _tier_tokens(on) > 0  # without tier hits a "gain" is noise
            if served and ttft_off and ttft_on and ttft_off / ttft_on >= PAYS_THRESHOLD:
                return (f"the tier starts to pay at {plan.knob}={value}: mean TTFT "
                        f"{ttft_off / ttft_on:.2f}× lower than without it")
    return (f"the tier never cut mean TTFT by {PAYS_THRESHOLD - 1:.0%} or more over "
            f"{plan.knob} in {', '.join(map(str, plan.values))}")


def write_sweep_outputs(plan: SweepPlan, records: list[RunRecord], out_dir: Path) -> str:
    """sweep.md, plots/sweep_<knob>.png and the sweep's regime map; returns the text table."""
    pairs = paired_records(plan, records)
    plot_sweep(plan.knob, plan.values, [p[0] for p in pairs], [p[1] for p in pairs],
               (plan.off, plan.on), out_dir / "plots" / f"sweep_{plan.knob}.png")
    plot_regime_map(sweep_points(plan, records), out_dir / "plots" / "regime_map.png",
                    title=f"Regime map: {plan.on} vs {plan.off}, sweeping {plan.knob}")
    text = render_text(sweep_grid(plan, records)) + "\n\n" + where_it_pays(plan, records)
    (out_dir / "sweep.md").write_text(
        f"# Sweep of {plan.knob}\n\n```\n{text}\n```\n\n"
        f"![sweep](plots/sweep_{plan.knob}.png)\n![regime map](plots/regime_map.png)\n",
        encoding="utf-8")
    return text
