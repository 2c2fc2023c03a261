"""Naive ReLU linear attention (SANA's LiteLA), the reference every fast linear-attention path is tested against.

The maths is in `README.md` beside this file. Plain PyTorch, fp32 accumulation, no tricks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def relu_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""ReLU-kernel linear attention, exactly as SANA's `LiteLA.attn_matmul`.

    For every batch b, head h and query token n, with q, k already passed through ReLU:

        out[n] = sum_m v[m] (k[m] . q[n]) / (sum_m k[m] . q[n] + eps)

    computed as two matmuls through a [D+1, D] state, never forming the [N, N] attention matrix.

    Args:
        q, k, v: `[B, N, H, D]` (B batch, N tokens, H heads, D head dim), all of one dtype (fp32, bf16 or fp16).
            No scaling is applied to q (LiteLA has no 1/sqrt(D)).
        eps: added to the denominator. Default: `1e-8`, the value `SanaMS` builds `LiteLA` with
            (diffusers' `SanaLinearAttnProcessor2_0` uses 1e-15).

    Returns:
        `[B, N, H, D]` in the dtype of `q`. ReLU is applied in the input dtype (exact), then q, k, v are cast
        to fp32 (fp64 inputs stay fp64) and everything after is computed and accumulated in that precision, as
        the original does with `fp32_attention` on; the result is cast back at the end.
    """
    if not (q.shape == k.shape == v.shape) or q.ndim != 4:
        raise ValueError(f"q, k, v must all be [B, N, H, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    dtype = q.dtype
    acc = torch.promote_types(dtype, torch.float32)
    q = F.relu(q).to(acc).permute(0, 2, 3, 1)  # [B, H, D, N]
    k = F.relu(k).to(acc).permute(0, 2, 1, 3)  # [B, H, N, D]
    v = v.to(acc).permute(0, 2, 3, 1)  # [B, H, D, N]
    # A row of ones under v makes the last row of vk equal sum_m k[m], so the same two matmuls that give the
    # numerator also give the normaliser sum_m k[m] . q[n] (SANA's padded-ones denominator).
    v = F.pad(v, (0, 0, 0, 1), mode="constant", value=1.0)  # [B, H, D+1, N]
    vk = torch.matmul(v, k)  # [B, H, D+1, D]
    out = torch.matmul(vk, q)  # [B, H, D+1, N]
    out = out[:, :, :-1] / (out[:, :, -1:] + eps)  # [B, H, D, N]
    return out.permute(0, 3, 1, 2).to(dtype)  # [B, N, H, D]
