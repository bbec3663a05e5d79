"""Engine arguments as CLI flags: one definition shared by `generate`, `serve` and the lab.

Flag names are the config field names with dashes (vLLM's names where vLLM has the knob), so
`LLM(enable_prefix_caching=False)` and `--no-enable-prefix-caching` mean the same thing.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from kvtier.config import DTYPES, LOAD_TIMINGS, SCHEDULING_POLICIES, STORE_POLICIES


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="HF directory, .gguf file or random:<architecture>; default: the "
                        "embedded SmolLM2-135M-Instruct")
    g.add_argument("--dtype", choices=DTYPES, default="auto")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--max-logprobs", type=int, default=20,
                   help="most logprobs (top tokens per output token) a request may ask for; "
                        "-1: the vocabulary size")
    g.add_argument("--generation-config", default="auto", metavar="auto|vllm|FOLDER",
                   help="default sampling of requests that set none: auto, the model's "
                        "generation_config.json (as vLLM); vllm, the API's defaults; or a "
                        "folder's generation_config.json")
    g.add_argument("--override-generation-config", type=_json_object, default=None,
                   metavar="JSON", help="sampling defaults over the generation config's, e.g. "
                   "'{\"temperature\": 0.5}'")
    g.add_argument("--attention-backend", default="auto", choices=("auto", "torch", "triton"))
    g.add_argument("--enforce-eager", action="store_true",
                   help="never capture CUDA graphs")
    g.add_argument("--max-cudagraph-capture-size", type=int, default=1024,
                   help="largest step (tokens) with prefill chunks run as piecewise CUDA "
                        "graphs around attention; 0: such steps run eagerly")
    g.add_argument("--overlap-outputs", action="store_true",
                   help="server: build and send a step's outputs while the device runs the "
                        "next step")
    g.add_argument("--async-scheduling", action=argparse.BooleanOptionalAction, default=None,
                   help="schedule and launch the next step before reading this step's "
                        "tokens (vLLM's flag), overlapping host work with the device "
                        "(default: on with CUDA unless --overlap-outputs, off on the CPU)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="compute each request the same way whatever it is batched with, so "
                        "greedy output is reproducible bit for bit (slower kernels; on "
                        "CUDA with the triton backend)")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=True)
    g.add_argument("--kv-cache-memory-bytes", default=None,
                   help="device KV pool size, e.g. 4GiB (default: from "
                        "--gpu-memory-utilization on CUDA, 2GiB on the CPU)")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    g.add_argument("--num-gpu-blocks-override", type=int, default=None,
                   help="exact number of device KV blocks (to create pressure on purpose)")
    g.add_argument("--max-num-batched-tokens", type=int, default=2048)
    g.add_argument("--max-num-seqs", type=int, default=None,
                   help="most requests running at once (default 256, or "
                        "--max-num-batched-tokens when smaller; must not exceed it)")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="most prompt tokens one request prefills per step (0: the step budget)")
    g.add_argument("--short-prefill-first-tokens", type=int, default=0,
                   help="hold a waiting request with more prompt tokens than this left to "
                   "compute for one prefill step when the step prefills one with at most this "
                   "many (cache hits first; 0: off)")
    g.add_argument("--scheduling-policy", choices=SCHEDULING_POLICIES, default="fcfs",
                   help="fcfs, or lpm: longest device-cache prefix match first (with aging)")
    t = parser.add_argument_group("kv tiers")
    t.add_argument("--kv-tier", dest="kv_tiers", action="append", default=None,
                   metavar="SPEC", help="cpu:SIZE | disk:PATH:SIZE | redis:URL:SIZE, optionally "
                   ":lru or :s3fifo; repeat in tier order (e.g. --kv-tier cpu:8GiB "
                   "--kv-tier disk:/var/kv:100GiB)")
    t.add_argument("--kv-tier-chunk-tokens", type=int, default=256)
    t.add_argument("--kv-store-policy", choices=STORE_POLICIES, default="lazy")
    t.add_argument("--kv-store-min-hits", type=_min_hits, default="auto", metavar="N|auto",
                   help="store a chunk once this many requests contained it; auto: 1 while the "
                   "workload reuses prefixes, 2 while it does not")
    t.add_argument("--kv-load-timing", choices=LOAD_TIMINGS, default="same-step",
                   help="CUDA + cpu tier: run a hit's prefill in the step that starts its copy "
                   "(the forward waits for the copy on the device), or in the step after the "
                   "copy is seen done")


ENGINE_ARG_NAMES = (
    "model", "dtype", "seed", "device", "max_logprobs", "generation_config",
    "override_generation_config", "attention_backend", "enforce_eager",
    "max_cudagraph_capture_size", "overlap_outputs", "async_scheduling", "batch_invariant",
    "block_size",
    "enable_prefix_caching", "kv_cache_memory_bytes", "gpu_memory_utilization",
    "num_gpu_blocks_override", "max_num_batched_tokens", "max_num_seqs", "max_model_len",
    "long_prefill_token_threshold", "short_prefill_first_tokens", "scheduling_policy",
    "kv_tiers", "kv_tier_chunk_tokens", "kv_store_policy", "kv_store_min_hits",
    "kv_load_timing",
)


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs = {name: getattr(args, name) for name in ENGINE_ARG_NAMES}
    kwargs["kv_tiers"] = tuple(kwargs["kv_tiers"] or ())
    return kwargs


def _json_object(text: str) -> dict[str, Any]:
    """`--override-generation-config`: a JSON object."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value


def _min_hits(text: str) -> int | str:
    """`--kv-store-min-hits`: `auto` or a positive integer."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'auto' or an integer >= 1")
    return value
