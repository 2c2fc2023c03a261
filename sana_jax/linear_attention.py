"""SANA's LiteLA kernel in JAX: ReLU feature map, linear attention, fp32 accumulation.

One layout across the project: q, k, v are [B, N, H, D] (batch, tokens, heads, head dim). The maths is in
kernels/linear_attn/README.md; the PyTorch sibling is `sana_kernels.linear_attn.naive.relu_linear_attention`.
"""

import jax
import jax.numpy as jnp

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
