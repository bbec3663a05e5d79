"""Tags a model writes into its text (`<tool_call>`, `</think>`), read from a stream."""

from __future__ import annotations


def partial_tag_length(text: str, tag: str) -> int:
    """Length of the longest end of `text` that begins `tag`: a stream holds it back, as the
    next text may complete the tag."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0
