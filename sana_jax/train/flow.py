"""SANA's flow-matching objective: timestep sampling, flow shift, caption dropout, the velocity loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sana_jax.train.config import FlowConfig

NUM_TRAIN_TIMESTEPS = 1000


def sample_u(rng: jax.Array, batch: int, flow: FlowConfig) -> jax.Array:
    """[B] u in (0, 1) before the shift: logit-normal (SANA), uniform, or SD3's "mode" density."""
    if flow.weighting == "logit_normal":
        return jax.nn.sigmoid(flow.logit_mean + flow.logit_std * jax.random.normal(rng, (batch,)))
    u = jax.random.uniform(rng, (batch,))
    if flow.weighting == "mode":
        return 1.0 - u - flow.mode_scale * (jnp.cos(jnp.pi * u / 2) ** 2 - 1.0 + u)
    return u


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigmas_and_timesteps(u: jax.Array, flow: FlowConfig) -> tuple[jax.Array, jax.Array]:
    """(sigma' [B] in [0, 1), model timestep [B]) for sampled u.

    SANA (integer_timesteps): index = floor(1000 u), sigma = index / 1000 on linear_flow's grid, sigma' =
    shift(sigma), and the model sees floor(1000 sigma') (its timestep_map is built in the long dtype). Otherwise
    continuous: sigma = u, timestep = 1000 sigma'.
    """
    if flow.integer_timesteps:
        sigma = jnp.floor(u * NUM_TRAIN_TIMESTEPS) / NUM_TRAIN_TIMESTEPS
        shifted = shift_sigma(sigma, flow.shift)
        return shifted, jnp.floor(shifted * NUM_TRAIN_TIMESTEPS)
    shifted = shift_sigma(u, flow.shift)
    return shifted, shifted * NUM_TRAIN_TIMESTEPS


def drop_captions(rng: jax.Array, y: jax.Array, null_y: jax.Array, p: float) -> jax.Array:
    """Replace whole captions [B, L, C] by the null embedding [L, C] with probability p; masks stay unchanged."""
    if p == 0.0:
        return y
    keep = jax.random.uniform(rng, (y.shape[0], 1, 1)) >= p
    return jnp.where(keep, y, null_y[None].astype(y.dtype))


def flow_matching_loss(apply_fn, params, batch: dict, rng: jax.Array, flow: FlowConfig) -> jax.Array:
    """mean((v_pred - (eps - x0))^2) over every element, as SANA's mean_flat then batch mean.

    batch: x0 [B, H, W, C] latents (already scaled by the VAE scaling factor), y [B, L, C_cap], mask [B, L],
    null_y [L, C_cap]. apply_fn(params, x_t, timestep, y, mask) -> velocity [B, H, W, C].
    """
    x0 = batch["x0"].astype(jnp.float32)
    rng_u, rng_eps, rng_drop = jax.random.split(rng, 3)
    sigma, timestep = sigmas_and_timesteps(sample_u(rng_u, x0.shape[0], flow), flow)
    eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
    s = sigma[:, None, None, None]
    x_t = (1.0 - s) * x0 + s * eps
    y = drop_captions(rng_drop, batch["y"], batch["null_y"], flow.caption_dropout)
    v_pred = apply_fn(params, x_t, timestep, y, batch["mask"]).astype(jnp.float32)
    return jnp.mean(jnp.square(v_pred - (eps - x0)))
