"""SANA's LiteLA kernel in JAX: ReLU feature map, linear attention, fp32 accumulation.

One layout across the project: q, k, v are [B, N, H, D] (batch, tokens, heads, head dim). The maths is in
kernels/linear_attn/README.md; the PyTorch sibling is `sana_kernels.linear_attn.naive.relu_linear_attention`.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sana_jax.ops import triton_params

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
# Four kernels, as the Triton kernels of the torch path (kernels/linear_attn/fused.py; the maths of the backward is
# in kernels/linear_attn/README.md), reading q, k, v straight out of their source arrays (no split, transpose, fp32
# copy or ones-padding in memory):
#   state       grid (split of tokens, b*h):  h = sum relu(k)^T v [D, D],  z = sum relu(k) [D]   (fp32 partials)
#   output      grid (split of tokens, b*h):  o = relu(q) h / (relu(q) . z + eps)
#   query_grad  grid (split of tokens, b*h):  dq; partial dh, dz (fp32)                            (backward)
#   key_grad    grid (split of tokens, b*h):  dk, dv                                               (backward)
# Each program walks its split in steps of tokens, loading its head's fp32 state (and splitting it into bf16
# parts) once. At 1.6B b32 on H200 (RESULTS.md, twenty-second session) that took the output kernel from 144 to
# 95 us and key_grad from 277 to 183 us against one program per step; query_grad went from 349 to 272 us by
# taking d loss / d den from the g h^T it computes for dq instead of recomputing q h.
# bf16 inputs: relu(q), relu(k), v and the cotangent are exact in bf16, so bf16 x bf16 tensor-core products with
# fp32 accumulation are the fp32 products, and an fp32 operand (h, dh, relu(q) / den) is split exactly into three
# bf16 parts (`_dot`). So every product is fp32-exact, as the XLA sibling's HIGHEST-precision fp32 einsums; only
# the order of the fp32 sums differs. Other dtypes run the products in fp32 (precision HIGHEST).

_TOKENS_PER_STEP = 64  # rows of a [T, D] x [D, D] product per step (the torch kernels' measured best on H100)
_STATE_TOKENS_PER_STEP = 128  # tokens summed by one relu(k)^T v product: 97 us against 110 with 64 (1.6B b32, H200)
_TOKENS_PER_SPLIT = 512  # tokens per program: fixed, so the fp32 summation order is the same on every GPU


def _head_width(head_dim: int) -> int:
    """Padded head width of a program: a power of two (Triton blocks), at least 16 (tensor-core products)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def _split_bf16(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """fp32 -> three bf16 parts (8 + 8 + 8 significand bits) whose fp32 sum is x."""
    high = x.astype(jnp.bfloat16)
    rest = x - high.astype(jnp.float32)
    middle = rest.astype(jnp.bfloat16)
    return high, middle, (rest - middle.astype(jnp.float32)).astype(jnp.bfloat16)


def _state_operand(x: jax.Array, dtype) -> jax.Array | tuple[jax.Array, ...]:
    """An fp32 right operand of `_dot` prepared once for products with left operands of `dtype`: for bf16 its three
    bf16 parts (`_split_bf16`), else x itself."""
    return _split_bf16(x) if dtype == jnp.bfloat16 and x.dtype == jnp.float32 else x


def _dot(a: jax.Array, b: jax.Array | tuple[jax.Array, ...]) -> jax.Array:
    """a @ b in fp32 inside a kernel, as exact as fp32 products (only the order of the sums differs).

    bf16 x bf16: one tensor-core product with fp32 accumulation (products of bf16 values are exact in fp32).
    bf16 x fp32 either way round: the fp32 operand split into three bf16 parts, three tensor-core products
    (b may come split already, `_state_operand`). Anything else (fp32 or fp16 models): fp32 at HIGHEST precision."""
    bf16, f32 = jnp.bfloat16, jnp.float32
    if isinstance(b, tuple):
        return sum(jnp.dot(a, part, preferred_element_type=f32) for part in b)
    if a.dtype == bf16 and b.dtype == bf16:
        return jnp.dot(a, b, preferred_element_type=f32)
    if a.dtype == bf16 and b.dtype == f32:
        return _dot(a, _split_bf16(b))
    if a.dtype == f32 and b.dtype == bf16:
        return sum(jnp.dot(part, b, preferred_element_type=f32) for part in _split_bf16(a))
    return jnp.dot(a.astype(f32), b.astype(f32), precision=_HIGHEST, preferred_element_type=f32)


def _tile(ref, b, t0, tokens, column, head_dim, rows=_TOKENS_PER_STEP):
    """The [rows, width] tile of one head's columns (from `column`) at tokens t0.. of image b of a [B*N, W] ref,
    and its mask (tokens past N, columns past the head dim)."""
    width = _head_width(head_dim)
    ok = ((t0 + jnp.arange(rows)) < tokens)[:, None] & (jnp.arange(width) < head_dim)[None, :]
    return ref.at[pl.ds(b * tokens + t0, rows), pl.ds(column, width)], ok


def _load(ref, b, t0, tokens, column, head_dim, rows=_TOKENS_PER_STEP):
    """`_tile`'s values, 0 outside the mask."""
    from jax.experimental.pallas import triton as plgpu

    at, ok = _tile(ref, b, t0, tokens, column, head_dim, rows)
    return plgpu.load(at, mask=ok, other=0)


def _walk_split(step, carry, rows=_TOKENS_PER_STEP):
    """carry = step(t0, carry) over the steps of `rows` tokens of this program's split of tokens (grid axis 0), t0
    the step's first token; returns the last carry. (The program id is read outside the loop: interpreted Pallas
    does not lower it inside one.)"""
    start = pl.program_id(0) * _TOKENS_PER_SPLIT
    return jax.lax.fori_loop(0, _TOKENS_PER_SPLIT // rows, lambda i, c: step(start + i * rows, c), carry)


def _sum_over_split(step, width: int, matrix_ref, vector_ref, rows=_TOKENS_PER_STEP) -> None:
    """Runs `step(t0, (matrix, vector))` over the steps of this program's split of tokens from fp32 zeros
    ([width, width], [1, width]) and stores the sums as the program's partials (rows of matrix_ref / vector_ref
    indexed by split * B*H + b*h; summed over the splits outside)."""
    from jax.experimental.pallas import triton as plgpu

    init = (jnp.zeros((width, width), jnp.float32), jnp.zeros((1, width), jnp.float32))
    matrix, vector = _walk_split(step, init, rows)
    index = pl.program_id(0) * pl.num_programs(1) + pl.program_id(1)
    plgpu.store(matrix_ref.at[pl.ds(index * width, width), :], matrix)
    plgpu.store(vector_ref.at[pl.ds(index, 1), :], vector)


def _sum_splits(matrix: jax.Array, vector: jax.Array, splits: int, width: int) -> tuple[jax.Array, jax.Array]:
    """The programs' partials ([splits*B*H*width, width], [splits*B*H, width]) summed over the splits, in a fixed
    order: ([B*H*width, width], [B*H, width])."""
    return matrix.reshape(splits, -1, width).sum(0), vector.reshape(splits, -1, width).sum(0)


def _state_kernel(k_ref, v_ref, h_ref, z_ref, *, tokens, heads, head_dim, k_col, v_col):
    bh = pl.program_id(1)
    b, head = bh // heads, bh % heads
    width, rows = _head_width(head_dim), _STATE_TOKENS_PER_STEP

    def step(t0, carry):
        h, z = carry
        k = jnp.maximum(_load(k_ref, b, t0, tokens, k_col + head * head_dim, head_dim, rows), 0)
        v = _load(v_ref, b, t0, tokens, v_col + head * head_dim, head_dim, rows)
        h = h + _dot(k.T, v)  # [width, width]
        z = z + jnp.sum(k.astype(jnp.float32), axis=0, keepdims=True)  # [1, width]
        return h, z

    _sum_over_split(step, width, h_ref, z_ref, rows)


def _output_kernel(q_ref, h_ref, z_ref, o_ref, *, tokens, heads, head_dim, q_col, eps):
    from jax.experimental.pallas import triton as plgpu

    bh = pl.program_id(1)
    b, head = bh // heads, bh % heads
    width = _head_width(head_dim)
    h = plgpu.load(h_ref.at[pl.ds(bh * width, width), :])  # [width, width] fp32
    z = plgpu.load(z_ref.at[pl.ds(bh, 1), :])  # [1, width] fp32
    h = _state_operand(h, q_ref.dtype)

    def step(t0, carry):
        q = jnp.maximum(_load(q_ref, b, t0, tokens, q_col + head * head_dim, head_dim), 0)
        den = jnp.sum(q.astype(jnp.float32) * z, axis=1, keepdims=True) + eps
        o_at, ok = _tile(o_ref, b, t0, tokens, head * head_dim, head_dim)
        plgpu.store(o_at, (_dot(q, h) / den).astype(o_ref.dtype), mask=ok)
        return carry

    _walk_split(step, ())


def _query_grad_kernel(q_ref, g_ref, h_ref, z_ref, _, dq_ref, dh_ref, dz_ref, *, tokens, heads, head_dim, q_col,
                       eps):
    """dq of one head over a split of tokens (written into its columns of dq_ref, aliased to the input `_`), and
    the split's partial dh = sum_n q^_n (g_n / den_n)^T, dz = sum_n c_n q^_n (kernels/linear_attn/README.md)."""
    from jax.experimental.pallas import triton as plgpu

    bh = pl.program_id(1)
    b, head = bh // heads, bh % heads
    width = _head_width(head_dim)
    h = plgpu.load(h_ref.at[pl.ds(bh * width, width), :])  # [width, width] fp32
    z = plgpu.load(z_ref.at[pl.ds(bh, 1), :])  # [1, width] fp32
    h_t = _state_operand(h.T, g_ref.dtype)

    def step(t0, carry):
        dh, dz = carry
        q_in = _load(q_ref, b, t0, tokens, q_col + head * head_dim, head_dim)
        g = _load(g_ref, b, t0, tokens, head * head_dim, head_dim)
        q = jnp.maximum(q_in, 0)
        q32 = q.astype(jnp.float32)
        den = jnp.sum(q32 * z, axis=1, keepdims=True) + eps  # [T, 1]
        g_h = _dot(g, h_t)  # [T, width]: g h^T
        # d loss / d den = -(g . q h) / den^2, and g . q h = q . g h^T: no product with h for it.
        c = -jnp.sum(q32 * g_h, axis=1, keepdims=True) / den / den
        dq = g_h / den + c * z  # g h^T / den = (g / den) h^T with g exact in bf16
        dq_at, ok = _tile(dq_ref, b, t0, tokens, q_col + head * head_dim, head_dim)
        plgpu.store(dq_at, jnp.where(q_in > 0, dq, 0).astype(dq_ref.dtype), mask=ok)
        dh = dh + _dot((q32 / den).T, g)  # a dead query (q^ = 0, den = eps) adds exactly 0
        dz = dz + jnp.sum(q32 * c, axis=0, keepdims=True)
        return dh, dz

    _sum_over_split(step, width, dh_ref, dz_ref)


def _key_grad_kernel(k_ref, v_ref, dh_ref, dz_ref, *buffers, tokens, heads, head_dim, k_col, v_col, k_out, v_out,
                     held):
    """dk = (dh v + dz) [k > 0] and dv = dh^T relu(k) of one head on a split of tokens, written into their columns
    of the gradient buffers (the outputs; k_out, v_out: which buffer), the first `held` inputs of `buffers`
    aliased to some of them."""
    from jax.experimental.pallas import triton as plgpu

    bh = pl.program_id(1)
    b, head = bh // heads, bh % heads
    width = _head_width(head_dim)
    outs = buffers[held:]
    dh = plgpu.load(dh_ref.at[pl.ds(bh * width, width), :])  # [width, width] fp32
    dz = plgpu.load(dz_ref.at[pl.ds(bh, 1), :])  # [1, width] fp32
    dh, dh_t = _state_operand(dh, k_ref.dtype), _state_operand(dh.T, v_ref.dtype)

    def step(t0, carry):
        k_in = _load(k_ref, b, t0, tokens, k_col + head * head_dim, head_dim)
        v = _load(v_ref, b, t0, tokens, v_col + head * head_dim, head_dim)
        dk = jnp.where(k_in > 0, _dot(v, dh_t) + dz, 0)
        dv = _dot(jnp.maximum(k_in, 0), dh)
        for out, column, value in ((outs[k_out], k_col, dk), (outs[v_out], v_col, dv)):
            at, ok = _tile(out, b, t0, tokens, column + head * head_dim, head_dim)
            plgpu.store(at, value.astype(out.dtype), mask=ok)
        return carry

    _walk_split(step, ())


def _flat(a: jax.Array) -> jax.Array:
    return a.reshape(a.shape[0] * a.shape[1], a.shape[2])  # [B, N, W] -> [B*N, W]


def _state(sources, layout, heads, head_dim, interpret):
    """h = sum relu(k)^T v [B*H*width, width] and z = sum relu(k) [B*H, width], fp32."""
    (k_slot, k_col), (v_slot, v_col) = layout[1:]
    batch, tokens = sources[0].shape[:2]
    width = _head_width(head_dim)
    splits = pl.cdiv(tokens, _TOKENS_PER_SPLIT)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    h, z = pl.pallas_call(
        functools.partial(_state_kernel, tokens=tokens, heads=heads, head_dim=head_dim, k_col=k_col, v_col=v_col),
        out_shape=(jax.ShapeDtypeStruct((splits * batch * heads * width, width), jnp.float32),
                   jax.ShapeDtypeStruct((splits * batch * heads, width), jnp.float32)),
        grid=(splits, batch * heads), in_specs=[any_spec] * 2, out_specs=(any_spec, any_spec),
        compiler_params=triton_params(interpret), interpret=interpret, name="litela_state",
    )(_flat(sources[k_slot]), _flat(sources[v_slot]))
    return _sum_splits(h, z, splits, width)


def _pallas_forward(sources, layout, heads, head_dim, eps, interpret):
    """The state and output kernels: (out [B, N, H*D] in v's source dtype, the state (h, z))."""
    (q_slot, q_col), _, (v_slot, _) = layout
    batch, tokens = sources[0].shape[:2]
    h, z = _state(sources, layout, heads, head_dim, interpret)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    out = pl.pallas_call(
        functools.partial(_output_kernel, tokens=tokens, heads=heads, head_dim=head_dim, q_col=q_col, eps=eps),
        out_shape=jax.ShapeDtypeStruct((batch * tokens, heads * head_dim), sources[v_slot].dtype),
        grid=(pl.cdiv(tokens, _TOKENS_PER_SPLIT), batch * heads), in_specs=[any_spec] * 3, out_specs=any_spec,
        compiler_params=triton_params(interpret), interpret=interpret, name="litela_output",
    )(_flat(sources[q_slot]), h, z)
    return out.reshape(batch, tokens, heads * head_dim), (h, z)


def _written_whole(slot: int, layout, heads: int, head_dim: int, width: int) -> bool:
    """Whether the kernels write every column of source `slot`'s [B*N, width] gradient buffer (the qkv projection's
    alone holds q, k and v back to back): such a buffer needs no zeros beforehand."""
    end = 0
    for column in sorted(column for s, column in layout if s == slot):
        if column > end:
            return False
        end = max(end, column + heads * head_dim)
    return end >= width


def _pallas_backward(sources, layout, heads, head_dim, eps, interpret, state, cotangent):
    """The gradients of the sources, one buffer each, from the query_grad and key_grad kernels. A buffer's columns
    that are not q, k or v of any head stay 0; every other element is written exactly once, so a source holding
    q, k and v (the qkv projection) gets its gradient without adding three [B, N, W] arrays. A buffer the kernels
    write whole starts uninitialised (the 1.6B step's zero fill of its qkv buffers: 2.2 ms, RESULTS.md); the others
    start as zeros that the kernels write into (aliased)."""
    (q_slot, q_col), (k_slot, k_col), (v_slot, v_col) = layout
    batch, tokens = sources[0].shape[:2]
    width = _head_width(head_dim)
    splits = pl.cdiv(tokens, _TOKENS_PER_SPLIT)
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    params = triton_params(interpret)
    shapes = [jax.ShapeDtypeStruct(_flat(src).shape, src.dtype) for src in sources]
    whole = [_written_whole(slot, layout, heads, head_dim, src.shape[2]) for slot, src in enumerate(sources)]
    grads = [None if whole[slot] else _flat(jnp.zeros_like(src)) for slot, src in enumerate(sources)]
    h, z = state
    q_inputs = (_flat(sources[q_slot]), _flat(cotangent).astype(sources[v_slot].dtype), h, z)
    q_kernel = functools.partial(_query_grad_kernel, tokens=tokens, heads=heads, head_dim=head_dim, q_col=q_col,
                                 eps=eps)
    grads[q_slot], dh, dz = pl.pallas_call(
        (lambda *refs: q_kernel(*refs[:4], None, *refs[4:])) if whole[q_slot] else q_kernel,
        out_shape=(shapes[q_slot],
                   jax.ShapeDtypeStruct((splits * batch * heads * width, width), jnp.float32),
                   jax.ShapeDtypeStruct((splits * batch * heads, width), jnp.float32)),
        grid=(splits, batch * heads), in_specs=[any_spec] * (4 + (not whole[q_slot])), out_specs=(any_spec,) * 3,
        input_output_aliases={} if whole[q_slot] else {4: 0}, compiler_params=params, interpret=interpret,
        name="litela_query_grad",
    )(*q_inputs, *(() if whole[q_slot] else (grads[q_slot],)))
    dh, dz = _sum_splits(dh, dz, splits, width)
    slots = sorted({k_slot, v_slot})
    held = [s for s in slots if grads[s] is not None]  # buffers with content already: written into, aliased
    updated = pl.pallas_call(
        functools.partial(_key_grad_kernel, tokens=tokens, heads=heads, head_dim=head_dim, k_col=k_col, v_col=v_col,
                          k_out=slots.index(k_slot), v_out=slots.index(v_slot), held=len(held)),
        out_shape=tuple(shapes[s] for s in slots),
        grid=(splits, batch * heads), in_specs=[any_spec] * (4 + len(held)),
        out_specs=(any_spec,) * len(slots), input_output_aliases={4 + i: slots.index(s) for i, s in enumerate(held)},
        compiler_params=params, interpret=interpret, name="litela_key_grad",
    )(_flat(sources[k_slot]), _flat(sources[v_slot]), dh, dz, *(grads[s] for s in held))
    for s, grad in zip(slots, updated):
        grads[s] = grad
    return tuple(g.reshape(src.shape) for g, src in zip(grads, sources))


Layout = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


def _check_layout(sources, layout, heads: int, head_dim: int) -> None:
    """Every source is [B, N, W] with the same B, N, and q, k, v each fit in their source's columns."""
    shapes = [tuple(src.shape) for src in sources]
    if any(len(shape) != 3 or shape[:2] != shapes[0][:2] for shape in shapes):
        raise ValueError(f"LiteLA sources must be [B, N, W] arrays with the same B and N, got shapes {shapes}")
    for role, (slot, column) in zip("qkv", layout):
        if not 0 <= slot < len(sources) or column < 0 or column + heads * head_dim > shapes[slot][2]:
            raise ValueError(f"LiteLA layout: {role} at (source {slot}, column {column}) needs {heads} heads x "
                             f"{head_dim} columns, but the sources have shapes {shapes}")


def _heads(src: jax.Array, column: int, heads: int, head_dim: int) -> jax.Array:
    """[B, N, W] source -> the [B, N, H, D] block of its columns starting at `column`."""
    return src[..., column:column + heads * head_dim].reshape(*src.shape[:2], heads, head_dim)


def relu_linear_attention_xla_packed(sources: tuple[jax.Array, ...], layout: Layout, heads: int, head_dim: int,
                                     eps: float):
    """The XLA sibling of `relu_linear_attention_pallas`, same arguments: [B, N, H*D] out in v's source dtype."""
    _check_layout(sources, layout, heads, head_dim)
    q, k, v = (_heads(sources[slot], column, heads, head_dim) for slot, column in layout)
    out = relu_linear_attention(q, k, v, eps)
    return out.reshape(*out.shape[:2], heads * head_dim)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4, 5))
def relu_linear_attention_pallas(sources: tuple[jax.Array, ...], layout: Layout, heads: int, head_dim: int,
                                 eps: float = 1e-8, interpret: bool = False):
    """LiteLA on q, k, v held as column blocks of [B, N, W] source arrays. `layout` gives (source index, first
    column) for q, k and v: head h of q is sources[i][..., column + h*D : + D]. E.g. the qkv projection output alone:
    sources (qkv,), layout ((0, 0), (0, C), (0, 2C)); SANA-1.5's normed q and k beside it: (q, k, qkv),
    ((0, 0), (1, 0), (2, 2C)). Returns [B, N, H*D] in v's source dtype. Same function as `relu_linear_attention`;
    its backward runs two more kernels (`_pallas_backward`) and returns one gradient per source."""
    _check_layout(sources, layout, heads, head_dim)
    return _pallas_forward(sources, layout, heads, head_dim, eps, interpret)[0]


def _pallas_fwd(sources, layout, heads, head_dim, eps, interpret):
    _check_layout(sources, layout, heads, head_dim)
    out, state = _pallas_forward(sources, layout, heads, head_dim, eps, interpret)
    return out, (sources, state)  # the state is [B*H, D, D] fp32: kept rather than recomputed


def _pallas_bwd(layout, heads, head_dim, eps, interpret, residuals, cotangent):
    sources, state = residuals
    return (_pallas_backward(sources, layout, heads, head_dim, eps, interpret, state, cotangent),)


relu_linear_attention_pallas.defvjp(_pallas_fwd, _pallas_bwd)
