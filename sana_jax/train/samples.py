"""Sample grids during training: the same captions, the same noise, the current weights, one labelled PNG.

Every `sample_every` optimizer steps (and at the end) the loop writes `out_dir/samples/step-NNNNNNN.png`:
- prompts: the first `sample_count` distinct captions of the training cache, with their cached caption embeddings
  and masks, and the cache's null caption for classifier-free guidance, so no text encoder is needed;
- sampler: the project's pipeline (`sana_jax.pipeline.SanaPipeline`: flow DPM-Solver++, CFG with the uncond half
  carrying the cond mask as SANA does), `sample_steps` steps, the training flow shift, `sample_guidance`, start
  noise from numpy's `default_rng([cfg.seed, i])` for image i, so successive grids differ only by the weights;
  the jitted sampling program is compiled once per run (the pipeline's jit, keyed by model and shapes);
- weights: the EMA copy when the run keeps one, else the params;
- decoder (`sample_decoder`): "" a latent preview (latent channels 0, 1, 2 as RGB, min-max normalised per image,
  one pixel per latent cell; no VAE needed), "shapes" the shapes demo's exact pixel shuffle by 4
  (`shapes.from_latent`), or a DC-AE folder (`sana_jax.dcae.load_pretrained`; latents divided by the cache's
  scaling_factor first).
All images are sampled at the latent size of the cache's first shard. Every process runs the sampler (the
weights may be sharded over all of them); process 0 decodes and writes the PNG (and a TensorBoard image).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import jax
import numpy as np
from PIL import Image, ImageDraw
from safetensors import safe_open

from sana_jax.configs import SanaConfig
from sana_jax.model import SanaTransformer
from sana_jax.pipeline import SanaPipeline, to_uint8
from sana_jax.train.data import read_index, read_shard_captions

# latents as the transformer sees them [B, h, w, C] -> images [B, H, W, 3] in [-1, 1] (numpy)
Decoder = Callable[[np.ndarray], np.ndarray]
MIN_CELL, MAX_CELL, LABEL_HEIGHT, CHAR_WIDTH = 96, 512, 14, 6  # grid tile bounds (px); PIL's default font


def cache_prompts(data_dir: str, count: int) -> dict:
    """The first `count` distinct captions of a training cache (shards in index order) with their embeddings.

    Returns {"captions": [n], "y": [n, L, C_cap], "mask": [n, L], "null_y": [L, C_cap], "latent_hw": (h, w) of the
    first shard, "latent_channels", "scaling_factor"}; n = min(count, distinct captions in the cache).
    """
    index = read_index(data_dir)
    captions, ys, masks = [], [], []
    for shard in index["shards"]:
        if len(captions) == count:
            break
        path = os.path.join(data_dir, shard["file"])
        names = read_shard_captions(path)
        with safe_open(path, framework="np") as f:
            for row, caption in enumerate(names):
                if len(captions) == count:
                    break
                if caption not in captions:
                    captions.append(caption)
                    ys.append(f.get_slice("y")[row:row + 1][0])
                    masks.append(f.get_slice("mask")[row:row + 1][0])
    with safe_open(os.path.join(data_dir, "null.safetensors"), framework="np") as f:
        null_y = f.get_tensor("y")
    return {"captions": captions, "y": np.stack(ys).astype(np.float32), "mask": np.stack(masks).astype(np.int32),
            "null_y": null_y.astype(np.float32), "latent_hw": tuple(index["shards"][0]["latent_hw"]),
            "latent_channels": int(index["latent_channels"]), "scaling_factor": float(index["scaling_factor"])}


def sample_latents(model_cfg: SanaConfig, params, y, mask, null_y, latent_hw: tuple[int, int], *, seed: int,
                   guidance: float = 4.5, steps: int = 20, flow_shift: float | None = None,
                   image_offset: int = 0) -> np.ndarray:
    """CFG samples of caption embeddings y [B, L, C_cap] (mask [B, L]; null_y [L, C_cap] the uncond caption) with
    the pipeline's flow DPM-Solver: latents [B, h, w, C_out] fp32 numpy on every process, as the transformer sees
    them. Image i starts from `default_rng([seed, image_offset + i])`. `params` may be sharded over any mesh
    (several processes included); the sampling program is jitted once per (model, shapes, steps)."""
    h, w = latent_hw
    pipe = SanaPipeline(SanaTransformer(model_cfg), params, scaling_factor=1.0, vae_scale_factor=1)
    out = pipe(prompt_embeds=y, prompt_mask=mask, negative_embeds=np.asarray(null_y)[None], height=h, width=w,
               resolution_binning=False, method="flow_dpm_solver", steps=steps, guidance_scale=guidance,
               flow_shift=flow_shift, seed=seed, image_offset=image_offset, decode=False)
    latents = out.latents
    if not latents.is_fully_addressable and not latents.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(latents, tiled=True))
    return np.asarray(latents)


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """[B, h, w, C] -> [B, h, w, 3] in [-1, 1]: channels 0, 1, 2 (repeated when C < 3) min-max normalised per
    image. Shows layout and convergence, not colours: a VAE-free look at the latents."""
    x = np.asarray(latents, np.float32)[..., :3]
    x = np.concatenate([x] * 3, axis=-1)[..., :3] if x.shape[-1] < 3 else x
    lo = x.min(axis=(1, 2, 3), keepdims=True)
    hi = x.max(axis=(1, 2, 3), keepdims=True)
    return (x - lo) / np.maximum(hi - lo, 1e-12) * 2.0 - 1.0


def make_decoder(spec: str, latent_channels: int, scaling_factor: float) -> tuple[Decoder, int]:
    """(decoder, pixels per latent cell) for a `sample_decoder` value; bad values raise naming them."""
    if spec == "":
        return latent_preview, 1
    if spec == "shapes":
        from sana_jax.train import shapes

        expected = shapes.FACTOR * shapes.FACTOR * 3
        if latent_channels != expected:
            raise ValueError(f"sample_decoder 'shapes' decodes {expected}-channel latents (pixel unshuffle by "
                             f"{shapes.FACTOR}); the cache has {latent_channels}")
        return shapes.from_latent, shapes.FACTOR
    if not os.path.exists(spec):
        raise FileNotFoundError(f"sample_decoder {spec!r}: not '' (latent preview), 'shapes', or an existing DC-AE "
                                f"folder")
    from sana_jax import dcae
    from sana_jax.pipeline import dcae_decoder

    vae, vae_params = dcae.load_pretrained(spec)
    if vae.config.latent_channels != latent_channels:
        raise ValueError(f"sample_decoder {spec}: the DC-AE has {vae.config.latent_channels} latent channels, the "
                         f"cache {latent_channels}")
    decode = dcae_decoder(vae, vae_params)
    return (lambda z: np.asarray(decode(z / scaling_factor))), int(vae.config.spatial_compression)


def _tile_scale(h: int, w: int) -> float:
    """Integer nearest-neighbour upscale of small images to >= MIN_CELL px, integer downscale of large ones to
    <= MAX_CELL px, else 1."""
    side = max(h, w)
    if side < MIN_CELL:
        return MIN_CELL // side
    return 1.0 / math.ceil(side / MAX_CELL) if side > MAX_CELL else 1


def grid_size(count: int, image_hw: tuple[int, int], columns: int | None = None) -> tuple[int, int]:
    """(width, height) in pixels of `grid_image` for `count` images of image_hw."""
    columns = columns or math.ceil(math.sqrt(count))
    scale = _tile_scale(*image_hw)
    th, tw = int(image_hw[0] * scale), int(image_hw[1] * scale)
    return columns * tw, math.ceil(count / columns) * (th + LABEL_HEIGHT)


def grid_image(images: np.ndarray, labels: Sequence[str], columns: int | None = None) -> Image.Image:
    """A labelled grid of images [B, H, W, 3] in [-1, 1], `columns` wide (default ceil(sqrt(B))), each label under
    its image (cut to the tile's width). Size: `grid_size`."""
    images = to_uint8(images)
    count, h, w = images.shape[:3]
    columns = columns or math.ceil(math.sqrt(count))
    scale = _tile_scale(h, w)
    th, tw = int(h * scale), int(w * scale)
    canvas = Image.new("RGB", grid_size(count, (h, w), columns), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (image, label) in enumerate(zip(images, labels)):
        r, c = divmod(i, columns)
        tile = Image.fromarray(image)
        if scale != 1:
            tile = tile.resize((tw, th), Image.NEAREST if scale > 1 else Image.BOX)
        canvas.paste(tile, (c * tw, r * (th + LABEL_HEIGHT)))
        draw.text((c * tw + 2, r * (th + LABEL_HEIGHT) + th), label[:max(1, tw // CHAR_WIDTH - 1)], fill="black")
    return canvas


def grid_png(images: np.ndarray, labels: Sequence[str], path: str, columns: int | None = None) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid_image(images, labels, columns).save(path)


class SampleGrids:
    """The loop's periodic sampler: `write(step, state)` -> out_dir/samples/step-NNNNNNN.png (see the module
    docstring). Built once per run; the prompts, noise seed and decoder stay fixed."""

    def __init__(self, cfg, directory: str, scalars=None):
        self.cfg, self.directory, self.scalars = cfg, directory, scalars
        self.prompts = cache_prompts(cfg.data_dir, cfg.sample_count)
        self.is_writer = jax.process_index() == 0
        self.decoder = None
        if self.is_writer:  # only process 0 decodes (a DC-AE is loaded there only)
            self.decoder, _ = make_decoder(cfg.sample_decoder, self.prompts["latent_channels"],
                                           self.prompts["scaling_factor"])

    def path(self, step: int) -> str:
        return os.path.join(self.directory, f"step-{step:07d}.png")

    def weights(self, state):
        """The EMA copy when the run keeps one, else the params."""
        return state.ema if state.ema is not None else state.params

    def latents(self, params) -> np.ndarray:
        p, cfg = self.prompts, self.cfg
        return sample_latents(cfg.model, params, p["y"], p["mask"], p["null_y"], p["latent_hw"], seed=cfg.seed,
                              guidance=cfg.sample_guidance, steps=cfg.sample_steps, flow_shift=cfg.flow.shift)

    def images(self, params) -> np.ndarray | None:
        """Decoded images [n, H, W, 3] in [-1, 1] on process 0 (None elsewhere); every process must call it."""
        latents = self.latents(params)
        return self.decoder(latents) if self.is_writer else None

    def write(self, step: int, state) -> str | None:
        """Sample, decode and write the grid of `step`; returns its path on process 0."""
        images = self.images(self.weights(state))
        if not self.is_writer:
            return None
        grid = grid_image(images, self.prompts["captions"])
        os.makedirs(self.directory, exist_ok=True)
        path = self.path(step)
        tmp = path + ".tmp.png"
        grid.save(tmp)
        os.replace(tmp, path)
        if self.scalars is not None:
            self.scalars.image(step, "samples", np.asarray(grid))
        return path
