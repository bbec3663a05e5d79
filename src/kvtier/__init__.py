"""kvtier: an LLM serving engine built for KV-cache reuse.

`kvtier.LLM` and `kvtier.SamplingParams` are the offline API; `LLM` is imported lazily so that
`import kvtier` (and the torch-free layers) stays cheap.
"""

from typing import Any

from kvtier.types import InvalidRequestError, RequestOutput, SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "InvalidRequestError", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from kvtier.engine.llm import LLM
        return LLM
    raise AttributeError(f"module 'kvtier' has no attribute {name!r}")
