"""SANA's LiteLA kernel in JAX: ReLU feature map, linear attention, fp32 accumulation.

One layout across the project: q, k, v are [B, N, H, D] (batch, tokens, heads, head dim). The maths is in
kernels/linear_attn/README.md; the PyTorch sibling is `sana_kernels.linear_attn.naive.relu_linear_attention`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_HIGHEST = jax.lax.Precision.HIGHEST


def relu_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, eps: float = 1e-8) -> jax.Array:
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps) with q, k <- ReLU(q), ReLU(k).

    Args:
      q, k, v: [B, N, H, D] in any float dtype (q, k before the ReLU).
      eps: denominator eps; SanaMS builds LiteLA with 1e-8, diffusers uses 1e-15.
    Returns:
      [B, N, H, D] in v's dtype. Everything after the ReLU runs in fp32 (fp64 for fp64 inputs) whatever the
      input dtype, as the original's `fp32_attention` (sums over N tokens overflow or lose all precision in 16-bit).
    """
    acc = jnp.promote_types(v.dtype, jnp.float32)
    q = jax.nn.relu(q).astype(acc)
    k = jax.nn.relu(k).astype(acc)
    out_dtype = v.dtype
    v = v.astype(acc)
    # SANA pads v with a channel of ones so that one matmul gives numerator and denominator together:
    # row D of vk is sum_m k_m, so row D of the output is the normaliser sum_m k_m . q_n.
    v_pad = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)  # [B, N, H, D+1]
    vk = jnp.einsum("bmhe,bmhd->bhed", v_pad, k, precision=_HIGHEST)  # [B, H, D+1, D]
    out = jnp.einsum("bhed,bnhd->bnhe", vk, q, precision=_HIGHEST)  # [B, N, H, D+1]
    out = out[..., :-1] / (out[..., -1:] + eps)
    return out.astype(out_dtype)


# ------------------------------------------------------------------------------------------ Pallas (GPU) kernel
#
# Two passes, as the Triton kernels of the torch path (kernels/linear_attn/fused.py), reading q, k, v straight out
# of the projection output (no split, transpose, fp32 copy or ones-padding in memory):
#   state   grid (split of tokens, b*h):  h = sum relu(k)^T v [D, D],  z = sum relu(k) [D]   (fp32 partials)
#   output  grid (block of tokens, b*h):  o = relu(q) h / (relu(q) . z + eps)
# bf16 inputs: relu(k), v, relu(q) are exact in bf16, so bf16 x bf16 tensor-core products with fp32 accumulation
# are the fp32 products; the fp32 state h is split exactly into three bf16 parts (8 + 8 + 8 significand bits) for
# the output product. So both products are fp32-exact, as the XLA sibling's HIGHEST-precision fp32 einsums; only
# the order of the fp32 sums differs. Other dtypes run the products in fp32 (precision HIGHEST).

_TOKENS_PER_STEP = 64  # rows of a [T, D] x [D, D] product per step (the torch kernels' measured best on H100)
_TOKENS_PER_SPLIT = 512  # tokens per state program: fixed, so the fp32 summation order is the same on every GPU


def _head_width(head_dim: int) -> int:
    """Padded head width of a program: a power of two (Triton blocks), at least 16 (tensor-core products)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _state_kernel(k_ref, v_ref, h_ref, z_ref, *, tokens, heads, head_dim, k_col, v_col):
    from jax.experimental.pallas import triton as plgpu

    split, bh = pl.program_id(0), pl.program_id(1)
    b, head = bh // heads, bh % heads
    width = _head_width(head_dim)
    cols_ok = (jnp.arange(width) < head_dim)[None, :]

    def step(i, carry):
        h, z = carry
        t0 = split * _TOKENS_PER_SPLIT + i * _TOKENS_PER_STEP
        ok = ((t0 + jnp.arange(_TOKENS_PER_STEP)) < tokens)[:, None] & cols_ok
        rows = pl.ds(b * tokens + t0, _TOKENS_PER_STEP)
        k = plgpu.load(k_ref.at[rows, pl.ds(k_col + head * head_dim, width)], mask=ok, other=0)
        v = plgpu.load(v_ref.at[rows, pl.ds(v_col + head * head_dim, width)], mask=ok, other=0)
        k = jnp.maximum(k, 0)
        precision = None if k.dtype == jnp.bfloat16 else jax.lax.Precision.HIGHEST
        h = h + jnp.dot(k.T, v, precision=precision, preferred_element_type=jnp.float32)  # [width, width]
        z = z + jnp.sum(k.astype(jnp.float32), axis=0, keepdims=True)  # [1, width]
        return h, z

    init = (jnp.zeros((width, width), jnp.float32), jnp.zeros((1, width), jnp.float32))
    h, z = jax.lax.fori_loop(0, _TOKENS_PER_SPLIT // _TOKENS_PER_STEP, step, init)
    index = split * pl.num_programs(1) + bh
    plgpu.store(h_ref.at[pl.ds(index * width, width), :], h)
    plgpu.store(z_ref.at[pl.ds(index, 1), :], z)


def _output_kernel(q_ref, h_ref, z_ref, o_ref, *, tokens, heads, head_dim, q_col, eps):
    from jax.experimental.pallas import triton as plgpu

    block, bh = pl.program_id(0), pl.program_id(1)
    b, head = bh // heads, bh % heads
    width = _head_width(head_dim)
    t0 = block * _TOKENS_PER_STEP
    ok = ((t0 + jnp.arange(_TOKENS_PER_STEP)) < tokens)[:, None] & (jnp.arange(width) < head_dim)[None, :]
    rows = pl.ds(b * tokens + t0, _TOKENS_PER_STEP)
    q = jnp.maximum(plgpu.load(q_ref.at[rows, pl.ds(q_col + head * head_dim, width)], mask=ok, other=0), 0)
    h = plgpu.load(h_ref.at[pl.ds(bh * width, width), :])  # [width, width] fp32
    z = plgpu.load(z_ref.at[pl.ds(bh, 1), :])  # [1, width] fp32
    if q.dtype == jnp.bfloat16:
        high = h.astype(jnp.bfloat16)
        rest = h - high.astype(jnp.float32)
        middle = rest.astype(jnp.bfloat16)
        low = (rest - middle.astype(jnp.float32)).astype(jnp.bfloat16)
        num = sum(jnp.dot(q, part, preferred_element_type=jnp.float32) for part in (high, middle, low))
    else:
        num = jnp.dot(q.astype(jnp.float32), h, precision=jax.lax.Precision.HIGHEST,
                      preferred_element_type=jnp.float32)
    den = jnp.sum(q.astype(jnp.float32) * z, axis=1, keepdims=True) + eps
    plgpu.store(o_ref.at[rows, pl.ds(head * head_dim, width)], (num / den).astype(o_ref.dtype), mask=ok)


def _pallas_forward(q_src, k_src, v_src, columns, heads, head_dim, eps, interpret):
    from jax.experimental.pallas import triton as plgpu

    # Triton's defaults (4 warps), named: without compiler params Pallas picks its GPU backend from the
    # jax_pallas_use_mosaic_gpu flag, True by default in jax 0.10, and Mosaic GPU cannot lower these Triton kernels.
    params = None if interpret else plgpu.CompilerParams()
    batch, tokens = q_src.shape[:2]
    width = _head_width(head_dim)
    splits = pl.cdiv(tokens, _TOKENS_PER_SPLIT)
    q_col, k_col, v_col = columns
    flat = [a.reshape(batch * tokens, a.shape[-1]) for a in (q_src, k_src, v_src)]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    h, z = pl.pallas_call(
        functools.partial(_state_kernel, tokens=tokens, heads=heads, head_dim=head_dim, k_col=k_col, v_col=v_col),
        out_shape=(jax.ShapeDtypeStruct((splits * batch * heads * width, width), jnp.float32),
                   jax.ShapeDtypeStruct((splits * batch * heads, width), jnp.float32)),
        grid=(splits, batch * heads), in_specs=[any_spec] * 2, out_specs=(any_spec, any_spec),
        compiler_params=params, interpret=interpret, name="litela_state",
    )(flat[1], flat[2])
    h = h.reshape(splits, batch * heads * width, width).sum(0)  # fixed order over splits
    z = z.reshape(splits, batch * heads, width).sum(0)
    out = pl.pallas_call(
        functools.partial(_output_kernel, tokens=tokens, heads=heads, head_dim=head_dim, q_col=q_col, eps=eps),
        out_shape=jax.ShapeDtypeStruct((batch * tokens, heads * head_dim), v_src.dtype),
        grid=(pl.cdiv(tokens, _TOKENS_PER_STEP), batch * heads), in_specs=[any_spec] * 3, out_specs=any_spec,
        compiler_params=params, interpret=interpret, name="litela_output",
    )(flat[0], h, z)
    return out.reshape(batch, tokens, heads * head_dim)


def _heads(src: jax.Array, column: int, heads: int, head_dim: int) -> jax.Array:
    """[B, N, W] source -> the [B, N, H, D] block of its columns starting at `column`."""
    return src[..., column:column + heads * head_dim].reshape(*src.shape[:2], heads, head_dim)


def relu_linear_attention_xla_packed(q_src, k_src, v_src, columns, heads, head_dim, eps):
    """The XLA sibling of `relu_linear_attention_pallas`, same arguments: [B, N, H*D] out in v_src's dtype."""
    q, k, v = (_heads(a, col, heads, head_dim) for a, col in zip((q_src, k_src, v_src), columns))
    out = relu_linear_attention(q, k, v, eps)
    return out.reshape(*out.shape[:2], heads * head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7))
def relu_linear_attention_pallas(q_src, k_src, v_src, columns: tuple[int, int, int], heads: int, head_dim: int,
                                 eps: float = 1e-8, interpret: bool = False):
    """LiteLA on q, k, v held as column blocks of [B, N, W] arrays (e.g. all three in the qkv projection output:
    columns (0, C, 2C)): head h of q is q_src[..., columns[0] + h*D : + D]. Returns [B, N, H*D] in v_src's dtype.
    Same function as `relu_linear_attention`; its backward is that op's (recomputed from the inputs)."""
    return _pallas_forward(q_src, k_src, v_src, columns, heads, head_dim, eps, interpret)


def _pallas_fwd(q_src, k_src, v_src, columns, heads, head_dim, eps, interpret):
    out = _pallas_forward(q_src, k_src, v_src, columns, heads, head_dim, eps, interpret)
    return out, (q_src, k_src, v_src)


def _pallas_bwd(columns, heads, head_dim, eps, interpret, residuals, cotangent):
    del interpret
    fn = lambda q, k, v: relu_linear_attention_xla_packed(q, k, v, columns, heads, head_dim, eps)  # noqa: E731
    _, vjp = jax.vjp(fn, *residuals)
    return vjp(cotangent)


relu_linear_attention_pallas.defvjp(_pallas_fwd, _pallas_bwd)
