"""End-to-end generation: 20-step CFG sampling + DC-AE decode, sana_jax.pipeline vs diffusers' SanaPipeline.

Both get the same kind of inputs: prompt embeddings [B, 300, 2304] with a full mask and the null caption's
embedding (no text encoder in the timing, as the issue asks), bf16 transformer and DC-AE with random weights,
flow DPM-Solver++ (2M) with flow shift 3, guidance 4.5, 1024 px, no resolution binning, images out on the host
(uint8 numpy for sana_jax; output_type="np" for diffusers). The anchor's transformer is `torch.compile`d (its
VAE is not, as in DESIGN.md's anchor). Each framework runs in its own child process. One JSON object per line:
per implementation ms per call, images/s, peak memory; then a summary with the ratio.

GPU:  source benchmarks/gpu-env.sh && python3 benchmarks/generate.py
CPU smoke test (tiny models, eager anchor):  python benchmarks/generate.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import error_text, jax_versions, median_ms, parse_overrides, run_child  # noqa: E402

TOKENS = 300
GUIDANCE = 4.5
FLOW_SHIFT = 3.0


def emit(record: dict) -> None:
    print(json.dumps({"bench": "generate", **record}), flush=True)


def configs(args):
    from sana_jax import configs as model_configs
    from sana_jax import dcae

    vae = dcae.get(args.vae, compute_dtype="bfloat16")
    channels = vae.latent_channels
    overrides = {"compute_dtype": "bfloat16", "in_channels": channels, "out_channels": channels,
                 **parse_overrides(args.set)}
    return model_configs.get(args.model, **overrides), vae


def run_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    import sana_jax
    from sana_jax import dcae, pipeline

    cfg, vae_cfg = configs(args)
    model, vae = sana_jax.SanaTransformer(cfg), dcae.DCAE(vae_cfg)
    to_bf16 = lambda tree: jax.tree.map(lambda p: p.astype(jnp.bfloat16), tree)  # noqa: E731
    params = jax.jit(lambda key: to_bf16(sana_jax.init_params(model, key)))(jax.random.key(0))
    vae_params = jax.jit(lambda key: to_bf16(dcae.init_params(vae, key)))(jax.random.key(1))
    pipe = pipeline.SanaPipeline(model, params, decoder=pipeline.dcae_decoder(vae, vae_params))
    rng = np.random.default_rng(2)
    y = rng.standard_normal((args.batch, TOKENS, cfg.caption_channels), np.float32)
    y_null = rng.standard_normal((1, TOKENS, cfg.caption_channels), np.float32)
    call = lambda: pipe(prompt_embeds=y, negative_embeds=y_null, height=args.size, width=args.size,  # noqa: E731
                        steps=args.steps, guidance_scale=GUIDANCE, flow_shift=FLOW_SHIFT,
                        resolution_binning=False, seed=0).images
    start = time.perf_counter()
    images = call()
    record = {"impl": "jax", "device": jax.devices()[0].device_kind, **jax_versions(jax),
              "compile_s": round(time.perf_counter() - start, 2), "image_shape": list(images.shape)}
    record["ms"] = median_ms(call, lambda out: None, args.warmup, args.iters)  # images are host numpy: synced
    record["peak_bytes"] = (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    return record


def run_torch(args) -> dict:
    import torch
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from sana_conversion.dcae import diffusers_config as vae_config
    from sana_conversion.diffusers import diffusers_config

    cfg, vae_cfg = configs(args)
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)
    strip = lambda c: {k: v for k, v in c.items() if not k.startswith("_")}  # noqa: E731
    torch.manual_seed(0)
    with device:
        transformer = SanaTransformer2DModel(**strip(diffusers_config(cfg))).to(torch.bfloat16).eval()
        vae = AutoencoderDC(**strip(vae_config(vae_cfg))).to(torch.bfloat16).eval()
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction",
                                            flow_shift=FLOW_SHIFT)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    impl = "diffusers_eager"
    if cuda and not args.no_compile:
        pipe.transformer = torch.compile(pipe.transformer, dynamic=False)
        impl = "diffusers_compile"
    g = torch.Generator(device).manual_seed(2)
    y = torch.randn(args.batch, TOKENS, cfg.caption_channels, device=device, generator=g, dtype=torch.bfloat16)
    y_null = torch.randn(args.batch, TOKENS, cfg.caption_channels, device=device, generator=g, dtype=torch.bfloat16)
    mask = torch.ones(args.batch, TOKENS, device=device, dtype=torch.int64)
    sync = (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: None)

    def call():
        return pipe(negative_prompt=None, prompt_embeds=y, prompt_attention_mask=mask, negative_prompt_embeds=y_null,
                    negative_prompt_attention_mask=mask, height=args.size, width=args.size,
                    num_inference_steps=args.steps, guidance_scale=GUIDANCE, use_resolution_binning=False,
                    output_type="np", generator=torch.Generator(device).manual_seed(0)).images

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        start = time.perf_counter()
        images = call()
        record = {"impl": impl, "device": torch.cuda.get_device_name() if cuda else "cpu",
                  "torch": torch.__version__, "compile_s": round(time.perf_counter() - start, 2),
                  "image_shape": list(images.shape)}
        record["ms"] = median_ms(call, sync, args.warmup, args.iters)
    record["peak_bytes"] = torch.cuda.max_memory_allocated() if cuda else None
    return record


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (smoke test)")
    parser.add_argument("--model", default=None, help="sana_jax config (default sana_600m; tiny: tiny)")
    parser.add_argument("--vae", default=None, help="sana_jax.dcae config (default dc-ae-f32c32-sana-1.0)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 16; tiny 2)")
    parser.add_argument("--size", type=int, default=None, help="image side in px (default 1024; tiny 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 5; tiny 1)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--impls", nargs="+", default=["jax", "diffusers"], choices=["jax", "diffusers"])
    parser.add_argument("--no-compile", action="store_true", help="diffusers eager instead of torch.compile")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="SanaConfig override for both frameworks' transformer, e.g. unroll_blocks=true")
    parser.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)  # internal
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny" if args.tiny else "sana_600m")
    args.vae = args.vae or ("tiny" if args.tiny else "dc-ae-f32c32-sana-1.0")
    args.batch = args.batch or (2 if args.tiny else 16)
    args.size = args.size or (64 if args.tiny else 1024)
    args.iters = args.iters or (1 if args.tiny else 5)
    base = {"model": args.model, "vae": args.vae, "batch": args.batch, "size": args.size, "steps": args.steps,
            "guidance": GUIDANCE, **({"overrides": parse_overrides(args.set)} if args.set else {})}
    if args.child:
        try:
            record = run_jax(args) if args.child == "jax" else run_torch(args)
        except Exception as err:  # noqa: BLE001 - reported as a record; the other framework still runs
            record = {"impl": args.child, "error": error_text(err)}
        emit({**base, **record})
        return 0

    script = os.path.abspath(__file__)
    passthrough = list(argv if argv is not None else sys.argv[1:])
    records = []
    for child in [c for c, impl in (("jax", "jax"), ("torch", "diffusers")) if impl in args.impls]:
        for record in run_child(script, [*passthrough, "--child", child]):
            record = {k: v for k, v in record.items() if k != "bench"}
            if record.get("ms"):
                record["ms"] = round(record["ms"], 1)
                record["images_per_s"] = round(args.batch / record["ms"] * 1e3, 3)
            if record.get("peak_bytes") is not None:
                record["peak_gib"] = round(record["peak_bytes"] / 2**30, 3)
            emit(record)
            records.append(record)
    jax_rec = next((r for r in records if r.get("impl") == "jax" and r.get("ms")), None)
    ref = next((r for r in records if r.get("impl", "").startswith("diffusers") and r.get("ms")), None)
    if jax_rec and ref:
        emit({**base, "summary": True, "jax_images_per_s": jax_rec["images_per_s"],
              f"{ref['impl']}_images_per_s": ref["images_per_s"],
              f"speedup_vs_{ref['impl']}": round(ref["ms"] / jax_rec["ms"], 3)})
    return 0 if jax_rec or ref else 1


if __name__ == "__main__":
    sys.exit(main())
