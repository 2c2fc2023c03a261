"""Load any SANA checkpoint into sana_jax: format detection, config inference from shapes, the sana-jax folder.

Formats `load_pretrained` detects:
- sana-jax export folder: `sana_config.json` ({"format": "sana-jax/1", "config": {SanaConfig fields}}) and
  `params.safetensors` (fp32, keys are the '/'-joined JAX paths, e.g. `blocks/attn/qkv/kernel`), written by
  `save_params`. Lossless, and the only format that keeps every SanaConfig field (compute dtype, eps, ...).
- diffusers folder: config.json with `_class_name: SanaTransformer2DModel`, or a pipeline folder holding one
  in `transformer/`; single-file or sharded safetensors.
- official file: `.pth`/`.pt`/`.bin`/`.ckpt` (torch, weights_only) or `.safetensors` with keys like
  `blocks.0.attn.qkv.weight`. Its config is inferred from key shapes (below) unless `config=` is given.

What shapes identify: D, depth, in/out channels, patch size, caption channels, the FFN width (mlp_ratio),
qk_norm, cross_norm, Sprint's guidance embedder and logvar head. What they do not: the cross-attention head
count (kv_linear is [2D, D] for any head count) and `use_pe` / PE interpolation (no weights). Inference
therefore matches the released variants of sana_jax.configs; the `pos_embed` buffer, when present, gives the
trained latent size (its length is (sample_size / p)^2), which tells SANA-1.6B 1K, 2K (PE) and 4K (PE) apart.
A width that no release has needs `config=`. `config=` always wins, and is checked against the shapes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping

import sana_jax
from sana_conversion._files import atomic_dir, read_safetensors, write_json, write_safetensors
from sana_conversion._tree import check_params, unflatten
from sana_conversion.diffusers import config_from_diffusers, diffusers_to_jax, find_diffusers_folder, read_diffusers
from sana_conversion.official import official_to_jax, read_official
from sana_jax import configs
from sana_jax.configs import SanaConfig

SANA_CONFIG_NAME = "sana_config.json"
PARAMS_NAME = "params.safetensors"
FORMAT = "sana-jax/1"

# Released widths -> cross-attention heads (sana-original.md 1.1): 0.6B 16 x 72, 1.6B / 4.8B 20 x 112.
_CROSS_HEADS_BY_WIDTH = {1152: 16, 2240: 20}
_RELEASED = tuple(cfg for name, cfg in configs.VARIANTS.items() if name != "tiny")
# SanaConfig values (ffn_hidden is a property) that official key shapes determine.
_SHAPE_FIELDS = ("hidden_size", "depth", "in_channels", "out_channels", "patch_size", "caption_channels",
                 "ffn_hidden", "qk_norm", "cross_norm", "guidance_embeds", "logvar")


def shape_fields(shapes: Mapping[str, tuple[int, ...]]) -> dict:
    """What official key shapes say about the config: the `_SHAPE_FIELDS`, plus hints from the buffers
    (`sample_size` from `pos_embed` [1, (S/p)^2, D], `model_max_length` from `y_embedder.y_embedding` [L, C])."""

    def need(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise ValueError(f"not an official SANA state_dict: no key {key!r} (keys: {sorted(shapes)[:8]} ...)")
        return tuple(shapes[key])

    d, c_in, p, p_w = need("x_embedder.proj.weight")
    if p != p_w:
        raise ValueError(f"x_embedder.proj.weight {need('x_embedder.proj.weight')}: non-square patch")
    blocks = {int(m.group(1)) for key in shapes if (m := re.match(r"blocks\.(\d+)\.", key))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise ValueError(f"block indices must be 0..depth-1, got {sorted(blocks)}")
    out_rows = need("final_layer.linear.weight")[0]
    if out_rows % (p * p):
        raise ValueError(f"final_layer.linear.weight has {out_rows} rows, not a multiple of patch^2 = {p * p}")
    fields = dict(
        hidden_size=d, depth=max(blocks) + 1, in_channels=c_in, out_channels=out_rows // (p * p), patch_size=p,
        caption_channels=need("y_embedder.y_proj.fc1.weight")[1],
        ffn_hidden=need("blocks.0.mlp.point_conv.conv.weight")[1],
        qk_norm="blocks.0.attn.q_norm.weight" in shapes,
        cross_norm="blocks.0.cross_attn.q_norm.weight" in shapes,
        guidance_embeds="cfg_embedder.mlp.0.weight" in shapes,
        logvar="logvar_linear.weight" in shapes,
    )
    if "pos_embed" in shapes:
        side = math.isqrt(shapes["pos_embed"][1])
        if side * side == shapes["pos_embed"][1]:
            fields["sample_size"] = side * p
    if "y_embedder.y_embedding" in shapes:
        fields["model_max_length"] = shapes["y_embedder.y_embedding"][0]
    return fields


def _mlp_ratio(hidden: int, ffn: int) -> float:
    for ratio in (2.5, ffn / hidden):  # prefer the released 2.5 over an equivalent float
        if int(hidden * ratio) == ffn:
            return ratio
    raise ValueError(f"no mlp_ratio gives FFN width {ffn} for hidden size {hidden}")


def _check_config(config: SanaConfig, fields: dict) -> None:
    wrong = [f"{name}: config {getattr(config, name)!r}, checkpoint {fields[name]!r}"
             for name in _SHAPE_FIELDS if getattr(config, name) != fields[name]]
    if config.use_pe and "sample_size" in fields and config.sample_size != fields["sample_size"]:
        wrong.append(f"sample_size (the PE base size): config {config.sample_size}, checkpoint pos_embed "
                     f"{fields['sample_size']}")
    if wrong:
        raise ValueError(f"config {config.name!r} does not match the checkpoint shapes: " + "; ".join(wrong))


def infer_config_from_shapes(shapes: Mapping[str, tuple[int, ...]], config: SanaConfig | None = None) -> SanaConfig:
    """The SanaConfig of an official state_dict from its key shapes alone ({key: shape}; no tensors needed).

    `config` given: returned after checking it against the shapes. Otherwise the released variant with these
    shapes (the one whose sample_size equals the pos_embed hint, else the one without PE, with sample_size set
    from the hint); failing that, a config named "inferred" whose cross-attention heads come from the released
    width table, and an error asking for `config=` when the width is not a released one.
    """
    fields = shape_fields(shapes)
    if config is not None:
        _check_config(config, fields)
        return config
    sample = fields.get("sample_size")
    candidates = [v for v in _RELEASED if all(getattr(v, name) == fields[name] for name in _SHAPE_FIELDS)]
    if candidates:
        exact = [v for v in candidates if v.sample_size == sample]
        cfg = exact[0] if exact else next((v for v in candidates if not v.use_pe), candidates[0])
        if sample is not None and cfg.sample_size != sample:
            cfg = cfg.replace(sample_size=sample)
        return cfg
    d = fields["hidden_size"]
    if d not in _CROSS_HEADS_BY_WIDTH:
        released = ", ".join(f"{width} -> {heads} heads" for width, heads in _CROSS_HEADS_BY_WIDTH.items())
        raise ValueError(f"the cross-attention head count cannot be inferred from shapes, and hidden size D={d} is "
                         f"not a released SANA width ({released}); pass config=SanaConfig(...) with num_cross_heads "
                         f"(and use_pe if the model has PE)")
    arch = {name: fields[name] for name in _SHAPE_FIELDS if name != "ffn_hidden"}
    return SanaConfig(name="inferred", **arch, num_cross_heads=_CROSS_HEADS_BY_WIDTH[d],
                      mlp_ratio=_mlp_ratio(d, fields["ffn_hidden"]), sample_size=sample or 32,
                      model_max_length=fields.get("model_max_length", 300))


def save_params(cfg: SanaConfig, params: Mapping, out_dir: str, overwrite: bool = False) -> None:
    """Write a sana-jax folder: sana_config.json + params.safetensors (fp32, '/'-joined JAX paths), atomically."""
    flat = check_params(params, cfg)
    with atomic_dir(os.fspath(out_dir), overwrite) as tmp:
        write_json(os.path.join(tmp, SANA_CONFIG_NAME), {"format": FORMAT, "config": dataclasses.asdict(cfg)})
        write_safetensors(os.path.join(tmp, PARAMS_NAME), flat, {"format": FORMAT})


def load_params(path: str, config: SanaConfig | None = None) -> tuple[SanaConfig, dict]:
    """(config, params) of a sana-jax folder; `config` replaces the saved one (checked against the shapes)."""
    config_path = os.path.join(path, SANA_CONFIG_NAME)
    with open(config_path) as f:
        saved = json.load(f)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{config_path}: format {saved.get('format') if isinstance(saved, dict) else None!r}, "
                         f"expected {FORMAT!r}")
    if config is None:
        known = {f.name for f in dataclasses.fields(SanaConfig)}
        unknown = sorted(set(saved["config"]) - known)
        if unknown:
            raise ValueError(f"{config_path}: unknown SanaConfig fields {unknown}")
        config = SanaConfig(**saved["config"])
    tensors, _ = read_safetensors(os.path.join(path, PARAMS_NAME))
    return config, unflatten(check_params(unflatten(tensors), config))


def load_pretrained(path, config: SanaConfig | None = None, ema: bool = False):
    """(SanaTransformer, params) from a sana-jax folder, a diffusers (pipeline) folder or an official file.

    Args:
      path: folder or file (see the module docstring for the formats).
      config: the SanaConfig to use instead of the stored / inferred one; checked against the weights.
      ema: official training checkpoints only: load `state_dict_ema`.
    Returns:
      (sana_jax.SanaTransformer(cfg), params as a nested dict of fp32 numpy arrays).
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, SANA_CONFIG_NAME)):
                cfg, params = load_params(path, config)
            elif find_diffusers_folder(path) is not None:
                config_json, state_dict = read_diffusers(path)
                cfg = config if config is not None else config_from_diffusers(config_json)
                params = diffusers_to_jax(state_dict, cfg)
            else:
                raise ValueError(f"not a checkpoint folder this loader knows: no {SANA_CONFIG_NAME} (sana-jax), and no "
                                 f"config.json of a SanaTransformer2DModel here or in transformer/ (diffusers)")
        elif os.path.isfile(path):
            state_dict = read_official(path, ema)
            if any(key.startswith(("transformer_blocks.", "patch_embed.")) for key in state_dict):
                raise ValueError("this file has diffusers key names; load the diffusers folder (with config.json)")
            cfg = infer_config_from_shapes({k: tuple(v.shape) for k, v in state_dict.items()}, config)
            params = official_to_jax(state_dict, cfg)
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    except ValueError as err:
        raise ValueError(err.args[0] if str(err).startswith(path) else f"{path}: {err}") from err
    return sana_jax.SanaTransformer(cfg), params
