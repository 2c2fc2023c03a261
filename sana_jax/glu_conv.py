"""GLUMBConv's middle: 3x3 depthwise convolution + bias, then value * SiLU(gate), in one pass.

    out[b, h, w, c] = v * silu(g),  v = dw[c] + bias[c],  g = dw[c + F] + bias[c + F]
    dw[j] = sum_{dy, dx in 0..2} padded[b, h + dy, w + dx, j] * kernel[dy, dx, j]

`padded` is the SiLU'd inverted-conv output [B, H + 2, W + 2, 2F] with a zero border (SiLU(0) = 0, so padding
before or after the SiLU is the same). The nine-tap sum and the bias add run in fp32 and round once to the
activation dtype, as a cuDNN / PyTorch depthwise convolution does; the gating then rounds like the eager ops.

Two implementations of the same function:
  `glu_dwconv_xla`    nine shifted multiply-adds (portable; fuses on every backend; XLA:CPU's grouped-conv
                      backward was ~100x slower than this form).
  `glu_dwconv_pallas` a Pallas (Triton) GPU kernel: one program per output row and channel block reads the
                      three padded input rows of both halves (cache-resident after the first touch) and writes
                      the gated row, so the [B, H, W, 2F] convolution output never goes to memory. Its backward
                      (rows up to 32 pixels; XLA's vjp beyond) is two kernels of the same shape: one recomputes
                      the convolution, writes the cotangent of its fp32 output and per-row partial sums of the
                      weight gradients; one applies the transposed convolution to that cotangent. `interpret=True`
                      runs them on any backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Channels per program (and warps: 8 with 128 channels, else 4), from benchmarks/pallas_kernels.py --sweep on
# H100 (RESULTS.md): 128 channels while an image row is at most 32 pixels (the 1024 px latent grid), 64 for the
# 128-pixel rows of 4096 px, whose [row, channel] tiles would otherwise spill.
def channel_block(width: int) -> int:
    rows = pl.next_power_of_2(width)
    return 128 if rows <= 32 else max(16, 8192 // rows)


def backward_channel_block(width: int) -> int:
    """The backward kernels' channels per program (4 warps): 64 at most, from the same sweep (--sweep); the
    forward's 128 channels x 8 warps took 1.2-1.4x longer there (more live fp32 tiles per program)."""
    return min(64, channel_block(width))


def _num_warps(block_c: int) -> int:
    return 8 if block_c == 128 else 4


def _accum(dtype) -> jnp.dtype:
    return jnp.promote_types(dtype, jnp.float32)


def _gate(dw_value, dw_gate, out_dtype):
    """fp32 convolution outputs (bias included) -> value * silu(gate), rounded as the eager ops round."""
    value, gate = dw_value.astype(out_dtype), dw_gate.astype(out_dtype)
    gated = jax.nn.silu(gate.astype(_accum(out_dtype))).astype(out_dtype)
    return value * gated


def glu_dwconv_xla(padded: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """padded [B, H+2, W+2, 2F], kernel [3, 3, 2F], bias [2F] -> [B, H, W, F] in padded's dtype."""
    acc = _accum(padded.dtype)
    height, width = padded.shape[1] - 2, padded.shape[2] - 2
    # One conversion before the slices, so the gradient sums the nine taps' contributions in fp32 and rounds once.
    wide, kernel = padded.astype(acc), kernel.astype(acc)
    total = bias.astype(acc)
    for dy in range(3):
        for dx in range(3):
            total = total + wide[:, dy:dy + height, dx:dx + width, :] * kernel[dy, dx]
    value, gate = jnp.split(total, 2, axis=-1)
    return _gate(value, gate, padded.dtype)


class _RowTile:
    """The tile of one program of the forward grid (one output row (b, h) of one block of channels), with the
    loads both the forward kernel and the backward's recompute make. x_ref: padded rows [B*(H+2)*(W+2), 2F]
    (flat); k_ref [9, 2F]; b_ref [2F] fp32."""

    def __init__(self, x_ref, k_ref, b_ref, *, height: int, width: int, features: int, rows: int, block_c: int):
        self.x_ref, self.k_ref, self.b_ref = x_ref, k_ref, b_ref
        self.height, self.width, self.features, self.rows, self.block_c = height, width, features, rows, block_c
        self.row, self.block = pl.program_id(0), pl.program_id(1)
        self.b, self.h = self.row // height, self.row % height
        w = jnp.arange(rows)
        self.valid_c = (self.block * block_c + jnp.arange(block_c)) < features
        self.valid = (w < width)[:, None] & self.valid_c[None, :]  # [rows, C_blk]

    def columns(self, half: int):
        """This block's channels of the value (half 0) or gate (half 1) half."""
        return pl.ds(half * self.features + self.block * self.block_c, self.block_c)

    def tap(self, dy: int, dx: int, half: int):
        """(input [rows, C_blk], weight [1, C_blk]) of tap (dy, dx), fp32: padded row h + dy from column dx."""
        from jax.experimental.pallas import triton as plgpu

        start = (self.b * (self.height + 2) + self.h + dy) * (self.width + 2) + dx  # flat row of (b, h + dy, dx)
        x = plgpu.load(self.x_ref.at[pl.ds(start, self.rows), self.columns(half)], mask=self.valid, other=0)
        k = plgpu.load(self.k_ref.at[pl.ds(dy * 3 + dx, 1), self.columns(half)], mask=self.valid_c[None, :],
                       other=0)
        return x.astype(jnp.float32), k.astype(jnp.float32)

    def convolution(self):
        """[dw_value, dw_gate]: the fp32 convolution outputs of this row (bias included), [rows, C_blk] each."""
        from jax.experimental.pallas import triton as plgpu

        dw = [plgpu.load(self.b_ref.at[self.columns(half)], mask=self.valid_c, other=0).astype(jnp.float32)[None, :]
              + jnp.zeros((self.rows, self.block_c), jnp.float32) for half in range(2)]
        for dy in range(3):
            for dx in range(3):
                for half in range(2):
                    x, k = self.tap(dy, dx, half)
                    dw[half] = dw[half] + x * k
        return dw


def _kernel(x_ref, k_ref, b_ref, o_ref, **shape):
    """One output row (b, h) x one block of channels (see _RowTile); o_ref: [B*H*W, F]."""
    from jax.experimental.pallas import triton as plgpu

    tile = _RowTile(x_ref, k_ref, b_ref, **shape)
    dw_value, dw_gate = tile.convolution()
    plgpu.store(o_ref.at[pl.ds(tile.row * tile.width, tile.rows), tile.columns(0)],
                _gate(dw_value, dw_gate, o_ref.dtype), mask=tile.valid)


def _triton_params(num_warps: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps)


def _pallas_forward(padded, kernel, bias, interpret: bool, block_c: int | None = None,
                    num_warps: int | None = None):
    batch, height, width, channels = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2, padded.shape[3]
    features = channels // 2
    rows = pl.next_power_of_2(width)
    block_c = block_c or channel_block(width)
    num_warps = num_warps or _num_warps(block_c)
    flat = padded.reshape(-1, channels)
    call = pl.pallas_call(
        functools.partial(_kernel, height=height, width=width, features=features, rows=rows, block_c=block_c),
        out_shape=jax.ShapeDtypeStruct((batch * height * width, features), padded.dtype),
        grid=(batch * height, pl.cdiv(features, block_c)),
        compiler_params=None if interpret else _triton_params(num_warps),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 3,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        interpret=interpret,
        name="glu_dwconv",
    )
    out = call(flat, kernel.reshape(9, channels).astype(padded.dtype), bias.astype(jnp.float32))
    return out.reshape(batch, height, width, features)


def _gate_backward(dw_value, dw_gate, cotangent, dtype):
    """Cotangents of the fp32 convolution outputs from the output's, rounded as XLA's vjp of `_gate` rounds them
    (bf16 products, the SiLU derivative in fp32, each result rounded to the activation dtype): [rows, C_blk] x 2,
    fp32 holding activation-dtype values."""
    acc = _accum(dtype)
    value, gate = dw_value.astype(dtype), dw_gate.astype(dtype)
    gate32 = gate.astype(acc)
    sig = jax.nn.sigmoid(gate32)
    gated = (gate32 * sig).astype(dtype)
    d_value = (cotangent * gated).astype(dtype)
    d_gated = (cotangent * value).astype(dtype).astype(acc)
    d_gate = (d_gated * sig + d_gated * gate32 * sig * (1.0 - sig)).astype(dtype)
    return d_value.astype(acc), d_gate.astype(acc)


def _total_grad_kernel(x_ref, k_ref, b_ref, ct_ref, dt_ref, dk_ref, db_ref, **shape):
    """Backward, part 1, per output row (b, h) and channel block (the forward's grid): recomputes the convolution,
    writes the cotangent of its fp32 output `d_total` [B*H*W, 2F] (activation dtype: its values are exactly
    representable there) and this row's partial sums of the kernel and bias gradients (dk_ref [B*H*9, 2F], db_ref
    [B*H, 2F], fp32; summed over rows by the caller). ct_ref: the output's cotangent [B*H*W, F]."""
    from jax.experimental.pallas import triton as plgpu

    tile = _RowTile(x_ref, k_ref, b_ref, **shape)
    dw_value, dw_gate = tile.convolution()
    out_rows = pl.ds(tile.row * tile.width, tile.rows)
    cotangent = plgpu.load(ct_ref.at[out_rows, tile.columns(0)], mask=tile.valid, other=0)
    d_total = _gate_backward(dw_value, dw_gate, cotangent.astype(jnp.float32), x_ref.dtype)
    one_row = tile.valid_c[None, :]
    for half in range(2):
        d = jnp.where(tile.valid, d_total[half], 0.0)
        plgpu.store(dt_ref.at[out_rows, tile.columns(half)], d.astype(dt_ref.dtype), mask=tile.valid)
        plgpu.store(db_ref.at[pl.ds(tile.row, 1), tile.columns(half)], jnp.sum(d, axis=0)[None, :], mask=one_row)
        for dy in range(3):
            for dx in range(3):
                x, _ = tile.tap(dy, dx, half)  # reloaded (cache-resident) rather than kept in registers
                plgpu.store(dk_ref.at[pl.ds(tile.row * 9 + dy * 3 + dx, 1), tile.columns(half)],
                            jnp.sum(x * d, axis=0)[None, :], mask=one_row)


def _input_grad_kernel(dt_ref, k_ref, dx_ref, *, height: int, width: int, channels: int, rows: int,
                       block_c: int, front: int):
    """Backward, part 2, per padded row (b, q) and channel block of all 2F channels: the transposed convolution
    d_padded[q, p] = sum over taps of d_total[q - dy, p - dx] * kernel[dy, dx] (zero outside the image).
    dt_ref: [front + B*H*W, 2F] (`front` leading pad rows, see _pallas_backward); dx_ref: [B*(H+2)*(W+2), 2F]."""
    from jax.experimental.pallas import triton as plgpu

    row, block = pl.program_id(0), pl.program_id(1)
    b, q = row // (height + 2), row % (height + 2)
    p = jnp.arange(rows)
    c = block * block_c + jnp.arange(block_c)
    valid_c = c < channels
    acc = jnp.float32
    total = jnp.zeros((rows, block_c), acc)
    for dy in range(3):
        src = q - dy  # d_total row feeding this padded row through kernel row dy
        for dx in range(3):
            col = p - dx
            mask = ((src >= 0) & (src < height) & (col >= 0) & (col < width))[:, None] & valid_c[None, :]
            start = front + (b * height + src) * width - dx  # flat d_total row of pixel (b, src, -dx)
            d = plgpu.load(dt_ref.at[pl.ds(start, rows), pl.ds(block * block_c, block_c)], mask=mask, other=0)
            k = plgpu.load(k_ref.at[pl.ds(dy * 3 + dx, 1), pl.ds(block * block_c, block_c)],
                           mask=valid_c[None, :], other=0)
            total = total + d.astype(acc) * k.astype(acc)
    plgpu.store(dx_ref.at[pl.ds(row * (width + 2), rows), pl.ds(block * block_c, block_c)],
                total.astype(dx_ref.dtype), mask=(p < width + 2)[:, None] & valid_c[None, :])


def _pallas_backward(padded, kernel, bias, cotangent, interpret: bool, block_c: int | None = None,
                     num_warps: int | None = None):
    """(d_padded, d_kernel, d_bias) of `glu_dwconv_xla`, by the two kernels above plus two small row sums."""
    batch, height, width, channels = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2, padded.shape[3]
    features = channels // 2
    rows = pl.next_power_of_2(width)
    block_c = block_c or backward_channel_block(width)
    params = None if interpret else _triton_params(num_warps or _num_warps(block_c))
    taps = kernel.reshape(9, channels).astype(padded.dtype)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    d_total, dk_rows, db_rows = pl.pallas_call(
        functools.partial(_total_grad_kernel, height=height, width=width, features=features, rows=rows,
                          block_c=block_c),
        out_shape=(jax.ShapeDtypeStruct((batch * height * width, channels), padded.dtype),
                   jax.ShapeDtypeStruct((batch * height * 9, channels), jnp.float32),
                   jax.ShapeDtypeStruct((batch * height, channels), jnp.float32)),
        grid=(batch * height, pl.cdiv(features, block_c)),
        compiler_params=params, in_specs=[any_spec] * 4, out_specs=(any_spec,) * 3, interpret=interpret,
        name="glu_dwconv_bwd_total",
    )(padded.reshape(-1, channels), taps, bias.astype(jnp.float32), cotangent.reshape(-1, features))
    # Loads of d_total row 0 shifted right start before the array: masked pointer offsets on the GPU, but the
    # interpreter clamps a slice's start into the array (shifting the tile), so there d_total gets 2 leading rows.
    front = 2 if interpret else 0
    d_total = jnp.pad(d_total, ((front, 0), (0, 0))) if front else d_total
    padded_rows = pl.next_power_of_2(width + 2)
    d_padded = pl.pallas_call(
        functools.partial(_input_grad_kernel, height=height, width=width, channels=channels, rows=padded_rows,
                          block_c=block_c, front=front),
        out_shape=jax.ShapeDtypeStruct((batch * (height + 2) * (width + 2), channels), padded.dtype),
        grid=(batch * (height + 2), pl.cdiv(channels, block_c)),
        compiler_params=params, in_specs=[any_spec] * 2, out_specs=any_spec, interpret=interpret,
        name="glu_dwconv_bwd_input",
    )(d_total, taps)
    d_kernel = jnp.sum(dk_rows.reshape(batch * height, 3, 3, channels), axis=0)
    return (d_padded.reshape(padded.shape), d_kernel.astype(kernel.dtype),
            jnp.sum(db_rows, axis=0).astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def glu_dwconv_pallas(padded: jax.Array, kernel: jax.Array, bias: jax.Array, interpret: bool = False) -> jax.Array:
    """Same contract as `glu_dwconv_xla`; the kernel takes its weights in padded's dtype (as the XLA sibling's
    multiply does after the model's cast) and the bias in fp32."""
    return _pallas_forward(padded, kernel, bias, interpret)


def _pallas_fwd(padded, kernel, bias, interpret):
    return _pallas_forward(padded, kernel, bias, interpret), (padded, kernel, bias)


# The backward kernels beat XLA's vjp on 32-pixel rows (H100: 3.73 vs 5.06 ms at 0.6B b32, 2.08 vs 2.93 ms at 1.6B
# b8) but not on the 128-pixel rows of 4096 px (3.14 vs 2.79 ms): wider rows take XLA's.
PALLAS_BACKWARD_MAX_WIDTH = 32


def _pallas_bwd(interpret, residuals, cotangent):
    padded = residuals[0]
    if padded.shape[2] - 2 > PALLAS_BACKWARD_MAX_WIDTH:
        return jax.vjp(glu_dwconv_xla, *residuals)[1](cotangent)
    return _pallas_backward(*residuals, cotangent, interpret)


glu_dwconv_pallas.defvjp(_pallas_fwd, _pallas_bwd)
