"""SANA-Sprint's TrigFlow wrapper around the flow-matching transformer (the original `SanaMSCM.forward`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sana_jax.model import SanaTransformer


def trigflow_forward(model: SanaTransformer, params: dict, x: jax.Array, s: jax.Array, y: jax.Array,
                     mask: jax.Array | None, guidance: jax.Array) -> jax.Array:
    """F(x, s): the TrigFlow prediction of a Sprint model at TrigFlow time s in [0, pi/2].

    With t = sin s / (sin s + cos s) and r = sqrt(t^2 + (1 - t)^2): the flow model sees x * r at continuous
    t in [0, 1] and returns v; F = ((1 - 2t) x r + (1 - 2t + 2t^2) v) / r.

    Args:
      x: [B, H, W, C] latents already divided by sigma_data (the pipeline's job, as in the original).
      s: [B] TrigFlow times. guidance: [B] raw guidance scales (e.g. 4.5).
    Returns:
      [B, H, W, C] in fp32.
    """
    s = s.astype(jnp.float32)
    t = jnp.sin(s) / (jnp.sin(s) + jnp.cos(s))  # [B]
    t4 = t[:, None, None, None]
    r = jnp.sqrt(t4 ** 2 + (1 - t4) ** 2)
    x_in = x.astype(jnp.float32) * r
    v = model.apply({"params": params}, x_in, t, y, mask, guidance=guidance).astype(jnp.float32)
    return ((1 - 2 * t4) * x_in + (1 - 2 * t4 + 2 * t4 ** 2) * v) / r
