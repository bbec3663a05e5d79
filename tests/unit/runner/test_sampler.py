"""Sampling filters keep a valid distribution for every value validation lets through."""

from __future__ import annotations

import pytest
import torch

from kvtier.runner.sampler import Sampler
from kvtier.types import SamplingParams


@pytest.mark.parametrize("top_p", [5e-324, 1e-300, 1e-46, 1e-45, 1e-6])
def test_a_vanishing_top_p_keeps_the_most_likely_token(top_p: float) -> None:
    """A top_p that rounds to 0 in float32 used to drop every token: multinomial then failed
    the whole engine step, and every request in it. Now the nucleus is the top token alone;
    a row sampled beside it (another request) is unaffected."""
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.5], [3.0, 0.0, 0.0, 0.0]])
    params = [SamplingParams(temperature=1.0, top_p=top_p, seed=1),
              SamplingParams(temperature=0.0)]
    tokens = Sampler(torch.device("cpu"), seed=0).sample_async(logits, ["a", "b"], params)
    assert tokens.tolist() == [1, 0]
