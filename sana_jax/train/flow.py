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


def drop_captions(keys: jax.Array, y: jax.Array, null_y: jax.Array, p: float) -> jax.Array:
    """Replace whole captions [B, L, C] by the null embedding [L, C] with probability p (one draw per key of
    keys [B]); masks stay unchanged."""
    if p == 0.0:
        return y
    keep = jax.vmap(jax.random.uniform)(keys) >= p
    return jnp.where(keep[:, None, None], y, null_y[None].astype(y.dtype))


def example_keys(rng: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-example keys (u, eps, caption dropout), each [B], from the step key and index [B]: each example's
    position in the global batch as one process reads it. The draws then depend on (step, position) only, not on
    where the row sits in the sharded array: several hosts, whose rows are assembled in another order, draw
    exactly what one host draws."""
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(rng, i), 3))(index)  # [B, 3]
    return keys[:, 0], keys[:, 1], keys[:, 2]


def flow_matching_loss(apply_fn, params, batch: dict, rng: jax.Array, flow: FlowConfig) -> jax.Array:
    """mean((v_pred - (eps - x0))^2) over every element, as SANA's mean_flat then batch mean.

    batch: x0 [B, H, W, C] latents (already scaled by the VAE scaling factor), y [B, L, C_cap], mask [B, L],
    null_y [L, C_cap], optional index [B] int (each row's position in the single-host global batch, see
    `example_keys`; default arange(B)). apply_fn(params, x_t, timestep, y, mask) -> velocity [B, H, W, C].
    """
    x0 = batch["x0"].astype(jnp.float32)
    index = batch.get("index")
    index = jnp.arange(x0.shape[0], dtype=jnp.int32) if index is None else index
    keys_u, keys_eps, keys_drop = example_keys(rng, index)
    u = jax.vmap(lambda k: sample_u(k, 1, flow)[0])(keys_u)
    sigma, timestep = sigmas_and_timesteps(u, flow)
    eps = jax.vmap(lambda k: jax.random.normal(k, x0.shape[1:], jnp.float32))(keys_eps)
    s = sigma[:, None, None, None]
    x_t = (1.0 - s) * x0 + s * eps
    y = drop_captions(keys_drop, batch["y"], batch["null_y"], flow.caption_dropout)
    v_pred = apply_fn(params, x_t, timestep, y, batch["mask"]).astype(jnp.float32)
    return jnp.mean(jnp.square(v_pred - (eps - x0)))
