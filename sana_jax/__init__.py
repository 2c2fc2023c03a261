"""sana-jax: SANA in JAX/Flax. See DESIGN.md for the public API."""

from sana_jax import configs
from sana_jax.configs import SanaConfig
from sana_jax.model import SanaTransformer
from sana_jax.params import (abstract_params, count_params, init_params, intermediates, logical_axes,
                             perturb_params)

__all__ = ["configs", "SanaConfig", "SanaTransformer", "abstract_params", "count_params", "init_params", "intermediates",
           "logical_axes", "perturb_params", "load_pretrained"]


def load_pretrained(path, config=None):
    """(model, params) from a diffusers folder, an official .pth/.safetensors, or a sana-jax export folder."""
    from sana_conversion.load import load_pretrained as _load

    return _load(path, config=config)
