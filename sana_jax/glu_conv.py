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


# Launch parameters from benchmarks/pallas_kernels.py --sweep on H100 (RESULTS.md): 16 channels and 8 warps per
# program at every width (32 and 64 channels spill at 128-pixel rows and were no faster at 32), 32 output rows per
# program while a row is at most 32 pixels (the 1024 px latent grid), 16 for the 128-pixel rows of 4096 px.
CHANNEL_BLOCK = 16
NUM_WARPS = 8


def strip_rows(width: int) -> int:
    return 32 if width <= 32 else 16


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
    output r - 1 is complete and stored, and the accumulators move up one row. Each input row is loaded (from
    cache after the first) and SiLU'd three times, shifted by -1, 0 and +1 pixels.
    """
    from jax.experimental.pallas import triton as plgpu

    strips = pl.cdiv(height, strip)
    b, h0 = pl.program_id(0) // strips, (pl.program_id(0) % strips) * strip
    c0 = pl.program_id(1) * block_c
    w = jnp.arange(rows)
    valid_c = (c0 + jnp.arange(block_c)) < features
    acc, dtype = jnp.float32, x_ref.dtype

    def weights(half):  # [1, C_blk] per tap: [dy][dx]
        cols = pl.ds(half * features + c0, block_c)
        return [[plgpu.load(k_ref.at[pl.ds(dy * 3 + dx, 1), cols], mask=valid_c[None, :], other=0).astype(acc)
                 for dx in range(3)] for dy in range(3)]

    taps = (weights(0), weights(1))
    biases = tuple(plgpu.load(b_ref.at[pl.ds(half * features + c0, block_c)], mask=valid_c, other=0
                              )[None, :] + jnp.zeros((rows, block_c), acc) for half in range(2))

    def step(i, carry):
        r = h0 - 1 + i
        row_ok = (r >= 0) & (r < height)
        carry = list(carry)  # [above (r - 1), here (r), below (r + 1)] x [value, gate]
        for dx in range(3):
            col = w + dx - 1
            mask = (row_ok & (col >= 0) & (col < width))[:, None] & valid_c[None, :]
            start = front + (b * height + r) * width + dx - 1  # flat row of pixel (b, r, dx - 1)
            for half in range(2):
                x = plgpu.load(x_ref.at[pl.ds(start, rows), pl.ds(half * features + c0, block_c)],
                               mask=mask, other=0)
                s = _fast_silu(x.astype(acc), dtype).astype(acc)  # silu(0) = 0: masked pixels are the padding
                for out, dy in ((0, 2), (1, 1), (2, 0)):
                    carry[2 * out + half] = carry[2 * out + half] + s * taps[half][dy][dx]
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
    rows = pl.next_power_of_2(width)
    block_c = block_c or CHANNEL_BLOCK
    num_warps = num_warps or NUM_WARPS
    strip = min(strip or strip_rows(width), height)
    flat = x.reshape(-1, channels)
    # The loads of image 0's row -1 and of pixel (0, 0)'s left neighbour start before the array. On the GPU it is a masked pointer offset; the
    # interpreter instead clamps a slice's start into the array (shifting the whole tile), so there the rows get a
    # leading pad and every start moves by it.
    front = width + 1 if interpret else 0
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
