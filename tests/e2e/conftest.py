"""Fixtures the end-to-end tests share."""

from __future__ import annotations

import pytest

from kvtier.tiers.cost import CostModel


@pytest.fixture
def loads_always_pay(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tier hit is loaded: the checks that take it are about what a load writes, and
    whether one pays is the device's call (on the card the tiny model's recompute beat the
    disk, and a cpu+disk run loaded nothing)."""
    monkeypatch.setattr(CostModel, "recompute_s", lambda self, num_tokens, first_token=0: 1e3)
