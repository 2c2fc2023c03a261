"""sana_jax.SanaTransformer on its own: initialisation, input checks, masking, dtypes, remat, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sana_jax
from sana_jax import configs
from sana_jax import perturb_params
from tests.helpers import assert_close

SPRINT = configs.TINY.replace(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True)


def make_inputs(cfg, b=2, h=6, w=10, tokens=12, seed=0):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal((b, h, w, cfg.in_channels)), jnp.float32)
    t = jnp.asarray([937.0, 3.0][:b] + [500.0] * max(0, b - 2), jnp.float32)
    y = jnp.asarray(rng.standard_normal((b, tokens, cfg.caption_channels)), jnp.float32)
    mask = np.ones((b, tokens), np.int32)
    mask[-1, 5:] = 0
    g = jnp.asarray(rng.uniform(3.0, 5.0, b), jnp.float32) if cfg.guidance_embeds else None
    return x, t, y, jnp.asarray(mask), g


@pytest.fixture(scope="module", params=["tiny", "sprint"])
def model_and_params(request):
    cfg = configs.TINY if request.param == "tiny" else SPRINT
    model = sana_jax.SanaTransformer(cfg)
    return model, perturb_params(sana_jax.init_params(model, jax.random.key(0)), seed=1)


def test_original_initialisation():
    cfg = configs.TINY.replace(qk_norm=True, cross_norm=True, hidden_size=128, num_cross_heads=8)
    params = sana_jax.init_params(sana_jax.SanaTransformer(cfg), jax.random.key(0))
    d = cfg.hidden_size
    np.testing.assert_array_equal(params["attention_y_norm"]["weight"], np.full(d, 0.01, np.float32))
    np.testing.assert_array_equal(params["blocks"]["attn"]["q_norm"]["weight"], np.ones((cfg.depth, d)))
    for path in (("blocks", "attn", "proj"), ("blocks", "cross_attn", "kv_linear"), ("final_layer", "linear"),
                 ("t_block",), ("y_embedder", "fc1")):
        leaf = params
        for key in path:
            leaf = leaf[key]
        np.testing.assert_array_equal(leaf["bias"], 0.0)  # Linear biases start at zero ...
        assert np.abs(leaf["kernel"]).min() >= 0 and np.abs(leaf["kernel"]).max() > 0  # ... kernels never do
    # xavier_uniform bound sqrt(6 / (fan_in + fan_out)); N(0, 0.02) where SANA says so; randn / sqrt(D) tables.
    qkv = params["blocks"]["attn"]["qkv"]["kernel"]
    assert np.abs(qkv).max() <= np.sqrt(6 / (d + 3 * d)) and np.abs(qkv).max() > 0.9 * np.sqrt(6 / (4 * d))
    assert abs(np.std(params["t_block"]["kernel"]) - 0.02) < 0.002
    assert abs(np.std(params["blocks"]["scale_shift_table"]) - d ** -0.5) < 0.1 * d ** -0.5
    # No adaLN-Zero: the output layer is not zero, so a fresh model's output depends on its input.
    assert np.abs(params["final_layer"]["linear"]["kernel"]).max() > 0
    # GLUMBConv convs keep PyTorch's default U(+-1/sqrt(fan_in)); the depthwise fan_in is 9.
    dw = params["blocks"]["mlp"]["depth_conv"]["kernel"]
    assert np.abs(dw).max() <= 1 / 3 and np.abs(dw).max() > 0.3


def test_output_shape_and_padding_tokens_have_no_effect(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = make_inputs(model.config)
    out = model.apply({"params": params}, x, t, y, mask, guidance=g)
    assert out.shape == x.shape[:3] + (model.config.out_channels,) and np.isfinite(out).all()
    y_changed = y.at[-1, 5:].set(123.0)  # padded tokens of the last row only
    out_changed = model.apply({"params": params}, x, t, y_changed, mask, guidance=g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_changed))
    y_real_changed = y.at[-1, 0].add(1.0)
    assert not np.allclose(out[-1], model.apply({"params": params}, x, t, y_real_changed, mask, guidance=g)[-1])


def test_official_caption_layout_is_accepted(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = make_inputs(model.config)
    out = model.apply({"params": params}, x, t, y, mask, guidance=g)
    out_4d = model.apply({"params": params}, x, t, y[:, None], mask, guidance=g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out_4d))


def test_every_parameter_gets_a_gradient(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = make_inputs(model.config)

    def loss(p):
        return jnp.mean(model.apply({"params": p}, x, t, y, mask, guidance=g) ** 2)

    grads = jax.grad(loss)(params)
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        if "logvar_linear" in name:  # used only by the sCM loss, not by the velocity
            assert not np.any(grad), name
        else:
            assert np.all(np.isfinite(grad)) and np.any(grad), name


def test_sprint_logvar_head():
    model = sana_jax.SanaTransformer(SPRINT)
    params = perturb_params(sana_jax.init_params(model, jax.random.key(0)))
    x, t, y, mask, g = make_inputs(SPRINT)
    out, logvar = model.apply({"params": params}, x, t / 1000, y, mask, guidance=g, return_logvar=True)
    assert logvar.shape == (2, 1) and out.shape == x.shape[:3] + (SPRINT.out_channels,)


@pytest.mark.parametrize("field, value", [("remat_policy", "full"), ("remat_policy", "dots_saveable"),
                                          ("unroll_blocks", True)])
def test_remat_and_unrolling_change_memory_and_speed_not_numbers(field, value):
    cfg, policy = configs.TINY, f"{field}={value}"
    assert getattr(cfg, field) != value
    params = perturb_params(sana_jax.init_params(sana_jax.SanaTransformer(cfg), jax.random.key(0)))
    x, t, y, mask, _ = make_inputs(cfg)

    def loss_and_grad(c):
        model = sana_jax.SanaTransformer(c)
        return jax.jit(jax.value_and_grad(lambda p: jnp.sum(model.apply({"params": p}, x, t, y, mask) ** 2)))(params)

    (ref_loss, ref_grads), (loss, grads) = loss_and_grad(cfg), loss_and_grad(cfg.replace(**{field: value}))
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_grads), jax.tree_util.tree_leaves(grads)):
        assert_close(f"{policy} grad {jax.tree_util.keystr(path)}", a, b, "tiny_fp32_grad")


def test_bf16_compute_tracks_fp32(model_and_params):
    model, params = model_and_params
    x, t, y, mask, g = make_inputs(model.config)
    ref = model.apply({"params": params}, x, t, y, mask, guidance=g)
    bf16 = sana_jax.SanaTransformer(model.config.replace(compute_dtype="bfloat16"))
    out = bf16.apply({"params": params}, x, t, y, mask, guidance=g)
    assert out.dtype == jnp.bfloat16
    assert_close(f"{model.config.name} bf16 vs fp32", ref, out, "tiny_bf16")


@pytest.mark.parametrize("dtype, unroll_blocks", [("bfloat16", True), ("float16", False)])
def test_compute_copies_leave_every_output_bit_identical(model_and_params, dtype, unroll_blocks):
    """model.compute_copies casts every leaf but the RMSNorm weights to the compute dtype, which the model does
    before each use anyway: on perturbed params (none of them a 16-bit value) the outputs are bit-identical. An
    fp32 model's params are returned as they are."""
    from sana_jax.model import compute_copies

    model, params = model_and_params
    x, t, y, mask, g = make_inputs(model.config)
    cfg = model.config.replace(compute_dtype=dtype, unroll_blocks=unroll_blocks)
    apply = jax.jit(lambda p, m=sana_jax.SanaTransformer(cfg): m.apply({"params": p}, x, t, y, mask, guidance=g,
                                                                       return_logvar=cfg.logvar))
    copies = compute_copies(cfg, params)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(apply(params)), jax.tree.leaves(apply(copies))):
        np.testing.assert_array_equal(a, b, err_msg=f"{cfg.name} {dtype} output {path}")
    widths = {jax.tree_util.keystr(path): leaf.dtype for path, leaf in jax.tree_util.tree_leaves_with_path(copies)}
    assert {w for name, w in widths.items() if not name.endswith("['weight']")} == {jnp.dtype(dtype)}
    assert {w for name, w in widths.items() if name.endswith("['weight']")} == {jnp.dtype(jnp.float32)}
    assert all(a is b for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(compute_copies(model.config, params))))


def test_fp16_output_is_clipped_and_finite():
    cfg = configs.TINY.replace(compute_dtype="float16")
    model = sana_jax.SanaTransformer(cfg)
    params = perturb_params(sana_jax.init_params(model, jax.random.key(0)))
    x, t, y, mask, _ = make_inputs(cfg)
    assert np.isfinite(np.asarray(model.apply({"params": params}, x * 100, t, y, mask), np.float32)).all()


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "x": a["x"][..., :3]}, r"x must be \[B, H, W, 8\]"),
    (lambda a: {**a, "t": a["t"][:1]}, r"timestep must be \[B\]"),
    (lambda a: {**a, "y": a["y"][..., :5]}, r"y must be \[B, L, 24\]"),
    (lambda a: {**a, "mask": a["mask"][:, :3]}, r"mask must be \[B, L\]"),
    (lambda a: {**a, "g": jnp.ones(2)}, "no guidance embedder"),
])
def test_bad_inputs_name_the_argument_and_shape(change, message):
    model = sana_jax.SanaTransformer(configs.TINY)
    params = sana_jax.init_params(model, jax.random.key(0))
    x, t, y, mask, g = make_inputs(configs.TINY)
    a = change(dict(x=x, t=t, y=y, mask=mask, g=g))
    with pytest.raises(ValueError, match=message):
        model.apply({"params": params}, a["x"], a["t"], a["y"], a["mask"], guidance=a["g"])


def test_sprint_requires_guidance():
    model = sana_jax.SanaTransformer(SPRINT)
    params = sana_jax.init_params(model, jax.random.key(0))
    x, t, y, mask, _ = make_inputs(SPRINT)
    with pytest.raises(ValueError, match="pass guidance"):
        model.apply({"params": params}, x, t, y, mask)


def test_patch_size_2_and_odd_grid():
    cfg = configs.TINY.replace(patch_size=2)
    model = sana_jax.SanaTransformer(cfg)
    params = perturb_params(sana_jax.init_params(model, jax.random.key(0)))
    x, t, y, mask, _ = make_inputs(cfg, h=6, w=10)
    assert model.apply({"params": params}, x, t, y, mask).shape == x.shape
    with pytest.raises(ValueError, match="multiple of patch_size"):
        model.apply({"params": params}, x[:, :5], t, y, mask)


def test_attention_over_kept_keys_equals_the_masked_softmax():
    """The cuDNN path's reformulation (kept keys moved to the front once, a length per image), run here through
    XLA's dot_product_attention, against SANA's additive -10000 mask on awkward masks: right-padded, holes, one key,
    none kept (the -10000 then shifts every logit alike)."""
    from sana_jax.model import attention_over_leading_keys, kept_keys_first

    def attention_over_kept_keys(q, k, v, mask_bias, implementation):
        mask_bias, k, v = kept_keys_first(mask_bias, k, v)
        return attention_over_leading_keys(q, k, v, mask_bias, implementation)

    rng = np.random.default_rng(0)
    b, n, length, h, d = 5, 7, 11, 3, 8
    q, k, v = (jnp.asarray(rng.standard_normal((b, size, h, d)), jnp.float32) for size in (n, length, length))
    masks = [np.arange(length) < 11, np.arange(length) < 4, np.arange(length) % 3 == 1, np.arange(length) == 9,
             np.zeros(length, bool)]
    mask_bias = jnp.asarray((1.0 - np.stack(masks)) * -10000.0, jnp.float32)
    logits = jnp.einsum("bnhd,blhd->bhnl", q, k, precision="highest") / np.sqrt(d) + mask_bias[:, None, None, :]
    ref = jnp.einsum("bhnl,blhd->bnhd", jax.nn.softmax(logits, axis=-1), v, precision="highest")
    out = attention_over_kept_keys(q, k, v, mask_bias, implementation="xla")
    # The no-key row's reference rounds its logits shifted by -10000 (fp32 ulp 1e-3 there): checked apart.
    assert_close("kept-keys attention vs masked softmax", ref[:4], out[:4], "tiny_fp32")
    np.testing.assert_allclose(out[4], ref[4], atol=5e-3)
    # Gradients through the key permutation (permute_rows' own vjp) land on the right keys.
    cotangent = jnp.asarray(rng.standard_normal(out.shape), jnp.float32).at[4].set(0)

    def masked_softmax(q, k, v):
        logits = jnp.einsum("bnhd,blhd->bhnl", q, k, precision="highest") / np.sqrt(d)
        weights = jax.nn.softmax(logits + mask_bias[:, None, None, :], axis=-1)
        return jnp.einsum("bhnl,blhd->bnhd", weights, v, precision="highest")

    grads_ref = jax.vjp(masked_softmax, q, k, v)[1](cotangent)
    grads = jax.vjp(lambda *a: attention_over_kept_keys(*a, mask_bias, implementation="xla"), q, k, v)[1](cotangent)
    for name, g_ref, g in zip("qkv", grads_ref, grads):
        assert_close(f"kept-keys attention d{name}", g_ref, g, "tiny_fp32_grad")


def test_permute_rows_gradient_is_the_inverse_permutation():
    from sana_jax.model import permute_rows

    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 9, 2, 4)), jnp.float32)
    order = jnp.asarray(np.stack([rng.permutation(9) for _ in range(3)]), jnp.int32)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    gather = lambda a: jnp.take_along_axis(a, order[:, :, None, None], axis=1)  # noqa: E731
    out, vjp = jax.vjp(lambda a: permute_rows(a, order), x)
    np.testing.assert_array_equal(out, gather(x))
    np.testing.assert_array_equal(vjp(cotangent)[0], jax.vjp(gather, x)[1](cotangent)[0])


def test_linear_in_parts_equals_the_split_product():
    """`Linear(parts=2)` (kv_linear: keys and values from products of their own) computes the column blocks of the
    one product, with the same parameters, with or without a bias. A product of other width may sum in another
    order (XLA:CPU's fp32 differs in the last bits), so the comparison is at the fp32 / bf16 tolerances."""
    from sana_jax.model import Linear

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
    for dtype, use_bias, tolerance in [("float32", True, "tiny_fp32"), ("bfloat16", True, "tiny_bf16"),
                                       ("float32", False, "tiny_fp32")]:
        cfg = configs.TINY.replace(compute_dtype=dtype)
        whole, parts = (Linear(10, cfg, ("embed", "heads"), use_bias=use_bias, parts=n) for n in (1, 2))
        params = perturb_params(whole.init(jax.random.key(0), x)["params"])
        assert set(params) == ({"kernel", "bias"} if use_bias else {"kernel"})
        y = whole.apply({"params": params}, x)
        first, second = parts.apply({"params": params}, x)
        assert first.shape == second.shape == (2, 5, 5) and first.dtype == y.dtype
        assert_close(f"Linear in 2 parts ({dtype}, bias {use_bias})", y,
                     jnp.concatenate([first, second], axis=-1), tolerance)
