"""GLUMBConv's middle: SiLU, 3x3 depthwise convolution + bias, then value * SiLU(gate), in one pass.

    out[b, h, w, c] = v * silu(g),  v = dw[c] + bias[c],  g = dw[c + F] + bias[c + F]
    dw[j] = sum_{dy, dx in 0..2} s[b, h + dy - 1, w + dx - 1, j] * kernel[dy, dx, j]
    s = silu(x) rounded to x's dtype, zero outside the image (padding 1)

`x` is the inverted 1x1 conv's output [B, H, W, 2F] (bias included, before its SiLU). The nine-tap sum and the bias
add run in fp32 and round once to the activation dtype, as a cuDNN / PyTorch depthwise convolution does; the
gating then rounds like the eager ops.

Two implementations of the same function:
  `glu_dwconv_xla`    SiLU, zero padding and nine shifted multiply-adds (portable; fuses on every backend;
                      XLA:CPU's grouped-conv backward was ~100x slower than this form).
  `glu_dwconv_pallas` a Pallas (Triton) GPU kernel: one program per (image, strip of output rows, channel
                      block) walks down the strip's input rows once, applies the SiLU as it loads each row and
                      keeps the three output rows the row feeds in registers, so neither the SiLU'd, padded input
                      nor the [B, H, W, 2F] convolution output goes to memory. Its backward is the XLA sibling's
                      (recomputed). `interpret=True` runs it on any backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


# Launch parameters from benchmarks/pallas_kernels.py --sweep on H100 (RESULTS.md): channels per program and warps
# by image-row width (wider rows take fewer channels so the [row, channel] tiles stay in registers), output rows per
# program.
def channel_block(width: int) -> int:
    rows = pl.next_power_of_2(width)
    return 32 if rows <= 32 else 16


STRIP_ROWS = 8


def _accum(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _silu(x):
    """SiLU computed in fp32 and rounded once to x's dtype (what torch's kernel and XLA's fused form give)."""
    return jax.nn.silu(x.astype(_accum(x.dtype))).astype(x.dtype)


def _gate(dw_value, dw_gate, out_dtype):
    """fp32 convolution outputs (bias included) -> value * silu(gate), rounded as the eager ops round."""
    value, gate = dw_value.astype(out_dtype), dw_gate.astype(out_dtype)
    return value * _silu(gate)


def glu_dwconv_xla(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """x [B, H, W, 2F] (before SiLU), kernel [3, 3, 2F], bias [2F] -> [B, H, W, F] in x's dtype."""
    acc = _accum(x.dtype)
    height, width = x.shape[1], x.shape[2]
    padded = jnp.pad(_silu(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    total = bias.astype(acc)
    for dy in range(3):
        for dx in range(3):
            total = total + padded[:, dy:dy + height, dx:dx + width, :].astype(acc) * kernel[dy, dx].astype(acc)
    value, gate = jnp.split(total, 2, axis=-1)
    return _gate(value, gate, x.dtype)


def _fast_silu(x, out_dtype):
    """silu(x) for fp32 x, rounded to out_dtype, as in-kernel arithmetic: sigmoid = rsqrt(1 + 2^(-x log2 e))^2
    (two approximate special-function ops instead of a libdevice exp and an IEEE division; the error, a few fp32
    ulps, changes a bf16 result only where it sits on a rounding boundary)."""
    root = jax.lax.rsqrt(1.0 + jnp.exp2(x * -1.4426950408889634))
    return (x * (root * root)).astype(out_dtype)


def _kernel(x_ref, k_ref, b_ref, o_ref, *, height: int, width: int, features: int, rows: int, block_c: int,
            strip: int, front: int):
    """Output rows [h0, h0 + strip) of one image, one block of channels. x_ref: [front + B*H*W, 2F] (flat rows,
    `front` leading rows of padding, see _pallas_forward); o_ref: [B*H*W, F]; k_ref [9, 2F]; b_ref [2F] fp32.

    Input row r feeds output rows r + 1 (kernel row 0), r (row 1) and r - 1 (row 2). The loop walks r from
    h0 - 1 to h0 + strip with three accumulators (outputs r - 1, r, r + 1, value and gate halves); after row r,
    output r - 1 is complete and stored, and the accumulators move up one row. Each input row is loaded and
    SiLU'd once; its left and right neighbours (dx = 0, 2) come from products with 0/1 shift matrices on the
    tensor cores, which are exact (one nonzero term per output, fp32 accumulation).
    """
    from jax.experimental.pallas import triton as plgpu

    strips = pl.cdiv(height, strip)
    b, h0 = pl.program_id(0) // strips, (pl.program_id(0) % strips) * strip
    c0 = pl.program_id(1) * block_c
    w = jnp.arange(rows)
    valid_c = (c0 + jnp.arange(block_c)) < features
    acc, dtype = jnp.float32, x_ref.dtype
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None  # fp32: no TF32 rounding
    # [rows, rows]: row w of shift[0] picks pixel w - 1, of shift[1] pixel w + 1 (nothing past the tile's ends).
    shifts = ((w[:, None] - 1 == w[None, :]).astype(dtype), (w[:, None] + 1 == w[None, :]).astype(dtype))

    def weights(half):  # [1, C_blk] per tap: [dy][dx]
        cols = pl.ds(half * features + c0, block_c)
        return [[plgpu.load(k_ref.at[pl.ds(dy * 3 + dx, 1), cols], mask=valid_c[None, :], other=0).astype(acc)
                 for dx in range(3)] for dy in range(3)]

    taps = (weights(0), weights(1))
    biases = tuple(plgpu.load(b_ref.at[pl.ds(half * features + c0, block_c)], mask=valid_c, other=0
                              )[None, :] + jnp.zeros((rows, block_c), acc) for half in range(2))

    def step(i, carry):
        r = h0 - 1 + i
        mask = (((r >= 0) & (r < height)) & (w < width))[:, None] & valid_c[None, :]
        start = front + (b * height + r) * width  # flat row of pixel (b, r, 0)
        carry = list(carry)  # [above (r - 1), here (r), below (r + 1)] x [value, gate]
        for half in range(2):
            x = plgpu.load(x_ref.at[pl.ds(start, rows), pl.ds(half * features + c0, block_c)], mask=mask, other=0)
            s = _fast_silu(x.astype(acc), dtype)  # silu(0) = 0: masked pixels are the zero padding
            left, right = (jnp.dot(shift, s, precision=precision, preferred_element_type=acc) for shift in shifts)
            for dx, term in enumerate((left, s.astype(acc), right)):
                for out, dy in ((0, 2), (1, 1), (2, 0)):
                    carry[2 * out + half] = carry[2 * out + half] + term * taps[half][dy][dx]
        out_row = r - 1
        store_mask = ((i >= 2) & (out_row < height) & (w < width))[:, None] & valid_c[None, :]
        plgpu.store(o_ref.at[pl.ds((b * height + jnp.maximum(out_row, 0)) * width, rows), pl.ds(c0, block_c)],
                    _gate(carry[0], carry[1], o_ref.dtype), mask=store_mask)
        return (*carry[2:], *biases)

    jax.lax.fori_loop(0, strip + 2, step, (*biases, *biases, *biases))


def _triton_params(num_warps: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps)


def _pallas_forward(x, kernel, bias, interpret: bool, block_c: int | None = None, num_warps: int | None = None,
                    strip: int | None = None):
    batch, height, width, channels = x.shape
    features = channels // 2
    rows = max(16, pl.next_power_of_2(width))  # 16: the smallest tensor-core tile of the shift products
    block_c = block_c or channel_block(width)
    num_warps = num_warps or 4
    strip = min(strip or STRIP_ROWS, height)
    flat = x.reshape(-1, channels)
    # The load of image 0's row -1 starts before the array. On the GPU it is a masked pointer offset; the
    # interpreter instead clamps a slice's start into the array (shifting the whole tile), so there the rows get a
    # leading pad and every start moves by it.
    front = width if interpret else 0
    flat = jnp.pad(flat, ((front, 0), (0, 0))) if front else flat
    call = pl.pallas_call(
        functools.partial(_kernel, height=height, width=width, features=features, rows=rows, block_c=block_c,
                          strip=strip, front=front),
        out_shape=jax.ShapeDtypeStruct((batch * height * width, features), x.dtype),
        grid=(batch * pl.cdiv(height, strip), pl.cdiv(features, block_c)),
        compiler_params=None if interpret else _triton_params(num_warps),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 3,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        interpret=interpret,
        name="glu_dwconv",
    )
    out = call(flat, kernel.reshape(9, channels).astype(x.dtype), bias.astype(jnp.float32))
    return out.reshape(batch, height, width, features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def glu_dwconv_pallas(x: jax.Array, kernel: jax.Array, bias: jax.Array, interpret: bool = False) -> jax.Array:
    """Same contract as `glu_dwconv_xla`; the kernel takes its weights in x's dtype (as the XLA sibling's multiply
    does after the model's cast) and the bias in fp32."""
    return _pallas_forward(x, kernel, bias, interpret)


def _pallas_fwd(x, kernel, bias, interpret):
    return _pallas_forward(x, kernel, bias, interpret), (x, kernel, bias)


def _pallas_bwd(interpret, residuals, cotangent):
    del interpret
    _, vjp = jax.vjp(glu_dwconv_xla, *residuals)
    return vjp(cotangent)


glu_dwconv_pallas.defvjp(_pallas_fwd, _pallas_bwd)
