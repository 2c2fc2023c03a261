"""CPU micro-benchmark: one jitted optimizer update (update + apply_updates, donated state) of CAME and CAME-8bit
vs optax.adamw and optax.adafactor on a SANA-1.6B-shaped parameter tree, with came_pytorch.CAME and
torch.optim.AdamW on the same shapes (torch layouts) as the anchor measured in the same run. Updates are timed in
turns (one of each optimizer per round), so load from other processes falls on all of them alike.

The full 1.6B tree needs params + grads + AdamW state = 25.6 GB in fp32, more than a 24 GiB CPU machine, and the
turns keep every optimizer's params and state alive at once, so the default is a representative slice: every
non-block parameter of sana_1600m plus `--blocks` of its 20 blocks (per-block shapes are exact; update cost is
linear in the number of blocks). Prints one JSON object per line; `ratio_vs_adamw` is each median time over
optax.adamw's, `min_ratio_vs_adamw` the same for the fastest update of each.

    python benchmarks/came_update.py [--blocks 2] [--iters 7] [--tiny] [--no-torch] [--optimizers ...]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Callable

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
    # impl="auto" above is the Pallas kernels of sana_jax.came_kernels on one CUDA GPU; these are XLA's reductions
    "sana_jax.optim.came[xla]": lambda: optim.came(LR, impl="xla"),
    "sana_jax.optim.came_8bit[xla]": lambda: optim.came_8bit(LR, impl="xla"),
}


def bench_config(tiny: bool, blocks: int) -> sana_jax.SanaConfig:
    if tiny:
        return sana_jax.configs.get("tiny")
    return sana_jax.configs.get("sana_1600m").replace(depth=blocks)


def random_tree(shapes, seed: int):
    """fp32 N(0, 0.02^2) arrays shaped like a tree of ShapeDtypeStructs (numpy: no compile per shape)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape, np.float32) * np.float32(0.02)), shapes)


def prepare_jax(make_tx, params, grads) -> tuple[Callable[[], None], float]:
    """(run one donated, jitted update + apply_updates, compile seconds) for one optimizer."""
    tx = make_tx()

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    params = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))(params)  # donated below: keep the caller's
    state = jax.jit(tx.init)(params)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads).compile()
    compile_s = time.perf_counter() - start
    carry = [params, state]

    def run() -> None:
        carry[:] = jax.block_until_ready(compiled(*carry, grads))

    run()  # warm-up
    return run, compile_s


def time_round_robin(runs: dict[str, Callable[[], None]], iters: int) -> dict[str, dict]:
    """Median and min ms of each run, timed in turns (one of each per round) so that load from other processes
    on a shared machine falls on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(iters):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: {"ms": 1e3 * statistics.median(t), "min_ms": 1e3 * min(t)} for name, t in times.items()}


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


def torch_runs(shapes) -> dict[str, Callable[[], None]]:
    """torch.optim.AdamW and came_pytorch.CAME steps on the same tensors in torch layout (the anchor)."""
    import came_pytorch
    import torch

    rng = np.random.default_rng(0)
    tensors = []
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        dummy = np.empty(leaf.shape, np.float32)
        tensors += [a.shape for a in _torch_layout(optim.path_names(path), dummy)]
    runs = {}
    for name, make in (("torch.optim.AdamW", lambda ps: torch.optim.AdamW(ps, lr=LR)),
                       ("came_pytorch.CAME", lambda ps: came_pytorch.CAME(ps, lr=LR))):
        params = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s, np.float32) * 0.02)) for s in tensors]
        for p in params:
            p.grad = torch.from_numpy(rng.standard_normal(p.shape, np.float32) * 0.02)
        opt = make(params)
        opt.step()  # warm-up: creates the state
        runs[name] = opt.step
    return runs


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=2, help="blocks of sana_1600m in the slice (of 20)")
    parser.add_argument("--iters", type=int, default=7, help="timed updates per optimizer (after a warm-up)")
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
              "jax": jax.__version__, "optax": optax.__version__, "iters": args.iters}
    runs, compile_s = {}, {}
    for name, make in JAX_OPTIMIZERS.items():
        if name in chosen:
            runs[name], compile_s[name] = prepare_jax(make, params, grads)
            print(f"# compiled {name} in {compile_s[name]:.1f} s", file=sys.stderr, flush=True)
    del params, grads  # each optimizer holds its own donated copy
    rows = [{**common, "optimizer": name, "framework": f"jax {jax.__version__}", "compile_s": compile_s[name],
             **timing} for name, timing in time_round_robin(runs, args.iters).items()]
    del runs
    if not args.no_torch:
        import torch

        for name, timing in time_round_robin(torch_runs(shapes), args.iters).items():
            rows.append({**common, "optimizer": name, "framework": f"torch {torch.__version__}",
                         "torch_threads": torch.get_num_threads(), **timing})
    adamw = next(r["ms"] for r in rows if r["optimizer"] == "optax.adamw")
    adamw_min = next(r["min_ms"] for r in rows if r["optimizer"] == "optax.adamw")
    torch_adamw = next((r["ms"] for r in rows if r["optimizer"] == "torch.optim.AdamW"), None)
    came_pt = next((r["ms"] for r in rows if r["optimizer"] == "came_pytorch.CAME"), None)
    for row in rows:
        row["ratio_vs_adamw"] = row["ms"] / adamw
        row["min_ratio_vs_adamw"] = row["min_ms"] / adamw_min
        if torch_adamw is not None:
            row["ratio_vs_torch_adamw"] = row["ms"] / torch_adamw
        if came_pt is not None:
            row["ratio_vs_came_pytorch"] = row["ms"] / came_pt
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
