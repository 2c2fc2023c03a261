"""Pallas GPU kernels for CAME's factored statistics (sana_jax.optim): a matrix's row and column sums in one read.

A factored CAME leaf needs, per matrix, the sums over each of its two axes of g^2 (the second moment before its
clipping scale and eps1; the sums over B also give the clipping's global norm) and of (u - m)^2 + eps2 (the
instability). XLA computes a sum over rows and a sum over columns as two reductions, each its own pass over the
fp32 gradient (and m), and cannot fuse the clipping of the gradients into a custom call's operand. These kernels
read every tile once, clip it themselves where the norm is already known (the instability), and produce both sums.
A leaf is viewed as [N, A, B]: N = every leading axis (layers included), A and B = the two factored axes, which are
always the last two.

  square_sums   g                                -> sums over B [N, A] and over A [N, B] of g^2
  confidence    g, m, f_a [N, A], f_b [N, B], d  -> m' = ema(b1, m, u) with u = (f_a f_b) clip(g) / d, written
                                                    over m, and the sums over B and over A of (u - m')^2 + eps2
clip(g) is optax.clip_by_global_norm's select(norm < max_norm, g, (g / norm) * max_norm), or g.

Each program takes `_ROWS` rows of one matrix and walks their columns `_COLS` at a time: its sums over B are
complete; its sums over A cover its rows only and are added up outside, in a fixed order. Every element is
computed with the same fp32 operations as the XLA sibling in sana_jax.optim (16-bit gradients are clipped after
their widening to fp32 here, before it there); only the order of the sums differs.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sana_jax.ops import triton_params

Array = jax.Array

_ROWS = 32  # rows of A per program
_COLS = 256  # columns of B per step: a [32, 256] fp32 tile, 32 KiB


def _clip(g: Array, scalars_ref, clipping: bool) -> Array:
    """optax.clip_by_global_norm's formula; scalars_ref[0], [1] hold (global norm, max norm)."""
    if not clipping:
        return g
    norm, max_norm = scalars_ref[0], scalars_ref[1]
    return jnp.where(norm < max_norm, g, (g / norm) * max_norm)


def _walk_columns(step, rows: int, cols: int):
    """Runs step(tile_at, ok, column_sums_at, i) -> row sums [_ROWS] over this program's column steps and returns
    (their total, the first row of the program's rows in the [N*A, B] view, their in-bounds mask).

    tile_at(ref): the [_ROWS, _COLS] tile of step i of a [N*A, B] ref, `ok` its in-bounds mask;
    column_sums_at(ref, values [_COLS]): stores the tile's sums over its rows as this program's partial (row
    `matrix * blocks + block` of a [N*blocks, B] ref)."""
    from jax.experimental.pallas import triton as plgpu

    matrix, block = pl.program_id(0), pl.program_id(1)  # read here: the interpreter cannot see them inside loops
    first = matrix * rows + block * _ROWS
    part = matrix * pl.num_programs(1) + block
    row_ok = block * _ROWS + jnp.arange(_ROWS) < rows

    def body(i, total):
        col_ok = i * _COLS + jnp.arange(_COLS) < cols
        ok = row_ok[:, None] & col_ok[None, :]

        def tile_at(ref):
            return ref.at[pl.ds(first, _ROWS), pl.ds(i * _COLS, _COLS)]

        def column_sums_at(ref, values):
            plgpu.store(ref.at[pl.ds(part, 1), pl.ds(i * _COLS, _COLS)], values[None, :], mask=col_ok[None, :])

        return total + step(tile_at, ok, column_sums_at, i)

    total = jax.lax.fori_loop(0, pl.cdiv(cols, _COLS), body, jnp.zeros((_ROWS,), jnp.float32))
    return total, first, row_ok


def _square_sums_kernel(g_ref, sum_b_ref, sum_a_ref, *, rows, cols):
    from jax.experimental.pallas import triton as plgpu

    def step(tile_at, ok, column_sums_at, i):
        del i
        g = plgpu.load(tile_at(g_ref), mask=ok, other=0).astype(jnp.float32)
        x = jnp.square(g)  # 0 where masked
        column_sums_at(sum_a_ref, jnp.sum(x, axis=0))
        return jnp.sum(x, axis=1)

    sum_b, first, row_ok = _walk_columns(step, rows, cols)
    plgpu.store(sum_b_ref.at[pl.ds(first, _ROWS)], sum_b, mask=row_ok)


def _confidence_kernel(g_ref, mu_ref, f_a_ref, f_b_ref, divisor_ref, scalars_ref, mu_out_ref, sum_b_ref, sum_a_ref,
                       *, rows, cols, clipping):
    from jax.experimental.pallas import triton as plgpu

    matrix, block = pl.program_id(0), pl.program_id(1)
    b1, eps2 = scalars_ref[2], scalars_ref[3]
    divisor = divisor_ref[matrix]
    f_a = plgpu.load(f_a_ref.at[pl.ds(matrix * rows + block * _ROWS, _ROWS)],
                     mask=block * _ROWS + jnp.arange(_ROWS) < rows, other=0)

    def step(tile_at, ok, column_sums_at, i):
        f_b = plgpu.load(f_b_ref.at[pl.ds(matrix * cols + i * _COLS, _COLS)],
                         mask=i * _COLS + jnp.arange(_COLS) < cols, other=0)
        g = plgpu.load(tile_at(g_ref), mask=ok, other=0).astype(jnp.float32)
        mu = plgpu.load(tile_at(mu_ref), mask=ok, other=0)
        u = (f_a[:, None] * f_b[None, :]) * _clip(g, scalars_ref, clipping) / divisor
        mu = (1.0 - b1) * u + b1 * mu  # sana_jax.optim._ema
        plgpu.store(tile_at(mu_out_ref), mu, mask=ok)
        res = jnp.where(ok, jnp.square(u - mu) + eps2, 0.0)
        column_sums_at(sum_a_ref, jnp.sum(res, axis=0))
        return jnp.sum(res, axis=1)

    sum_b, first, row_ok = _walk_columns(step, rows, cols)
    plgpu.store(sum_b_ref.at[pl.ds(first, _ROWS)], sum_b, mask=row_ok)


def _matrices(x: Array) -> tuple[int, int, int]:
    """(N, A, B) of the [N, A, B] view of x (x has >= 2 axes)."""
    if x.ndim < 2:
        raise ValueError(f"a factored CAME leaf has at least 2 axes, got shape {x.shape}")
    return math.prod(x.shape[:-2]), x.shape[-2], x.shape[-1]


def _scalars(clip: tuple[Array, Array] | None, *values) -> Array:
    """The kernels' fp32 scalars: (global norm, max norm, *values); (0, 0) without clipping."""
    norm, max_norm = clip if clip is not None else (0.0, 0.0)
    return jnp.stack([jnp.asarray(v, jnp.float32).reshape(()) for v in (norm, max_norm, *values)])


def _sums_call(kernel, name: str, inputs: list[Array], n: int, a: int, b: int, extra_out=(), aliases=None,
               interpret: bool = False):
    """pallas_call of a sums kernel over grid (N, row blocks): (*extra outputs, sums over B [N, A], over A [N, B])."""
    blocks = pl.cdiv(a, _ROWS)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out_shape = (*extra_out, jax.ShapeDtypeStruct((n * a,), jnp.float32),
                 jax.ShapeDtypeStruct((n * blocks, b), jnp.float32))
    *extra, sum_b, partial_a = pl.pallas_call(
        kernel, out_shape=out_shape, grid=(n, blocks), in_specs=[any_spec] * len(inputs),
        out_specs=(any_spec,) * len(out_shape), input_output_aliases=aliases or {},
        compiler_params=triton_params(interpret), interpret=interpret, name=name,
    )(*inputs)
    return (*extra, sum_b.reshape(n, a), partial_a.reshape(n, blocks, b).sum(axis=1))


def square_sums(g: Array, *, interpret: bool = False):
    """Sums of g^2 over the last axis [N, A] and over the second-to-last [N, B], in fp32.

    Args:
      g: [..., A, B] gradient (fp32 or 16-bit; squared in fp32), unclipped: the sums over B also give the
        gradient's norm for the clipping, which scales them afterwards.
      interpret: run the Pallas interpreter (any backend) instead of compiling for a CUDA GPU.
    """
    n, a, b = _matrices(g)
    kernel = functools.partial(_square_sums_kernel, rows=a, cols=b)
    return _sums_call(kernel, "came_square_sums", [g.reshape(n * a, b)], n, a, b, interpret=interpret)


def confidence(g: Array, mu: Array, f_a: Array, f_b: Array, divisor: Array, b1, eps2,
               clip: tuple[Array, Array] | None = None, interpret: bool = False):
    """CAME's first-moment update and the sums of its instability, in one pass over g and m.

    u = (f_a f_b) clip(g) / divisor;  m' = (1 - b1) u + b1 m;  s = (u - m')^2 + eps2.

    Args:
      g: [..., A, B] gradient; mu: [..., A, B] fp32 first moment (its buffer is reused for m').
      f_a: [N, A] and f_b: [N, B] fp32 factors along A and B (N = the product of the leading axes).
      divisor: [N] fp32, the RMS clip divisor of each matrix's layer.
      b1, eps2: floats or traced scalars. clip, interpret: as `square_sums`.
    Returns:
      (m' shaped like mu, sums of s over B [N, A], over A [N, B]).
    """
    n, a, b = _matrices(g)
    kernel = functools.partial(_confidence_kernel, rows=a, cols=b, clipping=clip is not None)
    inputs = [g.reshape(n * a, b), mu.reshape(n * a, b), f_a.reshape(n * a).astype(jnp.float32),
              f_b.reshape(n * b).astype(jnp.float32), divisor.reshape(n).astype(jnp.float32),
              _scalars(clip, b1, eps2)]
    mu_new, sum_b, sum_a = _sums_call(kernel, "came_confidence", inputs, n, a, b,
                                      extra_out=(jax.ShapeDtypeStruct((n * a, b), jnp.float32),), aliases={1: 0},
                                      interpret=interpret)
    return mu_new.reshape(mu.shape), sum_b, sum_a
