"""DC-AE decode: sana_jax.dcae (jit) vs diffusers AutoencoderDC eager and torch.compile, in one run.

Random weights (each side its own init; the timing does not depend on the values), random latents. One JSON
object per line: per implementation, image size and dtype the median ms, images/s and peak device memory; then
one summary line per size and dtype with the ratios (speedups of JAX over each anchor, JAX peak / eager peak).
Also the tiled decode of a large image (default 4096 px in 1024-px tiles overlapping by 128 px, the setting that
avoids 4K seams, diffusers PR #10510) by both, for its peak memory.

On GPU each JAX case runs in a child process, so its `peak_bytes_in_use` is its own (JAX has no peak reset) and
no JAX allocator holds memory while torch runs; the torch cases run afterwards in this process with
`torch.cuda.reset_peak_memory_stats()` per case. JAX params are cast once to the compute dtype, as diffusers'
`.to(dtype)` does. `program_bytes` is XLA's own account of the compiled decode (arguments + outputs + temporaries).

GPU (f32c32, 1024 and 2048 px, bf16 and fp32, batch 1, tiled 4096):
    source benchmarks/gpu-env.sh && python3 benchmarks/dcae_decode.py
CPU smoke test (tiny config, no torch.compile):
    python benchmarks/dcae_decode.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import jax_versions, median_ms  # noqa: E402


def emit(record: dict) -> None:
    print(json.dumps({"bench": "dcae_decode", **record}), flush=True)


# ---------------------------------------------------------------------------------------------------- JAX

def run_jax_case(case: dict) -> dict:
    """One JAX measurement (called in a child process): untiled decode or tiled decode of one size and dtype."""
    import jax
    import jax.numpy as jnp

    from sana_jax import dcae

    cfg = dcae.get(case["config"], compute_dtype=case["dtype"])
    model = dcae.DCAE(cfg)
    params = jax.jit(lambda key: jax.tree_util.tree_map(lambda p: p.astype(case["dtype"]),
                                                        dcae.init_params(model, key)))(jax.random.key(0))
    f, size, batch = cfg.spatial_compression, case["size"], case["batch"]
    latents = jax.random.normal(jax.random.key(1), (batch, size // f, size // f, cfg.latent_channels),
                                jnp.dtype(case["dtype"]))
    device = jax.devices()[0]
    record = {"impl": "jax", "device": device.device_kind, **jax_versions(jax)}
    if case["tiled"]:
        fn = lambda: dcae.tiled_decode(model, params, latents, case["tile_size"], case["overlap"])  # noqa: E731
        start = time.perf_counter()
        jax.block_until_ready(fn())  # compiles the few tile shapes
        record["compile_s"] = round(time.perf_counter() - start, 2)
    else:
        decode = jax.jit(lambda p, z: model.apply({"params": p}, z, method="decode"))
        start = time.perf_counter()
        compiled = decode.lower(params, latents).compile()
        record["compile_s"] = round(time.perf_counter() - start, 2)
        stats = compiled.memory_analysis()
        if stats is not None:
            record["program_bytes"] = int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                                          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
        fn = lambda: compiled(params, latents)  # noqa: E731
    record["ms"] = median_ms(fn, jax.block_until_ready, case["warmup"], case["iters"])
    memory = device.memory_stats() or {}
    record["peak_bytes"] = memory.get("peak_bytes_in_use")  # None on CPU
    return record


def jax_in_child(case: dict) -> dict:
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false")  # allocate as needed: peaks are real use
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--jax-case", json.dumps(case)],
                         capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"impl": "jax", "error": out.stderr.strip().splitlines()[-1:] or ["exit code %d" % out.returncode]}
    return json.loads(out.stdout.strip().splitlines()[-1])


# -------------------------------------------------------------------------------------------------- torch

def torch_cases(args, cases: list[dict]):
    """Yield one record per torch measurement: every eager case first (untiled and tiled), then the
    torch.compile cases (slow to compile), so a run cut short still has the eager anchors."""
    import torch
    from diffusers import AutoencoderDC

    from sana_conversion.dcae import diffusers_config
    from sana_jax import dcae

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if args.tiny:  # smoke numbers only; torch's OpenMP threads busy-wait badly on a loaded 2-core CI machine
        torch.set_num_threads(1)
    cfg = dcae.get(args.config)
    config = {k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")}
    torch.manual_seed(0)
    model = AutoencoderDC(**config).eval().to(device)
    sync = (lambda out: torch.cuda.synchronize()) if device.type == "cuda" else (lambda out: None)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    plan = [("diffusers_eager", case) for case in cases if "diffusers_eager" in args.impls]
    plan += [("diffusers_compile", case) for case in cases if "diffusers_compile" in args.impls and not case["tiled"]]
    for impl, case in plan:
        dtype = getattr(torch, case["dtype"])
        model.to(dtype=dtype)  # in place; the timing does not depend on the weights' values
        f, size = cfg.spatial_compression, case["size"]
        z = torch.randn(case["batch"], cfg.latent_channels, size // f, size // f, device=device, dtype=dtype)
        if case["tiled"]:
            stride = case["tile_size"] - case["overlap"]
            model.enable_tiling(case["tile_size"], case["tile_size"], stride, stride)
            fn = lambda: model.decode(z).sample  # noqa: E731
        elif impl == "diffusers_compile":
            model.disable_tiling()
            decoder = torch.compile(model.decoder, dynamic=False)
            fn = lambda: decoder(z)  # noqa: E731
        else:
            model.disable_tiling()
            fn = lambda: model.decode(z).sample  # noqa: E731
        # torch runs fp32 convolutions in TF32 unless told otherwise (cudnn.allow_tf32 defaults to True);
        # sana_jax computes fp32 exactly (precision HIGHEST). Recorded so fp32 ratios are read accordingly.
        record = {"impl": impl, "device": name, "torch": torch.__version__,
                  "tf32_convs": bool(torch.backends.cudnn.allow_tf32) and device.type == "cuda"}
        with torch.no_grad():
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            sync(fn())
            record["compile_s"] = round(time.perf_counter() - start, 2)
            record["ms"] = median_ms(fn, sync, case["warmup"], case["iters"])
        record["peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        yield {**case_fields(case), **record}
    model.disable_tiling()


# --------------------------------------------------------------------------------------------------- main

def case_fields(case: dict) -> dict:
    fields = {"case": "tiled_decode" if case["tiled"] else "decode", "config": case["config"], "size": case["size"],
              "batch": case["batch"], "dtype": case["dtype"]}
    if case["tiled"]:
        fields.update(tile_size=case["tile_size"], overlap=case["overlap"])
    return fields


def finish(record: dict) -> dict:
    if record.get("ms"):
        record["images_per_s"] = round(record["batch"] / record["ms"] * 1e3, 3)
        record["ms"] = round(record["ms"], 3)
    if record.get("peak_bytes") is not None:
        record["peak_gib"] = round(record["peak_bytes"] / 2**30, 3)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, small sizes (smoke test)")
    parser.add_argument("--config", default=None, help="sana_jax.dcae variant (default dc-ae-f32c32-sana-1.0)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="image sides in px (default 1024 2048)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["bfloat16", "float32", "float16"],
                        help="default bfloat16 float32 (tiny: float32)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 10; tiny 2)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impls", nargs="+", default=None,
                        choices=["jax", "diffusers_eager", "diffusers_compile"],
                        help="default all three (tiny: no torch.compile)")
    parser.add_argument("--tiled-size", type=int, default=None, help="tiled decode image side (default 4096; 0: skip)")
    parser.add_argument("--tile-size", type=int, default=None, help="tile side in px (default 1024)")
    parser.add_argument("--overlap", type=int, default=None, help="tile overlap in px (default 128)")
    parser.add_argument("--jax-case", default=None, help=argparse.SUPPRESS)  # internal: one JAX case, JSON
    args = parser.parse_args()
    if args.jax_case is not None:
        print(json.dumps(run_jax_case(json.loads(args.jax_case))), flush=True)
        return
    tiny = args.tiny
    args.config = args.config or ("tiny" if tiny else "dc-ae-f32c32-sana-1.0")
    args.sizes = args.sizes or ([32, 64] if tiny else [1024, 2048])
    args.dtypes = args.dtypes or (["float32"] if tiny else ["bfloat16", "float32"])
    args.iters = args.iters or (2 if tiny else 10)
    args.impls = args.impls or (["jax", "diffusers_eager"] if tiny else ["jax", "diffusers_eager", "diffusers_compile"])
    tiled_size = args.tiled_size if args.tiled_size is not None else (96 if tiny else 4096)
    tile_size = args.tile_size or (64 if tiny else 1024)
    overlap = args.overlap if args.overlap is not None else (32 if tiny else 128)

    common = dict(config=args.config, batch=args.batch, warmup=args.warmup, iters=args.iters)
    cases = [dict(common, size=s, dtype=d, tiled=False) for d in args.dtypes for s in args.sizes]
    if tiled_size:
        cases += [dict(common, size=tiled_size, dtype=d, tiled=True, tile_size=tile_size, overlap=overlap,
                       iters=min(args.iters, 3), warmup=min(args.warmup, 1)) for d in args.dtypes]
    records = []
    if "jax" in args.impls:
        for case in cases:
            # CPU has no device memory statistics to isolate: the smoke run stays in this process.
            result = run_jax_case(case) if tiny else jax_in_child(case)
            record = finish({**case_fields(case), **result})
            emit(record)
            records.append(record)
    if any(impl.startswith("diffusers") for impl in args.impls):
        for record in torch_cases(args, cases):
            record = finish(record)
            emit(record)
            records.append(record)

    def find(impl, case, size, dtype):
        return next((r for r in records if (r["impl"], r["case"], r["size"], r["dtype"]) == (impl, case, size, dtype)
                     and r.get("ms")), None)

    for case in cases:
        kind = "tiled_decode" if case["tiled"] else "decode"
        jax_rec = find("jax", kind, case["size"], case["dtype"])
        if jax_rec is None:
            continue
        summary = {"summary": True, "case": kind, "size": case["size"], "dtype": case["dtype"], "batch": case["batch"],
                   "jax_ms": jax_rec["ms"]}
        for impl in ("diffusers_eager", "diffusers_compile"):
            ref = find(impl, kind, case["size"], case["dtype"])
            if ref is not None:
                summary[f"{impl}_ms"] = ref["ms"]
                summary[f"speedup_vs_{impl}"] = round(ref["ms"] / jax_rec["ms"], 3)
                if ref.get("peak_bytes") and jax_rec.get("peak_bytes"):
                    summary[f"peak_ratio_vs_{impl}"] = round(jax_rec["peak_bytes"] / ref["peak_bytes"], 3)
        emit(summary)


if __name__ == "__main__":
    main()
