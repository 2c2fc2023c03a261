"""Chain of trust, JAX links: original NVlabs code (golden fixtures) -> sana_jax, and sana_torch_ref <-> sana_jax.

Every tiny model has every parameter perturbed from its init, so a parameter that one side ignores shows.
Per-activation comparisons name the first module where a divergence starts.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sana_jax
from sana_conversion import jax_to_official, official_to_jax
from sana_conversion._tree import flatten
from sana_conversion.official import official_views
from sana_jax import configs
from sana_jax.sprint import trigflow_forward
from sana_torch_ref import load_official
from tests.fixtures_io import FIXTURE_FILES, load_fixture
from tests.helpers import assert_close

try:  # jax >= 0.10 has the context manager at top level; older releases under experimental
    enable_x64 = jax.enable_x64
except AttributeError:  # pragma: no cover
    from jax.experimental import enable_x64


def nchw_to_nhwc(a):
    return np.transpose(np.asarray(a), (0, 2, 3, 1))


@pytest.mark.parametrize("case", sorted(FIXTURE_FILES))
def test_jax_reproduces_original_fixture(case, fixtures_dir):
    fx = load_fixture(os.path.join(fixtures_dir, FIXTURE_FILES[case]))
    cfg = fx.config
    model = sana_jax.SanaTransformer(cfg)
    params = official_to_jax(fx.state_dict, cfg)
    x = jnp.asarray(nchw_to_nhwc(fx.inputs["x"]))
    t, y, mask = (jnp.asarray(fx.inputs[k]) for k in ("timestep", "y", "mask"))
    guidance = jnp.asarray(fx.inputs["guidance"]) if "guidance" in fx.inputs else None
    if fx.is_sprint:
        # The fixture's intermediates are those of the inner model call made by the TrigFlow wrapper.
        out = trigflow_forward(model, params, x, t, y, mask, guidance)
        s = t.astype(jnp.float32)
        flow_t = jnp.sin(s) / (jnp.sin(s) + jnp.cos(s))
        x_in = x * jnp.sqrt(flow_t ** 2 + (1 - flow_t) ** 2)[:, None, None, None]
        _, named = sana_jax.intermediates(model, params, x_in, flow_t, y, mask, guidance)
        _, logvar = model.apply({"params": params}, x_in, flow_t, y, mask, guidance=guidance, return_logvar=True)
        assert_close(f"{case} output.logvar", fx.expected["output.logvar"], logvar, "fixture_fp32")
    else:
        out, named = sana_jax.intermediates(model, params, x, t, y, mask)
    for name, value in named.items():
        key = name if name.startswith("block.") else f"intermediate.{name}"
        expected = fx.expected[key].reshape(value.shape)
        assert_close(f"{case} {key}", expected, value, "fixture_fp32")
    assert_close(f"{case} output", nchw_to_nhwc(fx.expected["output"]), out, "fixture_fp32")


# Random tiny models of every variant kind, with awkward shapes: a non-square 5x7 grid, 3 LiteLA heads of 8 and 3
# cross heads (odd counts), out channels != in channels, caption rows of different lengths, one with a single
# valid token, patch 2 with position embedding.
AWKWARD = configs.SanaConfig(name="awkward", in_channels=4, out_channels=6, hidden_size=24, depth=3,
                             linear_head_dim=8, num_cross_heads=3, caption_channels=10, model_max_length=9,
                             sample_size=6)
VARIANTS = {
    "sana10": AWKWARD,
    "sana15_qknorm": AWKWARD.replace(qk_norm=True, cross_norm=True),
    "sprint": AWKWARD.replace(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True),
    "sincos_pe_patch2": AWKWARD.replace(use_pe=True, pe_interpolation=2.0, patch_size=2),
}


def tiny_case(name: str, seed: int = 0):
    cfg = VARIANTS[name]
    model = sana_jax.SanaTransformer(cfg)
    params = sana_jax.perturb_params(sana_jax.init_params(model, jax.random.key(seed)), seed=seed + 1)
    rng = np.random.default_rng(seed)
    p = cfg.patch_size
    b, tokens = 3, cfg.model_max_length
    inputs = {
        "x": rng.standard_normal((b, 5 * p, 7 * p, cfg.in_channels)).astype(np.float32),
        "timestep": (rng.uniform(0, 1, b) if cfg.guidance_embeds else rng.integers(0, 1000, b)).astype(np.float32),
        "y": rng.standard_normal((b, tokens, cfg.caption_channels)).astype(np.float32),
        "mask": (np.arange(tokens)[None] < np.array([[tokens], [4], [1]])).astype(np.int64),
    }
    if cfg.guidance_embeds:
        inputs["guidance"] = rng.uniform(3, 5, b).astype(np.float32)
    cotangent = rng.standard_normal((b, 5 * p, 7 * p, cfg.out_channels)).astype(np.float32)
    return cfg, model, params, inputs, cotangent


def torch_ref_run(cfg, params, inputs, cotangent, dtype):
    """sana_torch_ref forward (+ intermediates) and gradients of <out, cotangent> w.r.t. x, y, every param."""
    ref = load_official({k: torch.from_numpy(v) for k, v in jax_to_official(params, cfg).items()}, cfg)
    ref = ref.to(dtype)
    x = torch.from_numpy(inputs["x"]).permute(0, 3, 1, 2).to(dtype).requires_grad_(True)
    y = torch.from_numpy(inputs["y"]).to(dtype).requires_grad_(True)
    t = torch.from_numpy(inputs["timestep"]).to(dtype)
    g = torch.from_numpy(inputs["guidance"]).to(dtype) if "guidance" in inputs else None
    out, named = ref(x, t, y, torch.from_numpy(inputs["mask"]), guidance=g, return_intermediates=True)
    out = out.permute(0, 2, 3, 1)
    (out * torch.from_numpy(cotangent).to(dtype)).sum().backward()
    grads = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}
    named = {k: v.detach().numpy() for k, v in named.items()}
    return out.detach().numpy(), named, x.grad.permute(0, 2, 3, 1).numpy(), y.grad.numpy(), grads


def jax_run(cfg, model, params, inputs, cotangent):
    """sana_jax forward (+ intermediates) and gradients of <out, cotangent> w.r.t. x, y and every param."""
    mask = jnp.asarray(inputs["mask"])
    guidance = jnp.asarray(inputs["guidance"], model.config.compute_dtype) if "guidance" in inputs else None
    t = jnp.asarray(inputs["timestep"], model.config.compute_dtype)

    def loss(p, x, y):
        out = model.apply({"params": p}, x, t, y, mask, guidance=guidance)
        return jnp.sum(out * cotangent), out

    x = jnp.asarray(inputs["x"], model.config.compute_dtype)
    y = jnp.asarray(inputs["y"], model.config.compute_dtype)
    (_, out), (g_params, g_x, g_y) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, x, y)
    _, named = sana_jax.intermediates(model, params, x, t, y, mask, guidance)
    return out, named, g_x, g_y, g_params


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_jax_matches_torch_ref_fp32_forward_and_input_grads(variant):
    cfg, model, params, inputs, cotangent = tiny_case(variant)
    out, named, g_x, g_y, _ = jax_run(cfg, model, params, inputs, cotangent)
    ref_out, ref_named, ref_g_x, ref_g_y, _ = torch_ref_run(cfg, params, inputs, cotangent, torch.float32)
    assert ref_named.keys() == named.keys()
    for name in sorted(named, key=lambda n: (not n.startswith(("x_", "t_", "cfg", "y_", "att")), n)):
        assert_close(f"{variant} fp32 {name}", ref_named[name], named[name], "tiny_fp32")
    assert_close(f"{variant} fp32 output", ref_out, out, "tiny_fp32")
    assert_close(f"{variant} fp32 d/dx", ref_g_x, g_x, "tiny_fp32_grad")
    assert_close(f"{variant} fp32 d/dy", ref_g_y, g_y, "tiny_fp32_grad")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_jax_matches_torch_ref_fp64_gradients_of_every_parameter(variant):
    cfg, _, params, inputs, cotangent = tiny_case(variant)
    cfg64 = cfg.replace(compute_dtype="float64")
    with enable_x64(True):
        model = sana_jax.SanaTransformer(cfg64)
        params64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
        out, _, g_x, g_y, g_params = jax_run(cfg64, model, params64, inputs, cotangent)
        assert out.dtype == jnp.float64
        jax_grads = official_views({k: np.asarray(v) for k, v in flatten(g_params).items()}, cfg)
    ref_out, _, ref_g_x, ref_g_y, ref_grads = torch_ref_run(cfg, params, inputs, cotangent, torch.float64)
    assert_close(f"{variant} fp64 output", ref_out, out, "tiny_fp64")
    assert_close(f"{variant} fp64 d/dx", ref_g_x, g_x, "tiny_fp64")
    assert_close(f"{variant} fp64 d/dy", ref_g_y, g_y, "tiny_fp64")
    # logvar_linear does not reach the velocity: no gradient on either side.
    assert set(ref_grads) == {k for k in jax_grads if not k.startswith("logvar_linear")}
    for key, grad in sorted(ref_grads.items()):
        assert_close(f"{variant} fp64 d/d {key}", grad, jax_grads[key], "tiny_fp64")
