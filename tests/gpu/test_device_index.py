"""`--device cuda:N` past the machine's CUDA devices is refused by name before anything is
loaded. Before, it was taken, and the engine failed at its first allocation with CUDA's
"invalid device ordinal"."""

from __future__ import annotations

import pytest
import torch

from kvtier.config import ConfigError, ModelConfig
from kvtier.runner.memory import resolve_device

pytestmark = pytest.mark.gpu


def test_a_cuda_index_past_the_devices_is_refused_by_name() -> None:
    count = torch.cuda.device_count()
    last = f"cuda:{count - 1}"
    assert resolve_device(ModelConfig(device=last)) == torch.device(last)
    with pytest.raises(ConfigError, match=rf"^device 'cuda:{count}': this machine has {count} "
                                          rf"CUDA device\(s\), cuda:0\.\.cuda:{count - 1}$"):
        resolve_device(ModelConfig(device=f"cuda:{count}"))
