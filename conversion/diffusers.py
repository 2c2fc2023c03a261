"""diffusers `SanaTransformer2DModel` state_dict / folder <-> sana_jax params, via the official layout.

The key map is diffusers' own (`scripts/convert_sana_to_diffusers.py`, diffusers.md section 5): renames, plus
the official fused `attn.qkv` split in 3 and `cross_attn.kv_linear` split in 2 along the out dim (dim 0).
So diffusers -> JAX is: check keys and shapes under diffusers names, concatenate into the official layout,
then `official_to_jax`; the reverse splits `jax_to_official`'s output. Round trips are bit-exact.

What the diffusers model cannot hold, by design:
- `logvar_linear` (Sprint's sCM loss weight): diffusers has no such module. `jax_to_diffusers` drops it, and a
  config read from a diffusers folder always has `logvar=False`.
- Different q/k norms for self- and cross-attention: diffusers' single `qk_norm` switch covers both, so a
  config with `qk_norm != cross_norm` cannot be exported.
- Two eps that diffusers hard-codes differently from SanaMS (not config fields there): LiteLA 1e-15 (SanaMS
  1e-8) and cross-attention q/k RMSNorm 1e-5 (SanaMS 1e-6). Weights are unaffected; outputs differ by ~1e-7
  relative. Set `linear_attn_eps=1e-15, cross_norm_eps=1e-5` for diffusers' exact numerics.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping

import numpy as np

from sana_conversion._files import (atomic_dir, read_safetensors, read_torch, tensors_to_numpy, write_json,
                                    write_safetensors)
from sana_conversion._tree import check_keys, check_params, checked_fp32
from sana_conversion.official import official_shapes, official_to_jax, official_views
from sana_jax.configs import SanaConfig

CLASS_NAME = "SanaTransformer2DModel"
# Written as `_diffusers_version`: the release this layout was tested against (fixed, so exports are
# reproducible whatever diffusers is installed; diffusers only reads it for warnings).
DIFFUSERS_VERSION = "0.42.1"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"
_QK_NORM = "rms_norm_across_heads"

# Official key -> diffusers key(s); several keys are concatenated along dim 0 in this order. "{i}" is the
# block index; "{temb}" is the timestep embedder, which SanaCombinedTimestepGuidanceEmbeddings (Sprint)
# holds without the `emb.` level of AdaLayerNormSingle.
TABLE: dict[str, tuple[str, ...]] = {
    "x_embedder.proj.weight": ("patch_embed.proj.weight",),
    "x_embedder.proj.bias": ("patch_embed.proj.bias",),
    "t_embedder.mlp.0.weight": ("{temb}.linear_1.weight",),
    "t_embedder.mlp.0.bias": ("{temb}.linear_1.bias",),
    "t_embedder.mlp.2.weight": ("{temb}.linear_2.weight",),
    "t_embedder.mlp.2.bias": ("{temb}.linear_2.bias",),
    "cfg_embedder.mlp.0.weight": ("time_embed.guidance_embedder.linear_1.weight",),
    "cfg_embedder.mlp.0.bias": ("time_embed.guidance_embedder.linear_1.bias",),
    "cfg_embedder.mlp.2.weight": ("time_embed.guidance_embedder.linear_2.weight",),
    "cfg_embedder.mlp.2.bias": ("time_embed.guidance_embedder.linear_2.bias",),
    "t_block.1.weight": ("time_embed.linear.weight",),
    "t_block.1.bias": ("time_embed.linear.bias",),
    "y_embedder.y_proj.fc1.weight": ("caption_projection.linear_1.weight",),
    "y_embedder.y_proj.fc1.bias": ("caption_projection.linear_1.bias",),
    "y_embedder.y_proj.fc2.weight": ("caption_projection.linear_2.weight",),
    "y_embedder.y_proj.fc2.bias": ("caption_projection.linear_2.bias",),
    "attention_y_norm.weight": ("caption_norm.weight",),
    "blocks.{i}.scale_shift_table": ("transformer_blocks.{i}.scale_shift_table",),
    "blocks.{i}.attn.qkv.weight": ("transformer_blocks.{i}.attn1.to_q.weight",
                                   "transformer_blocks.{i}.attn1.to_k.weight",
                                   "transformer_blocks.{i}.attn1.to_v.weight"),
    "blocks.{i}.attn.q_norm.weight": ("transformer_blocks.{i}.attn1.norm_q.weight",),
    "blocks.{i}.attn.k_norm.weight": ("transformer_blocks.{i}.attn1.norm_k.weight",),
    "blocks.{i}.attn.proj.weight": ("transformer_blocks.{i}.attn1.to_out.0.weight",),
    "blocks.{i}.attn.proj.bias": ("transformer_blocks.{i}.attn1.to_out.0.bias",),
    "blocks.{i}.cross_attn.q_linear.weight": ("transformer_blocks.{i}.attn2.to_q.weight",),
    "blocks.{i}.cross_attn.q_linear.bias": ("transformer_blocks.{i}.attn2.to_q.bias",),
    "blocks.{i}.cross_attn.kv_linear.weight": ("transformer_blocks.{i}.attn2.to_k.weight",
                                               "transformer_blocks.{i}.attn2.to_v.weight"),
    "blocks.{i}.cross_attn.kv_linear.bias": ("transformer_blocks.{i}.attn2.to_k.bias",
                                             "transformer_blocks.{i}.attn2.to_v.bias"),
    "blocks.{i}.cross_attn.q_norm.weight": ("transformer_blocks.{i}.attn2.norm_q.weight",),
    "blocks.{i}.cross_attn.k_norm.weight": ("transformer_blocks.{i}.attn2.norm_k.weight",),
    "blocks.{i}.cross_attn.proj.weight": ("transformer_blocks.{i}.attn2.to_out.0.weight",),
    "blocks.{i}.cross_attn.proj.bias": ("transformer_blocks.{i}.attn2.to_out.0.bias",),
    "blocks.{i}.mlp.inverted_conv.conv.weight": ("transformer_blocks.{i}.ff.conv_inverted.weight",),
    "blocks.{i}.mlp.inverted_conv.conv.bias": ("transformer_blocks.{i}.ff.conv_inverted.bias",),
    "blocks.{i}.mlp.depth_conv.conv.weight": ("transformer_blocks.{i}.ff.conv_depth.weight",),
    "blocks.{i}.mlp.depth_conv.conv.bias": ("transformer_blocks.{i}.ff.conv_depth.bias",),
    "blocks.{i}.mlp.point_conv.conv.weight": ("transformer_blocks.{i}.ff.conv_point.weight",),
    "final_layer.scale_shift_table": ("scale_shift_table",),
    "final_layer.linear.weight": ("proj_out.weight",),
    "final_layer.linear.bias": ("proj_out.bias",),
}
# Official keys with no diffusers counterpart (dropped on export; see the module docstring).
NOT_IN_DIFFUSERS = ("logvar_linear.weight", "logvar_linear.bias")


def check_diffusers_compatible(cfg: SanaConfig) -> None:
    """Raise ValueError if SanaTransformer2DModel cannot express `cfg`'s architecture."""
    if cfg.qk_norm != cfg.cross_norm:
        raise ValueError(f"config {cfg.name!r} has qk_norm={cfg.qk_norm} but cross_norm={cfg.cross_norm}: diffusers' "
                         f"qk_norm applies to self- and cross-attention alike, so it cannot hold this model")
    if cfg.norm_eps != 1e-5:
        raise ValueError(f"config {cfg.name!r} has norm_eps={cfg.norm_eps}; diffusers hard-codes 1e-5 for the caption "
                         f"and self-attention q/k RMSNorm")


def _pairs(cfg: SanaConfig) -> list[tuple[str, tuple[str, ...]]]:
    """(official key, diffusers keys) for every official key of `cfg` that diffusers holds."""
    temb = "time_embed.timestep_embedder" if cfg.guidance_embeds else "time_embed.emb.timestep_embedder"
    official = official_shapes(cfg)
    pairs = []
    for pattern, targets in TABLE.items():
        for i in range(cfg.depth) if "{i}" in pattern else (None,):
            key = pattern.format(i=i)
            if key in official:
                pairs.append((key, tuple(t.format(i=i, temb=temb) for t in targets)))
    uncovered = sorted(set(official) - {key for key, _ in pairs} - set(NOT_IN_DIFFUSERS))
    if uncovered:  # official.TABLE grew a row this table lacks: a bug here, not in the checkpoint
        raise RuntimeError(f"sana_conversion.diffusers.TABLE has no row for official keys {uncovered}")
    return pairs


def diffusers_shapes(cfg: SanaConfig) -> dict[str, tuple[int, ...]]:
    """{diffusers key: shape} of SanaTransformer2DModel for `cfg` (fused tensors split evenly along dim 0)."""
    official = official_shapes(cfg)
    shapes = {}
    for key, targets in _pairs(cfg):
        rows, *rest = official[key]
        for target in targets:
            shapes[target] = (rows // len(targets), *rest)
    return shapes


def diffusers_to_jax(state_dict: Mapping, cfg: SanaConfig) -> dict:
    """diffusers SanaTransformer2DModel state_dict {key: ndarray | torch.Tensor} -> sana_jax params (fp32).

    `cfg` must have `logvar=False` (diffusers checkpoints carry no logvar head; config_from_diffusers gives that).
    """
    check_diffusers_compatible(cfg)
    if cfg.logvar:
        raise ValueError(f"config {cfg.name!r} has logvar=True, but diffusers checkpoints carry no logvar_linear "
                         f"head; use cfg.replace(logvar=False) (config_from_diffusers always does)")
    expected = diffusers_shapes(cfg)
    source = f"diffusers state_dict for config {cfg.name!r}"
    arrays = checked_fp32(state_dict, expected, source)
    official = {key: np.concatenate([arrays[t] for t in targets]) if len(targets) > 1 else arrays[targets[0]]
                for key, targets in _pairs(cfg)}
    return official_to_jax(official, cfg)


def jax_to_diffusers(params: Mapping, cfg: SanaConfig) -> dict[str, np.ndarray]:
    """sana_jax params -> diffusers state_dict {key: contiguous fp32 ndarray}; `logvar_linear` is dropped."""
    check_diffusers_compatible(cfg)
    official = official_views(check_params(params, cfg), cfg)
    out = {}
    for key, targets in _pairs(cfg):
        for target, part in zip(targets, np.split(official[key], len(targets), axis=0)):
            out[target] = np.ascontiguousarray(part)
    return out


# SanaTransformer2DModel.__init__ defaults (diffusers 0.42.1); a config.json may omit any of them.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 32, "out_channels": 32, "num_attention_heads": 70, "attention_head_dim": 32, "num_layers": 20,
    "num_cross_attention_heads": 20, "cross_attention_head_dim": 112, "cross_attention_dim": 2240,
    "caption_channels": 2304, "mlp_ratio": 2.5, "dropout": 0.0, "attention_bias": False, "sample_size": 32,
    "patch_size": 1, "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": None,
    "guidance_embeds": False, "guidance_embeds_scale": 0.1, "qk_norm": None, "timestep_scale": 1.0,
}


def diffusers_config(cfg: SanaConfig) -> dict:
    """The config.json of the SanaTransformer2DModel equal to `cfg` (derived values as in diffusers.md section 5)."""
    check_diffusers_compatible(cfg)
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "num_attention_heads": cfg.num_heads,
        "attention_head_dim": cfg.linear_head_dim,
        "num_layers": cfg.depth,
        "num_cross_attention_heads": cfg.num_cross_heads,
        "cross_attention_head_dim": cfg.cross_head_dim,
        "cross_attention_dim": cfg.hidden_size,  # cross K/V read the caption already projected to D
        "caption_channels": cfg.caption_channels,
        "mlp_ratio": cfg.mlp_ratio,
        "dropout": 0.0,
        "attention_bias": False,  # LiteLA's qkv has no bias
        "sample_size": cfg.sample_size,
        "patch_size": cfg.patch_size,
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "interpolation_scale": cfg.pe_interpolation if cfg.use_pe else None,  # None = no position embedding
        "guidance_embeds": cfg.guidance_embeds,
        "guidance_embeds_scale": cfg.guidance_embeds_scale,
        "qk_norm": _QK_NORM if cfg.qk_norm else None,
        "timestep_scale": cfg.timestep_scale,
    }


def config_fields(config_json: Mapping, class_name: str, defaults: Mapping) -> dict:
    """A diffusers model config.json over the class's constructor defaults; another class or a field the
    converter does not know raises (a silently ignored field would change the model)."""
    found = config_json.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"config.json is for {found!r}, not {class_name!r}")
    given = {key: value for key, value in config_json.items() if not key.startswith("_")}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"config.json has fields this converter does not know: {unknown}")
    return {**defaults, **given}


def config_from_diffusers(config_json: Mapping, **overrides) -> SanaConfig:
    """SanaConfig of a SanaTransformer2DModel config.json; `overrides` replace fields (e.g. compute_dtype).

    Always `logvar=False` (no logvar head in diffusers). Fields diffusers does not store keep SanaConfig's
    defaults: `model_max_length`, `flow_shift`, the SanaMS eps (see the module docstring), `name="diffusers"`.
    Values SanaMS has no counterpart for (attention bias, affine norms, dropout, other norm types) are refused.
    """
    c = config_fields(config_json, CLASS_NAME, _DIFFUSERS_DEFAULTS)
    if c["out_channels"] is None:  # diffusers: out_channels or in_channels
        c["out_channels"] = c["in_channels"]
    fixed = {"dropout": 0.0, "attention_bias": False, "norm_elementwise_affine": False, "norm_eps": 1e-6}
    wrong = {key: c[key] for key, value in fixed.items() if c[key] != value}
    if wrong:
        raise ValueError(f"config.json values SANA does not have: {wrong} (SANA: {fixed})")
    if c["qk_norm"] not in (None, _QK_NORM):
        raise ValueError(f"config.json qk_norm={c['qk_norm']!r}; expected None or {_QK_NORM!r}")
    hidden = c["num_attention_heads"] * c["attention_head_dim"]
    cross = c["num_cross_attention_heads"] * c["cross_attention_head_dim"]
    if c["cross_attention_dim"] != hidden or cross != hidden:
        raise ValueError(f"config.json: cross_attention_dim {c['cross_attention_dim']} and cross heads x head dim "
                         f"{cross} must both equal the hidden size {hidden} (SANA cross-attends to the projected "
                         f"caption)")
    fields = dict(
        name="diffusers", in_channels=c["in_channels"], out_channels=c["out_channels"], hidden_size=hidden,
        depth=c["num_layers"], linear_head_dim=c["attention_head_dim"],
        num_cross_heads=c["num_cross_attention_heads"], mlp_ratio=float(c["mlp_ratio"]),
        caption_channels=c["caption_channels"], patch_size=c["patch_size"], sample_size=c["sample_size"],
        qk_norm=c["qk_norm"] is not None, cross_norm=c["qk_norm"] is not None,
        use_pe=c["interpolation_scale"] is not None,
        pe_interpolation=float(c["interpolation_scale"] if c["interpolation_scale"] is not None else 1.0),
        guidance_embeds=bool(c["guidance_embeds"]), guidance_embeds_scale=float(c["guidance_embeds_scale"]),
        logvar=False, timestep_scale=float(c["timestep_scale"]),
    )
    known = {f.name for f in dataclasses.fields(SanaConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown SanaConfig fields in overrides: {sorted(set(overrides) - known)}")
    return SanaConfig(**{**fields, **overrides})


def find_diffusers_folder(path: str) -> str | None:
    """The folder holding a SanaTransformer2DModel config.json: `path` itself or its `transformer/` (pipeline)."""
    for folder in (path, os.path.join(path, "transformer")):
        config_path = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(config_path):
            with open(config_path) as f:
                try:
                    class_name = json.load(f).get("_class_name")
                except json.JSONDecodeError as err:
                    raise ValueError(f"{config_path}: not valid JSON: {err}") from err
            if class_name == CLASS_NAME:
                return folder
    return None


def read_diffusers(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json dict, state_dict) of a diffusers transformer folder or of a pipeline folder's transformer/.

    Weights: `diffusion_pytorch_model.safetensors`, its sharded form (`.safetensors.index.json` + shards), or
    `diffusion_pytorch_model.bin` (torch, weights_only).
    """
    folder = find_diffusers_folder(path)
    if folder is None:
        raise ValueError(f"{path}: no {CONFIG_NAME} with _class_name {CLASS_NAME!r} here or in transformer/")
    with open(os.path.join(folder, CONFIG_NAME)) as f:
        config_json = json.load(f)
    return config_json, read_model_weights(folder)


def read_model_weights(folder: str) -> dict[str, np.ndarray]:
    """The weights of any diffusers model folder: one safetensors file, a sharded index, or a torch .bin."""
    single, index = os.path.join(folder, WEIGHTS_NAME), os.path.join(folder, WEIGHTS_INDEX_NAME)
    torch_bin = os.path.join(folder, "diffusion_pytorch_model.bin")
    if os.path.isfile(single):
        return read_safetensors(single)[0]
    if os.path.isfile(index):
        return _read_sharded(index)
    if os.path.isfile(torch_bin):
        return tensors_to_numpy(read_torch(torch_bin))
    raise ValueError(f"{folder}: no {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME} or diffusion_pytorch_model.bin "
                     f"(found: {sorted(os.listdir(folder))})")


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    """Read every shard of a diffusers index; each shard must hold exactly the keys the index maps to it."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{index_path}: not a safetensors index (JSON with a weight_map): {err}") from err
    folder = os.path.dirname(index_path)
    state_dict = {}
    for shard in sorted(set(weight_map.values())):
        if os.path.basename(shard) != shard:
            raise ValueError(f"{index_path}: shard name {shard!r} is not a file name in the folder")
        tensors, _ = read_safetensors(os.path.join(folder, shard))
        mapped = {key for key, name in weight_map.items() if name == shard}
        check_keys(tensors, mapped, f"{os.path.join(folder, shard)} (against {os.path.basename(index_path)})")
        state_dict.update(tensors)
    return state_dict


def export_diffusers(cfg: SanaConfig, params: Mapping, out_dir: str, overwrite: bool = False) -> None:
    """Write a folder that `diffusers.SanaTransformer2DModel.from_pretrained(out_dir)` loads.

    Contents: config.json (diffusers_config) and diffusion_pytorch_model.safetensors (fp32, one file). Everything
    is converted and checked first; the folder appears atomically; an existing non-empty `out_dir` is only
    replaced with `overwrite=True`. Sprint's logvar head is not exported (diffusers has none).
    """
    config = diffusers_config(cfg)
    state_dict = jax_to_diffusers(params, cfg)
    with atomic_dir(os.fspath(out_dir), overwrite) as tmp:
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), state_dict, {"format": "pt"})
