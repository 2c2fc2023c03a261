"""DC-AE weights: diffusers `AutoencoderDC` folders and the original mit-han-lab DC-AE layout <-> sana_jax.dcae params.

One table, generated from the config (`layout`): each JAX leaf with its diffusers key(s) and its original key,
and a named transform per side. The original layout is what efficientvit's `DCAE.state_dict()` saves
(`encoder.project_in.conv.*`, `encoder.stages.{i}.op_list.{j}.main.conv1.conv.*`,
`...context_module.main.qkv.conv.weight`, `...local_module.main.point_conv.norm.*`, `decoder.project_out.op_list.0.*`);
diffusers' converter (`convert_autoencoder_dc_checkpoint_to_diffusers`, diffusers.md section 5) is a list of
substring renames of it plus the qkv split, and the tests check that our two tables agree with it.

Transforms: convolutions OIHW <-> HWIO; diffusers Linear [out, in] <-> Flax [in, out]; the original's 1x1
conv [out, in, 1, 1] <-> [in, out]; diffusers' to_q / to_k / to_v (three [C, C]) <-> one fused `qkv` kernel
[C, 3C] <-> the original's `qkv.conv.weight` [3C, C, 1, 1]. All exact, so round trips are bit-exact.

Strictness: every expected key present, every present key used, every shape the config implies; errors name the
key and both shapes. The only keys allowed and ignored are BatchNorm's `num_batches_tracked` counters (not used
in inference mode; exports write 0). fp16 / bf16 weights are upcast to fp32 exactly; exports write fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import stat
from collections.abc import Mapping

import numpy as np
from safetensors.numpy import save_file

from sana_conversion._files import (TORCH_SUFFIXES, atomic_dir, atomic_file, read_safetensors, read_torch,
                                    tensors_to_numpy, write_json)
from sana_conversion._tree import as_fp32, check_keys, checked_fp32, flatten, unflatten
from sana_jax import dcae
from sana_jax.dcae import DCAEConfig

CLASS_NAME = "AutoencoderDC"
DIFFUSERS_VERSION = "0.42.1"  # the release this layout was tested against (written as `_diffusers_version`)
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
ORIGINAL_WEIGHTS_NAME = "model.safetensors"  # efficientvit DCAE_HF (huggingface_hub PyTorchModelHubMixin)
# Released configs by the name efficientvit's DCAE_HF / its config.json `model_name` uses.
RELEASED = {name: cfg for name, cfg in dcae.VARIANTS.items() if name != "tiny"}


# --------------------------------------------------------------------------------------------- transforms

def _conv_to_torch(kernel):
    return [kernel.transpose(3, 2, 0, 1)]  # HWIO -> OIHW


def _conv_to_jax(ws):
    return ws[0].transpose(2, 3, 1, 0)  # OIHW -> HWIO


# kind -> (JAX leaf -> list of torch tensors, list of torch tensors -> JAX leaf)
TRANSFORMS = {
    "conv": (_conv_to_torch, _conv_to_jax),
    "vector": (lambda v: [v], lambda ws: ws[0]),
    "linear": (lambda k: [k.T], lambda ws: ws[0].T),  # torch Linear [out, in] <-> [in, out]
    "conv1x1": (lambda k: [k.T[:, :, None, None]], lambda ws: ws[0][:, :, 0, 0].T),  # [out, in, 1, 1] <-> [in, out]
    # three Linear [C, C] (to_q, to_k, to_v) <-> [C, 3C]: q, k, v are consecutive thirds of the fused output.
    "qkv3": (lambda k: [part.T for part in np.split(k, 3, axis=1)], lambda ws: np.concatenate([w.T for w in ws], 1)),
}


def _torch_shapes(kind: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(a.shape) for a in TRANSFORMS[kind][0](np.empty(shape, np.float32))]


# ---------------------------------------------------------------------------------------------------- table

@dataclasses.dataclass(frozen=True)
class Row:
    """One JAX leaf: its diffusers key(s) and transform, its original key and transform."""

    jax: str
    diffusers_kind: str
    diffusers: tuple[str, ...]
    original_kind: str
    original: str


def _conv(jax: str, diff: str, orig: str, bias: bool = True) -> list[Row]:
    rows = [Row(f"{jax}/kernel", "conv", (f"{diff}.weight",), "conv", f"{orig}.weight")]
    if bias:
        rows.append(Row(f"{jax}/bias", "vector", (f"{diff}.bias",), "vector", f"{orig}.bias"))
    return rows


def _norm(jax: str, diff: str, orig: str, norm_type: str) -> list[Row]:
    names = [("weight", "weight"), ("bias", "bias")]
    if norm_type == "batch_norm":
        names += [("mean", "running_mean"), ("var", "running_var")]
    return [Row(f"{jax}/{j}", "vector", (f"{diff}.{t}",), "vector", f"{orig}.{t}") for j, t in names]


def _res_block(jax: str, diff: str, orig: str, norm_type: str) -> list[Row]:
    return (_conv(f"{jax}/conv1", f"{diff}.conv1", f"{orig}.main.conv1.conv")
            + _conv(f"{jax}/conv2", f"{diff}.conv2", f"{orig}.main.conv2.conv", bias=False)
            + _norm(f"{jax}/norm", f"{diff}.norm", f"{orig}.main.conv2.norm", norm_type))


def _evit_block(jax: str, diff: str, orig: str, scales: tuple[int, ...], norm_type: str) -> list[Row]:
    attn, ctx = f"{diff}.attn", f"{orig}.context_module.main"
    rows = [Row(f"{jax}/attn/qkv/kernel", "qkv3", tuple(f"{attn}.to_{x}.weight" for x in "qkv"),
                "conv1x1", f"{ctx}.qkv.conv.weight")]
    for s in range(len(scales)):
        rows += _conv(f"{jax}/attn/to_qkv_multiscale_{s}/proj_in", f"{attn}.to_qkv_multiscale.{s}.proj_in",
                      f"{ctx}.aggreg.{s}.0", bias=False)
        rows += _conv(f"{jax}/attn/to_qkv_multiscale_{s}/proj_out", f"{attn}.to_qkv_multiscale.{s}.proj_out",
                      f"{ctx}.aggreg.{s}.1", bias=False)
    rows.append(Row(f"{jax}/attn/to_out/kernel", "linear", (f"{attn}.to_out.weight",), "conv1x1",
                    f"{ctx}.proj.conv.weight"))
    rows += _norm(f"{jax}/attn/norm_out", f"{attn}.norm_out", f"{ctx}.proj.norm", norm_type)
    glu, loc = f"{diff}.conv_out", f"{orig}.local_module.main"
    rows += _conv(f"{jax}/conv_out/conv_inverted", f"{glu}.conv_inverted", f"{loc}.inverted_conv.conv")
    rows += _conv(f"{jax}/conv_out/conv_depth", f"{glu}.conv_depth", f"{loc}.depth_conv.conv")
    rows += _conv(f"{jax}/conv_out/conv_point", f"{glu}.conv_point", f"{loc}.point_conv.conv", bias=False)
    rows += _norm(f"{jax}/conv_out/norm", f"{glu}.norm", f"{loc}.point_conv.norm", "rms_norm")
    return rows


def _block(kind: str, jax: str, diff: str, orig: str, scales: tuple[int, ...], norm_type: str) -> list[Row]:
    if kind == "ResBlock":
        return _res_block(jax, diff, orig, norm_type)
    return _evit_block(jax, diff, orig, scales, norm_type)


def _encoder_rows(cfg: DCAEConfig) -> list[Row]:
    layers, n = cfg.encoder_layers_per_block, len(cfg.encoder_block_out_channels)
    # The original's pixel-unshuffle down-sampler wraps its ConvLayer once more (`.conv.conv`).
    down = ".conv" if cfg.downsample_block_type == "pixel_unshuffle" else ""
    if layers[0] > 0:
        rows = _conv("encoder/conv_in", "encoder.conv_in", "encoder.project_in.conv")
    else:
        rows = _conv("encoder/conv_in/conv", "encoder.conv_in.conv", f"encoder.project_in.conv{down}")
    for i in range(n):
        for j in range(layers[i]):
            rows += _block(cfg.encoder_block_types[i], f"encoder/down_blocks_{i}/block_{j}",
                           f"encoder.down_blocks.{i}.{j}", f"encoder.stages.{i}.op_list.{j}",
                           cfg.encoder_qkv_multiscales[i], "rms_norm")
        if i < n - 1 and layers[i] > 0:  # diffusers: Sequential index after the blocks; original: ResidualBlock
            rows += _conv(f"encoder/down_blocks_{i}/downsample/conv", f"encoder.down_blocks.{i}.{layers[i]}.conv",
                          f"encoder.stages.{i}.op_list.{layers[i]}.main.conv{down}")
    main = "main." if cfg.encoder_out_shortcut else ""  # the shortcut makes the original wrap a ResidualBlock
    return rows + _conv("encoder/conv_out", "encoder.conv_out", f"encoder.project_out.{main}op_list.0.conv")


def _decoder_rows(cfg: DCAEConfig) -> list[Row]:
    layers, n = cfg.decoder_layers_per_block, len(cfg.decoder_block_out_channels)
    main = "main." if cfg.decoder_in_shortcut else ""
    rows = _conv("decoder/conv_in", "decoder.conv_in", f"decoder.project_in.{main}conv")
    for i in range(n):
        up = int(i < n - 1 and layers[i] > 0)  # the up-sampler is a stage's first module in both layouts
        if up:
            rows += _conv(f"decoder/up_blocks_{i}/upsample/conv", f"decoder.up_blocks.{i}.0.conv",
                          f"decoder.stages.{i}.op_list.0.main.conv.conv")
        for j in range(layers[i]):
            rows += _block(cfg.decoder_block_types[i], f"decoder/up_blocks_{i}/block_{j}",
                           f"decoder.up_blocks.{i}.{j + up}", f"decoder.stages.{i}.op_list.{j + up}",
                           cfg.decoder_qkv_multiscales[i], cfg.decoder_norm_types[i])
    # The original's project_out is OpSequential([norm, act, conv]); the act has no parameters.
    rows += _norm("decoder/norm_out", "decoder.norm_out", "decoder.project_out.op_list.0", "rms_norm")
    if layers[0] > 0:
        return rows + _conv("decoder/conv_out", "decoder.conv_out", "decoder.project_out.op_list.2.conv")
    return rows + _conv("decoder/conv_out/conv", "decoder.conv_out.conv", "decoder.project_out.op_list.2.conv.conv")


@functools.lru_cache(maxsize=32)
def _layout(cfg: DCAEConfig) -> tuple[tuple[Row, ...], tuple[tuple[str, tuple[int, ...]], ...]]:
    rows = tuple(_encoder_rows(cfg) + _decoder_rows(cfg))
    shapes = {path: tuple(leaf.shape) for path, leaf in flatten(dcae.abstract_params(dcae.DCAE(cfg))).items()}
    covered = [row.jax for row in rows]
    if sorted(covered) != sorted(shapes):  # the model grew a parameter this table lacks: a bug here
        raise RuntimeError(f"sana_conversion.dcae table and sana_jax.dcae disagree for config {cfg.name!r}: "
                           f"{sorted(set(covered) ^ set(shapes))}")
    return rows, tuple(sorted(shapes.items()))


def layout(cfg: DCAEConfig) -> list[Row]:
    """Every parameter of DCAE(cfg), in module order, with its diffusers and original keys."""
    return list(_layout(cfg)[0])


def jax_shapes(cfg: DCAEConfig) -> dict[str, tuple[int, ...]]:
    """{'/'-joined JAX path: shape} of DCAE(cfg) (from jax.eval_shape)."""
    return dict(_layout(cfg)[1])


def _batch_counters(cfg: DCAEConfig, fmt: str) -> list[str]:
    """The BatchNorm `num_batches_tracked` keys of `cfg` in format `fmt` (present in torch state_dicts)."""
    keys = []
    for row in layout(cfg):
        if row.jax.endswith("/mean"):
            key = row.diffusers[0] if fmt == "diffusers" else row.original
            keys.append(key.removesuffix("running_mean") + "num_batches_tracked")
    return keys


def torch_shapes(cfg: DCAEConfig, fmt: str) -> dict[str, tuple[int, ...]]:
    """{key: torch shape} of `cfg` in `fmt` ("diffusers" or "original"), num_batches_tracked excluded."""
    shapes, out = jax_shapes(cfg), {}
    for row in layout(cfg):
        kind, keys = (row.diffusers_kind, row.diffusers) if fmt == "diffusers" else (row.original_kind, (row.original,))
        out.update(zip(keys, _torch_shapes(kind, shapes[row.jax])))
    return out


# ----------------------------------------------------------------------------------------------- converters

def _to_jax(state_dict: Mapping, cfg: DCAEConfig, fmt: str, source: str) -> dict:
    arrays = checked_fp32(state_dict, torch_shapes(cfg, fmt), source, ignored=_batch_counters(cfg, fmt))
    flat = {}
    for row in layout(cfg):
        kind, keys = (row.diffusers_kind, row.diffusers) if fmt == "diffusers" else (row.original_kind, (row.original,))
        flat[row.jax] = np.ascontiguousarray(TRANSFORMS[kind][1]([arrays[key] for key in keys]))
    return unflatten(flat)


def check_params(params: Mapping, cfg: DCAEConfig) -> dict[str, np.ndarray]:
    """Flatten JAX params and check they are exactly DCAE(cfg)'s tree; returns {path: fp32 ndarray}."""
    flat, expected = flatten(params), jax_shapes(cfg)
    source = f"DC-AE JAX params for config {cfg.name!r}"
    check_keys(flat, expected, source)
    return {path: as_fp32(path, flat[path], shape, source) for path, shape in expected.items()}


def _from_jax(params: Mapping, cfg: DCAEConfig, fmt: str) -> dict[str, np.ndarray]:
    flat, out = check_params(params, cfg), {}
    for row in layout(cfg):
        kind, keys = (row.diffusers_kind, row.diffusers) if fmt == "diffusers" else (row.original_kind, (row.original,))
        for key, value in zip(keys, TRANSFORMS[kind][0](flat[row.jax])):
            out[key] = np.ascontiguousarray(value)
    for key in _batch_counters(cfg, fmt):  # torch's BatchNorm2d.load_state_dict wants the counter (unused here)
        out[key] = np.zeros((), np.int64)
    return out


def diffusers_to_jax(state_dict: Mapping, cfg: DCAEConfig) -> dict:
    """AutoencoderDC state_dict {key: ndarray | torch.Tensor} -> sana_jax.dcae params (nested dict, fp32)."""
    return _to_jax(state_dict, cfg, "diffusers", f"AutoencoderDC state_dict for config {cfg.name!r}")


def jax_to_diffusers(params: Mapping, cfg: DCAEConfig) -> dict[str, np.ndarray]:
    """sana_jax.dcae params -> AutoencoderDC state_dict {key: contiguous fp32 ndarray}."""
    return _from_jax(params, cfg, "diffusers")


def original_to_jax(state_dict: Mapping, cfg: DCAEConfig) -> dict:
    """Original mit-han-lab DCAE state_dict -> sana_jax.dcae params (nested dict, fp32)."""
    return _to_jax(state_dict, cfg, "original", f"original DC-AE state_dict for config {cfg.name!r}")


def jax_to_original(params: Mapping, cfg: DCAEConfig) -> dict[str, np.ndarray]:
    """sana_jax.dcae params -> original mit-han-lab DCAE state_dict {key: contiguous fp32 ndarray}."""
    return _from_jax(params, cfg, "original")


# ---------------------------------------------------------------------------------------------- config.json

# AutoencoderDC.__init__ defaults (diffusers 0.42.1); a config.json may omit any of them.
_DIFFUSERS_DEFAULTS = {
    "in_channels": 3, "latent_channels": 32, "attention_head_dim": 32, "encoder_block_types": "ResBlock",
    "decoder_block_types": "ResBlock", "encoder_block_out_channels": (128, 256, 512, 512, 1024, 1024),
    "decoder_block_out_channels": (128, 256, 512, 512, 1024, 1024), "encoder_layers_per_block": (2, 2, 2, 3, 3, 3),
    "decoder_layers_per_block": (3, 3, 3, 3, 3, 3), "encoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)),
    "decoder_qkv_multiscales": ((), (), (), (5,), (5,), (5,)), "upsample_block_type": "pixel_shuffle",
    "downsample_block_type": "pixel_unshuffle", "decoder_norm_types": "rms_norm", "decoder_act_fns": "silu",
    "encoder_out_shortcut": True, "decoder_in_shortcut": True, "decoder_conv_act_fn": "relu", "scaling_factor": 1.0,
}
# diffusers tests `downsample_block_type == "pixel_unshuffle"`, else a strided conv; releases write "Conv".
_DOWNSAMPLE = {"pixel_unshuffle": "pixel_unshuffle", "Conv": "conv", "conv": "conv"}


def diffusers_config(cfg: DCAEConfig) -> dict:
    """The config.json of the AutoencoderDC equal to `cfg`."""
    return {
        "_class_name": CLASS_NAME,
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "attention_head_dim": cfg.attention_head_dim,
        "encoder_block_types": list(cfg.encoder_block_types),
        "decoder_block_types": list(cfg.decoder_block_types),
        "encoder_block_out_channels": list(cfg.encoder_block_out_channels),
        "decoder_block_out_channels": list(cfg.decoder_block_out_channels),
        "encoder_layers_per_block": list(cfg.encoder_layers_per_block),
        "decoder_layers_per_block": list(cfg.decoder_layers_per_block),
        "encoder_qkv_multiscales": [list(s) for s in cfg.encoder_qkv_multiscales],
        "decoder_qkv_multiscales": [list(s) for s in cfg.decoder_qkv_multiscales],
        "upsample_block_type": cfg.upsample_block_type,
        "downsample_block_type": "Conv" if cfg.downsample_block_type == "conv" else "pixel_unshuffle",
        "decoder_norm_types": list(cfg.decoder_norm_types),
        "decoder_act_fns": list(cfg.decoder_act_fns),
        "encoder_out_shortcut": cfg.encoder_out_shortcut,
        "decoder_in_shortcut": cfg.decoder_in_shortcut,
        "decoder_conv_act_fn": cfg.decoder_conv_act_fn,
        "scaling_factor": cfg.scaling_factor,
    }


def config_from_diffusers(config_json: Mapping, name: str = "diffusers", **overrides) -> DCAEConfig:
    """DCAEConfig of an AutoencoderDC config.json; `overrides` replace fields (e.g. compute_dtype="bfloat16").

    A single string for a per-stage field means every stage (as diffusers reads it). Values diffusers would
    accept but silently treat otherwise (a down-sampler other than pixel_unshuffle / Conv, an up-sampler other
    than pixel_shuffle / interpolate) and "layer_norm" (not meaningful on NCHW maps there) are refused.
    """
    from sana_conversion.diffusers import config_fields

    c = config_fields(config_json, CLASS_NAME, _DIFFUSERS_DEFAULTS)
    n_enc, n_dec = len(c["encoder_block_out_channels"]), len(c["decoder_block_out_channels"])

    def per_stage(key, n):
        value = c[key]
        return (value,) * n if isinstance(value, str) else tuple(value)

    if c["downsample_block_type"] not in _DOWNSAMPLE:
        raise ValueError(f"config.json downsample_block_type={c['downsample_block_type']!r}; expected one of "
                         f"{sorted(_DOWNSAMPLE)}")
    fields = dict(
        name=name, in_channels=c["in_channels"], latent_channels=c["latent_channels"],
        attention_head_dim=c["attention_head_dim"],
        encoder_block_types=per_stage("encoder_block_types", n_enc),
        decoder_block_types=per_stage("decoder_block_types", n_dec),
        encoder_block_out_channels=tuple(c["encoder_block_out_channels"]),
        decoder_block_out_channels=tuple(c["decoder_block_out_channels"]),
        encoder_layers_per_block=tuple(c["encoder_layers_per_block"]),
        decoder_layers_per_block=tuple(c["decoder_layers_per_block"]),
        encoder_qkv_multiscales=tuple(tuple(s) for s in c["encoder_qkv_multiscales"]),
        decoder_qkv_multiscales=tuple(tuple(s) for s in c["decoder_qkv_multiscales"]),
        upsample_block_type=c["upsample_block_type"], downsample_block_type=_DOWNSAMPLE[c["downsample_block_type"]],
        decoder_norm_types=per_stage("decoder_norm_types", n_dec), decoder_act_fns=per_stage("decoder_act_fns", n_dec),
        encoder_out_shortcut=bool(c["encoder_out_shortcut"]), decoder_in_shortcut=bool(c["decoder_in_shortcut"]),
        decoder_conv_act_fn=c["decoder_conv_act_fn"], scaling_factor=float(c["scaling_factor"]),
    )
    known = {f.name for f in dataclasses.fields(DCAEConfig)}
    if set(overrides) - known:
        raise ValueError(f"unknown DCAEConfig fields in overrides: {sorted(set(overrides) - known)}")
    try:
        return DCAEConfig(**{**fields, **overrides})
    except ValueError as err:
        raise ValueError(f"config.json describes no valid DC-AE: {err}") from err


def infer_original_config(shapes: Mapping[str, tuple[int, ...]], model_name: str | None = None) -> DCAEConfig:
    """The released config of an original state_dict: by `model_name` (DCAE_HF's config.json) if given, else the
    first released variant whose keys and shapes match exactly. 1.0 and 1.1 share one architecture, so weights
    of either without a model_name get the config named dc-ae-f32c32-sana-1.0 (the name is all that differs)."""
    if model_name is not None:
        if model_name not in RELEASED:
            raise ValueError(f"model_name {model_name!r} is not a released SANA DC-AE this converter knows "
                             f"({sorted(RELEASED)}); pass config=DCAEConfig(...)")
        return RELEASED[model_name]
    for cfg in RELEASED.values():
        expected = torch_shapes(cfg, "original")
        present = {key: tuple(shape) for key, shape in shapes.items() if not key.endswith("num_batches_tracked")}
        if present == expected:
            return cfg
    raise ValueError(f"these original DC-AE weights match no released config ({sorted(RELEASED)}) by keys and "
                     f"shapes; pass config=DCAEConfig(...) (sana_jax.dcae) describing the architecture")


# ------------------------------------------------------------------------------------------------ files

def find_diffusers_folder(path: str) -> str | None:
    """The folder holding an AutoencoderDC config.json: `path` itself or its `vae/` (a pipeline folder)."""
    for folder in (path, os.path.join(path, "vae")):
        config_path = os.path.join(folder, CONFIG_NAME)
        if os.path.isfile(config_path):
            if _read_json(config_path).get("_class_name") == CLASS_NAME:
                return folder
    return None


def _read_json(path: str) -> dict:
    with open(path) as f:
        try:
            value = json.load(f)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


def read_diffusers(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(config.json, state_dict) of an AutoencoderDC folder or of a pipeline folder's vae/."""
    # The transformer's reader serves any diffusers model folder (single file, sharded index or torch .bin).
    from sana_conversion.diffusers import read_model_weights

    folder = find_diffusers_folder(path)
    if folder is None:
        raise ValueError(f"{path}: no {CONFIG_NAME} with _class_name {CLASS_NAME!r} here or in vae/")
    return _read_json(os.path.join(folder, CONFIG_NAME)), read_model_weights(folder)


def read_weights_file(path: str) -> dict[str, np.ndarray]:
    """A state_dict from .safetensors or a torch file ({"state_dict": ...} as efficientvit saves, or bare)."""
    if path.endswith(".safetensors"):
        state_dict, _ = read_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        state_dict = tensors_to_numpy(read_torch(path))
        if isinstance(state_dict, Mapping) and isinstance(state_dict.get("state_dict"), Mapping):
            state_dict = state_dict["state_dict"]
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(state_dict).__name__}")
    else:
        raise ValueError(f"{path}: unknown weights suffix; expected .safetensors or one of {TORCH_SUFFIXES}")
    not_arrays = sorted(str(k) for k, v in state_dict.items() if not isinstance(v, np.ndarray))
    if not_arrays:
        raise ValueError(f"{path}: entries that are not tensors: {not_arrays[:12]}")
    return dict(state_dict)


def _layout_of(keys) -> str | None:
    if any(k.startswith(("encoder.project_in.", "decoder.project_in.", "encoder.stages.")) for k in keys):
        return "original"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "encoder.down_blocks.")) for k in keys):
        return "diffusers"
    return None


def load_pretrained(path, config: DCAEConfig | None = None):
    """(sana_jax.dcae.DCAE(cfg), params) from any DC-AE checkpoint; the format is detected:

    - diffusers folder: config.json with `_class_name: AutoencoderDC` (or a pipeline folder's vae/), weights in
      diffusion_pytorch_model.safetensors (single or sharded) or .bin; the config comes from config.json.
    - original folder (efficientvit DCAE_HF): model.safetensors (+ config.json {"model_name": ...}).
    - a weights file (.safetensors / .pt / .pth / .bin) with original keys; or with diffusers keys, given config=.
    Without a model_name the original config is recognised from key shapes among the released variants.
    `config` replaces the stored / recognised config; its shapes are checked against the weights.
    """
    path = os.fspath(path)
    try:
        if os.path.isdir(path) and find_diffusers_folder(path) is not None:
            config_json, state_dict = read_diffusers(path)
            cfg = config if config is not None else config_from_diffusers(config_json)
            params = diffusers_to_jax(state_dict, cfg)
        elif os.path.isdir(path) and os.path.isfile(os.path.join(path, ORIGINAL_WEIGHTS_NAME)):
            state_dict = read_weights_file(os.path.join(path, ORIGINAL_WEIGHTS_NAME))
            config_path = os.path.join(path, CONFIG_NAME)
            model_name = _read_json(config_path).get("model_name") if os.path.isfile(config_path) else None
            cfg = config if config is not None else infer_original_config(
                {k: v.shape for k, v in state_dict.items()}, model_name)
            params = original_to_jax(state_dict, cfg)
        elif os.path.isdir(path):
            raise ValueError(f"not a DC-AE folder this loader knows: no {CONFIG_NAME} of an {CLASS_NAME} here or in "
                             f"vae/ (diffusers), and no {ORIGINAL_WEIGHTS_NAME} (original)")
        elif os.path.isfile(path):
            state_dict = read_weights_file(path)
            kind = _layout_of(state_dict)
            if kind == "original":
                cfg = config if config is not None else infer_original_config(
                    {k: v.shape for k, v in state_dict.items()})
                params = original_to_jax(state_dict, cfg)
            elif kind == "diffusers":
                if config is None:
                    raise ValueError("this file has AutoencoderDC (diffusers) key names but no config.json beside "
                                     "it: load its folder, or pass config=DCAEConfig(...)")
                cfg = config
                params = diffusers_to_jax(state_dict, cfg)
            else:
                raise ValueError(f"no DC-AE keys here (expected encoder.project_in.* or encoder.conv_in.*; keys: "
                                 f"{sorted(state_dict)[:6]} ...)")
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    except ValueError as err:
        raise ValueError(err.args[0] if str(err).startswith(path) else f"{path}: {err}") from err
    return dcae.DCAE(cfg), params


def _write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
    """As _files.write_safetensors, keeping 0-d tensors 0-d (np.ascontiguousarray makes them 1-d, and torch's
    strict loading then rejects BatchNorm's `num_batches_tracked`, a 0-d tensor)."""
    with open(path, "wb"):  # created with the usual (umask) mode; safetensors would make it 0o600
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    save_file({key: value if value.ndim == 0 else np.ascontiguousarray(value) for key, value in tensors.items()},
              path, metadata={"format": "pt"})
    os.chmod(path, mode)


def export_diffusers(cfg: DCAEConfig, params: Mapping, out_dir: str, overwrite: bool = False) -> None:
    """Write a folder that `diffusers.AutoencoderDC.from_pretrained(out_dir)` loads: config.json and
    diffusion_pytorch_model.safetensors (fp32). Converted and checked first, then written atomically; an
    existing non-empty `out_dir` is only replaced with `overwrite=True`."""
    config = diffusers_config(cfg)
    state_dict = jax_to_diffusers(params, cfg)
    with atomic_dir(os.fspath(out_dir), overwrite) as tmp:
        write_json(os.path.join(tmp, CONFIG_NAME), config)
        _write_safetensors(os.path.join(tmp, WEIGHTS_NAME), state_dict)


def export_original(cfg: DCAEConfig, params: Mapping, out_path: str, overwrite: bool = False) -> None:
    """Write params with the original mit-han-lab key names: `.safetensors` (flat), or `.pth` / `.pt` as
    torch.save({"state_dict": ...}) (what efficientvit's DCAE.load_model reads). Atomic, like export_diffusers."""
    out_path = os.fspath(out_path)
    if not out_path.endswith((".safetensors", ".pth", ".pt")):
        raise ValueError(f"{out_path}: unknown suffix; use .safetensors, .pth or .pt")
    state_dict = jax_to_original(params, cfg)
    with atomic_file(out_path, overwrite) as tmp:
        if out_path.endswith(".safetensors"):
            _write_safetensors(tmp, state_dict)
        else:
            import torch

            torch.save({"state_dict": {key: torch.from_numpy(value) for key, value in state_dict.items()}}, tmp)
