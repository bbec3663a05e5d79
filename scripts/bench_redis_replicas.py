"""Two engine replicas on one Redis: what one computed, the other loads instead of recomputing.

Replica A serves one request per document with a redis tier (write-through: its chunks are
published as they are computed). Replica B, a second engine started afterwards (as a new
replica, or A restarted, would be), then asks about each document again with a new question.
Its TTFT is compared with that of an engine without the tier (the same fresh device cache, so
it recomputes every document), and its greedy tokens must equal that engine's. Also printed:
the redis tier's start-up probe (latency, rate) and the tokens B loaded from Redis. Whether a
load pays is the engine's own cost model's call, as in serving. Each engine runs in a process
of its own, as replicas do (and on CUDA a second engine in one process would find the first's
memory taken). With `--tier-kind disk` the two share a disk tier's directory instead: B is
then an engine restarted over what A left on disk. Writes a JSON results file.

    .venv/bin/python scripts/bench_redis_replicas.py --out results/redis_replicas.json
    (--model random:qwen2.5-1.5b --dtype bfloat16 on a GPU; --redis-url for a running server)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def documents(count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(200, 40_000) for _ in range(length)] for _ in range(count)]


def serve_one_by_one(llm, prompts: list[list[int]], max_tokens: int) -> list[dict]:  # noqa: ANN001
    from kvtier import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for prompt in prompts:
        output = llm.generate([prompt], params)[0]
        metrics = output.metrics
        rows.append({"ttft_s": metrics.time_to_first_token,
                     "tier_hit_tokens": dict(metrics.num_tier_hit_tokens),
                     "cached_tokens": metrics.num_cached_tokens,
                     "token_ids": list(output.outputs[0].token_ids)})
    return rows


def summary(rows: list[dict], kind: str) -> dict:
    ttfts = [row["ttft_s"] for row in rows]
    return {"mean_ttft_ms": 1e3 * statistics.fmean(ttfts),
            "median_ttft_ms": 1e3 * statistics.median(ttfts),
            f"{kind}_hit_tokens": sum(row["tier_hit_tokens"].get(kind, 0) for row in rows),
            "ttft_ms": [round(1e3 * t, 2) for t in ttfts],
            f"{kind}_hit_tokens_each": [row["tier_hit_tokens"].get(kind, 0) for row in rows]}


def run_replica(role: str, url: str, prompts_file: Path, rows_file: Path,
                args: argparse.Namespace) -> None:
    """One engine's part, in this process: `a` computes and publishes, `b` loads what it can
    from Redis, `off` has no tier; writes its rows (and b's probe) to rows_file."""
    from kvtier import LLM
    from kvtier.utils.host_counters import HostCounters
    engine_args = {"dtype": args.dtype, **({"model": args.model} if args.model else {})}
    tier = (f"{args.tier_kind}:{url}:{args.redis_size}",)
    if role == "a":
        llm = LLM(kv_tiers=tier, kv_store_policy="write-through", **engine_args)
    elif role == "b":
        llm = LLM(kv_tiers=tier, **engine_args)
    else:
        llm = LLM(**engine_args)
    result: dict = {}
    if role == "b":
        rate = llm.engine.tiers.cost.tier_rates[args.tier_kind]
        result["probe"] = {"latency_ms": 1e3 * rate.latency_s, "gb_per_s": rate.bytes_per_s / 1e9}
        result["prefill_tokens_per_s"] = llm.engine.tiers.cost.prefill_tokens_per_s
    before = HostCounters.snapshot()
    result["rows"] = serve_one_by_one(llm, json.loads(prompts_file.read_text()), args.max_tokens)
    # Engine processes have run up to 2x apart on the card's host for the same work: say
    # whether the machine (steal, first-touch faults) was the cause.
    result["host"] = HostCounters.snapshot().since(before).summary()
    if role == "a":
        llm.engine.tiers.wait_idle(timeout=120.0)
        result["stored_bytes"] = llm.engine.tiers.stores[0].stats.num_stored_bytes
    llm.engine.shutdown()
    rows_file.write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--document-tokens", type=int, default=1024)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--redis-url", default=None,
                        help="a running server (default: start a redis-server of our own)")
    parser.add_argument("--redis-size", default="4GiB", help="the shared tier's size")
    parser.add_argument("--tier-kind", choices=("redis", "disk"), default="redis",
                        help="disk: the replicas share a directory instead (B is then an "
                             "engine restarted over A's disk tier)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trace-dir", type=Path, default=None,
                        help="write each engine's KVTIER_STEP_TRACE here (trace-<role>.jsonl)")
    parser.add_argument("--role", choices=("a", "b", "off"), default=None,
                        help=argparse.SUPPRESS)  # one replica's part, run by main
    parser.add_argument("--prompts-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role is not None:
        run_replica(args.role, args.redis_url, args.prompts_file, args.rows_file, args)
        return

    from kvtier.utils.redis_server import RedisServer

    work = Path(tempfile.mkdtemp(prefix="kvtier-replicas-"))
    server = None
    url = args.redis_url
    if args.tier_kind == "disk":
        url = str(work / "disk-tier")
    elif url is None:
        server = RedisServer.start(work)
        url = server.url
    docs = documents(args.documents, args.document_tokens, seed=0)
    rng = random.Random(1)
    for name in ("a", "b"):
        questions = [[rng.randrange(200, 40_000) for _ in range(args.question_tokens)]
                     for _ in docs]
        (work / f"prompts-{name}.json").write_text(
            json.dumps([d + q for d, q in zip(docs, questions, strict=True)]))
    parts = {}
    try:
        for role, prompts in (("a", "a"), ("b", "b"), ("off", "b")):
            command = [sys.executable, __file__, "--role", role, "--redis-url", url,
                       "--prompts-file", str(work / f"prompts-{prompts}.json"),
                       "--rows-file", str(work / f"rows-{role}.json"),
                       "--dtype", args.dtype, "--max-tokens", str(args.max_tokens),
                       "--redis-size", args.redis_size, "--tier-kind", args.tier_kind,
                       *(("--model", args.model) if args.model else ())]
            env = dict(os.environ)
            if args.trace_dir is not None:
                args.trace_dir.mkdir(parents=True, exist_ok=True)
                env["KVTIER_STEP_TRACE"] = str(args.trace_dir / f"trace-{role}.jsonl")
            subprocess.run(command, check=True, env=env)
            parts[role] = json.loads((work / f"rows-{role}.json").read_text())
    finally:
        if server is not None:
            server.stop()
    kind = args.tier_kind
    rows_b, rows_off = parts["b"]["rows"], parts["off"]["rows"]
    probe, prefill_rate = parts["b"]["probe"], parts["b"]["prefill_tokens_per_s"]
    stored = parts["a"]["stored_bytes"]
    identical = [a["token_ids"] == b["token_ids"] for a, b in zip(rows_b, rows_off, strict=True)]
    results = {
        "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True, check=False).stdout.strip(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "tier_kind": args.tier_kind,
        f"{args.tier_kind}_probe": probe, "prefill_tokens_per_s_at_start": prefill_rate,
        "stored_bytes_by_a": stored,
        "replica_a_cold": summary(parts["a"]["rows"], kind),
        f"replica_b_{kind}": summary(rows_b, kind),
        "no_tier_recompute": summary(rows_off, kind),
        "tokens_identical": all(identical),
        "host_while_serving": {role: parts[role]["host"] for role in ("a", "b", "off")},
    }
    b, off = results[f"replica_b_{kind}"], results["no_tier_recompute"]
    print(f"device {results['device']}, {args.documents} documents of {args.document_tokens} "
          f"tokens, {stored / 1e6:.0f} MB stored by replica A")
    print(f"{kind} probe: latency {probe['latency_ms']:.3f} ms, {probe['gb_per_s']:.2f} GB/s; "
          f"prefill {prefill_rate:,.0f} tokens/s at start")
    print(f"{'':28}{'mean TTFT':>12}{'median':>10}{'from ' + kind:>12}")
    for name, key in (("replica A (cold)", "replica_a_cold"),
                      (f"replica B, {kind} tier", f"replica_b_{kind}"),
                      ("no tier (recompute)", "no_tier_recompute")):
        row = results[key]
        print(f"{name:28}{row['mean_ttft_ms']:10.1f}ms{row['median_ttft_ms']:8.1f}ms"
              f"{row[f'{kind}_hit_tokens']:12,}")
    for role, host in results["host_while_serving"].items():
        print(f"host while {role} served: {host}")
    print(f"replica B / recompute mean TTFT: {b['mean_ttft_ms'] / off['mean_ttft_ms']:.3f}x; "
          f"greedy tokens identical: {results['tokens_identical']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
