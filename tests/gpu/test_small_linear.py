"""`small_linear` (decode-size projections with fused norm, bias, SiLU) against the unfused
torch layers it replaces.

On the GPU: `pytest -m gpu tests/gpu/test_small_linear.py`. Without one, under Triton's
interpreter: `TRITON_INTERPRET=1 pytest --noconftest -m gpu tests/gpu/test_small_linear.py`.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from kernel_support import INTERPRET, compile_sm90, kernel_device  # noqa: E402

from kvtier.model.triton_linear import MAX_ROWS, SmallLinearConfig, small_linear  # noqa: E402

EPS = 1e-6


@pytest.fixture(scope="module")
def device() -> torch.device:
    return kernel_device()


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
              norm_weight: torch.Tensor | None, residual: torch.Tensor | None,
              gated: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The layers as the model runs them unfused, every intermediate rounded to x's dtype."""
    summed = None
    if residual is not None:
        summed = (x.float() + residual.float()).to(x.dtype)
        x = summed
    if norm_weight is not None:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + EPS)).to(x.dtype)
        x = (normed.float() * norm_weight.float()).to(x.dtype)
    out = (x.float() @ weight.float().t()).to(x.dtype)
    if bias is not None:
        out = (x.float() @ weight.float().t() + bias.float()).to(x.dtype)
    if gated:
        gate, up = out.chunk(2, dim=-1)
        out = (F.silu(gate.float()).to(x.dtype).float() * up.float()).to(x.dtype)
    return out, summed


SHAPES = [(1, 96, 64), (MAX_ROWS, 200, 130), (1, 48, 320)]
"""(rows, out features, in features): K and N off the tile sizes, a full row tile."""
CONFIGS = [SmallLinearConfig(8, 64, 4, 2), SmallLinearConfig(16, 128, 4, 3)]
STREAMED = [SmallLinearConfig(4, 64, 4, 3, programs_per_sm=1),
            SmallLinearConfig(8, 128, 4, 2, programs_per_sm=2),
            SmallLinearConfig(2, 512, 4, 3, programs_per_sm=1)]
"""The streamed kernel: 4 (interpreter) or #SMs x 1-2 programs, each with several tiles of
several K chunks where the shapes allow, a last K chunk and column tile cut short; and K in
one chunk (its input read and normed once per program)."""


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
@pytest.mark.parametrize("fusion", ["plain", "bias", "norm", "norm+residual+bias", "gated",
                                    "norm+residual+gated"])
@pytest.mark.parametrize("config", CONFIGS + STREAMED,
                         ids=["8x64", "16x128", "streamed-4x64", "streamed-8x128",
                              "streamed-2x512"])
def test_small_linear_matches_the_unfused_layers(device: torch.device, rows: int,
                                                 out_features: int, in_features: int,
                                                 fusion: str, config: SmallLinearConfig) -> None:
    torch.manual_seed(rows * 1000 + out_features)
    dtype = torch.bfloat16
    x = torch.randn(rows, in_features, device=device).to(dtype)
    weight = (torch.randn(out_features * (2 if "gated" in fusion else 1), in_features,
                          device=device) / in_features ** 0.5).to(dtype)
    bias = torch.randn(out_features, device=device).to(dtype) if "bias" in fusion else None
    norm_weight = ((1 + 0.1 * torch.randn(in_features, device=device)).to(dtype)
                   if "norm" in fusion else None)
    residual = (torch.randn(rows, in_features, device=device).to(dtype)
                if "residual" in fusion else None)
    residual_before = residual.clone() if residual is not None else None

    out, residual_out = small_linear(x, weight, bias, norm_weight=norm_weight, eps=EPS,
                                     residual=residual, gated="gated" in fusion, config=config)
    expected, expected_residual = reference(x, weight, bias, norm_weight, residual,
                                            "gated" in fusion)
    assert out.shape == (rows, out_features) and out.dtype == dtype
    # Both round float32 sums, added in different orders, to bf16: a few ulps, more where
    # SiLU multiplies two rounded halves. The interpreter's numpy bf16 casts truncate, which
    # doubles that.
    rtol = (4e-2 if "gated" in fusion else 2e-2) * (2 if INTERPRET else 1)
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=rtol)
    if residual is None:
        assert residual_out is None
    else:
        assert residual_before is not None
        assert torch.equal(residual, residual_before), "the input residual must stay intact"
        assert residual_out is not None
        # One rounding of the same float32 sum: exact on the GPU, one ulp under truncation.
        ulp = 2**-7 if INTERPRET else 0
        torch.testing.assert_close(residual_out, expected_residual, atol=0, rtol=ulp)


@pytest.mark.parametrize("rows,out_features,in_features", SHAPES)
@pytest.mark.parametrize("config", CONFIGS + STREAMED,
                         ids=["8x64", "16x128", "streamed-4x64", "streamed-8x128",
                              "streamed-2x512"])
def test_a_gated_input_is_activated_as_silu_and_mul_would(device: torch.device, rows: int,
                                                           out_features: int, in_features: int,
                                                           config: SmallLinearConfig) -> None:
    """The MLP's down reading gate_up's output: silu(gate) * up, then the projection."""
    torch.manual_seed(rows * 1000 + in_features)
    dtype = torch.bfloat16
    gate_up = torch.randn(rows, 2 * in_features, device=device).to(dtype)
    weight = (torch.randn(out_features, in_features, device=device)
              / in_features ** 0.5).to(dtype)
    out, residual_out = small_linear(gate_up, weight, gated_input=True, config=config)
    gate, up = gate_up.float().chunk(2, dim=-1)
    activation = (F.silu(gate).to(dtype).float() * up).to(dtype)
    expected, _ = reference(activation, weight, None, None, None, gated=False)
    assert out.shape == (rows, out_features) and residual_out is None
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=2e-2 * (2 if INTERPRET else 1))


@pytest.mark.parametrize("rows", [1, MAX_ROWS])
@pytest.mark.parametrize("config", CONFIGS, ids=["8x64", "16x128"])
def test_the_qkv_epilogue_rotates_and_writes_the_cache_as_the_separate_kernels_would(
        device: torch.device, rows: int, config: SmallLinearConfig) -> None:
    """qkv with norm, residual, bias, rotary and the KV write in one kernel, against the
    unfused layers, the torch rotary (rotate-half over the rounded projection, float32 tables)
    and the backend's scatter: 4 query and 2 key heads of 32 rotated, the 2 value heads left
    alone; k and v land in their slots (block size 4), a padding row (slot -1) nowhere."""
    from kvtier.model.layers import RotaryEmbedding
    from kvtier.model.triton_linear import QKVEpilogue

    torch.manual_seed(rows)
    dtype, head_dim, in_features, block_size = torch.bfloat16, 32, 96, 4
    q_size, kv_size = 4 * head_dim, 2 * head_dim
    width = q_size + 2 * kv_size
    x = torch.randn(rows, in_features, device=device).to(dtype)
    residual = torch.randn(rows, in_features, device=device).to(dtype)
    weight = (torch.randn(width, in_features, device=device) / in_features ** 0.5).to(dtype)
    bias = torch.randn(width, device=device).to(dtype)
    norm_weight = (1 + 0.1 * torch.randn(in_features, device=device)).to(dtype)
    table = RotaryEmbedding(head_dim, 512, 10000.0, None)
    table.materialize(device)
    positions = torch.tensor([7, 300][:rows], device=device)
    slots = torch.tensor([9, -1][:rows], device=device)  # block 2 offset 1; padding
    cache = torch.zeros(2, 4, block_size, 2, head_dim, device=device, dtype=dtype)
    out, _ = small_linear(x, weight, bias, norm_weight=norm_weight, eps=EPS, residual=residual,
                          qkv=QKVEpilogue(positions, table.cos, table.sin, q_size, kv_size,
                                          head_dim, cache, slots), config=config)

    projected, _ = reference(x, weight, bias, norm_weight, residual, gated=False)
    heads = projected[:, :q_size + kv_size].float().view(rows, -1, head_dim)
    cos, sin = table.cos[positions][:, None, :], table.sin[positions][:, None, :]
    half = head_dim // 2
    rotate_half = torch.cat((-heads[..., half:], heads[..., :half]), dim=-1)
    expected = projected.clone()
    expected[:, :q_size + kv_size] = (heads * cos + rotate_half * sin).to(dtype).view(rows, -1)
    rtol = 2e-2 * (2 if INTERPRET else 1)
    torch.testing.assert_close(out, expected, atol=3e-2, rtol=rtol)
    # The cache holds exactly what the kernel returned as k and v, in row 0's slot only.
    k, v = out[0, q_size:q_size + kv_size], out[0, q_size + kv_size:]
    assert torch.equal(cache[0, 2, 1].flatten(), k) and torch.equal(cache[1, 2, 1].flatten(), v)
    cache[:, 2, 1] = 0
    assert not cache.any(), "a slot other than row 0's was written"


def test_small_linear_refuses_what_it_cannot_fuse(device: torch.device) -> None:
    x = torch.randn(MAX_ROWS + 1, 32, device=device)
    weight = torch.randn(16, 32, device=device)
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        small_linear(x, weight)
    with pytest.raises(ValueError, match="residual needs the norm"):
        small_linear(x[:2], weight, residual=x[:2])
    with pytest.raises(ValueError, match="gated projection takes no bias"):
        small_linear(x[:2], weight, torch.zeros(8, device=device), gated=True)
    with pytest.raises(ValueError, match="does not take x"):
        small_linear(x[:2, :16], weight)
    with pytest.raises(ValueError, match="must match x"):
        small_linear(x[:2], weight, norm_weight=torch.ones(32, device=device),
                     residual=x[:3])
    with pytest.raises(ValueError, match="norm_weight"):
        small_linear(x[:2], weight, norm_weight=torch.ones(16, device=device))
    from kvtier.model.triton_linear import QKVEpilogue
    table, one = torch.zeros(8, 16, device=device), torch.zeros(1, device=device)
    with pytest.raises(ValueError, match="whole heads"):
        small_linear(x[:1], weight, qkv=QKVEpilogue(one, table, table, 16, 16, 16))
    with pytest.raises(ValueError, match="qkv positions"):
        small_linear(x[:1], weight[:, :32], qkv=QKVEpilogue(one.repeat(2), table, table, 8, 4,
                                                            4))
    with pytest.raises(ValueError, match="rotary tables"):
        small_linear(x[:1], weight, qkv=QKVEpilogue(one, table[:, :8], table, 8, 4, 4))
    cache = torch.zeros(2, 3, 4, 1, 4, device=device)
    with pytest.raises(ValueError, match="slot_mapping"):
        small_linear(x[:1], weight, qkv=QKVEpilogue(one, table[:, :4], table[:, :4], 8, 4, 4,
                                                    cache))
    with pytest.raises(ValueError, match="kv_cache"):
        small_linear(x[:1], weight, qkv=QKVEpilogue(one, table[:, :4], table[:, :4], 8, 4, 4,
                                                    cache[:, :, :, :, :2], one.long()))
    with pytest.raises(ValueError, match="gated input takes no norm"):
        small_linear(x[:2], weight[:, :16], norm_weight=torch.ones(16, device=device),
                     gated_input=True)
    with pytest.raises(ValueError, match="streamed kernel takes no qkv epilogue"):
        small_linear(x[:1], weight[:, :32], qkv=QKVEpilogue(one, table[:, :4], table[:, :4], 8,
                                                            4, 4), config=STREAMED[0])


@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("fused_projections", [("qkv", "o", "gate_up", "down"),
                                               ("qkv", "o", "down")],
                         ids=["all", "down-activates"])
@pytest.mark.parametrize("architecture", ["qwen2.5-1.5b", "qwen3-0.6b"])
def test_a_decoder_layer_gives_the_same_outputs_with_and_without_fusion(
        rows: int, fused_projections: tuple[str, ...], architecture: str) -> None:
    """One decoder layer of Qwen2.5-1.5B's or Qwen3-0.6B's shape (random weights, bf16)
    around attention: the fused path (qkv with its norm, residual add and bias; o; gate_up
    with its norm, residual add and SiLU, or else down with the SiLU), launched with PDL where
    the card has it, and the unfused one (nn.Linear and the separate kernels) agree within
    bf16 rounding, in q, k, v, the residual stream and the layer's output. Qwen3's q/k norms
    have no place in the fused qkv kernel: its layer projects q/k/v unfused whatever the
    fusions. One layer, so that rounding cannot compound through 28 random ones."""
    from kvtier.attention.torch_ref import TorchAttentionBackend
    from kvtier.model.architectures import get_architecture
    from kvtier.model.layers import RMSNorm, RotaryEmbedding, small_linear_plan
    from kvtier.model.llama import DecoderLayer

    torch.manual_seed(rows)
    spec = get_architecture(architecture).spec
    layer = DecoderLayer(spec, TorchAttentionBackend()).to("cuda", torch.bfloat16)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.02)
    for norm in layer.modules():
        if isinstance(norm, RMSNorm):
            norm.weight.data.add_(1.0)
    rotary_table = RotaryEmbedding(spec.head_dim, 4096, spec.rope_theta, spec.rope_scaling)
    rotary_table.materialize(torch.device("cuda"))
    hidden = torch.randn(rows, spec.hidden_size, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(hidden)
    attention = torch.randn(rows, spec.num_attention_heads, spec.head_dim, device="cuda",
                            dtype=torch.bfloat16)
    rotary = rotary_table(torch.arange(300, 300 + rows, device="cuda"), torch.bfloat16)
    assert small_linear_plan(hidden, layer.self_attn.qkv_proj.weight) is not None, \
        "this batch would not take the fused path: the test would compare nothing"
    refused = layer._small_linear_plan("qkv", hidden, layer.self_attn.qkv_proj.weight) is None
    assert refused == spec.qk_norm

    results = {}
    with torch.inference_mode():
        for fused in (True, False):
            layer.small_batch_fusions = frozenset(fused_projections if fused else ())
            q, k, v, summed = layer.pre_attention(hidden, residual.clone(), rotary)
            out, out_residual = layer.post_attention(attention, summed.clone())
            results[fused] = [t.clone() for t in (q, k, v, summed, out, out_residual)]

    def drift(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).float().norm() / b.float().norm()).item()

    names = ["q", "k", "v", "residual", "output", "output residual"]
    for name, a, b in zip(names, results[True], results[False], strict=True):
        assert drift(a, b) < 1e-2, (name, drift(a, b))  # a wrong fusion drifts by O(1)


FLAGS = dict(NORM=False, HAS_RESIDUAL=False, HAS_BIAS=False, GATED=False, GATED_INPUT=False,
             ROTARY=False, WRITE_KV=False, HEAD_DIM=0, BLOCK_SIZE=1)
VARIANTS = {  # the model's projections: (flags, N as the plan sees it, K)
    "qkv": (dict(FLAGS, NORM=True, HAS_RESIDUAL=True, HAS_BIAS=True, ROTARY=True,
                 WRITE_KV=True, HEAD_DIM=128, BLOCK_SIZE=16), 2048, 1536),
    "o": (FLAGS, 1536, 1536),
    "gate_up": (dict(FLAGS, NORM=True, HAS_RESIDUAL=True, GATED=True), 2 * 8960, 1536),
    "down": (dict(FLAGS, GATED_INPUT=True), 1536, 8960),
}
STREAMED_FLAGS = ("NORM", "HAS_RESIDUAL", "HAS_BIAS", "GATED", "GATED_INPUT")


@pytest.mark.skipif(INTERPRET, reason="the interpreter replaces compiled kernels")
@pytest.mark.parametrize("projection", list(VARIANTS))
def test_the_chosen_configs_compile_for_hopper_without_spills(projection: str) -> None:
    from kvtier.model.triton_linear import (
        _small_linear_kernel,
        _streamed_linear_kernel,
        choose_config,
    )

    bf16 = "*bf16"
    pointers = {n: bf16 for n in ("x_ptr", "res_ptr", "res_out_ptr", "norm_w_ptr", "w_ptr",
                                  "b_ptr", "out_ptr")}
    pointers.update(pos_ptr="*i64", cos_ptr="*fp32", sin_ptr="*fp32", cache_ptr=bf16,
                    slot_ptr="*i64", eps="fp32")
    variant, out_features, in_features = VARIANTS[projection]
    built = 0
    for rows in (1, MAX_ROWS):
        config = choose_config(rows, out_features, in_features)
        if config is None:
            continue
        built += 1
        if config.programs_per_sm:  # the streamed kernel: cp.async into shared memory
            build = compile_sm90(_streamed_linear_kernel, pointers, dict(
                {k: variant[k] for k in STREAMED_FLAGS},
                K_CHUNKS=-(-in_features // config.block_k), BLOCK_M=rows,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, STAGES=config.num_stages,
                PDL=True), config.num_warps, config.num_stages, multiples_of_16=("K", "N"))
            weight_loads = re.findall(r"LDGSTS\S*", build.sass)
            # Every weight chunk goes through the pipeline in 16-byte copies.
            assert weight_loads and all(op.endswith(".128") for op in weight_loads), \
                sorted(set(weight_loads))
            # More programs per SM than fit would run in waves: a persistent grid must fit.
            registers = build.resources["REG"] * 32 * config.num_warps
            resources_fit = min(65536 // registers, 227 * 1024 // (
                build.resources["shared_dynamic"] + 1024))
            assert resources_fit >= config.programs_per_sm, build.resources
        else:  # K in one tile (qkv, o) up to MAX_ROWS rows
            one_tile = in_features <= config.block_k
            build = compile_sm90(_small_linear_kernel, pointers, dict(
                **variant, EVEN_K=True, ONE_TILE=one_tile, BLOCK_M=rows,
                BLOCK_N=config.block_n, BLOCK_K=config.block_k, PDL=True),
                config.num_warps, config.num_stages, multiples_of_16=("K",))
            # 16-byte loads; only the bias (block_n elements) may come 2 bytes at a time.
            assert "LDG.E.128" in build.sass
            bias_loads = config.block_n if variant["HAS_BIAS"] else 0
            assert build.sass.count("LDG.E.U16") <= bias_loads, build.sass
            # The first weight tile is requested before the wait for the previous kernel.
            assert build.ptx.index("ld.global") < build.ptx.index("griddepcontrol.wait")
        resources = build.resources
        assert resources["STACK"] == 0 and resources["LOCAL"] == 0, resources
        assert resources["shared_dynamic"] <= 227 * 1024, resources
    assert built, f"no config chose the small kernels for {projection}"
