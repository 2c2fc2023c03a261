"""Read the golden fixtures of the original NVlabs code (shared/fixtures/README.md) as plain numpy arrays.

Framework-neutral: the torch reference and the JAX tests both build their models from `load_fixture(path)`.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from safetensors import safe_open

from sana_jax.configs import SanaConfig

# case -> file, in the order of fixtures/README.md.
FIXTURE_FILES = {
    "a_sana_ms": "official_a_sana_ms.safetensors",
    "b_sana_ms_qknorm": "official_b_sana_ms_qknorm.safetensors",
    "c_sana_ms_sincos_pe": "official_c_sana_ms_sincos_pe.safetensors",
    "d_sana_sprint": "official_d_sana_sprint.safetensors",
}

# Constructor arguments of the original SanaMS that SanaConfig has no field for: the fixtures must use the
# values every released T2I config uses, which are the only ones this project implements.
_FIXED_ARGS = {
    "attn_type": "linear",
    "ffn_type": "glumbconv",
    "mlp_acts": ["silu", "silu", None],
    "y_norm": True,
    "pred_sigma": False,
    "learn_sigma": False,
    "pos_embed_type": "sincos",
    "patch_embed_kernel": None,
    "logvar_scale_factor": 1.0,
    "drop_path": 0.0,
}


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One golden fixture.

    config: the SanaConfig of the original constructor arguments (original eps values: cross_norm_eps 1e-6,
        linear_attn_eps 1e-8).
    state_dict: every official key (prefix `state_dict.` stripped), including `pos_embed` and
        `y_embedder.y_embedding`, float32, PyTorch layouts (Linear [out, in], conv OIHW).
    inputs: `x` [B, C, H, W] (NCHW), `timestep` [B], `y` [B, 1, L, C_cap], `mask` [B, L] int64, and for Sprint
        `guidance` [B] (the raw cfg scale). Sprint's `timestep` is the TrigFlow time s.
    expected: `output` [B, C_out, H, W], `block.{i}.out` [B, N, D], `intermediate.<module>` (shapes in the
        fixtures README; `intermediate.y_embedder` / `attention_y_norm` keep the original [B, 1, L, D]), and
        for Sprint `output.logvar` [B, 1].
    metadata: the file's safetensors metadata (strings).
    """

    name: str
    config: SanaConfig
    state_dict: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    metadata: dict[str, str]

    @property
    def is_sprint(self) -> bool:
        """The model is `SanaMSCM`: the output comes from the TrigFlow wrapper (`trigflow_forward`)."""
        return self.metadata["model_class"] == "SanaMSCM"


def config_from_original_args(args: dict, name: str = "fixture") -> SanaConfig:
    """The SanaConfig equal to an original `SanaMS(**args)`; raises ValueError on arguments it cannot express."""
    for key, value in _FIXED_ARGS.items():
        if key in args and args[key] != value:
            raise ValueError(f"fixture {name}: original argument {key}={args[key]!r} is not supported "
                             f"(only {value!r})")
    cfg = dict(
        name=name,
        in_channels=args["in_channels"],
        out_channels=args["in_channels"],
        hidden_size=args["hidden_size"],
        depth=args["depth"],
        linear_head_dim=args["linear_head_dim"],
        num_cross_heads=args["num_heads"],
        mlp_ratio=args["mlp_ratio"],
        caption_channels=args["caption_channels"],
        model_max_length=args["model_max_length"],
        patch_size=args["patch_size"],
        sample_size=args["input_size"],
        qk_norm=args["qk_norm"],
        cross_norm=args["cross_norm"],
        use_pe=args["use_pe"],
        pe_interpolation=args["pe_interpolation"],
        guidance_embeds=args["cfg_embed"],
        logvar=args["logvar"],
        y_norm_scale_factor=args["y_norm_scale_factor"],
        norm_eps=args["norm_eps"],
    )
    if args["cfg_embed"]:
        cfg["guidance_embeds_scale"] = args["cfg_embed_scale"]
    return SanaConfig(**cfg)


def load_fixture(path: str | os.PathLike) -> Fixture:
    """Read one `official_*.safetensors` golden fixture into numpy arrays and a SanaConfig."""
    path = os.fspath(path)
    state_dict, inputs, expected = {}, {}, {}
    with safe_open(path, framework="np") as f:
        metadata = dict(f.metadata() or {})
        for key in f.keys():
            group, _, rest = key.partition(".")
            if group == "state_dict":
                state_dict[rest] = f.get_tensor(key)
            elif group == "input":
                inputs[rest] = f.get_tensor(key)
            else:
                expected[key] = f.get_tensor(key)
    if "config_json" not in metadata:
        raise ValueError(f"{path}: no config_json in the safetensors metadata; not a golden fixture")
    name = metadata.get("case", os.path.basename(path))
    config = config_from_original_args(json.loads(metadata["config_json"]), name=name)
    return Fixture(name=name, config=config, state_dict=state_dict, inputs=inputs, expected=expected,
                   metadata=metadata)
