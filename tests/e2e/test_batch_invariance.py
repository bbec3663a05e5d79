"""`batch_invariant`: greedy tokens that do not depend on how requests were batched, chunked
or served from a tier, in bfloat16.

Without it, bf16 greedy tokens on CUDA change with the step shape: the same prompt run with
others and run alone can differ, and so can a run with a tier (whose hits change the chunks)
and one without (nvidia-h200, twenty-sixth session). On the CPU the torch kernels vary less,
but the KV witness still finds recomputed blocks that differ from their first computation.
These tests run on either device: Triton's kernels on CUDA, the padded torch GEMMs and
`InvariantTorchAttentionBackend` on the CPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kvtier.attention import create_backend
from kvtier.attention.invariant_ref import InvariantTorchAttentionBackend
from kvtier.config import EngineConfig
from kvtier.utils.kv_witness import KVWitness
from tests.e2e.test_tiered_engine import finish, make_llm, run, workload

DTYPE = "bfloat16"


def test_bf16_tokens_do_not_depend_on_batching_or_tiers(
        tmp_path: Path, loads_always_pay: None) -> None:
    """Tier-off, every block recomputed in another step shape has the bits of its first
    computation, and the concurrent batch gives the tokens of the same prompts run one by
    one on a fresh engine; with a cpu tier and with cpu+disk, prefixes come back from the
    tiers and every token is tier-off's."""
    off = make_llm(batch_invariant=True, dtype=DTYPE)
    with KVWitness(off.engine) as witness:
        expected = (run(off, workload()),
                    run(off, workload(seed=1, num_requests=8), concurrent=True))
    finish(off)
    assert witness.counts.recomputed_equal > 0 and witness.counts.recomputed_differ == 0, \
        witness.counts
    alone = make_llm(batch_invariant=True, dtype=DTYPE)
    assert run(alone, workload(seed=1, num_requests=8)) == expected[1]
    finish(alone)
    for tiers in (("cpu:64MiB",), ("cpu:128KiB", f"disk:{tmp_path}:64MiB")):
        llm = make_llm(batch_invariant=True, dtype=DTYPE, kv_tiers=tiers)
        got = run(llm, workload()), run(llm, workload(seed=1, num_requests=8), concurrent=True)
        hits = sum(llm.engine.tiers.stats.hit_tokens.values())
        finish(llm)
        assert hits > 0, f"{tiers}: no prefix came back from a tier"
        assert got == expected, tiers


def test_seeded_sampling_does_not_depend_on_batching() -> None:
    """A request with a seed samples from its own generator over its own row of logits, and
    with batch invariance that row has the same bits in any batch: temperature and top-p
    sampling give the same tokens all at once as one by one."""
    from kvtier import SamplingParams
    prompts = workload(seed=1, num_requests=8)
    params = [SamplingParams(max_tokens=12, temperature=0.8, top_p=0.9, seed=100 + i,
                             ignore_eos=True) for i in range(len(prompts))]
    together = make_llm(batch_invariant=True, dtype=DTYPE)
    batched = [o.outputs[0].token_ids for o in together.generate(prompts, params)]
    finish(together)
    alone = make_llm(batch_invariant=True, dtype=DTYPE)
    one_by_one = [alone.generate([p], [s])[0].outputs[0].token_ids
                  for p, s in zip(prompts, params, strict=True)]
    finish(alone)
    assert batched == one_by_one


def test_batch_invariant_engine_runs_the_invariant_kernels() -> None:
    """What the flag switches: every projection and the logits on the invariant matmul, no
    small-batch GEMV, attention through the device's invariant backend; the default engine
    keeps its own."""
    llm = make_llm(batch_invariant=True, dtype=DTYPE)
    model, backend = llm.engine.model, llm.engine.runner.backend
    assert model.batch_invariant
    layer = model.layers[0]
    assert layer.batch_invariant and layer.self_attn.qkv_proj.batch_invariant
    assert layer.mlp.down_proj.batch_invariant
    if llm.engine.device.type == "cuda":
        assert backend.name == "triton" and backend.batch_invariant
    else:
        assert isinstance(backend, InvariantTorchAttentionBackend)
    finish(llm)
    default = make_llm(dtype=DTYPE)
    assert not default.engine.model.batch_invariant
    assert not default.engine.model.layers[0].mlp.gate_up_proj.batch_invariant
    assert not isinstance(default.engine.runner.backend, InvariantTorchAttentionBackend)
    finish(default)


def test_cuda_batch_invariance_refuses_the_torch_backend() -> None:
    """On CUDA the torch backend's matmuls pick their kernels by shape: asking for
    invariance with it is refused by name, not run without it (no GPU needed to refuse)."""
    with pytest.raises(ValueError, match="batch invariance on CUDA needs the triton"):
        create_backend("torch", "cuda", batch_invariant=True)
    assert isinstance(create_backend("torch", "cpu", batch_invariant=True),
                      InvariantTorchAttentionBackend)
    assert isinstance(create_backend("auto", "cpu", batch_invariant=True),
                      InvariantTorchAttentionBackend)
    assert not isinstance(create_backend("auto", "cpu"), InvariantTorchAttentionBackend)


def test_the_flag_reaches_the_engine_config() -> None:
    import argparse

    from kvtier.engine.args import add_engine_args, engine_kwargs
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    on = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(["--batch-invariant"])))
    off = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([])))
    assert on.batch_invariant and not off.batch_invariant
