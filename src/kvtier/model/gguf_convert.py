"""Turn a llama-architecture GGUF file into an ordinary Hugging Face model directory.

Owns: dequantising every tensor (`gguf.quants.dequantize`), renaming llama.cpp tensors to HF
parameter names, undoing llama.cpp's Q/K row permutation, rebuilding a `tokenizer.json` from the
GGUF's byte-level BPE vocabulary, and the on-disk conversion cache (`ensure_converted`).

The output directory (`model.safetensors` in float32, `config.json`, `generation_config.json`,
`tokenizer.json`, `tokenizer_config.json`) loads with `transformers` too, which is how the tests
check it against transformers' own GGUF loader.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import numpy as np
from safetensors.numpy import save_file
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as BackendTokenizer

from kvtier.model.spec import ModelLoadError, ModelSpec, expected_weight_shapes

if TYPE_CHECKING:  # gguf is imported only when a GGUF is converted (GPU hosts may lack it)
    from gguf import GGMLQuantizationType, GGUFReader

CONVERTER_VERSION = 2
"""Bumped when the output changes, so stale cache entries are not reused (2: Llama 3 GGUFs'
rope scaling, which version 1 left out)."""

_GGUF_MAGIC = b"GGUF"
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_SKIPPED_TENSORS = {"rope_freqs.weight"}
"""Llama-3 GGUFs store precomputed rope frequency factors; the converted config.json states
the rope_scaling they come from instead (`_rope_scaling`), from which HF recomputes them."""
_LLAMA3_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192}
"""What every Llama 3.x uses, and what llama.cpp's converter assumes where the HF config
leaves them out; a GGUF records only the factors they produce."""

_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def ensure_converted(gguf_path: Path, cache_root: Path) -> Path:
    """Return the HF directory for `gguf_path`, converting it on first use.

    The directory is `cache_root/gguf/<stem>-<digest>`; it is written under a temporary name and
    renamed into place, so a crash never leaves a half-written entry that a later run would trust.
    Converters of one GGUF take turns on a lock file (the later ones find the entry made), and
    the one holding it removes what killed converters left: their temporary directories.
    """
    try:
        digest = gguf_digest(gguf_path)
    except OSError as exc:
        raise ModelLoadError(f"{gguf_path}: cannot be read: {exc}") from exc
    target = cache_root / "gguf" / f"{gguf_path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        locks = cache_root / "locks"  # not among the entries: listing them shows no lock
        locks.mkdir(exist_ok=True)
        lock = open(locks / f"gguf-{target.name}", "ab")  # noqa: SIM115 -- the with below
    except OSError as exc:
        raise _cache_error(gguf_path, target, exc) from exc
    with lock:  # closing it releases the flock
        if _flock(lock):
            if (target / "config.json").is_file():  # converted while this one waited
                return target
            # No other converter of this GGUF runs: each such directory is a killed one's
            # (its `finally` never ran), as large as the model, and nothing else removes it.
            for stale in [*target.parent.glob(f".tmp-{target.name}-*"), target]:
                shutil.rmtree(stale, ignore_errors=True)
        return _convert_into(gguf_path, target)


def _flock(lock: BinaryIO) -> bool:
    """Wait for an exclusive flock on `lock`; False where the file system has no flock (the
    converters then race benignly, as `_convert_into` allows)."""
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
    except OSError:
        return False
    return True


def _convert_into(gguf_path: Path, target: Path) -> Path:
    """Convert under a temporary name next to `target`, then rename it into place; a
    concurrent converter's rename that came first wins."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    except OSError as exc:
        raise _cache_error(gguf_path, target, exc) from exc
    try:
        convert_gguf(gguf_path, tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    except OSError as exc:  # the cache's disk full or read-only
        raise _cache_error(gguf_path, target, exc) from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _cache_error(gguf_path: Path, target: Path, exc: OSError) -> ModelLoadError:
    return ModelLoadError(f"{gguf_path}: cannot write its conversion to {target.parent}: {exc} "
                          f"(KVTIER_CACHE_DIR chooses where conversions go)")


def gguf_digest(path: Path, sample_bytes: int = 1 << 20) -> str:
    """A cheap identity for a GGUF: size plus the first and last MiB, and the converter version.

    Hashing a multi-GB file on every start would cost more than loading the converted copy.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(f"v{CONVERTER_VERSION}:{size}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(sample_bytes))
        f.seek(max(0, size - sample_bytes))
        digest.update(f.read(sample_bytes))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: Path, out_dir: Path) -> ModelSpec:
    """Write the HF files for `gguf_path` into the existing directory `out_dir`."""
    reader = open_gguf(gguf_path)
    meta = _Metadata(reader, gguf_path)
    spec = _spec_from_metadata(meta, reader)
    _check_tensor_types(reader, gguf_path)
    tensors = _hf_tensors(reader, spec, gguf_path)
    # Checked here, not by the loader after the copy: the message names the GGUF, and no
    # unusable conversion is left in the cache.
    missing = [name for name in expected_weight_shapes(spec) if name not in tensors]
    if missing:
        raise ModelLoadError(f"{gguf_path}: the GGUF has no tensor for {missing[0]}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out_dir / "config.json", spec.to_hf_config())
    _write_json(out_dir / "generation_config.json", {
        "bos_token_id": spec.bos_token_id, "eos_token_id": spec.to_hf_config()["eos_token_id"]})
    _build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", _tokenizer_config(meta, spec))
    return spec


def open_gguf(path: Path) -> GGUFReader:
    """Open and sanity-check a GGUF file; a truncated or foreign file raises ModelLoadError."""
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (bad magic)")
    try:
        from gguf import GGUFReader
    except ImportError as exc:
        raise ModelLoadError(f"{path}: converting GGUF files needs the gguf package") from exc
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, IndexError, struct errors...
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file: {exc}") from exc
    size = path.stat().st_size
    for tensor in reader.tensors:
        if tensor.data_offset + tensor.n_bytes > size:
            raise ModelLoadError(f"{path}: truncated GGUF file (tensor {tensor.name} ends past "
                                 f"the end of the file)")
    return reader


class _Metadata:
    """Typed access to the GGUF key/value section."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self._fields = reader.fields
        self.path = path
        self.arch = self.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelLoadError(f"{self.path}: GGUF metadata lacks {key}")
        return value


def _spec_from_metadata(meta: _Metadata, reader: GGUFReader) -> ModelSpec:
    if meta.arch != "llama":
        raise ModelLoadError(f"{meta.path}: GGUF architecture {meta.arch!r} is not supported "
                             "(supported: llama)")
    a = meta.arch
    experts = meta.get(f"{a}.expert_count")
    if experts:  # llama.cpp writes Mixtral-style models as "llama" with experts
        raise ModelLoadError(f"{meta.path}: a mixture-of-experts GGUF ({a}.expert_count = "
                             f"{experts}) is not supported")
    try:
        fields = _spec_fields(meta, reader, a)
    except ModelLoadError:
        raise
    except (TypeError, ValueError) as exc:  # a count that is a string or a per-layer array
        raise ModelLoadError(f"{meta.path}: GGUF metadata has a value of the wrong type: "
                             f"{exc}") from None
    try:
        return ModelSpec(**fields)
    except ModelLoadError as exc:  # a size below 1, heads that do not divide...
        raise ModelLoadError(f"{meta.path}: GGUF metadata: {exc}") from None


def _spec_fields(meta: _Metadata, reader: GGUFReader, a: str) -> dict[str, Any]:
    num_heads = int(meta.require(f"{a}.attention.head_count"))
    hidden = int(meta.require(f"{a}.embedding_length"))
    tokens = meta.require("tokenizer.ggml.tokens")
    head_dim = meta.get(f"{a}.rope.dimension_count") or meta.get(f"{a}.attention.key_length")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    names = {t.name for t in reader.tensors}
    head_dim = int(head_dim or hidden // max(num_heads, 1))
    rope_theta = float(meta.get(f"{a}.rope.freq_base", 10000.0))
    return dict(
        model_type="llama",
        vocab_size=int(meta.get(f"{a}.vocab_size") or len(tokens)),
        hidden_size=hidden,
        intermediate_size=int(meta.require(f"{a}.feed_forward_length")),
        num_hidden_layers=int(meta.require(f"{a}.block_count")),
        num_attention_heads=num_heads,
        num_key_value_heads=int(meta.get(f"{a}.attention.head_count_kv") or num_heads),
        head_dim=head_dim,
        # GGUF stores eps as float32; round so config.json shows 1e-05, not 9.99999974e-06.
        rms_norm_eps=float(np.format_float_positional(
            np.float32(meta.get(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)), unique=True)),
        rope_theta=rope_theta,
        rope_scaling=_rope_scaling(meta, reader, a, head_dim, rope_theta),
        max_position_embeddings=int(meta.get(f"{a}.context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
        torch_dtype="float32",
    )


def _rope_scaling(meta: _Metadata, reader: GGUFReader, a: str, head_dim: int,
                  theta: float) -> dict[str, Any] | None:
    """The HF rope_scaling of the GGUF: Llama 3's, recovered from the factors llama.cpp stores
    as `rope_freqs.weight`; a scaling kvtier does not implement (linear, yarn...) is refused.
    Ignoring either converts into a model whose rotary embedding differs from the GGUF's."""
    kind = meta.get(f"{a}.rope.scaling.type")
    factor = meta.get(f"{a}.rope.scaling.factor")
    if kind not in (None, "none") and not (kind == "linear" and factor in (None, 1.0)):
        raise ModelLoadError(f"{meta.path}: GGUF rope scaling {kind!r} (factor {factor}) is "
                             f"not supported (supported: Llama 3's rope_freqs, or none)")
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    factors = np.asarray(tensor.data, dtype=np.float64).reshape(-1)
    if factors.shape == (head_dim // 2,) and np.all(factors == 1.0):
        return None
    scaling = {"rope_type": "llama3", "factor": float(factors.max(initial=0.0)),
               **_LLAMA3_ROPE_DEFAULTS}
    if factors.shape != (head_dim // 2,) or scaling["factor"] <= 1.0 or not np.allclose(
            factors, _llama3_rope_factors(head_dim, theta, scaling), rtol=1e-5):
        raise ModelLoadError(f"{meta.path}: the GGUF's rope_freqs.weight holds rope frequency "
                             f"factors that are not Llama 3's rope scaling (not supported)")
    return scaling


def _llama3_rope_factors(head_dim: int, theta: float, scaling: dict[str, Any]) -> np.ndarray:
    """What divides each rotary frequency under Llama 3's rope scaling (HF's
    `_compute_llama3_parameters`, as llama.cpp's converter writes it into rope_freqs)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    factor, low, high = (scaling["factor"], scaling["low_freq_factor"],
                         scaling["high_freq_factor"])
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (old_len / wavelen - low) / (high - low)
    medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_len / high, 1.0,
                    np.where(wavelen > old_len / low, factor, medium))


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF parameter name for a llama.cpp tensor name; None for tensors HF does not keep."""
    if gguf_name in _SKIPPED_TENSORS:
        return None
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no known HF name")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q_proj/k_proj output rows (weights and biases).

    HF rotates the two halves of each head (`rotate_half`); llama.cpp rotates adjacent pairs. Its
    converter therefore interleaves each head's rows so both compute the same attention:

        HF rows of one head:        0 1 ... d/2-1 | d/2 d/2+1 ... d-1
        llama.cpp rows of the head: 0 d/2 1 d/2+1 2 d/2+2 ...

    Viewing the llama.cpp head as (d/2, 2) and transposing to (2, d/2) restores HF order. For
    k_proj `num_heads` is the number of KV heads.
    """
    head_dim = weight.shape[0] // num_heads
    rows = weight.reshape(num_heads, head_dim // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(rows.swapaxes(1, 2).reshape(weight.shape))


def _check_tensor_types(reader: GGUFReader, path: Path) -> None:
    """Refuse a tensor type gguf cannot dequantise before dequantising anything, so a big
    model does not first spend minutes on its other tensors."""
    from gguf import GGMLQuantizationType

    for tensor in reader.tensors:
        if tensor.name not in _SKIPPED_TENSORS and not _dequantisable(tensor.tensor_type):
            supported = [t.name for t in GGMLQuantizationType if _dequantisable(t)]
            raise ModelLoadError(f"{path}: tensor {tensor.name!r} has type "
                                 f"{tensor.tensor_type.name}, which kvtier cannot dequantise "
                                 f"(supported: {', '.join(supported)})")


@functools.cache
def _dequantisable(qtype: GGMLQuantizationType) -> bool:
    """Whether the installed gguf dequantises `qtype`, asked of one zero block: its
    `dequantize` raises NotImplementedError for the rest (integers, F64, Q8_1, Q8_K...)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    try:
        dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], dtype=np.uint8), qtype)
    except Exception:  # NotImplementedError, or a type this gguf knows but cannot decode
        return False
    return True


def _hf_tensors(reader: GGUFReader, spec: ModelSpec, path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    wanted = expected_weight_shapes(spec)
    for tensor in reader.tensors:
        try:
            name = hf_tensor_name(tensor.name)
        except ModelLoadError as exc:
            raise ModelLoadError(f"{path}: {exc}") from None
        if name is None:
            continue
        try:
            # A plain ndarray view: numpy's memmap subclass costs ~1 s per call here otherwise.
            raw = np.asarray(tensor.data).view(np.ndarray)
            weight = dequantize(raw, tensor.tensor_type).astype(np.float32, copy=False)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read tensor {tensor.name}: {exc}") from exc
        expected = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims fastest-first
        if weight.shape != expected:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has shape {weight.shape}, "
                                 f"expected {expected}")
        if name in wanted and weight.shape != wanted[name]:
            raise ModelLoadError(f"{path}: tensor {tensor.name} has shape {weight.shape}, the "
                                 f"GGUF's metadata implies {wanted[name]}")
        if ".self_attn.q_proj." in name:
            weight = unpermute_rotary_rows(weight, spec.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            weight = unpermute_rotary_rows(weight, spec.num_key_value_heads)
        out[name] = np.ascontiguousarray(weight)
    return out


# -- tokenizer ----------------------------------------------------------------------------------

def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the spelling of byte-level BPE vocabularies)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _pre_tokenizer(pre: str | None, path: Path) -> tuple[Any, Any]:
    """(normalizer, pre_tokenizer) matching llama.cpp's `tokenizer.ggml.pre` split rules."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    raw_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in (None, "default", "gpt-2", "gpt2"):
        return None, byte_level
    if pre in ("smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"):
        # llama.cpp splits every digit first, then applies GPT-2's regex; so does SmolLM2's own
        # tokenizer.json (Digits(individual_digits) + ByteLevel).
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "dbrx", "falcon3"):
        return None, pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"), raw_bytes])
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return normalizers.NFC(), pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"), raw_bytes])
    raise ModelLoadError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported "
                         "(supported: default, smollm, llama-bpe, qwen2)")


def _build_tokenizer(meta: _Metadata) -> BackendTokenizer:
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ModelLoadError(f"{meta.path}: GGUF tokenizer {meta.get('tokenizer.ggml.model')!r} "
                             "is not supported (supported: gpt2 byte-level BPE)")
    alphabet = byte_level_alphabet()
    spelled = set(alphabet.values())
    tokens = [t if set(t) <= spelled else "".join(alphabet[b] for b in t.encode("utf-8"))
              for t in meta.require("tokenizer.ggml.tokens")]
    merges = [tuple(m.split(" ", 1)) for m in meta.require("tokenizer.ggml.merges")]
    backend = BackendTokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                                          merges=merges, ignore_merges=False))
    normalizer, pre = _pre_tokenizer(meta.get("tokenizer.ggml.pre"), meta.path)
    if normalizer is not None:
        backend.normalizer = normalizer
    backend.pre_tokenizer = pre
    backend.decoder = decoders.ByteLevel()
    raw_tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens([AddedToken(raw_tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == _TOKEN_TYPE_CONTROL])
    backend.add_tokens([AddedToken(raw_tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == _TOKEN_TYPE_USER_DEFINED])
    return backend


def _tokenizer_config(meta: _Metadata, spec: ModelSpec) -> dict[str, Any]:
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []

    def token(key: str) -> str | None:
        index = meta.get(f"tokenizer.ggml.{key}")
        return None if index is None else tokens[int(index)]

    config: dict[str, Any] = {
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": t == _TOKEN_TYPE_CONTROL}
            for i, t in enumerate(types)
            if t in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)},
    }
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
