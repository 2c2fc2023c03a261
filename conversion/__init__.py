"""sana_conversion: SANA weights between the official layout, diffusers folders and sana_jax params.

official.py   official state_dict <-> JAX (one table, named transforms), read/export .pth / .safetensors
diffusers.py  diffusers SanaTransformer2DModel state_dict / config.json / folder <-> JAX
load.py       load_pretrained (format detection, config inference from shapes), the sana-jax folder format
"""

from sana_conversion.diffusers import (config_from_diffusers, diffusers_config, diffusers_to_jax, export_diffusers,
                                       jax_to_diffusers)
from sana_conversion.load import infer_config_from_shapes, load_pretrained, save_params
from sana_conversion.official import export_official, jax_to_official, official_to_jax, read_official

__all__ = ["export_diffusers", "export_official", "load_pretrained", "official_to_jax", "jax_to_official",
           "diffusers_to_jax", "jax_to_diffusers", "save_params", "diffusers_config", "config_from_diffusers",
           "infer_config_from_shapes", "read_official"]
