"""Issue 6, part 1 on the device: correctness checks and performance next to measured floors.

One run prints (and writes to --out as JSON):
- the card, the measured floors: bf16 matmul rate, device copy bandwidth, pinned host<->device
  bandwidth (one large copy);
- logits of our Qwen2.5-1.5B-shaped model (random weights, bf16, Triton attention) against HF
  transformers on the same weights; greedy tokens with the cpu tier on and off;
- prefill of 8,192 tokens vs the FLOP floor; decode step at batch 1 vs the weight-read floor;
  output tok/s at batch 32 and 256; loading a 16,384-token prefix from the cpu tier vs the
  pinned-copy floor; HF transformers' prefill and generate on the same card.

    PYTHONPATH=src python3 scripts/gpu_check.py --out $OUT/gpu_check.json

`--batch-invariant` runs the engines batch-invariant (their logits, speeds and greedy checks;
no fusion A/B or tier-load timing, which the mode does not change). `--model` checks another
architecture (e.g. random:qwen3-0.6b): its logits against HF, its speeds and greedy tokens
with the tier on and off (the tier-load timing stays on the Qwen2.5 shape the issue names).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

MODEL = "random:qwen2.5-1.5b"


def cuda_time(fn, repeat: int = 10, warmup: int = 3) -> float:  # noqa: ANN001
    """Median seconds of fn() measured with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def floors() -> dict[str, float]:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    matmul_s = cuda_time(lambda: a @ a, repeat=10)
    x = torch.randn(8192, 1536, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(1536, 17920, device="cuda", dtype=torch.bfloat16)
    mlp_s = cuda_time(lambda: x @ w)
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    other = torch.empty_like(big)
    copy_s = cuda_time(lambda: other.copy_(big), repeat=5)
    host = torch.empty(470 * 1024**2, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(host.numel(), dtype=torch.uint8, device="cuda")
    h2d_s = cuda_time(lambda: dev.copy_(host, non_blocking=True), repeat=5)
    d2h_s = cuda_time(lambda: host.copy_(dev, non_blocking=True), repeat=5)
    return {
        "matmul_tflops_8192": 2 * 8192**3 / matmul_s / 1e12,
        "matmul_tflops_qwen_mlp": 2 * 8192 * 1536 * 17920 / mlp_s / 1e12,
        "device_copy_gbs_rw": 2 * big.numel() / copy_s / 1e9,
        "pinned_h2d_gbs": host.numel() / h2d_s / 1e9,
        "pinned_d2h_gbs": host.numel() / d2h_s / 1e9,
    }


def hf_model(spec, source):  # noqa: ANN001, ANN201
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**spec.to_hf_config())
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16,
                                                 attn_implementation="sdpa")
    state = dict(source.iter_weights(torch.device("cuda"), torch.bfloat16))
    if spec.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=False)
    return model.eval()


def check_logits(llm, report: dict) -> None:  # noqa: ANN001
    """Our logits (full paged path, Triton attention) vs HF on the same weights."""
    import sys
    sys.path.insert(0, ".")
    from tests.helpers import full_logits
    engine = llm.engine
    ids = [random.Random(0).randrange(1000, 100_000) for _ in range(300)]
    hf = hf_model(engine.spec, engine.source)
    with torch.no_grad():
        ref = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    ours = full_logits(engine.model, ids, chunk=128, device=torch.device("cuda"))
    diff = (ours - ref).abs()
    report["logits_max_abs_diff"] = diff.max().item()
    report["logits_mean_abs_diff"] = diff.mean().item()
    report["logits_ref_abs_mean"] = ref.abs().mean().item()
    report["argmax_agreement"] = (ours.argmax(-1) == ref.argmax(-1)).float().mean().item()
    del hf
    torch.cuda.empty_cache()


def time_step(llm, prompt_len: int) -> float:  # noqa: ANN001
    from kvtier import SamplingParams
    engine = llm.engine
    engine.reset_prefix_cache()
    ids = [random.Random(prompt_len).randrange(1000, 100_000) for _ in range(prompt_len)]
    engine.add_request(ids, SamplingParams(max_tokens=1, temperature=0.0))
    torch.cuda.synchronize()
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def decode_tok_s(llm, batch: int, prompt_len: int = 512, output_len: int = 128) -> float:  # noqa: ANN001
    from kvtier import SamplingParams
    rng = random.Random(batch)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(prompt_len)] for _ in range(batch)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    return sum(len(o.outputs[0].token_ids) for o in outputs) / (time.perf_counter() - started)


def decode_step_ms(llm, batch: int, context: int = 512) -> float:  # noqa: ANN001
    """Median time of a decode-only step (CUDA graph replay + sampling)."""
    from kvtier import SamplingParams
    engine = llm.engine
    rng = random.Random(7)
    for _ in range(batch):
        engine.add_request([rng.randrange(1000, 100_000) for _ in range(context)],
                           SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
    while any(r.num_output_tokens == 0 for r in engine.scheduler.requests.values()):
        engine.step()
    times = []
    for _ in range(40):
        torch.cuda.synchronize()
        started = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - started)
    for request_id in list(engine.scheduler.requests):
        engine.abort_request(request_id)
    return statistics.median(times[5:]) * 1e3


DECODE_VARIANTS = {
    "cublas": ((), False),
    "qkv,o,down": (("qkv", "o", "down"), False),
    "qkv,o,down+pdl": (("qkv", "o", "down"), True),
    "qkv,o,down,kv_write+pdl": (("qkv", "o", "down", "kv_write"), True),
    "qkv,o,gate_up,down+pdl": (("qkv", "o", "gate_up", "down"), True),
}
"""Decode-graph variants: the fusions of small batches (`llama.FUSIONS`; the rest runs
through cuBLAS with the separate norm, rotary, KV-write and SiLU kernels), and whether the
Triton kernels use programmatic dependent launch."""
SAME_LOGITS = [("qkv,o,down", "qkv,o,down+pdl"),
               ("qkv,o,down+pdl", "qkv,o,down,kv_write+pdl")]
"""Variants that must compute bit-identical logits: PDL changes only when kernels start, and
the fused KV write stores the very values the KV-write kernel would. A missing wait, or a
wrong slot, shows as a difference."""


def decode_fusion_ab(llm, report: dict) -> None:  # noqa: ANN001
    """Decode graph replays at batch 1, 2 and 4 in each of DECODE_VARIANTS, all captured
    afresh the same way, and the engine's own graphs, over the same inputs: the contexts of
    decode_step_ms's last step. Interleaved repeats; batch 4 takes no `small_linear`."""
    from kvtier import triton_pdl
    from kvtier.model.llama import SMALL_BATCH_FUSIONS

    runner = llm.engine.runner
    engine_graphs = runner.graphs
    sizes = [1, 2, 4]
    captured = {}
    try:
        for name, (projections, pdl) in DECODE_VARIANTS.items():
            runner.model.set_small_batch_fusion(projections)
            triton_pdl.set_enabled(pdl)
            runner.capture_decode_graphs(max(sizes), llm.engine.max_model_len)
            graphs = runner.graphs
            n = graphs.sizes[-1]
            graphs._device_vectors.copy_(engine_graphs._device_vectors[:, :n])
            graphs.seq_lens.copy_(engine_graphs.seq_lens[:n])
            graphs.block_table.copy_(engine_graphs.block_table[:n])
            # Row 0 is decode_step_ms's request; the others are padding, as `run` pads.
            graphs._device_vectors[:, 1:].copy_(torch.tensor(graphs._padding[:, 1:n]))
            graphs.block_table[1:].fill_(graphs.scratch_block)
            captured[name] = graphs
    finally:
        runner.model.set_small_batch_fusion(SMALL_BATCH_FUSIONS)
        triton_pdl.set_enabled(None)
        runner.graphs = engine_graphs
    # The engine's own graphs (captured at start-up, the defaults) among the fresh captures.
    captured["engine"] = engine_graphs
    samples: dict = {name: {s: [] for s in sizes} for name in captured}
    for _ in range(5):
        for size in sizes:
            for name in captured:
                replay = captured[name]._graphs[size].replay
                samples[name][size].append(cuda_time(replay, repeat=20) * 1e3)
    timings = {name: {s: statistics.median(v) for s, v in by_size.items()}
               for name, by_size in samples.items()}
    report["decode_graph_ms_by_variant"] = timings
    logits = {}
    repeatable = True
    for variant in {name for pair in SAME_LOGITS for name in pair}:
        for size in sizes:
            captured[variant]._graphs[size].replay()
            logits[variant, size] = captured[variant]._logits[size].float().clone()
            for _ in range(5):
                captured[variant]._graphs[size].replay()
                repeatable &= torch.equal(logits[variant, size],
                                          captured[variant]._logits[size].float())
    report["decode_logits_repeatable"] = repeatable
    print("decode logits repeatable:", repeatable, flush=True)
    identical = {f"{a} = {b}": all(torch.equal(logits[a, s], logits[b, s]) for s in sizes)
                 for a, b in SAME_LOGITS}
    report["decode_logits_identical"] = identical
    print("decode logits identical:", identical, flush=True)
    for name, by_size in timings.items():
        print(f"decode graph ms {name:12}", {s: round(t, 4) for s, t in by_size.items()},
              flush=True)


def tier_load_ms(report: dict, repeats: int = 5) -> None:
    """Load a 16,384-token prefix from the cpu tier: time of the transfer itself, the median
    of `repeats` loads (one load varied by ~5% from call to call)."""
    from kvtier import LLM, SamplingParams
    llm = LLM(MODEL, kv_tiers=("cpu:16GiB",), num_gpu_blocks_override=2048, max_num_seqs=8,
              max_num_batched_tokens=8192, kv_store_policy="write-through")
    rng = random.Random(3)
    doc = [rng.randrange(1000, 100_000) for _ in range(16_384)]
    params = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([doc + [5]], params)
    llm.engine.tiers.wait_idle()
    stats = llm.engine.tiers.stats
    loads, copies, ttfts, hits = [], [], [], []
    for i in range(repeats):
        llm.engine.reset_prefix_cache()
        before = (stats.load_seconds, stats.load_copy_seconds, stats.num_loads)
        out = llm.generate([doc + [6 + i]], params)[0]
        # The copy's CUDA events are read when the engine next polls its transfers; generate
        # returned at the first token, so drain them before reading the load's timing.
        llm.engine.tiers.wait_idle()
        count = max(stats.num_loads - before[2], 1)
        loads.append((stats.load_seconds - before[0]) / count * 1e3)
        copies.append((stats.load_copy_seconds - before[1]) / count * 1e3)
        ttfts.append((out.metrics.time_to_first_token or 0) * 1e3)
        hits.append(out.metrics.num_tier_hit_tokens.get("cpu", 0))
    report["tier_load_hit_tokens"] = min(hits)
    report["tier_load_ms"] = statistics.median(loads)
    report["tier_load_copy_ms"] = statistics.median(copies)
    report["tier_load_copy_ms_each"] = [round(c, 3) for c in copies]
    report["tier_load_ttft_ms"] = statistics.median(ttfts)
    report["tier_load_bytes"] = report["tier_load_hit_tokens"] * 28_672
    report["tier_load_floor_ms"] = report["tier_load_bytes"] / (
        report["pinned_h2d_gbs"] * 1e9) * 1e3
    llm.engine.shutdown()


def hf_numbers(llm, report: dict) -> None:  # noqa: ANN001
    hf = hf_model(llm.engine.spec, llm.engine.source)
    ids = torch.randint(1000, 100_000, (1, 8192), device="cuda")
    with torch.no_grad():
        report["hf_prefill_8192_ms"] = cuda_time(lambda: hf(ids, logits_to_keep=1),
                                                 repeat=3, warmup=1) * 1e3
    for batch in (1, 32):
        prompt = torch.randint(1000, 100_000, (batch, 512), device="cuda")
        torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.no_grad():
            out = hf.generate(prompt, max_new_tokens=128, min_new_tokens=128, do_sample=False)
        torch.cuda.synchronize()
        report[f"hf_tok_s_{batch}"] = (out.shape[1] - 512) * batch / (
            time.perf_counter() - started)
    # The HF model goes with this frame; main() empties the CUDA cache afterwards.


def greedy_tiers_identical(report: dict, model: str = MODEL, prefix_len: int = 2048,
                           vocab: int = 100_000, **engine_args: object) -> None:
    from kvtier import LLM, SamplingParams
    rng = random.Random(9)
    prefixes = [[rng.randrange(1000, vocab) for _ in range(prefix_len)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(1000, vocab) for _ in range(64)]
               for i in range(12)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    results = {}
    for name, extra in (("off", {}), ("cpu", {"kv_tiers": ("cpu:4GiB",)})):
        llm = LLM(model, num_gpu_blocks_override=384, max_num_batched_tokens=2048,
                  max_num_seqs=16, **extra, **engine_args)
        results[name] = [llm.generate([p], params)[0].outputs[0].token_ids for p in prompts]
        # Then all at once: prefixes computed (and stored) in other step shapes than one by
        # one (the twenty-fifth session found the tier's tokens differ here; see
        # greedy_async_check_gpu.py).
        results[name + " batched"] = [o.outputs[0].token_ids
                                      for o in llm.generate(prompts, params)]
        if llm.engine.tiers:
            report["greedy_check_cpu_hit_tokens"] = llm.engine.tiers.stats.hit_tokens["cpu"]
            llm.engine.shutdown()
        del llm
        torch.cuda.empty_cache()
    report["greedy_identical_tiers_on_off"] = results["off"] == results["cpu"]
    report["greedy_identical_tiers_on_off_batched"] = (results["off batched"]
                                                        == results["cpu batched"])
    # Tier-off against itself, batched and one by one: kernels' batch variance, no tier.
    report["greedy_off_batched_equals_one_by_one"] = results["off batched"] == results["off"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--model", default=MODEL, help="a random:<architecture> to check")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--only-tier-load", action="store_true",
                        help="floors and the 16,384-token cpu-tier load only")
    parser.add_argument("--only-decode", action="store_true",
                        help="floors, the batch-1 decode step and the fused/unfused graph A/B")
    parser.add_argument("--batch-invariant", action="store_true",
                        help="the engines run batch-invariant: its logits against HF, its "
                             "speeds, and greedy tokens batched and one by one, tiers on and "
                             "off (no fusion A/B, no tier-load timing: neither changes)")
    args = parser.parse_args()
    engine_args = {"batch_invariant": True} if args.batch_invariant else {}
    from kvtier import LLM

    report: dict = {"card": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                             capture_output=True, text=True).stdout.strip()}
    print("card:", report["card"], flush=True)
    report.update(floors())
    print(json.dumps(report, indent=1), flush=True)
    if args.only_tier_load:
        tier_load_ms(report)
        write_report(report, args.out)
        return

    report["model"] = args.model
    llm = LLM(args.model, max_num_batched_tokens=8192, max_num_seqs=256,
              gpu_memory_utilization=0.85, **engine_args)
    report["attention_backend"] = llm.engine.runner.backend.name
    report["batch_invariant"] = args.batch_invariant
    if not args.only_decode:
        check_logits(llm, report)
    spec = llm.engine.spec
    flops_per_token = 2 * (spec.num_parameters - spec.vocab_size * spec.hidden_size)
    attn_flops = 4 * spec.num_hidden_layers * spec.num_attention_heads * spec.head_dim \
        * 8192 * 8192 / 2
    if not args.only_decode:
        time_step(llm, 8192)
        report["prefill_8192_ms"] = min(time_step(llm, 8192) for _ in range(3)) * 1e3
    report["prefill_floor_ms"] = (flops_per_token * 8192 + attn_flops) / (
        report["matmul_tflops_8192"] * 1e12) * 1e3
    report["decode_b1_step_ms"] = decode_step_ms(llm, 1)
    graphs = llm.engine.runner.graphs
    if graphs is not None:  # the GPU work of a batch-1 decode step alone (graph replay)
        # Sustained: right after the engine's steps the first replays ran ~0.1 ms slower than
        # the same graph among others (2026-11-28 call 8), so warm up for ~0.3 s first.
        report["decode_b1_graph_ms"] = cuda_time(graphs._graphs[1].replay, repeat=50,
                                                 warmup=200) * 1e3
    weight_bytes = spec.num_parameters * 2
    # A copy moves each byte twice; its rate is the memory's total (read + write) bandwidth,
    # which a pure read stream of the weights can use whole.
    report["decode_b1_floor_ms"] = weight_bytes / (report["device_copy_gbs_rw"] * 1e9) * 1e3
    if graphs is not None and not args.batch_invariant:
        decode_fusion_ab(llm, report)
    if args.only_decode:
        write_report(report, args.out)
        return
    report["tok_s_32"] = decode_tok_s(llm, 32)
    report["tok_s_256"] = decode_tok_s(llm, 256)
    print(json.dumps(report, indent=1), flush=True)
    if not args.skip_hf:
        hf_numbers(llm, report)
        torch.cuda.empty_cache()
        report["speedup_vs_hf_32"] = report["tok_s_32"] / report["hf_tok_s_32"]
    del llm
    torch.cuda.empty_cache()
    if not args.batch_invariant and args.model == MODEL:
        tier_load_ms(report)
    greedy_tiers_identical(report, args.model, **engine_args)
    write_report(report, args.out)


def write_report(report: dict, path: str) -> None:
    Path(path).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1), flush=True)


if __name__ == "__main__":
    main()
