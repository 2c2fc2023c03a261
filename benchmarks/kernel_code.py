"""What the GLU's Pallas kernels compile to, on a machine without a GPU: per kernel, its registers and the SASS of
its row loop, counted per element and thread.

The kernels are lowered for CUDA (as `jax.jit(...).lower(lowering_platforms=("cuda",))` does anywhere), each
kernel's Triton IR is compiled for sm_90 by the pip Triton (its bundled ptxas) and disassembled by its cuobjdump.
On a GPU, XLA compiles the same IR with the Triton it bundles, so these counts compare versions of the code and
tiles with each other; they are not the device's exact code (RESULTS.md, thirteenth session, used them that way).
One JSON object per kernel: kernel, tile (columns, channels, warps), registers, local (spill) bytes, the loop
body's instruction count, its count per element (tile columns x channels per thread), its most frequent opcodes.

  python3 benchmarks/kernel_code.py [--glu-shape B H W F] [--forward-tile C,CH,W] [--backward-tiles C,CH,W C,CH,W]
  python benchmarks/kernel_code.py --tiny        (CPU smoke test: 2-pixel rows and 80 channels, quick to compile;
                                                 1024 images of 16 rows keep the row loop a loop, and nothing is
                                                 allocated: the kernels are only lowered)
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sana_jax import glu_conv  # noqa: E402


@contextlib.contextmanager
def captured_triton_modules():
    """Yields a list that collects the Triton IR text of every Pallas kernel lowered meanwhile. Pallas serialises
    the module into the custom call as bytecode; this reads it where it is made (a private JAX function, the only
    place the text is exposed)."""
    from jax._src.pallas.triton import pallas_call_registration as registration

    modules, lower = [], registration.lowering.lower_jaxpr_to_triton_module

    def spy(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = spy
    try:
        yield modules
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower


def lowered_kernels(fn, *args) -> list[str]:
    with captured_triton_modules() as modules:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    return modules


def sass_of(ttir: str, num_warps: int, folder: str) -> tuple[str, str]:
    """(SASS, resource usage) of one kernel's Triton IR compiled for sm_90."""
    import triton
    from triton.backends.compiler import GPUTarget

    name = re.search(r"tt.func public @(\w+)", ttir).group(1)
    source = os.path.join(folder, f"{name}.ttir")
    with open(source, "w") as fh:
        fh.write(ttir)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cubin = os.path.join(folder, f"{name}.cubin")
    with open(cubin, "wb") as fh:
        fh.write(compiled.asm["cubin"])
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    run = functools.partial(subprocess.run, capture_output=True, text=True, check=True)
    return run([cuobjdump, "-sass", cubin]).stdout, run([cuobjdump, "-res-usage", cubin]).stdout


def loop_opcodes(sass: str) -> collections.Counter:
    """Opcodes of the largest loop body: the instructions between a backward branch's target and the branch (the
    kernels' one loop walks the rows)."""
    instructions = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", sass)]
    loops = [(int(m.group(1), 16), at) for at, text in instructions
             for m in [re.search(r"\bBRA\s+0x([0-9a-f]+)", text)] if m and int(m.group(1), 16) < at]
    if not loops:
        return collections.Counter()
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    return collections.Counter(re.sub(r"^@!?U?P[T0-9]+\s+", "", text).split()[0].split(".")[0]
                               for at, text in instructions if start <= at <= end)


def report(ttir: str, tile: tuple[int, int, int], folder: str) -> dict:
    columns, channels, warps = tile
    sass, usage = sass_of(ttir, warps, folder)
    opcodes = loop_opcodes(sass)
    elements = columns * max(1, channels // (32 * warps))  # per loop iteration and thread
    count = sum(opcodes.values())
    return {"bench": "kernel_code", "kernel": re.search(r"tt.func public @(\w+)", ttir).group(1), "tile": list(tile),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "local_bytes": int(re.search(r"LOCAL:(\d+)", usage).group(1)),
            "loop_instructions": count, "per_element": round(count / elements, 2),
            "opcodes": dict(opcodes.most_common(12))}


def glu_reports(shape, forward_tile, backward_tiles) -> list[dict]:
    batch, height, width, features = shape
    dtype = jnp.bfloat16
    args = [jax.ShapeDtypeStruct(s, dtype) for s in
            ((batch, height, width, 2 * features), (2 * features,), (3, 3, 2 * features), (2 * features,))]
    cotangent = jax.ShapeDtypeStruct((batch, height, width, features), dtype)
    forward_tile = tuple(forward_tile or glu_conv.forward_tile(width))
    part1, part2 = (tuple(t[:3]) for t in (backward_tiles or glu_conv.backward_tiles(width)))
    forward = functools.partial(glu_conv._fused_forward, interpret=False, tile_w=forward_tile[0],
                                block_c=forward_tile[1], num_warps=forward_tile[2])
    backward = functools.partial(glu_conv._pallas_backward, interpret=False,
                                 tiles=((*part1, None), (*part2, None)))
    kernels = [(text, forward_tile) for text in lowered_kernels(forward, *args)]
    kernels += list(zip(lowered_kernels(backward, *args, cotangent), (part1, part2)))
    with tempfile.TemporaryDirectory(prefix="sana-kernel-code-") as folder:
        return [report(text, tile, folder) for text, tile in kernels]


def main(argv=None) -> int:
    tile = lambda text: tuple(int(v) for v in text.split(","))  # noqa: E731
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a shape that compiles quickly (CPU smoke test)")
    parser.add_argument("--glu-shape", type=int, nargs=4, metavar=("B", "H", "W", "F"), default=(16, 32, 32, 5600),
                        help="default: Sana-1.6B at 1024 px, batch 16")
    parser.add_argument("--forward-tile", type=tile, metavar="COLS,CHANNELS,WARPS", help="default: the shipped one")
    parser.add_argument("--backward-tiles", type=tile, nargs=2, metavar="COLS,CHANNELS,WARPS",
                        help="part 1's and part 2's; default: the shipped ones")
    args = parser.parse_args(argv)
    shape = (1024, 16, 2, 80) if args.tiny else tuple(args.glu_shape)
    for record in glu_reports(shape, args.forward_tile, args.backward_tiles):
        print(json.dumps({"shape": list(shape), **record}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
