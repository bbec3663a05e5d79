"""Which ways of calling the CPU's GEMM give each row the same bits whatever batch it is in
(`layers.invariant_linear`'s question), on this host: prints, per strategy, dtype and
SmolLM2 projection shape, the (rows, offset) batches whose rows differ from the full batch's.

    python scripts/probe_cpu_gemm_invariance.py [--threads N ...]
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

SHAPES = [(1728, 576), (576, 1536), (960, 576), (49152, 576)]
BATCHES = [(1, 0), (1, 77), (3, 5), (7, 40), (9, 3), (35, 30), (64, 1), (200, 99)]


def padded_calls(rows_per_call: int, one_call: bool):
    def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        padded = F.pad(x, (0, 0, 0, -rows % rows_per_call))
        if one_call:
            return F.linear(padded, w, b)[:rows]
        return torch.cat([F.linear(c, w, b) for c in padded.split(rows_per_call)])[:rows]
    return linear


STRATEGIES = {"pad8-one-call": padded_calls(8, True), "calls-of-8": padded_calls(8, False),
              "calls-of-16": padded_calls(16, False), "calls-of-32": padded_calls(32, False),
              "calls-of-64": padded_calls(64, False)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, nargs="*", default=[torch.get_num_threads()])
    args = parser.parse_args()
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), platform.processor())
    print("cpu", cpu, "| torch", torch.__version__, "| default threads",
          torch.get_num_threads())
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            for n, k in SHAPES:
                torch.manual_seed(0)
                x = torch.randn(300, k).to(dtype)
                w = (torch.randn(n, k) / 24).to(dtype)
                b = torch.randn(n).to(dtype)
                for name, linear in STRATEGIES.items():
                    full = linear(x, w, b)
                    bad = [(c, o) for c, o in BATCHES
                           if not torch.equal(linear(x[o:o + c], w, b), full[o:o + c])]
                    print(f"threads {threads} {str(dtype)[6:]:8} {n}x{k} {name:14} "
                          f"{bad or 'ok'}")


if __name__ == "__main__":
    main()
