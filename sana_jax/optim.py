"""CAME and CAME-8bit as optax optimizers, with SANA's factoring rules on the JAX layouts of sana_jax params.

CAME (Luo et al. 2023, arXiv 2307.02047) is Adafactor's factored second moment plus a confidence step: the
first moment m is divided by a factored estimate of the instability (u - m)^2. SANA trains with it
(`CAMEWrapper`, SANA-1.0) and with a variant whose first moment is stored in 8 bits (`CAME8BitWrapper`,
SANA-1.5). Per parameter and step, all in fp32 (came_pytorch's `CAME.step`, no bias correction):

    u = g^2 + eps1
    factored:   v_row <- b2 v_row + (1-b2) mean_cols(u);  v_col <- b2 v_col + (1-b2) mean_rows(u)
                u = rsqrt(v_row / mean(v_row)) * rsqrt(v_col) * g
    unfactored: v <- b2 v + (1-b2) u;  u = rsqrt(v) * g
    u = u / max(1, RMS(u) / clip_threshold)                  RMS over the whole (per-layer) tensor
    m <- b1 m + (1-b1) u
    factored:   s = (u - m)^2 + eps2;  r_row, r_col <- EMAs (b3) of its row / column means
                direction = rsqrt(r_row / mean(r_row)) * rsqrt(r_col) * m
    unfactored: direction = m                                no confidence step
    p <- p - lr * wd * p - lr * direction                    `came` = scale_by_came + add_decayed_weights + lr

"Rows" are always the output features, i.e. dim 0 of the torch weight: r_row / v_row are indexed by them.
The factored update equals r_i c_j / mean(r) either way round, but the rounding (and SANA-8bit's blocks of
rows) depend on which statistic is normalised, so the torch orientation is kept exactly.

Which parameters are factored (`factorization`):
- "sana" (default): SANA's `_get_options` on the JAX layouts of sana_jax (flax) params. A 2-D `kernel`
  [in, out] is a Dense kernel (torch [out, in]: rows = axis 1); a 4-D kernel [1, 1, in, out] is a 1x1 conv
  (HWIO; rows = axis 3); any other 2-D leaf (scale_shift_table [6, D], same layout as torch) has rows = axis 0.
  Everything else (1-D, 3x3 / depthwise HWIO kernels, 3-D) is unfactored, with no confidence step.
- "last_two": came_pytorch's rule, for tensors in torch layout: every tensor with >= 2 (per-layer) dims is
  factored over its last two dims (rows = axis -2, columns = axis -1).

Stacked layers (`stacked`): sana_jax scans its blocks, so every leaf under the top-level `blocks` key has a
leading `layers` axis (model.py `_scanned_blocks`, logical axis name `layers`). Such a leaf is treated as
`layers` separate parameters, as in SANA where each block owns its tensors: the factored means, the RMS clip
and the 8-bit blocks never mix layers. Pass `stacked=` (a predicate on the leaf's path names) for other trees. With
`layer_group=n` the stacked leaves are updated n layers at a time, in place, inside one loop (less memory, same
maths).

CAME-8bit (`came_8bit`): only the first moment m of a "matrix" parameter (factored 2-D leaf or 1x1 conv under
"sana"; 2-D or 4-D [O, I, 1, 1] under "last_two") with rows * cols > min_8bit_size (strict) is stored as uint8,
in blocks of `block_size` ROWS (torch dim 0, per layer) with one min and one scale = (max - min) / 255 per
block; q = round((m - min) / scale), m = q * scale + min. Each step dequantises m, updates it in fp32, uses the
fp32 m for the rest of the step and stores the requantised m. Everything else (v, r statistics, other
parameters' m) stays fp32, as in SANA's CAME8BitWrapper.

Clipping and kernels: `max_grad_norm=c` is optax.chain(optax.clip_by_global_norm(c), <CAME>) (SANA clips at 0.1),
with the clip applied inside CAME's passes over each gradient. The global norm is not a pass of its own: it is
summed from the factored leaves' sums of g^2, which the second moment needs anyway, and those sums are scaled by
the clip's c^2 afterwards (the same function; rounded once per sum instead of once per element). Under layer
groups, whose sums are made inside the loop, the norm is its own pass first. `impl="pallas"` computes a factored
leaf's row and column sums of g^2 (and of the instability, together with the update of m) in one read each
(sana_jax.came_kernels) instead of XLA's one reduction per sum; "auto" uses it on one CUDA GPU. Measured on an
H100 (benchmarks/RESULTS.md): the full Sana-1.6B update 27.7 -> 21.4 ms, its training step 219.2 -> 215.4 ms with
the blocks scanned, unchanged (181.7 / 182.7 ms) with them unrolled (where, most likely, XLA reads the per-layer
gradients in place and the kernels need them copied into one stack first). Taking the norm from the sums saves
one read of the fp32 gradients; the unrolled b16 step measured 309.9 -> 308.9 ms, within run-to-run spread.

Gradients narrower than their parameters (bf16 gradients of fp32 weights: the train step differentiates the
model's bf16 compute copies where `reads_narrow_gradients`) are updated as if widened to the parameter's dtype
first, and the update has the parameter's dtype. The Pallas kernels read them at their own width (half the bytes);
XLA's passes, and the layer groups, which write the direction over the gradient, widen them first. Bit-identical
to widening in front on CPU; compiled on an H100, an ulp or two apart on some elements (tests/test_gpu.py).

State layout: every state leaf keeps its parameter's rank; a factored statistic has size 1 on the axis it
reduces (keepdims), 8-bit block statistics have size 1 on every per-layer axis but the rows, which become the
block count. Unused slots hold a (1,)-shaped placeholder, as optax's `FactoredState`. `state_axes` derives the
sharding of every state leaf from its parameter's (an axis whose size changed is replicated).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec

from sana_jax import came_kernels
from sana_jax.ops import on_cuda

Array = jax.Array
Factorization = Literal["sana", "last_two"]
Impl = Literal["auto", "xla", "pallas"]
PathNames = tuple[str, ...]
StackedFn = Callable[[PathNames], bool]

_FACTORIZATIONS = ("sana", "last_two")
_IMPLS = ("auto", "xla", "pallas")
_PLACEHOLDER_SHAPE = (1,)  # unused state slots, as optax's FactoredState


# ----------------------------------------------------------------------------------------------------------------
# Which parameters are factored, stacked and 8-bit: a static layout per leaf.


@dataclasses.dataclass(frozen=True)
class LeafLayout:
    """How CAME treats one parameter leaf; every axis indexes the full JAX array (layer axes included).

    layer_axes: number of leading stacked-layer axes (0 or 1); statistics are per layer.
    row_axis: the axis of the torch weight's dim 0 (output features) when factored, else None.
    col_axis: the other factored axis (torch dim 1 / input features), else None.
    quant_axis: the torch dim-0 axis along which 8-bit blocks of rows run, for parameters whose kind can be
      8-bit (SANA: Linear / 1x1 conv / other 2-D); None otherwise.
    matrix_size: rows * cols per layer (what SANA compares with min_8bit_size); 0 where quant_axis is None.
    """

    layer_axes: int
    row_axis: int | None = None
    col_axis: int | None = None
    quant_axis: int | None = None
    matrix_size: int = 0

    @property
    def factored(self) -> bool:
        return self.row_axis is not None

    def is_8bit(self, min_8bit_size: int) -> bool:
        """Whether CAME-8bit stores this parameter's m in uint8 (SANA: rows * cols > min_8bit_size, strict)."""
        return self.quant_axis is not None and self.matrix_size > min_8bit_size


def sana_stacked(names: PathNames) -> bool:
    """sana_jax's scanned blocks: every leaf under the top-level `blocks` key has a leading `layers` axis."""
    return len(names) > 1 and names[0] == "blocks"


def _no_stacking(names: PathNames) -> bool:
    del names
    return False


def _matrix_layout(lead: int, row_axis: int, col_axis: int, shape: tuple[int, ...]) -> LeafLayout:
    """A factored matrix whose m may be 8-bit, in blocks of rows."""
    return LeafLayout(lead, row_axis=row_axis, col_axis=col_axis, quant_axis=row_axis,
                      matrix_size=shape[row_axis] * shape[col_axis])


def _sana_layout(names: PathNames, shape: tuple[int, ...], lead: int) -> LeafLayout:
    """SANA's `_get_options` and `_should_use_8bit` on flax layouts (Dense [in, out], conv HWIO)."""
    per_layer = shape[lead:]
    if len(per_layer) == 2 and names and names[-1] == "kernel":  # Dense kernel [in, out] = torch [out, in].T
        return _matrix_layout(lead, row_axis=lead + 1, col_axis=lead, shape=shape)
    if len(per_layer) == 2:  # e.g. scale_shift_table [6, D]: same layout as torch
        return _matrix_layout(lead, row_axis=lead, col_axis=lead + 1, shape=shape)
    if len(per_layer) == 4 and per_layer[:2] == (1, 1):  # 1x1 conv HWIO [1, 1, in, out] = torch [out, in, 1, 1]
        return _matrix_layout(lead, row_axis=lead + 3, col_axis=lead + 2, shape=shape)
    return LeafLayout(lead)  # 1-D, 3x3 / depthwise convs, 3-D: full second moment, no confidence step


def _last_two_layout(names: PathNames, shape: tuple[int, ...], lead: int) -> LeafLayout:
    """came_pytorch's rule on torch layouts: factor every >= 2-D tensor over its last two dims."""
    del names
    per_layer = shape[lead:]
    if len(per_layer) < 2:
        return LeafLayout(lead)
    # SANA's 8-bit rule on torch layouts: 2-D, or 4-D [O, I, 1, 1]; blocks of rows along dim 0.
    is_matrix = len(per_layer) == 2 or (len(per_layer) == 4 and per_layer[2:] == (1, 1))
    return LeafLayout(lead, row_axis=len(shape) - 2, col_axis=len(shape) - 1, quant_axis=lead if is_matrix else None,
                      matrix_size=per_layer[0] * per_layer[1] if is_matrix else 0)


def path_names(path) -> PathNames:
    """A jax key path as plain strings, e.g. ("blocks", "attn", "qkv", "kernel")."""
    names = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                names.append(str(getattr(key, attr)))
                break
        else:
            names.append(str(key))
    return tuple(names)


def _resolve_stacked(factorization: str, stacked: StackedFn | None) -> StackedFn:
    if stacked is not None:
        return stacked
    return sana_stacked if factorization == "sana" else _no_stacking


def leaf_layout(names: PathNames, shape: Sequence[int], factorization: Factorization = "sana",
                stacked: StackedFn | None = None) -> LeafLayout:
    """The layout of one leaf from its path names (e.g. ("blocks", "attn", "qkv", "kernel")) and shape."""
    _check_factorization(factorization)
    shape = tuple(int(d) for d in shape)
    lead = 1 if _resolve_stacked(factorization, stacked)(names) else 0
    if lead > len(shape):
        raise ValueError(f"parameter {'/'.join(names)} of shape {shape} is marked stacked but has no layer axis")
    rule = _sana_layout if factorization == "sana" else _last_two_layout
    return rule(names, shape, lead)


def leaf_layouts(params, factorization: Factorization = "sana", stacked: StackedFn | None = None):
    """A tree like `params` of LeafLayout (works on arrays or ShapeDtypeStructs, e.g. `abstract_params`)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, p: leaf_layout(path_names(path), p.shape, factorization, stacked), params)


# ----------------------------------------------------------------------------------------------------------------
# Block-wise 8-bit storage of a tensor: blocks of `block_size` rows along the quant axis, per layer.


def _num_blocks(rows: int, block_size: int) -> int:
    return -(-rows // block_size)


def _block_stat_shape(shape: tuple[int, ...], layout: LeafLayout, block_size: int) -> tuple[int, ...]:
    """[*layers, 1.., n_blocks (at the quant axis), 1..]: rank kept so shardings can be derived per axis."""
    out = [1] * len(shape)
    out[:layout.layer_axes] = shape[:layout.layer_axes]
    out[layout.quant_axis] = _num_blocks(shape[layout.quant_axis], block_size)
    return tuple(out)


def _block_of_row(rows: int, block_size: int) -> Array:
    """[rows] int32: the block index of every row."""
    return jnp.arange(rows, dtype=jnp.int32) // block_size


def _block_reduce(x: Array, layout: LeafLayout, block_size: int, reduce, identity: float) -> Array:
    """min or max of every block of rows of x (per layer), in the shape of `_block_stat_shape`."""
    axis, lead = layout.quant_axis, layout.layer_axes
    # First per row (the one pass over x), then per block on that small [*layers, rows] vector, through a
    # [rows, n_blocks] membership mask rather than a pad and reshape of the row axis, which may be sharded.
    per_row = reduce(x, axis=tuple(a for a in range(lead, x.ndim) if a != axis), keepdims=True)
    rows = x.shape[axis]
    member = _block_of_row(rows, block_size)[:, None] == jnp.arange(_num_blocks(rows, block_size))[None, :]
    member = member.reshape((1,) * axis + member.shape + (1,) * (x.ndim - axis - 1))
    return reduce(jnp.where(member, jnp.expand_dims(per_row, axis + 1), identity), axis=axis)


def _rows_of_blocks(stat: Array, rows: int, layout: LeafLayout, block_size: int) -> Array:
    """Broadcast a per-block statistic back to one value per row (size `rows` at the quant axis)."""
    return jnp.take(stat, _block_of_row(rows, block_size), axis=layout.quant_axis)


def quantize_blocks(x: Array, layout: LeafLayout, block_size: int) -> tuple[Array, Array, Array]:
    """fp32 x -> (uint8 q like x, block min, block scale) as SANA's `_quantize_state`.

    scale = (max - min) / 255, q = round_half_even((x - min) / scale). An all-equal block has scale 0; its q is 0
    (SANA divides 0/0 there and casts the NaN to 0), so it dequantises exactly to min, without a NaN.
    """
    rows = x.shape[layout.quant_axis]
    block_min = _block_reduce(x, layout, block_size, jnp.min, jnp.inf)
    block_max = _block_reduce(x, layout, block_size, jnp.max, -jnp.inf)
    scale = (block_max - block_min) / 255.0
    row_min = _rows_of_blocks(block_min, rows, layout, block_size)
    row_scale = _rows_of_blocks(scale, rows, layout, block_size)
    nonzero = row_scale > 0
    q = jnp.where(nonzero, (x - row_min) / jnp.where(nonzero, row_scale, 1.0), 0.0)
    q = jnp.clip(jnp.round(q), 0, 255).astype(jnp.uint8)
    return q, block_min, scale


def dequantize_blocks(q: Array, block_min: Array, scale: Array, layout: LeafLayout, block_size: int) -> Array:
    """q * scale + min per block, in fp32 (SANA's `_dequantize_state`)."""
    rows = q.shape[layout.quant_axis]
    row_scale = _rows_of_blocks(scale, rows, layout, block_size)
    row_min = _rows_of_blocks(block_min, rows, layout, block_size)
    return q.astype(jnp.float32) * row_scale + row_min


# ----------------------------------------------------------------------------------------------------------------
# States.


class ScaleByCameState(NamedTuple):
    """State of `scale_by_came`; every field but count is a tree like the params (fp32 leaves).

    mu: first moment m, param shape. v_row / v_col: factored second moment (param shape with the column /
    row axis of size 1), v: unfactored second moment (param shape). r_row / r_col: factored instability
    (like v_row / v_col). Unused slots are (1,) placeholders.
    """

    count: Array  # int32 []
    mu: Any
    v_row: Any
    v_col: Any
    v: Any
    r_row: Any
    r_col: Any


class ScaleByCame8bitState(NamedTuple):
    """State of `scale_by_came_8bit`: as ScaleByCameState, with mu uint8 where the parameter is 8-bit.

    mu_min / mu_scale: fp32 per block of rows ([*layers, 1.., n_blocks, 1..]), (1,) placeholders elsewhere.
    """

    count: Array  # int32 []
    mu: Any
    mu_min: Any
    mu_scale: Any
    v_row: Any
    v_col: Any
    v: Any
    r_row: Any
    r_col: Any


@dataclasses.dataclass(frozen=True)
class _Hyper:
    """Numeric hyperparameters (Python floats, or arrays under optax.inject_hyperparams)."""

    b1: Any
    b2: Any
    b3: Any
    eps1: Any
    eps2: Any
    clip_threshold: Any


def _zeros_like_keepdims(param, axis: int) -> Array:
    """fp32 zeros shaped like `param` with `axis` of size 1, with the sharding a keepdims sum would have
    (optax's `_zeros_like_no_axis` trick, so explicit-sharding meshes place the state with its parameter)."""
    target = jax.eval_shape(lambda x: jnp.sum(x, axis=axis, keepdims=True), param)
    return jnp.zeros_like(target, dtype=jnp.float32)


def _placeholder() -> Array:
    return jnp.zeros(_PLACEHOLDER_SHAPE, jnp.float32)


def _init_stats(param, layout: LeafLayout) -> tuple[Array, Array, Array, Array, Array]:
    """(v_row, v_col, v, r_row, r_col) zeros for one leaf."""
    if layout.factored:
        # Indexed by rows: the column axis is reduced, and vice versa. Four separate arrays (not one shared
        # zeros buffer), so a jitted step may donate the state.
        row = lambda: _zeros_like_keepdims(param, layout.col_axis)  # noqa: E731
        col = lambda: _zeros_like_keepdims(param, layout.row_axis)  # noqa: E731
        return row(), col(), _placeholder(), row(), col()
    return _placeholder(), _placeholder(), jnp.zeros_like(param, dtype=jnp.float32), _placeholder(), _placeholder()


# ----------------------------------------------------------------------------------------------------------------
# The per-leaf CAME step.


def _ema(decay, state: Array, value: Array) -> Array:
    # Written value-first: XLA then fuses it to fma(value, 1 - decay, decay * state), which is exactly torch's
    # `state.mul_(decay).add_(value, alpha=1 - decay)` on CPU, so the 8-bit rounding decisions agree with SANA's.
    return (1.0 - decay) * value + decay * state


def _rsqrt_factors(row: Array, col: Array, row_axis: int) -> tuple[Array, Array]:
    """came_pytorch's `_approx_sq_grad` as its two factors: rsqrt(row / mean(row)) (rows), rsqrt(col) (columns)."""
    return jax.lax.rsqrt(row / jnp.mean(row, axis=row_axis, keepdims=True)), jax.lax.rsqrt(col)


def _per_layer_rms(x: Array, layer_axes: int) -> Array:
    """||x||_2 / sqrt(numel) over each layer's slice (keepdims), as came_pytorch's `_rms` per tensor."""
    axes = tuple(range(layer_axes, x.ndim))
    numel = math.prod(x.shape[layer_axes:])
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True)) / math.sqrt(numel)


Clip = tuple[Array, Array] | None  # (global norm of the gradients, max norm), or no clipping
SquareSums = tuple[Array, Array]  # sums of g^2 over the column axis and over the row axis, keepdims, fp32


def _clipped(g: Array, clip: Clip) -> Array:
    """optax.clip_by_global_norm's formula on one leaf (in the leaf's dtype, as optax), widened to fp32."""
    if clip is not None:
        norm, max_norm = clip
        g = jax.lax.select(norm < max_norm, g, (g / norm.astype(g.dtype)) * max_norm)
    return g.astype(jnp.float32)


def global_norm(grads) -> Array:
    """optax.tree.norm of a tree of gradients, squared and summed in fp32 whatever their dtype."""
    leaves = jax.tree.leaves(grads)
    return _global_norm(leaves, [None] * len(leaves))


def _global_norm(grads: Sequence[Array], square_sums: Sequence[SquareSums | None]) -> Array:
    """optax.tree.norm of the gradients, squared and summed in fp32; a factored leaf's from its square sums."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) if sq is None else jnp.sum(sq[0])
                        for g, sq in zip(grads, square_sums)))


def _second_moment_means(square_sums: SquareSums, shape: tuple[int, ...], layout: LeafLayout, clip: Clip,
                         eps1) -> tuple[Array, Array]:
    """(means over the column axis, over the row axis) of clip(g)^2 + eps1 from the sums of g^2: the clip scales
    g by c = max_norm / norm (when norm >= max_norm), so its squares sum to c^2 times g's. The same function as
    squaring optax's clipped gradient; the rounding differs (one scaling per sum instead of one per element)."""
    scale = 1.0
    if clip is not None:
        norm, max_norm = clip
        scale = jnp.square(jnp.where(norm < max_norm, 1.0, max_norm / norm)).astype(jnp.float32)
    over_cols, over_rows = square_sums
    return (over_cols * (scale / shape[layout.col_axis]) + eps1, over_rows * (scale / shape[layout.row_axis]) + eps1)


@dataclasses.dataclass(frozen=True)
class _XlaSums:
    """The factored sums as XLA reductions, any backend: the sibling of sana_jax.came_kernels (each is a pass
    over the gradient; XLA fuses the clipping into the confidence's)."""

    def square_sums(self, g: Array, layout: LeafLayout) -> SquareSums:
        """(sums over the column axis, over the row axis) of g^2, keepdims, fp32."""
        u = jnp.square(g.astype(jnp.float32))
        return jnp.sum(u, axis=layout.col_axis, keepdims=True), jnp.sum(u, axis=layout.row_axis, keepdims=True)

    def confidence(self, g: Array, clip: Clip, mu: Array, f_row: Array, f_col: Array, divisor: Array, b1, eps2,
                   layout: LeafLayout) -> tuple[Array, Array, Array]:
        """(m' = ema(b1, m, u), row and column means of (u - m')^2 + eps2) with u = (f_row f_col) clip(g) / divisor."""
        u = (f_row * f_col) * _clipped(g, clip) / divisor
        mu = _ema(b1, mu, u)
        res = jnp.square(u - mu) + eps2  # instability, with the fp32 m of this step (also under 8-bit)
        return mu, jnp.mean(res, axis=layout.col_axis, keepdims=True), jnp.mean(res, axis=layout.row_axis,
                                                                                   keepdims=True)


@dataclasses.dataclass(frozen=True)
class _PallasSums:
    """The same sums from sana_jax.came_kernels: row and column sums in one read of the gradient (and of m), the
    clipping of the confidence step applied inside its kernel. Compiled on CUDA GPUs; `interpret` runs them
    anywhere (tests)."""

    interpret: bool

    @staticmethod
    def _row_axis_is_last(g: Array, layout: LeafLayout) -> bool:
        axes = {layout.row_axis, layout.col_axis}
        if axes != {g.ndim - 2, g.ndim - 1}:
            raise ValueError(f"the CAME kernels need the factored axes last; a leaf of shape {g.shape} has rows on "
                             f"axis {layout.row_axis} and columns on axis {layout.col_axis}")
        return layout.row_axis == g.ndim - 1

    def _by_axis(self, g: Array, over_b: Array, over_a: Array, layout: LeafLayout) -> tuple[Array, Array]:
        """Kernel results over B [N, A] and over A [N, B] -> (over the column axis, over the row axis), keepdims."""
        a, b = g.shape[-2:]
        over_b, over_a = over_b.reshape(g.shape[:-1] + (1,)), over_a.reshape(g.shape[:-2] + (1, b))
        return (over_a, over_b) if self._row_axis_is_last(g, layout) else (over_b, over_a)

    def square_sums(self, g, layout):
        return self._by_axis(g, *came_kernels.square_sums(g, interpret=self.interpret), layout)

    def confidence(self, g, clip, mu, f_row, f_col, divisor, b1, eps2, layout):
        f_a, f_b = (f_col, f_row) if self._row_axis_is_last(g, layout) else (f_row, f_col)
        divisor = jnp.broadcast_to(divisor, g.shape[:-2] + (1, 1))
        mu, sum_b, sum_a = came_kernels.confidence(g, mu, f_a, f_b, divisor, b1, eps2, clip, self.interpret)
        a, b = g.shape[-2:]
        return (mu, *self._by_axis(g, sum_b / b, sum_a / a, layout))


def _came_leaf(g: Array, mu: Array, stats: tuple[Array, ...], layout: LeafLayout, hp: _Hyper, clip: Clip,
               sums: _XlaSums | _PallasSums, square_sums: SquareSums | None = None, dtype=None):
    """One CAME step for one leaf: (direction, new fp32 mu, new (v_row, v_col, v, r_row, r_col)). A factored leaf
    takes its `square_sums` where the global norm was made from them, else computes them. `dtype` (default g's):
    the width g is clipped at, as optax would clip g.astype(dtype); the Pallas sums read g as it is."""
    v_row, v_col, v, r_row, r_col = stats
    wide = g if dtype is None else g.astype(dtype)
    if layout.factored:
        if square_sums is None:
            square_sums = sums.square_sums(g, layout)
        row_mean, col_mean = _second_moment_means(square_sums, g.shape, layout, clip, hp.eps1)
        v_row = _ema(hp.b2, v_row, row_mean)
        v_col = _ema(hp.b2, v_col, col_mean)
        f_row, f_col = _rsqrt_factors(v_row, v_col, layout.row_axis)
        scaled = (f_row * f_col) * _clipped(wide, clip)
        divisor = jnp.maximum(_per_layer_rms(scaled, layout.layer_axes) / hp.clip_threshold, 1.0)
        mu, res_row, res_col = sums.confidence(g, clip, mu, f_row, f_col, divisor, hp.b1, hp.eps2, layout)
        r_row = _ema(hp.b3, r_row, res_row)
        r_col = _ema(hp.b3, r_col, res_col)
        f_row, f_col = _rsqrt_factors(r_row, r_col, layout.row_axis)
        direction = (f_row * f_col) * mu
    else:
        g = _clipped(wide, clip)
        v = _ema(hp.b2, v, jnp.square(g) + hp.eps1)
        u = jax.lax.rsqrt(v) * g
        u = u / jnp.maximum(_per_layer_rms(u, layout.layer_axes) / hp.clip_threshold, 1.0)
        mu = _ema(hp.b1, mu, u)
        direction = mu  # no confidence step for unfactored parameters (came_pytorch and SANA)
    return direction, mu, (v_row, v_col, v, r_row, r_col)


# ----------------------------------------------------------------------------------------------------------------
# Argument checks (skipped for traced values, e.g. hyperparameters injected by optax.inject_hyperparams).


def _concrete_float(value) -> float | None:
    try:
        return float(value)
    except TypeError:  # includes jax.errors.ConcretizationTypeError for traced hyperparameters
        return None


def _check_range(name: str, value, low: float, high: float | None, high_open: bool = True) -> None:
    x = _concrete_float(value)
    if x is None:
        return
    too_high = high is not None and (x >= high if high_open else x > high)
    if not x >= low or too_high:  # `not x >= low` also rejects NaN
        bound = "inf)" if high is None else (f"{high})" if high_open else f"{high}]")
        raise ValueError(f"{name} must be in [{low}, {bound}, got {value!r}")


def _check_factorization(factorization) -> None:
    if factorization not in _FACTORIZATIONS:
        raise ValueError(f"factorization must be one of {_FACTORIZATIONS}, got {factorization!r}")


def _check_eps(eps) -> tuple[Any, Any]:
    try:
        arity = len(eps)
    except TypeError:
        arity = None
    if arity != 2:
        raise ValueError(f"eps must be a pair (eps1 for g^2, eps2 for the instability), got {eps!r}")
    _check_range("eps[0]", eps[0], 0.0, None)
    _check_range("eps[1]", eps[1], 0.0, None)
    return eps[0], eps[1]


def _check_hyper(b1, b2, b3, eps, clip_threshold) -> _Hyper:
    for name, beta in (("b1", b1), ("b2", b2), ("b3", b3)):
        _check_range(name, beta, 0.0, 1.0)
    eps1, eps2 = _check_eps(eps)
    x = _concrete_float(clip_threshold)
    if x is not None and not x > 0:
        raise ValueError(f"clip_threshold must be > 0, got {clip_threshold!r}")
    return _Hyper(b1, b2, b3, eps1, eps2, clip_threshold)


def _static_int(name: str, value, minimum: int) -> int:
    """Block size and min size set array shapes, so they must be concrete ints (not injected arrays)."""
    try:
        as_int = int(value)
    except TypeError:
        raise ValueError(f"{name} sets array shapes and must be a Python int, got a traced {value!r}; under "
                         f"optax.inject_hyperparams pass static_args=('block_size', 'min_8bit_size', "
                         f"'layer_group')") from None
    if as_int != value or as_int < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return as_int


def _check_max_grad_norm(value):
    """None, or a norm > 0 (a float, or a traced scalar under optax.inject_hyperparams)."""
    x = None if value is None else _concrete_float(value)
    if x is not None and not x > 0:
        raise ValueError(f"max_grad_norm must be None or > 0, got {value!r}")
    return value


def _check_impl(impl) -> str:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    return impl


def _layer_group(value) -> int:
    """None (all layers at once) -> 0; else a static int >= 1."""
    return 0 if value is None else _static_int("layer_group", value, 1)


def _check_learning_rate(learning_rate) -> None:
    if callable(learning_rate):
        return  # a schedule: checked by nobody, as in optax
    _check_range("learning_rate", learning_rate, 0.0, None)


# ----------------------------------------------------------------------------------------------------------------
# Gradient transformations.


def _flatten(tree) -> tuple[list[PathNames], list, Any]:
    """(path names, leaves, treedef) of a params-like tree."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    return [path_names(path) for path, _ in with_path], [leaf for _, leaf in with_path], treedef


def _unzip(treedef, per_leaf: list[tuple], n: int) -> list:
    """Per-leaf n-tuples -> n trees shaped by treedef."""
    return [treedef.unflatten([t[i] for t in per_leaf]) for i in range(n)]


@dataclasses.dataclass(frozen=True)
class _Fp32Moment:
    """CAME's first moment m stored as is: one fp32 state leaf per parameter."""

    n_fields = 1  # state leaves per parameter

    def init(self, param, layout: LeafLayout) -> tuple[Array, ...]:
        del layout
        return (jnp.zeros_like(param, dtype=jnp.float32),)

    def is_real(self, layout: LeafLayout) -> tuple[bool, ...]:
        del layout
        return (True,)

    def load(self, stored: Sequence[Array], layout: LeafLayout) -> Array:
        del layout
        return stored[0]

    def store(self, mu: Array, layout: LeafLayout) -> tuple[Array, ...]:
        del layout
        return (mu,)


@dataclasses.dataclass(frozen=True)
class _BlockwiseUint8Moment:
    """SANA-1.5's m: (uint8 codes, block min, block scale) for 8-bit parameters, (fp32 m, placeholder,
    placeholder) for the others."""

    block_size: int
    min_8bit_size: int
    n_fields = 3  # state leaves per parameter

    def init(self, param, layout: LeafLayout) -> tuple[Array, ...]:
        if not layout.is_8bit(self.min_8bit_size):
            return jnp.zeros_like(param, dtype=jnp.float32), _placeholder(), _placeholder()
        stat_shape = _block_stat_shape(tuple(param.shape), layout, self.block_size)
        return (jnp.zeros_like(param, dtype=jnp.uint8), jnp.zeros(stat_shape, jnp.float32),
                jnp.zeros(stat_shape, jnp.float32))

    def is_real(self, layout: LeafLayout) -> tuple[bool, ...]:
        """(m, block min, block scale): the block statistics are placeholders unless m is 8-bit."""
        eight_bit = layout.is_8bit(self.min_8bit_size)
        return True, eight_bit, eight_bit

    def load(self, stored: Sequence[Array], layout: LeafLayout) -> Array:
        if not layout.is_8bit(self.min_8bit_size):
            return stored[0]
        return dequantize_blocks(*stored, layout, self.block_size)

    def store(self, mu: Array, layout: LeafLayout) -> tuple[Array, ...]:
        if not layout.is_8bit(self.min_8bit_size):
            return mu, _placeholder(), _placeholder()
        return quantize_blocks(mu, layout, self.block_size)


def _stat_is_real(layout: LeafLayout) -> tuple[bool, ...]:
    """Which of (v_row, v_col, v, r_row, r_col) `_init_stats` fills for this leaf (the rest are placeholders)."""
    return (True, True, False, True, True) if layout.factored else (False, False, True, False, False)


def _update_layer_groups(leaf_update, layouts: list[LeafLayout], leaves: list[tuple[Array, ...]],
                         is_real: list[tuple[bool, ...]], group: int) -> list[tuple[Array, ...]]:
    """`leaf_update` on every stacked leaf, `group` layers at a time, written back in place.

    leaves[i] = (gradient, *state fields) of a stacked leaf and is_real[i] says which of them are arrays to update
    (the rest are placeholders). The result replaces each real field (and the gradient, by the update direction)
    slice by slice inside one loop over the layer groups (a last, smaller group when `group` does not divide the
    layers), so XLA updates those buffers in place and the step's temporaries are one group's size instead of a
    second copy of every gradient and the fp32 form of every 8-bit moment. Statistics are per layer either way.
    """
    layers = leaves[0][0].shape[0]
    for fields in leaves:
        if fields[0].shape[0] != layers:
            raise ValueError(f"stacked leaves disagree on the layer count: {fields[0].shape[0]} vs {layers}")

    def real_only(fields, real):
        return [f for f, r in zip(fields, real) if r]

    def with_placeholders(real_fields, fields, real):
        part = iter(real_fields)
        return tuple(next(part) if r else f for f, r in zip(fields, real))

    def update_slice(carry, start, size: int):
        new_carry = []
        for layout, fields, real, mine in zip(layouts, leaves, is_real, carry):
            sliced = [jax.lax.dynamic_slice_in_dim(a, start, size) for a in mine]
            updated = leaf_update(layout, *with_placeholders(sliced, fields, real))
            new_carry.append([jax.lax.dynamic_update_slice_in_dim(a, u.astype(a.dtype), start, 0)
                              for a, u in zip(mine, real_only(updated, real))])
        return new_carry

    carry = [real_only(fields, real) for fields, real in zip(leaves, is_real)]
    group = min(group, layers)
    full, rest = divmod(layers, group)
    carry = jax.lax.fori_loop(0, full, lambda i, c: update_slice(c, i * group, group), carry)
    if rest:
        carry = update_slice(carry, full * group, rest)
    return [with_placeholders(mine, fields, real) for fields, real, mine in zip(leaves, is_real, carry)]


def _came_transformation(hp: _Hyper, factorization: str, stacked: StackedFn | None, moment, state_cls,
                         layer_group: int, max_grad_norm, impl: str):
    """The GradientTransformation of both variants; `moment` says how m is stored, `state_cls` names the fields."""

    def init_fn(params):
        names, leaves, treedef = _flatten(params)
        layouts = [leaf_layout(n, p.shape, factorization, stacked) for n, p in zip(names, leaves)]
        mus = [moment.init(p, layout) for p, layout in zip(leaves, layouts)]
        stats = [_init_stats(p, layout) for p, layout in zip(leaves, layouts)]
        return state_cls(jnp.zeros([], jnp.int32), *_unzip(treedef, mus, moment.n_fields), *_unzip(treedef, stats, 5))

    def update_fn(updates, state, params=None):
        names, grads, treedef = _flatten(updates)
        layouts = [leaf_layout(name, g.shape, factorization, stacked) for name, g in zip(names, grads)]
        grouped = [i for i, layout in enumerate(layouts) if layer_group and layout.layer_axes]
        sums = _PallasSums(interpret=not on_cuda()) if _resolve_impl(impl, layer_group) == "pallas" else _XlaSums()
        # A gradient narrower than its parameter (the train step's 16-bit gradients of fp32 weights) is updated
        # as if widened to the parameter's dtype first. Only the Pallas kernels read it at its own width; for
        # XLA's passes (and the layer groups, which write the direction over the gradient) it is widened here.
        dtypes = [g.dtype for g in grads] if params is None else \
            [jnp.promote_types(g.dtype, p.dtype) for g, p in zip(grads, treedef.flatten_up_to(params))]
        grads = [g if isinstance(sums, _PallasSums) and i not in grouped else g.astype(dtype)
                 for i, (g, dtype) in enumerate(zip(grads, dtypes))]
        # optax.clip_by_global_norm in front, applied inside each leaf's passes instead of as a pass of its own.
        # Its norm comes from the factored leaves' square sums, which CAME needs anyway, except under layer
        # groups, whose sums are made inside the loop over the groups.
        square_sums = [None] * len(grads)
        if max_grad_norm is not None and not grouped:
            square_sums = [sums.square_sums(g, layout) if layout.factored else None
                           for g, layout in zip(grads, layouts)]
        clip = None if max_grad_norm is None else (_global_norm(grads, square_sums), max_grad_norm)

        def leaf_update(layout, g, *leaf_fields, square_sums=None, dtype=None):
            """(direction, *stored m, *stats) of one leaf."""
            dtype = g.dtype if dtype is None else dtype
            stored_mu, stats = leaf_fields[:moment.n_fields], tuple(leaf_fields[moment.n_fields:])
            direction, mu, stats = _came_leaf(g, moment.load(stored_mu, layout), stats, layout, hp, clip, sums,
                                              square_sums, dtype)
            return (direction.astype(dtype), *moment.store(mu, layout), *stats)

        fields = [treedef.flatten_up_to(tree) for tree in state[1:]]
        leaves = [(g, *leaf_fields) for g, *leaf_fields in zip(grads, *fields)]
        out = [None if i in grouped else leaf_update(layouts[i], *leaves[i], square_sums=square_sums[i],
                                                     dtype=dtypes[i])
               for i in range(len(leaves))]
        if grouped:  # the gradient, then the state fields
            is_real = [(True, *moment.is_real(layouts[i]), *_stat_is_real(layouts[i])) for i in grouped]
            done = _update_layer_groups(leaf_update, [layouts[i] for i in grouped], [leaves[i] for i in grouped],
                                        is_real, layer_group)
            for i, result in zip(grouped, done):
                out[i] = result
        new = _unzip(treedef, out, 1 + moment.n_fields + 5)
        return new[0], state_cls(optax.safe_increment(state.count), *new[1:])

    return optax.GradientTransformation(init_fn, update_fn)


def _resolve_impl(impl: str, layer_group: int = 0) -> str:
    """"auto": the Pallas kernels when every leaf is updated at once on one CUDA GPU, else XLA. On a mesh of
    several devices the leaves may be sharded, and XLA's partitioner cannot split a custom call (it would gather
    every leaf); layer groups (the memory mode that fits the 4.8B model) were measured with XLA only."""
    if impl != "auto":
        return impl
    mesh = jax.sharding.get_abstract_mesh()
    devices = jax.device_count() if mesh.empty else mesh.size
    return "pallas" if on_cuda() and devices == 1 and not layer_group else "xla"


def reads_narrow_gradients(impl: str = "auto", layer_group: int = 0) -> bool:
    """Whether CAME with these options (on this process's devices or the current mesh) reads gradients narrower
    than their parameters at their own width: its Pallas kernels do, without layer groups. Anywhere else it
    widens them first, which XLA fuses into whatever produced them."""
    return _resolve_impl(_check_impl(impl), layer_group) == "pallas" and not layer_group


def scale_by_came(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    factorization: Factorization = "sana",
    stacked: StackedFn | None = None,
    layer_group: int | None = None,
    max_grad_norm: float | None = None,
    impl: Impl = "auto",
) -> optax.GradientTransformation:
    """CAME's update direction (before learning rate and weight decay), state `ScaleByCameState`.

    Args:
      b1: first-moment decay (m). Default 0.9.
      b2: second-moment decay (v). Default 0.999.
      b3: instability decay (r, the confidence step). Default 0.9999.
      eps: (eps1 added to g^2, eps2 added to the instability). Default (1e-30, 1e-16).
      clip_threshold: the update u is divided by max(1, RMS(u) / clip_threshold), per tensor. Default 1.0.
      factorization: "sana" (flax layouts, SANA's rules) or "last_two" (torch layouts, came_pytorch's rule).
      stacked: predicate on a leaf's path names: True if the leaf has a leading stacked-layer axis. Default:
        top-level `blocks` for "sana" (sana_jax's nn.scan), nothing for "last_two".
      layer_group: None (default) updates every leaf at once. n >= 1 updates the stacked leaves n layers at a
        time, in place, in one loop over the layer groups: the same maths (equal up to fp32 rounding: the loop
        body fuses its reductions differently), with temporaries of n layers instead of a second copy of the
        tree (what lets Sana-1.5-4.8B train on one 80 GB GPU), at the cost of a loop of small kernels. When n
        does not divide the layer count the last group is smaller. Under optax.inject_hyperparams a given n must
        be listed in static_args.
      max_grad_norm: None (default), or clip the incoming gradients to this global norm first: the same function
        as optax.chain(optax.clip_by_global_norm(max_grad_norm), <this>), applied inside CAME's passes over each
        gradient instead of as a pass of its own (SANA clips at 0.1 before every CAME step).
      impl: how the factored row and column means are computed. "xla": XLA reductions (any backend; one pass
        over the gradient per mean). "pallas": sana_jax.came_kernels, both means in one pass (compiled on CUDA
        GPUs, interpreted elsewhere: slow, for tests); equal up to the order of fp32 sums. "auto" (default):
        pallas when the update runs on one CUDA GPU without layer groups, else xla.
    Returns:
      An optax.GradientTransformation; updates have the gradients' dtype, states are fp32.
    """
    hp = _check_hyper(b1, b2, b3, eps, clip_threshold)
    _check_factorization(factorization)
    return _came_transformation(hp, factorization, stacked, _Fp32Moment(), ScaleByCameState,
                                _layer_group(layer_group), _check_max_grad_norm(max_grad_norm), _check_impl(impl))


def scale_by_came_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    factorization: Factorization = "sana",
    stacked: StackedFn | None = None,
    block_size: int = 2048,
    min_8bit_size: int = 16384,
    layer_group: int | None = None,
    max_grad_norm: float | None = None,
    impl: Impl = "auto",
) -> optax.GradientTransformation:
    """`scale_by_came` with SANA-1.5's 8-bit first moment (CAME8BitWrapper), state `ScaleByCame8bitState`.

    Args (beyond scale_by_came's):
      block_size: rows (torch dim 0, output features) per quantisation block. Default 2048 (SANA).
      min_8bit_size: matrix parameters with rows * cols > this (strict) keep m in uint8. Default 16384 (SANA).
    """
    hp = _check_hyper(b1, b2, b3, eps, clip_threshold)
    _check_factorization(factorization)
    moment = _BlockwiseUint8Moment(_static_int("block_size", block_size, 1),
                                   _static_int("min_8bit_size", min_8bit_size, 0))
    return _came_transformation(hp, factorization, stacked, moment, ScaleByCame8bitState,
                                _layer_group(layer_group), _check_max_grad_norm(max_grad_norm), _check_impl(impl))


def _with_lr_and_decay(direction: optax.GradientTransformation, learning_rate, weight_decay, mask):
    _check_learning_rate(learning_rate)
    _check_range("weight_decay", weight_decay, 0.0, None)
    # p <- p - lr * (direction + wd * p): SANA's decoupled decay p(1 - lr wd), applied to every param unless masked.
    return optax.chain(direction, optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


def came(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    factorization: Factorization = "sana",
    stacked: StackedFn | None = None,
    layer_group: int | None = None,
    max_grad_norm: float | None = None,
    impl: Impl = "auto",
) -> optax.GradientTransformation:
    """CAME as SANA trains with it: p <- p - lr * wd * p - lr * direction (see the module docstring).

    Args:
      learning_rate: a float >= 0 or an optax schedule (SANA-1.0: 1e-4, SANA-1.5: 2e-5).
      b1, b2, b3, eps, clip_threshold, factorization, stacked, layer_group, max_grad_norm, impl: as
        `scale_by_came`.
      weight_decay: decoupled weight decay, scaled by the learning rate. Default 0.0 (SANA's configs).
      mask: optax mask (tree of bools or a callable on params) of the leaves that weight decay applies to.
    Returns:
      optax.chain(scale_by_came, add_decayed_weights, scale_by_learning_rate).

    Under optax.inject_hyperparams every callable argument is taken for a schedule: list a `stacked` predicate
    or a callable `mask` in static_args.
    """
    direction = scale_by_came(b1, b2, b3, eps, clip_threshold, factorization, stacked, layer_group, max_grad_norm,
                              impl)
    return _with_lr_and_decay(direction, learning_rate, weight_decay, mask)


def came_8bit(
    learning_rate: optax.ScalarOrSchedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    b3: float = 0.9999,
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    mask: Any = None,
    factorization: Factorization = "sana",
    stacked: StackedFn | None = None,
    block_size: int = 2048,
    min_8bit_size: int = 16384,
    layer_group: int | None = None,
    max_grad_norm: float | None = None,
    impl: Impl = "auto",
) -> optax.GradientTransformation:
    """CAME-8bit as SANA-1.5 trains with it (CAME8BitWrapper): `came` with a block-wise uint8 first moment.

    Args: as `came`, plus block_size (rows per block, default 2048) and min_8bit_size (8-bit where rows * cols
    > it, default 16384). Under optax.inject_hyperparams pass static_args=("block_size", "min_8bit_size",
    "layer_group").
    """
    direction = scale_by_came_8bit(b1, b2, b3, eps, clip_threshold, factorization, stacked, block_size,
                                   min_8bit_size, layer_group, max_grad_norm, impl)
    return _with_lr_and_decay(direction, learning_rate, weight_decay, mask)


# ----------------------------------------------------------------------------------------------------------------
# Sharding of optimizer states.


def _is_spec(x) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _state_leaf_spec(state_shape: tuple[int, ...], param_shape: tuple[int, ...], spec) -> PartitionSpec:
    """The param's spec on every axis where the state leaf has the param's size; replicated elsewhere."""
    if spec is None or len(state_shape) != len(param_shape):
        return PartitionSpec()
    names = tuple(spec) + (None,) * (len(param_shape) - len(spec))
    return PartitionSpec(*(n if s == p else None for n, s, p in zip(names, state_shape, param_shape)))


def state_axes(tx: optax.GradientTransformation, params, param_axes):
    """PartitionSpecs for every leaf of `tx.init(params)`, derived from the params' specs.

    Works for any optax state whose per-parameter leaves keep the parameter's rank (CAME, CAME-8bit, AdamW,
    MultiSteps accumulators, inside chain / inject_hyperparams): every subtree of the state shaped like `params`
    gets, per leaf and axis, the parameter's entry where the sizes match and None (replicated) where the state
    reduced the axis (factored statistics, 8-bit block statistics); all other leaves (counts, hyperparameters,
    placeholders) are replicated.

    Args:
      tx: the optimizer.
      params: the params tree (arrays or ShapeDtypeStructs, e.g. `sana_jax.abstract_params(model)`).
      param_axes: a tree like params of PartitionSpec (logical names from `sana_jax.logical_axes`, or mesh
        axes); None leaves mean replicated.
    Returns:
      A tree like `jax.eval_shape(tx.init, params)` of PartitionSpec, in the same naming as param_axes (map
      logical names to the mesh with `flax.linen.logical_to_mesh_sharding`).
    """
    abstract = jax.eval_shape(tx.init, params)
    treedef = jax.tree.structure(params)
    param_leaves = treedef.flatten_up_to(params)
    spec_leaves = treedef.flatten_up_to(param_axes)
    for spec in spec_leaves:
        if not _is_spec(spec):
            raise ValueError(f"param_axes leaves must be PartitionSpec or None, got {spec!r}")

    def mirrors_params(node) -> bool:
        return jax.tree.structure(node) == treedef

    def specs_for(node):
        if not mirrors_params(node):
            return PartitionSpec()
        leaves = treedef.flatten_up_to(node)
        return treedef.unflatten([_state_leaf_spec(tuple(s.shape), tuple(p.shape), spec)
                                  for s, p, spec in zip(leaves, param_leaves, spec_leaves)])

    return jax.tree.map(specs_for, abstract, is_leaf=mirrors_params)


__all__ = [
    "LeafLayout", "ScaleByCameState", "ScaleByCame8bitState", "came", "came_8bit", "dequantize_blocks",
    "leaf_layout", "leaf_layouts", "path_names", "quantize_blocks", "sana_stacked", "scale_by_came",
    "scale_by_came_8bit", "state_axes",
]
