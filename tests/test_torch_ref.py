"""sana_torch_ref against the original NVlabs code (golden fixtures) and against diffusers; its naive LiteLA op
against a dense formula; `load_official`'s strictness."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sana_jax.configs import TINY, SanaConfig
from sana_kernels.linear_attn.naive import relu_linear_attention
from sana_torch_ref import SanaRef, load_official, trigflow_forward
from tests.fixtures_io import FIXTURE_FILES, load_fixture
from tests.helpers import assert_close, relative_error


def _torch(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}


# ----------------------------------------------------------------------------------------------------------------
# Original NVlabs SanaMS (golden fixtures) -> SanaRef


@pytest.mark.parametrize("case", list(FIXTURE_FILES))
def test_fixture(case, fixtures_dir):
    fx = load_fixture(os.path.join(fixtures_dir, FIXTURE_FILES[case]))
    model = load_official(fx.state_dict, fx.config).eval()
    inp = _torch(fx.inputs)
    with torch.no_grad():
        if fx.is_sprint:
            out, logvar, inter = trigflow_forward(model, inp["x"], inp["timestep"], inp["y"], inp["mask"],
                                                  inp["guidance"], return_intermediates=True, return_logvar=True)
        else:
            out, inter = model(inp["x"], inp["timestep"], inp["y"], inp["mask"], return_intermediates=True)
            logvar = None

    checked = set()
    for key, ref in fx.expected.items():
        if key == "output":
            got = out
        elif key == "output.logvar":
            got = logvar
        elif key.startswith("intermediate."):
            got = inter[key.removeprefix("intermediate.")]
            ref = ref.reshape(got.shape)  # caption tensors: the original's [B, 1, L, D] -> [B, L, D]
        else:
            got = inter[key]
        assert_close(f"{case}/{key}", ref, got, "fixture_fp32")
        checked.add(key)
    assert {"output", "block.0.out", "block.1.out", "intermediate.final_layer"} <= checked
    assert ("output.logvar" in checked) == fx.is_sprint


@pytest.mark.parametrize("case", list(FIXTURE_FILES))
def test_fixture_config_is_tiny(case, fixtures_dir):
    """The fixtures are sana_jax.configs.TINY with their feature flags (guards fixtures_io's translation)."""
    cfg = load_fixture(os.path.join(fixtures_dir, FIXTURE_FILES[case])).config
    flags = dict(qk_norm=cfg.qk_norm, cross_norm=cfg.cross_norm, use_pe=cfg.use_pe,
                 guidance_embeds=cfg.guidance_embeds, logvar=cfg.logvar)
    assert cfg == TINY.replace(name=cfg.name, **flags)


def test_bf16_close_to_fp32(fixtures_dir):
    fx = load_fixture(os.path.join(fixtures_dir, FIXTURE_FILES["b_sana_ms_qknorm"]))
    model = load_official(fx.state_dict, fx.config).eval()
    inp = _torch(fx.inputs)
    with torch.no_grad():
        ref = model(inp["x"], inp["timestep"], inp["y"], inp["mask"])
        out = model.to(torch.bfloat16)(inp["x"], inp["timestep"], inp["y"], inp["mask"])
    assert out.dtype == torch.bfloat16
    assert_close("b_sana_ms_qknorm/output bf16", ref, out, "tiny_bf16")


def test_imports_no_jax():
    """sana_torch_ref and sana_kernels serve torch-only CUDA machines: importing them must not import jax."""
    code = "import sys, sana_torch_ref; bad = {'jax', 'flax', 'sana_jax'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_init_follows_original():
    torch.manual_seed(0)
    cfg = TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True)
    sd = SanaRef(cfg).state_dict()
    assert torch.equal(sd["attention_y_norm.weight"], torch.full((64,), 0.01))
    assert torch.equal(sd["blocks.0.attn.q_norm.weight"], torch.ones(64))
    assert torch.equal(sd["blocks.1.cross_attn.k_norm.weight"], torch.ones(64))
    for key in ("t_embedder.mlp.0.weight", "t_embedder.mlp.2.weight", "t_block.1.weight",
                "y_embedder.y_proj.fc1.weight", "y_embedder.y_proj.fc2.weight"):
        assert abs(sd[key].std().item() - 0.02) < 0.003, key
    # xavier-uniform bound sqrt(6 / (fan_in + fan_out)): everything else Linear, incl. Sprint's cfg_embedder.
    for key in ("blocks.0.attn.qkv.weight", "final_layer.linear.weight", "cfg_embedder.mlp.2.weight",
                "logvar_linear.weight", "x_embedder.proj.weight"):
        w = sd[key].reshape(sd[key].shape[0], -1)
        bound = (6 / sum(w.shape)) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.8 * bound, key
    for key, value in sd.items():
        if key.endswith(".bias") and "conv" not in key and "x_embedder" not in key:
            assert not value.any(), key
        else:
            assert value.any(), f"{key} is zero-initialised"


# ----------------------------------------------------------------------------------------------------------------
# SanaRef <-> diffusers SanaTransformer2DModel on random perturbed tiny models

_GLOBAL_NAMES = {
    "x_embedder.proj": "patch_embed.proj",
    "cfg_embedder.mlp.0": "time_embed.guidance_embedder.linear_1",
    "cfg_embedder.mlp.2": "time_embed.guidance_embedder.linear_2",
    "t_block.1": "time_embed.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "attention_y_norm": "caption_norm",
    "final_layer.linear": "proj_out",
}
# official module inside blocks.{i} -> diffusers modules inside transformer_blocks.{i}, split along dim 0.
_BLOCK_NAMES = {
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "attn.proj": ("attn1.to_out.0",),
    "attn.q_norm": ("attn1.norm_q",),
    "attn.k_norm": ("attn1.norm_k",),
    "cross_attn.q_linear": ("attn2.to_q",),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
    "cross_attn.proj": ("attn2.to_out.0",),
    "cross_attn.q_norm": ("attn2.norm_q",),
    "cross_attn.k_norm": ("attn2.norm_k",),
    "mlp.inverted_conv.conv": ("ff.conv_inverted",),
    "mlp.depth_conv.conv": ("ff.conv_depth",),
    "mlp.point_conv.conv": ("ff.conv_point",),
}


def _diffusers_names(key: str, cfg: SanaConfig) -> tuple[str, ...]:
    """Official key -> the diffusers keys it is split into along dim 0 (fixtures/README.md table); () if dropped."""
    if key.startswith("logvar_linear."):
        return ()
    if key == "final_layer.scale_shift_table":
        return ("scale_shift_table",)
    parts = key.split(".")
    if parts[0] == "blocks":
        i, rest = parts[1], ".".join(parts[2:])
        if rest == "scale_shift_table":
            return (f"transformer_blocks.{i}.scale_shift_table",)
        module, _, param = rest.rpartition(".")
        return tuple(f"transformer_blocks.{i}.{name}.{param}" for name in _BLOCK_NAMES[module])
    module, _, param = key.rpartition(".")
    if module.startswith("t_embedder.mlp."):
        prefix = "time_embed.timestep_embedder" if cfg.guidance_embeds else "time_embed.emb.timestep_embedder"
        return (f"{prefix}.linear_{1 if module.endswith('0') else 2}.{param}",)
    return (f"{_GLOBAL_NAMES[module]}.{param}",)


def _to_diffusers(state_dict: dict[str, torch.Tensor], cfg: SanaConfig) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        names = _diffusers_names(key, cfg)
        out.update(zip(names, value.chunk(len(names), dim=0) if names else ()))
    return out


_BASE = SanaConfig(name="tiny_odd", in_channels=4, out_channels=6, hidden_size=24, depth=2, linear_head_dim=8,
                   num_cross_heads=3, mlp_ratio=2.5, caption_channels=20, model_max_length=6, sample_size=4,
                   linear_attn_eps=1e-15, cross_norm_eps=1e-5)  # eps values as diffusers hard-codes them
_VARIANTS = {
    "sana10": _BASE,
    "sana15_qk_cross_norm": _BASE.replace(qk_norm=True, cross_norm=True),
    "sprint_guidance": _BASE.replace(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True),
    "sincos_pe_patch2": _BASE.replace(use_pe=True, pe_interpolation=2.0, patch_size=2, sample_size=6),
}


def _diffusers_model(cfg: SanaConfig):
    from diffusers import SanaTransformer2DModel

    return SanaTransformer2DModel(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_attention_heads=cfg.num_heads,
        attention_head_dim=cfg.linear_head_dim, num_layers=cfg.depth, num_cross_attention_heads=cfg.num_cross_heads,
        cross_attention_head_dim=cfg.cross_head_dim, cross_attention_dim=cfg.hidden_size,
        caption_channels=cfg.caption_channels, mlp_ratio=cfg.mlp_ratio, attention_bias=False,
        sample_size=cfg.sample_size, patch_size=cfg.patch_size, norm_eps=1e-6,
        interpolation_scale=cfg.pe_interpolation if cfg.use_pe else None, guidance_embeds=cfg.guidance_embeds,
        guidance_embeds_scale=cfg.guidance_embeds_scale,
        qk_norm="rms_norm_across_heads" if cfg.qk_norm else None,
    ).eval()


@pytest.mark.parametrize("variant", list(_VARIANTS))
def test_matches_diffusers(variant):
    """Forward and input gradients, every parameter perturbed, 5x7 token grid, 3 heads, ragged caption masks.

    Parameter gradients are left to the fixture-free fp64 checks of later links: with these weights the
    cross-attention q-path gradients are ~50x smaller than their neighbours' (the attention weights barely depend
    on q), so their fp32 rounding error is 1e-5..2e-4 of their size in diffusers and SanaRef alike (measured
    against fp64).
    """
    cfg = _VARIANTS[variant]
    assert cfg.qk_norm == cfg.cross_norm  # diffusers has one qk_norm switch for both attentions
    torch.manual_seed(0)
    ref = SanaRef(cfg).eval()
    gen = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * (0.05 if p.ndim >= 2 else 0.3))
    theirs = _diffusers_model(cfg)
    theirs.load_state_dict(_to_diffusers(ref.state_dict(), cfg), strict=True)

    B, L, p = 3, cfg.model_max_length, cfg.patch_size
    x = torch.randn(B, cfg.in_channels, 5 * p, 7 * p, generator=gen)
    y = torch.randn(B, L, cfg.caption_channels, generator=gen)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0]])
    if cfg.guidance_embeds:
        timestep, guidance = torch.tensor([0.97, 0.5, 0.02]), torch.tensor([4.5, 3.0, 1.0])
    else:
        timestep, guidance = torch.tensor([999.0, 421.7, 3.25]), None
    cotangent = torch.randn(B, cfg.out_channels, 5 * p, 7 * p, generator=gen)

    def run(model, call):
        x_, y_ = x.clone().requires_grad_(), y.clone().requires_grad_()
        out = call(model, x_, y_)
        (out * cotangent).sum().backward()
        return out.detach(), x_.grad, y_.grad

    out_ref, gx_ref, gy_ref = run(ref, lambda m, x_, y_: m(x_, timestep, y_, mask, guidance=guidance))
    g_theirs = None if guidance is None else guidance * cfg.guidance_embeds_scale
    out_d, gx_d, gy_d = run(theirs, lambda m, x_, y_: m(x_, y_, timestep, guidance=g_theirs,
                                                        encoder_attention_mask=mask, return_dict=False)[0])

    assert_close(f"{variant}/output", out_d, out_ref, "tiny_fp32")
    assert_close(f"{variant}/grad x", gx_d, gx_ref, "tiny_fp32_grad")
    assert_close(f"{variant}/grad y", gy_d, gy_ref, "tiny_fp32_grad")


# ----------------------------------------------------------------------------------------------------------------
# Naive LiteLA op


def _dense_linear_attention(q, k, v, eps):
    """out_n = sum_m v_m (k_m . q_n) / (sum_m k_m . q_n + eps) with ReLU'd q, k, via the [N, N] matrix."""
    q, k = torch.relu(q), torch.relu(k)
    scores = torch.einsum("bnhd,bmhd->bhnm", q, k)  # [B, H, N, N]
    num = torch.einsum("bhnm,bmhd->bnhd", scores, v)  # [B, N, H, D]
    den = scores.sum(-1).permute(0, 2, 1)[..., None]  # [B, N, H, 1]
    return num / (den + eps)


@pytest.mark.parametrize("eps", [1e-8, 1e-15])
def test_relu_linear_attention_dense(eps):
    gen = torch.Generator().manual_seed(42)
    B, N, H, D = 2, 63, 3, 12
    q, k, v = (torch.randn(B, N, H, D, generator=gen) for _ in range(3))
    q[0, 5] = -q[0, 5].abs()  # a query with no positive feature: output 0 (0 / eps), zero gradient
    do = torch.randn(B, N, H, D, generator=gen)

    def run(fn, dtype):
        args = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        out = fn(*args, eps=eps)
        (out * do.to(dtype)).sum().backward()
        return out.detach(), [a.grad for a in args]

    out, grads = run(relu_linear_attention, torch.float32)
    ref, ref_grads = run(_dense_linear_attention, torch.float64)
    assert out.dtype == torch.float32
    assert_close(f"linear_attn eps={eps}", ref, out, "tiny_fp32")
    for name, g, g_ref in zip("qkv", grads, ref_grads):
        assert_close(f"linear_attn eps={eps} grad {name}", g_ref, g, "tiny_fp32_grad")
    assert not out[0, 5].any()
    out64 = relu_linear_attention(q.double(), k.double(), v.double(), eps=eps)
    assert out64.dtype == torch.float64 and relative_error(ref, out64) < 1e-12  # fp64 is not rounded to fp32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_relu_linear_attention_low_precision_computes_in_fp32(dtype):
    gen = torch.Generator().manual_seed(42)
    # Values ~30 make the [D+1, D] state sum to ~1e6, which overflows fp16: only fp32 accumulation stays finite.
    q, k, v = (30 * torch.randn(2, 63, 3, 12, generator=gen) for _ in range(3))
    out = relu_linear_attention(q.to(dtype), k.to(dtype), v.to(dtype))
    ref = relu_linear_attention(*(t.to(dtype).float() for t in (q, k, v))).to(dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert torch.isfinite(out).all()
    assert torch.equal(out, ref)


# ----------------------------------------------------------------------------------------------------------------
# load_official


class _NotWeights:
    """A pickled custom object: a .pth holding one is refused by torch.load(weights_only=True)."""


@pytest.fixture(scope="module")
def official_a(fixtures_dir):
    fx = load_fixture(os.path.join(fixtures_dir, FIXTURE_FILES["a_sana_ms"]))
    return fx.config, _torch(fx.state_dict)


def test_load_official_files(official_a, tmp_path):
    cfg, sd = official_a
    expected = load_official(sd, cfg).state_dict()
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "ckpt.pth")
    torch.save(sd, tmp_path / "bare.pth")
    save_file(sd, str(tmp_path / "ckpt.safetensors"))
    for name in ("ckpt.pth", "bare.pth", "ckpt.safetensors"):
        got = load_official(tmp_path / name, cfg).state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), name


def test_load_official_ignored_buffers_optional(official_a):
    cfg, sd = official_a
    sd = {k: v for k, v in sd.items() if k not in ("pos_embed", "y_embedder.y_embedding")}
    load_official(sd, cfg)


def test_load_official_unknown_key(official_a):
    cfg, sd = official_a
    message = r"unexpected key 'blocks\.0\.attn\.extra\.weight' \(checkpoint shape \(3,\)\)"
    with pytest.raises(ValueError, match=message):
        load_official({**sd, "blocks.0.attn.extra.weight": torch.zeros(3)}, cfg)


def test_load_official_missing_key(official_a):
    cfg, sd = official_a
    sd = {k: v for k, v in sd.items() if k != "blocks.1.cross_attn.proj.bias"}
    with pytest.raises(ValueError, match=r"missing key 'blocks\.1\.cross_attn\.proj\.bias' \(model shape \(64,\)\)"):
        load_official(sd, cfg)
    model = load_official(sd, cfg, strict=False)
    assert torch.equal(model.state_dict()["blocks.0.cross_attn.proj.bias"], sd["blocks.0.cross_attn.proj.bias"])


def test_load_official_wrong_shape(official_a):
    cfg, sd = official_a
    message = r"'t_block\.1\.weight': checkpoint shape \(10, 64\) != model shape \(384, 64\)"
    with pytest.raises(ValueError, match=message):
        load_official({**sd, "t_block.1.weight": torch.zeros(10, 64)}, cfg)
    # A checkpoint of another variant (qk_norm keys) fails on its extra keys, each named.
    with pytest.raises(ValueError, match=r"unexpected key 'blocks\.0\.attn\.q_norm\.weight'"):
        load_official({**sd, "blocks.0.attn.q_norm.weight": torch.ones(64)}, cfg)


def test_load_official_refuses_pickled_objects(official_a, tmp_path):
    cfg, sd = official_a
    path = tmp_path / "unsafe.pth"
    torch.save({"state_dict": sd, "hook": _NotWeights()}, path)
    with pytest.raises(ValueError, match=r"unsafe\.pth: refusing to load: not a weights-only checkpoint"):
        load_official(path, cfg)
    with pytest.raises(ValueError, match=r"unknown checkpoint format"):
        load_official(tmp_path / "model.ckpt", cfg)
