"""An argument the engine refuses at start-up (a model the loader cannot read, a
--max-model-len past the model's positions) ends `kvtier serve` with one line and exit 2,
whatever the number of API servers: no traceback from the engine process, no supervisor
lines. Before, the engine process logged its traceback, and with --api-server-count 2 the
server exited 1 after "an API server failed to start; see its log above" and "stopped"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def _serve(*flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvtier.cli", "serve", "--device", "cpu",
                           "--port", "0", *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_max_model_len_past_the_models_positions_is_one_line(count: str) -> None:
    done = _serve("--model", "random:tiny-llama", "--max-model-len", "99999",
                  "--api-server-count", count)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        "kvtier serve: error: max_model_len 99999 is more than the model's "
        "max_position_embeddings 2048"]


@pytest.mark.parametrize("count", ["1", "2"])
def test_a_model_directory_without_config_is_one_line(tmp_path: Path, count: str) -> None:
    done = _serve("--model", str(tmp_path), "--api-server-count", count)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [
        f"kvtier serve: error: {tmp_path}: not a model directory (no config.json)"]
