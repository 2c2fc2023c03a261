"""The `sana-jax` command line. The only module that knows every other part of the project."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sana-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="the main job on an embedded default: train a small SANA on coloured "
                                       "shapes, resume, sample, measure conditioning, export, check parity")
    demo.add_argument("--out", default="outputs/demo", help="folder for data, checkpoints, PNGs and the report")
    demo.add_argument("--steps", type=int, default=600, help="optimizer steps (half before the resume)")

    chain = sub.add_parser("parity-demo", help="convert-and-parity chain on random tiny SANA models of every kind")
    chain.add_argument("--out", default="outputs/parity-demo", help="folder for exports, report.json and PNGs")
    chain.add_argument("--seed", type=int, default=0)

    train = sub.add_parser("train", help="train or fine-tune SANA on a latent + caption-embedding cache")
    from sana_jax.train.config import RECIPES

    train.add_argument("--recipe", help=f"a released recipe ({', '.join(RECIPES)}); default: the tiny defaults")
    train.add_argument("--config", help="a JSON or YAML file of TrainConfig fields (nested), applied after --recipe")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one field, e.g. --set optim.lr=2e-5 --set data_dir=/data/cache")
    train.add_argument("--init", help="start from these weights (official, diffusers or sana-jax checkpoint)")

    prepare = sub.add_parser("prepare", help="build the training cache from an image folder with .txt captions "
                                             "(DC-AE latents + Gemma-2 caption features, resumable)")
    prepare.add_argument("images", help="folder of .png/.jpg/.jpeg/.webp images, each with a same-named .txt caption")
    prepare.add_argument("out", help="cache folder (new, empty, or an interrupted run to continue)")
    prepare.add_argument("--vae", required=True, help="DC-AE: a diffusers AutoencoderDC folder or an original "
                                                      "mit-han-lab checkpoint")
    prepare.add_argument("--text-encoder", required=True, help="Gemma-2 folder (Hugging Face weights + tokenizer)")
    prepare.add_argument("--resolution", type=int, default=1024, choices=[512, 1024, 2048, 4096],
                         help="aspect-ratio table the images are bucketed into (default 1024)")
    prepare.add_argument("--batch-size", type=int, default=8, help="images per encoder call, split over the "
                                                                   "local devices (default 8)")
    prepare.add_argument("--shard-size", type=int, default=256, help="images per shard file (default 256)")
    prepare.add_argument("--max-length", type=int, default=300, help="caption tokens L (SANA: 300)")
    prepare.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                         help="compute dtype of both encoders; the cache is fp32 either way")
    prepare.add_argument("--distributed", action="store_true",
                         help="call jax.distributed.initialize() first (multi-host: each process encodes every "
                              "process_count-th shard, process 0 writes the index)")

    export = sub.add_parser("export", help="export a training run's checkpoint to the official, diffusers or "
                                           "sana-jax layout")
    export.add_argument("run", help="the train out_dir (or its checkpoints/ folder)")
    export.add_argument("dest", help="output path (file for official, folder for diffusers / sana-jax)")
    export.add_argument("--to", required=True, choices=["official", "diffusers", "sana-jax"])
    export.add_argument("--step", type=int, help="checkpoint step (default: the latest)")
    export.add_argument("--ema", action="store_true", help="export the EMA weights")
    export.add_argument("--overwrite", action="store_true")

    convert = sub.add_parser("convert", help="convert a checkpoint between official, diffusers and sana-jax formats")
    convert.add_argument("source", help="official .pth/.safetensors, diffusers folder, or sana-jax export folder")
    convert.add_argument("dest", help="output path (file for official, folder for diffusers / sana-jax)")
    convert.add_argument("--to", required=True, choices=["official", "diffusers", "sana-jax"])
    convert.add_argument("--config", help="released variant name when key shapes cannot identify the model "
                                          "(e.g. cross-attention heads, 2K/4K position embedding)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    parity = sub.add_parser("parity", help="per-module error report: sana_jax vs sana_torch_ref (vs diffusers)")
    parity.add_argument("checkpoint", help="official .pth/.safetensors, diffusers folder, or sana-jax export")
    parity.add_argument("--config", help="released variant name when key shapes cannot identify the model")
    parity.add_argument("--latent", default="8x12", help="latent grid HxW (image px / 32); default 8x12")
    parity.add_argument("--tokens", type=int, default=16, help="caption tokens L (the released models use 300)")
    parity.add_argument("--batch", type=int, default=2)
    parity.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    parity.add_argument("--no-diffusers", action="store_true", help="skip diffusers (saves memory on big models)")
    parity.add_argument("--json", help="also write the rows as JSON here")
    parity.add_argument("--png", help="also plot the report as a PNG here")
    parity.add_argument("--seed", type=int, default=0)
    parity.add_argument("--fp32-target", type=float, default=1e-5,
                        help="exit 1 if a sana_jax fp32 activation differs more than this (relative) from "
                             "sana_torch_ref fp32; DESIGN.md: 1e-5 at tiny size, 1e-4 at full size")

    bench = sub.add_parser("bench", help="run a benchmark of the checkout's benchmarks/ folder (JSON lines out; "
                                         "the anchor is measured in the same run)")
    bench.add_argument("name", help="transformer, generate, pallas_kernels, profile_jax, litela, dcae_decode, "
                                    "gemma2_encode, came_update, optimizer_memory")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="the benchmark's own arguments (see its --help)")

    from sana_jax.cli.generate import add_parser as add_generate

    add_generate(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        from sana_jax.train.demo import run_demo

        return run_demo(args.out, steps=args.steps)
    if args.command == "parity-demo":
        from sana_jax.cli.demo import run_demo

        return run_demo(args.out, seed=args.seed)
    if args.command == "export":
        from sana_jax.cli.commands import run_export

        return run_export(args)
    if args.command == "train":
        from sana_jax.cli.commands import run_train

        return run_train(args)
    if args.command == "prepare":
        from sana_jax.cli.commands import run_prepare

        return run_prepare(args)
    if args.command == "convert":
        from sana_jax.cli.commands import run_convert

        return run_convert(args)
    if args.command == "parity":
        from sana_jax.cli.commands import run_parity

        return run_parity(args)
    if args.command == "bench":
        from sana_jax.cli.commands import run_bench

        return run_bench(args)
    if args.command == "generate":
        from sana_jax.cli.generate import run_generate

        return run_generate(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
