"""Fused Triton ReLU linear attention (SANA LiteLA), forward and backward; tested against `naive.py`.

Two passes per direction, never materialising the fp32 copies, the ones-padded v or the `[D+1, N]` product
that the naive op builds. The maths (including the backward of the normalised division) is in `README.md`.

    forward   linear_attn_fwd_kernel_h    (split, b·h)  h = Σ relu(k)ᵀ v,  z = Σ relu(k)    over a split of tokens
              linear_attn_fwd_kernel_o    (block, b·h)  o = relu(q) h / (relu(q)·z + eps)
    backward  linear_attn_bwd_kernel_dqh  (split, b·h)  dq, and dh = Σ relu(q)ᵀ g,  dz = Σ relu(q) c
              linear_attn_bwd_kernel_dkv  (block, b·h)  dk = (v dhᵀ + dz) ⊙ [k > 0],  dv = relu(k) dh

Everything after the load is fp32: ReLU is exact in any dtype, the products accumulate in fp32 and only the
stores round to the input dtype, as in the naive op. The products use 3xTF32 (`input_precision="tf32x3"`:
each fp32 operand split into a high and a low TF32 part, three tensor-core products): within 2^-21 of an fp32
product, measured as close to the naive op as plain fp32 FMAs (`"ieee"`), and 1.5-1.9x faster on H100.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Tokens per inner step: the smallest block of tokens whose [BT, BD] x [BD, BD] products map well onto the
# tensor cores, with a [BD, BD] fp32 state per program (4 KiB at D = 32) staying in registers. BT and the warp
# count were measured best on H100 (benchmarks/RESULTS.md) among BT 32/64/128 and 2/4/8 warps.
BT = 64
NUM_WARPS = 2
# Near-fp32 products on tensor cores; "ieee" (fp32 FMAs) gives the same error against the naive op, slower.
DOT_PRECISION = "tf32x3"
# Tokens per split of the state passes. Splits of 512 tokens give enough programs at every SANA shape (4K at
# batch 1 included) and were measured as fast as the best split per shape; a fixed size (rather than one from
# the SM count) keeps the fp32 summation order, hence the result, the same on every GPU.
CHUNK_SIZE = 512


@triton.jit
def linear_attn_fwd_kernel_h(
    k,
    v,
    h,
    z,
    s_kb,
    s_kn,
    s_kh,
    s_vb,
    s_vn,
    s_vh,
    N,
    BS,
    H: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    IP: tl.constexpr,
):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    # int64: at 4K (N = 16384 tokens, C = 2240) b·N·3C exceeds 2^31 elements for B >= 20.
    p_k0 = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    p_v0 = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh

    b_h = tl.zeros([BD, BD], dtype=tl.float32)
    b_z = tl.zeros([BD], dtype=tl.float32)
    for i_t in range(0, BS, BT):
        o_t = i_s * BS + i_t + tl.arange(0, BT)
        m_t = o_t < N
        m_td = m_t[:, None] & m_d[None, :]
        p_k = p_k0 + o_t[:, None].to(tl.int64) * s_kn + o_d[None, :]
        p_v = p_v0 + o_t[:, None].to(tl.int64) * s_vn + o_d[None, :]
        # fp32 right after the load: ReLU is exact either way, and the maths matches the fp32 naive op.
        b_k = tl.maximum(tl.load(p_k, mask=m_td, other=0).to(tl.float32), 0)  # [BT, BD]
        b_v = tl.load(p_v, mask=m_td, other=0).to(tl.float32)  # [BT, BD]
        b_h += tl.dot(tl.trans(b_k), b_v, input_precision=IP)  # [BD, BD]
        # The row of ones that the naive op pads under v: its state row is the plain sum of relu(k).
        b_z += tl.sum(b_k, 0)  # [BD]

    # Partial states are [NS, B·H, BD, BD] and [NS, B·H, BD], padding included, so every element is written.
    i_sbh = (i_s * tl.num_programs(1) + i_bh).to(tl.int64)
    tl.store(h + i_sbh * BD * BD + o_d[:, None] * BD + o_d[None, :], b_h)
    tl.store(z + i_sbh * BD + o_d, b_z)


@triton.jit
def linear_attn_fwd_kernel_o(
    q,
    h,
    z,
    o,
    s_qb,
    s_qn,
    s_qh,
    N,
    eps,
    H: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    IP: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_td = (o_t < N)[:, None] & (o_d < D)[None, :]

    b_h = tl.load(h + i_bh.to(tl.int64) * BD * BD + o_d[:, None] * BD + o_d[None, :])  # [BD, BD]
    b_z = tl.load(z + i_bh.to(tl.int64) * BD + o_d)  # [BD]
    p_q = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh + o_t[:, None].to(tl.int64) * s_qn + o_d[None, :]
    b_q = tl.maximum(tl.load(p_q, mask=m_td, other=0).to(tl.float32), 0)  # [BT, BD]
    b_o = tl.dot(b_q, b_h, input_precision=IP)  # [BT, BD]
    # A query with no positive feature (or a head whose keys are all dead) has den = 0 + eps and num = 0: o = 0.
    b_den = tl.sum(b_q * b_z[None, :], 1) + eps  # [BT]
    b_o = b_o / b_den[:, None]
    # o is a fresh contiguous [B, N, H, D].
    p_o = o + ((i_b.to(tl.int64) * N + o_t[:, None]) * H + i_h) * D + o_d[None, :]
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_td)


@triton.jit
def linear_attn_bwd_kernel_dqh(
    q,
    do,
    h,
    z,
    dq,
    dh,
    dz,
    s_qb,
    s_qn,
    s_qh,
    s_gb,
    s_gn,
    s_gh,
    N,
    BS,
    eps,
    H: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    IP: tl.constexpr,
):
    i_s, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_d = tl.arange(0, BD)
    m_d = o_d < D
    p_q0 = q + i_b.to(tl.int64) * s_qb + i_h.to(tl.int64) * s_qh
    p_g0 = do + i_b.to(tl.int64) * s_gb + i_h.to(tl.int64) * s_gh

    b_h = tl.load(h + i_bh.to(tl.int64) * BD * BD + o_d[:, None] * BD + o_d[None, :])  # [BD, BD]
    b_z = tl.load(z + i_bh.to(tl.int64) * BD + o_d)  # [BD]
    b_dh = tl.zeros([BD, BD], dtype=tl.float32)
    b_dz = tl.zeros([BD], dtype=tl.float32)
    for i_t in range(0, BS, BT):
        o_t = i_s * BS + i_t + tl.arange(0, BT)
        m_td = (o_t < N)[:, None] & m_d[None, :]
        p_q = p_q0 + o_t[:, None].to(tl.int64) * s_qn + o_d[None, :]
        p_g = p_g0 + o_t[:, None].to(tl.int64) * s_gn + o_d[None, :]
        b_q = tl.load(p_q, mask=m_td, other=0).to(tl.float32)  # [BT, BD]
        b_qr = tl.maximum(b_q, 0)
        b_g = tl.load(p_g, mask=m_td, other=0).to(tl.float32)  # [BT, BD]
        # Recomputed in fp32 rather than read back from the rounded output.
        b_num = tl.dot(b_qr, b_h, input_precision=IP)  # [BT, BD]
        b_den = tl.sum(b_qr * b_z[None, :], 1) + eps  # [BT]
        # d num = g / den;  d den = -g·num / den² = -g·o / den.
        b_gs = b_g / b_den[:, None]  # [BT, BD]
        b_c = -tl.sum(b_gs * b_num, 1) / b_den  # [BT]
        b_dq = tl.dot(b_gs, tl.trans(b_h), input_precision=IP) + b_c[:, None] * b_z[None, :]  # [BT, BD]
        # ReLU'(q) = [q > 0], as torch's relu backward (zero gradient at exactly 0).
        b_dq = tl.where(b_q > 0, b_dq, 0)
        p_dq = dq + ((i_b.to(tl.int64) * N + o_t[:, None]) * H + i_h) * D + o_d[None, :]
        tl.store(p_dq, b_dq.to(dq.dtype.element_ty), mask=m_td)
        b_dh += tl.dot(tl.trans(b_qr), b_gs, input_precision=IP)  # [BD, BD]
        b_dz += tl.sum(b_qr * b_c[:, None], 0)  # [BD]

    i_sbh = (i_s * tl.num_programs(1) + i_bh).to(tl.int64)
    tl.store(dh + i_sbh * BD * BD + o_d[:, None] * BD + o_d[None, :], b_dh)
    tl.store(dz + i_sbh * BD + o_d, b_dz)


@triton.jit
def linear_attn_bwd_kernel_dkv(
    k,
    v,
    dh,
    dz,
    dk,
    dv,
    s_kb,
    s_kn,
    s_kh,
    s_vb,
    s_vn,
    s_vh,
    N,
    H: tl.constexpr,
    D: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    IP: tl.constexpr,
):
    i_t, i_bh = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = tl.arange(0, BD)
    m_td = (o_t < N)[:, None] & (o_d < D)[None, :]

    b_dh = tl.load(dh + i_bh.to(tl.int64) * BD * BD + o_d[:, None] * BD + o_d[None, :])  # [BD, BD]
    b_dz = tl.load(dz + i_bh.to(tl.int64) * BD + o_d)  # [BD]
    p_k = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh + o_t[:, None].to(tl.int64) * s_kn + o_d[None, :]
    p_v = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh + o_t[:, None].to(tl.int64) * s_vn + o_d[None, :]
    b_k = tl.load(p_k, mask=m_td, other=0).to(tl.float32)  # [BT, BD]
    b_v = tl.load(p_v, mask=m_td, other=0).to(tl.float32)  # [BT, BD]
    # dz is the gradient of the ones row: every key receives it whole.
    b_dk = tl.dot(b_v, tl.trans(b_dh), input_precision=IP) + b_dz[None, :]  # [BT, BD]
    b_dk = tl.where(b_k > 0, b_dk, 0)
    b_dv = tl.dot(tl.maximum(b_k, 0), b_dh, input_precision=IP)  # [BT, BD]
    o_out = ((i_b.to(tl.int64) * N + o_t[:, None]) * H + i_h) * D + o_d[None, :]
    tl.store(dk + o_out, b_dk.to(dk.dtype.element_ty), mask=m_td)
    tl.store(dv + o_out, b_dv.to(dv.dtype.element_ty), mask=m_td)


def _split(N: int, chunk_size: int) -> tuple[int, int]:
    """Tokens per split of the state passes (rounded up to a multiple of BT) and the number of splits."""
    chunk_size = triton.cdiv(chunk_size, BT) * BT
    return chunk_size, triton.cdiv(N, chunk_size)


def _strides(x: torch.Tensor) -> tuple[int, int, int]:
    """(batch, token, head) strides of a `[B, N, H, D]` tensor with unit stride over D."""
    return x.stride(0), x.stride(1), x.stride(2)


def _unit_last(x: torch.Tensor) -> torch.Tensor:
    # Any strides over B, N, H are read in place (q, k, v are views of the qkv projection); D must be unit-stride.
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_attn_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float, chunk_size: int = CHUNK_SIZE
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns o `[B, N, H, D]` (dtype of q) and the fp32 states h `[B·H, BD, BD]`, z `[B·H, BD]`."""
    B, N, H, D = q.shape
    BD = max(16, triton.next_power_of_2(D))
    BS, NS = _split(N, chunk_size)
    h = torch.empty(NS, B * H, BD, BD, dtype=torch.float32, device=q.device)
    z = torch.empty(NS, B * H, BD, dtype=torch.float32, device=q.device)
    o = torch.empty(B, N, H, D, dtype=q.dtype, device=q.device)
    if B * H == 0 or N == 0:
        return o, h.new_zeros(h.shape[1:]), z.new_zeros(z.shape[1:])
    linear_attn_fwd_kernel_h[(NS, B * H)](
        k, v, h, z, *_strides(k), *_strides(v), N, BS,
        H=H, D=D, BT=BT, BD=BD, IP=DOT_PRECISION, num_warps=NUM_WARPS
    )
    # Deterministic reduction of the partial states (tiny: NS·B·H·BD·(BD+1) floats).
    h, z = (h.sum(0), z.sum(0)) if NS > 1 else (h[0], z[0])
    linear_attn_fwd_kernel_o[(triton.cdiv(N, BT), B * H)](
        q, h, z, o, *_strides(q), N, eps,
        H=H, D=D, BT=BT, BD=BD, IP=DOT_PRECISION, num_warps=NUM_WARPS
    )
    return o, h, z


def linear_attn_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    do: torch.Tensor,
    eps: float,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns dq, dk, dv `[B, N, H, D]` in the dtype of q, from the forward's states h, z and the cotangent do."""
    B, N, H, D = q.shape
    BD = h.shape[-1]
    BS, NS = _split(N, chunk_size)
    do = _unit_last(do)
    dq, dk, dv = (torch.empty(B, N, H, D, dtype=q.dtype, device=q.device) for _ in range(3))
    dh = torch.empty(NS, B * H, BD, BD, dtype=torch.float32, device=q.device)
    dz = torch.empty(NS, B * H, BD, dtype=torch.float32, device=q.device)
    if B * H == 0 or N == 0:
        return dq, dk, dv
    linear_attn_bwd_kernel_dqh[(NS, B * H)](
        q, do, h, z, dq, dh, dz, *_strides(q), *_strides(do), N, BS, eps,
        H=H, D=D, BT=BT, BD=BD, IP=DOT_PRECISION, num_warps=NUM_WARPS
    )
    dh, dz = (dh.sum(0), dz.sum(0)) if NS > 1 else (dh[0], dz[0])
    linear_attn_bwd_kernel_dkv[(triton.cdiv(N, BT), B * H)](
        k, v, dh, dz, dk, dv, *_strides(k), *_strides(v), N,
        H=H, D=D, BT=BT, BD=BD, IP=DOT_PRECISION, num_warps=NUM_WARPS
    )
    return dq, dk, dv


class FusedLinearAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, eps, chunk_size):
        q, k, v = (_unit_last(t) for t in (q, k, v))
        o, h, z = linear_attn_fwd(q, k, v, eps, chunk_size)
        # Only the inputs (usually views of the qkv projection) and the small fp32 states are kept.
        ctx.save_for_backward(q, k, v, h, z)
        ctx.eps, ctx.chunk_size = eps, chunk_size
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, h, z = ctx.saved_tensors
        dq, dk, dv = linear_attn_bwd(q, k, v, h, z, do, ctx.eps, ctx.chunk_size)
        return dq, dk, dv, None, None


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fused_relu_linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-8, *, chunk_size: int = CHUNK_SIZE
) -> torch.Tensor:
    r"""ReLU linear attention (SANA LiteLA) in fused Triton kernels; same maths and signature as
    `naive.relu_linear_attention`, differentiable in q, k and v.

        out[n] = sum_m v[m] (relu(k[m]) . relu(q[n])) / (sum_m relu(k[m]) . relu(q[n]) + eps)

    Args:
        q, k, v: `[B, N, H, D]` (B batch, N tokens, H heads, D head dim <= 128) of one dtype: fp32, fp16 or bf16,
            on a CUDA device (or any device under the Triton interpreter). Strides over B, N and H are free
            (views of a qkv projection are read in place). No scaling is applied to q. SANA-1.5's q/k RMSNorm
            happens before this op and needs nothing here.
        eps: added to the denominator. Default: `1e-8` (as `SanaMS` builds `LiteLA`).
        chunk_size: tokens per split of the two token-summing passes (rounded up to a multiple of 64); it changes
            only the fp32 summation order. Default: `512`.

    Returns:
        `[B, N, H, D]`, contiguous, in the dtype of q. ReLU, both products (3xTF32, near fp32), the ones-row
        denominator and the division are computed in fp32; only the result is rounded to the input dtype.
        Gradients are computed the same way and rounded once to the input dtype. Deterministic.
    """
    if q.ndim != 4 or not (q.shape == k.shape == v.shape):
        raise ValueError(f"q, k, v must all be [B, N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise TypeError(f"q, k, v must share one dtype of fp32, fp16, bf16; got {q.dtype}, {k.dtype}, {v.dtype} "
                        f"(fp64 parity checks use the naive op)")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device; got {q.device}, {k.device}, {v.device}")
    if q.shape[-1] > 128:
        raise ValueError(f"head dim D = {q.shape[-1]} > 128 is not supported (SANA uses 32)")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return FusedLinearAttentionFunction.apply(q, k, v, float(eps), chunk_size)
