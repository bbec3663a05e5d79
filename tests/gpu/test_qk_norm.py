"""Qwen3's per-head q/k norms on CUDA, against transformers: the norms run as the Triton
RMSNorm over each head's row, and the q/k/v projection never takes the fused qkv kernel (which
rotates, and may store K/V, with no place for them), in eager steps and in the CUDA graphs
(piecewise prefills, decodes).

On a GPU: `pytest -m gpu tests/gpu/test_qk_norm.py`; skipped elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.e2e.test_engine_correctness import tiny_qwen3_dir
from tests.helpers import full_logits
from transformers import AutoModelForCausalLM, PreTrainedModel

from kvtier import LLM, SamplingParams
from kvtier.attention.triton_backend import TritonAttentionBackend
from kvtier.model.builder import build_model
from kvtier.model.loader import resolve_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

CUDA = torch.device("cuda")
TOLERANCE = 5e-2
"""Float32 through Triton's dots (TF32 inputs) against transformers' float32 on the CPU: logits
of this model (std ~1.6) agree to ~1e-2; leaving the q/k norms out moves them by ~8."""


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen3_dir(tmp_path_factory.mktemp("qwen3") / "tiny-qwen3")


@pytest.fixture(scope="module")
def reference(qwen3_dir: Path) -> PreTrainedModel:
    return AutoModelForCausalLM.from_pretrained(qwen3_dir, dtype=torch.float32).eval()


def test_eager_logits_match_transformers(qwen3_dir: Path, reference: PreTrainedModel) -> None:
    """Prefilled whole, in chunks, and a token a step (1-row steps: o and down through
    `small_linear`, q/k/v through nn.Linear and the separate norm and rotary kernels)."""
    source = resolve_model(str(qwen3_dir))
    model = build_model(source, TritonAttentionBackend(), CUDA, torch.float32)
    token_ids = source.tokenizer.encode("Paged attention: the quick brown fox " * 6)
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0]
    for chunk in (None, 16, 1):
        logits = full_logits(model, token_ids, chunk=chunk, device=CUDA).cpu()
        torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_engine_logprobs_through_cuda_graphs_match_transformers(
        qwen3_dir: Path, reference: PreTrainedModel) -> None:
    """An engine with decode and piecewise graphs: the prompt's logprobs (a piecewise-graph
    prefill) and each output token's (decode graphs) are transformers' over the same tokens,
    and every greedy token is transformers' argmax there, up to near-ties."""
    llm = LLM(str(qwen3_dir), dtype="float32", num_gpu_blocks_override=256, max_model_len=1024)
    runner = llm.engine.runner
    assert runner.graphs is not None and runner.piecewise is not None
    prompt = llm.get_tokenizer().encode("Paged attention: the quick brown fox " * 4)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=1,
                            prompt_logprobs=1)
    output = llm.generate([prompt], params)[0]
    completion = output.outputs[0]
    tokens = completion.token_ids
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + tokens])).logits[0]
    expected = logits.log_softmax(-1)
    assert completion.logprobs is not None and len(completion.logprobs) == len(tokens)
    for position, (token, entry) in enumerate(zip(tokens, completion.logprobs, strict=True)):
        row = expected[len(prompt) - 1 + position]
        assert entry.logprob == pytest.approx(row[token].item(), abs=TOLERANCE), position
        assert row[token] >= row.max() - TOLERANCE, position
    assert output.prompt_logprobs is not None
    for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
        assert entry is not None
        assert entry.logprob == pytest.approx(expected[position - 1, prompt[position]].item(),
                                              abs=TOLERANCE), position
