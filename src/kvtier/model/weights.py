"""A resolved model's weights as tensors: read from its safetensors files, or drawn at random
(`random:<architecture>`). Apart from `loader`, which resolves a model without torch: an API
server's front end resolves the model for its tokenizer only, and importing torch cost it
~2.5 s of its start on a 2-core box."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from kvtier.model.spec import ModelLoadError, ModelSpec, expected_weight_shapes

RANDOM_STD = 0.02


def checkpoint_weights(spec: ModelSpec, files: tuple[Path, ...], device: torch.device,
                        dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    wanted = expected_weight_shapes(spec)
    # Loading straight onto the GPU skips a host copy; safetensors accepts "cuda:N" strings.
    load_device = str(device) if device.type == "cuda" else "cpu"
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device=load_device) as f:
                for name in f.keys():  # noqa: SIM118 -- safe_open is not a dict
                    if name in wanted:
                        yield name, f.get_tensor(name).to(device=device, dtype=dtype)
        except ModelLoadError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError
            raise ModelLoadError(f"{file}: cannot read weights: {exc}") from exc


def random_weights(spec: ModelSpec, seed: int, device: torch.device,
                    dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """N(0, 0.02) matrices, ones for norm weights, zeros for biases (HF's initialisation).

    Each tensor gets its own generator seeded from (seed, name), so one tensor's values do not
    depend on which others were generated; they are drawn in float32, then cast.
    """
    for name, shape in expected_weight_shapes(spec).items():
        if name.endswith(".bias"):
            yield name, torch.zeros(shape, device=device, dtype=dtype)
        elif "norm" in name:
            yield name, torch.ones(shape, device=device, dtype=dtype)
        else:
            generator = torch.Generator(device=device)
            generator.manual_seed(_tensor_seed(seed, name))
            values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)
            yield name, values.mul_(RANDOM_STD).to(dtype)


def _tensor_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1
