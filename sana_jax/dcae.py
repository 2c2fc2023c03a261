"""DC-AE, the deep-compression autoencoder of SANA (f32c32: 32x smaller, 32 latent channels), in Flax linen.

Channels-last throughout. The maths is diffusers' `AutoencoderDC` (models/autoencoders/autoencoder_dc.py and
`SanaMultiscaleLinearAttention`, diffusers 0.42.1), which equals the original mit-han-lab `DCAE` (efficientvit
`models/efficientvit/dc_ae.py`) for the released configs; the only freedom of the original that diffusers
lacks (a GLUMBConv norm other than RMSNorm) is used by no release. Parameter names follow diffusers' modules,
so conversion is a table (`sana_conversion.dcae`); two deliberate differences: the attention's q, k, v
projections are one fused `qkv` kernel (as the original's `qkv` conv), and a stage's blocks are named
`block_{j}` plus `downsample` / `upsample` instead of diffusers' positional Sequential indices.

Reads top to bottom: config -> released variants -> layers -> blocks -> encoder / decoder -> model -> tiling ->
utilities. Shapes: B batch, H, W height and width (pixels or latent cells), C channels, N = H*W tokens,
D attention head dim, G attention groups (C / D heads x (1 + number of q/k/v scales)).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.linear_attention import relu_linear_attention

Array = jax.Array
BlockType = Literal["ResBlock", "EfficientViTBlock"]
NormType = Literal["rms_norm", "batch_norm"]
ActFn = Literal["silu", "swish", "relu", "gelu", "mish"]
ComputeDtype = Literal["float32", "bfloat16", "float16", "float64"]

_BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_NORM_TYPES = ("rms_norm", "batch_norm")
_ACTIVATIONS = {"silu": nn.silu, "swish": nn.silu, "relu": nn.relu, "mish": lambda x: x * jnp.tanh(nn.softplus(x)),
                "gelu": functools.partial(nn.gelu, approximate=False)}  # torch nn.GELU() is the exact erf form
_COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
_NORM_EPS = 1e-5  # every DC-AE norm (diffusers RMSNorm / BatchNorm2d, the original TritonRMSNorm2d)
_ATTN_EPS = 1e-15  # SanaMultiscaleLinearAttention / LiteMLA denominator eps
_GLU_EXPAND = 4  # EfficientViTBlock's GLUMBConv expand ratio


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """An AutoencoderDC. Field names are diffusers' config.json keys; per-stage fields are tuples over stages.

    Defaults are dc-ae-f32c32-sana-1.0. Encoder blocks always use RMSNorm and SiLU (diffusers hard-codes them);
    the decoder's are per stage. The GLUMBConv of an EfficientViTBlock always normalises with RMSNorm.
    """

    name: str = "custom"
    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32  # D; attention heads of a stage = C / D
    encoder_block_types: tuple[BlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    decoder_block_types: tuple[BlockType, ...] = ("ResBlock",) * 3 + ("EfficientViTBlock",) * 3
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    # Kernel sizes of the extra depthwise q/k/v aggregations of each stage's attention ("multi-scale").
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: Literal["pixel_shuffle", "interpolate"] = "interpolate"  # interpolate: nearest x2 + conv
    downsample_block_type: Literal["pixel_unshuffle", "conv"] = "conv"  # conv: stride-2 3x3 conv
    decoder_norm_types: tuple[NormType, ...] = ("rms_norm",) * 6
    decoder_act_fns: tuple[ActFn, ...] = ("silu",) * 6
    encoder_out_shortcut: bool = True  # latent += channel-group mean of the last features
    decoder_in_shortcut: bool = True  # features += latent channels repeated
    decoder_conv_act_fn: ActFn = "relu"  # between the decoder's norm_out and conv_out
    scaling_factor: float = 0.41407  # the diffusion model sees z * scaling_factor; decode takes z unscaled
    compute_dtype: ComputeDtype = "float32"  # activations and conv/matmul inputs; params stay fp32

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"DCAEConfig {self.name!r}: {msg}")

        for field in ("in_channels", "latent_channels", "attention_head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{field} must be a positive int, got {value!r}")
        for side in ("encoder", "decoder"):
            widths = getattr(self, f"{side}_block_out_channels")
            n = len(widths)
            if n < 2:
                fail(f"{side}_block_out_channels needs at least 2 stages, got {widths!r}")
            per_stage = ["block_types", "block_out_channels", "layers_per_block", "qkv_multiscales"]
            per_stage += ["norm_types", "act_fns"] if side == "decoder" else []
            for field in per_stage:
                value = getattr(self, f"{side}_{field}")
                if not isinstance(value, tuple) or len(value) != n:
                    fail(f"{side}_{field} must be a tuple with one entry per stage ({n}), got {value!r}")
            layers = getattr(self, f"{side}_layers_per_block")
            if any(not isinstance(w, int) or w <= 0 for w in widths):
                fail(f"{side}_block_out_channels must be positive ints, got {widths!r}")
            if any(not isinstance(d, int) or d < 0 for d in layers):
                fail(f"{side}_layers_per_block must be ints >= 0, got {layers!r}")
            for i, (kind, width, scales) in enumerate(zip(getattr(self, f"{side}_block_types"), widths,
                                                          getattr(self, f"{side}_qkv_multiscales"))):
                if kind not in _BLOCK_TYPES:
                    fail(f"{side}_block_types[{i}] must be one of {_BLOCK_TYPES}, got {kind!r}")
                if not isinstance(scales, tuple) or any(not isinstance(k, int) or k <= 0 or k % 2 == 0
                                                        for k in scales):
                    fail(f"{side}_qkv_multiscales[{i}] must be a tuple of odd kernel sizes, got {scales!r}")
                if kind == "EfficientViTBlock" and layers[i] and width % self.attention_head_dim:
                    fail(f"{side} stage {i}: {width} channels are not a multiple of attention_head_dim "
                         f"{self.attention_head_dim}")
            for i in range(n - 1):  # the resampling shortcuts average / repeat whole channel groups
                if not layers[i]:
                    continue
                small, big = (widths[i], widths[i + 1])
                if side == "encoder" and (4 * small) % big:
                    fail(f"encoder stage {i}: 4 x {small} channels are not a multiple of the next stage's {big}")
                if side == "decoder" and (4 * small) % big:
                    fail(f"decoder stage {i}: 4 x {small} channels are not a multiple of the previous stage's {big}")
                if side == "encoder" and self.downsample_block_type == "pixel_unshuffle" and big % 4:
                    fail(f"encoder stage {i + 1}: {big} channels are not a multiple of 4 (pixel_unshuffle)")
            if widths[-1] % self.latent_channels:
                fail(f"{side}_block_out_channels[-1] = {widths[-1]} is not a multiple of latent_channels "
                     f"{self.latent_channels}")
        if self.encoder_layers_per_block[0] == 0 and self.downsample_block_type == "pixel_unshuffle" \
                and self.encoder_block_out_channels[1] % 4:
            fail("encoder conv_in (pixel_unshuffle) needs encoder_block_out_channels[1] to be a multiple of 4")
        for i, norm in enumerate(self.decoder_norm_types):
            if norm not in _NORM_TYPES:
                fail(f"decoder_norm_types[{i}] must be one of {_NORM_TYPES}, got {norm!r}")
        for i, act in enumerate(self.decoder_act_fns + (self.decoder_conv_act_fn,)):
            if act not in _ACTIVATIONS:
                fail(f"activation must be one of {tuple(_ACTIVATIONS)}, got {act!r}")
        if self.upsample_block_type not in ("pixel_shuffle", "interpolate"):
            fail(f"upsample_block_type must be 'pixel_shuffle' or 'interpolate', got {self.upsample_block_type!r}")
        if self.downsample_block_type not in ("pixel_unshuffle", "conv"):
            fail(f"downsample_block_type must be 'pixel_unshuffle' or 'conv', got {self.downsample_block_type!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            fail(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if not (isinstance(self.scaling_factor, (int, float)) and self.scaling_factor > 0):
            fail(f"scaling_factor must be a positive number, got {self.scaling_factor!r}")

    @property
    def spatial_compression(self) -> int:
        """f: image side / latent side (diffusers' spatial_compression_ratio, 2^(stages - 1))."""
        return 2 ** (len(self.encoder_block_out_channels) - 1)

    def replace(self, **changes) -> DCAEConfig:
        return dataclasses.replace(self, **changes)


# Released variants. dc-ae-f32c32-sana-1.0: efficientvit `dc_ae_f32c32("dc-ae-f32c32-sana-1.0")` (mit-han-lab/
# efficientvit@7571ad0 models/efficientvit/dc_ae.py) and the config.json of mit-han-lab/dc-ae-f32c32-sana-1.0-
# diffusers as diffusers' converter writes it (diffusers.md section 2): 312,250,275 parameters.
F32C32_SANA_1_0 = DCAEConfig(name="dc-ae-f32c32-sana-1.0")
# dc-ae-f32c32-sana-1.1 ("improved decoder", the SANA default since 1.1): the same architecture, new weights.
# Source: the efficientvit code vendored in NVlabs/Sana (diffusion/model/dc_ae/efficientvit/models/efficientvit/
# dc_ae.py) builds "dc-ae-f32c32-sana-1.0" and "dc-ae-f32c32-sana-1.1" from one config string. Not checked
# against the -diffusers repo's config.json (no network here).
F32C32_SANA_1_1 = F32C32_SANA_1_0.replace(name="dc-ae-f32c32-sana-1.1")
# dc-ae-lite-f32c32-sana-1.1 (mit-han-lab/dc-ae-lite-f32c32-sana-1.1-diffusers, the "DC-AE-Lite" faster decoder;
# first vendored as "dc-ae-turbo-f32c32-sana-1.1"): the 1.0/1.1 encoder with a ResBlock-only decoder, depths
# [0, 3, 5, 4, 4, 4], pixel-shuffle up-sampling (the DecoderConfig default), RMSNorm + SiLU, SiLU before
# conv_out. Source: the same NVlabs/Sana vendored dc_ae.py config string, translated field by field to
# diffusers' names; the hub config.json and the parameter count are unverified here.
LITE_F32C32_SANA_1_1 = F32C32_SANA_1_0.replace(
    name="dc-ae-lite-f32c32-sana-1.1", decoder_block_types=("ResBlock",) * 6,
    decoder_layers_per_block=(0, 3, 5, 4, 4, 4), decoder_qkv_multiscales=((),) * 6,
    upsample_block_type="pixel_shuffle", decoder_conv_act_fn="silu")
# For tests: 3 stages (f = 4) of 8, 8, 16 channels, ResBlocks and attention with 0, 1 and 2 extra q/k/v scales,
# 4-wide heads, both shortcuts.
TINY = DCAEConfig(
    name="tiny", latent_channels=4, attention_head_dim=4,
    encoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8, 16), decoder_block_out_channels=(8, 8, 16),
    encoder_layers_per_block=(1, 1, 1), decoder_layers_per_block=(1, 1, 1),
    encoder_qkv_multiscales=((), (3,), (3, 5)), decoder_qkv_multiscales=((), (5,), ()),
    decoder_norm_types=("rms_norm",) * 3, decoder_act_fns=("silu", "relu", "silu"))
VARIANTS = {cfg.name: cfg for cfg in (F32C32_SANA_1_0, F32C32_SANA_1_1, LITE_F32C32_SANA_1_1, TINY)}


def get(name: str, **overrides) -> DCAEConfig:
    """A released variant by name (see VARIANTS), optionally with fields replaced (e.g. compute_dtype)."""
    if name not in VARIANTS:
        raise ValueError(f"unknown DC-AE variant {name!r}; known: {sorted(VARIANTS)}")
    return VARIANTS[name].replace(**overrides)


# --------------------------------------------------------------------------------------------------- layers

def _dtype(cfg: DCAEConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def _precision(cfg: DCAEConfig) -> jax.lax.Precision:
    """fp32 models compute fp32 convs and matmuls exactly (no TF32 on GPU/TPU), as the parity targets require."""
    return jax.lax.Precision.HIGHEST if cfg.compute_dtype in ("float32", "float64") else jax.lax.Precision.DEFAULT


def _accum(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _torch_uniform(fan_in: int):
    """PyTorch's default Conv2d/Linear init, weight and bias alike: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _constant(value: float):
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


# Logical axis names of every DC-AE parameter. The VAE has its own names, so a mesh rule can shard or replicate
# it independently of the transformer (it is frozen during SANA training and 312M parameters in all).
_IN, _OUT = "vae_in", "vae_out"


class Conv2d(nn.Module):
    """k x k convolution, zero padding k // 2, on [B, H, W, C_in] with an HWIO kernel [k, k, C_in / groups, C]."""

    features: int
    kernel_size: int
    config: DCAEConfig
    stride: int = 1
    groups: int = 1
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, k, c_in = self.config, self.kernel_size, x.shape[-1]
        dtype = _dtype(cfg)
        init = _torch_uniform(c_in // self.groups * k * k)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, _IN, _OUT)),
                            (k, k, c_in // self.groups, self.features), jnp.float32)
        pad = k // 2
        y = jax.lax.conv_general_dilated(
            x.astype(dtype), kernel.astype(dtype), window_strides=(self.stride, self.stride),
            padding=((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups, precision=_precision(cfg))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(init, (_OUT,)), (self.features,), jnp.float32)
            y = y + bias.astype(dtype)
        return y


def _fold_taps(kernel: Array, axis: int) -> tuple[Array, Array]:
    """A 3-tap kernel axis seen by a 2x nearest-upsampled input, as 2-tap kernels on the original input, for the
    even and the odd output phase: even outputs read input (i-1, i, i) -> taps (k0, k1 + k2); odd outputs read
    (i, i, i+1) -> taps (k0 + k1, k2)."""
    k0, k1, k2 = (jnp.take(kernel, t, axis=axis) for t in range(3))
    return jnp.stack([k0, k1 + k2], axis=axis), jnp.stack([k0 + k1, k2], axis=axis)


def nearest2x_conv3x3(x: Array, kernel: Array, precision=None) -> Array:
    """conv3x3(nearest_upsample_2x(x)), zero padding 1, without building the upsampled map.

    x [B, H, W, C_in], kernel HWIO [3, 3, C_in, C_out] (taps folded in its dtype, fp32 for the params, then cast
    to x's) -> [B, 2H, 2W, C_out] in x's dtype. Each of the four output phases is
    a 2x2 convolution of x with kernel taps summed where the upsampling repeats a pixel (_fold_taps): 16 instead
    of 36 multiply-adds per input pixel and channel pair, and no 4x larger input in memory. The same function
    up to rounding (the folded taps add two weights before the multiply); tests compare it with the direct form.
    """
    rows = _fold_taps(kernel, 0)
    phases = []
    for a, pad_h in enumerate(((1, 0), (0, 1))):  # even rows read (i-1, i), odd rows (i, i+1)
        cols = _fold_taps(rows[a], 1)
        phases.append([jax.lax.conv_general_dilated(
            x, cols[b].astype(x.dtype), window_strides=(1, 1), padding=(pad_h, pad_w),
            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=precision)
            for b, pad_w in enumerate(((1, 0), (0, 1)))])  # even columns read (j-1, j), odd (j, j+1)
    y = jnp.stack([jnp.stack(row, axis=3) for row in phases], axis=2)  # [B, H, 2(a), W, 2(b), C_out]
    b, h, _, w, _, c = y.shape
    return y.reshape(b, 2 * h, 2 * w, c)


class NearestUpConv(nn.Module):
    """Nearest 2x up-sampling then a 3x3 conv with bias (diffusers' interpolate mode), computed by
    nearest2x_conv3x3. Same parameters as the Conv2d it replaces: kernel [3, 3, C_in, C_out], bias [C_out]."""

    features: int
    config: DCAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, H, W, C_in] -> [B, 2H, 2W, C_out]
        cfg, c_in = self.config, x.shape[-1]
        dtype, init = _dtype(cfg), _torch_uniform(c_in * 9)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, _IN, _OUT)),
                            (3, 3, c_in, self.features), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(init, (_OUT,)), (self.features,), jnp.float32)
        y = nearest2x_conv3x3(x.astype(dtype), kernel, precision=_precision(cfg))
        return y + bias.astype(dtype)


class Linear(nn.Module):
    """y = x @ kernel over the last axis, no bias (every DC-AE Linear is bias-free); kernel [C_in, C_out]."""

    features: int
    config: DCAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, c_in = self.config, x.shape[-1]
        kernel = self.param("kernel", nn.with_logical_partitioning(_torch_uniform(c_in), (_IN, _OUT)),
                            (c_in, self.features), jnp.float32)
        return jnp.matmul(x.astype(_dtype(cfg)), kernel.astype(_dtype(cfg)), precision=_precision(cfg))


class RMSNorm(nn.Module):
    """diffusers RMSNorm(C, eps 1e-5, weight and bias) over channels: statistics in fp32, affine in x's dtype."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        weight = self.param("weight", nn.with_logical_partitioning(_constant(1.0), (_OUT,)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_constant(0.0), (_OUT,)), (c,), jnp.float32)
        x32 = x.astype(_accum(x.dtype))
        normed = (x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + _NORM_EPS)).astype(x.dtype)
        return normed * weight.astype(x.dtype) + bias.astype(x.dtype)


class BatchNorm(nn.Module):
    """BatchNorm2d(C, eps 1e-5) in inference mode, as diffusers runs a loaded model (`.eval()`).

    The running statistics are stored beside weight and bias as `mean` / `var` in the one params tree (they are
    constants: DC-AE is not trained here). No SANA DC-AE uses BatchNorm; the f32c32-in/mix-1.0 decoders do.
    """

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        weight = self.param("weight", nn.with_logical_partitioning(_constant(1.0), (_OUT,)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_constant(0.0), (_OUT,)), (c,), jnp.float32)
        mean = self.param("mean", nn.with_logical_partitioning(_constant(0.0), (_OUT,)), (c,), jnp.float32)
        var = self.param("var", nn.with_logical_partitioning(_constant(1.0), (_OUT,)), (c,), jnp.float32)
        scale = weight * jax.lax.rsqrt(var + _NORM_EPS)
        return x * scale.astype(x.dtype) + (bias - mean * scale).astype(x.dtype)


def _norm(norm_type: NormType, name: str) -> nn.Module:
    return RMSNorm(name=name) if norm_type == "rms_norm" else BatchNorm(name=name)


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
    """torch F.pixel_unshuffle, channels-last: [B, H*r, W*r, C] -> [B, H, W, C*r*r], channel c*r*r + i*r + j."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)  # [B, H, W, C, r(i), r(j)]
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: Array, r: int = 2) -> Array:
    """torch F.pixel_shuffle, channels-last: [B, H, W, C*r*r] -> [B, H*r, W*r, C] (inverse of pixel_unshuffle)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)  # [B, H, r(i), W, r(j), C]
    return x.reshape(b, h * r, w * r, c // (r * r))


def _group_mean(x: Array, groups_of: int) -> Array:
    """[..., C] -> [..., C / groups_of]: mean of consecutive channel groups (torch unflatten(1, (-1, g)).mean(2))."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // groups_of, groups_of).mean(-1)


# --------------------------------------------------------------------------------------------------- blocks

class ResBlock(nn.Module):
    """x + norm(conv2(act(conv1(x)))): 3x3 convs, conv1 with bias, conv2 without."""

    config: DCAEConfig
    norm_type: NormType
    act_fn: ActFn

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
        c = x.shape[-1]
        h = Conv2d(c, 3, self.config, name="conv1")(x)
        h = Conv2d(c, 3, self.config, use_bias=False, name="conv2")(_ACTIVATIONS[self.act_fn](h))
        return _norm(self.norm_type, "norm")(h) + x


class MultiscaleProjection(nn.Module):
    """One extra q/k/v scale: depthwise k x k conv over all 3C channels, then a 1x1 conv grouped per head-dim
    channel group (3C / D groups); neither has a bias."""

    kernel_size: int
    config: DCAEConfig

    @nn.compact
    def __call__(self, qkv: Array) -> Array:  # [B, H, W, 3C] -> [B, H, W, 3C]
        cfg, c3 = self.config, qkv.shape[-1]
        d = cfg.attention_head_dim
        h = Conv2d(c3, self.kernel_size, cfg, groups=c3, use_bias=False, name="proj_in")(qkv)
        return GroupedPointwise(d, cfg, name="proj_out")(h)


class GroupedPointwise(nn.Module):
    """Conv2d(C, C, 1, groups=C / group_size, bias=False), HWIO kernel [1, 1, group_size, C]: a block-diagonal
    matmul, computed as one einsum over the groups rather than as a grouped convolution."""

    group_size: int
    config: DCAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
        cfg, c, d = self.config, x.shape[-1], self.group_size
        kernel = self.param("kernel", nn.with_logical_partitioning(_torch_uniform(d), (None, None, _IN, _OUT)),
                            (1, 1, d, c), jnp.float32)
        blocks = kernel[0, 0].reshape(d, c // d, d).astype(_dtype(cfg))  # [D_in, G, D_out]: out channel g*D + o
        out = jnp.einsum("bhwgi,igo->bhwgo", x.reshape(*x.shape[:-1], c // d, d).astype(_dtype(cfg)), blocks,
                         precision=_precision(cfg))
        return out.reshape(x.shape)


def relu_quadratic_attention(q: Array, k: Array, v: Array, eps: float = _ATTN_EPS) -> Array:
    """DC-AE's small-N branch: out_n = sum_m v_m s_mn / (sum_m s_mn + eps), s_mn = ReLU(k_m) . ReLU(q_n).

    q, k, v: [B, N, G, D] -> [B, N, G, D] in v's dtype. As diffusers, the scores are computed in the input
    dtype and normalised in fp32, then cast back for the value matmul.
    """
    q, k = jax.nn.relu(q), jax.nn.relu(k)
    precision = jax.lax.Precision.HIGHEST if v.dtype in (jnp.float32, jnp.float64) else jax.lax.Precision.DEFAULT
    scores = jnp.einsum("bmgd,bngd->bgmn", k, q, precision=precision).astype(_accum(v.dtype))  # [B, G, N, N]
    scores = (scores / (jnp.sum(scores, axis=2, keepdims=True) + eps)).astype(v.dtype)
    return jnp.einsum("bmgd,bgmn->bngd", v, scores, precision=precision)


class MultiscaleLinearAttention(nn.Module):
    """SanaMultiscaleLinearAttention with its residual: x + norm_out(to_out(attention(qkv multi-scale))).

    The attention groups are diffusers' (and the original LiteMLA's): the concatenated [q | k | v | scale 1 ...]
    channels are cut into consecutive groups of 3D, and each group's thirds act as its q, k and v. For N = H*W
    above D the attention is ReLU linear attention in fp32; otherwise the N x N ("quadratic") form.
    """

    config: DCAEConfig
    scales: tuple[int, ...]
    norm_type: NormType

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
        cfg = self.config
        b, h, w, c = x.shape
        d, n = cfg.attention_head_dim, h * w
        qkv = Linear(3 * c, cfg, name="qkv")(x)  # [B, H, W, 3C] = [q | k | v]
        parts = [qkv] + [MultiscaleProjection(k, cfg, name=f"to_qkv_multiscale_{s}")(qkv)
                         for s, k in enumerate(self.scales)]
        groups = jnp.concatenate(parts, axis=-1).reshape(b, n, -1, 3 * d)  # [B, N, G, 3D]
        q, k, v = jnp.split(groups, 3, axis=-1)  # each [B, N, G, D]
        if n > d:  # diffusers' and the original's switch: linear attention unless the map is tiny
            out = relu_linear_attention(q, k, v, eps=_ATTN_EPS)  # fp32 inside, returned in v's dtype
        else:
            out = relu_quadratic_attention(q, k, v, eps=_ATTN_EPS)
        out = Linear(c, cfg, name="to_out")(out.reshape(b, h, w, -1))  # [B, H, W, C(1 + scales)] -> C
        return _norm(self.norm_type, "norm_out")(out) + x


class GLUMBConv(nn.Module):
    """x + RMSNorm(1x1 conv(value * SiLU(gate))), [value | gate] = 3x3 depthwise(SiLU(1x1 conv C -> 8C))."""

    config: DCAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, H, W, C] -> [B, H, W, C]
        cfg, c = self.config, x.shape[-1]
        hidden = _GLU_EXPAND * c
        h = nn.silu(Conv2d(2 * hidden, 1, cfg, name="conv_inverted")(x))
        h = Conv2d(2 * hidden, 3, cfg, groups=2 * hidden, name="conv_depth")(h)
        value, gate = jnp.split(h, 2, axis=-1)
        h = Conv2d(c, 1, cfg, use_bias=False, name="conv_point")(value * nn.silu(gate))
        return RMSNorm(name="norm")(h) + x


class EfficientViTBlock(nn.Module):
    """Multi-scale linear attention (context), then GLUMBConv (local); both residual."""

    config: DCAEConfig
    scales: tuple[int, ...]
    norm_type: NormType

    @nn.compact
    def __call__(self, x: Array) -> Array:
        x = MultiscaleLinearAttention(self.config, self.scales, self.norm_type, name="attn")(x)
        return GLUMBConv(self.config, name="conv_out")(x)


def _block(cfg: DCAEConfig, kind: BlockType, scales: tuple[int, ...], norm_type: NormType, act: ActFn,
           name: str) -> nn.Module:
    if kind == "ResBlock":
        return ResBlock(cfg, norm_type, act, name=name)
    return EfficientViTBlock(cfg, scales, norm_type, name=name)


class DownBlock(nn.Module):
    """[B, H, W, C_in] -> [B, H/2, W/2, C_out]: stride-2 3x3 conv, or 3x3 conv to C_out/4 + pixel_unshuffle;
    with `shortcut`, + pixel_unshuffle(x) averaged over channel groups of 4 C_in / C_out."""

    features: int
    config: DCAEConfig
    shortcut: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if cfg.downsample_block_type == "pixel_unshuffle":
            y = pixel_unshuffle(Conv2d(self.features // 4, 3, cfg, name="conv")(x))
        else:
            y = Conv2d(self.features, 3, cfg, stride=2, name="conv")(x)
        if self.shortcut:
            y = y + _group_mean(pixel_unshuffle(x), 4 * x.shape[-1] // self.features).astype(y.dtype)
        return y


class UpBlock(nn.Module):
    """[B, H, W, C_in] -> [B, 2H, 2W, C_out]: nearest x2 + 3x3 conv, or 3x3 conv to 4 C_out + pixel_shuffle;
    with `shortcut`, + pixel_shuffle(x with each channel repeated 4 C_out / C_in times)."""

    features: int
    config: DCAEConfig
    shortcut: bool

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        if cfg.upsample_block_type == "interpolate":
            y = NearestUpConv(self.features, cfg, name="conv")(x)
        else:
            y = pixel_shuffle(Conv2d(4 * self.features, 3, cfg, name="conv")(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, 4 * self.features // x.shape[-1], axis=-1)).astype(y.dtype)
        return y


# ---------------------------------------------------------------------------------------- encoder, decoder

class DownStage(nn.Module):
    """Encoder stage i: `block_{j}` for j < layers, then `downsample` unless it is the last stage (or empty)."""

    config: DCAEConfig
    index: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, i = self.config, self.index
        for j in range(cfg.encoder_layers_per_block[i]):
            # diffusers builds every encoder block with RMSNorm and SiLU, whatever the decoder uses.
            x = _block(cfg, cfg.encoder_block_types[i], cfg.encoder_qkv_multiscales[i], "rms_norm", "silu",
                       f"block_{j}")(x)
        if i < len(cfg.encoder_block_out_channels) - 1 and cfg.encoder_layers_per_block[i] > 0:
            x = DownBlock(cfg.encoder_block_out_channels[i + 1], cfg, shortcut=True, name="downsample")(x)
        return x


class UpStage(nn.Module):
    """Decoder stage i (run from the last to the first): `upsample` unless it is the last stage (or empty), then
    `block_{j}` for j < layers."""

    config: DCAEConfig
    index: int

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg, i = self.config, self.index
        if i < len(cfg.decoder_block_out_channels) - 1 and cfg.decoder_layers_per_block[i] > 0:
            x = UpBlock(cfg.decoder_block_out_channels[i], cfg, shortcut=True, name="upsample")(x)
        for j in range(cfg.decoder_layers_per_block[i]):
            x = _block(cfg, cfg.decoder_block_types[i], cfg.decoder_qkv_multiscales[i], cfg.decoder_norm_types[i],
                       cfg.decoder_act_fns[i], f"block_{j}")(x)
        return x


class Encoder(nn.Module):
    """[B, H, W, in_channels] -> [B, H/f, W/f, latent_channels]; sows `conv_in_out` and `down_blocks_{i}_out`."""

    config: DCAEConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        widths, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        if layers[0] > 0:
            x = Conv2d(widths[0], 3, cfg, name="conv_in")(x)
        else:  # no full-resolution stage: the input conv already halves the resolution
            x = DownBlock(widths[1], cfg, shortcut=False, name="conv_in")(x)
        self.sow("intermediates", "conv_in_out", x)
        for i in range(len(widths)):
            x = DownStage(cfg, i, name=f"down_blocks_{i}")(x)
            self.sow("intermediates", f"down_blocks_{i}_out", x)
        out = Conv2d(cfg.latent_channels, 3, cfg, name="conv_out")(x)
        if cfg.encoder_out_shortcut:
            out = out + _group_mean(x, widths[-1] // cfg.latent_channels)
        return out


class Decoder(nn.Module):
    """[B, h, w, latent_channels] -> [B, h*f, w*f, in_channels]; sows `conv_in_out` and `up_blocks_{i}_out`."""

    config: DCAEConfig

    @nn.compact
    def __call__(self, z: Array) -> Array:
        cfg = self.config
        widths, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        x = Conv2d(widths[-1], 3, cfg, name="conv_in")(z)
        if cfg.decoder_in_shortcut:
            x = x + jnp.repeat(z.astype(x.dtype), widths[-1] // cfg.latent_channels, axis=-1)
        self.sow("intermediates", "conv_in_out", x)
        for i in reversed(range(len(widths))):
            x = UpStage(cfg, i, name=f"up_blocks_{i}")(x)
            self.sow("intermediates", f"up_blocks_{i}_out", x)
        # Always RMSNorm here, whatever decoder_norm_types says (diffusers' norm_out).
        x = _ACTIVATIONS[cfg.decoder_conv_act_fn](RMSNorm(name="norm_out")(x))
        if layers[0] > 0:
            return Conv2d(cfg.in_channels, 3, cfg, name="conv_out")(x)
        return UpBlock(cfg.in_channels, cfg, shortcut=False, name="conv_out")(x)


class DCAE(nn.Module):
    """The autoencoder: `encode` images, `decode` latents (unscaled), `__call__` = decode(encode(images)).

    Usage: `model.apply({"params": params}, images, method="encode")`. Outputs are in the compute dtype.
    """

    config: DCAEConfig

    def setup(self):
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, images: Array) -> Array:
        """images [B, H, W, in_channels] in [-1, 1], H and W multiples of f -> latents [B, H/f, W/f, C_latent].

        Deterministic (DC-AE has no posterior). Multiply by config.scaling_factor for the diffusion model.
        """
        cfg, f = self.config, self.config.spatial_compression
        if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
            raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (channels-last), got {tuple(images.shape)}")
        if images.shape[1] % f or images.shape[2] % f:
            raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the DC-AE's "
                             f"spatial compression {f} (config {cfg.name!r}); pad or resize it")
        return self.encoder(images.astype(_dtype(cfg)))

    def decode(self, latents: Array) -> Array:
        """latents [B, h, w, C_latent], unscaled (z / scaling_factor, as AutoencoderDC.decode takes them)
        -> images [B, h*f, w*f, in_channels], nominally in [-1, 1] (not clipped)."""
        cfg = self.config
        if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
            raise ValueError(f"latents must be [B, h, w, {cfg.latent_channels}] (channels-last), got "
                             f"{tuple(latents.shape)}")
        return self.decoder(latents.astype(_dtype(cfg)))

    def __call__(self, images: Array) -> Array:
        return self.decode(self.encode(images))


# --------------------------------------------------------------------------------------------------- tiling

@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model: DCAE, params, x: Array, method: str) -> Array:
    return model.apply({"params": params}, x, method=method)


@functools.partial(jax.jit, static_argnums=(0, 3, 6))
def _apply_tile(model: DCAE, params, x: Array, size: tuple[int, int], top: Array, left: Array, method: str) -> Array:
    """`method` on x[:, top:top + size[0], left:left + size[1]]; the offsets are traced, so one program serves
    every tile of a shape (at most four shapes: full tiles and the shorter last row / column)."""
    tile = jax.lax.dynamic_slice(x, (0, top, left, 0), (x.shape[0], *size, x.shape[3]))
    return model.apply({"params": params}, tile, method=method)


def _tiles(model: DCAE, params, x: Array, tile: int, stride: int, method: str) -> list[list[Array]]:
    """`method` applied to the tiles of x [B, H, W, C] starting every `stride` cells (diffusers' grid)."""
    h, w = x.shape[1:3]
    return [[_apply_tile(model, params, x, (min(tile, h - i), min(tile, w - j)), jnp.int32(i), jnp.int32(j), method)
             for j in range(0, w, stride)] for i in range(0, h, stride)]


def _check_tiles(cfg: DCAEConfig, tile_size: int, overlap: int) -> None:
    f = cfg.spatial_compression
    if tile_size <= 0 or tile_size % f or overlap % f or not 0 <= overlap < tile_size:
        raise ValueError(f"tile_size {tile_size} and overlap {overlap} must be multiples of {f} (pixels per latent "
                         f"cell) with 0 <= overlap < tile_size")


def _blend_tiles(rows: list[list[Array]], blend: int, keep: int) -> Array:
    """Blend a grid of overlapping tiles [B, h, w, C] (tile (i, j) starts at (i, j) * keep) into one map.

    diffusers' rule (AutoencoderDC.tiled_decode / tiled_encode), including its order: in row-major order each
    tile's first `blend` rows are mixed with the (already blended) tile above, then its first `blend` columns
    with the (already blended) tile to the left, weight of the new tile y / blend at offset y (linear ramp);
    then the first `keep` rows and columns of every tile are concatenated.
    """
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j in range(len(row)):
            tile = row[j]
            if i > 0:
                above = rows[i - 1][j]
                e = min(above.shape[1], tile.shape[1], blend)
                ramp = jnp.asarray(np.arange(e) / e, tile.dtype)[None, :, None, None]
                tile = tile.at[:, :e].set(above[:, above.shape[1] - e:] * (1 - ramp) + tile[:, :e] * ramp)
            if j > 0:
                left = row[j - 1]
                e = min(left.shape[2], tile.shape[2], blend)
                ramp = jnp.asarray(np.arange(e) / e, tile.dtype)[None, None, :, None]
                tile = tile.at[:, :, :e].set(left[:, :, left.shape[2] - e:] * (1 - ramp) + tile[:, :, :e] * ramp)
            row[j] = tile  # later tiles blend with this blended tile, as diffusers' in-place update does
            kept.append(tile[:, :keep, :keep])
        out_rows.append(jnp.concatenate(kept, axis=2))
    return jnp.concatenate(out_rows, axis=1)


# One XLA program per tile grid (instead of dozens of small eagerly dispatched ops).
_blend = jax.jit(_blend_tiles, static_argnums=(1, 2))


def tiled_decode(model: DCAE, params, latents: Array, tile_size: int = 512, overlap: int = 64) -> Array:
    """decode() in overlapping tiles, blended linearly over the overlap: bounded memory for large images.

    Args:
      model, params: a DCAE and its params (moved to the device once, then reused by every tile).
      latents: [B, h, w, C_latent], unscaled.
      tile_size, overlap: in output pixels, multiples of f (32 for f32c32); tiles start every tile_size - overlap
        pixels. diffusers' enable_tiling() defaults are 512 / 64; 1024 / 128 avoids flat-area seams at 4K
        (diffusers PR #10510). Same tiles and blending as diffusers' tiled_decode with
        tile_sample_min = tile_size and tile_sample_stride = tile_size - overlap.
    Returns:
      [B, h*f, w*f, in_channels]. Equal to decode() when the image fits one tile; otherwise close but not equal
      (each tile's convolutions and attention see only the tile).
    """
    cfg = model.config
    f = cfg.spatial_compression
    _check_tiles(cfg, tile_size, overlap)
    if latents.ndim != 4 or latents.shape[-1] != cfg.latent_channels:
        raise ValueError(f"latents must be [B, h, w, {cfg.latent_channels}] (channels-last), got "
                         f"{tuple(latents.shape)}")
    params = jax.device_put(params)
    tile, stride = tile_size // f, (tile_size - overlap) // f
    h, w = latents.shape[1:3]
    if h <= tile and w <= tile:
        return _apply(model, params, latents, "decode")
    return _blend(_tiles(model, params, jnp.asarray(latents), tile, stride, "decode"), overlap, tile_size - overlap)


def tiled_encode(model: DCAE, params, images: Array, tile_size: int = 512, overlap: int = 64) -> Array:
    """encode() in overlapping tiles of tile_size pixels starting every tile_size - overlap pixels, blended
    linearly over overlap / f latent cells (diffusers' tiled_encode). Arguments as tiled_decode; images
    [B, H, W, in_channels] with H, W multiples of f -> [B, H/f, W/f, C_latent]."""
    cfg = model.config
    f = cfg.spatial_compression
    _check_tiles(cfg, tile_size, overlap)
    if images.ndim != 4 or images.shape[-1] != cfg.in_channels:
        raise ValueError(f"images must be [B, H, W, {cfg.in_channels}] (channels-last), got {tuple(images.shape)}")
    if images.shape[1] % f or images.shape[2] % f:
        raise ValueError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the DC-AE's "
                         f"spatial compression {f} (config {cfg.name!r}); pad or resize it")
    params = jax.device_put(params)
    stride = tile_size - overlap
    h, w = images.shape[1:3]
    if h <= tile_size and w <= tile_size:
        return _apply(model, params, images, "encode")
    return _blend(_tiles(model, params, jnp.asarray(images), tile_size, stride, "encode"), overlap // f, stride // f)


# ------------------------------------------------------------------------------------------------ utilities

def _init_boxed(model: DCAE, rng: jax.Array):
    side = model.config.spatial_compression
    images = jnp.zeros((1, side, side, model.config.in_channels), jnp.float32)
    return model.init(rng, images)["params"]


def init_params(model: DCAE, rng: jax.Array) -> dict:
    """PyTorch's default initialisation (as a fresh AutoencoderDC), a plain nested dict of fp32 arrays: every conv
    and Linear kernel and bias U(+-1/sqrt(fan_in)) with fan_in = prod(kernel.shape[:-1]), norm weights (and
    BatchNorm variances) 1, norm biases (and means) 0 - the distributions the modules' initialisers declare.

    The values come from one uniform stream cut into leaves, not from `model.init`'s one RNG call per parameter:
    XLA compiles those ~250 separate threefry programs for tens of seconds on CPU, this in about a second.
    """
    return _init_jit(model, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(model: DCAE, rng: jax.Array) -> dict:
    shapes = abstract_params(model)
    total = sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(shapes))
    stream, offset = jax.random.uniform(rng, (total,), jnp.float32, -1.0, 1.0), 0

    def fill(tree: dict) -> dict:
        nonlocal offset
        kernel, out = tree.get("kernel"), {}
        for name, leaf in tree.items():
            if isinstance(leaf, dict):
                out[name] = fill(leaf)
            elif kernel is not None:  # a conv / Linear kernel or its bias
                size = math.prod(leaf.shape)
                bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))
                out[name] = stream[offset:offset + size].reshape(leaf.shape) * bound
                offset += size
            else:  # RMSNorm / BatchNorm
                out[name] = jnp.full(leaf.shape, 1.0 if name in ("weight", "var") else 0.0, jnp.float32)
        return out

    return fill(shapes)


def abstract_params(model: DCAE) -> dict:
    """ShapeDtypeStructs of every parameter, without allocating."""
    return nn.unbox(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def logical_axes(model: DCAE) -> dict:
    """The logical axis names of every parameter (a tree of PartitionSpec)."""
    return nn.get_partition_spec(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def load_pretrained(path, config: DCAEConfig | None = None):
    """(DCAE(cfg), params) from a diffusers AutoencoderDC folder (or a pipeline folder with vae/), or an original
    mit-han-lab DC-AE checkpoint (model.safetensors folder, .safetensors or .pt/.pth file).

    config: the DCAEConfig to use instead of the stored / recognised one (checked against the weights); e.g.
    `sana_jax.dcae.get("dc-ae-f32c32-sana-1.1", compute_dtype="bfloat16")`.
    """
    from sana_conversion.dcae import load_pretrained as _load

    return _load(path, config=config)
