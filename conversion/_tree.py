"""The JAX parameter tree as flat '/'-joined paths, its expected shapes for a config, and array coercion.

Shared by every format: a checkpoint is compared against `jax_shapes(cfg)`, which comes from
`sana_jax.abstract_params` (an `eval_shape`, so it costs nothing even for the 4.8B model).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np

import sana_jax
from sana_jax.configs import SanaConfig

# Weight dtypes we accept and upcast to fp32 without loss. fp64 would lose bits and integer tensors are not
# weights, so both are rejected rather than silently cast.
_LOSSLESS_TO_FP32 = ("float32", "float16", "bfloat16")


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": x}} -> {"a/b": x}."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten(flat: Mapping[str, Any]) -> dict:
    """{"a/b": x} -> {"a": {"b": x}} (the plain nested dict SanaTransformer.apply takes)."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


@functools.lru_cache(maxsize=64)
def _jax_shapes(cfg: SanaConfig) -> tuple[tuple[str, tuple[int, ...]], ...]:
    abstract = sana_jax.abstract_params(sana_jax.SanaTransformer(cfg))
    return tuple((path, tuple(leaf.shape)) for path, leaf in sorted(flatten(abstract).items()))


def jax_shapes(cfg: SanaConfig) -> dict[str, tuple[int, ...]]:
    """{"blocks/attn/qkv/kernel": (depth, D, 3D), ...}: every parameter SanaTransformer(cfg) creates."""
    return dict(_jax_shapes(cfg))


def to_numpy(value) -> np.ndarray:
    """np.ndarray view/copy of a numpy, JAX or torch array (torch is never imported here).

    torch bfloat16 has no numpy dtype; it is upcast to fp32, which is exact.
    """
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def as_fp32(name: str, value, expected: tuple[int, ...], source: str) -> np.ndarray:
    """Check one tensor's shape and dtype and return it as fp32 (fp16/bf16 upcast exactly, fp32 unchanged)."""
    array = to_numpy(value)
    if tuple(array.shape) != tuple(expected):
        raise ValueError(f"{source} {name!r}: expected shape {tuple(expected)}, got {tuple(array.shape)}")
    if array.dtype.name not in _LOSSLESS_TO_FP32:
        raise ValueError(f"{source} {name!r}: dtype {array.dtype.name} is not a weight dtype this converter "
                         f"upcasts exactly (accepted: {', '.join(_LOSSLESS_TO_FP32)})")
    return array.astype(np.float32, copy=False)


def check_keys(present, expected, source: str, ignored=()) -> None:
    """Raise one ValueError listing every missing and unexpected key (`ignored` may be present or not)."""
    present, expected = set(present), set(expected)
    missing = sorted(expected - present)
    unexpected = sorted(present - expected - set(ignored))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s): {_preview(unexpected)}")
        raise ValueError(f"{source}: " + "; ".join(parts))


def checked_fp32(state_dict: Mapping, expected: Mapping[str, tuple[int, ...]], source: str,
                 ignored=()) -> dict[str, np.ndarray]:
    """{key: fp32 ndarray} for exactly the `expected` keys, after checking the key sets (`ignored` may be present)
    and every shape and dtype; one ValueError lists every problem, each naming its key and both shapes."""
    check_keys(state_dict, expected, source, ignored)
    errors, arrays = [], {}
    for key, shape in expected.items():
        try:
            arrays[key] = as_fp32(key, state_dict[key], shape, source)
        except ValueError as err:
            errors.append(str(err))
    if errors:
        raise ValueError("\n".join(errors))
    return arrays


def _preview(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_params(params: Mapping, cfg: SanaConfig) -> dict[str, np.ndarray]:
    """Flatten a JAX param tree and check it is exactly the tree of `cfg`; returns {path: fp32 ndarray}."""
    flat = flatten(params)
    expected = jax_shapes(cfg)
    source = f"JAX params for config {cfg.name!r}"
    check_keys(flat, expected, source)
    return {path: as_fp32(path, flat[path], shape, source) for path, shape in expected.items()}
