"""Integer helpers for block arithmetic."""


def cdiv(a: int, b: int) -> int:
    """Ceiling division for non-negative a and positive b."""
    return -(-a // b)


def round_down(a: int, multiple: int) -> int:
    return a - a % multiple
