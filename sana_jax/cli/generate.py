"""`sana-jax generate`: text (or caption features) -> PNGs and a sample grid, through `sana_jax.pipeline`."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
from tqdm import tqdm

# The caption-feature file of --prompt-embeds (safetensors): required and optional keys with their shapes.
EMBEDS_KEYS = {"prompt_embeds": "[B, L, C]", "prompt_mask": "[B, L] (optional)",
               "negative_embeds": "[1 or B, L, C] (optional; CFG's null caption)",
               "negative_mask": "[1 or B, L] (optional)"}


def add_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate images (or latents) with a SANA / SANA-1.5 / Sprint checkpoint")
    gen.add_argument("--checkpoint", required=True,
                     help="official .pth/.safetensors, diffusers folder, or sana-jax export folder")
    gen.add_argument("--config", help="released variant name when key shapes cannot identify the model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for several); needs --text-encoder")
    src.add_argument("--prompt-embeds", help="safetensors of caption features: " + ", ".join(
        f"{k} {v}" for k, v in EMBEDS_KEYS.items()))
    gen.add_argument("--negative-prompt", default="", help="CFG's null prompt (default \"\", as SANA)")
    gen.add_argument("--text-encoder", help="Hugging Face Gemma-2 folder (gemma-2-2b-it) with its tokenizer")
    gen.add_argument("--tokenizer", help="tokenizer folder when it is not inside --text-encoder")
    gen.add_argument("--vae", help="DC-AE folder (diffusers AutoencoderDC or original); without it latents are "
                                   "written instead of images")
    gen.add_argument("--out", default="outputs/generate", help="output folder (PNGs, grid.png, latents)")
    gen.add_argument("--height", type=int, default=1024)
    gen.add_argument("--width", type=int, default=1024)
    gen.add_argument("--no-binning", action="store_true", help="generate at --height x --width exactly (multiples "
                                                               "of 32) instead of the nearest aspect-ratio bin")
    gen.add_argument("--method", choices=["flow_dpm_solver", "flow_euler", "scm"],
                     help="default: scm for Sprint checkpoints, else flow_dpm_solver")
    gen.add_argument("--steps", type=int, help="default: 20 flow_dpm_solver, 28 flow_euler, 2 scm")
    gen.add_argument("--guidance", type=float, default=4.5, help="CFG scale (Sprint: embedded guidance)")
    gen.add_argument("--flow-shift", type=float, help="default: the config's flow_shift")
    gen.add_argument("--timestep-convention", choices=["sana", "diffusers", "continuous"], default="sana")
    gen.add_argument("--uncond-mask", choices=["cond", "negative"], default="cond",
                     help="caption mask of the CFG uncond half: cond (SANA) or negative (diffusers)")
    gen.add_argument("--seed", type=int, default=0, help="image i draws its noise from numpy default_rng([seed, i])")
    gen.add_argument("--num-images-per-prompt", type=int, default=1)
    gen.add_argument("--batch-size", type=int, default=4, help="images per compiled call")
    gen.add_argument("--data-parallel", action="store_true", help="shard each batch over all local devices")


def _read_embeds(path: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    if not os.path.isfile(path):
        raise SystemExit(f"--prompt-embeds: no such file {path}")
    tensors = load_file(path)
    unknown = sorted(set(tensors) - set(EMBEDS_KEYS))
    if "prompt_embeds" not in tensors or unknown:
        raise SystemExit(f"{path}: needs key prompt_embeds {EMBEDS_KEYS['prompt_embeds']}; optional "
                         f"{', '.join(k for k in EMBEDS_KEYS if k != 'prompt_embeds')}; got {sorted(tensors)}")
    return tensors


def save_grid(images: np.ndarray, path: str, columns: int | None = None) -> None:
    """uint8 [N, H, W, 3] -> one PNG, `columns` per row (default ceil(sqrt(N))), 2 px white gutters."""
    from PIL import Image

    n, h, w, _ = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    pad = 2
    grid = np.full((rows * (h + pad) - pad, columns * (w + pad) - pad, 3), 255, np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = image
    Image.fromarray(grid).save(path)


def run_generate(args) -> int:
    import jax
    from safetensors.numpy import save_file

    from sana_jax.cli.commands import _config_override
    from sana_jax.pipeline import SanaPipeline

    if args.prompt and not args.text_encoder:
        raise SystemExit("--prompt needs --text-encoder (a Gemma-2 folder); or pass --prompt-embeds")
    for name in ("num_images_per_prompt", "batch_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    mesh = None
    if args.data_parallel:
        mesh = jax.make_mesh((len(jax.devices()),), ("data",))
    with tqdm(total=3, desc="loading", file=sys.stderr) as bar:
        pipe = SanaPipeline.from_pretrained(args.checkpoint, config=_config_override(args.config), vae=args.vae,
                                            text_encoder=args.text_encoder, tokenizer=args.tokenizer, mesh=mesh)
        bar.update(3)
    if args.prompt_embeds:
        embeds = _read_embeds(args.prompt_embeds)
        num_prompts = embeds["prompt_embeds"].shape[0]
    else:
        embeds, num_prompts = None, len(args.prompt)
    per_call = max(1, args.batch_size // args.num_images_per_prompt)  # prompts per compiled call
    os.makedirs(args.out, exist_ok=True)
    if pipe.decoder is None:
        print(f"no --vae given: writing latents to {os.path.join(args.out, 'latents.safetensors')}; images need "
              "--vae (a DC-AE folder, e.g. mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers)", file=sys.stderr)

    latents, images = [], []
    total = num_prompts * args.num_images_per_prompt
    with tqdm(total=total, desc="generating (the first batch compiles)", unit="img", file=sys.stderr) as bar:
        for start in range(0, num_prompts, per_call):
            # Every call gets per_call prompts (the last chunk repeats its last prompt, whose extra images are
            # dropped), so all calls share one compiled program.
            index = np.minimum(np.arange(start, start + per_call), num_prompts - 1)
            keep = min(per_call, num_prompts - start) * args.num_images_per_prompt
            if embeds is None:
                inputs = {"prompt": [args.prompt[i] for i in index], "negative_prompt": args.negative_prompt}
            else:
                inputs = {k: v[index] for k, v in embeds.items() if k in ("prompt_embeds", "prompt_mask")}
                for key in ("negative_embeds", "negative_mask"):
                    if key in embeds:
                        value = embeds[key]
                        inputs[key] = value if value.shape[0] == 1 else value[index]
            try:
                out = pipe(**inputs, height=args.height, width=args.width, resolution_binning=not args.no_binning,
                           num_images_per_prompt=args.num_images_per_prompt, seed=args.seed,
                           image_offset=start * args.num_images_per_prompt, method=args.method, steps=args.steps,
                           guidance_scale=args.guidance, flow_shift=args.flow_shift,
                           timestep_convention=args.timestep_convention, uncond_mask=args.uncond_mask)
            except ValueError as e:  # the pipeline's argument errors, in the CLI's words
                message = str(e).replace("resolution_binning=False", "--no-binning")
                raise SystemExit(f"sana-jax generate: {message}") from None
            latents.append(np.asarray(out.latents)[:keep])
            if out.images is not None:
                images.append(out.images[:keep])
            bar.set_postfix_str(f"{out.size[0]}x{out.size[1]} px")
            bar.update(keep)

    latents = np.concatenate(latents)
    save_file({"latents": latents}, os.path.join(args.out, "latents.safetensors"),
              metadata={"layout": "[B, h, w, C] channels-last, scaled (decode latents / scaling_factor)",
                        "checkpoint": str(args.checkpoint), "seed": str(args.seed)})
    if images:
        from PIL import Image

        images = np.concatenate(images)
        for i, image in enumerate(images):
            Image.fromarray(image).save(os.path.join(args.out, f"{i:04d}.png"))
        columns = args.num_images_per_prompt if args.num_images_per_prompt > 1 else None
        save_grid(images, os.path.join(args.out, "grid.png"), columns)
        print(f"{len(images)} images -> {args.out} (0000.png ..., grid.png)")
    else:
        print(f"{len(latents)} latents {tuple(latents.shape[1:])} -> {os.path.join(args.out, 'latents.safetensors')}")
    return 0
