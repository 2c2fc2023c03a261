"""Parameter utilities: plain-pytree init, counts, logical axes, and named intermediates for parity reports."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sana_jax.configs import SanaConfig
from sana_jax.model import SanaTransformer


def _dummy_inputs(cfg: SanaConfig, batch: int = 1, grid: int = 2, tokens: int = 2):
    hw = grid * cfg.patch_size
    x = jnp.zeros((batch, hw, hw, cfg.in_channels), jnp.float32)
    timestep = jnp.zeros((batch,), jnp.float32)
    y = jnp.zeros((batch, tokens, cfg.caption_channels), jnp.float32)
    mask = jnp.ones((batch, tokens), jnp.int32)
    guidance = jnp.zeros((batch,), jnp.float32) if cfg.guidance_embeds else None
    return x, timestep, y, mask, guidance


def _init_boxed(model: SanaTransformer, rng: jax.Array):
    x, timestep, y, mask, guidance = _dummy_inputs(model.config)
    return model.init(rng, x, timestep, y, mask, guidance=guidance)["params"]


def init_params(model: SanaTransformer, rng: jax.Array) -> dict:
    """The original SANA initialisation as a plain nested dict of fp32 arrays (no partitioning boxes)."""
    return nn.unbox(_init_boxed(model, rng))


def abstract_params(model: SanaTransformer) -> dict:
    """ShapeDtypeStructs of every parameter, without allocating (works for the 4.8B model on a laptop)."""
    return nn.unbox(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def logical_axes(model: SanaTransformer) -> dict:
    """The logical axis names of every parameter (a tree of PartitionSpec of names, `layers` first in blocks)."""
    return nn.get_partition_spec(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def count_params(params) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))


def intermediates(model: SanaTransformer, params: dict, x, timestep, y, mask=None, guidance=None):
    """Run the model and return (out, {name: array}) with the golden-fixture names.

    Names: x_embedder [B, N, D], t_embedder [B, D], cfg_embedder, t_block [B, 6D], y_embedder [B, L, D],
    attention_y_norm [B, L, D], block.{i}.out [B, N, D], final_layer [B, N, p*p*C_out].
    """
    out, state = model.apply({"params": params}, x, timestep, y, mask, guidance=guidance,
                             mutable=["intermediates"])
    sown = state["intermediates"]
    named = {key.removesuffix("_out"): value[0] for key, value in sown.items() if key != "blocks"}
    for i, block_out in enumerate(sown["blocks"]["out"][0]):
        named[f"block.{i}.out"] = block_out
    return out, named


def perturb_params(params, seed: int = 0, matrix_std: float = 0.05, vector_std: float = 0.3):
    """Every leaf moved away from its init: + randn * matrix_std where ndim >= 2 (per layer for stacked blocks,
    whose leading axis does not count), + randn * vector_std otherwise. The recipe of the golden fixtures: with no
    parameter at a special value (zero bias, unit norm weight), an implementation that ignores one shows it."""
    rng = np.random.default_rng(seed)

    def move(path, leaf):
        leaf = np.asarray(leaf, np.float32)
        per_layer_ndim = leaf.ndim - (jax.tree_util.keystr(path).startswith("['blocks']"))
        std = matrix_std if per_layer_ndim >= 2 else vector_std
        return leaf + (rng.standard_normal(leaf.shape) * std).astype(np.float32)

    return jax.tree_util.tree_map_with_path(move, params)
