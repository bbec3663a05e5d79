"""Builds the configured tier stack and measures its starting rates (a short probe)."""

from __future__ import annotations

import logging
import tempfile
import time
import zlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvtier.config import ConfigError, TierConfig, TierSpec
from kvtier.kv.block_pool import BlockPool
from kvtier.kv.hashing import root_block_hash
from kvtier.tiers import entry_codec
from kvtier.tiers import manager as manager_module
from kvtier.tiers.base import EntryMeta, KVLayout, TierStore
from kvtier.tiers.cost import CostModel, PrefillRate, TierRate
from kvtier.tiers.cpu import CPUStore
from kvtier.tiers.disk import DiskStore
from kvtier.tiers.manager import TierManager
from kvtier.tiers.policy import create_policy
from kvtier.tiers.redis_store import RedisStore
from kvtier.tiers.transfer import KVTransfer

logger = logging.getLogger(__name__)


def check_capacity(spec: TierSpec, layout: KVLayout, chunk_blocks: int) -> None:
    """Refuse a tier too small for one chunk (before any tier creates anything)."""
    if spec.kind in ("disk", "redis"):
        chunk_bytes = _encoded_chunk_bytes(layout, chunk_blocks)
    else:  # a cpu tier's slot
        chunk_bytes = chunk_blocks * layout.block_bytes
    if spec.capacity_bytes < chunk_bytes:
        raise ConfigError(f"{spec.kind} tier of {spec.capacity_bytes} bytes cannot hold "
                          f"one chunk of {chunk_bytes} bytes (kv_tier_chunk_tokens "
                          f"{chunk_blocks * layout.block_size})")


def build_store(spec: TierSpec, layout: KVLayout, chunk_blocks: int,
                pin_memory: bool) -> TierStore:
    check_capacity(spec, layout, chunk_blocks)
    policy = create_policy(spec.eviction)
    if spec.kind == "cpu":
        return CPUStore(layout, spec.capacity_bytes, policy, chunk_blocks, pin_memory)
    if spec.kind == "disk":
        assert spec.path is not None
        return DiskStore(layout, spec.capacity_bytes, policy, spec.path)
    if spec.kind == "redis":
        assert spec.url is not None
        return RedisStore(layout, spec.capacity_bytes, policy, spec.url)
    raise ConfigError(f"kv tier kind {spec.kind!r} is not available in this build")


def _encoded_chunk_bytes(layout: KVLayout, chunk_blocks: int) -> int:
    """What a disk or redis tier charges one full chunk (its payload and header)."""
    block_hash = root_block_hash("kv tier capacity check")
    meta = EntryMeta(block_hash, (block_hash,) * chunk_blocks, chunk_blocks * layout.block_bytes)
    return entry_codec.encoded_bytes(meta, layout.namespace)


def open_disk_tiers(config: TierConfig, layout: KVLayout) -> dict[int, TierStore]:
    """The disk tiers, opened before the engine loads its model, by their index in
    `config.kv_tiers`: a folder another process holds is refused in a moment, not after the
    weights and the KV pool are built (~17 s on a 2-core box). Every tier's size is checked
    first: a disk tier creates its directory, which a later tier's refusal would otherwise
    leave behind. The cpu tier waits for the KV pool: on the CPU both take host memory, and
    the pool is checked against what is free. A redis tier that cannot connect is not fatal
    (it runs disabled), so it has nothing to refuse early."""
    chunk_blocks = _chunk_blocks(config, layout)
    for spec in config.kv_tiers:
        check_capacity(spec, layout, chunk_blocks)
    opened: dict[int, TierStore] = {}
    try:
        for index, spec in enumerate(config.kv_tiers):
            if spec.kind == "disk":
                opened[index] = build_store(spec, layout, chunk_blocks, pin_memory=False)
    except BaseException:
        close_stores(opened.values())
        raise
    return opened


def close_stores(stores: Iterable[TierStore]) -> None:
    for store in stores:
        store.close()


def _chunk_blocks(config: TierConfig, layout: KVLayout) -> int:
    return max(1, config.kv_tier_chunk_tokens // layout.block_size)


def build_tier_manager(config: TierConfig, layout: KVLayout, kv_cache: torch.Tensor,
                       pool: BlockPool, prefill: PrefillRate,
                       opened: dict[int, TierStore] | None = None) -> TierManager:
    """The tier stack in `config.kv_tiers` order over `kv_cache`, with its probed rates.
    `opened`: the stores `open_disk_tiers` started, which it takes over (and closes along
    with the others if a later one is refused)."""
    opened = dict(opened or {})
    chunk_blocks = _chunk_blocks(config, layout)
    stores: list[TierStore] = []
    try:
        for spec in config.kv_tiers:  # every size before any tier creates anything
            check_capacity(spec, layout, chunk_blocks)
        for index, spec in enumerate(config.kv_tiers):
            store = opened.pop(index, None)
            stores.append(store if store is not None else
                          build_store(spec, layout, chunk_blocks, kv_cache.is_cuda))
        transfer = KVTransfer(kv_cache)
        rates = {store.name: probe_rate(store, transfer, chunk_blocks) for store in stores}
        for name, rate in rates.items():
            logger.info("tier %s: %.2f GB/s, latency %.3f ms", name, rate.bytes_per_s / 1e9,
                        rate.latency_s * 1e3)
        manager = TierManager(config, stores, transfer, pool, layout.block_size,
                              CostModel(prefill.tokens_per_s, rates,
                                        step_overhead_s=prefill.step_overhead_s,
                                        attention_per_key=prefill.attention_per_key))
    except BaseException:  # a later tier refused: the ones started close (threads, sockets)
        close_stores([*stores, *opened.values()])
        raise
    pool.eviction_listener = manager
    return manager


PROBE_CHUNKS = 8
"""The cpu probe moves this many chunks at once, about one long prefix: a single chunk is
small enough that launch overhead would halve the measured rate."""


def probe_rate(store: TierStore, transfer: KVTransfer, chunk_blocks: int) -> TierRate:
    """Time moving data from this kind of tier into the (still empty) device cache."""
    num_blocks = min(chunk_blocks * (PROBE_CHUNKS if store.name == "cpu" else 1),
                     transfer.kv_cache.shape[2])
    num_bytes = num_blocks * store.layout.block_bytes
    # Zeros, not torch.empty: the probe copies the payload into real device blocks, which keep
    # it. Uninitialised bytes read as float can be NaN or inf, and a block's unwritten slots
    # are masked in attention but still multiplied (0 * NaN = NaN): a later request that got
    # such a block decoded NaN logits (token 0 on every step). The pool must stay finite.
    payload = torch.zeros(num_bytes, dtype=torch.uint8, pin_memory=transfer.is_cuda)
    index = transfer.load_index(list(range(num_blocks)))
    if store.name == "cpu":
        transfer.copy_in(payload, num_blocks, 0, index)  # warm-up
        transfer.wait_loads()
        if transfer.is_cuda:
            started = transfer.load_event()
            transfer.copy_in(payload, num_blocks, 0, index)
            finished = transfer.load_event()
            finished.synchronize()
            seconds = started.elapsed_time(finished) / 1e3
        else:
            started_s = time.perf_counter()
            transfer.copy_in(payload, num_blocks, 0, index)
            transfer.wait_loads()
            seconds = time.perf_counter() - started_s
        return TierRate(num_bytes / max(seconds, 1e-9), latency_s=0.0)
    if isinstance(store, DiskStore):
        return _probe_disk(store, transfer, payload, num_blocks)
    if isinstance(store, RedisStore):
        return store.probe(payload, reads_at_once=manager_module.READ_AHEAD)
    return TierRate(1e9, latency_s=1e-3)


def _probe_disk(store: DiskStore, transfer: KVTransfer, payload: torch.Tensor,
                num_blocks: int) -> TierRate:
    """Latency: a 4 kB read. Rate: 2 x READ_AHEAD chunk files read READ_AHEAD at a time and
    checksummed, in reader threads, each copied into the device cache as it comes: as a load
    reads them."""
    threads = manager_module.READ_AHEAD
    reads = 2 * threads  # past the first wave: a long load's steady state
    index = transfer.load_index(list(range(num_blocks)))
    try:
        with tempfile.TemporaryDirectory(dir=store.root, prefix=".probe-") as scratch, \
                ThreadPoolExecutor(threads, thread_name_prefix="kvtier-probe") as readers:
            paths = [Path(scratch) / f"{i}.probe" for i in range(reads)]
            for path in paths:
                path.write_bytes(payload.numpy().data)
            list(readers.map(lambda _: None, range(threads)))  # threads started before timing
            started = time.perf_counter()
            with open(paths[0], "rb") as f:
                f.read(4096)
            latency = time.perf_counter() - started
            started = time.perf_counter()
            for data in readers.map(_read_checked, paths):
                transfer.copy_in(data, num_blocks, 0, index)
            transfer.wait_loads()
            elapsed = time.perf_counter() - started
    except OSError as exc:
        logger.warning("disk tier probe failed: %s", exc)
        return TierRate(1.0, latency_s=1.0)
    return TierRate(reads * payload.numel() / max(elapsed, 1e-9), latency_s=latency)


def _read_checked(path: Path) -> torch.Tensor:
    """A file read whole into a new buffer and checksummed, as the disk tier reads an entry."""
    buffer = torch.empty(path.stat().st_size, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.readinto(buffer.numpy().data)
    zlib.crc32(buffer.numpy().data)
    return buffer
