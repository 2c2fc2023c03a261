"""Hugging Face Gemma-2 folders / state_dicts <-> `sana_jax.text.Gemma2` params.

One table maps each JAX parameter to its Hugging Face key; Linear weights are transposed ([out, in] -> [in, out])
and the per-layer tensors `layers.{i}.*` are stacked on a leading axis (the `nn.scan` layout). Conversion is
strict: every key of the file is used (the two exceptions below), every expected key is present, every shape is
checked, and errors name the key and both shapes. Round trips are bit-exact.

Accepted layouts: `Gemma2Model` (`embed_tokens.weight`, `layers.0...`) and `Gemma2ForCausalLM` (the same under
`model.`, plus `lm_head.weight`). The LM head maps hidden states to logits, so it cannot change the last hidden
state; it is tied to `embed_tokens` in every Gemma-2 release and usually not even saved. When present its shape is
checked and it is dropped. Nothing else is ignored.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping

import numpy as np

from sana_conversion._files import atomic_dir, read_safetensors, write_json, write_safetensors
from sana_conversion._tree import as_fp32, checked_fp32, flatten, unflatten
from sana_jax import text

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"
PREFIX = "model."  # Gemma2ForCausalLM holds the decoder as `model`
LM_HEAD = "lm_head.weight"

# JAX path -> (Hugging Face key, transpose). Paths under `layers/` are stacked: key "layers.{i}.<rest>".
TOP_TABLE: dict[str, tuple[str, bool]] = {
    "embedding": ("embed_tokens.weight", False),
    "norm/weight": ("norm.weight", False),
}
LAYER_TABLE: dict[str, tuple[str, bool]] = {
    "input_layernorm/weight": ("input_layernorm.weight", False),
    "self_attn/q_proj/kernel": ("self_attn.q_proj.weight", True),
    "self_attn/k_proj/kernel": ("self_attn.k_proj.weight", True),
    "self_attn/v_proj/kernel": ("self_attn.v_proj.weight", True),
    "self_attn/o_proj/kernel": ("self_attn.o_proj.weight", True),
    "post_attention_layernorm/weight": ("post_attention_layernorm.weight", False),
    "pre_feedforward_layernorm/weight": ("pre_feedforward_layernorm.weight", False),
    "mlp/gate_proj/kernel": ("mlp.gate_proj.weight", True),
    "mlp/up_proj/kernel": ("mlp.up_proj.weight", True),
    "mlp/down_proj/kernel": ("mlp.down_proj.weight", True),
    "post_feedforward_layernorm/weight": ("post_feedforward_layernorm.weight", False),
}

# config.json fields read into Gemma2Config (same names) and their transformers defaults when absent.
_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                  "attn_logit_softcapping", "rms_norm_eps")


@functools.lru_cache(maxsize=16)
def _jax_shapes(cfg: text.Gemma2Config) -> tuple[tuple[str, tuple[int, ...]], ...]:
    abstract = text.abstract_params(text.Gemma2(cfg))
    return tuple((path, tuple(leaf.shape)) for path, leaf in sorted(flatten(abstract).items()))


def jax_shapes(cfg: text.Gemma2Config) -> dict[str, tuple[int, ...]]:
    """{"layers/self_attn/q_proj/kernel": (L, C, N*D), ...}: every parameter Gemma2(cfg) creates."""
    return dict(_jax_shapes(cfg))


def _hf_items(cfg: text.Gemma2Config):
    """(jax path, layer or None, hf key, transpose, hf shape) for every Hugging Face tensor of cfg."""
    shapes = jax_shapes(cfg)
    for path, (key, transpose) in TOP_TABLE.items():
        shape = shapes[path]
        yield path, None, key, transpose, shape[::-1] if transpose else shape
    for rest, (key, transpose) in LAYER_TABLE.items():
        shape = shapes[f"layers/{rest}"][1:]
        for i in range(cfg.num_hidden_layers):
            yield f"layers/{rest}", i, f"layers.{i}.{key}", transpose, shape[::-1] if transpose else shape


def hf_shapes(cfg: text.Gemma2Config) -> dict[str, tuple[int, ...]]:
    """{"layers.0.self_attn.q_proj.weight": (N*D, C), ...}: the Gemma2Model state_dict of cfg."""
    return {key: tuple(shape) for _, _, key, _, shape in _hf_items(cfg)}


def _strip_prefix(state_dict: Mapping, source: str) -> dict:
    """Gemma2ForCausalLM keys -> Gemma2Model keys; lm_head (shape-checked by the caller) left out."""
    keys = [k for k in state_dict if k != LM_HEAD]
    prefixed = [k for k in keys if k.startswith(PREFIX)]
    if not prefixed:
        return {k: state_dict[k] for k in keys}
    bare = sorted(set(keys) - set(prefixed))
    if bare:  # a CausalLM holds every decoder key under `model.`: a mix is a damaged or merged file
        raise ValueError(f"{source}: mixes Gemma2ForCausalLM keys ({PREFIX}*) with {len(bare)} key(s) outside "
                         f"{PREFIX}: {', '.join(bare[:8])}")
    return {k[len(PREFIX):]: state_dict[k] for k in prefixed}


def _iter_hf_to_jax(state_dict: Mapping, cfg: text.Gemma2Config, source: str):
    """Check every key and shape, then yield (jax path, fp32 array) one parameter at a time, dropping the source
    tensors of each as it goes (so loading the 2B model holds little more than one copy of it)."""
    if LM_HEAD in state_dict:
        as_fp32(LM_HEAD, state_dict[LM_HEAD], (cfg.vocab_size, cfg.hidden_size), source)
    # Every key and shape checked (one error listing all problems) before any work, so a bad file fails fast.
    arrays = checked_fp32(_strip_prefix(state_dict, source), hf_shapes(cfg), source)
    del state_dict  # a caller that drops its reference too lets each tensor go once converted
    groups: dict[str, list] = {}
    for path, layer, key, transpose, _ in _hf_items(cfg):
        groups.setdefault(path, []).append((layer, key, transpose))
    for path, items in groups.items():
        converted = []
        for _, key, transpose in items:
            array = arrays.pop(key)
            converted.append(array.T if transpose else array)
        yield path, np.ascontiguousarray(converted[0]) if items[0][0] is None else np.stack(converted)


def hf_to_jax(state_dict: Mapping, cfg: text.Gemma2Config, source: str = "Gemma-2 state_dict") -> dict:
    """Hugging Face Gemma2Model / Gemma2ForCausalLM tensors (numpy or torch; fp32, fp16 or bf16) -> JAX params
    (nested dict of fp32 numpy arrays, layers stacked). The input mapping is not modified."""
    return unflatten(dict(_iter_hf_to_jax(state_dict, cfg, source)))


def jax_to_hf(params: Mapping, cfg: text.Gemma2Config) -> dict[str, np.ndarray]:
    """JAX params -> Gemma2Model state_dict (fp32 numpy, no `model.` prefix, no lm_head)."""
    flat = flatten(params)
    expected = jax_shapes(cfg)
    source = f"JAX Gemma-2 params for config {cfg.name!r}"
    arrays = checked_fp32(flat, expected, source)
    out = {}
    for path, layer, key, transpose, _ in _hf_items(cfg):
        array = arrays[path] if layer is None else arrays[path][layer]
        out[key] = np.ascontiguousarray(array.T if transpose else array)
    return out


def config_from_hf(hf: Mapping, source: str = "Gemma-2 config") -> text.Gemma2Config:
    """A Gemma2Config from a Hugging Face config.json dict; options this encoder does not implement raise."""
    if hf.get("model_type", "gemma2") != "gemma2":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not 'gemma2'")
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    unsupported = {
        "hidden_activation": (act, "gelu_pytorch_tanh"),
        "attention_bias": (bool(hf.get("attention_bias", False)), False),
        "use_bidirectional_attention": (bool(hf.get("use_bidirectional_attention")), False),
    }
    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        unsupported["rope_scaling"] = (hf["rope_scaling"], None)
    if rope.get("rope_type", "default") != "default":
        unsupported["rope_parameters.rope_type"] = (rope["rope_type"], "default")
    for field, (value, wanted) in unsupported.items():
        if value != wanted:
            raise ValueError(f"{source}: {field} = {value!r} is not supported (Gemma-2 has {wanted!r})")
    defaults = text.GEMMA2_2B  # = transformers' Gemma2Config defaults, used where config.json omits a field
    values = {field: hf.get(field, getattr(defaults, field)) for field in _CONFIG_FIELDS}
    if "head_dim" in hf and hf["head_dim"] is None:  # transformers' rotary falls back to hidden / heads
        values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
    layer_types = hf.get("layer_types")
    theta = rope.get("rope_theta", hf.get("rope_theta", defaults.rope_theta))
    return text.Gemma2Config(name=str(hf.get("_name_or_path") or "gemma2"), rope_theta=float(theta),
                             layer_types=tuple(layer_types) if layer_types else None, **values)


def hf_config(cfg: text.Gemma2Config) -> dict:
    """config.json for `transformers.Gemma2Model.from_pretrained` (the keys Gemma-2 releases write)."""
    out = {field: getattr(cfg, field) for field in _CONFIG_FIELDS}
    out.update(model_type="gemma2", architectures=["Gemma2Model"], hidden_activation="gelu_pytorch_tanh",
               hidden_act="gelu_pytorch_tanh", rope_theta=cfg.rope_theta, attention_bias=False,
               layer_types=["sliding_attention" if s else "full_attention" for s in cfg.is_sliding],
               torch_dtype="float32")
    return out


def read_hf_folder(path: str) -> tuple[text.Gemma2Config, dict[str, np.ndarray]]:
    """(config, state_dict) of a Hugging Face folder: config.json plus model.safetensors or a sharded index."""
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected a Hugging Face Gemma-2 folder")
    with open(config_path) as f:
        try:
            cfg = config_from_hf(json.load(f), source=config_path)
        except json.JSONDecodeError as err:
            raise ValueError(f"{config_path}: not valid JSON: {err}") from err
    single, index = os.path.join(path, WEIGHTS_NAME), os.path.join(path, WEIGHTS_INDEX_NAME)
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f).get("weight_map", {})
        files = [os.path.join(path, name) for name in sorted(set(weight_map.values()))]
    else:
        found = ", ".join(sorted(os.listdir(path))) or "nothing"
        raise FileNotFoundError(f"{path}: neither {WEIGHTS_NAME} nor {WEIGHTS_INDEX_NAME} (found: {found}); "
                                f"only safetensors folders are read")
    state_dict: dict[str, np.ndarray] = {}
    for file in files:
        tensors, _ = read_safetensors(file)
        repeated = sorted(set(tensors) & set(state_dict))
        if repeated:
            raise ValueError(f"{file}: key(s) already read from another shard: {repeated[:5]}")
        state_dict.update(tensors)
    return cfg, state_dict


def load_gemma2(path: str, *, compute_dtype: str = "float32", param_dtype: str = "float32"):
    """(Gemma2 model, params) from a Hugging Face Gemma-2 folder; see `sana_jax.text.load_gemma2`."""
    import jax.numpy as jnp

    if param_dtype not in ("float32", "bfloat16"):
        raise ValueError(f"param_dtype must be 'float32' or 'bfloat16', got {param_dtype!r}")
    cfg, state_dict = read_hf_folder(path)
    cfg = cfg.replace(compute_dtype=compute_dtype)
    dtype = jnp.dtype(param_dtype)
    converted = _iter_hf_to_jax(state_dict, cfg, source=os.path.abspath(path))
    del state_dict  # the generator now holds the only reference and frees each tensor once converted
    flat = {key: jnp.asarray(value, dtype) for key, value in converted}
    return text.Gemma2(cfg), unflatten(flat)


def export_hf(cfg: text.Gemma2Config, params: Mapping, out_dir: str, overwrite: bool = False) -> None:
    """Write a Gemma2Model folder (config.json + model.safetensors, fp32) atomically."""
    tensors = jax_to_hf(params, cfg)
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        write_json(os.path.join(tmp, CONFIG_NAME), hf_config(cfg))
        write_safetensors(os.path.join(tmp, WEIGHTS_NAME), tensors, {"format": "pt"})


__all__ = ["hf_to_jax", "jax_to_hf", "config_from_hf", "hf_config", "hf_shapes", "jax_shapes", "read_hf_folder",
           "load_gemma2", "export_hf"]
