"""CPU micro-benchmark: one jitted optimizer update (update + apply_updates, donated state) of CAME and CAME-8bit
vs optax.adamw and optax.adafactor on a SANA-1.6B-shaped parameter tree, with came_pytorch.CAME and
torch.optim.AdamW on the same shapes (torch layouts) as the anchor measured in the same run.

The full 1.6B tree needs params + grads + AdamW state = 25.6 GB in fp32, more than a 24 GiB CPU machine, so the
default is a representative slice: every non-block parameter of sana_1600m plus `--blocks` of its 20 blocks
(per-block shapes are exact; update cost is linear in the number of blocks). Prints one JSON object per line;
`ratio_vs_adamw` is each median time over optax.adamw's.

    python benchmarks/came_update.py [--blocks 4] [--iters 5] [--tiny] [--no-torch] [--optimizers ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sana_jax
from sana_jax import optim

LR = 1e-4
JAX_OPTIMIZERS = {
    "optax.adamw": lambda: optax.adamw(LR),
    "optax.adafactor": lambda: optax.adafactor(LR),
    "sana_jax.optim.came": lambda: optim.came(LR),
    "sana_jax.optim.came_8bit": lambda: optim.came_8bit(LR),
}


def bench_config(tiny: bool, blocks: int) -> sana_jax.SanaConfig:
    if tiny:
        return sana_jax.configs.get("tiny")
    return sana_jax.configs.get("sana_1600m").replace(depth=blocks)


def random_tree(shapes, seed: int):
    """fp32 N(0, 0.02^2) arrays shaped like a tree of ShapeDtypeStructs (numpy: no compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * np.float32(0.02)), shapes)


def time_jax(make_tx, params, grads, iters: int) -> dict:
    """Median wall time of one donated, jitted update + apply_updates; compile time separately."""
    tx = make_tx()

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))(params)  # donated below: keep the caller's
    state = jax.jit(tx.init)(params)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - start
    params, state = jax.block_until_ready(compiled(params, state, grads))  # warm-up
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        params, state = jax.block_until_ready(compiled(params, state, grads))
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "compile_s": compile_s}


def _torch_layout(path_names: tuple[str, ...], x: np.ndarray) -> list[np.ndarray]:
    """One flax leaf -> the official torch tensors: unstacked blocks, Linear [out, in], conv OIHW."""
    stacked = optim.sana_stacked(path_names)
    layers = list(x) if stacked else [x]
    out = []
    for a in layers:
        if path_names[-1] == "kernel" and a.ndim == 2:
            a = a.T
        elif path_names[-1] == "kernel" and a.ndim == 4:
            a = a.transpose(3, 2, 0, 1)
        out.append(np.ascontiguousarray(a))
    return out


def time_torch(shapes, iters: int) -> list[dict]:
    """came_pytorch.CAME and torch.optim.AdamW steps on the same tensors in torch layout (the anchor)."""
    import came_pytorch
    import torch

    rng = np.random.default_rng(0)
    tensors = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        dummy = np.empty(leaf.shape, np.float32)
        tensors += [a.shape for a in _torch_layout(optim._path_names(path), dummy)]
    results = []
    for name, make in (("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=LR)),
                       ("came_pytorch.CAME", lambda ps: came_pytorch.CAME(ps, lr=LR))):
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s, np.float32) * 0.02)) for s in tensors]
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape, np.float32) * 0.02)
        opt = make(params)
        opt.step()  # warm-up: creates the state
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - start)
        results.append({"optimizer": name, "framework": f"torch {torch.__version__}",
                        "torch_threads": torch.get_num_threads(), "ms": 1e3 * statistics.median(times),
                        "min_ms": 1e3 * min(times)})
        del opt, params
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="blocks of sana_1600m in the slice (of 20)")
    parser.add_argument("--iters", type=int, default=5, help="timed updates per optimizer (after a warm-up)")
    parser.add_argument("--tiny", action="store_true", help="the tiny config (a smoke test, for tests/)")
    parser.add_argument("--no-torch", action="store_true", help="skip the came_pytorch / torch AdamW anchor")
    parser.add_argument("--optimizers", nargs="+", choices=list(JAX_OPTIMIZERS), default=list(JAX_OPTIMIZERS),
                        help="the JAX optimizers to time (optax.adamw is always timed: ratios are against it)")
    args = parser.parse_args(argv)
    chosen = {"optax.adamw", *args.optimizers}

    cfg = bench_config(args.tiny, args.blocks)
    shapes = sana_jax.abstract_params(sana_jax.SanaTransformer(cfg))
    n = sana_jax.count_params(shapes)
    params, grads = random_tree(shapes, 0), random_tree(shapes, 1)
    common = {"bench": "came_update", "config": cfg.name, "blocks": cfg.depth, "params": n,
              "device": f"{jax.devices()[0].device_kind} ({platform.processor() or platform.machine()})",
              "jax": jax.__version__, "optax": optax.__version__}
    rows = [{**common, "optimizer": name, "framework": f"jax {jax.__version__}",
             **time_jax(make, params, grads, args.iters)} for name, make in JAX_OPTIMIZERS.items() if name in chosen]
    del params, grads
    if not args.no_torch:
        rows += [{**common, **row} for row in time_torch(shapes, args.iters)]
    adamw = next(r["ms"] for r in rows if r["optimizer"] == "optax.adamw")
    torch_adamw = next((r["ms"] for r in rows if r["optimizer"] == "torch.optim.AdamW"), None)
    came_pt = next((r["ms"] for r in rows if r["optimizer"] == "came_pytorch.CAME"), None)
    for row in rows:
        row["ratio_vs_adamw"] = row["ms"] / adamw
        if torch_adamw is not None:
            row["ratio_vs_torch_adamw"] = row["ms"] / torch_adamw
        if came_pt is not None:
            row["ratio_vs_came_pytorch"] = row["ms"] / came_pt
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
