"""The CPU-checkable half of piecewise CUDA graphs: which sizes are captured, which size a step
pads to, and the padded inputs the runner builds (token 0 at position 0, slot -1). Capture and
replay themselves need CUDA: tests/gpu/test_piecewise_graphs.py."""

from __future__ import annotations

import pytest
import torch

from kvtier import LLM, SamplingParams
from kvtier.model.spec import ModelSpec
from kvtier.runner.piecewise_graph import PiecewiseGraphs, estimate_bytes, piecewise_sizes
from kvtier.types import ScheduledRequest, SchedulerOutput


def test_sizes_ascend_and_end_at_the_maximum() -> None:
    sizes = piecewise_sizes(1024)
    assert sizes == sorted(set(sizes)) and sizes[0] == 8 and sizes[-1] == 1024
    assert piecewise_sizes(100)[-1] == 100 and piecewise_sizes(100)[:-1] == [
        8, 16, 32, 48, 64, 96]
    assert piecewise_sizes(5) == [5]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM("random:tiny-llama", num_gpu_blocks_override=64)


def test_a_step_pads_to_the_next_captured_size(llm: LLM) -> None:
    runner = llm.engine.runner
    graphs = PiecewiseGraphs(runner.model, runner.kv_caches, 512)  # CPU buffers, no capture
    assert [graphs.size_for(n) for n in (1, 8, 9, 243, 512)] == [8, 8, 16, 256, 512]
    assert graphs.size_for(513) is None  # runs eagerly


def test_padded_inputs_write_nothing_and_attend_nowhere(llm: LLM) -> None:
    runner = llm.engine.runner
    bs = runner.block_size
    params = SamplingParams(temperature=0.0)
    step = SchedulerOutput([ScheduledRequest("d", [7], 20, [3, 4], True, params, 1),
                            ScheduledRequest("p", list(range(100, 142)), 0, [5, 6, 7], True,
                                             params, 0)], 43)
    ids, positions, metadata = runner._prepare_inputs(step, 64)
    assert ids.shape == positions.shape == metadata.slot_mapping.shape == (64,)
    assert metadata.num_tokens == 43 and metadata.query_start_loc_cpu == [0, 1, 43]
    assert ids[43:].eq(0).all() and positions[43:].eq(0).all()
    assert metadata.slot_mapping[43:].eq(-1).all()
    assert metadata.slot_mapping[0] == 4 * bs + 20 % bs  # the decode's slot is unchanged
    unpadded = runner._prepare_inputs(step)
    assert torch.equal(unpadded[0], ids[:43]) and torch.equal(unpadded[1], positions[:43])
    assert torch.equal(unpadded[2].slot_mapping, metadata.slot_mapping[:43])


def test_memory_estimate_grows_with_the_largest_size() -> None:
    spec = ModelSpec.from_hf_config({
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960,
        "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
        "vocab_size": 151936, "max_position_embeddings": 32768})
    small, large = estimate_bytes(spec, 256, 2), estimate_bytes(spec, 1024, 2)
    # Qwen2.5-1.5B at 1,024 tokens: static buffers, per-size residual/hidden, MLP temporaries.
    assert 0 < small < large < 256 * 2**20
