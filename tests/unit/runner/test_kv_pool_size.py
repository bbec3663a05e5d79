"""A KV pool larger than the device's free memory is refused by the argument that asked for
it, before anything is allocated. Before, `--kv-cache-memory-bytes 1TiB` on the CPU ended in
torch's allocator traceback (exit 1), and `--num-gpu-blocks-override 99999999999` hung
building the block pool's bookkeeping for a hundred billion blocks."""

from __future__ import annotations

import pytest
import torch

from kvtier import LLM
from kvtier.config import CacheConfig, ConfigError
from kvtier.model.loader import resolve_model
from kvtier.runner.memory import available_bytes, plan_kv_blocks

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def spec():  # noqa: ANN201
    return resolve_model("random:tiny-llama").spec


def test_the_host_says_how_much_memory_is_free() -> None:
    free = available_bytes(CPU)
    assert free is not None and free > 0


def test_more_blocks_than_memory_holds_are_refused_by_name(spec) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match=r"^num_gpu_blocks_override 99999999999: a KV pool "
                                          r"of 99999999999 blocks needs .* GiB, more than the "
                                          r".* GiB free on cpu$"):
        plan_kv_blocks(CacheConfig(num_gpu_blocks_override=99999999999), spec, CPU,
                       torch.float32, 0)


def test_a_kv_size_beyond_free_memory_is_refused_by_name(spec) -> None:  # noqa: ANN001
    too_much = 2 * available_bytes(CPU)
    with pytest.raises(ConfigError, match=rf"^kv_cache_memory_bytes {too_much}: a KV pool"):
        plan_kv_blocks(CacheConfig(kv_cache_memory_bytes=too_much), spec, CPU,
                       torch.float32, 0)


def test_pools_that_fit_are_planned(spec) -> None:  # noqa: ANN001
    assert plan_kv_blocks(CacheConfig(num_gpu_blocks_override=64), spec, CPU,
                          torch.float32, 0).num_blocks == 64
    plan = plan_kv_blocks(CacheConfig(kv_cache_memory_bytes=1 << 20), spec, CPU,
                          torch.float32, 0)
    assert plan.num_blocks == (1 << 20) // plan.block_bytes


def test_llm_refuses_the_pool_before_allocating_it() -> None:
    with pytest.raises(ConfigError, match=r"^kv_cache_memory_bytes \d+: a KV pool"):
        LLM("random:tiny-llama", device="cpu", kv_cache_memory_bytes="1000TiB")
