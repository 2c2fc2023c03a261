"""Official NVlabs SANA state_dict <-> sana_jax params: one table, three named transforms, strict checks.

The official layout (sana-original.md section 2) is what `SanaMS.state_dict()` saves: torch Linear weights
[out, in], convolutions OIHW, one set of keys per block `blocks.{i}.*`. The JAX tree has Flax kernels [in, out],
HWIO convolutions and blocks stacked on a leading `layers` axis (nn.scan). Everything else is a rename.

Strictness (nanoGPT's `from_pretrained`): every expected key present, every present key used exactly once,
every shape equal to the one `cfg` implies; the only keys allowed to be present and ignored are the buffers
`pos_embed` and `y_embedder.y_embedding`, which the forward never reads. Errors are ValueErrors naming the
key and both shapes, or listing every missing and unexpected key.

Dtypes: the JAX params are fp32 master weights. fp16 and bf16 checkpoints (some releases) are upcast to fp32,
which is exact; exporting writes fp32. An fp32 round trip official -> JAX -> official is bit-exact (same keys
minus the two buffers, same bytes).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from sana_conversion._files import (TORCH_SUFFIXES, atomic_file, read_safetensors, read_torch, tensors_to_numpy,
                                    write_safetensors)
from sana_conversion._tree import check_params, checked_fp32, jax_shapes, unflatten
from sana_jax.configs import SanaConfig

# Buffers of SanaMS that a checkpoint may carry and the forward never reads: `pos_embed` is recomputed for each
# grid, `y_embedding` is the train-time null caption (loaders overwrite it with the Gemma encoding of "").
IGNORED_BUFFERS = ("pos_embed", "y_embedder.y_embedding")
# Wrappers seen on official checkpoints: DDP (`module.`) and single-file / ComfyUI saves.
_PREFIXES = ("module.", "model.diffusion_model.")


# Named transforms, each a pair (official tensor -> JAX leaf, JAX leaf -> official tensor) for one block.
def _identity(a):
    return a


def _linear(w):
    return w.T  # torch Linear [out, in] <-> Flax kernel [in, out]; its own inverse


def _conv_to_jax(w):
    return w.transpose(2, 3, 1, 0)  # OIHW -> HWIO


def _conv_to_official(k):
    return k.transpose(3, 2, 0, 1)  # HWIO -> OIHW


TRANSFORMS = {
    "identity": (_identity, _identity),
    "linear": (_linear, _linear),
    "conv": (_conv_to_jax, _conv_to_official),
}

# Official key ("{i}" = block index) -> (JAX path, transform). Per-block keys map to one stacked JAX leaf.
# Rows whose JAX path the config does not create (q/k norms, Sprint's cfg_embedder and logvar head) are not
# expected for that config, so one table serves every variant.
TABLE: dict[str, tuple[str, str]] = {
    "x_embedder.proj.weight": ("x_embedder/kernel", "conv"),
    "x_embedder.proj.bias": ("x_embedder/bias", "identity"),
    "t_embedder.mlp.0.weight": ("t_embedder/mlp_0/kernel", "linear"),
    "t_embedder.mlp.0.bias": ("t_embedder/mlp_0/bias", "identity"),
    "t_embedder.mlp.2.weight": ("t_embedder/mlp_2/kernel", "linear"),
    "t_embedder.mlp.2.bias": ("t_embedder/mlp_2/bias", "identity"),
    "cfg_embedder.mlp.0.weight": ("cfg_embedder/mlp_0/kernel", "linear"),
    "cfg_embedder.mlp.0.bias": ("cfg_embedder/mlp_0/bias", "identity"),
    "cfg_embedder.mlp.2.weight": ("cfg_embedder/mlp_2/kernel", "linear"),
    "cfg_embedder.mlp.2.bias": ("cfg_embedder/mlp_2/bias", "identity"),
    "t_block.1.weight": ("t_block/kernel", "linear"),
    "t_block.1.bias": ("t_block/bias", "identity"),
    "y_embedder.y_proj.fc1.weight": ("y_embedder/fc1/kernel", "linear"),
    "y_embedder.y_proj.fc1.bias": ("y_embedder/fc1/bias", "identity"),
    "y_embedder.y_proj.fc2.weight": ("y_embedder/fc2/kernel", "linear"),
    "y_embedder.y_proj.fc2.bias": ("y_embedder/fc2/bias", "identity"),
    "attention_y_norm.weight": ("attention_y_norm/weight", "identity"),
    "blocks.{i}.scale_shift_table": ("blocks/scale_shift_table", "identity"),
    "blocks.{i}.attn.qkv.weight": ("blocks/attn/qkv/kernel", "linear"),
    "blocks.{i}.attn.q_norm.weight": ("blocks/attn/q_norm/weight", "identity"),
    "blocks.{i}.attn.k_norm.weight": ("blocks/attn/k_norm/weight", "identity"),
    "blocks.{i}.attn.proj.weight": ("blocks/attn/proj/kernel", "linear"),
    "blocks.{i}.attn.proj.bias": ("blocks/attn/proj/bias", "identity"),
    "blocks.{i}.cross_attn.q_linear.weight": ("blocks/cross_attn/q_linear/kernel", "linear"),
    "blocks.{i}.cross_attn.q_linear.bias": ("blocks/cross_attn/q_linear/bias", "identity"),
    "blocks.{i}.cross_attn.kv_linear.weight": ("blocks/cross_attn/kv_linear/kernel", "linear"),
    "blocks.{i}.cross_attn.kv_linear.bias": ("blocks/cross_attn/kv_linear/bias", "identity"),
    "blocks.{i}.cross_attn.q_norm.weight": ("blocks/cross_attn/q_norm/weight", "identity"),
    "blocks.{i}.cross_attn.k_norm.weight": ("blocks/cross_attn/k_norm/weight", "identity"),
    "blocks.{i}.cross_attn.proj.weight": ("blocks/cross_attn/proj/kernel", "linear"),
    "blocks.{i}.cross_attn.proj.bias": ("blocks/cross_attn/proj/bias", "identity"),
    "blocks.{i}.mlp.inverted_conv.conv.weight": ("blocks/mlp/inverted_conv/kernel", "conv"),
    "blocks.{i}.mlp.inverted_conv.conv.bias": ("blocks/mlp/inverted_conv/bias", "identity"),
    "blocks.{i}.mlp.depth_conv.conv.weight": ("blocks/mlp/depth_conv/kernel", "conv"),
    "blocks.{i}.mlp.depth_conv.conv.bias": ("blocks/mlp/depth_conv/bias", "identity"),
    "blocks.{i}.mlp.point_conv.conv.weight": ("blocks/mlp/point_conv/kernel", "conv"),
    "final_layer.scale_shift_table": ("final_layer/scale_shift_table", "identity"),
    "final_layer.linear.weight": ("final_layer/linear/kernel", "linear"),
    "final_layer.linear.bias": ("final_layer/linear/bias", "identity"),
    "logvar_linear.weight": ("logvar_linear/kernel", "linear"),
    "logvar_linear.bias": ("logvar_linear/bias", "identity"),
}


def _rules(cfg: SanaConfig) -> list[tuple[str, str, str]]:
    """(official key pattern, JAX path, transform) for every parameter of `cfg`, in table order."""
    shapes = jax_shapes(cfg)
    rules = [(pattern, path, transform) for pattern, (path, transform) in TABLE.items() if path in shapes]
    uncovered = sorted(set(shapes) - {path for _, path, _ in rules})
    if uncovered:  # the model grew a parameter this table does not know: a bug here, not in the checkpoint
        raise RuntimeError(f"sana_conversion.official.TABLE has no row for JAX params {uncovered}")
    return rules


def _expand(pattern: str, depth: int) -> list[str]:
    return [pattern.format(i=i) for i in range(depth)] if "{i}" in pattern else [pattern]


def official_views(flat_params: Mapping[str, np.ndarray], cfg: SanaConfig) -> dict[str, np.ndarray]:
    """{official key: view} of flat, already-checked JAX leaves (transposes and block slices, no copies).

    Also the shape-only path: fed zero-stride stand-ins (`np.broadcast_to`) it costs no memory.
    """
    out: dict[str, np.ndarray] = {}
    for pattern, path, transform in _rules(cfg):
        to_official = TRANSFORMS[transform][1]
        leaf = flat_params[path]
        for i, key in enumerate(_expand(pattern, cfg.depth)):
            if key in out:
                raise RuntimeError(f"official key {key!r} produced twice")
            out[key] = to_official(leaf[i] if "{i}" in pattern else leaf)
    return out


def official_shapes(cfg: SanaConfig) -> dict[str, tuple[int, ...]]:
    """{official key: shape} that `cfg` implies (without the two ignorable buffers)."""
    stand_ins = {path: np.broadcast_to(np.float32(0), shape) for path, shape in jax_shapes(cfg).items()}
    return {key: tuple(view.shape) for key, view in official_views(stand_ins, cfg).items()}


def unwrap_state_dict(checkpoint: Mapping, ema: bool = False) -> dict:
    """The model state_dict inside a training checkpoint, without DDP / single-file key prefixes.

    `{"state_dict": ..., "state_dict_ema": ...}` wrappers (NVlabs `save_checkpoint_ddp`) are opened; `ema=True`
    picks `state_dict_ema` and fails if there is none. A flat state_dict is returned as is.
    """
    wanted = "state_dict_ema" if ema else "state_dict"
    if isinstance(checkpoint.get(wanted), Mapping):
        state_dict = dict(checkpoint[wanted])
    elif ema:
        raise ValueError(f"ema=True but the checkpoint has no 'state_dict_ema' "
                         f"(top-level keys: {sorted(map(str, checkpoint))[:12]})")
    else:
        state_dict = dict(checkpoint)
    stripped = True
    while stripped and state_dict:
        stripped = False
        for prefix in _PREFIXES:
            if all(isinstance(key, str) and key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return state_dict


def official_to_jax(state_dict: Mapping, cfg: SanaConfig, ema: bool = False) -> dict:
    """Official SANA state_dict -> sana_jax params (nested dict of fp32 numpy arrays).

    Args:
      state_dict: {key: np.ndarray | torch.Tensor}, or a training checkpoint wrapping it (see unwrap_state_dict).
        fp16/bf16 tensors are upcast to fp32 (exact).
      cfg: the config whose parameter tree to produce; every shape is checked against it.
      ema: take `state_dict_ema` from a wrapped training checkpoint.
    Returns:
      {"x_embedder": {"kernel": [p, p, C_in, D], ...}, "blocks": {... [depth, ...]}, ...}
    """
    state_dict = unwrap_state_dict(state_dict, ema)
    expected = official_shapes(cfg)
    source = f"official state_dict for config {cfg.name!r}"
    arrays = checked_fp32(state_dict, expected, source, ignored=IGNORED_BUFFERS)

    flat = {}
    for pattern, path, transform in _rules(cfg):
        to_jax = TRANSFORMS[transform][0]
        if "{i}" in pattern:
            flat[path] = np.stack([to_jax(arrays[key]) for key in _expand(pattern, cfg.depth)])
        else:
            flat[path] = np.ascontiguousarray(to_jax(arrays[pattern]))
    return unflatten(flat)


def jax_to_official(params: Mapping, cfg: SanaConfig) -> dict[str, np.ndarray]:
    """sana_jax params -> official state_dict {key: contiguous fp32 ndarray} (no pos_embed / y_embedding)."""
    flat = check_params(params, cfg)
    return {key: np.ascontiguousarray(view) for key, view in official_views(flat, cfg).items()}


def read_official(path: str, ema: bool = False) -> dict[str, np.ndarray]:
    """The state_dict of an official `.pth` (torch, weights_only) or `.safetensors` file, as numpy arrays.

    Wrappers and prefixes are removed as in unwrap_state_dict. Stored dtypes are kept except bf16, which numpy
    lacks and which is upcast to fp32 (exact). Unsafe pickles and truncated files raise ValueError naming `path`.
    """
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        checkpoint, _ = read_safetensors(path)
    elif path.endswith(TORCH_SUFFIXES):
        checkpoint = tensors_to_numpy(read_torch(path))
        if not isinstance(checkpoint, Mapping):
            raise ValueError(f"{path}: expected a state_dict (a dict of tensors), got {type(checkpoint).__name__}")
    else:
        raise ValueError(f"{path}: unknown checkpoint suffix; expected .safetensors or one of {TORCH_SUFFIXES}")
    state_dict = unwrap_state_dict(checkpoint, ema)
    not_arrays = sorted(str(key) for key, value in state_dict.items() if not isinstance(value, np.ndarray))
    if not_arrays:
        raise ValueError(f"{path}: state_dict entries that are not tensors: {not_arrays[:12]}")
    return state_dict


def export_official(cfg: SanaConfig, params: Mapping, out_path: str, overwrite: bool = False) -> None:
    """Write params with official key names: `.safetensors`, or `.pth`/`.pt` as torch.save({"state_dict": ...}).

    The state_dict is built and checked before anything is written; the file appears atomically and an existing
    file is only replaced with `overwrite=True`.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith((".safetensors", ".pth", ".pt")):
        raise ValueError(f"{out_path}: unknown suffix; use .safetensors, .pth or .pt")
    state_dict = jax_to_official(params, cfg)
    with atomic_file(out_path, overwrite) as tmp:
        if out_path.endswith(".safetensors"):
            write_safetensors(tmp, state_dict, {"format": "pt"})
        else:
            import torch

            torch.save({"state_dict": {key: torch.from_numpy(value) for key, value in state_dict.items()}}, tmp)
