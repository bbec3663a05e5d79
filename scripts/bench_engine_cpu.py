"""Issue 2 benchmark: kvtier vs HF transformers `generate` on the CPU, same weights and prompts.

Measures output tokens/s for 1 and for 32 concurrent requests (prompt ~256 tokens, 128 output
tokens, greedy, ignore EOS), HF transformers on the same converted weights in the same run
(batch 1 and one padded batch of 32), and the TTFT of a 1,024-token prompt cold and with its
prefix cached, and the matmul floor of the 32-request run (every linear layer at the GEMM rate
measured on this machine, all else free), which bounds any engine's speedup over HF here.
Writes a JSON results file.

    .venv/bin/python scripts/bench_engine_cpu.py --out results/bench_engine_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import subprocess
import time
from pathlib import Path

import torch


def prompts(tokenizer, count: int, length: int, seed: int) -> list[list[int]]:  # noqa: ANN001
    rng = random.Random(seed)
    words = ["the", "of", "and", "to", "in", "is", "was", "for", "on", "that", "with", "as",
             "by", "at", "from", "it", "an", "be", "this", "are"]
    out = []
    for _ in range(count):
        text = " ".join(rng.choice(words) for _ in range(length * 2))
        out.append(tokenizer.encode(text)[:length])
    return out


def bench_kvtier(llm, batch: list[list[int]], max_tokens: int) -> float:  # noqa: ANN001
    from kvtier import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(batch, params)
    elapsed = time.perf_counter() - started
    return sum(len(o.outputs[0].token_ids) for o in outputs) / elapsed


def bench_hf(model, batch: list[list[int]], max_tokens: int, pad_id: int) -> float:  # noqa: ANN001
    width = max(len(p) for p in batch)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - started
    return (out.shape[1] - width) * len(batch) / elapsed


def gemm_rate(weights: list[torch.Tensor], rows: int, repeats: int = 3) -> float:
    """FLOP/s of multiplying `rows` activations by every weight matrix in turn, as one forward
    does (weights stream from memory, they do not sit in cache), with this machine's fastest
    GEMM: oneDNN with packed weights where torch has it, else torch.mm."""
    from kvtier.model import onednn
    inputs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    flops = sum(2 * rows * w.numel() for w in weights)
    packed = onednn.supports(weights[0].device, weights[0].dtype)
    operands = [(inputs[w.shape[1]], onednn.pack(w) if packed else w.t()) for w in weights]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for x, w in operands:
                onednn.linear(x, w, None) if packed else torch.mm(x, w)
            best = min(best, time.perf_counter() - started)
    return flops / best


def floor_tok_s(model, num_requests: int, prompt_len: int, max_tokens: int) -> dict:  # noqa: ANN001
    """The matmul floor of the batched run: prompt tokens through every linear layer at the
    measured prefill-shaped GEMM rate, plus one decode step per output token at the measured
    rate for `num_requests` rows. Attention, sampling and all else count as zero."""
    # The model's own projections are packed (their parameters emptied): the floor packs
    # dense copies of the same shapes.
    shapes = [(m.out_features, m.in_features) for m in model.modules()
              if isinstance(m, torch.nn.Linear)]
    embedding = model.embed_tokens.weight
    weights = [torch.randn(shape, dtype=embedding.dtype) * 0.02 for shape in shapes]
    if model.lm_head is None:
        weights.append(embedding.detach())
    head = max(weights, key=lambda w: w.numel())  # the (tied) vocabulary projection
    body = sum(w.numel() for w in weights) - head.numel()
    prefill_rate, decode_rate = gemm_rate(weights, 2048), gemm_rate(weights, num_requests)
    prefill_s = (2 * num_requests * prompt_len * body + 2 * num_requests * head.numel()) \
        / prefill_rate
    decode_s = (max_tokens - 1) * 2 * num_requests * (body + head.numel()) / decode_rate
    return {"gemm_gflops_prefill": prefill_rate / 1e9, "gemm_gflops_decode": decode_rate / 1e9,
            "floor_prefill_s": prefill_s, "floor_decode_s": decode_s,
            "floor_tok_s": num_requests * max_tokens / (prefill_s + decode_s)}


def ttft(llm, prompt: list[int]) -> float:  # noqa: ANN001
    from kvtier import SamplingParams
    output = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))[0]
    return output.metrics.time_to_first_token or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="results/bench_engine_cpu.json")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="both engines' (vLLM's CPU backend defaults to bfloat16)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from kvtier import LLM

    llm = LLM(dtype=args.dtype)
    tokenizer = llm.get_tokenizer()
    single = prompts(tokenizer, 1, args.prompt_len, seed=1)
    batch = prompts(tokenizer, 32, args.prompt_len, seed=2)
    bench_kvtier(llm, single, 8)  # warm-up
    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} "
                   f"threads, torch {torch.__version__}",
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                 text=True).stdout.strip(),
        "date": time.strftime("%Y-%m-%d"),
        "dtype": args.dtype, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
        "kvtier_tok_s_1": bench_kvtier(llm, single, args.max_tokens),
        "kvtier_tok_s_32": bench_kvtier(llm, batch, args.max_tokens),
    }
    floor = floor_tok_s(llm.engine.model, len(batch), args.prompt_len, args.max_tokens)
    results.update({f"{key}_32": value for key, value in floor.items()})
    doc = prompts(tokenizer, 1, 1024, seed=3)[0]
    llm.engine.reset_prefix_cache()
    results["ttft_1024_cold_s"] = ttft(llm, doc)
    results["ttft_1024_cached_s"] = ttft(llm, doc)
    if not args.skip_hf:
        path = llm.engine.source.path
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
        pad = tokenizer.eos_token_id or 0
        bench_hf(hf, single, 8, pad)
        results["hf_tok_s_1"] = bench_hf(hf, single, args.max_tokens, pad)
        results["hf_tok_s_32"] = bench_hf(hf, batch, args.max_tokens, pad)
        results["speedup_1"] = results["kvtier_tok_s_1"] / results["hf_tok_s_1"]
        results["speedup_32"] = results["kvtier_tok_s_32"] / results["hf_tok_s_32"]
        # What even a zero-overhead engine could reach against this HF run on this machine.
        results["floor_speedup_32"] = results["floor_tok_s_32"] / results["hf_tok_s_32"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
