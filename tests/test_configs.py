"""Released variants: jax.eval_shape parameter counts equal diffusers', logical axes on every parameter."""

import jax
import pytest

import sana_jax
from sana_jax import configs

# diffusers 0.42.1 SanaTransformer2DModel parameter counts (../shared/reference/diffusers.md section 8).
DIFFUSERS_COUNTS = {
    "sana_600m": 591_747_872,
    "sana_1600m": 1_604_462_752,
    "sana_1600m_2k": 1_604_462_752,  # the position embedding is a recomputed table, not a parameter
    "sana_1600m_4k": 1_604_462_752,
    "sana15_1600m": 1_604_641_952,
    "sana15_4800m": 4_721_825_952,
    "sana_sprint_600m": 593_501_216,
    "sana_sprint_1600m": 1_610_237_472,
}


@pytest.mark.parametrize("name", sorted(DIFFUSERS_COUNTS))
def test_full_size_param_count_matches_diffusers(name):
    cfg = configs.get(name)
    params = sana_jax.abstract_params(sana_jax.SanaTransformer(cfg))
    total = sana_jax.count_params(params)
    # Sprint checkpoints carry logvar_linear (D -> 1, used only by the sCM loss); diffusers drops it.
    logvar = sana_jax.count_params(params.pop("logvar_linear", {}))
    assert logvar == (cfg.hidden_size + 1 if cfg.logvar else 0)
    assert total - logvar == DIFFUSERS_COUNTS[name]
    assert params["blocks"]["attn"]["qkv"]["kernel"].shape == (cfg.depth, cfg.hidden_size, 3 * cfg.hidden_size)


@pytest.mark.parametrize("name", ["tiny", "sana15_4800m", "sana_sprint_600m"])
def test_every_parameter_has_logical_axes(name):
    model = sana_jax.SanaTransformer(configs.get(name))
    shapes = sana_jax.abstract_params(model)
    axes = sana_jax.logical_axes(model)
    flat_shapes = dict(jax.tree_util.tree_leaves_with_path(shapes))
    flat_axes = dict(jax.tree_util.tree_leaves_with_path(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    assert flat_shapes.keys() == flat_axes.keys()
    for path, shape in flat_shapes.items():
        spec = flat_axes[path]
        assert len(spec) == len(shape.shape), (path, spec, shape.shape)
        if jax.tree_util.keystr(path).startswith("['blocks']"):
            assert spec[0] == "layers", (path, spec)


def test_variant_facts():
    assert configs.get("sana_600m").num_heads == 36 and configs.get("sana_1600m").num_heads == 70
    assert configs.get("sana_600m").cross_head_dim == 72 and configs.get("sana_1600m").cross_head_dim == 112
    assert configs.get("sana_600m").ffn_hidden == 2880 and configs.get("sana_1600m").ffn_hidden == 5600
    assert configs.get("sana15_4800m").depth == 60 and configs.get("sana15_4800m").qk_norm
    assert configs.get("sana_1600m_4k").pe_interpolation == 2.0 and configs.get("sana_1600m_4k").flow_shift == 6.0
    assert configs.get("sana_600m", compute_dtype="bfloat16").compute_dtype == "bfloat16"


@pytest.mark.parametrize("bad, message", [
    (dict(hidden_size=100), "linear_head_dim"),
    (dict(num_cross_heads=3), "num_cross_heads"),
    (dict(compute_dtype="fp8"), "compute_dtype"),
    (dict(remat_policy="sometimes"), "remat_policy"),
    (dict(depth=0), "depth"),
    (dict(logvar=True), "guidance_embeds"),
    (dict(unroll_blocks="false"), "unroll_blocks must be a bool"),
])
def test_bad_config_values_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        configs.TINY.replace(**bad)


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="sana_1600m"):
        configs.get("sana_9000m")
