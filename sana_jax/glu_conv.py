"""GLUMBConv's middle: SiLU of the inverted conv, 3x3 depthwise convolution + bias, then value * SiLU(gate).

    out[b, h, w, c] = v * silu(g),  v = dw[c] + bias[c],  g = dw[c + F] + bias[c + F]
    dw[j] = sum_{dy, dx in 0..2} padded[b, h + dy, w + dx, j] * kernel[dy, dx, j]
    padded = SiLU(pre + pre_bias) with a zero border: [B, H + 2, W + 2, 2F]

`pre` is the inverted 1x1 conv's matmul output before its bias. The bias add rounds to the activation dtype like
the model's other bias adds; the SiLU computes in fp32 and rounds once, as torch's F.silu does on bf16; the nine-tap
sum and the bias add run in fp32 and round once, as a cuDNN / PyTorch depthwise convolution does; the gating then
rounds like the eager ops.

Two implementations of the same function:
  `silu_glu_dwconv_xla`    `silu_padded` then nine shifted multiply-adds (`glu_dwconv_xla`; portable, fuses on
                           every backend; XLA:CPU's grouped-conv backward was ~100x slower than this form).
  `silu_glu_dwconv_pallas` a Pallas (Triton) GPU kernel reading `pre` itself: one program per image, chunk of rows,
                           tile of up to 8 columns and block of channels walks down the rows holding three SiLU'd
                           input rows in registers, one [channels] vector per pixel, so each input pixel is loaded
                           and SiLU'd once and neither the padded SiLU activation nor the [B, H, W, 2F] convolution
                           output goes to memory. Compiled, its SiLUs use two approximate PTX instructions
                           (`_sigmoid`, within 1e-5) and its taps PTX FMAs (`_multiply_add`); outputs equal the
                           sibling's at SANA's shapes on H100.
                           Its backward (rows up to 32 pixels; XLA's vjp beyond) rebuilds `padded` with XLA and
                           runs two kernels on it: one recomputes the convolution, writes the cotangent of its fp32
                           output and per-row partial sums of the weight gradients; one applies the transposed
                           convolution to that cotangent. `interpret=True` runs them on any backend (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sana_jax.ops import accum_dtype, add_bias


def forward_tile(width: int) -> tuple[int, int, int]:
    """The fused forward's (columns, channels, warps) per program: up to 8 columns (wider rows take several
    programs) x 128 channels x 4 warps, one channel per thread; (8, 64, 2) measured within noise of it on H100, wider
    column tiles and two channels per thread slower (RESULTS.md, sixth session; `--sweep` of
    benchmarks/pallas_kernels.py reruns the comparison)."""
    return min(8, width), 128, 4


def backward_channel_block(width: int) -> int:
    """The backward kernels' channels per program (4 warps), from the same sweep (--sweep): 64, fewer on rows
    wider than 128 pixels, whose [row, channel] tiles would otherwise spill."""
    return min(64, max(16, 8192 // pl.next_power_of_2(width)))


def _gate(dw_value, dw_gate, out_dtype, sigmoid=jax.nn.sigmoid):
    """fp32 convolution outputs (bias included) -> value * silu(gate), rounded as the eager ops round. The kernels
    pass `_sigmoid`: Pallas lowers jax.nn.sigmoid to libdevice's expf and an IEEE division."""
    value, gate = dw_value.astype(out_dtype), dw_gate.astype(out_dtype)
    wide = gate.astype(accum_dtype(out_dtype))
    gated = (wide * sigmoid(wide)).astype(out_dtype)
    return value * gated


def glu_dwconv_xla(padded: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """padded [B, H+2, W+2, 2F], kernel [3, 3, 2F], bias [2F] -> [B, H, W, F] in padded's dtype."""
    acc = accum_dtype(padded.dtype)
    height, width = padded.shape[1] - 2, padded.shape[2] - 2
    # One conversion before the slices, so the gradient sums the nine taps' contributions in fp32 and rounds once.
    wide, kernel = padded.astype(acc), kernel.astype(acc)
    total = bias.astype(acc)
    for dy in range(3):
        for dx in range(3):
            total = total + wide[:, dy:dy + height, dx:dx + width, :] * kernel[dy, dx]
    value, gate = jnp.split(total, 2, axis=-1)
    return _gate(value, gate, padded.dtype)


def silu_padded(pre: jax.Array, pre_bias: jax.Array) -> jax.Array:
    """pre [B, H, W, 2F], pre_bias [2F] -> SiLU(pre + pre_bias) with a zero border [B, H+2, W+2, 2F] (SiLU(0) = 0,
    so the border may be added before or after the SiLU), in pre's dtype."""
    h = add_bias(pre, pre_bias.astype(pre.dtype))
    h = jax.nn.silu(h.astype(accum_dtype(h.dtype))).astype(h.dtype)
    return jnp.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0)))


def silu_glu_dwconv_xla(pre: jax.Array, pre_bias: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """pre [B, H, W, 2F] (inverted conv before its bias), pre_bias [2F], kernel [3, 3, 2F], bias [2F]
    -> [B, H, W, F] in pre's dtype."""
    return glu_dwconv_xla(silu_padded(pre, pre_bias), kernel, bias)


class _RowTile:
    """The tile of one program of the backward's first kernel (one output row (b, h) of one block of channels),
    with its loads of the padded input. x_ref: padded rows [B*(H+2)*(W+2), 2F] (flat); k_ref [9, 2F]; b_ref [2F]
    fp32."""

    def __init__(self, x_ref, k_ref, b_ref, *, height: int, width: int, features: int, rows: int, block_c: int,
                 interpret: bool):
        self.x_ref, self.k_ref, self.b_ref, self.interpret = x_ref, k_ref, b_ref, interpret
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
                    dw[half] = _multiply_add(x, k, dw[half], self.interpret)
        return dw


def _triton_params(num_warps: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps)


def _sigmoid(z, interpret: bool):
    """fp32 logistic 1 / (1 + 2^(-z log2 e)). Compiled: PTX ex2.approx + rcp.approx, relative error below 1e-5
    (mostly the rounding of z log2 e; a bf16 rounding step is 4e-3); the fifth session's fused forward ran 1.18-1.26
    -> 1.00 ms at 0.6B b32 on H100 with it instead of libdevice's expf and an IEEE division (RESULTS.md). Interpreted:
    jax.nn.sigmoid."""
    from jax.experimental.pallas import triton as plgpu

    if interpret:
        return jax.nn.sigmoid(z)
    [sig] = plgpu.elementwise_inline_asm(
        "{ .reg .f32 t; mul.f32 t, $1, 0fBFB8AA3B; ex2.approx.ftz.f32 t, t; add.f32 t, t, 0f3F800000;"
        " rcp.approx.ftz.f32 $0, t; }",  # 0fBFB8AA3B = -log2(e)
        args=[z], constraints="=f,f", pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(z.shape, jnp.float32)])
    return sig


def _multiply_add(x, k, total, interpret: bool):
    """total + x * k in fp32; x [..., C_blk], k and total broadcastable to it. Compiled: one PTX fma.rn. The Pallas
    Triton lowering does not contract a multiply and an add, and the taps' separate FMUL + FADD were about 36 of
    the forward's 96 instructions per output (Nsight Compute, RESULTS.md). A product of two bf16 values is exact in
    fp32, so bf16 sums are unchanged; fp32 ones round once, as cuDNN's convolutions do. Interpreted: total + x * k."""
    from jax.experimental.pallas import triton as plgpu

    if interpret:
        return total + x * k
    k, total = jnp.broadcast_to(k, x.shape), jnp.broadcast_to(total, x.shape)
    [out] = plgpu.elementwise_inline_asm(
        "fma.rn.f32 $0, $1, $2, $3;", args=[x, k, total], constraints="=f,f,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return out


def _fused_kernel(y_ref, yb_ref, k_ref, b_ref, o_ref, *, height: int, width: int, features: int, tile_w: int,
                  block_c: int, row_chunk: int, width_tiles: int, interpret: bool):
    """Program (image b, row chunk, column tile, channel block): output rows [h0, h0 + row_chunk) x columns
    [w0, w0 + tile_w) x one block of channels of both halves.

    y_ref: pre [B*H*W, 2F] (flat); yb_ref pre_bias [2F]; k_ref [9, 2F] (activation dtype); b_ref [2F] fp32;
    o_ref [B*H*W, F]. Each pixel column is its own [C_blk] vector (a Python list over the tile_w + 2 input
    columns), so the column shifts of the convolution pick list entries instead of reloading shifted tiles: every
    input pixel is loaded and SiLU'd once per program (plus the two halo columns). Three SiLU'd input rows ride
    down the image; output row r takes input rows r - 1, r, r + 1, its bias first and then its taps in (dy, dx)
    order, as the XLA sibling sums them. Row r + 2's loads are issued before row r's arithmetic (carried).
    """
    from jax.experimental.pallas import triton as plgpu

    chunks = pl.cdiv(height, row_chunk)
    program, block = pl.program_id(0), pl.program_id(1)
    b, rest = program // (chunks * width_tiles), program % (chunks * width_tiles)
    h0, w0 = (rest // width_tiles) * row_chunk, (rest % width_tiles) * tile_w
    h_end = jnp.minimum(h0 + row_chunk, height)
    valid_c = (block * block_c + jnp.arange(block_c)) < features
    dtype = y_ref.dtype
    halves = (0, 1)

    def columns(half):
        return pl.ds(half * features + block * block_c, block_c)

    def vector(ref, half, row=None):  # [C_blk] fp32: of a [2F] vector, or row `row` of a [9, 2F] table
        at = ref.at[columns(half)] if row is None else ref.at[jnp.int32(row), columns(half)]
        return plgpu.load(at, mask=valid_c, other=0).astype(jnp.float32)

    pre_bias = [vector(yb_ref, half) for half in halves]
    taps = [[vector(k_ref, half, tap) for tap in range(9)] for half in halves]
    bias = [vector(b_ref, half) for half in halves]
    # Input column j of the tile is image column w0 - 1 + j.
    in_columns = [((w0 - 1 + j >= 0) & (w0 - 1 + j < width), w0 - 1 + j) for j in range(tile_w + 2)]

    def pixel(r, col, inside):  # flat row of (b, r, col); 0 where outside (the access is masked there)
        return jnp.where(inside, (b * height + r) * width + col, 0)

    def load_row(r):
        """pre of input row r: per input column, (value half, gate half) [C_blk] in the activation dtype."""
        row_inside = (r >= 0) & (r < height)
        return tuple(tuple(plgpu.load(y_ref.at[pixel(r, col, row_inside & col_inside), columns(half)],
                                      mask=valid_c & (row_inside & col_inside), other=0) for half in halves)
                     for col_inside, col in in_columns)

    def silu_row(r, loaded):
        """SiLU(pre + pre_bias) of input row r, each step rounded to the activation dtype, fp32, zero outside."""
        row_inside = (r >= 0) & (r < height)
        out = []
        for (col_inside, _), pair in zip(in_columns, loaded):
            silus = []
            for half, x in zip(halves, pair):
                z = (x.astype(jnp.float32) + pre_bias[half]).astype(dtype).astype(jnp.float32)
                s = (z * _sigmoid(z, interpret)).astype(dtype).astype(jnp.float32)
                silus.append(jnp.where(row_inside & col_inside, s, 0.0))
            out.append(tuple(silus))
        return tuple(out)

    def step(i, carry):
        above, middle, loaded_below = carry  # SiLU'd input rows r - 1 and r, input row r + 1 as loaded
        r = h0 + i
        loaded_next = load_row(r + 2)
        below = silu_row(r + 1, loaded_below)
        window = (above, middle, below)
        for j in range(tile_w):
            dw = []
            for half in halves:
                total = bias[half]
                for dy in range(3):
                    for dx in range(3):
                        total = _multiply_add(window[dy][j + dx][half], taps[half][3 * dy + dx], total,
                                              interpret)
                dw.append(total)
            col = w0 + j
            inside = (col < width) & (r < h_end)
            gated = _gate(dw[0], dw[1], o_ref.dtype, lambda z: _sigmoid(z, interpret))
            plgpu.store(o_ref.at[pixel(r, col, inside), columns(0)], gated, mask=valid_c & inside)
        return middle, below, loaded_next

    first = (silu_row(h0 - 1, load_row(h0 - 1)), silu_row(h0, load_row(h0)), load_row(h0 + 1))
    jax.lax.fori_loop(0, row_chunk, step, first)


def row_chunk(batch: int, height: int, width_tiles: int, blocks: int, programs: int = 1024) -> int:
    """Rows per program: the whole image height unless that leaves fewer than `programs` programs (batch 1), then
    halved until it does (each chunk re-reads 2 halo rows), down to 4."""
    chunk = height
    while chunk > 4 and batch * pl.cdiv(height, chunk) * width_tiles * blocks < programs:
        chunk = pl.cdiv(chunk, 2)
    return chunk


def _fused_forward(pre, pre_bias, kernel, bias, interpret: bool, tile_w: int | None = None,
                   block_c: int | None = None, num_warps: int | None = None, rows: int | None = None):
    batch, height, width, channels = pre.shape
    features = channels // 2
    default_w, default_c, default_warps = forward_tile(width)
    tile_w, block_c, num_warps = tile_w or default_w, block_c or default_c, num_warps or default_warps
    width_tiles, blocks = pl.cdiv(width, tile_w), pl.cdiv(features, block_c)
    rows = rows or row_chunk(batch, height, width_tiles, blocks)
    flat = pre.reshape(-1, channels)
    call = pl.pallas_call(
        functools.partial(_fused_kernel, height=height, width=width, features=features, tile_w=tile_w,
                          block_c=block_c, row_chunk=rows, width_tiles=width_tiles,
                          interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((batch * height * width, features), pre.dtype),
        grid=(batch * pl.cdiv(height, rows) * width_tiles, blocks),
        compiler_params=None if interpret else _triton_params(num_warps),
        in_specs=[pl.BlockSpec(memory_space=pl.ANY)] * 4,
        out_specs=pl.BlockSpec(memory_space=pl.ANY),
        interpret=interpret,
        name="silu_glu_dwconv",
    )
    out = call(flat, pre_bias.astype(pre.dtype), kernel.reshape(9, channels).astype(pre.dtype),
               bias.astype(jnp.float32))
    return out.reshape(batch, height, width, features)


def _gate_backward(dw_value, dw_gate, cotangent, dtype, sigmoid):
    """Cotangents of the fp32 convolution outputs from the output's, rounded as XLA's vjp of `_gate` rounds them
    (bf16 products, the SiLU derivative in fp32, each result rounded to the activation dtype): [rows, C_blk] x 2,
    fp32 holding activation-dtype values."""
    acc = accum_dtype(dtype)
    value, gate = dw_value.astype(dtype), dw_gate.astype(dtype)
    gate32 = gate.astype(acc)
    sig = sigmoid(gate32)
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
    d_total = _gate_backward(dw_value, dw_gate, cotangent.astype(jnp.float32), x_ref.dtype,
                             lambda z: _sigmoid(z, tile.interpret))
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
                       block_c: int, front: int, interpret: bool):
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
            total = _multiply_add(d.astype(acc), k.astype(acc), total, interpret)
    plgpu.store(dx_ref.at[pl.ds(row * (width + 2), rows), pl.ds(block * block_c, block_c)],
                total.astype(dx_ref.dtype), mask=(p < width + 2)[:, None] & valid_c[None, :])


def _pallas_backward(padded, kernel, bias, cotangent, interpret: bool, block_c: int | None = None,
                     num_warps: int | None = None):
    """(d_padded, d_kernel, d_bias) of `glu_dwconv_xla`, by the two kernels above plus two small row sums."""
    batch, height, width, channels = padded.shape[0], padded.shape[1] - 2, padded.shape[2] - 2, padded.shape[3]
    features = channels // 2
    rows = pl.next_power_of_2(width)
    block_c = block_c or backward_channel_block(width)
    params = None if interpret else _triton_params(num_warps or 4)
    taps = kernel.reshape(9, channels).astype(padded.dtype)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    d_total, dk_rows, db_rows = pl.pallas_call(
        functools.partial(_total_grad_kernel, height=height, width=width, features=features, rows=rows,
                          block_c=block_c, interpret=interpret),
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
                          block_c=block_c, front=front, interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((batch * (height + 2) * (width + 2), channels), padded.dtype),
        grid=(batch * (height + 2), pl.cdiv(channels, block_c)),
        compiler_params=params, in_specs=[any_spec] * 2, out_specs=any_spec, interpret=interpret,
        name="glu_dwconv_bwd_input",
    )(d_total, taps)
    d_kernel = jnp.sum(dk_rows.reshape(batch * height, 3, 3, channels), axis=0)
    return (d_padded.reshape(padded.shape), d_kernel.astype(kernel.dtype),
            jnp.sum(db_rows, axis=0).astype(bias.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def silu_glu_dwconv_pallas(pre: jax.Array, pre_bias: jax.Array, kernel: jax.Array, bias: jax.Array,
                           interpret: bool = False) -> jax.Array:
    """Same contract as `silu_glu_dwconv_xla`; the kernel takes its weights in pre's dtype (as the XLA sibling's
    multiply does after the model's cast) and the bias in fp32."""
    return _fused_forward(pre, pre_bias, kernel, bias, interpret)


def _fused_fwd(pre, pre_bias, kernel, bias, interpret):
    return _fused_forward(pre, pre_bias, kernel, bias, interpret), (pre, pre_bias, kernel, bias)


# The backward kernels beat XLA's vjp on 32-pixel rows (H100: 3.73 vs 5.06 ms at 0.6B b32, 2.08 vs 2.93 ms at 1.6B
# b8) but not on the 128-pixel rows of 4096 px (3.14 vs 2.79 ms): wider rows take XLA's.
PALLAS_BACKWARD_MAX_WIDTH = 32


def _fused_bwd(interpret, residuals, cotangent):
    """XLA rebuilds `padded` (and differentiates that step); the convolution and gating take the kernels."""
    pre, pre_bias, kernel, bias = residuals
    padded, silu_vjp = jax.vjp(silu_padded, pre, pre_bias)
    if pre.shape[2] > PALLAS_BACKWARD_MAX_WIDTH:
        d_padded, d_kernel, d_bias = jax.vjp(glu_dwconv_xla, padded, kernel, bias)[1](cotangent)
    else:
        d_padded, d_kernel, d_bias = _pallas_backward(padded, kernel, bias, cotangent, interpret)
    return (*silu_vjp(d_padded), d_kernel, d_bias)


silu_glu_dwconv_pallas.defvjp(_fused_fwd, _fused_bwd)
