"""The training loop: resume from the latest checkpoint, step, log, checkpoint, sample grids, plot.

Everything is checked (data shapes against the model, batch against the mesh, a checkpoint against the config)
before the first compilation.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax
import numpy as np
from tqdm import tqdm

from sana_jax.flops import forward_flops, peak_flops
from sana_jax.train import sharding
from sana_jax.train.checkpoint import Checkpoints
from sana_jax.train.config import TrainConfig, to_dict
from sana_jax.train.data import Loader
from sana_jax.train.metrics import Scalars, plot_loss
from sana_jax.train.samples import SampleGrids
from sana_jax.train.step import TrainState, init_state, make_optimizer, make_train_step, put_batch, state_shardings


@dataclasses.dataclass
class TrainResult:
    state: TrainState
    losses: list[tuple[int, float]]  # (optimizer step, loss) at every logged step, resumed part included
    out_dir: str


def _check_data(cfg: TrainConfig, loader: Loader, mesh) -> None:
    index, model = loader.index, cfg.model
    if index["latent_channels"] != model.in_channels:
        raise ValueError(f"{cfg.data_dir}: latents have {index['latent_channels']} channels, model "
                         f"{model.name!r} takes {model.in_channels}")
    if index["caption_channels"] != model.caption_channels:
        raise ValueError(f"{cfg.data_dir}: caption embeddings have {index['caption_channels']} channels, model "
                         f"{model.name!r} takes {model.caption_channels}")
    for shard in index["shards"]:
        h, w = shard["latent_hw"]
        if h % model.patch_size or w % model.patch_size:
            raise ValueError(f"{cfg.data_dir}/{shard['file']}: latent {h}x{w} is not a multiple of the patch size")
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    if cfg.batch_size % batch_devices:
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by the data x fsdp mesh size "
                         f"{batch_devices}")
    if jax.process_count() > 1:  # the Loader gives each process 1/P of every batch: its devices must hold 1/P
        held = sharding.batch_sharding(mesh, 1).addressable_devices_indices_map((cfg.batch_size,)).values()
        rows = len({r for (index,) in held for r in range(*index.indices(cfg.batch_size))})
        if rows != cfg.batch_size // jax.process_count():
            raise ValueError(f"mesh {dict(mesh.shape)}: the devices of process {jax.process_index()} hold {rows} of "
                             f"{cfg.batch_size} batch rows, not 1/{jax.process_count()}; lay the data x fsdp axes "
                             f"over the processes")


def _host_batch(loader: Loader, k: int) -> dict:
    """This process's rows of global batch k, with `index`: their positions in the global batch. The Loader gives
    process p of P the rows p, p + P, p + 2P, ... (data.py); the step draws each row's noise from its position
    (flow.example_keys), so any number of hosts trains exactly as one does."""
    batch = loader.batch(k)
    batch["index"] = np.arange(loader.process_index, loader.global_batch, loader.process_count, dtype=np.int32)
    return batch


# How the model is computed, not what it computes: a run may resume with another remat policy or kernel choice.
_EXECUTION_FIELDS = ("remat_policy", "unroll_blocks", "attention_impl", "glu_impl", "linear_attn_impl")


def _same_model(cfg: TrainConfig, meta: dict, directory: str) -> None:
    saved = meta.get("config", {}).get("model", {})
    current = json.loads(json.dumps(to_dict(cfg)["model"]))
    diff = {k: (saved.get(k), v) for k, v in current.items()
            if saved.get(k) != v and k not in _EXECUTION_FIELDS}
    if diff:
        raise ValueError(f"{directory}: the checkpoint was trained with another model config; "
                         f"differences (checkpoint, now): {diff}")


def train(cfg: TrainConfig, init_params=None, stop_after: int | None = None, progress: bool = True) -> TrainResult:
    """Train (or resume) to cfg.steps optimizer steps. `stop_after` micro-steps ends early (tests of resume)."""
    os.makedirs(cfg.out_dir, exist_ok=True)
    mesh = sharding.make_mesh(cfg.mesh)
    loader = Loader(cfg.data_dir, cfg.batch_size, cfg.seed, jax.process_index(), jax.process_count())
    _check_data(cfg, loader, mesh)
    grids = SampleGrids(cfg, os.path.join(cfg.out_dir, "samples")) if cfg.sample_count else None  # checks decoder
    tx = make_optimizer(cfg)
    abstract, shardings = state_shardings(cfg, mesh, tx)
    checkpoints = Checkpoints(os.path.join(cfg.out_dir, "checkpoints"), cfg.keep_checkpoints, every=1)
    history_path = os.path.join(cfg.out_dir, "losses.json")
    latest = checkpoints.latest_step()
    losses: list[tuple[int, float]] = []
    if latest is not None:
        _same_model(cfg, checkpoints.meta(latest), checkpoints.directory)
        state, meta = checkpoints.restore(latest, abstract, shardings)
        losses = [tuple(x) for x in meta.get("losses", [])]
    else:
        state = init_state(cfg, tx, shardings, init_params)

    step_fn, batch_sh = make_train_step(cfg, mesh, tx, shardings,
                                        {key: v.shape for key, v in _host_batch(loader, 0).items()})
    scalars = Scalars(os.path.join(cfg.out_dir, "tensorboard"), enabled=jax.process_index() == 0)
    if grids is not None:
        grids.scalars = scalars  # the grids also go to TensorBoard as images
    accum = cfg.optim.grad_accum
    start, total = int(state.step), cfg.steps * accum
    peak = peak_flops(jax.devices()[0].device_kind)
    bar = tqdm(range(start, total), initial=start, total=total, desc="train", file=sys.stderr,
               disable=not progress or jax.process_index() != 0)
    window_start, window_images = time.perf_counter(), 0
    for k in bar:
        host_batch = _host_batch(loader, k)
        state, metrics = step_fn(state, put_batch(host_batch, batch_sh))
        window_images += cfg.batch_size
        opt_step, boundary = (k + 1) // accum, (k + 1) % accum == 0
        last = k + 1 == total or (stop_after is not None and k + 1 == stop_after)
        if boundary and (opt_step % cfg.log_every == 0 or last):
            values = {key: float(v) for key, v in jax.device_get(metrics).items()}
            elapsed = time.perf_counter() - window_start
            _, h, w, _ = host_batch["x0"].shape
            flops = 3 * forward_flops(cfg.model, window_images, h, w, host_batch["y"].shape[1])
            values.update(lr=float(cfg.effective_lr * min(1.0, opt_step / max(cfg.optim.warmup_steps, 1))),
                          images_per_s=window_images / elapsed, tflops_per_s=flops / elapsed / 1e12)
            if peak:
                values["mfu"] = flops / elapsed / (peak * jax.device_count())
            scalars.write(opt_step, values)
            losses.append((opt_step, values["loss"]))
            bar.set_postfix(loss=f"{values['loss']:.4f}", img_s=f"{values['images_per_s']:.1f}")
            window_start, window_images = time.perf_counter(), 0
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"step {opt_step}: loss is {values['loss']}; stopping without saving "
                                         f"(the last good checkpoint is kept)")
        if boundary and (opt_step % cfg.checkpoint_every == 0 or last):
            checkpoints.save(k + 1, state, {"config": to_dict(cfg), "step": k + 1, "optimizer_step": opt_step,
                                            "loss": losses[-1][1] if losses else None, "losses": losses},
                             force=True)
        if grids is not None and boundary and (k + 1 == total or (cfg.sample_every and
                                                                   opt_step % cfg.sample_every == 0)):
            sampling_start = time.perf_counter()
            grids.write(opt_step, state)
            window_start += time.perf_counter() - sampling_start  # not counted in images/s
        if last and stop_after is not None and k + 1 == stop_after:
            break
    checkpoints.wait()
    checkpoints.close()
    scalars.close()
    if jax.process_index() == 0:
        with open(history_path, "w") as f:
            json.dump(losses, f)
        plot_loss(losses, os.path.join(cfg.out_dir, "loss.png"))
    return TrainResult(state=state, losses=losses, out_dir=cfg.out_dir)
