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
                           (`_sigmoid`, within 1e-5), its taps PTX FMAs (`_multiply_add`), and the bf16 roundings
                           of its SiLUs and gating operands go two per instruction (`_round_pair`); outputs equal
                           the sibling's at SANA's shapes on H100 and H200.
                           Its backward runs two kernels on column tiles (`_ColumnTile`, each kernel its own size:
                           `backward_tiles`): one recomputes the SiLU'd input and the convolution and writes the
                           cotangent of the convolution's fp32 output and per-program sums of the weight gradients;
                           one applies the transposed convolution to that cotangent and differentiates the SiLU and
                           the bias add. `interpret=True` runs them on any backend (tests).
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


def backward_tiles(width: int) -> tuple[tuple[int, int, int, None], tuple[int, int, int, None]]:
    """The two backward kernels' (columns, channels, warps, rows): part 1 (`_total_grad_kernel`) 4 columns x 64
    channels x 2 warps, part 2 (`_input_grad_kernel`) 4 x 256 x 4 (two channels per thread: one 32-bit load or store
    per pixel and thread), the default row chunk. Each kernel alone at 1.6B b16 on H100: 0.77 and 0.61 ms, against
    1.13 and 0.90 ms before their own-pixel loads moved a row ahead (RESULTS.md, thirteenth session; `--sweep
    backward` of benchmarks/pallas_kernels.py reruns it). On 4096 px rows (H200) the best of ten tiles and row chunks
    was 2-23% faster per kernel than these, a different one at each model width (twenty-third session)."""
    return (min(4, width), 64, 2, None), (min(4, width), 256, 4, None)


def _round_each(a, b, dtype):
    """(a, b) -> each rounded to `dtype`, in its accumulation dtype."""
    return tuple(x.astype(dtype).astype(accum_dtype(dtype)) for x in (a, b))


def _gate(dw_value, dw_gate, out_dtype, sigmoid=jax.nn.sigmoid, round_pair=None):
    """fp32 convolution outputs (bias included) -> value * silu(gate), rounded as the eager ops round. The kernels
    pass `_sigmoid` (Pallas lowers jax.nn.sigmoid to libdevice's expf and an IEEE division) and `_round_pair` (the
    value and the gate rounded to out_dtype in one instruction)."""
    value, gate = (round_pair or functools.partial(_round_each, dtype=out_dtype))(dw_value, dw_gate)
    gated = (gate * sigmoid(gate)).astype(out_dtype)
    return value.astype(out_dtype) * gated


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


def _round_pair(a, b, dtype, interpret: bool):
    """(a, b) fp32 -> each rounded to `dtype`, as fp32. Compiled for bf16: one PTX cvt.rn.bf16x2.f32 rounds both
    (SASS F2FP), then an AND and a shift widen them. Triton rounds one value at a time (SASS F2F), which by our
    reading of the CUDA guide's throughput table runs at 16 results per clock and SM, as MUFU's ex2 and rcp do
    (FFMA: 128): the forward spent 84 of its 645 instructions per row on those (56 MUFU, 28 F2F), 56 of 635 with the
    pairs, and its 20 launches in the 1.6B b32 forward took 14.1 ms instead of 15.4-15.5 (H200, RESULTS.md,
    twenty-first session). Otherwise: astype."""
    from jax.experimental.pallas import triton as plgpu

    if interpret or jnp.dtype(dtype) != jnp.bfloat16:
        return _round_each(a, b, dtype)
    # cvt.rn.bf16x2.f32 d, hi, lo: the first source goes to the upper half. (Pallas lowers one result per asm.)
    [packed] = plgpu.elementwise_inline_asm(
        "cvt.rn.bf16x2.f32 $0, $1, $2;", args=[a, b], constraints="=r,f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(a.shape, jnp.int32)])
    return (jax.lax.bitcast_convert_type(packed & jnp.int32(-0x10000), jnp.float32),  # the upper half
            jax.lax.bitcast_convert_type(packed << 16, jnp.float32))


def _walk_rows(h0, row_chunk: int, load_row, prepare_row, visit, acc, load_own=lambda r: ()):
    """Carries three prepared rows down the image: `acc = visit(r, (row r - 1, row r, row r + 1), own, acc)` for
    rows r in [h0, h0 + row_chunk); `prepare_row(r, load_row(r))` makes a row and `own = load_own(r)` is what row r's
    visit reads of its own pixels. Row r + 2's and r + 1's own loads are issued before row r's visit (carried), so
    no load waits inside a visit. Returns the final acc."""

    def step(i, carry):
        above, middle, loaded_below, own, acc = carry
        r = h0 + i
        loaded_next, own_next = load_row(r + 2), load_own(r + 1)
        below = prepare_row(r + 1, loaded_below)
        return middle, below, loaded_next, own_next, visit(r, (above, middle, below), own, acc)

    first = (prepare_row(h0 - 1, load_row(h0 - 1)), prepare_row(h0, load_row(h0)), load_row(h0 + 1), load_own(h0),
             acc)
    return jax.lax.fori_loop(0, row_chunk, step, first)[4]


class _ColumnTile:
    """One program of the column-unrolled kernels: (image b, chunk of rows, tile of up to `tile_w` columns) x one
    block of channels of both halves; output rows [h0, h0 + row_chunk) x columns [w0, w0 + tile_w).

    Each pixel column is its own [C_blk] vector (a Python list over the tile_w + 2 input columns), so the column
    shifts of the convolution pick list entries instead of reloading shifted tiles: every input pixel is loaded and
    SiLU'd once per program (plus the two halo columns). Three SiLU'd input rows ride down the image; output row r
    takes input rows r - 1, r, r + 1, its bias first and then its taps in (dy, dx) order, as the XLA sibling sums
    them. Row r + 2's loads, and row r + 1's of the output pixels' own operands (the backward's cotangent or `pre`),
    are issued before row r's arithmetic (carried). With those operands loaded where they were used, and a select
    on every pixel index (`pixel`), the backward kernels took 1.47x and 1.21x as long at 1.6B b16 on H100 on their
    old tiles (RESULTS.md, thirteenth session).

    Refs: y_ref pre [B*H*W, 2F] (flat); yb_ref pre_bias [2F]; k_ref [9, 2F] (activation dtype); b_ref [2F] fp32.
    """

    def __init__(self, *, height: int, width: int, features: int, tile_w: int, block_c: int, row_chunk: int,
                 width_tiles: int, interpret: bool):
        self.height, self.width, self.features, self.tile_w = height, width, features, tile_w
        self.block_c, self.row_chunk, self.interpret = block_c, row_chunk, interpret
        chunks = pl.cdiv(height, row_chunk)
        self.program, self.block = pl.program_id(0), pl.program_id(1)
        self.b, rest = self.program // (chunks * width_tiles), self.program % (chunks * width_tiles)
        self.h0, self.w0 = (rest // width_tiles) * row_chunk, (rest % width_tiles) * tile_w
        self.h_end = jnp.minimum(self.h0 + row_chunk, height)
        self.valid_c = (self.block * block_c + jnp.arange(block_c)) < features
        # Input column j of the tile is image column w0 - 1 + j.
        self.in_columns = [((self.w0 - 1 + j >= 0) & (self.w0 - 1 + j < width), self.w0 - 1 + j)
                           for j in range(tile_w + 2)]

    def columns(self, half: int):
        """This block's channels of the value (half 0) or gate (half 1) half."""
        return pl.ds(half * self.features + self.block * self.block_c, self.block_c)

    def pixel(self, r, col):
        """Flat row of (b, r, col); outside the image the accesses are masked. No select on the index: the pointers
        of a row's columns then differ by constants."""
        return (self.b * self.height + r) * self.width + col

    def vector(self, ref, half: int, row=None):
        """[C_blk] fp32: of a [2F] vector, or row `row` of a [9, 2F] table."""
        from jax.experimental.pallas import triton as plgpu

        at = ref.at[self.columns(half)] if row is None else ref.at[jnp.int32(row), self.columns(half)]
        return plgpu.load(at, mask=self.valid_c, other=0).astype(jnp.float32)

    def sigmoid(self, z):
        return _sigmoid(z, self.interpret)

    def load_row(self, ref, r, half: int, halo: bool = True):
        """Image row r of a [B*H*W, ...] ref, one [C_blk] vector per input column (tile_w + 2 of them; without the
        halo, the tile_w output columns), in ref's dtype, zero outside the image."""
        from jax.experimental.pallas import triton as plgpu

        row_inside = (r >= 0) & (r < self.height)
        columns = self.in_columns if halo else self.in_columns[1:self.tile_w + 1]
        return tuple(plgpu.load(ref.at[self.pixel(r, col), self.columns(half)],
                                mask=self.valid_c & (row_inside & col_inside), other=0)
                     for col_inside, col in columns)

    def walk(self, y_ref, yb_ref, k_ref, b_ref, epilogue, acc, own_ref=None, round_pair=None):
        """Runs `acc = epilogue(at, inside, inputs, dw, own, acc)` on every output pixel of the program, in order:
        `at` its flat row, `inside` whether it is in the image, `inputs[dy][dx]` (value, gate) its nine SiLU'd
        inputs, `dw` (value, gate) its fp32 convolution outputs (bias included), `own` its pixel of own_ref's first
        half [C_blk] (loaded a row ahead; None without own_ref). `round_pair(a, b)` rounds the SiLUs of a pixel's
        two halves; default `_round_each`, one at a time: with `_round_pair` the backward's first kernel compiled
        to 544 SASS instructions per row instead of 523, so only the forward passes it. Returns the final acc."""
        dtype, halves = y_ref.dtype, (0, 1)
        round_pair = round_pair or functools.partial(_round_each, dtype=dtype)
        pre_bias = [self.vector(yb_ref, half) for half in halves]
        taps = [[self.vector(k_ref, half, tap) for tap in range(9)] for half in halves]
        bias = [self.vector(b_ref, half) for half in halves]

        def load_row(r):
            """pre of input row r: per input column, (value half, gate half) [C_blk] in the activation dtype."""
            return tuple(zip(*(self.load_row(y_ref, r, half) for half in halves)))

        def silu_row(r, loaded):
            """SiLU(pre + pre_bias) of input row r, each step rounded to the activation dtype, fp32, zero outside."""
            row_inside = (r >= 0) & (r < self.height)
            out = []
            for (col_inside, _), pair in zip(self.in_columns, loaded):
                silus = []
                for half, x in zip(halves, pair):
                    z = (x.astype(jnp.float32) + pre_bias[half]).astype(dtype).astype(jnp.float32)
                    silus.append(z * self.sigmoid(z))
                silus = round_pair(*silus)
                out.append(tuple(jnp.where(row_inside & col_inside, s, 0.0) for s in silus))
            return tuple(out)

        def load_own(r):
            return () if own_ref is None else self.load_row(own_ref, r, 0, halo=False)

        def visit(r, window, own, acc):  # window: SiLU'd input rows r - 1, r, r + 1
            for j in range(self.tile_w):
                inputs = tuple(tuple(window[dy][j + dx] for dx in range(3)) for dy in range(3))
                dw = []
                for half in halves:
                    total = bias[half]
                    for dy in range(3):
                        for dx in range(3):
                            total = _multiply_add(inputs[dy][dx][half], taps[half][3 * dy + dx], total,
                                                  self.interpret)
                    dw.append(total)
                col = self.w0 + j
                inside = (col < self.width) & (r < self.h_end)
                acc = epilogue(self.pixel(r, col), inside, inputs, dw, own[j] if own else None, acc)
            return acc

        return _walk_rows(self.h0, self.row_chunk, load_row, silu_row, visit, acc, load_own)


def _fused_kernel(y_ref, yb_ref, k_ref, b_ref, o_ref, **shape):
    """The forward on one `_ColumnTile`: o_ref [B*H*W, F] = value * SiLU(gate) of each output pixel."""
    from jax.experimental.pallas import triton as plgpu

    tile = _ColumnTile(**shape)

    def store(at, inside, inputs, dw, own, acc):
        gated = _gate(*dw, o_ref.dtype, tile.sigmoid, round_pair)
        plgpu.store(o_ref.at[at, tile.columns(0)], gated, mask=tile.valid_c & inside)
        return acc

    round_pair = functools.partial(_round_pair, dtype=o_ref.dtype, interpret=tile.interpret)
    tile.walk(y_ref, yb_ref, k_ref, b_ref, store, (), round_pair=round_pair)


def row_chunk(batch: int, height: int, width_tiles: int, blocks: int, programs: int = 1024) -> int:
    """Rows per program: the whole image height unless that leaves fewer than `programs` programs (batch 1), then
    halved until it does (each chunk re-reads 2 halo rows), down to 4."""
    chunk = height
    while chunk > 4 and batch * pl.cdiv(height, chunk) * width_tiles * blocks < programs:
        chunk = pl.cdiv(chunk, 2)
    return chunk


def _column_grid(image_shape, features: int, tile: tuple[int, int, int, int | None], interpret: bool):
    """(kernel keyword arguments, grid, programs along grid axis 0, compiler params) of a `_ColumnTile` kernel over
    images [B, H, W, ...] and `features` channels per half, with tile (columns, channels, warps, rows per program
    or None: `row_chunk`)."""
    batch, height, width = image_shape[:3]
    tile_w, block_c, num_warps, rows = tile
    width_tiles, blocks = pl.cdiv(width, tile_w), pl.cdiv(features, block_c)
    rows = rows or row_chunk(batch, height, width_tiles, blocks)
    programs = batch * pl.cdiv(height, rows) * width_tiles
    shape = dict(height=height, width=width, features=features, tile_w=tile_w, block_c=block_c,
                 row_chunk=rows, width_tiles=width_tiles, interpret=interpret)
    return shape, (programs, blocks), programs, None if interpret else _triton_params(num_warps)


def _column_inputs(pre, pre_bias, kernel):
    """The `_ColumnTile` refs: pre flat [B*H*W, 2F], pre_bias and taps [9, 2F] in pre's dtype (the bias, fp32, is
    passed by the kernels that take it)."""
    channels = pre.shape[-1]
    return pre.reshape(-1, channels), pre_bias.astype(pre.dtype), kernel.reshape(9, channels).astype(pre.dtype)


def _fused_forward(pre, pre_bias, kernel, bias, interpret: bool, tile_w: int | None = None,
                   block_c: int | None = None, num_warps: int | None = None, rows: int | None = None):
    batch, height, width, channels = pre.shape
    default_w, default_c, default_warps = forward_tile(width)
    tile = (tile_w or default_w, block_c or default_c, num_warps or default_warps, rows)
    shape, grid, _, params = _column_grid(pre.shape, channels // 2, tile, interpret)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_fused_kernel, **shape),
        out_shape=jax.ShapeDtypeStruct((batch * height * width, channels // 2), pre.dtype),
        grid=grid, compiler_params=params, in_specs=[any_spec] * 4, out_specs=any_spec, interpret=interpret,
        name="silu_glu_dwconv",
    )(*_column_inputs(pre, pre_bias, kernel), bias.astype(jnp.float32))
    return out.reshape(batch, height, width, channels // 2)


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


def _total_grad_kernel(y_ref, yb_ref, k_ref, b_ref, ct_ref, dt_ref, dk_ref, db_ref, **shape):
    """Backward, part 1, on the forward's `_ColumnTile`s: recomputes the SiLU'd input and the convolution, writes
    the cotangent of its fp32 output `d_total` [B*H*W, 2F] (activation dtype: its values are exactly representable
    there) and this program's sums of the kernel and bias gradients (dk_ref [programs*9, 2F], db_ref [programs, 2F],
    fp32; summed over programs by the caller), held per thread in registers while the program walks its pixels (no
    reduction across threads). ct_ref: the output's cotangent [B*H*W, F]."""
    from jax.experimental.pallas import triton as plgpu

    tile = _ColumnTile(**shape)
    halves = (0, 1)

    def accumulate(at, inside, inputs, dw, cotangent, acc):
        dk, db = acc
        mask = tile.valid_c & inside
        d_total = _gate_backward(dw[0], dw[1], cotangent.astype(jnp.float32), y_ref.dtype, tile.sigmoid)
        new_dk, new_db = [], []
        for half in halves:
            d = jnp.where(inside, d_total[half], 0.0)
            plgpu.store(dt_ref.at[at, tile.columns(half)], d.astype(dt_ref.dtype), mask=mask)
            new_db.append(db[half] + d)
            new_dk.append(tuple(_multiply_add(inputs[t // 3][t % 3][half], d, dk[half][t], tile.interpret)
                                for t in range(9)))
        return tuple(new_dk), tuple(new_db)

    zero = jnp.zeros((tile.block_c,), jnp.float32)
    dk, db = tile.walk(y_ref, yb_ref, k_ref, b_ref, accumulate, (((zero,) * 9,) * 2, (zero,) * 2), own_ref=ct_ref)
    for half in halves:
        plgpu.store(db_ref.at[tile.program, tile.columns(half)], db[half], mask=tile.valid_c)
        for t in range(9):
            plgpu.store(dk_ref.at[tile.program * 9 + t, tile.columns(half)], dk[half][t], mask=tile.valid_c)


def _input_grad_kernel(dt_ref, y_ref, yb_ref, k_ref, dy_ref, dyb_ref, **shape):
    """Backward, part 2, on `_ColumnTile`s over all 2F channels (features = 2F, one half): the transposed
    convolution of d_total (dt_ref [B*H*W, 2F]) at each pixel, rounded to the activation dtype (the cotangent of
    the padded SiLU activation), then the SiLU's and the bias add's backward, rounded as XLA's vjp of `silu_padded`
    rounds: dy_ref [B*H*W, 2F] the cotangent of pre, dyb_ref [programs, 2F] this program's fp32 sum of it (the
    pre_bias gradient, summed over programs by the caller). y_ref: pre [B*H*W, 2F]; yb_ref pre_bias [2F]; k_ref
    [9, 2F], in the activation dtype."""
    from jax.experimental.pallas import triton as plgpu

    tile = _ColumnTile(**shape)
    dtype = y_ref.dtype
    taps = [tile.vector(k_ref, 0, tap) for tap in range(9)]
    pre_bias = tile.vector(yb_ref, 0)

    def prepare_row(r, loaded):  # d_total of image row r per input column, fp32 (the loads are zero outside)
        return tuple(x.astype(jnp.float32) for x in loaded)

    def visit(r, window, own, acc):  # window: d_total rows r - 1, r, r + 1; own: pre of row r
        for j in range(tile.tile_w):
            # d_padded[r + 1, c + 1] = sum over taps of d_total[r + 1 - dy, c + 1 - dx] * kernel[dy, dx]
            total = jnp.zeros((tile.block_c,), jnp.float32)
            for dy in range(3):
                for dx in range(3):
                    total = _multiply_add(window[2 - dy][j + 2 - dx], taps[3 * dy + dx], total, tile.interpret)
            col = tile.w0 + j
            inside = (col < tile.width) & (r < tile.h_end)
            at, mask = tile.pixel(r, col), tile.valid_c & inside
            z = (own[j].astype(jnp.float32) + pre_bias).astype(dtype).astype(jnp.float32)
            sig = tile.sigmoid(z)
            d_silu = total.astype(dtype).astype(jnp.float32)
            d_pre = (d_silu * sig + d_silu * z * (1.0 - sig) * sig).astype(dtype)
            plgpu.store(dy_ref.at[at, tile.columns(0)], d_pre, mask=mask)
            acc = acc + jnp.where(inside, d_pre.astype(jnp.float32), 0.0)
        return acc

    load_row = functools.partial(tile.load_row, dt_ref, half=0)
    load_own = functools.partial(tile.load_row, y_ref, half=0, halo=False)
    d_pre_bias = _walk_rows(tile.h0, tile.row_chunk, load_row, prepare_row, visit,
                            jnp.zeros((tile.block_c,), jnp.float32), load_own)
    plgpu.store(dyb_ref.at[tile.program, tile.columns(0)], d_pre_bias, mask=tile.valid_c)


def _total_grad(pre, pre_bias, kernel, bias, cotangent, interpret: bool, tile: tuple):
    """Backward part 1 (`_total_grad_kernel`) on `tile` (columns, channels, warps, rows or None): (d_total
    [B*H*W, 2F] in pre's dtype, d_kernel [3, 3, 2F] fp32, d_bias [2F] fp32)."""
    batch, height, width, channels = pre.shape
    shape, grid, programs, params = _column_grid(pre.shape, channels // 2, tile, interpret)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    d_total, dk_rows, db_rows = pl.pallas_call(
        functools.partial(_total_grad_kernel, **shape),
        out_shape=(jax.ShapeDtypeStruct((batch * height * width, channels), pre.dtype),
                   jax.ShapeDtypeStruct((programs * 9, channels), jnp.float32),
                   jax.ShapeDtypeStruct((programs, channels), jnp.float32)),
        grid=grid, compiler_params=params, in_specs=[any_spec] * 5, out_specs=(any_spec,) * 3, interpret=interpret,
        name="glu_dwconv_bwd_total",
    )(*_column_inputs(pre, pre_bias, kernel), bias.astype(jnp.float32), cotangent.reshape(-1, channels // 2))
    return d_total, jnp.sum(dk_rows.reshape(programs, 3, 3, channels), axis=0), jnp.sum(db_rows, axis=0)


def _input_grad(d_total, pre, pre_bias, kernel, interpret: bool, tile: tuple):
    """Backward part 2 (`_input_grad_kernel`) on `tile`, all 2F channels as one half: (d_pre [B, H, W, 2F],
    d_pre_bias [2F] in pre_bias's dtype)."""
    channels = pre.shape[-1]
    shape, grid, programs, params = _column_grid(pre.shape, channels, tile, interpret)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    d_pre, dpb_rows = pl.pallas_call(
        functools.partial(_input_grad_kernel, **shape),
        out_shape=(jax.ShapeDtypeStruct((d_total.shape[0], channels), pre.dtype),
                   jax.ShapeDtypeStruct((programs, channels), jnp.float32)),
        grid=grid, compiler_params=params, in_specs=[any_spec] * 4, out_specs=(any_spec,) * 2, interpret=interpret,
        name="glu_dwconv_bwd_input",
    )(d_total, *_column_inputs(pre, pre_bias, kernel))
    # Rounded to the activation dtype first, as add_bias's backward rounds the sum.
    return d_pre.reshape(pre.shape), jnp.sum(dpb_rows, axis=0).astype(pre.dtype).astype(pre_bias.dtype)


def _pallas_backward(pre, pre_bias, kernel, bias, cotangent, interpret: bool, tiles: tuple | None = None):
    """(d_pre, d_pre_bias, d_kernel, d_bias) of `silu_glu_dwconv_xla`, by the two kernels above plus four small
    sums over programs. tiles: (part 1's, part 2's) (columns, channels, warps, rows or None); default
    `backward_tiles`."""
    total_tile, input_tile = tiles or backward_tiles(pre.shape[2])
    d_total, d_kernel, d_bias = _total_grad(pre, pre_bias, kernel, bias, cotangent, interpret, total_tile)
    d_pre, d_pre_bias = _input_grad(d_total, pre, pre_bias, kernel, interpret, input_tile)
    return d_pre, d_pre_bias, d_kernel.astype(kernel.dtype), d_bias.astype(bias.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def silu_glu_dwconv_pallas(pre: jax.Array, pre_bias: jax.Array, kernel: jax.Array, bias: jax.Array,
                           interpret: bool = False) -> jax.Array:
    """Same contract as `silu_glu_dwconv_xla`; the kernel takes its weights in pre's dtype (as the XLA sibling's
    multiply does after the model's cast) and the bias in fp32."""
    return _fused_forward(pre, pre_bias, kernel, bias, interpret)


def _fused_fwd(pre, pre_bias, kernel, bias, interpret):
    return _fused_forward(pre, pre_bias, kernel, bias, interpret), (pre, pre_bias, kernel, bias)


def _fused_bwd(interpret, residuals, cotangent):
    """The kernels recompute the SiLU'd input, the convolution and the gating, and differentiate all of it."""
    return _pallas_backward(*residuals, cotangent, interpret)


silu_glu_dwconv_pallas.defvjp(_fused_fwd, _fused_bwd)
