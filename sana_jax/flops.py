"""Analytic FLOPs of the SANA transformer (matmuls and convolutions; a training step counts 3x the forward)."""

from __future__ import annotations

from sana_jax.configs import SanaConfig

# Dense bf16 peak of the accelerators we report MFU for (DESIGN.md benchmark method).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12}


def forward_flops(cfg: SanaConfig, batch: int, latent_h: int, latent_w: int, tokens: int) -> float:
    """Multiply-adds x 2 of one forward on [batch, latent_h, latent_w] latents with `tokens` caption tokens."""
    d, p = cfg.hidden_size, cfg.patch_size
    n = (latent_h // p) * (latent_w // p)
    f, dh = cfg.ffn_hidden, cfg.linear_head_dim
    per_block = (
        2 * n * d * 3 * d + 2 * n * d * d  # LiteLA qkv, proj
        + 2 * 2 * n * d * (dh + 1)  # v_pad k^T and (vk) q per head: 2 matmuls of N x (D+1) x D / H per head
        + 2 * n * d * d + 2 * tokens * d * 2 * d + 2 * n * d * d  # cross q, kv, proj
        + 2 * 2 * n * tokens * d  # cross scores and weighted sum
        + 2 * n * d * 2 * f + 2 * n * 2 * f * 9 + 2 * n * f * d  # GLUMBConv 1x1, 3x3 depthwise, 1x1
    )
    outer = (2 * n * cfg.in_channels * p * p * d  # patch embedding
             + 2 * tokens * (cfg.caption_channels * d + d * d)  # caption projection
             + 2 * n * d * p * p * cfg.out_channels)  # final layer
    return float(batch * (cfg.depth * per_block + outer))


def peak_flops(device_kind: str) -> float | None:
    for name, peak in PEAK_FLOPS.items():
        if name in device_kind:
            return peak
    return None
