"""The sampling a model's creator recommends, as defaults for requests (vLLM's
`--generation-config` and `--override-generation-config`).

A model directory's `generation_config.json` often names the sampling its model was tuned for
(Qwen2.5-Instruct: temperature 0.7, top-p 0.8, top-k 20, repetition penalty 1.05). vLLM reads
it by default (`auto`) and a request's unset fields take those values instead of the API's
own defaults; `vllm` ignores the file, and a folder reads that folder's file instead. The
overrides are merged over the file, or used alone with `vllm`. Only the fields vLLM takes are
read; HF's `max_new_tokens` becomes the default (and the cap) of `max_tokens`. `do_sample` is
ignored, as vLLM ignores it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvtier.config import ConfigError
from kvtier.types import InvalidRequestError, SamplingParams

GENERATION_CONFIG_FILE = "generation_config.json"
FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty")
INT_FIELDS = ("top_k", "max_new_tokens")
FIELDS = FLOAT_FIELDS + INT_FIELDS
"""The generation-config fields that become request defaults (HF's names)."""


@dataclass(frozen=True)
class SamplingDefaults:
    """Values for the sampling fields a request leaves unset; None = the API's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None
    """From HF's `max_new_tokens`: the default output length, and a cap on requested ones
    (as vLLM's)."""
    source: str = ""
    """Where they were read (for the start-up log)."""

    def items(self) -> dict[str, float | int]:
        """The fields that are set, by SamplingParams' names."""
        return {f.name: value for f in dataclasses.fields(self)
                if f.name != "source" and (value := getattr(self, f.name)) is not None}

    def sampling_params(self) -> SamplingParams:
        """SamplingParams of these defaults (vLLM's `LLM.get_default_sampling_params()`)."""
        return SamplingParams(**self.items())

    def pick(self, name: str, requested: Any, fallback: Any) -> Any:
        """A request's value for `name`: its own, else this default, else the API's."""
        if requested is not None:
            return requested
        default = getattr(self, name)
        return fallback if default is None else default

    def cap_max_tokens(self, max_tokens: int) -> int:
        return max_tokens if self.max_tokens is None else min(max_tokens, self.max_tokens)


def load_sampling_defaults(mode: str, model_dir: Path | None,
                           overrides: Mapping[str, Any] | None = None) -> SamplingDefaults:
    """Defaults by `mode` ('auto': the model directory's file, if any; 'vllm': none; else a
    folder holding a generation_config.json), with `overrides` merged over them. A bad value
    raises ConfigError naming the file or override and the field."""
    config: dict[str, Any] = {}
    source = "override_generation_config"
    if mode == "auto":
        if model_dir is not None and (model_dir / GENERATION_CONFIG_FILE).is_file():
            source = str(model_dir / GENERATION_CONFIG_FILE)
            config = _read(model_dir / GENERATION_CONFIG_FILE)
    elif mode != "vllm":
        folder = Path(mode).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"generation_config {mode!r} is not 'auto', 'vllm' or a folder "
                              f"holding a {GENERATION_CONFIG_FILE}")
        file = folder / GENERATION_CONFIG_FILE
        if not file.is_file():
            raise ConfigError(f"generation_config {mode!r}: the folder has no "
                              f"{GENERATION_CONFIG_FILE}")
        source, config = str(file), _read(file)
    picked = {name: config[name] for name in FIELDS if config.get(name) is not None}
    origins = dict.fromkeys(picked, source)  # the file's other fields are not sampling
    for name, value in (overrides or {}).items():
        if name not in FIELDS:
            raise ConfigError(f"override_generation_config: {name!r} is not one of "
                              f"{', '.join(FIELDS)}")
        picked[name], origins[name] = value, "override_generation_config"
    for name, value in picked.items():
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if name in INT_FIELDS and not is_int:
            raise ConfigError(f"{origins[name]}: {name} {value!r} must be an integer")
        is_float = isinstance(value, float) and math.isfinite(value)
        if name in FLOAT_FIELDS and not (is_int or is_float):
            raise ConfigError(f"{origins[name]}: {name} {value!r} must be a finite number")
    values = {("max_tokens" if name == "max_new_tokens" else name):
              float(value) if name in FLOAT_FIELDS else value for name, value in picked.items()}
    try:
        SamplingParams(**values)  # the same checks a request's own values get
    except InvalidRequestError as exc:
        field = str(exc).split(" ", 1)[0]
        origin = origins.get("max_new_tokens" if field == "max_tokens" else field, source)
        raise ConfigError(f"{origin}: {exc}") from None
    if overrides and source != "override_generation_config":
        source += " and override_generation_config"
    return SamplingDefaults(**values, source=source)


def _read(file: Path) -> dict[str, Any]:
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{file}: cannot be read as JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{file}: must hold a JSON object, got {type(config).__name__}")
    return config
