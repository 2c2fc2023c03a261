"""Read the weights of a training run (its latest or a given orbax checkpoint) for export or sampling."""

from __future__ import annotations

import os

import jax

from sana_jax.train import sharding
from sana_jax.train.checkpoint import Checkpoints
from sana_jax.train.config import MeshConfig, TrainConfig, from_dict
from sana_jax.train.step import make_optimizer, state_shardings


def load_run(run_dir: str, step: int | None = None, ema: bool = False):
    """(TrainConfig, params) of `run_dir` (the train `out_dir`, or its `checkpoints/` folder) at `step` (latest
    by default); `ema=True` returns the EMA copy. Restored on the local devices, whatever mesh trained it."""
    directory = run_dir if os.path.basename(os.path.normpath(run_dir)) == "checkpoints" else \
        os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no checkpoints folder (expected a `sana-jax train` out_dir)")
    checkpoints = Checkpoints(directory, keep=1_000_000, every=1, async_save=False)
    try:
        step = checkpoints.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{directory}: holds no checkpoint")
        cfg = from_dict(checkpoints.meta(step)["config"])
        cfg = TrainConfig(**{**cfg.__dict__, "mesh": MeshConfig(data=-1, fsdp=1, tensor=1)})
        if ema and not cfg.optim.ema_decay:
            raise ValueError(f"{directory}: the run kept no EMA (optim.ema_decay is None)")
        mesh = sharding.make_mesh(cfg.mesh)
        tx = make_optimizer(cfg)
        abstract, shardings = state_shardings(cfg, mesh, tx)
        state, _ = checkpoints.restore(step, abstract, shardings)
    finally:
        checkpoints.close()
    return cfg, jax.device_get(state.ema if ema else state.params)
