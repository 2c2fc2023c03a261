"""The main job on an embedded default: train a small SANA from scratch on coloured shapes, on a CPU, in minutes.

Steps: build the procedural cache (sana_jax/train/shapes.py) -> train with SANA's recipe (CAME, logit-normal
integer timesteps, caption dropout, clipping, warmup) for half the steps -> stop and resume from the orbax
checkpoint -> finish -> sample every caption with the project's flow DPM-Solver and CFG -> measure colour and
shape of every image -> export to the official and diffusers layouts and check parity of the export against
sana_torch_ref and diffusers. Writes samples.png, report.txt and report.json under the output folder, and the
run's loss.png and sample grids every 150 steps (run/samples/, sana_jax/train/samples.py) during training; the
grids and the final samples share one sampler (`samples.sample_latents`) and one compiled program.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np

import sana_jax
from sana_jax.configs import SanaConfig
from sana_jax.train import samples, shapes
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
                       batch_size=32, steps=steps, log_every=10, checkpoint_every=200, seed=0,
                       sample_every=150, sample_count=len(shapes.captions()), sample_decoder="shapes")


def generate(cfg: SanaConfig, params, captions: list[str], seed: int, guidance: float = 4.5,
             steps: int = 20, image_offset: int = 0) -> np.ndarray:
    """Images [len(captions), 32, 32, 3] in [-1, 1] with CFG (uncond = null caption with the cond mask, as SANA),
    by the sampler of the training grids; image i starts from default_rng([seed, image_offset + i])."""
    table = shapes.word_table()
    y, mask = (np.stack(a) for a in zip(*(shapes.encode_caption(c, table) for c in captions)))
    null_y = shapes.encode_caption("", table)[0]
    latents = samples.sample_latents(cfg, params, y, mask, null_y, (8, 8), seed=seed, guidance=guidance,
                                     steps=steps, flow_shift=cfg.flow_shift, image_offset=image_offset)
    return shapes.from_latent(latents)


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

    # In chunks of one image per caption: the batch size of the training grids, so one compiled sampler.
    chunk = shapes.captions()
    captions = chunk * samples_per_caption
    images = np.concatenate([generate(cfg.model, result.state.params, chunk, seed=1, image_offset=i * len(chunk))
                             for i in range(samples_per_caption)])
    measured = [shapes.measure(image) for image in images]
    colour_ok = [m[0] == c.split()[1] for m, c in zip(measured, captions)]
    shape_ok = [m[1] == c.split()[2] for m, c in zip(measured, captions)]
    labels = [f"{c.split()[1][:3]} {c.split()[2][:3]}{'' if ok else ' x'}" for c, ok in zip(captions, colour_ok)]
    samples.grid_png(images, labels, os.path.join(out_dir, "samples.png"), columns=len(shapes.SHAPES) * 2)

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
        f"files: {out_dir}/samples.png, {cfg.out_dir}/samples/ (grids during training), {cfg.out_dir}/loss.png, "
        f"{cfg.out_dir}/tensorboard, {out_dir}/report.json",
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
