"""Where a workload-Q request's time to first token goes, step by step (issue 6).

Q's mean TTFT with the cpu tier sat at 0.66-0.70x of prefix caching alone, with a third of
it in the front end and the rest in the engine. This replays Q in-process (no HTTP, no
tokeniser: the engine-side share only) with the lab's engine settings, 4 requests in
flight, and records every step (when it started and ended, which requests it carried with
how many tokens) and every request (arrival, first step that computed it, first token). It
then splits each request's TTFT into

- wait: arrival to the start of the first step that computes it (steps of other requests
  it sat behind, by kind);
- first step(s): that step's start to the first token (its own extend or prefill, plus
  whatever else the step carried: a miss's prefill, another request's load).

and groups requests by what they hit (device prefix cache, cpu tier, nothing).

    PYTHONPATH=src python3 scripts/q_timeline.py --out $OUT/q_timeline.json [--variant ...]
    PYTHONPATH=src python3 scripts/q_timeline.py --smoke      # CPU check, embedded model
    PYTHONPATH=src python3 scripts/q_timeline.py --simulate --variant off \
        --variant off-short512 [--shape P]   # CPU: compare schedules on a timed fake device
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from profile_gpu_engine import PhaseTimer  # scripts/ is on sys.path when this runs as a script

from kvtier.utils.gil import shorten_switch_interval

MODEL = "random:qwen2.5-1.5b"


@dataclass
class StepRecord:
    start: float
    end: float = 0.0
    scheduled: float = 0.0
    """When `schedule()` returned (its host work: admission, tier lookups, loads enqueued)."""
    launched: float = 0.0
    """When the runner's launch returned (inputs prepared, kernels enqueued)."""
    requests: list[tuple[str, int]] = field(default_factory=list)
    """(request id, tokens computed this step)."""

    @property
    def prefill_tokens(self) -> int:
        return sum(n for _, n in self.requests if n > 1)

    @property
    def kind(self) -> str:
        if not self.requests:
            return "idle"
        return "prefill" if self.prefill_tokens else "decode"


def wrap_host_phases(engine: Any, timer: PhaseTimer) -> None:
    """The scheduler's and the tier's host work, down to the transfer calls."""
    scheduler, tiers = engine.scheduler, engine.tiers
    for attr in ("_admit_waiting", "_try_tier_load", "_finish_loads", "store_ahead",
                 "_blocks_being_computed", "_admission_order"):
        timer.wrap(scheduler, attr, f"scheduler.{attr}")
    timer.wrap(scheduler.kv, "allocate_slots", "kv.allocate_slots")
    timer.wrap(scheduler.kv, "get_computed_blocks", "kv.get_computed_blocks")
    timer.wrap(scheduler.kv, "cache_computed_blocks", "kv.cache_computed_blocks")
    runner = engine.runner
    for attr in ("_prepare_inputs", "_sample"):
        timer.wrap(runner, attr, f"runner.{attr}")
    if runner.piecewise is not None:  # its run less attention's forwards: the graph replays
        timer.wrap(runner.piecewise, "run", "runner.piecewise.run")
    timer.wrap(runner.backend, "forward", "attention.forward")
    timer.wrap(runner.model, "compute_logits", "model.compute_logits")
    if tiers is None:
        return
    for attr in ("lookup", "start_load", "note_request", "store_lookahead", "poll",
                 "_store_chunks", "_start_event_load", "on_evict", "on_request_freed"):
        timer.wrap(tiers, attr, f"tiers.{attr}")
    for attr in ("copy_in_parts", "load_index", "load_event", "gather", "copy_out_async",
                 "order_compute_after"):
        timer.wrap(tiers.transfer, attr, f"transfer.{attr}")
    for attr in ("read", "pin", "locate", "prepare_store", "complete_store"):
        timer.wrap(tiers.stores[0], attr, f"cpu_store.{attr}")


@dataclass(frozen=True)
class Variant:
    name: str
    tiers: tuple[str, ...] = ()
    engine: tuple[tuple[str, Any], ...] = ()


VARIANTS = {
    "off": Variant("off"),
    "off-short512": Variant("off-short512", (), (("short_prefill_first_tokens", 512),)),
    "cpu": Variant("cpu", ("cpu:16GiB",)),
    "cpu-short512": Variant("cpu-short512", ("cpu:16GiB",),
                            (("short_prefill_first_tokens", 512),)),
    "cpu-t1024": Variant("cpu-t1024", ("cpu:16GiB",), (("long_prefill_token_threshold", 1024),)),
    "cpu-t2048": Variant("cpu-t2048", ("cpu:16GiB",), (("long_prefill_token_threshold", 2048),)),
}


LONG_PREFILL_TOKENS = 1024
"""A step with this many prompt tokens of one request carries a miss's prefill (Q's suffixes
are 256 tokens); the GPU engine runs such steps eagerly (above its piecewise graphs' sizes)."""

SIMULATED_DECODE_S, SIMULATED_PREFILL_S, SIMULATED_TOKEN_S = 0.0024, 0.004, 5.5e-6
"""The simulated device (`--simulate`): a decode-only step takes 2.4 ms, a step with prompt
tokens 4 ms + 5.5 us per token, about what the H200 took for Qwen2.5-1.5B here (decode steps
2.4-2.5 ms, a 4,352-token prefill ~32 ms, an extend step alone ~7-9 ms with its host work)."""


def simulated_launch(step: Any) -> Any:
    """The runner's launch on a device that only takes time: sleep, then a fixed token each."""
    import torch

    from kvtier.runner.model_runner import PendingOutput
    if step.requests:
        tokens = sum(len(s.token_ids) for s in step.requests)
        time.sleep(SIMULATED_PREFILL_S + SIMULATED_TOKEN_S * tokens
                   if tokens > len(step.requests) else SIMULATED_DECODE_S)
    sampled = [s for s in step.requests if s.sample]
    return PendingOutput([s.request_id for s in sampled],
                         torch.tensor([1000 + len(s.token_ids) % 7 for s in sampled]))


def replay(variant: Variant, num_prompts: int, model: str | None, prefix_len: int,
           suffix_len: int, output_len: int, concurrency: int, warmup: int,
           front_end_s: float, num_gpu_blocks: int = 4096, num_prefixes: int = 64,
           phases: bool = False, simulate: bool = False, profile: bool = False) -> dict:
    from kvtier import LLM, SamplingParams
    extra: dict[str, Any] = dict(variant.engine)
    if variant.tiers:
        extra["kv_tiers"] = variant.tiers
    llm = LLM(model, num_gpu_blocks_override=num_gpu_blocks, max_num_batched_tokens=8192,
              max_num_seqs=256, scheduling_policy="lpm", **extra)
    engine = llm.engine
    if simulate:  # scheduling only: steps as the GPU engine takes them, timed by a model
        engine.runner.launch = simulated_launch  # type: ignore[method-assign]
        engine.scheduler.separate_prefill_steps = True
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)

    # Warm-up on other prefixes, so kernel compiles for these shapes happen before timing.
    rng = random.Random(1)
    llm.generate([[rng.randrange(30_000, 45_000) for _ in range(prefix_len + suffix_len)]
                  for _ in range(warmup)], params)

    timer = PhaseTimer()
    if phases:
        wrap_host_phases(engine, timer)
    profilers = ({"schedule": cProfile.Profile(), "launch": cProfile.Profile()}
                 if profile else None)
    rng = random.Random(0)
    prefixes = [[rng.randrange(1000, 30_000) for _ in range(prefix_len)]
                for _ in range(num_prefixes)]
    drawn = [rng.randrange(num_prefixes) for _ in range(num_prompts)]
    queued = [prefixes[i] + [rng.randrange(1000, 30_000) for _ in range(suffix_len)]
              for i in drawn]
    queued.reverse()
    # Whether each request's prefix was drawn before (a miss then means it was lost).
    reused = [i in drawn[:n] for n, i in enumerate(drawn)]
    reused.reverse()
    steps: list[StepRecord] = []
    schedule = engine.scheduler.schedule

    def recorded_schedule() -> Any:
        if profilers is not None:
            profilers["schedule"].enable()
        output = schedule()
        if profilers is not None:
            profilers["schedule"].disable()
        steps[-1].scheduled = time.monotonic()
        steps[-1].requests = [(s.request_id, len(s.token_ids)) for s in output.requests]
        return output
    engine.scheduler.schedule = recorded_schedule  # type: ignore[method-assign]
    launch = engine.runner.launch

    def recorded_launch(output: Any) -> Any:
        # Only steps with prompt tokens short of a long prefill: decode steps replay one CUDA
        # graph, and a long prefill's eager launch hides behind its own device time.
        tokens = [len(s.token_ids) for s in output.requests]
        profiled = (profilers is not None and max(tokens, default=0) > 1
                    and sum(tokens) < LONG_PREFILL_TOKENS)
        if profiled:
            profilers["launch"].enable()
        pending = launch(output)
        if profiled:
            profilers["launch"].disable()
        steps[-1].launched = time.monotonic()
        return pending
    engine.runner.launch = recorded_launch  # type: ignore[method-assign]
    live: dict[str, Any] = {}
    finished: list[Any] = []
    started = time.monotonic()
    # A client sends its next request when one finishes; it reaches the engine front_end_s
    # later (the server's parsing, tokenising and hop to the core), in the middle of a step.
    due = [started] * concurrency
    while queued or live:
        now = time.monotonic()
        if not live and due and due[0] > now:
            time.sleep(due[0] - now)
            now = time.monotonic()
        while due and due[0] <= now and queued:
            request_id = engine.add_request(queued.pop(), params)
            request = engine.scheduler.requests[request_id]
            request.prefix_drawn_before = reused.pop()
            request.metrics.arrival_time = request.arrival_time = due.pop(0)
            live[request_id] = request
        steps.append(StepRecord(time.monotonic()))
        outputs = engine.step()
        steps[-1].end = time.monotonic()
        for output in outputs:
            if output.finished:
                finished.append(live.pop(output.request_id))
                due.append(steps[-1].end + front_end_s)
    wall = time.monotonic() - started
    tier_stats = None
    if engine.tiers is not None:
        stats = engine.tiers.stats
        tier_stats = {"loads": stats.num_loads, "load_copy_ms_mean": round(
            1e3 * stats.load_copy_seconds / max(stats.num_loads, 1), 3),
            "load_wall_ms_mean": round(1e3 * stats.load_seconds / max(stats.num_loads, 1), 3)}
        engine.shutdown()
    result = summarize(variant, steps, finished, wall, prefix_len)
    for name, profiler in (profilers or {}).items():
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("cumulative").print_stats(60)
        stats.sort_stats("tottime").print_stats(25)
        result[f"profile_{name}"] = text.getvalue()
        print(variant.name, f"cProfile of {name} (launch: steps with < {LONG_PREFILL_TOKENS} "
              "tokens, some of them prompt tokens)",
              text.getvalue(), flush=True)
    result["tier"] = tier_stats
    if phases:
        result["host_phases"] = timer.per_call()
        print(variant.name, "host phases", json.dumps(result["host_phases"]), flush=True)
    print(variant.name, "tier", json.dumps(tier_stats), flush=True)
    return result


def request_class(request: Any, prefix_len: int) -> str:
    """What served most of its shared prefix: the cpu tier, the device cache, or nothing."""
    hits = request.metrics.num_tier_hit_tokens
    if sum(n for name, n in hits.items() if name != "device") >= prefix_len // 2:
        return "tier hit"
    return "device hit" if hits.get("device", 0) >= prefix_len // 2 else "miss"


def summarize(variant: Variant, steps: list[StepRecord], finished: list[Any],
              wall: float, prefix_len: int) -> dict:
    first_step: dict[str, int] = {}
    for index, step in enumerate(steps):
        for request_id, _ in step.requests:
            first_step.setdefault(request_id, index)
    rows = []
    for request in finished:
        m = request.metrics
        index = first_step[request.request_id]
        step = steps[index]
        waited = [s for s in steps[:index] if s.end > m.arrival_time]
        rows.append({
            "id": request.request_id,
            "class": request_class(request, prefix_len),
            "prefix_drawn_before": request.prefix_drawn_before,
            "ttft_ms": 1e3 * (m.first_token_time - m.arrival_time),
            "wait_ms": 1e3 * (step.start - m.arrival_time),
            "first_step_ms": 1e3 * (m.first_token_time - step.start),
            "waited_prefill_steps": sum(s.kind == "prefill" for s in waited),
            "waited_decode_steps": sum(s.kind == "decode" for s in waited),
            "first_step_other_prefill_tokens": sum(
                n for rid, n in step.requests if rid != request.request_id and n > 1),
        })
    by_class: dict[str, Any] = {}
    for name in ("miss", "device hit", "tier hit", "all"):
        group = [r for r in rows if name in ("all", r["class"])]
        if not group:
            continue
        by_class[name] = {"n": len(group)} | {
            key: round(statistics.mean(r[key] for r in group), 2)
            for key in ("ttft_ms", "wait_ms", "first_step_ms", "waited_prefill_steps",
                        "waited_decode_steps", "first_step_other_prefill_tokens")}
        by_class[name]["prefix_drawn_before"] = sum(r["prefix_drawn_before"] for r in group)
        by_class[name]["ttft_median_ms"] = round(statistics.median(r["ttft_ms"] for r in group), 2)
    kinds: dict[str, list[float]] = {}
    for step in steps:
        kinds.setdefault(step.kind, []).append(1e3 * (step.end - step.start))
    step_summary = {k: {"n": len(v), "mean_ms": round(statistics.mean(v), 3),
                        "total_s": round(sum(v) / 1e3, 3)} for k, v in kinds.items()}
    # Prefill steps by size class: extend-only (< 1,024 prompt tokens) or with a long prefill.
    sizes: dict[str, list[float]] = {}
    for step in steps:
        if step.kind == "prefill":
            key = ("prefill<1024" if step.prefill_tokens < LONG_PREFILL_TOKENS
                   else "prefill>=1024")
            sizes.setdefault(key, []).append(1e3 * (step.end - step.start))
    for key, values in sizes.items():
        step_summary[key] = {"n": len(values), "mean_ms": round(statistics.mean(values), 3)}
    # Prefill steps by what they carried: first steps of tier hits (their loads), of device
    # hits, and whether a long prefill (a miss) shared the step; host time to schedule it.
    cls = {r["id"]: r["class"] for r in rows}
    groups: dict[str, list[tuple[float, float]]] = {}
    for index, step in enumerate(steps):
        if step.kind != "prefill":
            continue
        firsts = [cls.get(rid) for rid, _ in step.requests if first_step.get(rid) == index]
        key = (f"tier_hits={firsts.count('tier hit')} device_hits={firsts.count('device hit')}"
               f" long={int(any(n >= LONG_PREFILL_TOKENS for _, n in step.requests))}")
        groups.setdefault(key, []).append((1e3 * (step.end - step.start),
                                           1e3 * (step.scheduled - step.start),
                                           1e3 * (step.launched - step.scheduled)))
    step_summary["prefill_by_content"] = {
        key: {"n": len(v), "mean_ms": round(statistics.mean(d for d, _, _ in v), 3),
              "schedule_ms": round(statistics.mean(h for _, h, _ in v), 3),
              "launch_ms": round(statistics.mean(h for _, _, h in v), 3)}
        for key, v in sorted(groups.items())}
    result = {"variant": asdict(variant), "wall_s": round(wall, 3),
              "req_s": round(len(finished) / wall, 2), "by_class": by_class,
              "steps": step_summary, "requests": rows}
    print(variant.name, json.dumps({k: v for k, v in result.items() if k != "requests"}),
          flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="q_timeline.json")
    parser.add_argument("--variant", action="append", choices=sorted(VARIANTS),
                        help="repeatable; default: off and cpu")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help="default: 256 (Q), 640 (P)")
    parser.add_argument("--front-end-ms", type=float, default=13.0,
                        help="a finished request's successor reaches the engine this much later "
                             "(Q's front end + HTTP on the H200: ~9 + ~4 ms)")
    parser.add_argument("--phases", action="store_true",
                        help="also time the scheduler's and the tier's host calls")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the scheduler's calls and the launches of steps with "
                             "prompt tokens")
    parser.add_argument("--simulate", action="store_true",
                        help="on the CPU, tiers off only: the embedded model's engine with a "
                             "device that only takes time (SIMULATED_*), to compare schedules")
    parser.add_argument("--shape", choices=("Q", "P"), default="Q",
                        help="Q (4 in flight, output 32) or P (64 in flight, output 128, 640 "
                             "requests)")
    parser.add_argument("--smoke", action="store_true",
                        help="CPU check: embedded model, short prompts, few requests")
    args = parser.parse_args()
    shorten_switch_interval()  # as in the engine process: the tier's threads take the GIL
    names = args.variant or ["off", "cpu"]
    if args.smoke:
        shape = {"model": None, "prefix_len": 64, "suffix_len": 16, "output_len": 4,
                 "concurrency": 4, "warmup": 2, "front_end_s": args.front_end_ms / 1e3,
                 "num_gpu_blocks": 32, "num_prefixes": 8}
        num_prompts = min(args.num_prompts or 24, 24)
        variants = [Variant(VARIANTS[n].name, tuple("cpu:1GiB" for _ in VARIANTS[n].tiers),
                            VARIANTS[n].engine) for n in names]
    else:
        shape = {"model": None if args.simulate else MODEL, "prefix_len": 4096,
                 "suffix_len": 256, "output_len": 32, "concurrency": 4,
                 "warmup": 0 if args.simulate else 8, "front_end_s": args.front_end_ms / 1e3}
        if args.shape == "P":
            shape.update(output_len=128, concurrency=64)
        num_prompts = args.num_prompts or (640 if args.shape == "P" else 256)
        variants = [VARIANTS[n] for n in names]
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "commit": subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    try:
        import torch
        report["card"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except ImportError:
        report["card"] = "cpu"
    print("card:", report["card"], flush=True)
    for variant in variants:
        report[variant.name] = replay(variant, num_prompts, **shape, phases=args.phases,
                                      simulate=args.simulate, profile=args.profile)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
