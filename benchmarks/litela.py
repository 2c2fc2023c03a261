"""LiteLA (ReLU linear attention): fused Triton kernels vs the naive op, eager and `torch.compile`d.

One JSON line per (shape, dtype, mode): time (median ms) and peak memory above the inputs (MiB) of each
implementation, the ratios the issue targets (>= 2.5x naive eager, >= 1.2x compiled naive, peak memory <= 0.75x
naive) and the fused op's max|diff| / max|ref| against the naive op. Modes: `fwd` (inference, no autograd
graph) and `fwd_bwd` (forward, then backward with a random cotangent, gradients into the qkv projection).
q, k, v are views of one `[B, N, 3C]` tensor, as the model produces them.

    python benchmarks/litela.py                 # GPU: the original's shape and 1024px / 2K / 4K, bf16 and fp16
    python benchmarks/litela.py --e2e           # also transformer forwards (random weights, 1024px, bf16):
                                                # SanaRef with each op, diffusers eager (and compiled) if installed
    TRITON_INTERPRET=1 python benchmarks/litela.py --tiny   # CPU smoke run (the test suite does this)
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import types

import torch

from sana_kernels.linear_attn.naive import relu_linear_attention

# (name, B, N, H, D). The original's micro-benchmark: B=16, 64x64 tokens, C=1152 (36 heads of 32). Then
# Sana-1.6B's 70 heads at the token counts of 1024px (32x32 latents), 2K (64x64) and 4K (128x128).
SHAPES = [
    ("original_B16_N4096_H36", 16, 4096, 36, 32),
    ("1024px_B16_N1024_H70", 16, 1024, 70, 32),
    ("2K_B4_N4096_H70", 4, 4096, 70, 32),
    ("4K_B1_N16384_H70", 1, 16384, 70, 32),
]
TINY_SHAPES = [("tiny_B2_N100_H3", 2, 100, 3, 32), ("tiny_B1_N70_H2_D8", 1, 70, 2, 8)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _time_ms(fn, device, reset=()) -> float:
    """Median wall time of `fn()` in ms; `reset` tensors get `.grad = None` before every call."""

    def call():
        for t in reset:
            t.grad = None
        fn()

    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(call, warmup=25, rep=100, return_mode="median")
    call()
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _peak_mib(fn, device, reset=()) -> float | None:
    """Peak memory allocated during `fn()` above what was allocated before, in MiB (CUDA only)."""
    if device.type != "cuda":
        return None
    for t in reset:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    ref, out = ref.float(), out.float()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def bench_op(name, B, N, H, D, dtype, device, impls, meta):
    gen = torch.Generator(device=device).manual_seed(42)
    C = H * D
    qkv = torch.randn(B, N, 3 * C, generator=gen, device=device, dtype=dtype)
    do = torch.randn(B, N, H, D, generator=gen, device=device, dtype=dtype)
    rows = []
    for mode in ("fwd", "fwd_bwd"):
        x = qkv.detach().requires_grad_(mode == "fwd_bwd")

        def make(fn):
            def run():
                q, k, v = x.view(B, N, 3, H, D).unbind(2)
                if mode == "fwd":
                    with torch.no_grad():
                        return fn(q, k, v)
                out = fn(q, k, v)
                out.backward(do)
                return out

            return run

        row = {"bench": "litela", "shape": name, "B": B, "N": N, "H": H, "D": D,
               "dtype": [k for k, v in DTYPES.items() if v == dtype][0], "mode": mode}
        outs = {}
        for impl, fn in impls.items():
            run = make(fn)
            x.grad = None
            outs[impl] = (run().detach(), None if x.grad is None else x.grad.clone())
            row[f"{impl}_ms"] = round(_time_ms(run, device, reset=(x,)), 4)
            row[f"{impl}_peak_mib"] = None if (p := _peak_mib(run, device, reset=(x,))) is None else round(p, 1)
        row["fused_rel_err"] = _rel_err(outs["naive"][0], outs["fused"][0])
        if mode == "fwd_bwd":
            row["fused_grad_rel_err"] = _rel_err(outs["naive"][1], outs["fused"][1])
        row["speedup_vs_naive"] = round(row["naive_ms"] / row["fused_ms"], 3)
        if "compiled" in impls:
            row["speedup_vs_compiled"] = round(row["compiled_ms"] / row["fused_ms"], 3)
        if row["naive_peak_mib"]:
            row["mem_ratio_vs_naive"] = round(row["fused_peak_mib"] / row["naive_peak_mib"], 3)
        rows.append({**row, **meta})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _sana_cfg(hidden_size: int, depth: int, num_cross_heads: int):
    # SanaConfig's field names without importing sana_jax (the GPU machine may lack flax).
    return types.SimpleNamespace(
        in_channels=32, out_channels=32, hidden_size=hidden_size, depth=depth, linear_head_dim=32,
        num_cross_heads=num_cross_heads, mlp_ratio=2.5, caption_channels=2304, patch_size=1, sample_size=32,
        qk_norm=False, cross_norm=False, use_pe=False, pe_interpolation=1.0, guidance_embeds=False,
        guidance_embeds_scale=0.1, logvar=False, y_norm_scale_factor=0.01, norm_eps=1e-5, cross_norm_eps=1e-6,
        linear_attn_eps=1e-8,
    )


def _diffusers_model(cfg, device):
    from diffusers import SanaTransformer2DModel

    D = cfg.hidden_size
    with torch.device(device):
        model = SanaTransformer2DModel(
            in_channels=32, out_channels=32, num_attention_heads=D // 32, attention_head_dim=32,
            num_layers=cfg.depth, num_cross_attention_heads=cfg.num_cross_heads,
            cross_attention_head_dim=D // cfg.num_cross_heads, cross_attention_dim=D, caption_channels=2304,
            mlp_ratio=2.5, sample_size=32, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
            interpolation_scale=None,
        )
    return model.to(torch.bfloat16).eval()


def bench_e2e(device, impls, meta, batch: int, compile_diffusers: bool):
    """Transformer forward (random weights, 1024px = 32x32 latents, 300 caption tokens, bf16): SanaRef (eager)
    with each linear-attention implementation, and diffusers' SanaTransformer2DModel eager (and compiled, if
    asked) when diffusers is importable."""
    from sana_torch_ref import SanaRef

    try:
        import diffusers  # noqa: F401
    except ImportError:
        diffusers = None
    for name, cfg in (("sana_600m", _sana_cfg(1152, 28, 16)), ("sana_1600m", _sana_cfg(2240, 20, 20))):
        with torch.device(device):
            model = SanaRef(cfg).to(torch.bfloat16).eval()
        gen = torch.Generator(device=device).manual_seed(42)
        x = torch.randn(batch, 32, 32, 32, generator=gen, device=device, dtype=torch.bfloat16)
        t = torch.full((batch,), 500.0, device=device)
        y = torch.randn(batch, 300, 2304, generator=gen, device=device, dtype=torch.bfloat16)
        row = {"bench": "litela_e2e", "model": name, "batch": batch, "px": 1024, "dtype": "bf16"}
        outs = {}
        for impl, fn in impls.items():
            for block in model.blocks:
                block.attn.linear_attn = fn

            def run():
                with torch.no_grad():
                    return model(x, t, y, None)

            outs[impl] = run()
            row[f"sana_ref_{impl}_ms"] = round(_time_ms(run, device), 3)
        del model
        row["fused_rel_err"] = _rel_err(outs["naive"], outs["fused"])
        fused_ms = row["sana_ref_fused_ms"]
        for impl in impls:
            if impl != "fused":
                row[f"speedup_vs_sana_ref_{impl}"] = round(row[f"sana_ref_{impl}_ms"] / fused_ms, 3)
        if diffusers is not None:
            variants = {"eager": _diffusers_model(cfg, device)}
            if compile_diffusers:
                variants["compiled"] = torch.compile(variants["eager"])
            for kind, dmodel in variants.items():
                def run():
                    with torch.no_grad():
                        return dmodel(hidden_states=x, encoder_hidden_states=y, timestep=t, return_dict=False)[0]

                run()
                row[f"diffusers_{kind}_ms"] = round(_time_ms(run, device), 3)
                row[f"speedup_vs_diffusers_{kind}"] = round(row[f"diffusers_{kind}_ms"] / fused_ms, 3)
            row["diffusers"] = diffusers.__version__
            del variants
        print(json.dumps({**row, **meta}), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny shapes, fp32 (+fp16): CPU smoke run")
    parser.add_argument("--dtypes", default=None, help="comma-separated of bf16, fp16, fp32")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(naive)")
    parser.add_argument("--e2e", action="store_true", help="also SanaRef forwards at 1024px")
    parser.add_argument("--e2e-batch", type=int, default=16)
    parser.add_argument("--e2e-compile-diffusers", action="store_true", help="also torch.compile(diffusers model)")
    args = parser.parse_args(argv)

    from sana_kernels.linear_attn.fused import fused_relu_linear_attention

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = TINY_SHAPES if args.tiny else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s[0] in args.shapes.split(",")]
    dtypes = args.dtypes.split(",") if args.dtypes else (["fp32", "fp16"] if args.tiny else ["bf16", "fp16"])
    impls = {"naive": relu_linear_attention, "fused": fused_relu_linear_attention}
    if not args.no_compile:
        # Every shape, dtype and grad mode is a new graph; allow them all instead of falling back to eager.
        torch._dynamo.config.cache_size_limit = 64
        # On CPU (the smoke run) Dynamo's eager backend keeps the code path without a C++ toolchain.
        impls["compiled"] = torch.compile(relu_linear_attention, dynamic=False,
                                          backend="inductor" if device.type == "cuda" else "eager")
    import triton

    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (triton interpreter)",
            "torch": torch.__version__, "triton": triton.__version__,
            "date": datetime.date.today().isoformat()}
    for name, B, N, H, D in shapes:
        for dt in dtypes:
            bench_op(name, B, N, H, D, DTYPES[dt], device, impls, meta)
    if args.e2e:
        bench_e2e(device, impls, meta, args.e2e_batch, args.e2e_compile_diffusers)


if __name__ == "__main__":
    sys.exit(main())
