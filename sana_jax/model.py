"""The SANA transformer (SanaMS family) in Flax linen, channels-last.

Reads top to bottom: helpers -> initialisers -> layers -> attention -> FFN -> block -> model -> utilities.
Parameter names mirror the official checkpoint (`x_embedder`, `t_block`, `blocks.attn.qkv`, ...) so conversion is
a table. Shapes: B batch, N = h*w image tokens, L caption tokens, H heads, D head dim, C channels (C = hidden D
of the model where unambiguous). Blocks are stacked under `nn.scan`: every block parameter has a leading
`layers` axis.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax import glu_conv
from sana_jax.configs import SanaConfig
from sana_jax.linear_attention import relu_linear_attention_pallas, relu_linear_attention_xla_packed
from sana_jax.ops import accum_dtype, add_bias, on_cuda

Array = jax.Array
_FP16_MAX = 65504.0


def compute_dtype(cfg: SanaConfig) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def matmul_precision(cfg: SanaConfig) -> jax.lax.Precision:
    """fp32 models compute fp32 matmuls exactly (no TF32 on GPU/TPU), as the parity targets require."""
    wide = cfg.compute_dtype in ("float32", "float64")
    return jax.lax.Precision.HIGHEST if wide else jax.lax.Precision.DEFAULT


def resolve_attention_impl(cfg: SanaConfig) -> str:
    """The cross-attention kernel `cfg.attention_impl` stands for on this process's default backend."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    sixteen_bit = cfg.compute_dtype in ("bfloat16", "float16")
    head_dim_ok = cfg.cross_head_dim % 8 == 0 and cfg.cross_head_dim <= 128  # cuDNN flash attention's limits
    return "cudnn" if sixteen_bit and head_dim_ok and on_cuda() else "xla"


def resolve_glu_impl(cfg: SanaConfig) -> str:
    """The depthwise-conv + gating kernel `cfg.glu_impl` stands for on this process's default backend."""
    if cfg.glu_impl != "auto":
        return cfg.glu_impl
    return "pallas" if on_cuda() and cfg.compute_dtype != "float64" else "xla"


def resolve_linear_attn_impl(cfg: SanaConfig) -> str:
    """The LiteLA kernel `cfg.linear_attn_impl` stands for on this process's default backend."""
    if cfg.linear_attn_impl != "auto":
        return cfg.linear_attn_impl
    return "pallas" if on_cuda() and cfg.compute_dtype != "float64" else "xla"


def _interpret_pallas() -> bool:
    """Pallas kernels compile for CUDA GPUs only; elsewhere an explicit "pallas" impl runs in the interpreter."""
    return not on_cuda()


def on_batch_shards(fn, batched: tuple[Array, ...], shared: tuple[Array, ...] = ()) -> Array:
    """fn(*batched, *shared) -> [B, ...], run by each device on its own rows of the batch.

    For the Pallas kernels: XLA's SPMD partitioner cannot split their custom calls, so on a batch-sharded mesh it
    would gather the whole batch onto every device and run the kernel there (N times the work and an all-gather
    of the activations per call). Here a shard_map over the mesh axes the logical `activation_batch` axis maps to
    gives each device its rows (whole: an axis the rows are not split over, e.g. `tensor`, is gathered at the map's
    entry); `shared` (weights) enter replicated and their gradients are summed over the map.
    Without such axes (no mesh, or no logical rules: single device), or when they do not divide B, fn runs as is.
    """
    mesh = jax.sharding.get_abstract_mesh()
    spec = nn.logical_to_mesh_axes(("activation_batch",))[0]
    names = (spec,) if isinstance(spec, str) else tuple(spec or ())
    axes = tuple(a for a in names if a in mesh.axis_names and mesh.shape[a] > 1)
    devices = math.prod(mesh.shape[a] for a in axes)
    if not axes or any(a.shape[0] % devices for a in batched):
        return fn(*batched, *shared)
    rows = jax.sharding.PartitionSpec(axes)
    in_specs = (rows,) * len(batched) + (jax.sharding.PartitionSpec(),) * len(shared)
    # check_vma=False: pallas_call has no varying-axes rule; replicated inputs' cotangents are then psum'd.
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=rows, check_vma=False)(*batched, *shared)


def t2i_modulate(x: Array, shift: Array, scale: Array) -> Array:
    return x * (1 + scale) + shift


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm without affine parameters, statistics in fp32 (two-pass variance, as torch)."""
    x32 = x.astype(accum_dtype(x.dtype))
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def timestep_frequencies(half: int, max_period: float, dtype) -> np.ndarray:
    """exp(-ln(max_period) * i / half), i < half: the argument rounded in `dtype` as SANA computes it, the exp
    correctly rounded. XLA's fp32 exp is 1 ulp off torch's for 14 of the 128 SANA frequencies, which at t near
    1000 moves the embedding by ~3e-5; a correctly rounded constant matches torch on 125 of 128."""
    dtype = np.dtype(dtype)
    arg = (dtype.type(-math.log(max_period)) * np.arange(half, dtype=dtype)) / dtype.type(half)
    return np.exp(arg.astype(np.float64)).astype(dtype)


def timestep_embedding(t: Array, dim: int = 256, max_period: float = 10000.0, dtype=jnp.float32) -> Array:
    """[B] -> [B, dim] sinusoidal embedding (fp32 as SANA), [cos | sin], freqs exp(-ln(max_period) * i / (dim/2))."""
    freqs = jnp.asarray(timestep_frequencies(dim // 2, max_period, dtype))
    args = t.astype(dtype)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed_2d(dim: int, grid_hw: tuple[int, int], base_size: int, interpolation: float) -> np.ndarray:
    """[h*w, dim] fp32 2-D sin-cos table for a h x w token grid (row-major), as SANA recomputes it per grid.

    Coordinates are i / (h / base_size) / interpolation (resp. j, w); the first dim/2 channels encode the
    column (w) coordinate, the last dim/2 the row (h) coordinate, each as [sin | cos]; fp64 then cast to fp32.
    """
    h, w = grid_hw
    rows = np.arange(h, dtype=np.float32) / (h / base_size) / interpolation
    cols = np.arange(w, dtype=np.float32) / (w / base_size) / interpolation
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))  # [dim/4]

    def embed_1d(pos):  # [h*w] -> [h*w, dim/2]
        out = np.einsum("m,d->md", pos.astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_cols, grid_rows = np.meshgrid(cols, rows)  # each [h, w]
    table = np.concatenate([embed_1d(grid_cols.reshape(-1)), embed_1d(grid_rows.reshape(-1))], axis=1)
    return table.astype(np.float32)


# Initialisers: SanaMS.initialize_weights (sana-original.md 1.8). Torch Linear [out, in] is a Flax kernel [in, out].
_xavier = nn.initializers.xavier_uniform()
_normal_002 = nn.initializers.normal(0.02)


def _torch_default_uniform(key, shape, dtype=jnp.float32, fan_in: int = 1):
    """PyTorch's default Conv/Linear init (kaiming_uniform a=sqrt(5), and its bias): U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv_default_init(fan_in: int):
    return lambda key, shape, dtype=jnp.float32: _torch_default_uniform(key, shape, dtype, fan_in)


def _randn_scaled(scale: float):
    """randn * scale, e.g. scale_shift_table = randn(6, D) / sqrt(D)."""
    return lambda key, shape, dtype=jnp.float32: jax.random.normal(key, shape, dtype) * scale


def _constant(value: float):
    return lambda key, shape, dtype=jnp.float32: jnp.full(shape, value, dtype)


class Linear(nn.Module):
    """y = x @ kernel + bias in the compute dtype; kernel [in, out] (torch weight transposed).

    With `parts` > 1 it returns y's `parts` equal column blocks, each from a product of its own: contiguous arrays
    where a consumer needs them apart (cuDNN attention takes the keys and values of `kv_linear` as two tensors, and
    slicing them out of one product copies both: 1.17 ms of the 1.6B b32 forward on H100)."""

    features: int
    config: SanaConfig
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    kernel_init: Any = _xavier
    parts: int = 1

    @nn.compact
    def __call__(self, x: Array) -> Array | tuple[Array, ...]:
        dtype = compute_dtype(self.config)
        kernel = self.param("kernel", nn.with_logical_partitioning(self.kernel_init, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        biases = [None] * self.parts
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.axes[1:]),
                              (self.features,), jnp.float32)
            biases = jnp.split(bias.astype(dtype), self.parts)
        x, outputs = x.astype(dtype), []
        for part, part_bias in zip(jnp.split(kernel.astype(dtype), self.parts, axis=1), biases):
            y = jnp.matmul(x, part, precision=matmul_precision(self.config))
            outputs.append(y if part_bias is None else add_bias(y, part_bias))
        return outputs[0] if self.parts == 1 else tuple(outputs)


class RMSNorm(nn.Module):
    """weight * x * rsqrt(mean(x^2) + eps) over the last axis, normalised in fp32, cast back."""

    eps: float
    init_scale: float = 1.0

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.with_logical_partitioning(_constant(self.init_scale), ("embed",)),
                            (x.shape[-1],), jnp.float32)
        x32 = x.astype(accum_dtype(x.dtype))
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * weight).astype(x.dtype)


class TimestepEmbedder(nn.Module):
    """[B] scalar -> [B, D]: 256-d sinusoid, Linear, SiLU, Linear (official `t_embedder.mlp.{0,2}`)."""

    config: SanaConfig

    @nn.compact
    def __call__(self, t: Array) -> Array:
        d = self.config.hidden_size
        h = timestep_embedding(t, 256, dtype=accum_dtype(compute_dtype(self.config)))
        h = Linear(d, self.config, ("time", "embed"), kernel_init=_normal_002, name="mlp_0")(h)
        return Linear(d, self.config, ("embed", "embed_out"), kernel_init=_normal_002, name="mlp_2")(nn.silu(h))


class LiteLA(nn.Module):
    """Linear self-attention: qkv (no bias) -> [q/k RMSNorm over all heads] -> ReLU linear attention -> proj."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, N, C] -> [B, N, C]
        cfg = self.config
        b, n, c = x.shape
        qkv = Linear(3 * c, cfg, ("embed", "heads"), use_bias=False, name="qkv")(x)  # [B, N, 3C]
        # Head h owns channels [32h, 32h + 32) of each of q, k, v: (source, first column) of q, k and v.
        sources, layout = (qkv,), ((0, 0), (0, c), (0, 2 * c))
        if cfg.qk_norm:
            q, k, _ = jnp.split(qkv, 3, axis=-1)
            sources = (RMSNorm(cfg.norm_eps, name="q_norm")(q), RMSNorm(cfg.norm_eps, name="k_norm")(k), qkv)
            layout = ((0, 0), (1, 0), (2, 2 * c))
        args = (layout, cfg.num_heads, cfg.linear_head_dim, cfg.linear_attn_eps)
        if resolve_linear_attn_impl(cfg) == "pallas":
            kernel = lambda *src: relu_linear_attention_pallas(src, *args, _interpret_pallas())  # noqa: E731
            out = on_batch_shards(kernel, sources)  # [B, N, C]
        else:
            out = relu_linear_attention_xla_packed(sources, *args)
        out = Linear(c, cfg, ("heads", "embed"), name="proj")(out)
        if out.dtype == jnp.float16:  # SANA clips here under fp16 autocast: LiteLA outputs can exceed fp16.
            out = jnp.clip(out, -_FP16_MAX, _FP16_MAX)
        return out


class CrossAttention(nn.Module):
    """Softmax cross-attention from image tokens to caption tokens, additive key mask, fp32 softmax."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array, y: Array, mask_bias: Array) -> Array:
        """x [B, N, C], y [B, L, C] (normed caption), mask_bias [B, L] fp32 (0 keep, -10000 pad) -> [B, N, C]."""
        cfg = self.config
        b, n, c = x.shape
        q = Linear(c, cfg, ("embed", "heads"), name="q_linear")(x)  # [B, N, C]
        k, v = Linear(2 * c, cfg, ("embed", "heads"), name="kv_linear", parts=2)(y)  # [B, L, C] each
        if cfg.cross_norm:
            q = RMSNorm(cfg.cross_norm_eps, name="q_norm")(q)
            k = RMSNorm(cfg.cross_norm_eps, name="k_norm")(k)
        h, d = cfg.num_cross_heads, cfg.cross_head_dim
        q, k, v = q.reshape(b, n, h, d), k.reshape(b, -1, h, d), v.reshape(b, -1, h, d)
        if resolve_attention_impl(cfg) == "cudnn":  # SanaTransformer put the kept keys first (`kept_keys_first`)
            out = attention_over_leading_keys(q, k, v, mask_bias, implementation="cudnn")
        else:
            precision = matmul_precision(cfg)
            logits = jnp.einsum("bnhd,blhd->bhnl", q, k, precision=precision).astype(accum_dtype(q.dtype))
            weights = jax.nn.softmax(logits / math.sqrt(d) + mask_bias[:, None, None, :], axis=-1)  # [B, H, N, L]
            out = jnp.einsum("bhnl,blhd->bnhd", weights.astype(v.dtype), v, precision=precision)
        return Linear(c, cfg, ("heads", "embed"), name="proj")(out.reshape(b, n, c))


def kept_keys_first(mask_bias: Array, *rows: Array) -> tuple[Array, ...]:
    """(mask_bias, *rows) with each image's kept caption tokens moved to the front, by a stable sort (the identity
    for the usual right-padded caption): mask_bias [B, L] (0 keep, -10000 drop), rows [B, L, ...].

    Cross-attention does not depend on the order of its keys, and the keys and values are per-token projections of
    the caption, so SanaTransformer sorts the caption once for all blocks (`attention_over_leading_keys`); sorting
    each block's keys and values cost a gather of both per block (1.27 ms of the 1.6B b32 forward on H100)."""
    order = jnp.argsort(mask_bias != 0, axis=-1, stable=True)  # [B, L], kept tokens first
    return (jnp.take_along_axis(mask_bias, order, axis=1), *(permute_rows(r, order) for r in rows))


def attention_over_leading_keys(q: Array, k: Array, v: Array, mask_bias: Array, implementation: str) -> Array:
    """jax.nn.dot_product_attention (cuDNN flash attention in the model) of q [B, N, H, D] over k, v [B, L, H, D]
    whose kept keys come first (`kept_keys_first`; mask_bias [B, L]: 0 keep, -10000 drop) -> [B, N, H, D].

    cuDNN's padding mask then takes a length per image; an additive bias would be read by cuDNN as a full
    [B, 1, N, L] tensor, once per head. Same value as the bias: a dropped key's weight exp(-10000 + ...) is 0 in
    fp32. An image with no kept key gets no mask at all: the -10000 shifts all its logits alike, which softmax
    ignores (up to the rounding of the shifted logits)."""
    keep = mask_bias == 0
    lengths = jnp.sum(keep, axis=-1, dtype=jnp.int32)
    lengths = jnp.where(lengths == 0, keep.shape[1], lengths)
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), key_value_seq_lengths=lengths,
                                        implementation=implementation)


@jax.custom_vjp
def permute_rows(x: Array, order: Array) -> Array:
    """x [B, L, ...] with its rows reordered per image: out[b, i] = x[b, order[b, i]]; order [B, L] a permutation.

    The gradient is the inverse permutation of the cotangent, a gather: autodiff of take_along_axis would scatter-add
    (2 x 1.0 ms per 1.6B b8 training step on H100), as it cannot know that the indices are a permutation."""
    return jnp.take_along_axis(x, order.reshape(*order.shape, *(1,) * (x.ndim - 2)), axis=1)


def _permute_rows_fwd(x, order):
    return permute_rows(x, order), order


def _permute_rows_bwd(order, cotangent):
    return permute_rows(cotangent, jnp.argsort(order, axis=1)), None


permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


class Conv1x1(nn.Module):
    """1x1 convolution on [B, h, w, C_in] with an HWIO kernel [1, 1, C_in, C_out]. With `bias_to_consumer` it
    returns (x @ kernel, bias) for a consumer that adds the bias itself (DepthwiseGLU's fused kernel)."""

    features: int
    config: SanaConfig
    axes: tuple[str | None, str | None]
    use_bias: bool = True
    bias_to_consumer: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array | tuple[Array, Array]:
        dtype, c_in = compute_dtype(self.config), x.shape[-1]
        init = _conv_default_init(c_in)
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None) + self.axes),
                            (1, 1, c_in, self.features), jnp.float32)
        y = jnp.einsum("bhwi,io->bhwo", x.astype(dtype), kernel[0, 0].astype(dtype),
                       precision=matmul_precision(self.config))
        if not self.use_bias:
            return y
        bias = self.param("bias", nn.with_logical_partitioning(init, self.axes[1:]), (self.features,), jnp.float32)
        return (y, bias.astype(dtype)) if self.bias_to_consumer else add_bias(y, bias.astype(dtype))


class DepthwiseGLU(nn.Module):
    """SiLU(pre + pre_bias) (the inverted conv's output), 3x3 depthwise convolution (padding 1, bias; HWIO kernel
    [3, 3, 1, 2F]), then value * SiLU(gate) over its two halves: [B, h, w, 2F] -> [B, h, w, F]
    (sana_jax/glu_conv.py)."""

    config: SanaConfig

    @nn.compact
    def __call__(self, pre: Array, pre_bias: Array) -> Array:
        dtype, c = compute_dtype(self.config), pre.shape[-1]
        init = _conv_default_init(9)  # torch fan_in of a depthwise kernel = 1 * 3 * 3
        kernel = self.param("kernel", nn.with_logical_partitioning(init, (None, None, None, "mlp")),
                            (3, 3, 1, c), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(init, ("mlp",)), (c,), jnp.float32)
        kernel, bias = kernel[:, :, 0].astype(dtype), bias.astype(dtype)  # the conv's weights in the compute dtype
        pre, pre_bias = pre.astype(dtype), pre_bias.astype(dtype)
        if resolve_glu_impl(self.config) == "pallas":
            kernel_fn = lambda *a: glu_conv.silu_glu_dwconv_pallas(*a, _interpret_pallas())  # noqa: E731
            return on_batch_shards(kernel_fn, (pre,), (pre_bias, kernel, bias))
        return glu_conv.silu_glu_dwconv_xla(pre, pre_bias, kernel, bias)


class GLUMBConv(nn.Module):
    """1x1 conv (C -> 2F) + SiLU -> 3x3 depthwise -> value * SiLU(gate) -> 1x1 conv (F -> C, no bias)."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array, grid_hw: tuple[int, int]) -> Array:  # [B, N, C] -> [B, N, C]
        cfg = self.config
        b, n, c = x.shape
        hidden = cfg.ffn_hidden
        h = x.reshape(b, *grid_hw, c)
        pre, pre_bias = Conv1x1(2 * hidden, cfg, ("embed", "mlp"), bias_to_consumer=True, name="inverted_conv")(h)
        h = DepthwiseGLU(cfg, name="depth_conv")(pre, pre_bias)  # [B, h, w, F]: the value half gated by the gate half
        h = Conv1x1(c, cfg, ("mlp", "embed"), use_bias=False, name="point_conv")(h)
        return h.reshape(b, n, c)


class SanaBlock(nn.Module):
    """SanaMSBlock: gated+modulated LiteLA, plain cross-attention residual, gated+modulated GLUMBConv.

    Written as a scan body: `(x, (y, mask_bias, t0)) -> (x, None)`; sows its output as intermediate `out`.
    """

    config: SanaConfig
    grid_hw: tuple[int, int]

    @nn.compact
    def __call__(self, x: Array, y: Array, mask_bias: Array, t0: Array):
        cfg = self.config
        d = cfg.hidden_size
        table = self.param("scale_shift_table", nn.with_logical_partitioning(_randn_scaled(d ** -0.5),
                                                                             (None, "embed")), (6, d), jnp.float32)
        mod = table[None].astype(x.dtype) + t0.reshape(x.shape[0], 6, d)  # [B, 6, C]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)  # [B, 1, C]

        x = x + gate_msa * LiteLA(cfg, name="attn")(t2i_modulate(layer_norm(x), shift_msa, scale_msa))
        # No norm, gate or modulation around cross-attention: that is SANA's block, not an omission.
        x = x + CrossAttention(cfg, name="cross_attn")(x, y, mask_bias)
        x = x + gate_mlp * GLUMBConv(cfg, name="mlp")(t2i_modulate(layer_norm(x), shift_mlp, scale_mlp),
                                                     self.grid_hw)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        self.sow("intermediates", "out", x)
        return x, None


_REMAT_POLICIES = {
    "full": None,  # save nothing inside a block: recompute it all in the backward pass
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}


def _scanned_blocks(cfg: SanaConfig, grid_hw: tuple[int, int]) -> nn.Module:
    block = SanaBlock
    if cfg.remat_policy != "none":
        block = nn.remat(SanaBlock, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    scanned = nn.scan(
        block,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast),
        length=cfg.depth,
        unroll=cfg.depth if cfg.unroll_blocks else 1,
        metadata_params={nn.PARTITION_NAME: "layers"},
    )
    return scanned(cfg, grid_hw, name="blocks")


class SanaTransformer(nn.Module):
    """SANA text-to-image transformer (SANA-1.0, SANA-1.5 and SANA-Sprint are configurations of it)."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array, timestep: Array, y: Array, mask: Array | None = None,
                 guidance: Array | None = None, return_logvar: bool = False):
        """Predict the flow velocity.

        Args:
          x: [B, H, W, C_in] latents, channels-last; H, W multiples of patch_size.
          timestep: [B] float, embedded as given (SANA/1.5: 0..1000, already integer-truncated by the sampler
            as SANA does; Sprint: continuous t in [0, 1]) - diffusers' SanaTransformer2DModel convention.
          y: [B, L, caption_channels] caption features ([B, 1, L, C] as the original passes them is accepted).
          mask: [B, L] 1 keep / 0 pad over caption tokens (cross-attention keys only); None keeps all.
          guidance: [B] raw guidance scale (Sprint only, e.g. 4.5), embedded as guidance * guidance_embeds_scale.
          return_logvar: Sprint only: also return logvar_linear(t) [B, 1], the sCM loss weight.
        Returns:
          [B, H, W, C_out] in the compute dtype (and logvar [B, 1] if return_logvar).
        """
        cfg = self.config
        dtype, d, p = compute_dtype(cfg), cfg.hidden_size, cfg.patch_size
        b, height, width = _check_inputs(cfg, x, timestep, y, mask, guidance, return_logvar)
        if y.ndim == 4:
            y = y[:, 0]
        grid_hw = (height // p, width // p)
        if mask is None:
            mask = jnp.ones(y.shape[:2], jnp.float32)
        mask_bias = (1.0 - mask.astype(jnp.float32)) * -10000.0  # [B, L], as SANA's SDPA path and diffusers

        # Patch embedding: Conv(kernel = stride = p) -> tokens [B, N, D] in row-major (h, w) order.
        x = PatchEmbed(cfg, name="x_embedder")(x)
        self.sow("intermediates", "x_embedder_out", x)
        if cfg.use_pe:
            pos = sincos_pos_embed_2d(d, grid_hw, cfg.sample_size // p, cfg.pe_interpolation)
            x = x + jnp.asarray(pos, dtype)[None]

        t = TimestepEmbedder(cfg, name="t_embedder")(timestep)  # [B, D]
        self.sow("intermediates", "t_embedder_out", t)
        if cfg.guidance_embeds:
            g = TimestepEmbedder(cfg, name="cfg_embedder")(guidance * cfg.guidance_embeds_scale)
            self.sow("intermediates", "cfg_embedder_out", g)
            t = t + g
        t0 = Linear(6 * d, cfg, ("embed", "modulation"), kernel_init=_normal_002, name="t_block")(nn.silu(t))
        self.sow("intermediates", "t_block_out", t0)

        y = YEmbedder(cfg, name="y_embedder")(y.astype(dtype))  # [B, L, D]
        self.sow("intermediates", "y_embedder_out", y)
        # Once, on all L projected tokens (padding included), before any masking.
        y = RMSNorm(cfg.norm_eps, cfg.y_norm_scale_factor, name="attention_y_norm")(y)
        self.sow("intermediates", "attention_y_norm_out", y)
        if resolve_attention_impl(cfg) == "cudnn":
            mask_bias, y = kept_keys_first(mask_bias, y)

        x, _ = _scanned_blocks(cfg, grid_hw)(x, y, mask_bias, t0)

        x = FinalLayer(cfg, name="final_layer")(x, t)  # [B, N, p*p*C_out]
        self.sow("intermediates", "final_layer_out", x)
        x = x.reshape(b, *grid_hw, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
        out = x.reshape(b, height, width, cfg.out_channels)
        if cfg.logvar:
            logvar = Linear(1, cfg, ("embed", None), name="logvar_linear")(t)
            if return_logvar:
                return out, logvar
        return out


class PatchEmbed(nn.Module):
    """Conv2d(C_in -> D, kernel = stride = p, bias) flattened to tokens: [B, H, W, C_in] -> [B, N, D]."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        p, c_in, d = cfg.patch_size, x.shape[-1], cfg.hidden_size
        dtype = compute_dtype(cfg)
        # xavier_uniform on the torch (D, C_in*p*p) view: fan_in = C_in*p*p, fan_out = D.
        kernel_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=3)
        kernel = self.param("kernel", nn.with_logical_partitioning(kernel_init, (None, None, "channels",
                                                                                       "embed")),
                            (p, p, c_in, d), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(_conv_default_init(c_in * p * p), ("embed",)),
                          (d,), jnp.float32)
        y = jax.lax.conv_general_dilated(x.astype(dtype), kernel.astype(dtype), window_strides=(p, p),
                                         padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                         precision=matmul_precision(cfg))
        y = add_bias(y, bias.astype(dtype))
        return y.reshape(y.shape[0], -1, d)


class YEmbedder(nn.Module):
    """Caption projection `y_proj`: fc1 (C_cap -> D), GELU(tanh), fc2 (D -> D)."""

    config: SanaConfig

    @nn.compact
    def __call__(self, y: Array) -> Array:
        cfg = self.config
        h = Linear(cfg.hidden_size, cfg, ("caption", "embed"), kernel_init=_normal_002, name="fc1")(y)
        h = nn.gelu(h, approximate=True)
        return Linear(cfg.hidden_size, cfg, ("embed", "embed_out"), kernel_init=_normal_002, name="fc2")(h)


class FinalLayer(nn.Module):
    """T2IFinalLayer: LN, modulate with table [2, D] + t (the raw timestep embedding), Linear to p*p*C_out."""

    config: SanaConfig

    @nn.compact
    def __call__(self, x: Array, t: Array) -> Array:
        cfg = self.config
        d = cfg.hidden_size
        table = self.param("scale_shift_table", nn.with_logical_partitioning(_randn_scaled(d ** -0.5),
                                                                             (None, "embed")), (2, d), jnp.float32)
        shift, scale = jnp.split(table[None].astype(x.dtype) + t[:, None].astype(x.dtype), 2, axis=1)
        x = t2i_modulate(layer_norm(x), shift, scale)
        return Linear(cfg.patch_size ** 2 * cfg.out_channels, cfg, ("embed", "channels"), name="linear")(x)


def _check_inputs(cfg, x, timestep, y, mask, guidance, return_logvar) -> tuple[int, int, int]:
    """Shape checks with messages that name the argument and both shapes; returns (B, H, W)."""
    if x.ndim != 4 or x.shape[-1] != cfg.in_channels:
        raise ValueError(f"x must be [B, H, W, {cfg.in_channels}] (channels-last), got {tuple(x.shape)}")
    b, height, width, _ = x.shape
    if height % cfg.patch_size or width % cfg.patch_size:
        raise ValueError(f"x spatial size {height}x{width} is not a multiple of patch_size {cfg.patch_size}")
    if timestep.shape != (b,):
        raise ValueError(f"timestep must be [B] = [{b}], got {tuple(timestep.shape)}")
    if y.ndim == 4 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 3 or y.shape[0] != b or y.shape[-1] != cfg.caption_channels:
        raise ValueError(f"y must be [B, L, {cfg.caption_channels}] with B = {b}, got {tuple(y.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(y.shape[:2]):
        raise ValueError(f"mask must be [B, L] = {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
    if cfg.guidance_embeds and (guidance is None or tuple(guidance.shape) != (b,)):
        got = None if guidance is None else tuple(guidance.shape)
        raise ValueError(f"config {cfg.name!r} embeds guidance: pass guidance [B] = [{b}], got {got}")
    if not cfg.guidance_embeds and guidance is not None:
        raise ValueError(f"config {cfg.name!r} has no guidance embedder (guidance_embeds=False); got guidance")
    if return_logvar and not cfg.logvar:
        raise ValueError(f"config {cfg.name!r} has no logvar head (logvar=False)")
    return b, height, width


# Parameters the model applies at full width: the RMSNorm weights scale the fp32-normalised activations. Every
# other parameter (kernels, biases, modulation tables) is cast to the compute dtype before each use.
_FULL_WIDTH_PARAMS = frozenset({"weight"})


def compute_copies(cfg: SanaConfig, params):
    """params with every leaf the model casts to the compute dtype before each use already cast (the RMSNorm
    weights, applied at full width, and leaves no wider than the compute dtype stay as they are).

    The model's outputs are bit-identical for either tree. Differentiating this one gives the gradients of the
    16-bit weights the matmuls read, as torch autocast does: 16-bit gradients, half the bytes of the fp32 params'
    to write and read in the training step (sana_jax.train.step)."""
    dtype = compute_dtype(cfg)

    def cast(path, leaf):
        narrower = jnp.finfo(dtype).bits < jnp.finfo(leaf.dtype).bits
        return leaf.astype(dtype) if narrower and path[-1].key not in _FULL_WIDTH_PARAMS else leaf

    return jax.tree_util.tree_map_with_path(cast, params)
