"""The GPU-only fast paths of the JAX model against their portable siblings (skipped without a CUDA GPU).

Run on the GPU machine: `python3 -m pytest tests/test_gpu.py`. Each fast path must be as close to the fp32 model as
its XLA sibling in the same dtype (both round to bf16; neither may be worse than the other by more than half
again), and within the bf16 tolerance of the table.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sana_jax
from sana_jax.configs import SanaConfig
from sana_jax.model import resolve_attention_impl
from tests.helpers import relative_error
from tests.tolerances import TOLERANCES

CUDA = jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (cuDNN attention)")

# Cross-attention head dim 24 and L = 18 caption tokens with ragged masks: awkward for the kernel's tiling.
CONFIG = SanaConfig(name="gpu_tiny", in_channels=8, out_channels=8, hidden_size=96, depth=2, num_cross_heads=4,
                    caption_channels=40, mlp_ratio=2.5, cross_norm=True, qk_norm=True)


def _inputs(batch=3, hw=(6, 10), length=18, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *hw, CONFIG.in_channels)).astype(np.float32)
    t = rng.uniform(0, 1000, batch).astype(np.float32)
    y = rng.standard_normal((batch, length, CONFIG.caption_channels)).astype(np.float32)
    mask = np.zeros((batch, length), np.int32)
    for i, keep in enumerate((length, 7, 1)[:batch]):
        mask[i, :keep] = 1
    return tuple(map(jnp.asarray, (x, t, y, mask)))


def _run(cfg, params, inputs):
    model = sana_jax.SanaTransformer(cfg)

    def loss(p, x):
        out = model.apply({"params": p}, x, *inputs[1:]).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, inputs[0])
    return out, grads


def test_auto_picks_cudnn_for_16_bit_on_cuda():
    assert resolve_attention_impl(CONFIG.replace(compute_dtype="bfloat16")) == "cudnn"
    assert resolve_attention_impl(CONFIG) == "xla"  # fp32 stays exact


def test_cudnn_cross_attention_matches_xla_sibling():
    model = sana_jax.SanaTransformer(CONFIG)
    params = sana_jax.perturb_params(sana_jax.init_params(model, jax.random.key(0)), seed=1)
    inputs = _inputs()
    ref_out, ref_grads = _run(CONFIG, params, inputs)
    results = {impl: _run(CONFIG.replace(compute_dtype="bfloat16", attention_impl=impl), params, inputs)
               for impl in ("xla", "cudnn")}
    for name, pick in (("output", lambda r: r[0]), ("grad x", lambda r: r[1][1])):
        errors = {impl: relative_error(pick((ref_out, ref_grads)), pick(res)) for impl, res in results.items()}
        print(name, errors)
        assert errors["cudnn"] <= TOLERANCES["tiny_bf16"], (name, errors)
        assert errors["cudnn"] <= 1.5 * errors["xla"] + 1e-3, (name, errors)
    flat_ref = jax.tree_util.tree_leaves_with_path(ref_grads[0])
    flat = {impl: jax.tree.leaves(res[1][0]) for impl, res in results.items()}
    for i, (path, ref) in enumerate(flat_ref):
        errors = {impl: relative_error(ref, leaves[i]) for impl, leaves in flat.items()}
        assert errors["cudnn"] <= 1.5 * errors["xla"] + 1e-2, (jax.tree_util.keystr(path), errors)
