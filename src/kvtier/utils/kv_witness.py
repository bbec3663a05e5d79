"""Bit-level witness of the KV a tier load writes: is it exactly what a computation wrote?

Greedy tokens with a tier can differ from tokens without one for two reasons. One is a wrong
load: wrong bytes, a race with a forward pass, a stale slot. The other is benign. A load
brings back the bits of the block's first computation, while a run without the tier
recomputes the block in another step shape, and the GEMMs' reduction order depends on that
shape. Tokens cannot tell the two apart; the KV can.

While attached, the witness reads back every block the device pool registers under a hash,
once the device has finished with it. That is the step that computed it, or the load that
wrote it: the registration comes after either, and the witness synchronises the device. It
then compares the bits with that hash's earlier versions. A loaded block must equal some
computed version; a recomputed one may differ from its first computation. Tests and
`scripts/greedy_async_check_gpu.py` use it; it costs a device sync and a host copy per
block.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from kvtier.engine.engine import LLMEngine

_ABSENT = object()


@dataclass
class KVWitnessCounts:
    computed_first: int = 0
    """Blocks computed whose hash the witness had not seen before."""
    recomputed_equal: int = 0
    recomputed_differ: int = 0
    """Computed again, with bits other than its first computation's (step-shape variance)."""
    loaded_equal: int = 0
    """Loaded from a tier, equal to a computed version of the block."""
    loaded_unmatched: int = 0
    """Loaded from a tier, matching none of the block's computed versions: a wrong load."""
    loaded_unseen: int = 0
    """Loaded from a tier before the witness saw the block computed (stored before it was
    attached, e.g. by an earlier engine on the same disk directory): nothing to judge."""


class KVWitness:
    """Attach to an engine for the duration of a `with` block (module docstring)."""

    def __init__(self, engine: LLMEngine, known: KVWitness | None = None) -> None:
        """`known`: a witness of an earlier engine with the same weights, whose computed
        versions this one judges loads by (a restart's loads from a disk tier)."""
        self.engine = engine
        self.counts = KVWitnessCounts()
        self._versions: dict[Any, list[str]] = known._versions if known is not None else {}
        """Block hash -> digests of its computed versions, first first."""
        self._planned: dict[str, list[Any]] = {}
        """Request id -> the hashes its load plan names, until the load's result says how
        many of them it wrote."""
        self._loading: set[Any] = set()
        self._patched: list[tuple[object, str, object]] = []

    def __enter__(self) -> KVWitness:
        pool, tiers = self.engine.pool, self.engine.tiers
        register = pool.cache_block

        def witnessing_cache_block(block_id: int, block_hash: Any) -> bool:  # noqa: ANN401
            new = (pool.blocks[block_id].block_hash is None
                   and pool.get_cached_block(block_hash) is None)
            cached = register(block_id, block_hash)
            if cached and new:
                self._observe(block_id, block_hash)
            else:  # another request registered it first: this load is not judged, and a
                self._loading.discard(block_hash)  # later computation of it is no load
            return cached

        self._patch(pool, "cache_block", witnessing_cache_block)
        if tiers is not None:
            start_load, poll = tiers.start_load, tiers.poll

            def recording_start_load(request_id: str, plan: Any, block_ids: list[int],  # noqa: ANN401
                                     block_hashes: list[Any]) -> bool:
                self._planned[request_id] = list(block_hashes[:plan.num_blocks])
                return start_load(request_id, plan, block_ids, block_hashes)

            def recording_poll() -> list[Any]:
                # Only the blocks a result reports written were loaded. A load can stop
                # short of its plan (a read error, a failed copy), and the request computes
                # the rest: judging those as loads would call step-shape variance a wrong
                # load.
                results = poll()
                for result in results:
                    planned = self._planned.pop(result.request_id, [])
                    self._loading.update(planned[:result.num_loaded_blocks])
                return results

            self._patch(tiers, "start_load", recording_start_load)
            self._patch(tiers, "poll", recording_poll)
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, before in reversed(self._patched):
            if before is _ABSENT:
                delattr(owner, name)  # the class's method shows through again
            else:
                setattr(owner, name, before)
        self._patched.clear()

    def _patch(self, owner: object, name: str, replacement: object) -> None:
        self._patched.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, replacement)

    def _observe(self, block_id: int, block_hash: Any) -> None:  # noqa: ANN401
        kv_cache = self.engine.runner.kv_cache
        if kv_cache.is_cuda:
            torch.cuda.synchronize(kv_cache.device)
        bits = kv_cache[:, :, block_id].contiguous().view(-1).view(torch.uint8).cpu()
        digest = hashlib.sha1(bits.numpy().tobytes()).hexdigest()
        versions = self._versions.setdefault(block_hash, [])
        if block_hash in self._loading:
            self._loading.discard(block_hash)
            if not versions:
                self.counts.loaded_unseen += 1
            elif digest in versions:
                self.counts.loaded_equal += 1
            else:
                self.counts.loaded_unmatched += 1
            return
        if not versions:
            self.counts.computed_first += 1
        elif digest == versions[0]:
            self.counts.recomputed_equal += 1
        else:
            self.counts.recomputed_differ += 1
        versions.append(digest)
