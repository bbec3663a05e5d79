"""A/B of the batch-invariant mode's splits on the device: fixed-position KV splits in the
attention and split-K in the matmul's long-K projection (the default), against one KV split
per row and K walked whole (what the mode ran before them). Each variant gets its own engine
(Qwen2.5-1.5B shape, random weights, bf16, `batch_invariant=True`) in this one process:

- prefill of 8,192 tokens (best of three);
- the batch-1 decode graph's replay (512-token context), and decode-only steps of batch 1
  at 512 tokens and of batch 64 at P's 4,352 tokens (engine steps, median);
- output tok/s at batch 32 (512-token prompts, 128 tokens each).

The variants compute different bits by design (other sums); each is batch-invariant on its
own (tests/gpu/test_batch_invariance.py). One variant per process: an engine's memory is not
all handed back when it goes, and the next one's KV pool would be sized from what is left.

    PYTHONPATH=src python3 scripts/invariant_splits_ab.py --variant splits [--split-keys 2048] \
        --out splits.json
    PYTHONPATH=src python3 scripts/invariant_splits_ab.py --variant whole --out whole.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import gpu_check  # noqa: E402

from kvtier.attention import triton_backend  # noqa: E402
from kvtier.model import triton_matmul  # noqa: E402

WHOLE_KEYS = 1 << 20
"""A split length no context reaches: one split per row, as before the fixed splits."""


def use_variant(split_keys: int | None) -> None:
    """Set the split rules the next engine's backend and matmuls are built with (None: no
    KV split, K whole)."""
    triton_matmul.SPLIT_K_MIN_FEATURES = 4096 if split_keys else 1 << 30
    keys = split_keys or WHOLE_KEYS
    init = triton_backend.TritonAttentionBackend.__dict__.get("_ab_original_init")
    if init is None:
        init = triton_backend.TritonAttentionBackend.__init__
        triton_backend.TritonAttentionBackend._ab_original_init = init

    def patched(self, *args, **kwargs) -> None:  # noqa: ANN001, ANN002, ANN003
        kwargs.setdefault("invariant_split_keys", keys)
        init(self, *args, **kwargs)

    triton_backend.TritonAttentionBackend.__init__ = patched


def measure(split_keys: int | None) -> dict:
    from kvtier import LLM
    use_variant(split_keys)
    llm = LLM(gpu_check.MODEL, max_num_batched_tokens=8192, max_num_seqs=256,
              gpu_memory_utilization=0.85, batch_invariant=True)
    backend = llm.engine.runner.backend
    result = {"split_keys": backend.invariant_split_keys,
              "down_split_k": triton_matmul.invariant_tile(1536, 8960).split_k}
    gpu_check.time_step(llm, 8192)
    result["prefill_8192_ms"] = min(gpu_check.time_step(llm, 8192) for _ in range(3)) * 1e3
    result["decode_b1_step_ms"] = gpu_check.decode_step_ms(llm, 1)
    graphs = llm.engine.runner.graphs
    result["decode_b1_graph_ms"] = gpu_check.cuda_time(graphs._graphs[1].replay, repeat=50,
                                                       warmup=200) * 1e3
    result["decode_b64_ctx4352_step_ms"] = gpu_check.decode_step_ms(llm, 64, context=4352)
    result["tok_s_32"] = gpu_check.decode_tok_s(llm, 32)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", choices=["splits", "whole"], required=True)
    parser.add_argument("--split-keys", type=int, default=triton_backend.INVARIANT_SPLIT_KEYS,
                        help="keys per KV split of the splits variant")
    parser.add_argument("--out", default="invariant_splits_ab.json")
    args = parser.parse_args()
    report = {"card": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "variant": args.variant}
    report.update(measure(args.split_keys if args.variant == "splits" else None))
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
