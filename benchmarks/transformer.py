"""SANA transformer forward and training step: sana_jax (jit) vs diffusers eager / torch.compile, in one run.

Random weights (each side its own init; timings do not depend on the values), bf16, 300 caption tokens with a
full mask, as DESIGN.md's anchors. Each framework runs in its own child process, so neither holds GPU memory
while the other is measured.

  forward: SanaTransformer.apply under jit with bf16 parameters, vs SanaTransformer2DModel (bf16, no_grad),
           eager and torch.compile(dynamic=False).
  train:   one optimizer step of sana_jax.train.step.make_train_step (flow-matching loss, backward, clipping to
           0.1, CAME, fp32 master weights, bf16 compute, a remat policy), vs the PyTorch anchor: diffusers model
           in fp32 under bf16 autocast, torch.compile, MSE against eps - x0, clip_grad_norm_(0.1), came_pytorch.

One JSON object per line: per implementation and case the median ms, images/s, analytic TFLOP/s and MFU (forward
FLOPs of sana_jax.flops, x3 for a training step, / 989 TFLOP/s), peak memory (torch: max_memory_allocated; JAX
forward: XLA's memory analysis of the compiled program, arguments + outputs + temporaries; JAX train: the device's
peak_bytes_in_use, each case in a process of its own); for a training step also `optimizer_ms`, its clipping and
optimizer update timed alone (the part that does not grow with the batch); then one summary line per case with
the ratios to the anchors. With `--rounds N` the children run N times in turn (JAX, torch, JAX, torch, ...); each
record names its round, each summary compares the sides of one round, and a last line per case gives the median
and range over the rounds: a machine's drift during a call moves both sides of a round alike.

GPU:  source benchmarks/gpu-env.sh && python3 benchmarks/transformer.py forward
      python3 benchmarks/transformer.py train --models sana_1600m --batches 8 16 --remat none dots_saveable
      (the fastest 1.6B step measured: --batches 48 on an H200, 24 on an H100 80GB, --torch-batches 8
      --remat none --set unroll_blocks=true)
      python3 benchmarks/transformer.py forward --models sana_1600m --shapes 1024x32 --impls jax diffusers_compile
      --rounds 2   (the 1.25x target, each side twice, alternating)
CPU smoke test (tiny config, no torch.compile):  python benchmarks/transformer.py forward --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (PEAK_FLOPS, error_text, jax_versions, median_ms, parse_overrides, run_child,  # noqa: E402
                    xla_program_bytes)

TOKENS = 300
# Forward cases (image px, batch) of the issue: 1024 px at batch 1 / 8 / 32, 2048 px and 4096 px at batch 1.
FORWARD_CASES = [(1024, 1), (1024, 8), (1024, 32), (2048, 1), (4096, 1)]
# torch.compile costs about a minute per shape and model: the anchor is compiled where DESIGN.md has one.
COMPILE_CASES = [(1024, 32), (4096, 1)]


def emit(record: dict) -> None:
    print(json.dumps({"bench": "transformer", **record}), flush=True)


def model_config(name: str, remat: str = "none", overrides: dict | None = None):
    """The benchmarked model: bf16 compute; `overrides` are SanaConfig fields (e.g. attention_impl="xla")."""
    from sana_jax import configs

    return configs.get(name, **{"compute_dtype": "bfloat16", "remat_policy": remat, **(overrides or {})})


def flops(cfg, mode: str, size: int, batch: int) -> float:
    from sana_jax.flops import forward_flops

    latent = size // 32
    return (3 if mode == "train" else 1) * forward_flops(cfg, batch, latent, latent, TOKENS)


def finish(record: dict) -> dict:
    if record.get("ms"):
        cfg = model_config(record["model"])
        total = flops(cfg, record["mode"], record["size"], record["batch"])
        record["ms"] = round(record["ms"], 3)
        if "optimizer_ms" in record:
            record["optimizer_ms"] = round(record["optimizer_ms"], 3)
        record["images_per_s"] = round(record["batch"] / record["ms"] * 1e3, 3)
        record["tflops_per_s"] = round(total / record["ms"] / 1e9, 1)
        record["mfu"] = round(total / (record["ms"] / 1e3) / (PEAK_FLOPS * record.get("devices", 1)), 4)
        record["us_per_token"] = round(record["ms"] * 1e3 / (record["batch"] * (record["size"] // 32) ** 2), 4)
    for key in ("peak_bytes", "program_bytes"):
        if record.get(key) is not None:
            record[key.replace("bytes", "gib")] = round(record[key] / 2**30, 3)
    return record


# ---------------------------------------------------------------------------------------------------- JAX

def jax_forward(case: dict) -> dict:
    import jax
    import jax.numpy as jnp

    import sana_jax
    from sana_jax.ops import TRANSFORMER_COMPILER_OPTIONS

    cfg = model_config(case["model"], overrides=case["overrides"])
    model = sana_jax.SanaTransformer(cfg)
    # Parameters stored in bf16, as diffusers' `.to(bfloat16)`: the in-model casts become no-ops.
    params = jax.jit(lambda key: jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                                              sana_jax.init_params(model, key)))(jax.random.key(0))
    b, latent = case["batch"], case["size"] // 32
    keys = jax.random.split(jax.random.key(1), 2)
    x = jax.random.normal(keys[0], (b, latent, latent, cfg.in_channels), jnp.bfloat16)
    y = jax.random.normal(keys[1], (b, TOKENS, cfg.caption_channels), jnp.bfloat16)
    t = jnp.full((b,), 500.0, jnp.float32)
    mask = jnp.ones((b, TOKENS), jnp.int32)
    forward = jax.jit(lambda p, *a: model.apply({"params": p}, *a), compiler_options=TRANSFORMER_COMPILER_OPTIONS)
    start = time.perf_counter()
    compiled = forward.lower(params, x, t, y, mask).compile()
    record = {"compile_s": round(time.perf_counter() - start, 2), "program_bytes": xla_program_bytes(compiled)}
    record["ms"] = median_ms(lambda: compiled(params, x, t, y, mask), jax.block_until_ready, case["warmup"],
                             case["iters"])
    return record


def jax_train(case: dict) -> dict:
    import jax
    import numpy as np

    from sana_jax.train import sharding
    from sana_jax.train.config import MeshConfig, OptimConfig, TrainConfig
    from sana_jax.train.step import init_state, make_optimizer, make_train_step, state_shardings

    cfg = TrainConfig(model=model_config(case["model"], case["remat"], case["overrides"]),
                      optim=OptimConfig(name=case["optimizer"], lr=1e-4, warmup_steps=0, clip_grad_norm=0.1,
                                        layer_group=case["layer_group"]),
                      batch_size=case["batch"], mesh=MeshConfig(*case["mesh"]))
    mesh = sharding.make_mesh(cfg.mesh)
    tx = make_optimizer(cfg)
    _, shardings = state_shardings(cfg, mesh, tx)
    state = init_state(cfg, tx, shardings)
    b, latent, m = case["batch"], case["size"] // 32, cfg.model
    rng = np.random.default_rng(0)
    host = {"x0": rng.standard_normal((b, latent, latent, m.in_channels), np.float32),
            "y": rng.standard_normal((b, TOKENS, m.caption_channels), np.float32),
            "mask": np.ones((b, TOKENS), np.int32),
            "null_y": rng.standard_normal((TOKENS, m.caption_channels), np.float32)}
    step, batch_sh = make_train_step(cfg, mesh, tx, shardings, {k: v.shape for k, v in host.items()})
    batch = {k: jax.device_put(v, batch_sh[k]) for k, v in host.items()}
    holder = [state]

    def call():
        holder[0], metrics = step(holder[0], batch)
        return metrics["loss"]

    start = time.perf_counter()
    jax.block_until_ready(call())  # compiles; the state is donated, so the program is measured by its use
    record = {"compile_s": round(time.perf_counter() - start, 2)}
    record["ms"] = median_ms(call, jax.block_until_ready, case["warmup"], case["iters"])
    stats = jax.devices()[0].memory_stats() or {}
    record["peak_bytes"] = stats.get("peak_bytes_in_use")  # this case alone: see main
    measure_apart(record, "optimizer_ms", lambda: jax_optimizer_ms(case, cfg, tx, holder))
    return record


def measure_apart(record: dict, key: str, measure) -> None:
    """record[key] = measure(), or record[key + "_error"] if it fails (say out of memory): the figures measured
    before it stand."""
    try:
        record[key] = measure()
    except Exception as err:  # noqa: BLE001
        record[f"{key}_error"] = error_text(err)


def jax_optimizer_ms(case: dict, cfg, tx, holder: list) -> float:
    """The step's clipping + optimizer update + apply alone (state donated, as in the step), on gradients of the
    step's dtypes: those of the compute copies where the step differentiates them (CAME's kernels on one GPU),
    else of the fp32 params. The part of the step that does not grow with the batch."""
    import jax
    import jax.numpy as jnp
    import optax

    from sana_jax.model import compute_copies
    from sana_jax.train.step import narrow_gradients

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    state = holder.pop()
    differentiated = (lambda p: compute_copies(cfg.model, p)) if narrow_gradients(cfg) else (lambda p: p)
    grads = jax.jit(lambda tree: jax.tree.map(lambda g: jnp.full_like(g, 1e-3), differentiated(tree)),
                    out_shardings=jax.tree.map(lambda p: p.sharding, state.params))(state.params)
    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(state.params, state.opt_state, grads).compile()
    carry = [state.params, state.opt_state]
    del state

    def call():
        carry[:] = compiled(*carry, grads)
        return carry

    return median_ms(call, jax.block_until_ready, case["warmup"], case["iters"])


def run_jax(cases: list[dict]) -> None:
    import jax

    device = jax.devices()[0]
    for case in cases:
        record = {**case, "impl": "jax", "device": device.device_kind, "devices": jax.device_count(),
                  **jax_versions(jax)}
        try:
            record.update(jax_forward(case) if case["mode"] == "forward" else jax_train(case))
        except Exception as err:  # noqa: BLE001 - an OOM at one batch must not end the sweep
            record["error"] = error_text(err)
        emit(record)


# -------------------------------------------------------------------------------------------------- torch

def diffusers_model(name: str, device):
    import torch
    from diffusers import SanaTransformer2DModel

    from sana_conversion.diffusers import diffusers_config

    config = {k: v for k, v in diffusers_config(model_config(name)).items() if not k.startswith("_")}
    torch.manual_seed(0)
    with torch.device(device):
        return SanaTransformer2DModel(**config)


def torch_inputs(case: dict, cfg, device, dtype):
    import torch

    b, latent = case["batch"], case["size"] // 32
    g = torch.Generator(device).manual_seed(1)
    return dict(hidden_states=torch.randn(b, cfg.in_channels, latent, latent, device=device, dtype=dtype,
                                          generator=g),
                encoder_hidden_states=torch.randn(b, TOKENS, cfg.caption_channels, device=device, dtype=dtype,
                                                  generator=g),
                timestep=torch.full((b,), 500.0, device=device),
                encoder_attention_mask=torch.ones(b, TOKENS, device=device, dtype=torch.int64))


def torch_forward(case: dict, models: dict, device, sync) -> dict:
    import torch

    cfg = model_config(case["model"])
    if case["model"] not in models:
        models.clear()  # one model in memory at a time
        models[case["model"]] = diffusers_model(case["model"], device).to(torch.bfloat16).eval()
    model = models[case["model"]]
    if case["impl"] == "diffusers_compile":
        model = torch.compile(model, dynamic=False)
    inputs = torch_inputs(case, cfg, device, torch.bfloat16)
    fn = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        start = time.perf_counter()
        sync(fn())
        record = {"compile_s": round(time.perf_counter() - start, 2)}
        record["ms"] = median_ms(fn, sync, case["warmup"], case["iters"])
    return record


def torch_train(case: dict, device, sync) -> dict:
    import torch
    from came_pytorch import CAME

    cfg = model_config(case["model"])
    model = diffusers_model(case["model"], device).train()  # fp32 master weights
    # SANA's optimizer settings (reference/sana-original.md): betas (0.9, 0.999, 0.9999), eps (1e-30, 1e-16).
    opt = CAME(model.parameters(), lr=1e-4, weight_decay=0.0, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16))
    forward = torch.compile(model, dynamic=False) if case["impl"] == "diffusers_compile" else model
    inputs = torch_inputs(case, cfg, device, torch.float32)
    x0 = inputs.pop("hidden_states")
    autocast = device.type == "cuda"

    def backward():
        eps = torch.randn_like(x0)
        sigma = torch.rand(x0.shape[0], 1, 1, 1, device=device)
        with torch.autocast(device.type, torch.bfloat16, enabled=autocast):
            v = forward(hidden_states=(1 - sigma) * x0 + sigma * eps, **inputs, return_dict=False)[0]
        loss = torch.mean((v.float() - (eps - x0)) ** 2)
        loss.backward()
        return loss

    def update():  # clipping + CAME: the part of the step that does not grow with the batch
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    def step():
        loss = backward()
        update()
        opt.zero_grad(set_to_none=True)
        return loss

    start = time.perf_counter()
    sync(step())
    record = {"compile_s": round(time.perf_counter() - start, 2)}
    record["ms"] = median_ms(step, sync, case["warmup"], case["iters"])
    backward()  # gradients for the update alone (the peak of the step stays the larger)
    measure_apart(record, "optimizer_ms", lambda: median_ms(update, sync, case["warmup"], case["iters"]))
    del model, opt, forward
    return record


def run_torch(cases: list[dict], tiny: bool) -> None:
    import torch

    cuda = torch.cuda.is_available() and not tiny
    device = torch.device("cuda" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(1)  # smoke numbers only; OpenMP busy-waits badly on a loaded 2-core machine
    sync = (lambda out: torch.cuda.synchronize()) if cuda else (lambda out: None)
    name = torch.cuda.get_device_name() if cuda else "cpu"
    models: dict = {}
    for case in cases:
        record = {**case, "device": name, "torch": torch.__version__}
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            record.update(torch_forward(case, models, device, sync) if case["mode"] == "forward"
                          else torch_train(case, device, sync))
            if cuda:
                record["peak_bytes"] = torch.cuda.max_memory_allocated()
        except Exception as err:  # noqa: BLE001 - an OOM at one batch must not end the sweep
            record["error"] = error_text(err)
        emit(record)


# --------------------------------------------------------------------------------------------------- main

def plan(args) -> tuple[list[dict], list[dict]]:
    """(JAX cases, torch cases); torch cases are ordered eager first, so a run cut short keeps the eager anchors."""
    common = dict(mode=args.mode, warmup=args.warmup, iters=args.iters, overrides=args.overrides)
    jax_cases, torch_cases = [], []
    for name in args.models:
        if args.mode == "forward":
            shapes = args.shapes
            for size, batch in shapes:
                jax_cases.append(dict(common, model=name, size=size, batch=batch))
                torch_cases.append(dict(common, model=name, size=size, batch=batch, impl="diffusers_eager"))
            torch_cases += [dict(common, model=name, size=size, batch=batch, impl="diffusers_compile")
                            for size, batch in shapes if "diffusers_compile" in args.impls and
                            (args.tiny or (size, batch) in COMPILE_CASES or args.compile_all)]
        else:
            for batch in args.batches:
                jax_cases += [dict(common, model=name, size=args.size, batch=batch, remat=remat,
                                   optimizer=args.optimizer, layer_group=group, mesh=args.mesh)
                              for remat in args.remat for group in args.layer_groups]
            torch_cases += [dict(common, model=name, size=args.size, batch=batch, impl=impl, optimizer="came")
                            for impl in ("diffusers_eager", "diffusers_compile") if impl in args.impls
                            for batch in args.torch_batches]
    torch_cases = [c for c in torch_cases if c["impl"] in args.impls]
    torch_cases.sort(key=lambda c: c["impl"] == "diffusers_compile")
    return (jax_cases if "jax" in args.impls else []), torch_cases


def summaries(records: list[dict]) -> list[dict]:
    """Per JAX record: the ratios to the anchors of the same model, mode and size: the speedup at the same batch,
    and the ratio of images per second to an anchor at another batch (JAX at its largest batch that fits against
    the anchor at DESIGN.md's b8)."""
    out = []
    for rec in records:
        if rec.get("impl") != "jax" or not rec.get("ms"):
            continue
        case = (rec["model"], rec["mode"], rec["size"], rec.get("round"))
        summary = {"summary": True, "model": rec["model"], "mode": rec["mode"], "size": rec["size"],
                   "batch": rec["batch"], "jax_ms": rec["ms"], "jax_mfu": rec["mfu"]}
        summary.update({field: rec[field] for field in ("remat", "layer_group", "round") if field in rec})
        if "optimizer_ms" in rec:
            summary["jax_optimizer_ms"] = rec["optimizer_ms"]
        for ref in records:
            if ref.get("impl", "jax") == "jax" or not ref.get("ms") or \
                    (ref["model"], ref["mode"], ref["size"], ref.get("round")) != case:
                continue
            if ref["batch"] == rec["batch"]:
                summary[f"{ref['impl']}_ms"] = ref["ms"]
                summary[f"speedup_vs_{ref['impl']}"] = round(ref["ms"] / rec["ms"], 3)
                if "optimizer_ms" in ref:
                    summary[f"{ref['impl']}_optimizer_ms"] = ref["optimizer_ms"]
            else:
                summary[f"throughput_vs_{ref['impl']}_b{ref['batch']}"] = \
                    round(rec["images_per_s"] / ref["images_per_s"], 3)
        out.append(summary)
    return out


CASE_FIELDS = ("model", "mode", "size", "batch", "remat", "layer_group")


def across_rounds(per_round: list[dict]) -> list[dict]:
    """Per case measured in several rounds: the median and [min, max] over the rounds of the JAX time and of each
    ratio to an anchor (each ratio taken within its round)."""
    cases: dict[tuple, list[dict]] = {}
    for summary in per_round:
        cases.setdefault(tuple(summary.get(field) for field in CASE_FIELDS), []).append(summary)
    out = []
    for rounds in cases.values():
        if len(rounds) < 2:
            continue
        merged = {"summary": True, "rounds": len(rounds),
                  **{field: rounds[0][field] for field in CASE_FIELDS if field in rounds[0]}}
        for key in dict.fromkeys(key for summary in rounds for key in summary):  # an anchor may fail in one round
            if key == "jax_ms" or key.startswith(("speedup_vs_", "throughput_vs_")):
                values = [r[key] for r in rounds if key in r]
                merged[key] = round(statistics.median(values), 3)
                merged[f"{key}_range"] = [min(values), max(values)]
        out.append(merged)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["forward", "train"])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU, small sizes (smoke test)")
    parser.add_argument("--models", nargs="+", default=None, help="default sana_600m sana_1600m (tiny: tiny)")
    parser.add_argument("--shapes", nargs="+", default=None, metavar="PXxBATCH",
                        help="forward cases, e.g. 1024x32 4096x1 (default: the issue's five)")
    parser.add_argument("--compile-all", action="store_true", help="torch.compile every forward shape")
    parser.add_argument("--size", type=int, default=None, help="train: image px (default 1024; tiny 64)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="train: JAX batches (default 8)")
    parser.add_argument("--torch-batches", type=int, nargs="+", default=None,
                        help="train: PyTorch anchor batches (default 8, DESIGN.md's anchor)")
    parser.add_argument("--remat", nargs="+", default=None, choices=["none", "full", "dots_saveable"],
                        help="train: JAX remat policies (default none)")
    parser.add_argument("--mesh", default="-1,1,1", help="train: JAX (data, fsdp, tensor) mesh sizes, -1 = the rest "
                                                        "of the devices, e.g. 1,-1,1 for FSDP over every GPU")
    parser.add_argument("--optimizer", default="came", choices=["came", "came_8bit", "adamw"],
                        help="train: the JAX optimizer (the anchor is always came_pytorch)")
    parser.add_argument("--layer-groups", type=int, nargs="+", default=[0], metavar="N",
                        help="train: CAME's optim.layer_group values (stacked layers updated N at a time in "
                             "place; default 0 = all at once)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="JAX model config override, e.g. --set attention_impl=xla --set glu_impl=xla")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 10; tiny 1)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed calls (default 3; tiny 1)")
    parser.add_argument("--impls", nargs="+", default=None, choices=["jax", "diffusers_eager", "diffusers_compile"],
                        help="default all three (tiny: no torch.compile)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the JAX and torch children this many times in turn; ratios within each round, "
                             "then their median (default 1)")
    parser.add_argument("--child", choices=["jax", "torch"], help=argparse.SUPPRESS)  # internal
    parser.add_argument("--cases", help=argparse.SUPPRESS)  # internal: JSON list for --child
    args = parser.parse_args(argv)
    if args.child:
        cases = json.loads(args.cases)
        run_jax(cases) if args.child == "jax" else run_torch(cases, args.tiny)
        return 0

    args.overrides = parse_overrides(args.set)
    args.mesh = [int(v) for v in args.mesh.split(",")]
    tiny = args.tiny
    args.models = args.models or (["tiny"] if tiny else ["sana_600m", "sana_1600m"])
    args.shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes] if args.shapes else \
        ([(64, 2), (128, 1)] if tiny else FORWARD_CASES)
    args.size = args.size or (64 if tiny else 1024)
    args.batches = args.batches or ([2] if tiny else [8])
    args.torch_batches = args.torch_batches or ([2] if tiny else [8])
    args.remat = args.remat or ["none"]
    args.iters = args.iters or (1 if tiny else 10)
    args.warmup = args.warmup or (1 if tiny else 3)
    args.impls = args.impls or (["jax", "diffusers_eager"] if tiny else ["jax", "diffusers_eager",
                                                                          "diffusers_compile"])
    jax_cases, torch_cases = plan(args)
    records = []
    script = os.path.abspath(__file__)
    flags = ["--tiny"] if tiny else []
    # A training case runs in a child of its own, so that it measures the memory its batch needs alone: after other
    # cases in one JAX process a case can run out of memory where it fits alone (1.6B b16 unrolled after two b8
    # cases; alone it peaks at 50.6 GiB). The torch child empties its cache between cases.
    jax_groups = [[case] for case in jax_cases] if args.mode == "train" else [jax_cases]
    children = [("jax", group) for group in jax_groups] + [("torch", torch_cases)]
    for round_number in range(1, args.rounds + 1):
        for child, cases in children:
            if not cases:
                continue
            for record in run_child(script, [args.mode, *flags, "--child", child, "--cases", json.dumps(cases)]):
                if "bench" in record:
                    record = finish({k: v for k, v in record.items() if k != "bench"})
                if args.rounds > 1:
                    record["round"] = round_number
                emit(record)
                records.append(record)
    per_round = summaries(records)
    for summary in per_round + across_rounds(per_round):
        emit(summary)
    return 1 if any("error" in r for r in records) and not any(r.get("ms") for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
