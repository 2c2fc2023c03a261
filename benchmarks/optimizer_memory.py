"""Optimizer-state and training-state memory of AdamW, CAME and CAME-8bit on the released SANA variants.

Everything comes from `jax.eval_shape` (no allocation): parameter shapes from `sana_jax.abstract_params`, state
shapes from `jax.eval_shape(tx.init, params)`. Training state = fp32 params + fp32 grads + optimizer state
(activations, which depend on batch and remat, are not counted). Prints one JSON object per row, then the
markdown table of docs/memory.md.

    python benchmarks/optimizer_memory.py [--configs sana_1600m sana15_4800m]
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import numpy as np
import optax

import sana_jax
from sana_jax import optim

GIB = 2 ** 30
# The optimizers compared; learning rates do not change state sizes.
OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-4),
    "came": lambda: optim.came(1e-4),
    "came_8bit": lambda: optim.came_8bit(1e-4),
}


def tree_bytes(tree) -> int:
    """Bytes of every array leaf of a tree of arrays or ShapeDtypeStructs."""
    return int(sum(np.prod(leaf.shape, dtype=np.int64) * np.dtype(leaf.dtype).itemsize
                   for leaf in jax.tree.leaves(tree)))


def memory_rows(params, config: str) -> list[dict]:
    """One row per optimizer for a params tree (arrays or ShapeDtypeStructs); ratios are against AdamW."""
    n = sana_jax.count_params(params)
    param_bytes = tree_bytes(params)
    grad_bytes = param_bytes  # gradients have the params' dtype (fp32 master weights)
    rows = []
    for name, make in OPTIMIZERS.items():
        state_bytes = tree_bytes(jax.eval_shape(make().init, params))
        total = param_bytes + grad_bytes + state_bytes
        rows.append({"config": config, "optimizer": name, "params": n, "param_bytes": param_bytes,
                     "grad_bytes": grad_bytes, "state_bytes": state_bytes, "state_bytes_per_param": state_bytes / n,
                     "total_bytes": total, "total_bytes_per_param": total / n})
    adamw = next(r for r in rows if r["optimizer"] == "adamw")
    for row in rows:
        row["state_vs_adamw"] = row["state_bytes"] / adamw["state_bytes"]
        row["total_vs_adamw"] = row["total_bytes"] / adamw["total_bytes"]
    return rows


def config_rows(config: str) -> list[dict]:
    return memory_rows(sana_jax.abstract_params(sana_jax.SanaTransformer(sana_jax.configs.get(config))), config)


def markdown(rows: list[dict]) -> str:
    lines = ["| model | optimizer | state B/param | state GiB | params + grads + state GiB | total vs AdamW |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} ({r['params'] / 1e9:.2f}B) | {r['optimizer']} | "
                     f"{r['state_bytes_per_param']:.3f} | {r['state_bytes'] / GIB:.2f} | "
                     f"{r['total_bytes'] / GIB:.2f} | {r['total_vs_adamw'] - 1:+.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["sana_1600m", "sana15_4800m"],
                        help="sana_jax.configs names")
    args = parser.parse_args(argv)
    rows = [row for config in args.configs for row in config_rows(config)]
    for row in rows:
        print(json.dumps({"bench": "optimizer_memory", **row}))
    print(markdown(rows))
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
