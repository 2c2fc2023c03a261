"""The main job on an embedded default: train a small SANA from scratch on coloured shapes, on a CPU, in minutes.

Steps: build the procedural cache (sana_jax/train/shapes.py) -> train with SANA's recipe (CAME, logit-normal
integer timesteps, caption dropout, clipping, warmup) for half the steps -> stop and resume from the orbax
checkpoint -> finish -> sample every caption with the project's flow DPM-Solver and CFG -> measure colour and
shape of every image -> export to the official and diffusers layouts and check parity of the export against
sana_torch_ref and diffusers. Writes samples.png, loss.png, report.txt and report.json under the output folder.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

import sana_jax
from sana_jax import sampling
from sana_jax.configs import SanaConfig
from sana_jax.train import shapes
from sana_jax.train.config import FlowConfig, OptimConfig, TrainConfig
from sana_jax.train.data import write_cache
from sana_jax.train.loop import train

SHAPES_MODEL = SanaConfig(name="shapes_demo", in_channels=48, out_channels=48, hidden_size=128, depth=4,
                          num_cross_heads=4, caption_channels=shapes.CAPTION_CHANNELS,
                          model_max_length=shapes.MAX_LENGTH, sample_size=8, flow_shift=1.0)
TARGET_ACCURACY = 0.8


def demo_config(out_dir: str, steps: int = 600) -> TrainConfig:
    return TrainConfig(model=SHAPES_MODEL, flow=FlowConfig(shift=1.0, caption_dropout=0.1),
                       optim=OptimConfig(name="came", lr=2e-4, warmup_steps=100, clip_grad_norm=1.0),
                       data_dir=os.path.join(out_dir, "data"), out_dir=os.path.join(out_dir, "run"),
                       batch_size=32, steps=steps, log_every=10, checkpoint_every=200, seed=0)


def generate(cfg: SanaConfig, params, captions: list[str], seed: int, guidance: float = 4.5,
             steps: int = 20) -> np.ndarray:
    """Images [len(captions), 32, 32, 3] in [-1, 1] with CFG (uncond = null caption with the cond mask, as SANA)."""
    model = sana_jax.SanaTransformer(cfg)
    table = shapes.word_table()
    y, mask = zip(*(shapes.encode_caption(c, table) for c in captions))
    y, mask = jnp.asarray(np.stack(y)), jnp.asarray(np.stack(mask))
    null_y = jnp.broadcast_to(jnp.asarray(shapes.encode_caption("", table)[0]), y.shape)

    def velocity(x, t):
        both = model.apply({"params": params}, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                           jnp.concatenate([null_y, y]), jnp.concatenate([mask, mask]))
        uncond, cond = jnp.split(both.astype(jnp.float32), 2)
        return uncond + guidance * (cond - uncond)

    noise = jax.random.normal(jax.random.key(seed), (len(captions), 8, 8, cfg.in_channels))
    latents = jax.jit(lambda n: sampling.sample(velocity, n, method="flow_dpm_solver", steps=steps,
                                                flow_shift=cfg.flow_shift))(noise)
    return shapes.from_latent(np.asarray(latents))


def grid_png(images: np.ndarray, labels: list[str], path: str, columns: int) -> None:
    cell, pad = 96, 14
    rows = (len(images) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * (cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(((np.clip(image, -1, 1) + 1) * 127.5).astype(np.uint8)).resize((cell, cell),
                                                                                           Image.NEAREST)
        canvas.paste(tile, (c * cell, r * (cell + pad)))
        draw.text((c * cell + 2, r * (cell + pad) + cell), label, fill="black")
    canvas.save(path)


def run_demo(out_dir: str, steps: int = 600, samples_per_caption: int = 2, num_examples: int = 4096) -> int:
    os.makedirs(out_dir, exist_ok=True)
    cfg = demo_config(out_dir, steps)
    if not os.path.exists(os.path.join(cfg.data_dir, "index.json")):
        table = shapes.word_table()
        null_y, null_mask = shapes.encode_caption("", table)
        write_cache(cfg.data_dir, shapes.examples(num_examples, seed=0), null_y, null_mask)
    print(f"training {cfg.model.name} ({sana_jax.count_params(sana_jax.abstract_params(sana_jax.SanaTransformer(cfg.model))):,} "
          f"params) on {cfg.data_dir}; checkpoints in {cfg.out_dir}/checkpoints", file=sys.stderr)
    half = steps // 2
    first = train(cfg, stop_after=half)  # a first run that stops (as if killed) after half the steps ...
    result = train(cfg)  # ... and a second that resumes from the checkpoint
    resumed_from = first.losses[-1][0]

    captions = shapes.captions() * samples_per_caption
    images = generate(cfg.model, result.state.params, captions, seed=1)
    measured = [shapes.measure(image) for image in images]
    colour_ok = [m[0] == c.split()[1] for m, c in zip(measured, captions)]
    shape_ok = [m[1] == c.split()[2] for m, c in zip(measured, captions)]
    labels = [f"{c.split()[1][:3]} {c.split()[2][:3]}{'' if ok else ' x'}" for c, ok in zip(captions, colour_ok)]
    grid_png(images, labels, os.path.join(out_dir, "samples.png"), columns=len(shapes.SHAPES) * 2)

    params = jax.device_get(result.state.params)
    parity_worst, exports = _export_and_check(cfg.model, params, out_dir)
    colour_acc, shape_acc = float(np.mean(colour_ok)), float(np.mean(shape_ok))
    report = {
        "steps": steps, "resumed_from_step": resumed_from, "final_loss": result.losses[-1][1],
        "first_loss": result.losses[0][1], "colour_accuracy": colour_acc, "shape_accuracy": shape_acc,
        "samples": len(captions), "export_parity_worst_fp32": parity_worst, "exports": exports,
    }
    ok = colour_acc >= TARGET_ACCURACY and parity_worst <= 1e-5
    lines = [
        f"SANA shapes demo: {cfg.model.name}, {steps} optimizer steps (batch {cfg.batch_size}, CAME, "
        f"lr {cfg.optim.lr}), stopped at step {resumed_from} and resumed from its checkpoint",
        f"loss {report['first_loss']:.4f} (step {result.losses[0][0]}) -> {report['final_loss']:.4f} (step {steps})",
        f"conditioning: colour named in the caption recovered in {colour_acc:.0%} of {len(captions)} samples "
        f"(target {TARGET_ACCURACY:.0%}); shape in {shape_acc:.0%}",
        f"export: official + diffusers layouts; worst fp32 error of sana_jax vs sana_torch_ref on the trained "
        f"weights {parity_worst:.2e} (target 1e-5)",
        f"files: {out_dir}/samples.png, {cfg.out_dir}/loss.png, {cfg.out_dir}/tensorboard, {out_dir}/report.json",
        "PASS" if ok else "FAIL",
    ]
    with open(os.path.join(out_dir, "report.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    print("\n".join(lines))
    return 0 if ok else 1


def _export_and_check(cfg: SanaConfig, params, out_dir: str) -> tuple[float, dict]:
    from sana_conversion import export_diffusers, export_official
    from sana_jax.cli import parity

    official = os.path.join(out_dir, "export", "shapes_demo.safetensors")
    folder = os.path.join(out_dir, "export", "diffusers")
    export_official(cfg, params, official, overwrite=True)
    export_diffusers(cfg, params, folder, overwrite=True)
    _, reloaded = sana_jax.load_pretrained(official, config=cfg)
    inputs = parity.random_inputs(cfg, batch=2, latent_hw=(8, 8), tokens=cfg.model_max_length)
    rows = parity.parity_report(cfg, reloaded, inputs, dtypes=("float32",))
    return max(r.rel for r in rows if r.impl == "jax"), {"official": official, "diffusers": folder}
