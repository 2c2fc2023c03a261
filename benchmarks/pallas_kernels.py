"""The JAX model's Pallas GPU kernels against their XLA siblings, op by op, with the tile sweep that set them.

  glu:    sana_jax.glu_conv (SiLU(pre + bias), depthwise 3x3 + bias, value * SiLU(gate)) at SANA's FFN shapes,
          XLA sibling vs the fused Pallas kernel at every (columns, channel block, warps) of the sweep; `--sweep`
          off: the shipped setting only.
  glu_backward: its vjp alone (residuals given), XLA's autodiff of the sibling vs the Pallas op's backward;
          with `--sweep`, glu_backward_total / glu_backward_input: each of its two kernels alone at every tile.
  litela: sana_jax.linear_attention from packed qkv, XLA sibling vs Pallas; litela_vjp: forward + backward.
One JSON object per line: op, shape, impl (and tile), median ms, GB/s of the bytes an ideal kernel moves (inputs
read once, output written once), max|diff| / max|ref| against the XLA sibling.

GPU:  source benchmarks/gpu-env.sh && python3 benchmarks/pallas_kernels.py --sweep [forward|backward]
      [--glu-shape B H W F]
CPU smoke test (interpreted kernels, tiny shapes):  python benchmarks/pallas_kernels.py --tiny
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

from sana_jax import glu_conv, linear_attention  # noqa: E402

# (B, H, W, F): 0.6B at 1024 px batch 32, 1.6B at 1024 px batch 8, 0.6B at 4096 px batch 1.
GLU_SHAPES = [(32, 32, 32, 2880), (8, 32, 32, 5600), (1, 128, 128, 2880)]
# (B, N, heads, head dim): 0.6B at 1024 px batch 32, 1.6B at 4096 px batch 1.
LITELA_SHAPES = [(32, 1024, 36, 32), (1, 16384, 70, 32)]


def emit(record: dict) -> None:
    print(json.dumps({"bench": "pallas_kernels", **record}), flush=True)


def rel(ref, out) -> float:
    ref, out = np.asarray(ref, np.float32), np.asarray(out, np.float32)
    return float(np.abs(ref - out).max() / max(np.abs(ref).max(), 1e-30))


def bench_glu(shape, args, interpret):
    b, h, w, f = shape
    rng = np.random.default_rng(0)
    pre = jnp.asarray(rng.standard_normal((b, h, w, 2 * f)), jnp.bfloat16)
    pre_bias, bias = (jnp.asarray(rng.standard_normal(2 * f), jnp.bfloat16) for _ in range(2))
    kernel = jnp.asarray(rng.standard_normal((3, 3, 2 * f)), jnp.bfloat16)
    inputs = (pre, pre_bias, kernel, bias)
    ideal_bytes = pre.size * 2 + b * h * w * f * 2
    ref = jax.jit(glu_conv.silu_glu_dwconv_xla)(*inputs)
    variants = [("xla", jax.jit(glu_conv.silu_glu_dwconv_xla), {})]
    # Each tile compiles for ~20 s (the columns are unrolled): the sweep keeps the contenders of RESULTS.md.
    tiles = [(4, 64, 2), (8, 64, 2), (8, 128, 2), (8, 128, 4), (8, 256, 8), (16, 64, 2)]
    for tile_w, block_c, warps in (tiles if args.sweep in ("all", "forward") else [(None, None, None)]):
        kwargs = {k: v for k, v in dict(tile_w=tile_w, block_c=block_c, num_warps=warps).items() if v is not None}
        fn = jax.jit(functools.partial(glu_conv._fused_forward, interpret=interpret, **kwargs))
        variants.append(("pallas", fn, kwargs))
    for impl, fn, tile in variants:
        out = fn(*inputs)
        ms = median_ms(lambda: fn(*inputs), jax.block_until_ready, args.warmup, args.iters)
        emit({"op": "glu", "shape": list(shape), "impl": impl, **tile, "ms": round(ms, 4),
              "gb_per_s": round(ideal_bytes / ms / 1e6, 1), "rel_diff": rel(ref, out)})
    # Backward (the vjp alone, residuals given): XLA's autodiff of the sibling vs the Pallas op's backward (XLA
    # rebuilds the padded SiLU activation, two kernels do the rest); with --sweep, the two kernels alone per tile.
    cotangent = jnp.asarray(rng.standard_normal(ref.shape), jnp.bfloat16)
    backward = {impl: jax.jit(lambda *a, f=f: jax.vjp(f, *a)[1](cotangent))
                for impl, f in (("xla", glu_conv.silu_glu_dwconv_xla),
                                ("pallas", functools.partial(glu_conv.silu_glu_dwconv_pallas, interpret=interpret)))}
    variants = [(impl, fn, {}) for impl, fn in backward.items()]
    grads_ref = backward["xla"](*inputs)
    for impl, fn, tile in variants:
        grads = fn(*inputs)
        ms = median_ms(lambda: fn(*inputs), jax.block_until_ready, args.warmup, args.iters)
        emit({"op": "glu_backward", "shape": list(shape), "impl": impl, **tile, "ms": round(ms, 4),
              "rel_diff": max(rel(a, b) for a, b in zip(grads_ref, grads))})
    if args.sweep in ("all", "backward"):
        sweep_backward_kernels(inputs, cotangent, grads_ref, args, interpret)


# (columns, channels, warps) of each backward kernel's sweep; rows: the default chunk (`--backward-tiles` may give it).
BACKWARD_TILES = [(8, 128, 4), (4, 128, 4), (2, 128, 4), (8, 64, 2), (4, 64, 2), (2, 64, 1), (4, 128, 2),
                  (2, 128, 2), (4, 256, 4), (4, 256, 8)]


def sweep_backward_kernels(inputs, cotangent, grads_ref, args, interpret):
    """Each backward kernel alone at every tile of BACKWARD_TILES (part 2 on part 1's shipped output); the programs
    compile in parallel threads (~20 s each: the columns are unrolled)."""
    import concurrent.futures

    pre, pre_bias, kernel, bias = inputs
    shape = list(pre.shape[:3]) + [pre.shape[3] // 2]
    shipped = glu_conv.backward_tiles(pre.shape[2])
    d_total = jax.jit(lambda *a: glu_conv._total_grad(*a, cotangent, interpret, shipped[0])[0])(*inputs)
    parts = {"total": (lambda tile: lambda *a: glu_conv._total_grad(*a, cotangent, interpret, tile), inputs,
                       (grads_ref[2], grads_ref[3])),
             "input": (lambda tile: lambda *a: glu_conv._input_grad(*a, interpret, tile),
                       (d_total, pre, pre_bias, kernel), (grads_ref[0], grads_ref[1]))}
    jobs = [(part, tile) for part in parts for tile in args.backward_tiles or BACKWARD_TILES]

    def compile_one(job):
        part, tile = job
        make, operands, _ = parts[part]
        try:
            return jax.jit(make((*tile, None)[:4])).lower(*operands).compile()  # rows None: `row_chunk`
        except Exception as error:  # a tile that does not compile (registers, shared memory) is reported, not fatal
            return error

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        compiled = list(pool.map(compile_one, jobs))
    for (part, tile), fn in zip(jobs, compiled):
        record = {"op": f"glu_backward_{part}", "shape": shape, "impl": "pallas",
                  **dict(zip(("tile_w", "block_c", "num_warps", "rows"), tile))}
        if isinstance(fn, Exception):
            emit({**record, "error": str(fn).splitlines()[0][:200]})
            continue
        _, operands, refs = parts[part]
        out = fn(*operands)
        ms = median_ms(lambda: fn(*operands), jax.block_until_ready, args.warmup, args.iters)
        # part 1's d_kernel and d_bias; part 2's d_pre and d_pre_bias
        got = (out[1], out[2]) if part == "total" else out
        emit({**record, "ms": round(ms, 4), "rel_diff": max(rel(a, b) for a, b in zip(refs, got))})


def bench_litela(shape, args, interpret):
    b, n, heads, d = shape
    c = heads * d
    qkv = jnp.asarray(np.random.default_rng(0).standard_normal((b, n, 3 * c)), jnp.bfloat16)
    spec = (((0, 0), (0, c), (0, 2 * c)), heads, d, 1e-8)
    ideal_bytes = qkv.size * 2 + b * n * c * 2
    xla = jax.jit(lambda a: linear_attention.relu_linear_attention_xla_packed((a,), *spec))
    pallas = jax.jit(lambda a: linear_attention.relu_linear_attention_pallas((a,), *spec, interpret))
    ref = xla(qkv)
    for impl, fn in (("xla", xla), ("pallas", pallas)):
        out = fn(qkv)
        ms = median_ms(lambda: fn(qkv), jax.block_until_ready, args.warmup, args.iters)
        emit({"op": "litela", "shape": list(shape), "impl": impl, "ms": round(ms, 4),
              "gb_per_s": round(ideal_bytes / ms / 1e6, 1), "rel_diff": rel(ref, out)})
    # Forward + backward (the vjp, as a training step runs it): XLA's autodiff of the sibling vs the two kernels.
    cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(ref.shape), jnp.bfloat16)
    vjps = {impl: jax.jit(lambda a, f=f: jax.vjp(f, a)[1](cotangent)[0])
            for impl, f in (("xla", xla), ("pallas", pallas))}
    grad_ref = vjps["xla"](qkv)
    for impl, fn in vjps.items():
        grad = fn(qkv)
        ms = median_ms(lambda: fn(qkv), jax.block_until_ready, args.warmup, args.iters)
        emit({"op": "litela_vjp", "shape": list(shape), "impl": impl, "ms": round(ms, 4),
              "rel_diff": rel(grad_ref, grad)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="interpreted kernels on tiny shapes (CPU smoke test)")
    parser.add_argument("--sweep", nargs="?", const="all", choices=["all", "forward", "backward"],
                        help="every GLU tile of the sweep (of the forward, the backward kernels, or all), not only "
                             "the shipped one")
    parser.add_argument("--glu-shape", type=int, nargs=4, action="append", metavar=("B", "H", "W", "F"),
                        help="only the GLU ops, at this shape (repeatable) instead of the default shapes")
    parser.add_argument("--backward-tiles", type=lambda text: tuple(int(v) for v in text.split(",")), nargs="+",
                        metavar="COLS,CHANNELS,WARPS[,ROWS]",
                        help="--sweep backward: these tiles (rows per program: default `glu_conv.row_chunk`) instead "
                             "of BACKWARD_TILES")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20; tiny 1)")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    args.iters = args.iters or (1 if args.tiny else 20)
    interpret = args.tiny or jax.default_backend() != "gpu"
    glu_shapes = [(1, 3, 5, 24)] if args.tiny else GLU_SHAPES
    litela_shapes = [(1, 70, 2, 32)] if args.tiny else LITELA_SHAPES
    for shape in args.glu_shape or glu_shapes:
        bench_glu(tuple(shape), args, interpret)
    for shape in [] if args.glu_shape else litela_shapes:
        bench_litela(shape, args, interpret)
    return 0


if __name__ == "__main__":
    sys.exit(main())
