"""`LLM(...)` / `EngineConfig.from_kwargs` refuse a value of the wrong type by its argument's
name: before, a string for a number failed deep inside with a TypeError naming nothing
(`'<' not supported between instances of 'str' and 'int'`), a float block size reached
`torch.zeros`, and a truthy string such as "no" turned a switch on."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier import LLM
from kvtier.config import ConfigError, EngineConfig


@pytest.mark.parametrize(("name", "value"), [
    ("block_size", "16"), ("block_size", 16.0), ("block_size", True),
    ("max_num_seqs", "8"), ("max_num_seqs", 8.5), ("max_num_batched_tokens", "2048"),
    ("max_model_len", "256"), ("max_model_len", 256.7), ("gpu_memory_utilization", "0.5"),
    ("num_gpu_blocks_override", "64"), ("num_gpu_blocks_override", 64.5),
    ("seed", "1"), ("seed", 1.5), ("max_logprobs", "5"), ("kv_tier_chunk_tokens", "256"),
    ("long_prefill_token_threshold", "1"), ("short_prefill_first_tokens", 0.5),
    ("max_cudagraph_capture_size", "1"), ("kv_cache_memory_bytes", True),
    ("device", None), ("device", 0), ("model", 5), ("attention_backend", None),
    ("enable_prefix_caching", "no"), ("enforce_eager", "yes"), ("async_scheduling", "no"),
    ("batch_invariant", 1), ("overlap_outputs", "false"),
])
def test_a_value_of_the_wrong_type_is_refused_by_name(name: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{name} {value!r} must be "):
        EngineConfig.from_kwargs(**{name: value})


def test_llm_refuses_a_wrong_type_before_loading_anything() -> None:
    with pytest.raises(ConfigError, match=r"^max_num_seqs '8' must be an integer or None$"):
        LLM("random:tiny-llama", device="cpu", max_num_seqs="8")


@pytest.mark.parametrize(("name", "value"), [
    ("gpu_memory_utilization", 1), ("max_model_len", None), ("async_scheduling", None),
    ("num_gpu_blocks_override", 64), ("kv_store_min_hits", "auto"), ("kv_store_min_hits", 2),
    ("seed", -1), ("seed", 2**64 - 1), ("kv_cache_memory_bytes", "512MiB"),
    ("kv_cache_memory_bytes", 1e9),
])
def test_values_of_the_right_type_are_taken(name: str, value: Any) -> None:
    EngineConfig.from_kwargs(**{name: value})


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 10**30])
def test_a_seed_no_generator_takes_is_refused_by_name(seed: int) -> None:
    """Before, `--seed 99999999999999999999999` ended in `Overflow when unpacking long long`."""
    with pytest.raises(ConfigError, match=rf"^seed {seed} must be in "):
        EngineConfig.from_kwargs(seed=seed)


def test_one_tier_spec_string_is_not_read_letter_by_letter() -> None:
    """Before, `kv_tiers="cpu:1GiB"` was refused as the tier spec 'c'."""
    with pytest.raises(ConfigError, match=r"^kv_tiers 'cpu:1GiB' must be a list of tier specs"):
        EngineConfig.from_kwargs(kv_tiers="cpu:1GiB")
    with pytest.raises(ConfigError, match=r"^kv_tiers: tier 5 must be a spec string"):
        EngineConfig.from_kwargs(kv_tiers=[5])
    assert EngineConfig.from_kwargs(kv_tiers=["cpu:1GiB"]).tiers.kv_tiers[0].kind == "cpu"


@pytest.mark.parametrize("text", ["-5", "1XB", "abc", "1PiB"])
def test_an_unparsable_kv_cache_size_names_the_argument(text: str) -> None:
    with pytest.raises(ConfigError, match=rf"^kv_cache_memory_bytes: cannot parse size "
                                          rf"'{text}'"):
        EngineConfig.from_kwargs(kv_cache_memory_bytes=text)


@pytest.mark.parametrize("specs,kind", [
    (["cpu:1GiB", "cpu:2GiB"], "cpu"),
    (["cpu:1GiB", "disk:/tmp/a:1GiB", "disk:/tmp/b:1GiB"], "disk"),
])
def test_two_tiers_of_one_kind_are_refused(specs: list[str], kind: str) -> None:
    """Before, the stack keyed its tiers' stats and load rates by kind: the second tier of a
    kind was silently counted as the first."""
    with pytest.raises(ConfigError, match=rf"^kv_tiers: 2 '{kind}' tiers given; each kind "):
        EngineConfig.from_kwargs(kv_tiers=specs)
    assert len(EngineConfig.from_kwargs(
        kv_tiers=["cpu:1GiB", "disk:/tmp/a:1GiB"]).tiers.kv_tiers) == 2


def test_a_tier_chunk_of_part_blocks_is_refused() -> None:
    """A tier entry holds whole KV blocks: 24 tokens at block_size 16 used to become 16 with
    nothing said. Without a tier the value is unused, so it is not judged."""
    with pytest.raises(ConfigError, match=r"^kv_tier_chunk_tokens 24 must be a multiple of "
                                          r"block_size 16$"):
        EngineConfig.from_kwargs(kv_tiers=["cpu:1GiB"], kv_tier_chunk_tokens=24)
    assert EngineConfig.from_kwargs(kv_tiers=["cpu:1GiB"], kv_tier_chunk_tokens=48,
                                    block_size=16).tiers.kv_tier_chunk_tokens == 48
    assert EngineConfig.from_kwargs(kv_tier_chunk_tokens=24).tiers.kv_tier_chunk_tokens == 24
