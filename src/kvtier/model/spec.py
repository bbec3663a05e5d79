"""The shape of a decoder model (Llama family, with the switches Qwen2 and Qwen3 need), read from
HF config.

`ModelSpec` is what the model, the runner (KV layout) and the KV-size arithmetic need; it is built
from a Hugging Face `config.json` dict and can be written back as one (so a converted or random
model is an ordinary HF directory that transformers can load too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM",
                           "Qwen3ForCausalLM")
_ARCHITECTURE_ALIASES = ("LLaMAForCausalLM",)
"""Early HF Llama conversions' spelling, which vLLM's registry accepts too."""
_CONFIG_DTYPES = ("float16", "bfloat16", "float32", "float64", "auto")
"""torch_dtype values a config.json may declare: float types, and "auto" (transformers'
"as saved", which declares nothing). --dtype auto reads it (runner/memory.py)."""


class ModelLoadError(ValueError):
    """A model cannot be loaded; the message names the path or value at fault."""


@dataclass(frozen=True)
class ModelSpec:
    model_type: str
    """HF model_type: llama, qwen2, qwen3 or mistral."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    """q/k/v projections carry a bias (Qwen2); o_proj too, except in Qwen2."""
    rope_scaling: dict[str, Any] | None = None
    """Llama-3 style frequency scaling ({"rope_type": "llama3", ...}) or None."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    """The dtype the checkpoint declares (used by --dtype auto on CUDA)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    """Other config.json keys, kept so to_hf_config round-trips."""

    def __post_init__(self) -> None:
        """Refuse shapes no model can have, whichever reader built the spec (config.json or
        GGUF metadata): the message names the HF config key."""
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelLoadError(f"{key} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelLoadError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2:  # rotary embeddings rotate the two halves of each head
            raise ModelLoadError(f"head_dim must be even, got {self.head_dim}")
        if not 0 <= self.rms_norm_eps < math.inf:
            raise ModelLoadError(f"rms_norm_eps must be a number >= 0, got {self.rms_norm_eps!r}")
        if not 0 < self.rope_theta < math.inf:
            raise ModelLoadError(f"rope_theta must be a positive number, got {self.rope_theta!r}")

    @staticmethod
    def from_hf_config(config: Any) -> ModelSpec:
        """The spec of an HF `config.json` (already parsed); a value that is missing, of the
        wrong type or out of range raises ModelLoadError naming the key (the caller adds the
        file)."""
        if not isinstance(config, dict):
            raise ModelLoadError(f"expected a JSON object, got {type(config).__name__}")
        _check_architectures(config.get("architectures"))
        model_type = config.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            problem = ("model_type is missing" if model_type is None
                       else f"model_type {model_type!r} is not supported")
            raise ModelLoadError(f"{problem} (supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        hidden_act = config.get("hidden_act", "silu")
        if hidden_act not in ("silu", "swish"):  # transformers' ACT2FN: swish is SiLU
            raise ModelLoadError(f"hidden_act {hidden_act!r} is not supported (supported: silu)")
        num_heads = _int(config, "num_attention_heads")
        hidden = _int(config, "hidden_size")
        head_dim = _int(config, "head_dim", default=None)
        if head_dim is None:
            if hidden % num_heads:
                raise ModelLoadError(f"hidden_size {hidden} is not a multiple of "
                                     f"num_attention_heads {num_heads}, and there is no head_dim")
            head_dim = hidden // num_heads
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(_is_int(e) and e >= 0 for e in eos_ids):
            raise ModelLoadError(f"eos_token_id must be a token id or a list of them, "
                                 f"got {eos!r}")
        bos = config.get("bos_token_id")
        if bos is not None and not (_is_int(bos) and bos >= 0):
            raise ModelLoadError(f"bos_token_id must be a token id, got {bos!r}")
        # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope_parameters = config.get("rope_parameters") or {}
        if not isinstance(rope_parameters, dict):
            raise ModelLoadError(f"rope_parameters must be an object, got {rope_parameters!r}")
        rope_theta = config.get("rope_theta", rope_parameters.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling") or rope_parameters or None
        if rope_scaling is not None and not isinstance(rope_scaling, dict):
            raise ModelLoadError(f"rope_scaling must be an object or null, got {rope_scaling!r}")
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) in (
                "default", None):
            rope_scaling = None
        if rope_scaling is not None:
            _check_rope_scaling(rope_scaling)
        # As transformers' modeling code: Llama and Qwen3 read attention_bias (only Llama
        # mlp_bias); Qwen2's q/k/v always carry a bias and Mistral's projections never do,
        # whatever config says.
        if model_type in ("llama", "qwen3"):
            attention_bias = _bool(config, "attention_bias", False)
            if model_type == "llama" and _bool(config, "mlp_bias", False):
                raise ModelLoadError("mlp_bias true is not supported (the MLP projections "
                                     "here have no bias)")
        else:
            attention_bias = model_type == "qwen2"
        return ModelSpec(
            model_type=model_type,
            vocab_size=_int(config, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(config, "intermediate_size"),
            num_hidden_layers=_int(config, "num_hidden_layers"),
            num_attention_heads=num_heads,
            num_key_value_heads=_int(config, "num_key_value_heads", default=num_heads),
            head_dim=head_dim,
            rms_norm_eps=_float(config, "rms_norm_eps", 1e-6),
            rope_theta=_float({"rope_theta": rope_theta}, "rope_theta", 10000.0),
            max_position_embeddings=_int(config, "max_position_embeddings", default=4096),
            tie_word_embeddings=_bool(config, "tie_word_embeddings", False),
            attention_bias=attention_bias,
            rope_scaling=rope_scaling,
            bos_token_id=None if bos is None else int(bos),
            eos_token_ids=tuple(int(e) for e in eos_ids),
            torch_dtype=_torch_dtype(config),
            extra={k: v for k, v in config.items() if k not in _OWN_KEYS},
        )

    def to_hf_config(self) -> dict[str, Any]:
        architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                        "qwen3": "Qwen3ForCausalLM",
                        "mistral": "MistralForCausalLM"}[self.model_type]
        config: dict[str, Any] = dict(self.extra)
        config.update({
            "architectures": [architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": self.torch_dtype,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": (list(self.eos_token_ids) if len(self.eos_token_ids) != 1
                             else self.eos_token_ids[0]),
        })
        if self.model_type != "qwen2":
            config["attention_bias"] = self.attention_bias
        if self.rope_scaling:
            config["rope_scaling"] = dict(self.rope_scaling)
        return config

    @property
    def qk_norm(self) -> bool:
        """Attention normalises each query and key head (RMSNorm over head_dim, before
        rotary): Qwen3's q_norm and k_norm."""
        return self.model_type == "qwen3"

    @property
    def sliding_window(self) -> int | None:
        """The attention window config.json declares, if any layer uses one: Mistral's
        `sliding_window`, Qwen2's or Qwen3's when `use_sliding_window` is on (Qwen2.5's and
        Qwen3's are off)."""
        window = self.extra.get("sliding_window")
        if not (_is_int(window) and window > 0):
            return None
        if self.model_type == "mistral":
            return int(window)
        if self.model_type in ("qwen2", "qwen3") and self.extra.get("use_sliding_window"):
            layer_types = self.extra.get("layer_types")  # transformers 5 writes them out
            if isinstance(layer_types, list):
                return int(window) if "sliding_attention" in layer_types else None
            first = self.extra.get("max_window_layers")  # layers from this one on slide
            return int(window) if not _is_int(first) or first < self.num_hidden_layers else None
        return None

    @property
    def max_context_len(self) -> int:
        """The longest context this engine computes as the model does: the rotary table's
        end, or a sliding window's width (attention here always sees the whole context, which
        equals windowed attention only while the context fits the window; vLLM's
        --disable-sliding-window caps max_model_len the same way)."""
        window = self.sliding_window
        return min(self.max_position_embeddings, window or self.max_position_embeddings)

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """K and V of every layer for one token."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes

    @property
    def num_parameters(self) -> int:
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * f + 2 * h
        if self.attention_bias:  # all but Qwen2's cover o_proj too (`expected_weight_shapes`)
            per_layer += q + 2 * kv + (h if self.model_type != "qwen2" else 0)
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * per_layer + embed + h


def expected_weight_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """Every HF parameter name a checkpoint of `spec` must provide, with its shape."""
    h, f, v, d = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim
    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        layer: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h),
            "mlp.down_proj.weight": (h, f)}
        if spec.attention_bias:
            layer.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                          "self_attn.v_proj.bias": (kv,)})
            if spec.model_type != "qwen2":  # Llama's and Qwen3's cover o_proj too
                layer["self_attn.o_proj.bias"] = (h,)
        if spec.qk_norm:
            layer.update({"self_attn.q_norm.weight": (d,), "self_attn.k_norm.weight": (d,)})
        shapes.update({p + k: s for k, s in layer.items()})
    shapes["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    return shapes


_OWN_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "max_position_embeddings", "tie_word_embeddings", "attention_bias",
    "rope_scaling", "rope_parameters", "bos_token_id", "eos_token_id", "torch_dtype", "dtype",
    "hidden_act",
}


def _check_architectures(architectures: Any) -> None:
    """As vLLM: a config that names architectures needs one of ours among them (a config
    without the key is judged by its model_type alone)."""
    if architectures is None:
        return
    if not (isinstance(architectures, list) and all(isinstance(a, str) for a in architectures)):
        raise ModelLoadError(f"architectures must be a list of class names, "
                             f"got {architectures!r}")
    known = (*SUPPORTED_ARCHITECTURES, *_ARCHITECTURE_ALIASES)
    if architectures and not any(a in known for a in architectures):
        raise ModelLoadError(f"model architectures {architectures} are not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    """Only Llama 3.1's frequency scaling is implemented (layers.RotaryEmbedding); its factors
    must be numbers the formula can use."""
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type != "llama3":
        raise ModelLoadError(f"rope_scaling type {rope_type!r} is not supported (supported: "
                             f"llama3, or none): {scaling!r}")
    values = {"factor": scaling.get("factor"),
              "low_freq_factor": scaling.get("low_freq_factor", 1.0),
              "high_freq_factor": scaling.get("high_freq_factor", 4.0),
              "original_max_position_embeddings": scaling.get(
                  "original_max_position_embeddings", 8192)}
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0 < value < math.inf):
            raise ModelLoadError(f"rope_scaling's {key} must be a positive number, got {value!r}")
    if values["low_freq_factor"] >= values["high_freq_factor"]:
        raise ModelLoadError(f"rope_scaling's low_freq_factor {values['low_freq_factor']} must be "
                             f"below its high_freq_factor {values['high_freq_factor']}")


def _torch_dtype(config: dict[str, Any]) -> str:
    """The dtype the checkpoint declares: transformers 4's torch_dtype, else 5's dtype, else
    HF's default float32. An integer or unknown one is refused, not read as bfloat16."""
    key = "torch_dtype" if config.get("torch_dtype") is not None else "dtype"
    value = config.get(key)
    if value is None:
        return "float32"
    if value not in _CONFIG_DTYPES:
        raise ModelLoadError(f"{key} {value!r:.40} is not supported "
                             f"(supported: {', '.join(_CONFIG_DTYPES)})")
    return str(value)


def _is_int(value: Any) -> bool:
    """A JSON integer (4096, or 4096.0 as some exporters write it), not a bool."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (
        isinstance(value, float) and value.is_integer())


_REQUIRED: Any = object()


def _int(config: dict[str, Any], key: str, default: Any = _REQUIRED) -> Any:
    """config[key] as an int (range checks are `__post_init__`'s); null counts as absent."""
    value = config.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ModelLoadError(f"{key} is missing")
        return default
    if not _is_int(value):
        raise ModelLoadError(f"{key} must be an integer, got {value!r}")
    return int(value)


def _float(config: dict[str, Any], key: str, default: float) -> float:
    value = config.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ModelLoadError(f"{key} must be a number, got {value!r}")
    return float(value)


def _bool(config: dict[str, Any], key: str, default: bool) -> bool:
    value = config.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelLoadError(f"{key} must be true or false, got {value!r}")
    return value
