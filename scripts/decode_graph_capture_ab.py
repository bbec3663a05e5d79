"""Why does the engine's batch-1 decode graph replay slower than the same forward captured
afresh? (gpu_check, 2026-11-28 call 6 on an H200: 1.71 against 1.59 ms.)

Times the batch-1 (and batch-4) replay of: the engine's graphs (captured at start-up for
batches up to 256, largest first), a fresh capture of the same set, a fresh capture of the
same set smallest first, and a fresh capture for batches up to 4. All replay the same inputs
(a 512-token context), interleaved, five rounds.

    PYTHONPATH=src:scripts python3 scripts/decode_graph_capture_ab.py --out $OUT/capture.json
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
from gpu_check import MODEL, cuda_time, decode_step_ms

from kvtier.runner.cuda_graph import DecodeGraphs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="capture.json")
    args = parser.parse_args()
    from kvtier import LLM

    print("card:", torch.cuda.get_device_name(), flush=True)
    llm = LLM(MODEL, max_num_batched_tokens=8192, max_num_seqs=256,
              gpu_memory_utilization=0.85)
    decode_step_ms(llm, 1)  # leaves the graphs' inputs holding a 512-token decode
    runner = llm.engine.runner
    engine = runner.graphs
    assert engine is not None

    def fresh(max_batch: int, smallest_first: bool) -> DecodeGraphs:
        graphs = DecodeGraphs(runner.model, runner.backend, runner.kv_caches,
                              runner.scratch_block, max_batch, engine.max_blocks,
                              runner.block_size)
        sizes = graphs.sizes
        if smallest_first:  # capture() walks reversed(sizes)
            graphs.sizes = list(reversed(sizes))
        graphs.capture()
        graphs.sizes = sizes
        n = sizes[-1]
        graphs._device_vectors.copy_(engine._device_vectors[:, :n])
        graphs.seq_lens.copy_(engine.seq_lens[:n])
        graphs.block_table.copy_(engine.block_table[:n])
        return graphs

    variants = {"engine (<=256, largest first)": engine,
                "fresh (<=256, largest first)": fresh(256, False),
                "fresh (<=256, smallest first)": fresh(256, True),
                "fresh (<=4)": fresh(4, False)}
    samples: dict = {name: {1: [], 4: []} for name in variants}
    for _ in range(5):
        for name, graphs in variants.items():
            for size in (1, 4):
                samples[name][size].append(
                    cuda_time(graphs._graphs[size].replay, repeat=20) * 1e3)
    result = {name: {size: statistics.median(v) for size, v in by_size.items()}
              for name, by_size in samples.items()}
    for name, by_size in result.items():
        print(f"{name:32} b1 {by_size[1]:.3f} ms  b4 {by_size[4]:.3f} ms", flush=True)
    with open(args.out, "w") as f:
        json.dump({"card": torch.cuda.get_device_name(), "replay_ms": result}, f, indent=1)


if __name__ == "__main__":
    main()
