"""Fused Triton LiteLA (`sana_kernels.linear_attn.fused`) against its naive op, forward and backward.

On CPU the kernels run under the Triton interpreter (conftest sets TRITON_INTERPRET=1) in fp32 and fp16; on a
GPU machine run with TRITON_INTERPRET=0 to test the compiled kernels in fp32, fp16 and bf16. Needs only
torch, triton, numpy and pytest (no jax): `PYTHONPATH=$PWD TRITON_INTERPRET=0 python -m pytest <this file>`
works where the project is not installed, given a `sana_kernels` -> `kernels/` link on the path.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import types

import pytest
import torch

from sana_kernels import linear_attn
from sana_kernels.linear_attn.naive import relu_linear_attention
from tests.helpers import assert_close

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRET else "cpu"
if DEVICE == "cpu" and not INTERPRET:
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sana_kernels.linear_attn.fused import fused_relu_linear_attention  # noqa: E402  (after the skip)

# The interpreter computes bf16 wrongly (numpy has no bf16), so bf16 runs only on the GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
LINK = {torch.float32: "litela_fp32", torch.float16: "litela_fp16", torch.bfloat16: "litela_bf16"}

# (B, N, H, D, chunk_size): token counts off the 64-token block, below it and across several splits; odd head
# counts; D = 8 (padded to a 16-wide block), 12 (not a power of two) and SANA's 32; batch 1.
CASES = [
    (1, 63, 3, 32, None),
    (2, 100, 1, 8, None),
    (1, 200, 5, 32, 64),  # 4 splits, the last one partial
    (1, 577, 1, 32, None),  # 2 splits of the default 512 tokens, the second of 65
    (3, 17, 2, 8, None),
    (1, 130, 3, 12, 128),
]
if DEVICE == "cuda":
    CASES += [(2, 1000, 7, 32, None), (1, 4099, 3, 32, None), (4, 2049, 36, 32, 1024), (1, 16385, 2, 32, None)]


def _id(case):
    B, N, H, D, cs = case
    return f"B{B}-N{N}-H{H}-D{D}" + (f"-split{cs}" if cs else "")


@pytest.fixture(autouse=True)
def nan_empty(monkeypatch):
    """Every `torch.empty` (the kernels' outputs and partial states) starts as NaN: an element a kernel forgets to
    write fails the comparison."""
    empty = torch.empty

    def nan_filled(*args, **kwargs):
        x = empty(*args, **kwargs)
        return x.fill_(math.nan) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", nan_filled)


def _inputs(B, N, H, D, dtype, seed=42):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, N, H, D, generator=gen) for _ in range(4))
    return [t.to(DEVICE, dtype) for t in (q, k, v)], do.to(DEVICE, dtype)


def _run(fn, q, k, v, do, **kwargs):
    """Output and gradients of `fn` with the cotangent `do`."""
    args = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = fn(*args, **kwargs)
    grads = torch.autograd.grad(out, args, do)
    return out.detach(), grads


def _compare(name, q, k, v, do, link, eps=1e-8, **kwargs):
    out, grads = _run(fused_relu_linear_attention, q, k, v, do, eps=eps, **kwargs)
    ref, ref_grads = _run(relu_linear_attention, q, k, v, do, eps=eps)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close(f"{name} o", ref, out, link)
    for n, g, g_ref in zip("qkv", grads, ref_grads):
        assert g.dtype == q.dtype
        assert_close(f"{name} d{n}", g_ref, g, link)
    return out, grads


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_fused(case, dtype):
    B, N, H, D, chunk_size = case
    (q, k, v), do = _inputs(B, N, H, D, dtype)
    kwargs = {} if chunk_size is None else {"chunk_size": chunk_size}
    _compare(f"{_id(case)} {dtype}", q, k, v, do, LINK[dtype], **kwargs)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_relu_dead(dtype):
    """Queries with no positive feature, and a head whose keys are all negative: denominators are 0 + eps, the
    outputs exactly 0, and the huge g / eps terms must not leak into any gradient."""
    B, N, H, D = 2, 70, 3, 32
    (q, k, v), do = _inputs(B, N, H, D, dtype)
    q[0, 5] = -q[0, 5].abs()
    q[1, :, 2] = -q[1, :, 2].abs()
    k[0, :, 1] = -k[0, :, 1].abs()
    out, (dq, dk, dv) = _compare(f"relu-dead {dtype}", q, k, v, do, LINK[dtype])
    for dead in (out[0, 5], out[1, :, 2], out[0, :, 1], dq[0, 5], dq[1, :, 2], dk[0, :, 1], dv[0, :, 1]):
        assert not dead.any()


@pytest.mark.parametrize("eps", [1e-8, 1e-15])
def test_fused_eps(eps):
    # Only a few features alive per query, so eps is not negligible against every denominator.
    (q, k, v), do = _inputs(1, 90, 2, 8, torch.float32)
    q = q - 1.5
    _compare(f"eps={eps}", q, k, v, do, "litela_fp32", eps=eps)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_fused_strided(dtype):
    """q, k, v as the model makes them (views of one [B, N, 3C] projection) and a non-unit stride over D; the
    cotangent non-contiguous too."""
    B, N, H, D = 2, 77, 3, 32
    gen = torch.Generator().manual_seed(42)
    qkv = torch.randn(B, N, 3 * H * D, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.view(B, N, 3, H, D).unbind(2)
    v = v.transpose(2, 3).contiguous().transpose(2, 3)  # stride 1 over H, H over D
    do = torch.randn(B, N, D, H, generator=gen).to(DEVICE, dtype).transpose(2, 3)
    assert not (q.is_contiguous() or v.is_contiguous() or do.is_contiguous())
    _compare(f"strided {dtype}", q, k, v, do, LINK[dtype])


def test_fused_large_values_fp16():
    # Values ~30 make the state sum to ~1e6, beyond fp16's range: only fp32 accumulation stays finite.
    (q, k, v), do = _inputs(2, 63, 3, 12, torch.float32)
    q, k, v = (30 * t for t in (q, k, v))
    q, k, v, do = (t.half() for t in (q, k, v, do))
    out, grads = _compare("large fp16", q, k, v, do, "litela_fp16")
    assert torch.isfinite(out).all()


def test_fused_empty_and_errors():
    q = torch.zeros(2, 0, 3, 8, device=DEVICE)
    assert fused_relu_linear_attention(q, q, q).shape == q.shape
    q = torch.zeros(1, 4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must all be"):
        fused_relu_linear_attention(q, q, q[:, :3])
    with pytest.raises(TypeError, match="one dtype"):
        fused_relu_linear_attention(q, q, q.half())
    with pytest.raises(TypeError, match="one dtype"):
        fused_relu_linear_attention(q.double(), q.double(), q.double())
    with pytest.raises(ValueError, match="head dim"):
        fused_relu_linear_attention(*(torch.zeros(1, 4, 1, 129, device=DEVICE) for _ in range(3)))


def test_get_backend():
    assert linear_attn.get("naive") is relu_linear_attention
    assert linear_attn.get("triton") is fused_relu_linear_attention
    with pytest.raises(ValueError, match="unknown linear attention backend"):
        linear_attn.get("xformers")


def test_sana_ref_triton_backend():
    """A tiny SANA-1.5-style SanaRef (qk_norm on) with `linear_attn="triton"` matches the naive backend, forward and
    the gradient w.r.t. the latents: q/k RMSNorm happens before the op, which needs nothing for it."""
    from sana_torch_ref import SanaRef

    # SanaConfig's field names, without importing sana_jax (this file must run where jax is absent).
    cfg = types.SimpleNamespace(
        in_channels=8, out_channels=8, hidden_size=96, depth=2, linear_head_dim=32, num_cross_heads=4,
        mlp_ratio=2.5, caption_channels=24, patch_size=1, sample_size=8, qk_norm=True, cross_norm=True,
        use_pe=False, pe_interpolation=1.0, guidance_embeds=False, guidance_embeds_scale=0.1, logvar=False,
        y_norm_scale_factor=0.01, norm_eps=1e-5, cross_norm_eps=1e-6, linear_attn_eps=1e-8,
    )
    torch.manual_seed(42)
    naive = SanaRef(cfg, linear_attn="naive").to(DEVICE)
    fused = SanaRef(cfg, linear_attn="triton").to(DEVICE)
    fused.load_state_dict(naive.state_dict())
    gen = torch.Generator().manual_seed(42)
    x = torch.randn(2, 8, 7, 9, generator=gen).to(DEVICE)  # 63 tokens: off the 64-token block
    t = torch.tensor([10.0, 700.0], device=DEVICE)
    y = torch.randn(2, 5, 24, generator=gen).to(DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], device=DEVICE)
    g = torch.randn(2, 8, 7, 9, generator=gen).to(DEVICE)

    def run(model):
        xi = x.clone().requires_grad_()
        out = model(xi, t, y, mask)
        return out.detach(), torch.autograd.grad(out, xi, g)[0]

    (ref, dref), (out, dout) = run(naive), run(fused)
    assert_close("SanaRef triton vs naive", ref, out, "litela_fp32")
    assert_close("SanaRef triton vs naive d/dx", dref, dout, "litela_fp32")


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU smoke run; on a GPU the benchmark itself is the run")
def test_benchmark_tiny(capsys):
    """benchmarks/litela.py --tiny runs end to end (interpreter on CPU), so the benchmark does not rot."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "litela.py")
    spec = importlib.util.spec_from_file_location("litela_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--dtypes", "fp32", "--shapes", "tiny_B1_N70_H2_D8"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert {(r["mode"], r["dtype"]) for r in rows} >= {("fwd", "fp32"), ("fwd_bwd", "fp32")}
    for r in rows:
        assert r["fused_rel_err"] < 1e-2 and r["fused_ms"] > 0 and r["speedup_vs_naive"] > 0
