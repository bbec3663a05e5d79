"""`kvtier demo`: the embedded model answering chat prompts, a prefix-cache hit, throughput."""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING

from kvtier.engine.args import engine_kwargs
from kvtier.types import SamplingParams

if TYPE_CHECKING:
    from kvtier import LLM

_QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about memory.",
    "In one sentence, why do language models cache keys and values?",
]

_DOCUMENT_QUESTIONS = ("Which region holds section 3?", "How long is section 10 kept?")
_DOCUMENT = " ".join(
    f"Section {i}: the service stores request logs in region {i % 7}, keeps them for "
    f"{30 + i} days, and replicates them to {2 + i % 3} standby sites every {5 + i} minutes."
    for i in range(24))


def run_demo(args: argparse.Namespace) -> int:
    from kvtier import LLM

    started = time.monotonic()
    llm = LLM(**engine_kwargs(args))
    try:
        _demo(llm, started)
    finally:
        llm.shutdown()  # what a disk or redis tier should keep is written before the exit
    return 0


def _document_chat(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": _DOCUMENT}, {"role": "user", "content": question}]


def _check_context(llm: LLM) -> None:
    """The long-document prompts must fit, checked before the demo prints anything."""
    tokenizer = llm.get_tokenizer()
    longest = max(len(tokenizer.encode(tokenizer.apply_chat_template(
        _document_chat(q), add_generation_prompt=True), add_special_tokens=False))
        for q in _DOCUMENT_QUESTIONS)
    if longest >= llm.engine.max_model_len:
        raise ValueError(f"the demo's long-document prompt has {longest} tokens, but "
                         f"max_model_len is {llm.engine.max_model_len}: give --max-model-len "
                         f"{longest + 16} or more (and KV cache blocks for it)")


def _demo(llm: LLM, started: float) -> None:
    _check_context(llm)
    print(f"Loaded {llm.engine.model_name} on {llm.engine.device} in "
          f"{time.monotonic() - started:.1f}s "
          f"({llm.engine.pool.num_blocks} KV blocks of {llm.engine.config.cache.block_size})\n")
    greedy = SamplingParams(max_tokens=48, temperature=0.0)

    outputs = llm.chat([[{"role": "user", "content": q}] for q in _QUESTIONS], greedy)
    for question, output in zip(_QUESTIONS, outputs, strict=True):
        print(f"Q: {question}\nA: {output.outputs[0].text.strip()}\n")

    print("Prefix caching: two questions about the same long document")
    for question in _DOCUMENT_QUESTIONS:
        output = llm.chat(_document_chat(question),
                          SamplingParams(max_tokens=16, temperature=0.0))[0]
        m = output.metrics
        print(f"  {question!r}: {m.num_prompt_tokens} prompt tokens, "
              f"{m.num_cached_tokens} from the prefix cache, "
              f"TTFT {1000 * (m.time_to_first_token or 0):.0f} ms")

    batch = 16
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
    prompts = [f"Tell me fact number {i} about the ocean." for i in range(batch)]
    started = time.monotonic()
    results = llm.generate(prompts, params)
    elapsed = time.monotonic() - started
    generated = sum(len(r.outputs[0].token_ids) for r in results)
    print(f"\nThroughput: {batch} concurrent requests, {generated} output tokens in "
          f"{elapsed:.1f}s = {generated / elapsed:.1f} output tok/s")
