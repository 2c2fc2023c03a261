"""The Pallas GPU kernels of the JAX model (interpreted on CPU here; compiled in tests/test_gpu.py) against their
XLA siblings, on awkward shapes:
  sana_jax.glu_conv: depthwise conv + gating (width not a power of two, channels not a multiple of the
    channel block, a 1-pixel image); the XLA sibling itself against a plain grouped convolution.
  sana_jax.linear_attention: LiteLA from packed qkv columns (tokens not a multiple of the 64-token step or the
    512-token split, head dim 8 < the 16-wide tensor-core block, q/k held apart as after SANA-1.5's q/k norm).
Interpreting is slow: the shapes are few and small."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sana_jax import glu_conv, linear_attention
from tests.helpers import assert_close
from tests.tolerances import TOLERANCES

SHAPES = [(2, 3, 5, 40), (1, 4, 7, 130), (1, 1, 1, 8)]  # (B, H, W, F)


def _case(shape, dtype, seed=0):
    """pre [B, H, W, 2F] (the inverted conv before its bias), pre_bias [2F], kernel [3, 3, 2F], bias [2F]."""
    b, h, w, f = shape
    rng = np.random.default_rng(seed)
    pre = jnp.asarray(rng.standard_normal((b, h, w, 2 * f)), dtype)
    pre_bias = jnp.asarray(rng.standard_normal(2 * f), dtype)
    kernel = jnp.asarray(rng.standard_normal((3, 3, 2 * f)), dtype)
    bias = jnp.asarray(rng.standard_normal(2 * f), dtype)
    return pre, pre_bias, kernel, bias


@pytest.mark.parametrize("shape", SHAPES)
def test_xla_sibling_is_silu_then_a_depthwise_convolution_then_gating(shape):
    pre, pre_bias, kernel, bias = _case(shape, jnp.float32)
    padded = jnp.pad(jax.nn.silu(pre + pre_bias), ((0, 0), (1, 1), (1, 1), (0, 0)))
    conv = jax.lax.conv_general_dilated(padded, kernel[:, :, None, :], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=padded.shape[-1],
                                        precision=jax.lax.Precision.HIGHEST) + bias
    value, gate = jnp.split(conv, 2, axis=-1)
    assert_close("silu_glu_dwconv_xla vs grouped conv", value * jax.nn.silu(gate),
                 glu_conv.silu_glu_dwconv_xla(pre, pre_bias, kernel, bias), "tiny_fp32")


def _check_against_sibling(label, fused, args, dtype):
    """`fused` (pre, pre_bias, kernel, bias) -> out against silu_glu_dwconv_xla: output and all four gradients."""
    ref = glu_conv.silu_glu_dwconv_xla(*args)
    out = fused(*args)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    # Same fp32 sums in the same order: equal up to fp32 rounding (bf16 outputs: at most one rounding flip).
    tolerance = "tiny_fp32" if dtype == jnp.float32 else "litela_bf16"
    assert_close(f"{label} output", ref, out, tolerance)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(ref.shape), dtype)
    grads_ref = jax.vjp(glu_conv.silu_glu_dwconv_xla, *args)[1](cotangent)
    grads = jax.vjp(fused, *args)[1](cotangent)
    # The backward kernels round like XLA's vjp; the weight gradients sum per row first, then over rows (another
    # fp32 order, then one rounding to the weights' dtype: at most one bf16 flip).
    for name, g_ref, g in zip(("pre", "pre_bias", "kernel", "bias"), grads_ref, grads):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert_close(f"{label} d_{name}", g_ref, g, tolerance)


# The last case is a row of 33 pixels: nine column tiles of the backward kernels, the last one partial.
@pytest.mark.parametrize("shape, dtype", [(SHAPES[0], jnp.float32), (SHAPES[1], jnp.bfloat16),
                                          (SHAPES[2], jnp.bfloat16), ((1, 1, 33, 8), jnp.bfloat16)])
def test_glu_kernel_matches_xla_sibling(shape, dtype):
    args = _case(shape, dtype, seed=1)
    fused = lambda *a: glu_conv.silu_glu_dwconv_pallas(*a, True)  # noqa: E731
    _check_against_sibling(f"silu_glu_dwconv pallas vs xla {shape} {dtype.__name__}", fused, args, dtype)


# Several programs per image: row chunks (the last one partial) and column tiles (the last one partial), as the
# kernels take at batch 1 and on rows wider than 8 pixels; a column tile wider than the image. The backward's
# weight gradients are then sums over several programs per image.
@pytest.mark.parametrize("shape, tile_w, rows, block_c", [((2, 5, 7, 24), 3, 2, 16), ((1, 9, 3, 40), 2, 4, 32),
                                                            ((2, 4, 6, 32), 8, 3, 16)])
def test_glu_tiles_and_row_chunks_match_xla_sibling(shape, tile_w, rows, block_c):
    args = _case(shape, jnp.bfloat16, seed=3)
    ref = glu_conv.silu_glu_dwconv_xla(*args)
    out = glu_conv._fused_forward(*args, True, tile_w=tile_w, block_c=block_c, rows=rows)
    label = f"silu_glu_dwconv tiles {shape} {tile_w} {rows} {block_c}"
    assert_close(label, ref, out, "litela_bf16")
    cotangent = jnp.asarray(np.random.default_rng(4).standard_normal(ref.shape), jnp.bfloat16)
    grads_ref = jax.vjp(glu_conv.silu_glu_dwconv_xla, *args)[1](cotangent)
    # the two backward kernels on different tiles (the second with the default row chunk)
    grads = glu_conv._pallas_backward(*args, cotangent, True,
                                      tiles=((tile_w, block_c, 4, rows), (tile_w + 1, 2 * block_c, 4, None)))
    for name, g_ref, g in zip(("pre", "pre_bias", "kernel", "bias"), grads_ref, grads):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype, name
        assert_close(f"{label} d_{name}", g_ref, g, "litela_bf16")


def test_glu_row_chunk_keeps_enough_programs():
    assert glu_conv.row_chunk(32, 32, 1, 45) == 32  # 1440 programs with whole images
    assert glu_conv.row_chunk(1, 32, 1, 45) == 4  # batch 1: 8 chunks x 45 blocks = 360, the floor of 4 rows
    assert glu_conv.row_chunk(2, 64, 2, 45) == 8  # 2 x 8 x 2 x 45 = 1440


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_compiled_glu_kernels_lower_for_cuda_with_fused_multiply_adds(dtype):
    """The compiled (not interpreted) forward and backward lower for CUDA on any machine; their taps are PTX FMAs
    (Nsight Compute found none: Pallas does not contract a multiply and an add) and no SiLU goes through libdevice's
    expf, as Pallas lowers jax.nn.sigmoid (RESULTS.md, seventh session). In bf16 the forward rounds its SiLUs and
    the gating's operands in pairs with one cvt.rn.bf16x2.f32 each (twenty-first session); fp32 has none."""
    b, h, w, f = 1, 3, 5, 80
    args = [jax.ShapeDtypeStruct(s, dtype) for s in ((b, h, w, 2 * f), (2 * f,), (3, 3, 2 * f), (2 * f,))]
    fused = lambda *a: glu_conv.silu_glu_dwconv_pallas(*a, False)  # noqa: E731
    cotangent = jnp.zeros((b, h, w, f), dtype)
    for name, fn in (("forward", fused), ("backward", lambda *a: jax.vjp(fused, *a)[1](cotangent))):
        text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "fma.rn.f32" in text and "ex2.approx" in text, name
        assert "__nv_expf" not in text, name
        if name == "forward":
            assert ("cvt.rn.bf16x2.f32" in text) == (dtype == jnp.bfloat16)


@pytest.mark.parametrize("batch, tokens, heads, head_dim, dtype, packed", [
    (2, 70, 3, 32, jnp.float32, True),
    (1, 600, 2, 32, jnp.bfloat16, True),  # two 512-token splits, the second partial
    (2, 33, 2, 8, jnp.bfloat16, False),  # q, k apart from v (SANA-1.5 q/k norm)
    (3, 130, 3, 24, jnp.bfloat16, False),  # head dim padded to 32 in the kernels, three token blocks
])
def test_litela_kernel_matches_xla_sibling(batch, tokens, heads, head_dim, dtype, packed):
    """Outputs and the gradient of every source against XLA's autodiff of the sibling, with dead queries (q <= 0
    everywhere in a row: den = eps) and a head whose keys are all dead (state 0), and entries at exactly 0."""
    rng = np.random.default_rng(3)
    c = heads * head_dim
    qkv = rng.standard_normal((batch, tokens, 3 * c)).astype(np.float32)
    qkv[:, ::7, :c] = -np.abs(qkv[:, ::7, :c])  # every 7th query dead in every head
    qkv[0, :, c:c + head_dim] = -1.0  # head 0 of image 0: no live key
    qkv[:, 1::5, :] = np.where(rng.random(qkv[:, 1::5].shape) < 0.3, 0.0, qkv[:, 1::5])  # ReLU' at exactly 0
    qkv = jnp.asarray(qkv, dtype)
    if packed:
        sources, layout = (qkv,), ((0, 0), (0, c), (0, 2 * c))
    else:
        q, k = (jnp.asarray(rng.standard_normal((batch, tokens, c)), dtype) for _ in range(2))
        sources, layout = (q, k, qkv), ((0, 0), (1, 0), (2, 2 * c))
    args = (layout, heads, head_dim, 1e-8)
    tolerance = "tiny_fp32" if dtype == jnp.float32 else "litela_bf16"
    ref = linear_attention.relu_linear_attention_xla_packed(sources, *args)
    out = linear_attention.relu_linear_attention_pallas(sources, *args, True)
    assert out.shape == ref.shape == (batch, tokens, c) and out.dtype == dtype
    assert_close(f"litela pallas vs xla {(batch, tokens, heads, head_dim)} {dtype.__name__}", ref, out, tolerance)
    cotangent = jnp.asarray(rng.standard_normal(ref.shape), dtype)
    grads_ref = jax.vjp(lambda s: linear_attention.relu_linear_attention_xla_packed(s, *args), sources)[1](
        cotangent)[0]
    grads = jax.vjp(lambda s: linear_attention.relu_linear_attention_pallas(s, *args, True), sources)[1](cotangent)[0]
    for i, (g_ref, g, src) in enumerate(zip(grads_ref, grads, sources)):
        assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
        assert_close(f"litela pallas vs xla d_source{i} {(batch, tokens, heads, head_dim)}", g_ref, g, tolerance)
        # Exactly 0 where nothing flows: columns no head reads (q, k of qkv beside the normed ones), q and k <= 0.
        live = np.zeros(src.shape, bool)
        for role, (slot, column) in zip("qkv", layout):
            if slot == i:
                block = np.asarray(src[..., column:column + c], np.float32)
                live[..., column:column + c] = True if role == "v" else block > 0
        np.testing.assert_array_equal(np.asarray(g)[~live], 0)


def test_litela_backward_zero_fills_only_buffers_it_writes_in_part():
    """A gradient buffer the backward's kernels write whole (packed qkv; a normed q or k alone) starts uninitialised
    (the interpreter fills it with NaN, so the gradient tests above would see a column left out); the qkv buffer
    beside SANA-1.5's normed q and k gets only v: it starts as zeros."""
    whole = linear_attention._written_whole
    assert whole(0, ((0, 0), (0, 64), (0, 128)), 2, 32, 192)
    assert not whole(0, ((0, 0), (0, 64), (0, 128)), 2, 32, 200)  # columns past v
    assert not whole(0, ((0, 0), (0, 128), (0, 192)), 2, 32, 256)  # a gap between q and k
    assert whole(0, ((0, 0), (1, 0), (2, 128)), 2, 32, 64) and not whole(2, ((0, 0), (1, 0), (2, 128)), 2, 32, 192)
    qkv = jax.ShapeDtypeStruct((2, 70, 192), jnp.bfloat16)
    spec = (((0, 0), (0, 64), (0, 128)), 2, 32, 1e-8, True)
    backward = jax.make_jaxpr(lambda a: jax.vjp(
        lambda s: linear_attention.relu_linear_attention_pallas((s,), *spec), a)[1](jnp.ones((2, 70, 64), a.dtype)))
    fills = [e for e in backward(qkv).jaxpr.eqns if e.primitive.name == "broadcast_in_dim"
             and e.outvars[0].aval.size == qkv.size]  # a zeros_like of the qkv source, before it is flattened
    assert not fills


@pytest.mark.parametrize("layout, shapes, message", [
    (((0, 0), (0, 64), (0, 128)), [(1, 5, 150)], "v at \\(source 0, column 128\\)"),
    (((0, 0), (1, 0), (2, 128)), [(1, 5, 64), (1, 5, 64)], "v at \\(source 2"),
    (((0, 0), (0, 64), (0, 128)), [(1, 5, 192), (2, 5, 64)], "same B and N"),
])
def test_litela_layout_errors_name_the_role_and_shapes(layout, shapes, message):
    sources = tuple(jnp.zeros(shape, jnp.float32) for shape in shapes)
    for fn in (linear_attention.relu_linear_attention_xla_packed, linear_attention.relu_linear_attention_pallas):
        with pytest.raises(ValueError, match=message):
            fn(sources, layout, 2, 32, 1e-8)


# The whole model with both kernels on meshes of 8 simulated devices, against the XLA siblings on one device.
# Each device must run the kernels on its own images only: XLA's SPMD partitioner cannot split a kernel's custom
# call and would otherwise gather the batch and run all 8 images on every device.
_SHARDED_MODEL = """
import json, sys
import flax.linen as nn
import jax, jax.extend, jax.numpy as jnp, numpy as np
import sana_jax
from sana_jax.configs import TINY
from sana_jax.train.config import MeshConfig
from sana_jax.train.sharding import LOGICAL_RULES, make_mesh
from tests.helpers import relative_error

assert jax.device_count() == 8, jax.devices()
cfg = TINY.replace(qk_norm=True, linear_head_dim=16, attention_impl="xla")  # 4 LiteLA heads, 4 cross heads
params = sana_jax.perturb_params(sana_jax.init_params(sana_jax.SanaTransformer(cfg), jax.random.key(0)), seed=1)
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((8, 3, 5, cfg.in_channels)), jnp.float32)
t = jnp.asarray(rng.uniform(0, 1000, 8), jnp.float32)
y = jnp.asarray(rng.standard_normal((8, 6, cfg.caption_channels)), jnp.float32)
mask = jnp.asarray(np.arange(6)[None] < rng.integers(1, 7, 8)[:, None], jnp.int32)
weights = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)

def loss_and_grads(c):
    model = sana_jax.SanaTransformer(c)
    loss = lambda p: jnp.sum(model.apply({"params": p}, x, t, y, mask) * weights)
    return jax.value_and_grad(loss)

ref = jax.jit(loss_and_grads(cfg.replace(glu_impl="xla", linear_attn_impl="xla")))(params)
kernels = loss_and_grads(cfg.replace(glu_impl="pallas", linear_attn_impl="pallas"))
mesh = MeshConfig(*map(int, sys.argv[1:4]))
with nn.logical_axis_rules(LOGICAL_RULES), jax.set_mesh(make_mesh(mesh)):
    got = jax.jit(kernels)(params)
    jaxpr = jax.make_jaxpr(kernels)(params)

def kernel_batches(jaxpr, batch=None):  # per launch: the enclosing shard_map's per-device batch (None: no map)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield batch
        inner = batch
        if eqn.primitive.name == "shard_map":  # the activations ([B, ...], 3+ dims) split over their rows; not
            # weights, nor the LiteLA state residual [B*H*D, D] (split over every axis, tensor included)
            batched = [v.aval.shape[0] for v, spec in zip(eqn.params["jaxpr"].invars, eqn.params["in_specs"])
                       if spec and spec[0] is not None and v.aval.ndim >= 3]  # per-device avals
            inner = batched[0] if batched else batch
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from kernel_batches(sub, inner)

print(json.dumps({"loss": relative_error(ref[0], got[0]),
                  "grads": max(relative_error(a, b) for a, b in zip(jax.tree.leaves(ref[1]), jax.tree.leaves(got[1]))),
                  "kernel_batches": sorted(set(kernel_batches(jaxpr.jaxpr)))}))
"""


@pytest.mark.parametrize("data, fsdp, tensor", [(2, 4, 1), (2, 2, 2)])  # tensor: channels / heads sharded too
def test_kernels_run_per_device_on_a_batch_sharded_mesh(data, fsdp, tensor):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SHARDED_MODEL, str(data), str(fsdp), str(tensor)], env=env, cwd=root,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kernel_batches"] == [8 // (data * fsdp)], result  # every kernel launch: its device's images
    assert result["loss"] <= TOLERANCES["tiny_fp32"], result
    assert result["grads"] <= TOLERANCES["tiny_fp32_grad"], result


@pytest.mark.parametrize("count, shape, dtype", [
    (6, (3, 7, 5), jnp.bfloat16),  # fewer elements than one block
    (5, (3, 8200), jnp.float32),  # three blocks, the last partial
    (1, (2, 2), jnp.bfloat16),
])
def test_layer_stack_kernel_is_jnp_stack(count, shape, dtype):
    from sana_jax import layer_stack
    from sana_jax.layer_stack import stack_layers

    rng = np.random.default_rng(count)
    arrays = [jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(count)]
    out = jax.jit(lambda *a: stack_layers(a, "pallas"))(*arrays)
    assert out.dtype == dtype and bool(jnp.array_equal(out, jnp.stack(arrays)))
    compiled = jax.jit(lambda *a: layer_stack._stack_pallas(a, interpret=False))
    assert "stack_layers" in compiled.trace(*arrays).lower(lowering_platforms=("cuda",)).as_text()  # lowers for CUDA
    with pytest.raises(ValueError, match="one shape and dtype"):
        stack_layers(arrays + [jnp.zeros((1,), dtype)])
    with pytest.raises(ValueError, match="impl must be"):
        stack_layers(arrays, "cuda")
