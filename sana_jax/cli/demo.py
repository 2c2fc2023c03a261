"""`sana-jax demo`: the chain of trust on random tiny SANA models, with no downloads.

For each kind of SANA (1.0; 1.5 with q/k norms; Sprint with guidance embedding; 2K/4K-style sin-cos position
embedding with patch 2) it initialises a tiny model as the original code does, moves every weight off its init,
exports it to the official layout, a diffusers folder and a sana-jax folder, reloads each export and checks the
weights come back bit-exactly, then runs the parity report (sana_jax vs sana_torch_ref vs diffusers, fp32 and
bf16, per block). Writes `report.json`, one PNG per model and the exports under `--out`.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from tqdm import tqdm

import sana_jax
from sana_jax import configs
from sana_jax.cli import parity
from sana_jax.cli.plot import plot_report

DEMO_MODELS = {
    "sana_1.0": configs.TINY,
    "sana_1.5_qknorm": configs.TINY.replace(qk_norm=True, cross_norm=True),
    "sana_sprint": configs.TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True),
    "sana_sincos_pe_patch2": configs.TINY.replace(use_pe=True, pe_interpolation=2.0, patch_size=2),
}


def _same_params(a, b) -> bool:
    flat_a = jax.tree_util.tree_leaves_with_path(a)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(b))
    return len(flat_a) == len(flat_b) and all(
        path in flat_b and np.array_equal(np.asarray(v), np.asarray(flat_b[path])) for path, v in flat_a)


def _round_trips(name: str, cfg, params, out_dir: str) -> dict[str, bool]:
    from sana_conversion import export_diffusers, export_official, save_params

    targets = {
        "official": (export_official, os.path.join(out_dir, f"{name}.official.safetensors")),
        "diffusers": (export_diffusers, os.path.join(out_dir, f"{name}.diffusers")),
        "sana-jax": (save_params, os.path.join(out_dir, f"{name}.sana-jax")),
    }
    result = {}
    for fmt, (export, path) in targets.items():
        export(cfg, params, path, overwrite=True)
        expected_cfg, expected = cfg, params
        if fmt == "diffusers" and cfg.logvar:  # diffusers has no logvar head (used only by the sCM loss)
            expected_cfg = cfg.replace(logvar=False)
            expected = {k: v for k, v in params.items() if k != "logvar_linear"}
        # Shapes do not identify the tiny model's cross-attention heads, so the config is passed, as a user would.
        _, reloaded = sana_jax.load_pretrained(path, config=expected_cfg)
        result[fmt] = _same_params(expected, reloaded)
    return result


def run_demo(out_dir: str, seed: int = 0) -> int:
    os.makedirs(out_dir, exist_ok=True)
    report = {}
    ok = True
    for name, cfg in tqdm(DEMO_MODELS.items(), desc="tiny SANA models", file=sys.stderr):
        model = sana_jax.SanaTransformer(cfg)
        params = sana_jax.perturb_params(sana_jax.init_params(model, jax.random.key(seed)), seed=seed)
        trips = _round_trips(name, cfg, params, out_dir)
        inputs = parity.random_inputs(cfg, batch=2, latent_hw=(6, 10), tokens=cfg.model_max_length, seed=seed)
        rows = parity.parity_report(cfg, params, inputs)
        failures = parity.fp32_failures(rows)
        ok &= all(trips.values()) and not failures
        names = sorted({r.name for r in rows}, key=parity._order)
        png = os.path.join(out_dir, f"{name}.parity.png")
        plot_report(rows, names, png, f"{name}: relative error vs sana_torch_ref fp32", parity.FP32_TARGET)
        report[name] = {"config": {k: v for k, v in vars(cfg).items()}, "round_trip_bit_exact": trips,
                        "rows": [vars(r) for r in rows], "png": png}
        tqdm.write(f"\n== {name}: {sana_jax.count_params(params):,} params; round trips bit-exact: "
                   + ", ".join(f"{k} {'yes' if v else 'NO'}" for k, v in trips.items()), file=sys.stdout)
        tqdm.write(parity.format_report(rows), file=sys.stdout)
        worst = max(r.rel for r in rows if r.dtype == "float32")
        tqdm.write(f"worst fp32 error {worst:.2e} (target {parity.FP32_TARGET:.0e}): "
                   f"{'PASS' if not failures else 'FAIL'}; plot {png}", file=sys.stdout)
    path = os.path.join(out_dir, "report.json")
    with open(path + ".tmp", "w") as f:
        json.dump(report, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\n{'all models agree' if ok else 'PARITY FAILURES (see above)'}; report {path}")
    return 0 if ok else 1
