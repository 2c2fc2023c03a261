"""Typed training configuration: frozen dataclasses, released recipes, JSON/YAML files and `key=value` overrides.

Unknown keys and bad values raise before anything is compiled. The recipe facts (lr, flow shift, clip, warmup,
auto_lr) are SANA's released yamls (../shared/reference/sana-original.md section 5).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from sana_jax import configs
from sana_jax.configs import SanaConfig

Weighting = Literal["logit_normal", "uniform", "mode"]


@dataclasses.dataclass(frozen=True)
class FlowConfig:
    """Flow-matching recipe: x_t = (1 - s) x0 + s eps, target v = eps - x0, s = shift(u), u ~ weighting."""

    shift: float = 3.0  # flow shift s' = shift s / (1 + (shift - 1) s); 600M-1024 uses 4.0, 4K 6.0
    weighting: Weighting = "logit_normal"  # u = sigmoid(N(logit_mean, logit_std)) in SANA
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    integer_timesteps: bool = True  # SANA: s on the 1000-step grid, the model sees floor(1000 s') (long timesteps)
    caption_dropout: float = 0.1  # p of replacing the caption by the null embedding (mask unchanged)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    name: Literal["came", "came_8bit", "adamw"] = "came"
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 2000  # linear warmup from 0, then constant (SANA's `constant` schedule)
    clip_grad_norm: float | None = 0.1  # SANA yamls; None disables
    auto_lr: Literal["sqrt", "none"] = "none"  # SANA's dataclass default is sqrt(global_batch / 256); yamls inherit it
    grad_accum: int = 1  # micro-batches per optimizer step (optax.MultiSteps)
    ema_decay: float | None = None  # e.g. 0.9999; None keeps no EMA copy
    # CAME / CAME-8bit: update the stacked blocks this many layers at a time, in place (optim.scale_by_came; the
    # last group is smaller if it does not divide the depth); 0 updates every leaf at once. Same maths, less
    # memory: what fits Sana-1.5-4.8B on one 80 GB GPU.
    layer_group: int = 0
    # CAME / CAME-8bit's factored row and column means (optim.scale_by_came `impl`): "auto" = the Pallas kernels
    # of sana_jax.came_kernels on one CUDA GPU without layer groups (one pass over each gradient for both), else
    # XLA reductions. Same maths up to the order of fp32 sums.
    came_impl: Literal["auto", "xla", "pallas"] = "auto"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 on one axis takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: SanaConfig = configs.TINY
    flow: FlowConfig = FlowConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    data_dir: str = ""  # a cache folder written by `sana-jax prepare` or the demo (see sana_jax/train/data.py)
    out_dir: str = "outputs/train"  # checkpoints/, tensorboard/, samples/, loss.png
    batch_size: int = 32  # global batch per optimizer micro-step, over all hosts
    steps: int = 1000  # optimizer steps
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    # Sample grids (sana_jax/train/samples.py): out_dir/samples/step-NNNNNNN.png every `sample_every` optimizer
    # steps (0: only at the end) of the cache's first `sample_count` distinct captions (0: no grids), with the EMA
    # weights when kept, flow DPM-Solver, CFG with the cache's null caption and a fixed noise seed.
    sample_every: int = 0
    sample_count: int = 8
    sample_steps: int = 20
    sample_guidance: float = 4.5  # CFG scale (SANA's default); <= 1 samples without CFG
    # Latents -> pixels: "" a latent preview (channels 0-2 min-max normalised per image; needs no VAE), "shapes"
    # the shapes demo's pixel unshuffle by 4, or a DC-AE folder (latents / the cache's scaling_factor, decoded).
    sample_decoder: str = ""

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"TrainConfig: {msg}")

        if self.batch_size <= 0 or self.steps <= 0:
            fail(f"batch_size and steps must be positive, got {self.batch_size}, {self.steps}")
        if self.optim.grad_accum <= 0:
            fail(f"optim.grad_accum must be >= 1, got {self.optim.grad_accum}")
        if not 0.0 <= self.flow.caption_dropout < 1.0:
            fail(f"flow.caption_dropout must be in [0, 1), got {self.flow.caption_dropout}")
        if self.optim.came_impl not in ("auto", "xla", "pallas"):
            fail(f"optim.came_impl must be auto, xla or pallas, got {self.optim.came_impl!r}")
        if self.optim.layer_group < 0:
            fail(f"optim.layer_group must be >= 0 (0: every layer at once), got {self.optim.layer_group}")
        if self.flow.shift <= 0:
            fail(f"flow.shift must be positive, got {self.flow.shift}")
        if self.optim.lr < 0:
            fail(f"optim.lr must be >= 0, got {self.optim.lr}")
        if self.optim.ema_decay is not None and not 0.0 < self.optim.ema_decay < 1.0:
            fail(f"optim.ema_decay must be in (0, 1), got {self.optim.ema_decay}")
        for axis in ("data", "fsdp", "tensor"):
            size = getattr(self.mesh, axis)
            if size == 0 or size < -1:
                fail(f"mesh.{axis} must be a positive size or -1, got {size}")
        for name in ("log_every", "checkpoint_every", "keep_checkpoints", "sample_steps"):
            if getattr(self, name) <= 0:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("sample_every", "sample_count"):
            if getattr(self, name) < 0:
                fail(f"{name} must be >= 0, got {getattr(self, name)}")
        if not isinstance(self.sample_decoder, str):
            fail(f"sample_decoder must be '', 'shapes' or a DC-AE folder, got {self.sample_decoder!r}")

    @property
    def effective_lr(self) -> float:
        if self.optim.auto_lr == "sqrt":
            return self.optim.lr * (self.batch_size * self.optim.grad_accum / 256) ** 0.5
        return self.optim.lr


# Released recipes (NVlabs/Sana configs at 47777fb; 512 px and 2K yamls read at 28af99f): lr 1e-4 (1.0) / 2e-5
# (1.5), CAME (1.0) / CAME-8bit (1.5 4.8B), clip 0.1, 2000 warmup steps, flow shift per recipe (train = inference),
# bf16 compute and full remat. Data is the user's. batch_size is global here, while the yamls' train_batch_size is
# per GPU: the 512 px and 2K recipes take the yaml's number (600M-512 128, 1600M-512 64, 2K 4), as the 1024 px
# SANA-1.0 ones do (64); the 4K and SANA-1.5 yamls say 4 and 2 per GPU.
def _recipe(model: SanaConfig, batch_size: int, **changes) -> TrainConfig:
    return TrainConfig(model=model.replace(compute_dtype="bfloat16", remat_policy="full"),
                       flow=FlowConfig(shift=model.flow_shift), batch_size=batch_size, **changes)


RECIPES: dict[str, TrainConfig] = {
    "sana_600m_512": _recipe(configs.SANA_600M_512, 128),  # 512ms/Sana_600M_img512.yaml, shift 3.0
    "sana_600m_1024": _recipe(configs.SANA_600M, 64),  # 1024ms/Sana_600M_img1024.yaml, shift 4.0
    "sana_1600m_512": _recipe(configs.SANA_1600M_512, 64),  # 512ms/Sana_1600M_img512.yaml, shift 3.0
    "sana_1600m_1024": _recipe(configs.SANA_1600M, 64),  # 1024ms/Sana_1600M_img1024.yaml, shift 3.0
    "sana_1600m_2k": _recipe(configs.SANA_1600M_2K, 4),  # 2048ms/Sana_1600M_img2048_bf16.yaml, shift 3.0, PE
    "sana_1600m_4k": _recipe(configs.SANA_1600M_4K, 8),  # 4096ms/Sana_1600M_img4096_bf16.yaml, shift 6.0, PE
    "sana15_1600m_1024": _recipe(configs.SANA15_1600M, 64, optim=OptimConfig(lr=2e-5)),
    # layer_group 6: CAME-8bit updates the 60 blocks 6 at a time in place (fits b4 on one 80 GB GPU, RESULTS.md).
    "sana15_4800m_1024": _recipe(configs.SANA15_4800M, 32, optim=OptimConfig(name="came_8bit", lr=2e-5,
                                                                            layer_group=6)),
}


def _merge(base, values: dict, where: str):
    if isinstance(base, SanaConfig) and "name" in values:  # model: {name: sana_600m, ...overrides}
        base = configs.get(values["name"])
        values = {k: v for k, v in values.items() if k != "name"}
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(fields)}")
    changes = {}
    for name, value in values.items():
        current = getattr(base, name)
        changes[name] = _merge(current, value, f"{where}.{name}") if (
            isinstance(value, dict) and dataclasses.is_dataclass(current)) else value
    return dataclasses.replace(base, **changes)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string such as a path or a name


def _set(tree: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    for key in keys[:-1]:
        tree = tree.setdefault(key, {})
    tree[keys[-1]] = value


def load_config(recipe: str | None = None, path: str | None = None, overrides: list[str] = ()) -> TrainConfig:
    """A recipe name (or the defaults), then a JSON/YAML file, then `a.b=value` overrides (values parsed as JSON)."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    cfg = RECIPES[recipe] if recipe else TrainConfig()
    values: dict = {}
    if path:
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such config file")
        with open(path) as f:
            text = f.read()
        if path.endswith((".yaml", ".yml")):
            import yaml

            values = yaml.safe_load(text) or {}
        else:
            values = json.loads(text)
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping at the top level, got {type(values).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key.sub=value")
        key, _, text = item.partition("=")
        _set(values, key.strip(), _parse_value(text.strip()))
    try:
        return _merge(cfg, values, "config") if values else cfg
    except TypeError as err:
        raise ValueError(f"config: {err}") from err


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(values: dict) -> TrainConfig:
    """Inverse of to_dict (e.g. the config saved in a checkpoint's meta item); unknown keys raise."""
    nested = {"model": SanaConfig, "flow": FlowConfig, "optim": OptimConfig, "mesh": MeshConfig}
    kwargs = {k: (nested[k](**v) if k in nested else v) for k, v in values.items()}
    try:
        return TrainConfig(**kwargs)
    except TypeError as err:
        raise ValueError(f"not a TrainConfig: {err}") from err
