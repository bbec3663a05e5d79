"""Where the engine runs and how much KV it can hold: device, dtype, number of KV blocks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.config import CacheConfig, ConfigError, ModelConfig
from kvtier.model.spec import ModelSpec
from kvtier.runner.logprobs import (
    PROMPT_ROWS_PER_SLICE,
    PROMPT_SLICE_BYTES_PER_ENTRY,
    step_logprobs,
)
from kvtier.runner.sampler import Sampler
from kvtier.types import SamplingParams

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_CPU_KV_BYTES = 2 * 1024**3


def resolve_device(config: ModelConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(config.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device!r} asked for, but CUDA is not available")
    if device.type == "cuda" and device.index is not None:
        count = torch.cuda.device_count()
        if device.index >= count:  # else CUDA's "invalid device ordinal" on first use
            raise ConfigError(f"device {config.device!r}: this machine has {count} CUDA "
                              f"device(s), cuda:0..cuda:{count - 1}")
    return device


def resolve_dtype(config: ModelConfig, spec: ModelSpec, device: torch.device) -> torch.dtype:
    """auto: the checkpoint's half dtype on CUDA (bfloat16 if it declares float32), float32 on
    the CPU (HF's logits to float32 rounding; vLLM's CPU default, bfloat16, is faster on CPUs
    with AVX512-BF16 but not on those without)."""
    if config.dtype != "auto":
        return _DTYPES[config.dtype]
    if device.type != "cuda":
        return torch.float32
    return torch.float16 if spec.torch_dtype == "float16" else torch.bfloat16


@dataclass(frozen=True)
class KVPlan:
    num_blocks: int
    block_bytes: int
    """Bytes of one block across all layers, K and V."""


def profile_activation_bytes(model: torch.nn.Module, backend: object, device: torch.device,
                             dtype: torch.dtype, num_tokens: int, block_size: int,
                             max_batch: int, vocab_size: int, max_logprobs: int = 0,
                             max_context: int = 0) -> int:
    """Peak CUDA memory of the largest step (a dummy prefill of `num_tokens`) beyond the
    weights, plus room for a full decode batch's logits, sampling and logprobs (up to
    `max_logprobs` top tokens a row). The dummy's block table is as wide as `max_context`
    tokens (its entries repeat the profile's blocks; the prefill reads only its own): the
    batch-invariant attention lays out KV splits for the table's width, so a step of
    `num_tokens` among long contexts allocates more than one among short ones."""
    from kvtier.runner.model_runner import ModelRunner
    from kvtier.types import SamplingParams, ScheduledRequest, SchedulerOutput

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    num_blocks = -(-num_tokens // block_size)
    runner = ModelRunner(model, backend, num_blocks, block_size, device, dtype,  # type: ignore
                         seed=0)
    kv_bytes = runner.kv_cache_bytes
    table = [i % num_blocks for i in range(-(-max(max_context, num_tokens) // block_size))]
    step = SchedulerOutput([ScheduledRequest("profile", [0] * num_tokens, 0, table, True,
                                             SamplingParams(max_tokens=1), 0)], num_tokens)
    runner.execute(step)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base - kv_bytes
    del runner
    torch.cuda.empty_cache()
    top_k = min(max(max_logprobs, 0), vocab_size)
    # A full decode batch's logits and sampling (measured), or a slice of prompt logprobs if
    # larger; then the top k of every scored row (values and ids).
    sampling = max(_sampling_peak_bytes(device, max_batch, vocab_size, top_k),
                   PROMPT_ROWS_PER_SLICE * vocab_size * PROMPT_SLICE_BYTES_PER_ENTRY)
    return peak + sampling + max(max_batch, PROMPT_ROWS_PER_SLICE) * (1 + top_k) * (4 + 8)


def _sampling_peak_bytes(device: torch.device, max_batch: int, vocab_size: int,
                         top_k: int) -> int:
    """Peak CUDA memory of sampling `max_batch` rows of float32 logits on the costliest path:
    every row with logprobs (top_k), a repetition penalty, min-p and a top-p without top-k
    (a full-vocabulary sort of the batch), half of them seeded."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    with torch.inference_mode():
        logits = torch.zeros(max_batch, vocab_size, dtype=torch.float32, device=device)
        params = [SamplingParams(temperature=1.0, top_p=0.9, min_p=0.01,
                                 repetition_penalty=1.1, logprobs=top_k,
                                 seed=row if row % 2 else None) for row in range(max_batch)]
        ids = [f"profile-{row}" for row in range(max_batch)]
        logprobs = step_logprobs(logits, params)
        tokens = Sampler(device, seed=0).sample_async(logits, ids, params,
                                                      [([0], [])] * max_batch)
        if logprobs is not None:
            logprobs.attach(tokens)
        torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del logits, logprobs, tokens
    torch.cuda.empty_cache()
    return peak


def plan_kv_blocks(cache: CacheConfig, spec: ModelSpec, device: torch.device,
                   dtype: torch.dtype, activation_bytes: int) -> KVPlan:
    """Number of device KV blocks: the override, else the memory budget over the block size.

    On CUDA the budget is `gpu_memory_utilization` of the card minus what is already used
    (weights, other processes) and `activation_bytes` for the largest step.
    """
    element = torch.empty(0, dtype=dtype).element_size()
    block_bytes = spec.kv_bytes_per_token(element) * cache.block_size
    if cache.num_gpu_blocks_override is not None:
        _check_fits(f"num_gpu_blocks_override {cache.num_gpu_blocks_override}",
                    cache.num_gpu_blocks_override, block_bytes, device)
        return KVPlan(cache.num_gpu_blocks_override, block_bytes)
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
        _check_fits(f"kv_cache_memory_bytes {budget}", budget // block_bytes, block_bytes,
                    device)
    elif device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        budget = int(total * cache.gpu_memory_utilization) - (total - free) - activation_bytes
    else:
        budget = DEFAULT_CPU_KV_BYTES
    num_blocks = budget // block_bytes
    if num_blocks < 1:
        raise ConfigError(f"no memory left for the KV cache (budget {budget} bytes); raise "
                          "gpu_memory_utilization or kv_cache_memory_bytes")
    return KVPlan(int(num_blocks), block_bytes)


def _check_fits(argument: str, num_blocks: int, block_bytes: int,
                device: torch.device) -> None:
    """Refuse by its `argument` (name and value) a KV pool larger than the device's free
    memory: allocating it would end in an allocator's traceback (or, for billions of blocks,
    hang building the block pool's bookkeeping first)."""
    needed = (num_blocks + 1) * block_bytes  # + the runner's scratch block
    free = available_bytes(device)
    if free is not None and needed > free:
        raise ConfigError(
            f"{argument}: a KV pool of {num_blocks} blocks needs {needed / 1024**3:.1f} GiB, "
            f"more than the {free / 1024**3:.1f} GiB free on {device.type}")


def available_bytes(device: torch.device) -> int | None:
    """Bytes the device can still allocate: CUDA's free memory, the host's MemAvailable
    (None where the host does not say)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
