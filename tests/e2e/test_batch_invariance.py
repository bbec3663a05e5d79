"""`batch_invariant`: greedy tokens that do not depend on how requests were batched, chunked
or served from a tier, in the engine's own dtype (bfloat16 on CUDA).

Without it, bf16 greedy tokens on CUDA change with the step shape: the same prompt run with
others and run alone can differ, and so can a run with a tier (whose hits change the chunks)
and one without (nvidia-h200, twenty-sixth session). The engine checks run on CUDA only;
the configuration checks run everywhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvtier import LLM
from kvtier.config import ConfigError, EngineConfig
from tests.e2e.test_tiered_engine import (
    TINY_MODEL,
    finish,
    loads_always_pay,  # noqa: F401 (a fixture)
    make_llm,
    run,
    workload,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="batch invariance runs the Triton kernels (CUDA)")


@needs_cuda
def test_bf16_tokens_do_not_depend_on_batching_or_tiers(
        tmp_path: Path, loads_always_pay: None) -> None:  # noqa: F811
    """Tier-off, the concurrent batch gives the tokens of the same prompts run one by one on a
    fresh engine; with a cpu tier and with cpu+disk, prefixes come back from the tiers and
    every token is tier-off's."""
    off = make_llm(batch_invariant=True)
    assert off.engine.dtype == torch.bfloat16
    expected = run(off, workload()), run(off, workload(seed=1, num_requests=8), concurrent=True)
    finish(off)
    alone = make_llm(batch_invariant=True)
    assert run(alone, workload(seed=1, num_requests=8)) == expected[1]
    finish(alone)
    for tiers in (("cpu:64MiB",), ("cpu:128KiB", f"disk:{tmp_path}:64MiB")):
        llm = make_llm(batch_invariant=True, kv_tiers=tiers)
        got = run(llm, workload()), run(llm, workload(seed=1, num_requests=8), concurrent=True)
        hits = sum(llm.engine.tiers.stats.hit_tokens.values())
        finish(llm)
        assert hits > 0, f"{tiers}: no prefix came back from a tier"
        assert got == expected, tiers


@needs_cuda
def test_batch_invariant_engine_runs_the_invariant_kernels() -> None:
    """What the flag switches: every projection and the logits on the invariant matmul, no
    small-batch GEMV, attention all through one kernel; the default engine keeps its own."""
    llm = make_llm(batch_invariant=True)
    model = llm.engine.model
    assert model.batch_invariant and llm.engine.runner.backend.batch_invariant
    layer = model.layers[0]
    assert layer.batch_invariant and layer.self_attn.qkv_proj.batch_invariant
    assert layer.mlp.down_proj.batch_invariant
    finish(llm)
    default = make_llm()
    assert not default.engine.model.batch_invariant
    assert not default.engine.model.layers[0].mlp.gate_up_proj.batch_invariant
    finish(default)


def test_batch_invariance_needs_cuda_and_the_triton_backend() -> None:
    """The torch kernels depend on the batch: asking for invariance there is refused by
    name, not run quietly without it."""
    with pytest.raises(ConfigError, match="batch_invariant needs the triton attention backend"):
        EngineConfig.from_kwargs(batch_invariant=True, attention_backend="torch")
    assert EngineConfig.from_kwargs(batch_invariant=True).batch_invariant
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="batch_invariant needs a CUDA device .* not cpu"):
            LLM(TINY_MODEL, batch_invariant=True)


def test_the_flag_reaches_the_engine_config() -> None:
    import argparse

    from kvtier.engine.args import add_engine_args, engine_kwargs
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    on = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(["--batch-invariant"])))
    off = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([])))
    assert on.batch_invariant and not off.batch_invariant
