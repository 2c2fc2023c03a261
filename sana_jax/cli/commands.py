"""`sana-jax convert`, `parity`, `train`, `prepare` and `export`."""

from __future__ import annotations

import sys

from tqdm import tqdm


def _config_override(name):
    from sana_jax import configs

    return configs.get(name) if name else None


def run_convert(args) -> int:
    import sana_jax
    from sana_conversion import export_diffusers, export_official, save_params

    model, params = sana_jax.load_pretrained(args.source, config=_config_override(args.config))
    cfg = model.config
    export = {"official": export_official, "diffusers": export_diffusers, "sana-jax": save_params}[args.to]
    export(cfg, params, args.dest, overwrite=args.overwrite)
    print(f"{args.source} ({cfg.name}, {sana_jax.count_params(params):,} parameters) -> {args.dest} ({args.to})")
    return 0


def _latent(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--latent must look like 8x12 (latent height x width), got {text!r}") from None
    return h, w


def run_parity(args) -> int:
    import sana_jax
    from sana_jax.cli import parity
    from sana_jax.cli.plot import plot_report

    dtypes = tuple(d.strip() for d in args.dtypes.split(",") if d.strip())
    for dtype in dtypes:
        if dtype not in ("float32", "bfloat16", "float16"):
            raise SystemExit(f"--dtypes: unknown dtype {dtype!r} (float32, bfloat16, float16)")
    latent = _latent(args.latent)
    model, params = sana_jax.load_pretrained(args.checkpoint, config=_config_override(args.config))
    cfg = model.config
    inputs = parity.random_inputs(cfg, args.batch, latent, args.tokens, args.seed)
    with tqdm(total=len(dtypes) * (3 if not args.no_diffusers else 2), desc="parity", file=sys.stderr) as bar:
        def progress(label):
            bar.set_postfix_str(label)
            bar.update(1)

        rows = parity.parity_report(cfg, params, inputs, dtypes, with_diffusers=not args.no_diffusers,
                                    progress=progress)
    print(f"{args.checkpoint}: {cfg.name}, latent {args.latent}, {args.tokens} tokens, batch {args.batch}")
    print(parity.format_report(rows))
    meta = {"checkpoint": args.checkpoint, "config": cfg.name, "latent": args.latent, "tokens": args.tokens,
            "batch": args.batch, "seed": args.seed}
    if args.json:
        parity.write_json(rows, args.json, meta)
    if args.png:
        names = sorted({r.name for r in rows}, key=parity._order)
        plot_report(rows, names, args.png, f"parity of {args.checkpoint}", args.fp32_target)
    failures = parity.fp32_failures(rows, args.fp32_target)
    for row in failures:
        print(f"FAIL {row.impl} fp32 {row.name}: rel {row.rel:.3e} > {args.fp32_target:.0e}", file=sys.stderr)
    return 1 if failures else 0


def run_train(args) -> int:
    import sana_jax
    from sana_jax.train.config import load_config
    from sana_jax.train.loop import train

    cfg = load_config(args.recipe, args.config, args.set)
    if not cfg.data_dir:
        raise SystemExit("train: set data_dir (--set data_dir=/path/to/cache) to a cache written by the data "
                         "tools (format in sana_jax/train/data.py)")
    params = None
    if args.init:
        model, params = sana_jax.load_pretrained(args.init, config=cfg.model)
    result = train(cfg, init_params=params)
    print(f"trained to step {result.losses[-1][0] if result.losses else 0}: loss "
          f"{result.losses[-1][1] if result.losses else float('nan'):.4f}; outputs in {result.out_dir}")
    return 0


def run_prepare(args) -> int:
    import os

    import jax

    from sana_jax.train.prepare import load_encoders, prepare_cache

    if args.distributed:
        jax.distributed.initialize()
    vae, vae_params, encoder, encoder_params, tokenizer = load_encoders(args.vae, args.text_encoder, args.dtype)
    result = prepare_cache(args.images, args.out, vae, vae_params, encoder, encoder_params, tokenizer,
                           resolution=args.resolution, batch_size=args.batch_size, shard_size=args.shard_size,
                           max_length=args.max_length,
                           source={"vae": os.path.abspath(args.vae),
                                   "text_encoder": os.path.abspath(args.text_encoder)})
    print(f"{args.images} -> {args.out}: {len(result.written)} shard(s) written, {len(result.skipped)} already "
          f"done ({result.images_encoded} images encoded)")
    if result.index is not None:
        rows = sum(s["count"] for s in result.index["shards"])
        sizes = sorted({tuple(s["latent_hw"]) for s in result.index["shards"]})
        print(f"cache complete: {rows} images in {len(result.index['shards'])} shard(s), latent sizes "
              f"{', '.join(f'{h}x{w}' for h, w in sizes)}; train with --set data_dir={args.out}")
    return 0


def run_export(args) -> int:
    from sana_conversion import export_diffusers, export_official, save_params
    from sana_jax.train.export import load_run

    cfg, params = load_run(args.run, args.step, args.ema)
    model_cfg = cfg.model
    if args.to == "diffusers" and model_cfg.logvar:  # diffusers has no logvar head
        model_cfg = model_cfg.replace(logvar=False)
        params = {k: v for k, v in params.items() if k != "logvar_linear"}
    export = {"official": export_official, "diffusers": export_diffusers, "sana-jax": save_params}[args.to]
    export(model_cfg, params, args.dest, overwrite=args.overwrite)
    print(f"{args.run}{' (EMA)' if args.ema else ''} -> {args.dest} ({args.to})")
    return 0


def run_bench(args) -> int:
    """`sana-jax bench NAME ...`: run benchmarks/NAME.py of this checkout in a fresh interpreter."""
    import os
    import subprocess
    import sys

    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks")
    if not os.path.isdir(folder):
        raise SystemExit(f"{folder}: no benchmarks folder; `sana-jax bench` runs from a source checkout "
                         "(pip install -e .)")
    names = sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and f != "timing.py")
    if args.name not in names:
        raise SystemExit(f"unknown benchmark {args.name!r}; choose one of {', '.join(names)}")
    return subprocess.call([sys.executable, os.path.join(folder, args.name + ".py"), *args.args])
