"""How fast the tiers below host memory take part in a load and in the shutdown's write-down,
by how many entries are moved at once (`kvtier.tiers.manager.READ_AHEAD`).

Loads: one plan of `--entries` chunks (Qwen2.5-1.5B's KV layout by default: 256-token chunks
of 7.3 MB in bfloat16) is stored in a disk tier and in a redis tier (a redis-server of the
script's own on a unix socket, or `--redis-url`), then loaded through the tier manager into a
device KV pool (CUDA where there is one), with each read-ahead in turn, interleaved over
`--rounds`. The figure is the load's wall time, from `start_load` to the result in `poll`: the
reads, the checks and the copy into the pool. The disk tier's files are in the page cache
(written just before), as a hot disk tier's are.

Write-down: a cpu tier holding the same entries is written down into an empty disk (or redis)
tier, as a graceful shutdown does (`TierManager.write_down`), timed whole. Writes a JSON
results file.

    .venv/bin/python scripts/bench_tier_io.py --out results/tier_io.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import redis
import torch

from kvtier.config import TierConfig
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.hashing import hash_block_tokens, root_block_hash
from kvtier.tiers import manager as manager_module
from kvtier.tiers.base import EntryMeta, KVLayout, TierStore
from kvtier.tiers.cost import CostModel, TierRate
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.policy import create_policy
from kvtier.tiers.redis_store import RedisStore
from kvtier.tiers.transfer import KVTransfer
from kvtier.utils.redis_server import RedisServer, redis_server_available

# Qwen2.5-1.5B: 28 layers, 2 KV heads of 128, bfloat16, 16-token blocks.
LAYOUT = KVLayout("bench-tier-io", "bfloat16", num_layers=28, num_kv_heads=2, head_dim=128,
                  block_size=16, dtype_bytes=2)


def store_prefix(store: TierStore, num_entries: int, chunk_blocks: int) -> list[bytes]:
    """`num_entries` consecutive chunks of one prefix, random bytes, stored in `store`."""
    hashes, parent = [], root_block_hash(LAYOUT.namespace)
    for i in range(num_entries * chunk_blocks):
        parent = hash_block_tokens(parent, [3, i])
        hashes.append(parent)
    generator = torch.Generator().manual_seed(0)
    for i in range(num_entries):
        chunk = tuple(hashes[i * chunk_blocks:(i + 1) * chunk_blocks])
        meta = EntryMeta(chunk[-1], chunk, chunk_blocks * LAYOUT.block_bytes)
        handle = store.prepare_store(meta)
        if handle is None:
            raise SystemExit(f"{store.name} tier refused entry {i}: too small?")
        handle.buffer.copy_(torch.randint(0, 256, (meta.num_bytes,), dtype=torch.uint8,
                                          generator=generator))
        store.complete_store(handle, True)
    return hashes


def tier_manager(stores: list[TierStore], kv_cache: torch.Tensor, chunk_blocks: int,
                 read_ahead: int) -> manager_module.TierManager:
    """A tier manager over `stores` that moves `read_ahead` entries at once; loading from
    them always pays."""
    manager_module.READ_AHEAD = read_ahead  # what a manager takes when it is built
    return manager_module.TierManager(
        TierConfig(kv_tier_chunk_tokens=chunk_blocks * LAYOUT.block_size), stores,
        KVTransfer(kv_cache), BlockPool(kv_cache.shape[2]), LAYOUT.block_size,
        CostModel(1.0, {store.name: TierRate(1e12, latency_s=0.0) for store in stores}))


def timed_write_down(name: str, make_lower, cpu: CPUStore, kv_cache: torch.Tensor,  # noqa: ANN001
                     chunk_blocks: int, read_ahead: int) -> float:
    """Seconds for a write-down of every cpu entry into a fresh, empty lower tier."""
    lower = make_lower()
    manager = tier_manager([cpu, lower], kv_cache, chunk_blocks, read_ahead)
    started = time.perf_counter()
    copied = manager.write_down()
    elapsed = time.perf_counter() - started
    if copied != cpu.num_entries:
        raise SystemExit(f"{name} write-down copied {copied} of {cpu.num_entries} entries")
    lower.close()
    return elapsed


def timed_load(manager: manager_module.TierManager, hashes: list[bytes]) -> float:
    """Seconds from start_load to the load's result (blocks allocated, then freed)."""
    plan = manager.lookup(hashes, 0, len(hashes))
    assert plan is not None and plan.num_blocks == len(hashes)
    blocks = manager.pool.allocate(len(hashes))
    started = time.perf_counter()
    manager.start_load("bench", plan, blocks, hashes)
    results = []
    while not results:
        manager.wait_for_transfer(1.0)
        results = manager.poll()
    elapsed = time.perf_counter() - started
    manager.pool.free(blocks)
    if results[0].num_loaded_blocks != len(hashes):
        raise SystemExit(f"loaded {results[0].num_loaded_blocks} of {len(hashes)} blocks")
    return elapsed


def summarised(seconds: dict[int, list[float]], total_bytes: int, label: str) -> dict:
    """Median time and rate per read-ahead, printed one line each."""
    rows = {}
    for read_ahead, times in seconds.items():
        best = statistics.median(times)
        rows[read_ahead] = {"median_s": best, "gb_s": total_bytes / best / 1e9,
                            "seconds": times}
        print(f"  {label} {read_ahead}: {1e3 * best:8.1f} ms  "
              f"{total_bytes / best / 1e9:5.2f} GB/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/tier_reads.json")
    parser.add_argument("--entries", type=int, default=64)
    parser.add_argument("--chunk-tokens", type=int, default=256)
    parser.add_argument("--read-ahead", default="1,2,4,8",
                        help="comma-separated read-aheads to compare")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tiers", default="disk,redis")
    parser.add_argument("--redis-url", default=None,
                        help="a running server (else the script starts one)")
    args = parser.parse_args()
    try:
        read_aheads = [int(v) for v in args.read_ahead.split(",")]
    except ValueError:
        raise SystemExit(f"--read-ahead: not a list of integers: {args.read_ahead!r}") from None
    if not read_aheads or min(read_aheads) < 1:
        raise SystemExit(f"--read-ahead: each value must be >= 1, got {args.read_ahead!r}")
    tiers = args.tiers.split(",")
    if unknown := set(tiers) - {"disk", "redis"}:
        raise SystemExit(f"--tiers: unknown {sorted(unknown)}; choose from disk, redis")
    if args.entries < 1 or args.chunk_tokens % LAYOUT.block_size:
        raise SystemExit("--entries must be >= 1 and --chunk-tokens a multiple of 16")

    chunk_blocks = args.chunk_tokens // LAYOUT.block_size
    num_blocks = args.entries * chunk_blocks
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kv_cache = torch.zeros(LAYOUT.num_layers, 2, num_blocks, LAYOUT.block_size,
                           LAYOUT.num_kv_heads, LAYOUT.head_dim, dtype=torch.bfloat16,
                           device=device)
    total_bytes = num_blocks * LAYOUT.block_bytes
    scratch = Path(tempfile.mkdtemp(prefix="kvtier-tier-reads-"))
    server = None
    stores: dict[str, TierStore] = {}
    capacity = 2 * total_bytes + (64 << 20)
    lowers = {}  # a fresh, empty lower tier for each write-down
    if "disk" in tiers:
        stores["disk"] = DiskStore(LAYOUT, capacity, create_policy("lru"), str(scratch / "disk"))
        fresh_dirs = itertools.count()
        lowers["disk"] = lambda: DiskStore(LAYOUT, capacity, create_policy("lru"),
                                           str(scratch / f"write-down-{next(fresh_dirs)}"))
    if "redis" in tiers:
        url = args.redis_url
        if url is None:
            if not redis_server_available():
                raise SystemExit("no redis-server on the PATH (or pass --redis-url)")
            server = RedisServer.start(scratch)
            url = server.url
        stores["redis"] = RedisStore(LAYOUT, capacity, create_policy("lru"), url)
        if stores["redis"].broken:
            raise SystemExit(f"redis tier unusable: {stores['redis'].broken}")

        def fresh_redis(url: str = url) -> RedisStore:
            redis.Redis.from_url(url).flushdb()
            return RedisStore(LAYOUT, capacity, create_policy("lru"), url)
        lowers["redis"] = fresh_redis

    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    results: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {device_name}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"), "entries": args.entries,
        "entry_mb": chunk_blocks * LAYOUT.block_bytes / 1e6, "total_mb": total_bytes / 1e6,
        "tiers": {}}
    print(f"{results['machine']}: {args.entries} entries of "
          f"{results['entry_mb']:.1f} MB ({total_bytes / 1e6:.0f} MB) per load")
    try:
        for name, store in stores.items():
            hashes = store_prefix(store, args.entries, chunk_blocks)
            managers = {n: tier_manager([store], kv_cache, chunk_blocks, n) for n in read_aheads}
            seconds: dict[int, list[float]] = {n: [] for n in read_aheads}
            timed_load(managers[read_aheads[0]], hashes)  # warm-up
            for _ in range(args.rounds):
                for read_ahead in read_aheads:
                    seconds[read_ahead].append(timed_load(managers[read_ahead], hashes))
            for manager in managers.values():
                manager.close()  # closes the store too (more than once: that is harmless)
            results["tiers"][name] = summarised(seconds, total_bytes,
                                                f"{name:5s} read-ahead")
        cpu = CPUStore(LAYOUT, total_bytes + (64 << 20), create_policy("lru"), chunk_blocks,
                       pin_memory=False)
        store_prefix(cpu, args.entries, chunk_blocks)
        results["write_down"] = {}
        for name, make_lower in lowers.items():
            seconds = {n: [] for n in read_aheads}
            for _ in range(args.rounds):
                for read_ahead in read_aheads:
                    seconds[read_ahead].append(timed_write_down(
                        name, make_lower, cpu, kv_cache, chunk_blocks, read_ahead))
            results["write_down"][name] = summarised(seconds, total_bytes,
                                                     f"write-down cpu -> {name:5s} at")
    finally:
        for store in stores.values():
            store.close()  # a store whose managers were closed is closed already
        if server is not None:
            server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
