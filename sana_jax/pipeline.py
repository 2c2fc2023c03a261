"""SANA text-to-image in JAX: prompt embeddings -> guidance -> sampler -> DC-AE decode -> images.

    pipe = SanaPipeline(model, params, prompt_encoder=gemma_prompt_encoder(enc, enc_params, tokenizer),
                        decoder=dcae_decoder(vae, vae_params))
    out = pipe(["a cyberpunk cat"], height=1024, width=1024, seed=0)   # out.images uint8 [B, H, W, 3]

Guidance follows the model: SANA / SANA-1.5 (no guidance embedder) use classifier-free guidance with the null
(negative) caption, v = u + g (c - u) in fp32, when guidance_scale > 1 (diffusers' rule; at exactly 1 the result is
the conditional velocity either way); SANA-Sprint embeds g in the model (one pass, no negative caption).

The uncond half's caption mask (`uncond_mask`): "cond" (default) is SANA's (`SanaMS.forward` receives the cond
mask for the whole CFG batch: reference/sana-original.md §1.2 item 9, §6), "negative" is diffusers' SanaPipeline
(the negative prompt's own tokenizer mask: BOS only for ""). The negative caption itself is the Gemma encoding of
`negative_prompt` ("" by default) without CHI and without index selection, in both.

Resolution binning (diffusers' `use_resolution_binning`, on by default): the requested size picks the nearest
aspect ratio of the table for the model's `sample_size` (16 -> 512 px, 32 -> 1024, 64 -> 2048, 128 -> 4096 px
tables, copied from diffusers), the image is generated there and bilinearly resized to cover the requested size,
then centre-cropped. Reproducibility: image i of a call draws its start noise (and Sprint's per-step noise) from
numpy's `default_rng([seed, image_offset + i])`, so a seed gives the same images on any platform, batching or
data mesh.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from sana_jax import sampling
from sana_jax.model import SanaTransformer
from sana_jax.ops import TRANSFORMER_COMPILER_OPTIONS

Array = jax.Array
# (prompts, *, negative) -> (embeddings [B, L, C], mask [B, L]); negative=True encodes without CHI / selection.
PromptEncoder = Callable[..., tuple[Array, Array]]
# unscaled latents [B, h, w, C_latent] (z / scaling_factor) -> images [B, h f, w f, 3] in [-1, 1].
Decoder = Callable[[Array], Array]
UncondMask = Literal["cond", "negative"]

DCAE_SCALING_FACTOR = 0.41407  # dc-ae-f32c32-sana-1.0 / 1.1 config (reference/sana-original.md §9)
DEFAULT_GUIDANCE_SCALE = 4.5  # scripts/inference.py cfg_scale; Sprint's pipeline default too

# diffusers pipelines/pixart_alpha/pipeline_pixart_alpha.py (SanaPipeline, sample_size 16)
ASPECT_RATIO_512_BIN: dict[str, tuple[int, int]] = {
    "0.25": (256, 1024), "0.28": (256, 928), "0.32": (288, 896), "0.33": (288, 864), "0.35": (288, 832),
    "0.4": (320, 800), "0.42": (320, 768), "0.48": (352, 736), "0.5": (352, 704), "0.52": (352, 672),
    "0.57": (384, 672), "0.6": (384, 640), "0.68": (416, 608), "0.72": (416, 576), "0.78": (448, 576),
    "0.82": (448, 544), "0.88": (480, 544), "0.94": (480, 512), "1.0": (512, 512), "1.07": (512, 480),
    "1.13": (544, 480), "1.21": (544, 448), "1.29": (576, 448), "1.38": (576, 416), "1.46": (608, 416),
    "1.67": (640, 384), "1.75": (672, 384), "2.0": (704, 352), "2.09": (736, 352), "2.4": (768, 320),
    "2.5": (800, 320), "3.0": (864, 288), "4.0": (1024, 256),
}
# diffusers pipelines/pixart_alpha/pipeline_pixart_alpha.py (sample_size 32)
ASPECT_RATIO_1024_BIN: dict[str, tuple[int, int]] = {
    "0.25": (512, 2048), "0.28": (512, 1856), "0.32": (576, 1792), "0.33": (576, 1728), "0.35": (576, 1664),
    "0.4": (640, 1600), "0.42": (640, 1536), "0.48": (704, 1472), "0.5": (704, 1408), "0.52": (704, 1344),
    "0.57": (768, 1344), "0.6": (768, 1280), "0.68": (832, 1216), "0.72": (832, 1152), "0.78": (896, 1152),
    "0.82": (896, 1088), "0.88": (960, 1088), "0.94": (960, 1024), "1.0": (1024, 1024), "1.07": (1024, 960),
    "1.13": (1088, 960), "1.21": (1088, 896), "1.29": (1152, 896), "1.38": (1152, 832), "1.46": (1216, 832),
    "1.67": (1280, 768), "1.75": (1344, 768), "2.0": (1408, 704), "2.09": (1472, 704), "2.4": (1536, 640),
    "2.5": (1600, 640), "3.0": (1728, 576), "4.0": (2048, 512),
}
# diffusers pipelines/pixart_alpha/pipeline_pixart_sigma.py (sample_size 64)
ASPECT_RATIO_2048_BIN: dict[str, tuple[int, int]] = {
    "0.25": (1024, 4096), "0.26": (1024, 3968), "0.27": (1024, 3840), "0.28": (1024, 3712), "0.32": (1152, 3584),
    "0.33": (1152, 3456), "0.35": (1152, 3328), "0.4": (1280, 3200), "0.42": (1280, 3072), "0.48": (1408, 2944),
    "0.5": (1408, 2816), "0.52": (1408, 2688), "0.57": (1536, 2688), "0.6": (1536, 2560), "0.68": (1664, 2432),
    "0.72": (1664, 2304), "0.78": (1792, 2304), "0.82": (1792, 2176), "0.88": (1920, 2176), "0.94": (1920, 2048),
    "1.0": (2048, 2048), "1.07": (2048, 1920), "1.13": (2176, 1920), "1.21": (2176, 1792), "1.29": (2304, 1792),
    "1.38": (2304, 1664), "1.46": (2432, 1664), "1.67": (2560, 1536), "1.75": (2688, 1536), "2.0": (2816, 1408),
    "2.09": (2944, 1408), "2.4": (3072, 1280), "2.5": (3200, 1280), "2.89": (3328, 1152), "3.0": (3456, 1152),
    "3.11": (3584, 1152), "3.62": (3712, 1024), "3.75": (3840, 1024), "3.88": (3968, 1024), "4.0": (4096, 1024),
}
# diffusers pipelines/sana/pipeline_sana.py (sample_size 128)
ASPECT_RATIO_4096_BIN: dict[str, tuple[int, int]] = {
    "0.25": (2048, 8192), "0.26": (2048, 7936), "0.27": (2048, 7680), "0.28": (2048, 7424), "0.32": (2304, 7168),
    "0.33": (2304, 6912), "0.35": (2304, 6656), "0.4": (2560, 6400), "0.42": (2560, 6144), "0.48": (2816, 5888),
    "0.5": (2816, 5632), "0.52": (2816, 5376), "0.57": (3072, 5376), "0.6": (3072, 5120), "0.68": (3328, 4864),
    "0.72": (3328, 4608), "0.78": (3584, 4608), "0.82": (3584, 4352), "0.88": (3840, 4352), "0.94": (3840, 4096),
    "1.0": (4096, 4096), "1.07": (4096, 3840), "1.13": (4352, 3840), "1.21": (4352, 3584), "1.29": (4608, 3584),
    "1.38": (4608, 3328), "1.46": (4864, 3328), "1.67": (5120, 3072), "1.75": (5376, 3072), "2.0": (5632, 2816),
    "2.09": (5888, 2816), "2.4": (6144, 2560), "2.5": (6400, 2560), "2.89": (6656, 2304), "3.0": (6912, 2304),
    "3.11": (7168, 2304), "3.62": (7424, 2048), "3.75": (7680, 2048), "3.88": (7936, 2048), "4.0": (8192, 2048),
}

BINS_BY_SAMPLE_SIZE = {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN,
                       128: ASPECT_RATIO_4096_BIN}


def aspect_ratio_bins(sample_size: int) -> dict[str, tuple[int, int]]:
    """The binning table for a transformer `sample_size` (latent side at the trained resolution), as SanaPipeline."""
    if sample_size not in BINS_BY_SAMPLE_SIZE:
        raise ValueError(f"no aspect-ratio bins for sample_size {sample_size} (SANA has 16, 32, 64, 128 = 512, 1024, "
                         "2048, 4096 px); pass resolution_binning=False")
    return BINS_BY_SAMPLE_SIZE[sample_size]


def classify_height_width_bin(height: int, width: int, ratios: dict[str, tuple[int, int]]) -> tuple[int, int]:
    """(height, width) of the bin whose aspect ratio key is nearest height / width (first on ties, as diffusers)."""
    aspect = float(height / width)
    closest = min(ratios, key=lambda ratio: abs(float(ratio) - aspect))
    return int(ratios[closest][0]), int(ratios[closest][1])


def resize_and_crop(images: Array, height: int, width: int) -> Array:
    """[B, H, W, C] -> [B, height, width, C]: bilinear resize (half-pixel centres, no antialiasing, as torch's
    `F.interpolate(align_corners=False)`) to cover the target, then a centre crop (PixArtImageProcessor)."""
    b, h, w, c = images.shape
    if (h, w) == (height, width):
        return images
    ratio = max(height / h, width / w)
    new_h, new_w = int(h * ratio), int(w * ratio)
    images = jax.image.resize(images, (b, new_h, new_w, c), method="bilinear", antialias=False)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return images[:, top:top + height, left:left + width]


def to_uint8(images) -> np.ndarray:
    """Images in [-1, 1] -> uint8 [0, 255] numpy, as diffusers' postprocess: round(clip(x / 2 + 0.5) * 255) in fp32.

    Computed where the images are (on the device for a decoder's output), so a quarter of the bytes of fp32 cross
    to the host; the same IEEE operations as numpy's (x / 2 is exact; round half to even), hence the same bytes."""
    return np.asarray(_quantize(jnp.asarray(images)))


@jax.jit
def _quantize(images: Array) -> Array:
    unit = jnp.clip(images.astype(jnp.float32) / 2 + 0.5, 0.0, 1.0)
    return jnp.round(unit * 255).astype(jnp.uint8)


def gemma_prompt_encoder(encoder, params, tokenizer, *, chi: Sequence[str] | None | Literal["sana"] = "sana",
                         max_length: int = 300, preprocess: str = "sana") -> PromptEncoder:
    """A `PromptEncoder` over `sana_jax.text` (Gemma-2): prompts with SANA's CHI and select index, the negative
    prompt without either (SANA and diffusers). chi="sana" is `sana_jax.text.SANA_CHI`; None disables it."""
    from sana_jax import text

    chi_lines = text.SANA_CHI if chi == "sana" else chi

    def encode(prompts: Sequence[str], *, negative: bool = False) -> tuple[Array, Array]:
        return text.encode_prompts(encoder, params, tokenizer, list(prompts), chi=None if negative else chi_lines,
                                   max_length=max_length, preprocess=preprocess)

    return encode


@functools.partial(jax.jit, static_argnums=0)
def _dcae_decode(vae, params, latents: Array) -> Array:
    return vae.apply({"params": params}, latents, method="decode")


class DCAEDecoder:
    """A `Decoder` over a DC-AE (`sana_jax.dcae`): jitted `vae.apply(..., method="decode")`, parameters replicated
    over `mesh` when one is given, so a batch-sharded latent decodes data-parallel."""

    def __init__(self, vae, params, mesh: Mesh | None = None):
        self.vae = vae
        self.params = params if mesh is None else jax.device_put(params, NamedSharding(_auto_mesh(mesh), P()))
        self.scaling_factor = float(vae.config.scaling_factor)
        self.spatial_compression = int(vae.config.spatial_compression)

    def __call__(self, latents: Array) -> Array:
        return _dcae_decode(self.vae, self.params, latents)


def dcae_decoder(vae, params, mesh: Mesh | None = None) -> DCAEDecoder:
    """`DCAEDecoder(vae, params, mesh)`: carries the VAE's scaling_factor and spatial_compression."""
    return DCAEDecoder(vae, params, mesh)


@dataclasses.dataclass(frozen=True)
class SanaOutput:
    """latents: [B, h, w, C] fp32 final latents as the transformer sees them (scaled; decode takes
    latents / scaling_factor); images: uint8 [B, H, W, 3] at the requested size, or None without a decoder;
    size: (height, width) actually generated (the bin when resolution binning moved it)."""

    latents: Array
    images: np.ndarray | None
    size: tuple[int, int]


@functools.partial(jax.jit, static_argnames=("model", "method", "guidance"),
                   compiler_options=TRANSFORMER_COMPILER_OPTIONS)
def _sample_latents(model: SanaTransformer, params, schedule: sampling.Schedule, noise, step_noise, y, mask, y_null,
                    mask_null, guidance_scale, *, method: str, guidance: Literal["none", "cfg", "embedded"]):
    """The whole sampling loop as one program, compiled once per (model, method, step count, guidance kind,
    shapes): the schedule (flow shift, timestep convention, scm grid) and the guidance scale are arguments.
    noise [B, h, w, C]; y [B, L, C_cap], mask [B, L]; y_null, mask_null the uncond half under CFG; guidance_scale
    [] (CFG) or [B] (embedded)."""
    cfg = model.config

    def apply(x, t, y_, mask_, **kw):
        return model.apply({"params": params}, x, t, y_, mask_, **kw).astype(jnp.float32)

    def velocity(x, t):  # t [B] on the 0..1000 scale
        if guidance == "embedded":  # Sprint: continuous t (timestep_norm_scale_factor 1000), g embedded
            return apply(x, t / sampling.NUM_TRAIN_TIMESTEPS, y, mask, guidance=guidance_scale)
        t = t * cfg.timestep_scale  # diffusers' SanaPipeline (1.0 for every released model but the Sprint teacher)
        if guidance == "none":
            return apply(x, t, y, mask)
        b = x.shape[0]
        # CFG batch interleaved [u0, c0, u1, c1, ...] rather than [uncond; cond]: on a batch-sharded mesh every
        # device then holds both halves of its own images, so neither the doubling nor the split moves data.
        pair = lambda u, c: jnp.stack([u, c], axis=1).reshape(2 * b, *u.shape[1:])  # noqa: E731
        v = apply(pair(x, x), pair(t, t), pair(y_null, y), pair(mask_null, mask))
        v = v.reshape(b, 2, *x.shape[1:])
        uncond, cond = v[:, 0], v[:, 1]
        return uncond + guidance_scale * (cond - uncond)

    return sampling.run_schedule(velocity, noise, method, schedule.timesteps, schedule.grid, schedule.coefficients,
                                 step_noise=step_noise)


def draw_noise(seed: int, offset: int, count: int, shape: tuple[int, ...], steps: int = 0):
    """Start noise [count, *shape] and per-step noise [steps, count, *shape], float32 numpy, standard normal.

    Image i draws from `np.random.default_rng([seed, offset + i])` (start first, then its per-step draws): the
    same on every platform and for any batching or sharding of the images. On the host because the draws are
    small (latents) and a jitted threefry draw costs seconds of XLA compile per shape.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    start = np.empty((count, *shape), np.float32)
    per_step = np.empty((steps, count, *shape), np.float32)
    for i in range(count):
        rng = np.random.default_rng([int(seed), int(offset) + i])
        start[i] = rng.standard_normal(shape, np.float32)
        per_step[:, i] = rng.standard_normal((steps, *shape), np.float32)
    return start, per_step


class SanaPipeline:
    """SANA / SANA-1.5 / SANA-Sprint text-to-image generation in JAX.

    Args:
      model, params: a `SanaTransformer` and its parameters (e.g. from `sana_jax.load_pretrained`).
      prompt_encoder: turns prompt strings into caption features (`gemma_prompt_encoder`); None: pass
        `prompt_embeds` (and `negative_embeds` for CFG) to each call.
      decoder: unscaled latents -> images in [-1, 1] (`dcae_decoder`); None: calls return latents only.
      scaling_factor: latents are divided by it before decoding. Default: the decoder's, else 0.41407 (DC-AE).
      vae_scale_factor: pixels per latent cell. Default: the decoder's spatial_compression, else 32 (DC-AE f32).
      mesh: a device mesh with a `data_axis` axis: the batch is sharded over it (padded to a multiple of its size)
        and parameters are replicated; None runs on the default device.
    """

    def __init__(self, model: SanaTransformer, params, *, prompt_encoder: PromptEncoder | None = None,
                 decoder: Decoder | None = None, scaling_factor: float | None = None,
                 vae_scale_factor: int | None = None, mesh: Mesh | None = None, data_axis: str = "data"):
        self.model = model
        self.config = model.config
        self.prompt_encoder = prompt_encoder
        self.decoder = decoder
        self.scaling_factor = float(scaling_factor or getattr(decoder, "scaling_factor", DCAE_SCALING_FACTOR))
        self.vae_scale_factor = int(vae_scale_factor or getattr(decoder, "spatial_compression", 32))
        if mesh is not None:
            if data_axis not in mesh.axis_names:
                raise ValueError(f"mesh has axes {mesh.axis_names}, no data axis {data_axis!r}")
            mesh = _auto_mesh(mesh)
        self.mesh, self.data_axis = mesh, data_axis
        self.params = params if mesh is None else jax.device_put(params, NamedSharding(mesh, P()))

    @classmethod
    def from_pretrained(cls, checkpoint: str, *, config=None, vae: str | None = None,
                        text_encoder: str | None = None, tokenizer: str | None = None, mesh: Mesh | None = None,
                        data_axis: str = "data") -> "SanaPipeline":
        """Load the transformer (any format `sana_jax.load_pretrained` reads), optionally a DC-AE folder (`vae`)
        and a Gemma-2 folder (`text_encoder`, with its tokenizer unless `tokenizer` names another folder)."""
        import sana_jax

        model, params = sana_jax.load_pretrained(checkpoint, config=config)
        decoder = prompt_encoder = None
        if vae is not None:
            from sana_jax import dcae

            decoder = dcae_decoder(*dcae.load_pretrained(vae), mesh=mesh)
        if text_encoder is not None:
            from sana_jax import text

            encoder, encoder_params = text.load_gemma2(text_encoder)
            tok = text.load_tokenizer(tokenizer or text_encoder)
            prompt_encoder = gemma_prompt_encoder(encoder, encoder_params, tok)
        return cls(model, params, prompt_encoder=prompt_encoder, decoder=decoder, mesh=mesh, data_axis=data_axis)

    def __call__(self, prompt: str | Sequence[str] | None = None, *, prompt_embeds=None, prompt_mask=None,
                 negative_prompt: str = "", negative_embeds=None, negative_mask=None, height: int = 1024,
                 width: int = 1024, num_images_per_prompt: int = 1, seed: int = 0, method: str | None = None,
                 steps: int | None = None, guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
                 flow_shift: float | None = None, timestep_convention: str = "sana", uncond_mask: UncondMask = "cond",
                 resolution_binning: bool = True, max_timestep: float = sampling.SCM_MAX_TIMESTEP,
                 intermediate_timestep: float | None = None, noise=None, step_noise=None, image_offset: int = 0,
                 decode: bool = True) -> SanaOutput:
        """Generate B = len(prompts) * num_images_per_prompt images (each prompt's copies consecutive).

        Args:
          prompt: a prompt or a list (needs `prompt_encoder`); or instead
          prompt_embeds: [B_p, L, caption_channels] caption features with prompt_mask [B_p, L] (1 keep / 0 pad;
            None keeps every token).
          negative_prompt / negative_embeds [1 or B_p, L, C], negative_mask: the CFG null caption ("" encoded
            without CHI by `prompt_encoder` unless `negative_embeds` is given). Unused by Sprint and for g <= 1.
          height, width: output size in pixels (default 1024). Without binning, multiples of vae_scale_factor x
            patch_size (32).
          seed: image i draws from np.random.default_rng([seed, image_offset + i]), so a long list generated in
            chunks (image_offset = index of the chunk's first image) gives the same images as one call. Or
            noise [B, h, w, C_in] (and for scm step_noise [steps, B, h, w, C_in]) to give the draws explicitly.
          method, steps, flow_shift, timestep_convention, max_timestep, intermediate_timestep: see
            `sampling.sample`. Defaults: "scm" for Sprint models else "flow_dpm_solver", the method's default steps,
            the config's flow_shift.
          guidance_scale: CFG scale (SANA / 1.5: CFG when > 1) or the embedded guidance (Sprint). Default 4.5.
          uncond_mask: "cond" (SANA) or "negative" (diffusers): the caption mask of the CFG uncond half.
          resolution_binning: generate at the nearest bin of the model's table, resize and crop back.
          decode: run the decoder (when there is one).
        Returns:
          `SanaOutput` (latents, images uint8 or None, generated size).
        """
        cfg = self.config
        method = method or ("scm" if cfg.guidance_embeds else "flow_dpm_solver")
        steps = sampling.DEFAULT_STEPS.get(method, 0) if steps is None else steps
        flow_shift = cfg.flow_shift if flow_shift is None else flow_shift
        # Host-side; validates method, steps, shift, convention and the scm grid before anything is traced.
        schedule = sampling.make_schedule(method, steps, flow_shift, timestep_convention, max_timestep,
                                          intermediate_timestep)
        if uncond_mask not in ("cond", "negative"):
            raise ValueError(f"uncond_mask must be 'cond' (SANA) or 'negative' (diffusers), got {uncond_mask!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        size = self._generation_size(height, width, resolution_binning)

        y, mask = self._prompt_embeddings(prompt, prompt_embeds, prompt_mask)
        guidance = "embedded" if cfg.guidance_embeds else ("cfg" if guidance_scale > 1 else "none")
        y_null = mask_null = None
        if guidance == "cfg":
            y_null, mask_null = self._negative_embeddings(negative_prompt, negative_embeds, negative_mask, y, mask,
                                                          uncond_mask)
        # Each prompt's copies consecutive, as diffusers' num_images_per_prompt.
        y, mask, y_null, mask_null = (None if a is None else jnp.repeat(a, num_images_per_prompt, axis=0)
                                      for a in (y, mask, y_null, mask_null))
        batch = y.shape[0]
        padded = batch if self.mesh is None else -(-batch // self.mesh.shape[self.data_axis]) * \
            self.mesh.shape[self.data_axis]

        latent_shape = (size[0] // self.vae_scale_factor, size[1] // self.vae_scale_factor, cfg.in_channels)
        noise, step_noise = self._noise(seed, image_offset, batch, padded, latent_shape, method, steps, noise,
                                        step_noise)
        scale = jnp.full((padded,), guidance_scale, jnp.float32) if guidance == "embedded" else \
            jnp.float32(guidance_scale)
        args = (noise, step_noise, y, mask, y_null, mask_null)
        args = tuple(None if a is None else _pad_batch(a, padded, axis=1 if a is step_noise else 0) for a in args)
        args = self._shard((*args, scale))
        with self._batch_mesh():
            latents = _sample_latents(self.model, self.params, schedule, *args, method=method, guidance=guidance)

        images = None
        if decode and self.decoder is not None:
            pixels = self.decoder(latents / self.scaling_factor)
            if resolution_binning and size != (height, width):
                pixels = resize_and_crop(pixels, height, width)
            images = to_uint8(pixels[:batch])
        return SanaOutput(latents=latents[:batch], images=images, size=size)

    def _generation_size(self, height, width, resolution_binning) -> tuple[int, int]:
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        size = (int(height), int(width))
        if resolution_binning:
            size = classify_height_width_bin(height, width, aspect_ratio_bins(self.config.sample_size))
        factor = self.vae_scale_factor * self.config.patch_size
        if size[0] % factor or size[1] % factor:
            raise ValueError(f"height and width must be multiples of {factor} (VAE factor {self.vae_scale_factor} x "
                             f"patch size {self.config.patch_size}), got {size[0]}x{size[1]}; use "
                             "resolution_binning=True to snap to SANA's aspect-ratio bins")
        return size

    def _prompt_embeddings(self, prompt, prompt_embeds, prompt_mask) -> tuple[Array, Array]:
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompt (strings) and prompt_embeds (caption features)")
        channels = self.config.caption_channels
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not prompts or not all(isinstance(p, str) for p in prompts):
                raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
            if self.prompt_encoder is None:
                raise ValueError("prompt strings need a prompt_encoder (e.g. gemma_prompt_encoder(...)); or pass "
                                 "prompt_embeds")
            prompt_embeds, prompt_mask = self.prompt_encoder(prompts, negative=False)
        y = jnp.asarray(prompt_embeds, jnp.float32)  # fp32 (exact for bf16 features): one compile for both
        if y.ndim != 3 or y.shape[-1] != channels:
            raise ValueError(f"prompt_embeds must be [B, L, {channels}] (caption_channels of {self.config.name!r}), "
                             f"got {tuple(y.shape)}")
        mask = jnp.ones(y.shape[:2], jnp.int32) if prompt_mask is None else jnp.asarray(prompt_mask, jnp.int32)
        if tuple(mask.shape) != tuple(y.shape[:2]):
            raise ValueError(f"prompt_mask must be [B, L] = {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
        return y, mask

    def _negative_embeddings(self, negative_prompt, negative_embeds, negative_mask, y, mask, uncond_mask):
        if negative_embeds is None:
            if self.prompt_encoder is None:
                raise ValueError("classifier-free guidance (guidance_scale > 1) needs the null caption: pass "
                                 "negative_embeds (the Gemma-2 encoding of \"\", [1, L, C]) or a prompt_encoder, or "
                                 "set guidance_scale=1")
            negative_embeds, negative_mask = self.prompt_encoder([negative_prompt], negative=True)
        y_null = jnp.asarray(negative_embeds, jnp.float32)
        if y_null.ndim != 3 or y_null.shape[0] not in (1, y.shape[0]) or y_null.shape[1:] != y.shape[1:]:
            raise ValueError(f"negative_embeds must be [1 or {y.shape[0]}, {y.shape[1]}, {y.shape[2]}] to match "
                             f"prompt_embeds {tuple(y.shape)}, got {tuple(y_null.shape)}")
        y_null = jnp.broadcast_to(y_null, y.shape)
        if uncond_mask == "cond":  # SANA: the whole CFG batch carries the cond mask
            return y_null, mask
        if negative_mask is None:
            raise ValueError("uncond_mask='negative' (diffusers) needs negative_mask with negative_embeds")
        mask_null = jnp.asarray(negative_mask, jnp.int32)
        if mask_null.ndim != 2 or mask_null.shape[0] not in (1, y.shape[0]) or mask_null.shape[1] != y.shape[1]:
            raise ValueError(f"negative_mask must be [1 or {y.shape[0]}, {y.shape[1]}], got {tuple(mask_null.shape)}")
        return y_null, jnp.broadcast_to(mask_null, mask.shape)

    def _noise(self, seed, offset, batch, padded, latent_shape, method, steps, noise, step_noise):
        scm = method == "scm"
        if noise is None:
            if step_noise is not None:
                raise ValueError("step_noise needs noise too (explicit draws replace the seed)")
            start, per_step = draw_noise(seed, offset, padded, latent_shape, steps if scm else 0)
            return jnp.asarray(start), jnp.asarray(per_step) if scm else None
        noise = jnp.asarray(noise, jnp.float32)
        if noise.shape != (batch, *latent_shape):
            raise ValueError(f"noise must be [B, h, w, C] = {(batch, *latent_shape)}, got {tuple(noise.shape)}")
        if not scm:
            return noise, None
        if step_noise is None:
            # Fresh per-step draws from the seed (one key per image, as when the seed draws everything).
            return noise, jnp.asarray(draw_noise(seed, offset, batch, latent_shape, steps)[1])
        step_noise = jnp.asarray(step_noise, jnp.float32)
        if step_noise.shape != (steps, batch, *latent_shape):
            raise ValueError(f"step_noise must be [steps, B, h, w, C] = {(steps, batch, *latent_shape)}, got "
                             f"{tuple(step_noise.shape)}")
        return noise, step_noise

    def _batch_mesh(self) -> contextlib.AbstractContextManager:
        """The mesh and the rule that tell the model's Pallas kernels to run per device on the data axis
        (sana_jax.model.on_batch_shards); nothing without a mesh."""
        stack = contextlib.ExitStack()
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh))
            stack.enter_context(nn.logical_axis_rules((("activation_batch", self.data_axis),)))
        return stack

    def _shard(self, args):
        """Batch-shard every per-image argument over the data axis (step noise on its axis 1); keep scalars."""
        if self.mesh is None:
            return args

        def put(a, axis):
            if a is None or a.ndim == 0:
                return a
            spec = [None] * a.ndim
            spec[axis] = self.data_axis
            return jax.device_put(a, NamedSharding(self.mesh, P(*spec)))

        noise, step_noise, *rest = args
        return (put(noise, 0), put(step_noise, 1), *(put(a, 0) for a in rest))


def _auto_mesh(mesh: Mesh) -> Mesh:
    """The same devices and axis names with Auto axis types: the pipeline shards its inputs and lets `jit`
    propagate (an Explicit mesh, `jax.make_mesh`'s default, would need an out_sharding on every gather/slice)."""
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,) * len(mesh.axis_names))


def _pad_batch(a: Array, size: int, axis: int = 0) -> Array:
    """Pad `axis` to `size` by repeating the last entry (the extra images are computed and dropped)."""
    missing = size - a.shape[axis]
    if missing == 0:
        return a
    widths = [(0, 0)] * a.ndim
    widths[axis] = (0, missing)
    return jnp.pad(a, widths, mode="edge")
