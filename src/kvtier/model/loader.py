"""Resolve a `--model` value to weights, a spec and a tokenizer: the only place that reads them.

    --model value         what happens
    (none)                the embedded SmolLM2-135M-Instruct GGUF, converted once into the cache
    path/to/dir           an HF directory: config.json, *.safetensors (sharded or not), tokenizer
    path/to/file.gguf     converted once into cache_dir()/gguf/<stem>-<digest>/, then as a dir
    random:<arch>         a real architecture (see architectures.py) with seeded random weights

Problems are found when resolving, not halfway through loading: missing files, unknown
architectures, unsupported model types, truncated or corrupt safetensors/GGUF files, and weights
of a dtype kvtier cannot load all raise `ModelLoadError` naming the path and the problem.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from kvtier.model.architectures import (
    embedded_gguf_path,
    get_architecture,
    load_architecture_tokenizer,
)
from kvtier.model.gguf_convert import ensure_converted
from kvtier.model.spec import ModelLoadError, ModelSpec, expected_weight_shapes
from kvtier.model.tokenizer import Tokenizer
from kvtier.utils.resources import kvtier_cache_dir as cache_dir

if TYPE_CHECKING:  # `weights` imports torch when weights are read, which a front end never does
    import torch

__all__ = ["ModelSource", "cache_dir", "embedded_gguf_path", "expected_weight_shapes",
           "resolve_model"]

RANDOM_PREFIX = "random:"
EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_MAX_SAFETENSORS_HEADER_BYTES = 100 << 20
_LOADABLE_SAFETENSORS_DTYPES = ("BF16", "F16", "F32", "F64")
"""Float dtypes whose values cast to the model's dtype as they are. Integers, bools and FP8
cast too, silently, into wrong weights: quantised checkpoints need scales kvtier never applies."""
_QUANT_SUFFIX = re.compile(r"[.-](?:I?Q\d\w*|F16|BF16|F32)$", re.IGNORECASE)


@dataclass
class ModelSource:
    """A resolved model: identity, shape, tokenizer, and a way to stream its weights."""

    model_id: str
    """Stable identity for KV-cache hashes: name + digest of config and weight files (+ seed)."""
    name: str
    """What /v1/models reports."""
    spec: ModelSpec
    tokenizer: Tokenizer
    path: Path | None
    """The HF directory the weights are read from (the cache entry for a GGUF); None if random."""
    weight_files: tuple[Path, ...] = ()
    seed: int = 0
    """Seed of random weights (unused for checkpoints)."""

    def iter_weights(self, device: torch.device,
                     dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF parameter name, tensor on `device` in `dtype`), one tensor at a time.

        Tied models yield no `lm_head.weight`; tensors HF does not keep as parameters (rotary
        caches) are skipped. Random weights are generated on `device` itself, so an 8B model can
        be built on a GPU without staging it in host memory; values depend on (seed, name, device
        type), not on the order of iteration.
        """
        from kvtier.model.weights import checkpoint_weights, random_weights  # torch

        if self.path is None:
            yield from random_weights(self.spec, self.seed, device, dtype)
        else:
            yield from checkpoint_weights(self.spec, self.weight_files, device, dtype)


def resolve_model(model: str | None, *, seed: int = 0) -> ModelSource:
    """Turn a --model value into a ModelSource (see the module docstring for the forms)."""
    if model is None:
        return _from_gguf(embedded_gguf_path(), name=EMBEDDED_MODEL_NAME)
    if model.startswith(RANDOM_PREFIX):
        return _from_random(model[len(RANDOM_PREFIX):], seed)
    if not model.strip():
        raise ModelLoadError(f"model {model!r} is empty (give an HF model directory, a .gguf "
                             f"file, or {RANDOM_PREFIX}<architecture>)")
    try:
        path = Path(model).expanduser()
    except RuntimeError:  # ~name of a user this machine does not have
        path = Path(model)
    if not path.exists():
        raise ModelLoadError(f"{model}: no such file or directory (give an HF model directory, "
                             f"a .gguf file, or {RANDOM_PREFIX}<architecture>)")
    if path.is_dir():
        return _from_dir(path, name=path.resolve().name)
    if path.suffix.lower() == ".gguf":
        return _from_gguf(path, name=_QUANT_SUFFIX.sub("", path.stem))
    raise ModelLoadError(f"{model}: expected an HF model directory or a .gguf file")


# -- sources ------------------------------------------------------------------------------------

def _from_gguf(path: Path, name: str) -> ModelSource:
    # A truncated or altered file has another size/digest, so it never hits a stale cache entry.
    return _from_dir(ensure_converted(path, cache_dir()), name=name)


def _from_dir(path: Path, name: str) -> ModelSource:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{path}: not a model directory (no config.json)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelLoadError(f"{config_file}: not valid JSON: {exc}") from exc
    try:
        spec = ModelSpec.from_hf_config(config)
    except ModelLoadError as exc:
        raise ModelLoadError(f"{config_file}: {exc}") from None
    files = _weight_files(path)
    _check_weights(spec, files)
    tokenizer = Tokenizer.from_dir(path, extra_eos_token_ids=spec.eos_token_ids)
    _warn_if_tokenizer_too_big(tokenizer, spec, path)
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for file in files:
        size = file.stat().st_size
        digest.update(f"{file.name}:{size};".encode())
        _sample_contents(file, size, digest)
    return ModelSource(model_id=f"{name}@{digest.hexdigest()[:16]}", name=name, spec=spec,
                       tokenizer=tokenizer, path=path, weight_files=tuple(files))


WEIGHT_SAMPLES = 32
"""Evenly spaced pieces of each weight file that go into the model id, first and last
included: the id names the weights' contents, not their directory, so two checkpoints of
one shape never share KV in a tier (block hashes and the disk namespace derive from it),
while copies of one checkpoint in other places do."""
WEIGHT_SAMPLE_BYTES = 64 * 1024


def _sample_contents(file: Path, size: int, digest: hashlib._Hash) -> None:
    """Feed WEIGHT_SAMPLES pieces of the file (`size` bytes) into digest: ~2 MB read however
    big it is."""
    with file.open("rb") as f:
        for i in range(WEIGHT_SAMPLES):
            f.seek(max(0, size - WEIGHT_SAMPLE_BYTES) * i // (WEIGHT_SAMPLES - 1))
            digest.update(f.read(WEIGHT_SAMPLE_BYTES))


def _from_random(arch_name: str, seed: int) -> ModelSource:
    arch = get_architecture(arch_name)
    spec = arch.spec
    tokenizer = load_architecture_tokenizer(arch, cache_dir())
    digest = hashlib.sha256(json.dumps(dict(arch.config), sort_keys=True).encode()).hexdigest()
    name = f"{RANDOM_PREFIX}{arch.name}"
    return ModelSource(model_id=f"{name}@seed{seed}-{digest[:16]}", name=name, spec=spec,
                       tokenizer=tokenizer, path=None, seed=seed)


def _warn_if_tokenizer_too_big(tokenizer: Tokenizer, spec: ModelSpec, path: Path) -> None:
    if tokenizer.vocab_size > spec.vocab_size:
        warnings.warn(f"{path}: the tokenizer has {tokenizer.vocab_size} ids but the model "
                      f"only {spec.vocab_size}; prompts using the extra ids will fail",
                      stacklevel=3)


# -- safetensors checkpoints --------------------------------------------------------------------

def _weight_files(path: Path) -> list[Path]:
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index_file}: not a valid safetensors index: {exc}") from exc
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(n, str) for n in weight_map.values())):
            raise ModelLoadError(f"{index_file}: not a valid safetensors index: weight_map must "
                                 f"map tensor names to shard file names, got {weight_map!r:.80}")
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (path / name).is_file()]
        if missing:
            raise ModelLoadError(f"{path}: shards named in {index_file.name} are missing: "
                                 f"{', '.join(missing)}")
        return [path / name for name in names]
    files = sorted(f for f in path.glob("*.safetensors") if f.is_file())
    if not files:
        others = sorted(p.name for p in path.glob("*.bin")) + sorted(
            p.name for p in path.glob("*.pt"))
        hint = f" (found {', '.join(others)}; only safetensors is supported)" if others else ""
        raise ModelLoadError(f"{path}: no *.safetensors weights{hint}")
    return files


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{name: (dtype, shape)} from a safetensors header, checking the file is long enough.

    A download cut short leaves a valid header over missing data; comparing the largest data
    offset with the file size catches that without reading the tensors.
    """
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelLoadError(f"{file}: truncated safetensors file ({size} bytes)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_SAFETENSORS_HEADER_BYTES or 8 + header_len > size:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors header")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise ModelLoadError(f"{file}: corrupt safetensors header: {exc}") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{file}: corrupt safetensors header: not a JSON object")
    header.pop("__metadata__", None)
    for name, t in header.items():
        if not (isinstance(t, dict) and isinstance(t.get("dtype"), str)
                and _int_list(t.get("shape")) and _int_list(t.get("data_offsets"), 2)):
            raise ModelLoadError(f"{file}: corrupt safetensors header: tensor {name!r} needs "
                                 f"a dtype, a shape and two data_offsets, got {t!r:.120}")
    data_end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + header_len + data_end > size:
        raise ModelLoadError(f"{file}: truncated safetensors file: data ends at byte "
                             f"{8 + header_len + data_end} but the file has {size}")
    return {name: (t["dtype"], tuple(t["shape"])) for name, t in header.items()}


def _int_list(value: object, length: int | None = None) -> bool:
    """A JSON list of integers >= 0 (of `length` items if given)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_weights(spec: ModelSpec, files: list[Path]) -> None:
    wanted = expected_weight_shapes(spec)
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        header = read_safetensors_header(file)
        _check_dtypes(file, header, wanted)
        found.update({name: shape for name, (_, shape) in header.items()})
    for name, shape in wanted.items():
        if name not in found:
            raise ModelLoadError(f"{files[0].parent}: weight {name} is missing")
        if tuple(found[name]) != shape:
            raise ModelLoadError(f"{files[0].parent}: weight {name} has shape "
                                 f"{tuple(found[name])}, config.json implies {shape}")


def _check_dtypes(file: Path, header: dict[str, tuple[str, tuple[int, ...]]],
                  wanted: dict[str, tuple[int, ...]]) -> None:
    """Refuse a weight the model uses whose dtype is not a plain float. Tensors it skips may be
    anything (some checkpoints keep int64 buffers)."""
    for name, (dtype, _) in header.items():
        if name in wanted and dtype not in _LOADABLE_SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{file}: tensor {name!r} has dtype {dtype:.20}, which kvtier "
                                 f"cannot load (supported: "
                                 f"{', '.join(_LOADABLE_SAFETENSORS_DTYPES)})")
