"""CAME / CAME-8bit (sana_jax.optim) against the original SANA optimizers and came_pytorch.

Links of the chain of trust:
- original CAMEWrapper / CAME8BitWrapper (../shared/fixtures/came_original.safetensors, torch layout) -> sana_jax
  on flax layouts, every step of both 20-step trajectories and the final states;
- came_pytorch.CAME -> sana_jax (factorization="last_two" on torch layouts, "sana" on flax layouts), 20 steps;
- 1 device -> 8 simulated CPU devices with the state sharded by `optim.state_axes` (subprocess);
- optax composition: inject_hyperparams, schedules, MultiSteps, chain; argument errors.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import load_file

import sana_jax
from sana_jax import optim
from tests.helpers import assert_close, relative_error
from tests.tolerances import TOLERANCES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------------------------------------------
# The golden fixture: torch-layout tensors -> a flax-style tree (Dense [in, out], conv HWIO).

# fixture name -> (path in the flax tree, torch -> flax transpose or None)
_FIXTURE_LEAVES = {
    "linear.weight": (("linear", "kernel"), (1, 0)),
    "linear.bias": (("linear", "bias"), None),
    "conv1x1.weight": (("conv1x1", "kernel"), (2, 3, 1, 0)),  # OIHW -> HWIO
    "dw3x3.weight": (("dw3x3", "kernel"), (2, 3, 1, 0)),
    "dw3x3.bias": (("dw3x3", "bias"), None),
    "table": (("table",), None),  # a scale_shift_table keeps the torch layout
    "big.weight": (("big", "kernel"), (1, 0)),
}
_EIGHT_BIT = ("linear.weight", "big.weight")
_STEPS = 20


@pytest.fixture(scope="module")
def came_fixture(fixtures_dir):
    path = os.path.join(fixtures_dir, "came_original.safetensors")
    with safe_open(path, "np") as f:
        meta = {k: json.loads(v) if k.endswith(("ctor", "order")) else v for k, v in f.metadata().items()}
    return load_file(path), meta


def _to_flax(name: str, x: np.ndarray) -> np.ndarray:
    perm = _FIXTURE_LEAVES[name][1]
    return x if perm is None else x.transpose(perm)


def _to_torch(name: str, x) -> np.ndarray:
    perm = _FIXTURE_LEAVES[name][1]
    x = np.asarray(x)
    return x if perm is None else x.transpose(np.argsort(perm))


def _tree(get) -> dict:
    """{name: array} for every fixture parameter -> nested flax-style dict of jnp arrays."""
    out = {}
    for name, (path, _) in _FIXTURE_LEAVES.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(_to_flax(name, get(name)))
    return out


def _leaf(tree, name: str):
    for key in _FIXTURE_LEAVES[name][0]:
        tree = tree[key]
    return tree


def _fixture_tx(meta, eight_bit: bool, layer_group: int | None = None, impl: str = "xla"):
    ctor = meta["came8bit_ctor" if eight_bit else "came_ctor"]
    kwargs = dict(b1=ctor["betas"][0], b2=ctor["betas"][1], b3=ctor["betas"][2], eps=tuple(ctor["eps"]),
                  clip_threshold=ctor["clip_threshold"], weight_decay=ctor["weight_decay"], layer_group=layer_group,
                  impl=impl)
    if eight_bit:
        return optim.came_8bit(ctor["lr"], block_size=ctor["block_size"], min_8bit_size=ctor["min_8bit_size"],
                               **kwargs)
    return optim.came(ctor["lr"], **kwargs)


def _run(tx, params, grads_at, steps: int = _STEPS):
    """Yield (step, params, state) after each jitted step; grads_at(k) is the gradient tree of step k."""
    state = tx.init(params)

    @jax.jit
    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for k in range(1, steps + 1):
        params, state = step(params, state, grads_at(k))
        yield k, params, state


def _assert_within(name: str, err: float, link: str) -> None:
    """An error already measured (e.g. the worst over a trajectory) against the table, logged like assert_close."""
    tol = TOLERANCES[link]
    print(f"{name:<60} rel {err:.3e}  (tol {tol:.0e}, {link})")
    assert err <= tol, f"{name}: {err:.3e} > {tol:.0e} ({link})"


def _came_inner(state):
    """The ScaleByCame(8bit)State inside came()'s chain state."""
    return state[0]


# "pallas": sana_jax.came_kernels, interpreted on the CPU (the compiled kernels: tests/test_gpu.py).
@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_came_matches_original_every_step(came_fixture, impl):
    tensors, meta = came_fixture
    params = _tree(lambda n: tensors[f"init.{n}"])
    run = _run(_fixture_tx(meta, False, impl=impl), params, lambda k: _tree(lambda n: tensors[f"grad.{k}.{n}"]))
    worst = {}
    for k, params, state in run:
        for name in _FIXTURE_LEAVES:
            ref, out = tensors[f"came.param.{k}.{name}"], _to_torch(name, _leaf(params, name))
            worst[name] = max(worst.get(name, 0.0), relative_error(ref, out))
    for name, err in worst.items():
        _assert_within(f"came {name} (worst of {_STEPS} steps)", err, "came_fp32")

    # Final state, with the statistics mapped back to torch's orientation (rows = dim 0 = output features).
    inner = _came_inner(state)
    for name in _FIXTURE_LEAVES:
        prefix = f"came.state.{name}"
        assert_close(f"{prefix}.exp_avg", tensors[f"{prefix}.exp_avg"], _to_torch(name, _leaf(inner.mu, name)),
                     "came_fp32")
        if f"{prefix}.exp_avg_sq" in tensors:
            assert_close(f"{prefix}.exp_avg_sq", tensors[f"{prefix}.exp_avg_sq"],
                         _to_torch(name, _leaf(inner.v, name)), "came_fp32")
            continue
        for ours, theirs in (("v_row", "exp_avg_sq_row"), ("v_col", "exp_avg_sq_col"), ("r_row", "exp_avg_res_row"),
                             ("r_col", "exp_avg_res_col")):
            ref = tensors[f"{prefix}.{theirs}"]
            out = np.asarray(_leaf(getattr(inner, ours), name))
            assert out.size == ref.size, (name, ours, out.shape, ref.shape)
            assert_close(f"{prefix}.{theirs}", ref, out.reshape(ref.shape), "came_fp32")


def _flip_aware_check(name: str, ref: np.ndarray, out: np.ndarray) -> tuple[float, int]:
    """8-bit parameters [rows, cols] in torch layout: within fp32 rounding except around a few flip sites.

    A uint8 code rounds the other way where the fp32 first moment lies within rounding noise of a half-quantum
    (fixtures/README-came-samplers.md: SANA's own maths re-derived with plain ops flips one byte per 8-bit
    parameter in 20 steps; here XLA's reduction order differs from torch's). The flipped element then carries
    one quantum's effect, ~lr * confidence * scale, and the rest of its row and column a small part of it
    through the factored instability r_row / r_col. So: few flip sites (off by more than the row/column bound),
    every other element within fp32 rounding unless it shares a row or column with a site.
    Returns (max relative error, number of flip sites).
    """
    rel = np.abs(out - ref) / np.abs(ref).max()
    sites = np.argwhere(rel > TOLERANCES["came8bit_flip_row_col"])
    assert len(sites) <= TOLERANCES["came8bit_flip_fraction"] * ref.size, f"{name}: {len(sites)} flip sites"
    assert rel.max() <= TOLERANCES["came8bit_flip"], f"{name}: {rel.max():.3e} > {TOLERANCES['came8bit_flip']}"
    rows, cols = set(sites[:, 0]), set(sites[:, 1])
    for i, j in np.argwhere(rel > TOLERANCES["came_fp32"]):
        assert i in rows or j in cols, f"{name}: element {(i, j)} off by {rel[i, j]:.2e}, away from any flip site"
    return float(rel.max()), len(sites)


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_came_8bit_matches_original_every_step(came_fixture, impl):
    tensors, meta = came_fixture
    params = _tree(lambda n: tensors[f"init.{n}"])
    run = _run(_fixture_tx(meta, True, impl=impl), params, lambda k: _tree(lambda n: tensors[f"grad.{k}.{n}"]))
    worst, most_off = {}, {}
    for k, params, state in run:
        for name in _FIXTURE_LEAVES:
            ref, out = tensors[f"came8bit.param.{k}.{name}"], _to_torch(name, _leaf(params, name))
            if name in _EIGHT_BIT:
                err, sites = _flip_aware_check(f"came8bit {name} step {k}", ref, out)
                most_off[name] = max(most_off.get(name, 0), sites)
            else:  # fp32 first moment: exactly as CAMEWrapper
                err = relative_error(ref, out)
            worst[name] = max(worst.get(name, 0.0), err)
    for name, err in worst.items():
        link = "came8bit_flip" if name in _EIGHT_BIT else "came_fp32"
        _assert_within(f"came8bit {name} (worst of {_STEPS} steps, {most_off.get(name, 0)} flip sites)", err, link)

    inner = _came_inner(state)
    for name in _EIGHT_BIT:
        prefix = f"came8bit.state.{name}.exp_avg"
        ref_q = tensors[f"{prefix}.data"].astype(np.int32)
        out_q = _to_torch(name, _leaf(inner.mu, name)).astype(np.int32)
        assert _leaf(inner.mu, name).dtype == jnp.uint8
        flipped = int((out_q != ref_q).sum())
        print(f"{prefix}.data: {flipped} of {ref_q.size} bytes differ, max by {np.abs(out_q - ref_q).max()}")
        assert flipped <= TOLERANCES["came8bit_flip_fraction"] * ref_q.size and np.abs(out_q - ref_q).max() <= 1
        assert_close(f"{prefix}.min", tensors[f"{prefix}.min"], np.ravel(_leaf(inner.mu_min, name)), "came_fp32")
        assert_close(f"{prefix}.scale", tensors[f"{prefix}.scale"], np.ravel(_leaf(inner.mu_scale, name)), "came_fp32")
        rows = tensors[f"{prefix}.block_rows"]
        assert list(rows) == [16] * (len(rows) - 1) + [rows[-1]] and sum(rows) == ref_q.shape[0]
        assert np.asarray(_leaf(inner.mu_min, name)).size == len(rows)
    for name in _FIXTURE_LEAVES:
        if name not in _EIGHT_BIT:
            assert _leaf(inner.mu, name).dtype == jnp.float32
            assert_close(f"came8bit.state.{name}.exp_avg", tensors[f"came8bit.state.{name}.exp_avg"],
                         _to_torch(name, _leaf(inner.mu, name)), "came_fp32")


@pytest.mark.parametrize("layer_group", [None, 1], ids=["all_at_once", "per_layer"])
@pytest.mark.parametrize("eight_bit", [False, True], ids=["came", "came8bit"])
def test_stacked_layers_do_not_mix(came_fixture, eight_bit, layer_group):
    """Under `blocks`, layer 0 of every leaf follows the original trajectory although layer 1 carries other
    values (100x larger gradients, another init): means, RMS clip and 8-bit blocks are per layer, whether the
    layers are updated all at once or one at a time in place (`layer_group`)."""
    tensors, meta = came_fixture
    kind = "came8bit" if eight_bit else "came"
    rng = np.random.default_rng(3)
    other = {n: rng.standard_normal(tensors[f"init.{n}"].shape).astype(np.float32) for n in _FIXTURE_LEAVES}

    def stacked(get, layer1):
        return {"blocks": jax.tree.map(lambda a, b: jnp.stack([a, b]), _tree(get), _tree(layer1))}

    params = stacked(lambda n: tensors[f"init.{n}"], lambda n: other[n])
    grads_at = lambda k: stacked(lambda n: tensors[f"grad.{k}.{n}"],  # noqa: E731
                                 lambda n: 100 * np.roll(tensors[f"grad.{k}.{n}"], 1) + other[n])
    worst = {}
    for k, params, _ in _run(_fixture_tx(meta, eight_bit, layer_group), params, grads_at):
        layer0 = jax.tree.map(lambda x: x[0], params["blocks"])
        for name in _FIXTURE_LEAVES:
            ref, out = tensors[f"{kind}.param.{k}.{name}"], _to_torch(name, _leaf(layer0, name))
            if eight_bit and name in _EIGHT_BIT:
                err = _flip_aware_check(f"layer 0 {name} step {k}", ref, out)[0]
            else:
                err = relative_error(ref, out)
            worst[name] = max(worst.get(name, 0.0), err)
    for name, err in worst.items():
        link = "came8bit_flip" if eight_bit and name in _EIGHT_BIT else "came_fp32"
        _assert_within(f"{kind} blocks layer 0 {name} (worst of {_STEPS} steps)", err, link)


# ----------------------------------------------------------------------------------------------------------------
# came_pytorch.CAME on random gradients.

_TORCH_SHAPES = [(37,), (48, 80), (1, 64), (4, 6, 10), (8, 6, 3, 3)]


def _torch_came_trajectory(shapes, steps: int, lr: float, wd: float, seed: int):
    torch = pytest.importorskip("torch")
    came_pytorch = pytest.importorskip("came_pytorch")
    rng = np.random.default_rng(seed)
    init = [rng.standard_normal(s).astype(np.float32) * 0.2 for s in shapes]
    grads = [[(rng.standard_normal(s) * (1 + k % 3)).astype(np.float32) for s in shapes] for k in range(steps)]
    torch_params = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in init]
    opt = came_pytorch.CAME(torch_params, lr=lr, weight_decay=wd)
    for k in range(steps):
        for p, g in zip(torch_params, grads[k]):
            p.grad = torch.from_numpy(g.copy())
        opt.step()
    return init, grads, [p.detach().numpy() for p in torch_params]


def test_last_two_matches_came_pytorch():
    """factorization="last_two" on torch layouts is came_pytorch: 1-D, 2-D (incl. one row), 3-D, 4-D conv."""
    lr, wd = 1e-3, 1e-2
    init, grads, ref = _torch_came_trajectory(_TORCH_SHAPES, _STEPS, lr, wd, seed=0)
    tx = optim.came(lr, weight_decay=wd, factorization="last_two")
    as_tree = lambda xs: {f"p{i}": jnp.asarray(x) for i, x in enumerate(xs)}  # noqa: E731
    *_, (_, params, _) = _run(tx, as_tree(init), lambda k: as_tree(grads[k - 1]))
    for i, shape in enumerate(_TORCH_SHAPES):
        assert_close(f"came_pytorch {shape} after {_STEPS} steps", ref[i], params[f"p{i}"], "came_fp32")


def test_sana_rule_on_flax_layouts_matches_came_pytorch():
    """The default rule on a Dense kernel [in, out] and a bias equals came_pytorch on Linear [out, in] / [out]."""
    lr, wd = 1e-3, 1e-2
    shapes = [(48, 80), (48,), (6, 48)]
    init, grads, ref = _torch_came_trajectory(shapes, _STEPS, lr, wd, seed=1)
    as_tree = lambda xs: {"fc": {"kernel": jnp.asarray(xs[0].T), "bias": jnp.asarray(xs[1])},  # noqa: E731
                          "scale_shift_table": jnp.asarray(xs[2])}
    *_, (_, params, _) = _run(optim.came(lr, weight_decay=wd), as_tree(init), lambda k: as_tree(grads[k - 1]))
    assert_close("came_pytorch Linear weight [48, 80]", ref[0], params["fc"]["kernel"].T, "came_fp32")
    assert_close("came_pytorch Linear bias [48]", ref[1], params["fc"]["bias"], "came_fp32")
    assert_close("came_pytorch table [6, 48]", ref[2], params["scale_shift_table"], "came_fp32")


# ----------------------------------------------------------------------------------------------------------------
# 8-bit storage.


def _sana_quantize_state(x: np.ndarray, block_size: int):
    """SANA's `_quantize_state` / `_dequantize_state` (fixtures/README-came-samplers.md), in torch, torch layout."""
    torch = pytest.importorskip("torch")
    q, mins, scales = [], [], []
    for block in torch.from_numpy(x).split(block_size):
        mn, mx = block.min(), block.max()
        scale = (mx - mn) / 255
        q.append(((block - mn) / scale).round().byte())  # 0/0 -> NaN -> 0 for an all-equal block, as SANA
        mins.append(float(mn))
        scales.append(float(scale))
    data = torch.cat(q)
    deq = torch.cat([b.float() * s + m for b, s, m in zip(q, torch.tensor(scales), torch.tensor(mins))])
    return data.numpy(), np.float32(mins), np.float32(scales), deq.numpy()


@pytest.mark.parametrize("case", ["kernel", "conv1x1", "stacked_kernel", "torch_layout"])
def test_quantize_blocks_matches_sana(case):
    """Blocks of rows along torch dim 0 (flax: the output axis), ragged last block, an all-equal block and exact
    half-way ties (round half to even, as torch.round), bit for bit. Run eagerly: under jit XLA may fuse the
    dequantise's q * scale + min into one rounding where torch rounds twice (an ulp of m)."""
    rng = np.random.default_rng(5)
    torch_w = rng.standard_normal((37, 24)).astype(np.float32)  # [out, in]: 3 blocks of 16 rows, then 5
    torch_w[16:32] = 0.25  # an all-equal block
    torch_w[32:, 0], torch_w[32:, 1] = 0.0, 255.0
    torch_w[32:, 2] = 2.5  # (2.5 - 0) / 1 = 2.5: an exact tie, rounds to 2
    torch_w[32:, 3] = 3.5  # rounds to 4
    data, mins, scales, deq = _sana_quantize_state(torch_w, 16)
    if case == "kernel":
        x, names, unflax = torch_w.T, ("fc", "kernel"), lambda a: a.T
    elif case == "conv1x1":
        x, names, unflax = torch_w.T[None, None], ("conv", "kernel"), lambda a: a[0, 0].T
    elif case == "stacked_kernel":
        x = np.stack([torch_w.T, rng.standard_normal((24, 37)).astype(np.float32)])
        names, unflax = ("blocks", "fc", "kernel"), lambda a: a[0].T
    else:
        x, names, unflax = torch_w, ("weight",), lambda a: a
    factorization = "last_two" if case == "torch_layout" else "sana"
    layout = optim.leaf_layout(names, x.shape, factorization)
    q, mn, sc = optim.quantize_blocks(jnp.asarray(x), layout, 16)
    assert q.dtype == jnp.uint8 and q.shape == x.shape
    np.testing.assert_array_equal(unflax(np.asarray(q)), data)
    take_layer0 = (lambda a: np.asarray(a)[0]) if case == "stacked_kernel" else np.asarray
    np.testing.assert_array_equal(take_layer0(mn).ravel(), mins)
    np.testing.assert_array_equal(take_layer0(sc).ravel(), scales)
    out = optim.dequantize_blocks(q, mn, sc, layout, 16)
    np.testing.assert_array_equal(unflax(np.asarray(out)), deq)
    assert np.isfinite(np.asarray(out)).all()


def test_8bit_zero_state_and_constant_gradients_stay_finite():
    """All-equal blocks (the zero initial state, a constant gradient) give scale 0: no 0/0, no NaN."""
    params = {"fc": {"kernel": jnp.ones((64, 48))}}
    tx = optim.came_8bit(1e-3, block_size=16, min_8bit_size=100)
    state = tx.init(params)
    for grads in (jax.tree.map(jnp.zeros_like, params), jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)):
        updates, state = jax.jit(tx.update)(grads, state, params)
        for leaf in jax.tree.leaves((updates, state)):
            assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert _came_inner(state).mu["fc"]["kernel"].dtype == jnp.uint8


# ----------------------------------------------------------------------------------------------------------------
# Layouts and shardings on the real sana_jax parameter tree.


def _named_leaves(tree) -> dict:
    return {"/".join(optim.path_names(path)): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, P))}


def test_sana_layouts_on_the_real_param_tree():
    """SANA's rules on sana_1600m: stacked exactly where the logical axes say `layers`; Dense and 1x1 conv
    kernels and scale_shift_tables factored with rows = output features; 3x3 depthwise and 1-D unfactored."""
    model = sana_jax.SanaTransformer(sana_jax.configs.get("sana_1600m"))
    shapes, axes = _named_leaves(sana_jax.abstract_params(model)), _named_leaves(sana_jax.logical_axes(model))
    layouts = _named_leaves(optim.leaf_layouts(sana_jax.abstract_params(model)))
    for name, layout in layouts.items():
        shape, spec = shapes[name].shape, axes[name]
        assert layout.layer_axes == (spec[0] == "layers"), name
        per_layer = shape[layout.layer_axes:]
        if name.endswith("depth_conv/kernel") or len(per_layer) == 1:
            assert not layout.factored and layout.quant_axis is None, name
        else:
            assert layout.factored, name
            assert layout.row_axis == (layout.layer_axes if "scale_shift_table" in name else len(shape) - 1), name
    eight_bit = sorted(n for n, lay in layouts.items() if lay.is_8bit(16384))
    assert "blocks/attn/qkv/kernel" in eight_bit and "x_embedder/kernel" in eight_bit  # 2240 * 32 = 71680
    assert "blocks/scale_shift_table" not in eight_bit  # 6 * 2240 = 13440 <= 16384
    assert "final_layer/linear/kernel" in eight_bit  # 2240 * 32


def test_state_axes_drop_reduced_axes():
    """Specs of every state leaf from the params' logical axes: kept where the state has the param's size."""
    model = sana_jax.SanaTransformer(sana_jax.configs.get("sana_1600m"))
    params, axes = sana_jax.abstract_params(model), sana_jax.logical_axes(model)
    specs = optim.state_axes(optim.came_8bit(1e-4), params, axes)
    inner = _came_inner(specs)
    get = lambda tree: tree["blocks"]["attn"]["qkv"]["kernel"]  # noqa: E731  [layers, embed, heads]
    assert get(inner.mu) == P("layers", "embed", "heads")
    assert get(inner.v_row) == P("layers", None, "heads")  # rows = output features; the input axis is reduced
    assert get(inner.v_col) == P("layers", "embed", None)
    assert get(inner.mu_min) == P("layers", None, None)  # [20, 1, 4]: 6720 rows in 4 blocks of 2048
    assert get(inner.v) == P()  # placeholder
    assert inner.v["blocks"]["mlp"]["depth_conv"]["kernel"] == P("layers", None, None, None, "mlp")
    assert inner.count == P()
    # One spec per state leaf, each fitting its leaf; AdamW's moments and MultiSteps' sums shard like the params.
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    state_leaves = jax.tree.leaves(jax.eval_shape(optim.came_8bit(1e-4).init, params))
    assert len(spec_leaves) == len(state_leaves)
    for spec, leaf in zip(spec_leaves, state_leaves):
        assert len(spec) <= leaf.ndim
    adam_specs = optim.state_axes(optax.adamw(1e-4), params, axes)
    assert adam_specs[0].mu == axes and adam_specs[0].nu == axes
    multi = optim.state_axes(optax.MultiSteps(optim.came(1e-4), 4), params, axes)
    assert multi.acc_grads == axes and get(_came_inner(multi.inner_opt_state).v_row) == P("layers", None, "heads")


_SHARDED_CHECK = "import tests.test_optim as t; t._sharded_check()"


def _sharded_check():
    """Runs in a subprocess with 8 simulated CPU devices: jitted CAME-8bit on the tiny sana_jax param tree
    sharded fsdp 4 x tensor 2 (state shardings from optim.state_axes) vs the same steps on one device, on an
    Auto mesh (jit places by in/out shardings) and on an Explicit one (shardings are part of the types, the
    default of jax.make_mesh).

    To keep compile time down the tree is the scanned `blocks` plus one leaf of each other kind (t_block: an
    unstacked 8-bit Dense; x_embedder: a 1x1 conv; final_layer: an unstacked table and a small Dense).
    CAME-8bit covers CAME's code too: with min_8bit_size 4096 the tree has uint8 first moments (qkv, kv_linear,
    1x1 convs, t_block) next to fp32 ones (proj and q_linear at exactly 64 * 64, tables, biases, depthwise)."""
    import flax.linen as nn
    from jax.sharding import AxisType, NamedSharding

    assert jax.device_count() == 8, jax.devices()
    model = sana_jax.SanaTransformer(sana_jax.configs.get("tiny"))
    rng = np.random.default_rng(0)
    random_like = lambda tree: jax.tree.map(  # noqa: E731
        lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), tree)
    kept = ("blocks", "t_block", "x_embedder", "final_layer")
    params = random_like({k: v for k, v in sana_jax.abstract_params(model).items() if k in kept})
    rules = (("embed", "fsdp"), ("heads", "tensor"), ("mlp", "tensor"), ("modulation", "tensor"))
    param_axes = {k: v for k, v in sana_jax.logical_axes(model).items() if k in kept}
    grads = [random_like(params) for _ in range(2)]
    tx = optim.came_8bit(1e-3, weight_decay=1e-2, block_size=16, min_8bit_size=4096)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    single_p, single_s, single_step = params, jax.jit(tx.init)(params), jax.jit(step)
    for g in grads:
        single_p, single_s = single_step(single_p, single_s, g)

    report = {}
    # The third case updates the stacked blocks one layer at a time in place (layer_group=1), on sharded slices.
    for mode, layer_group in ((AxisType.Auto, None), (AxisType.Explicit, None), (AxisType.Explicit, 1)):
        tx = optim.came_8bit(1e-3, weight_decay=1e-2, block_size=16, min_8bit_size=4096, layer_group=layer_group)
        mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(mode,) * 2)
        p_sh = nn.logical_to_mesh_sharding(param_axes, mesh, rules)
        s_sh = nn.logical_to_mesh_sharding(optim.state_axes(tx, params, param_axes), mesh, rules)
        with jax.set_mesh(mesh):
            sharded_step = jax.jit(step, in_shardings=(p_sh, s_sh, p_sh), out_shardings=(p_sh, s_sh))
            sh_p = jax.device_put(params, p_sh)
            sh_s = jax.jit(tx.init, in_shardings=(p_sh,), out_shardings=s_sh)(sh_p)
            for g in grads:
                sh_p, sh_s = sharded_step(sh_p, sh_s, jax.device_put(g, p_sh))
        qkv_mu = _came_inner(sh_s).mu["blocks"]["attn"]["qkv"]["kernel"]
        qkv_row = _came_inner(sh_s).v_row["blocks"]["attn"]["qkv"]["kernel"]
        assert qkv_mu.dtype == jnp.uint8
        assert _came_inner(sh_s).mu["blocks"]["attn"]["proj"]["kernel"].dtype == jnp.float32
        assert isinstance(qkv_mu.sharding, NamedSharding) and qkv_mu.sharding.spec == P(None, "fsdp", "tensor")
        assert qkv_row.sharding.spec == P(None, None, "tensor")
        assert len({s.data.shape for s in qkv_mu.addressable_shards}) == 1
        assert qkv_mu.addressable_shards[0].data.shape == (2, 16, 96)  # really split 4 x 2, not replicated
        report[mode.name + ("_per_layer" if layer_group else "")] = {
            "params": max(relative_error(a, b) for a, b in zip(jax.tree.leaves(single_p), jax.tree.leaves(sh_p))),
            "state_fp32": max(relative_error(a, b) for a, b in zip(jax.tree.leaves(single_s), jax.tree.leaves(sh_s))
                              if a.dtype == jnp.float32),
            "state_uint8_max_diff": max([int(np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max())
                                         for a, b in zip(jax.tree.leaves(single_s), jax.tree.leaves(sh_s))
                                         if a.dtype == jnp.uint8] or [0]),
        }
    print("REPORT " + json.dumps(report))


def test_sharded_state_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _SHARDED_CHECK], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.split("REPORT ", 1)[1].splitlines()[0])
    for name, errors in report.items():
        _assert_within(f"came8bit params, 8 devices ({name} mesh) vs 1", errors["params"], "came_sharded")
        _assert_within(f"came8bit fp32 state, 8 devices ({name} mesh) vs 1", errors["state_fp32"], "came_sharded")
        # A code may round the other way where a sharded mean moved m by an ulp at a half-quantum (see
        # _flip_aware_check); the params, which used the fp32 m, still agree to came_sharded.
        assert errors["state_uint8_max_diff"] <= 1, errors


# ----------------------------------------------------------------------------------------------------------------
# optax composition: jit, inject_hyperparams, schedules, MultiSteps, chain, dtypes.


def _small_problem(seed: int = 0, steps: int = 4, layers: int = 2):
    rng = np.random.default_rng(seed)
    params = {"blocks": {"fc": {"kernel": jnp.asarray(rng.standard_normal((layers, 40, 24)), jnp.float32),
                                "bias": jnp.asarray(rng.standard_normal((layers, 24)), jnp.float32)}},
              "conv": {"kernel": jnp.asarray(rng.standard_normal((3, 3, 1, 8)), jnp.float32)}}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
             for _ in range(steps)]
    return params, grads


def _final(tx, params, grads, jit: bool = True):
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    for g in grads:
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params, state


def _assert_trees_close(name, ref, out, link="came_fp32"):
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(out)):
        assert_close(f"{name} {jax.tree_util.keystr(path)}", a, b, link)


def test_layer_groups_match_all_at_once():
    """layer_group = 1, 2 and 3 (of 2 layers: one loop of two, one group, a group larger than the stack) give the
    all-at-once step within fp32 rounding (the loop body fuses its reductions differently) and keep the state's
    shapes; with 3 stacked layers, groups of 2 leave a last group of 1."""
    params, grads = _small_problem(steps=3)
    for make in (lambda g: optim.came(1e-2, weight_decay=1e-2, layer_group=g),
                 lambda g: optim.came_8bit(1e-2, block_size=8, min_8bit_size=100, layer_group=g)):
        ref_params, ref_state = _final(make(None), params, grads)
        for group in (1, 2, 3):
            out_params, out_state = _final(make(group), params, grads)
            _assert_trees_close(f"layer_group={group}", ref_params, out_params)
            assert jax.tree.map(jnp.shape, out_state) == jax.tree.map(jnp.shape, ref_state)
            for a, b in zip(jax.tree.leaves(ref_state), jax.tree.leaves(out_state)):
                if a.dtype == jnp.uint8:  # a code may round the other way at a half-quantum (_flip_aware_check)
                    assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 1
    params, grads = _small_problem(steps=3, layers=3)
    for make in (lambda g: optim.came(1e-2, layer_group=g),
                 lambda g: optim.came_8bit(1e-2, block_size=8, min_8bit_size=100, layer_group=g)):
        _assert_trees_close("3 layers in groups of 2", _final(make(None), params, grads)[0],
                            _final(make(2), params, grads)[0])


def test_layer_groups_keep_temporaries_small():
    """What layer_group is for: XLA's temporaries of a donated CAME-8bit step on one stacked 4 MiB leaf drop from
    about two leaves (directions next to gradients, fp32 m) to about one plus a layer (measured 8.0 -> 5.0 MiB)."""
    params = {"blocks": {"fc": {"kernel": jnp.zeros((8, 256, 512), jnp.float32)}}}

    def temporaries(layer_group):
        tx = optim.came_8bit(1e-3, min_8bit_size=100, layer_group=layer_group)

        def step(p, s, g):
            updates, s = tx.update(g, s, p)
            return optax.apply_updates(p, updates), s

        state = jax.eval_shape(tx.init, params)
        compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    leaf = 8 * 256 * 512 * 4
    assert temporaries(None) > 1.8 * leaf
    assert temporaries(1) < 1.4 * leaf


def test_jit_equals_eager():
    """Op-by-op dispatch and one XLA program agree (CAME-8bit: its fp32 leaves run CAME's code)."""
    params, grads = _small_problem(steps=1)
    tx = optim.came_8bit(1e-2, block_size=8, min_8bit_size=100)
    _assert_trees_close("eager vs jit", _final(tx, params, grads, jit=False)[0], _final(tx, params, grads)[0])


def test_eager_init_state_can_be_donated():
    """Every state leaf is its own buffer, so `jax.jit(step, donate_argnums=...)` accepts an eager `init`."""
    params, grads = _small_problem(steps=1)
    for tx in (optim.came(1e-2), optim.came_8bit(1e-2, block_size=8, min_8bit_size=100)):
        state = tx.init(params)
        assert len({id(x) for x in jax.tree.leaves(state)}) == len(jax.tree.leaves(state))
        _, state = jax.jit(tx.update, donate_argnums=(1,))(grads[0], state, params)


def test_inject_hyperparams_and_schedules():
    params, grads = _small_problem()
    schedule = optax.linear_schedule(1e-2, 1e-3, transition_steps=3)
    ref = _final(optim.came(schedule, b3=0.999, weight_decay=0.1), params, grads)[0]
    injected = optax.inject_hyperparams(optim.came)(learning_rate=schedule, b3=0.999, weight_decay=0.1)
    _assert_trees_close("inject_hyperparams(came)", ref, _final(injected, params, grads)[0])

    tx8 = optax.inject_hyperparams(optim.came_8bit, static_args=("block_size", "min_8bit_size"))(
        learning_rate=1e-2, block_size=8, min_8bit_size=100)
    state = tx8.init(params)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(1e-2)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)  # editable: a zero learning rate freezes the params
    updates, state = jax.jit(tx8.update)(grads[0], state, params)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert _came_inner(state.inner_state).mu["blocks"]["fc"]["kernel"].dtype == jnp.uint8

    untraceable = optax.inject_hyperparams(optim.came_8bit)(learning_rate=1e-2, block_size=8, min_8bit_size=100)
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(untraceable.update)(grads[0], untraceable.init(params), params)


def test_multisteps_and_chain():
    params, grads = _small_problem()
    mean_grads = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    ref = _final(optim.came(1e-2), params, mean_grads)[0]
    _assert_trees_close("MultiSteps(came, 2)", ref, _final(optax.MultiSteps(optim.came(1e-2), 2), params, grads)[0])

    clipped = optax.chain(optax.clip_by_global_norm(0.1), optim.came_8bit(1e-2, block_size=8, min_8bit_size=100))
    out, _ = _final(clipped, params, grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(out))


def _awkward_problem(dtype=jnp.float32, steps: int = 3):
    """Every kind of leaf the kernels see, at sizes that are no multiple of their tiles (32 rows, 256 columns):
    stacked Dense kernels (rows last), a scale_shift_table (rows first), a stacked 1x1 conv, unfactored leaves.
    The first step's gradients have a row of exact zeros in every matrix, the second's a column."""
    rng = np.random.default_rng(5)
    shapes = {"blocks": {"fc": {"kernel": (2, 70, 300), "bias": (2, 300)}, "conv1x1": {"kernel": (2, 1, 1, 33, 40)},
                         "scale_shift_table": (2, 6, 37)},
              "proj": {"kernel": (5, 258)}, "conv": {"kernel": (3, 3, 1, 8)}}
    is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)  # noqa: E731

    def draw(shape, step):
        x = rng.standard_normal(shape)
        if len(shape) >= 2 and min(shape[-2:]) > 2 and step < 2:
            x[(..., 1, slice(None)) if step == 0 else (..., slice(None), 2)] = 0.0
        return jnp.asarray(x, dtype)

    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s), dtype), shapes, is_leaf=is_shape)
    grads = [jax.tree.map(lambda s: draw(s, step), shapes, is_leaf=is_shape) for step in range(steps)]
    return params, grads


def _assert_close_but_flips(name: str, ref_params, out_params, eight_bit_mu) -> None:
    """Params within came_fp32, except the leaves whose m is 8-bit: each of their matrices within
    `_flip_aware_check` (a code that rounds the other way moves its row and column)."""
    for (path, a), b, mu in zip(jax.tree_util.tree_leaves_with_path(ref_params), jax.tree.leaves(out_params),
                                jax.tree.leaves(eight_bit_mu)):
        if mu.dtype != jnp.uint8:
            assert_close(f"{name} {jax.tree_util.keystr(path)}", a, b, "came_fp32")
            continue
        ref, out = (np.asarray(x).reshape(-1, *x.shape[-2:]) for x in (a, b))
        for i in range(ref.shape[0]):
            _flip_aware_check(f"{name} {jax.tree_util.keystr(path)}[{i}]", ref[i], out[i])


@pytest.mark.parametrize("max_grad_norm", [None, 1.0, 1e6], ids=["no_clip", "clipping", "norm_below_max"])
@pytest.mark.parametrize("eight_bit", [False, True], ids=["came", "came8bit"])
def test_pallas_kernels_match_xla(eight_bit, max_grad_norm):
    """sana_jax.came_kernels (interpreted) against the XLA reductions: params and every state field after 3 steps,
    with the clipping inside the kernels active, inactive, or absent. With clipping also under layer groups, on
    'last_two' layouts and with bf16 params."""
    params, grads = _awkward_problem()

    def make(impl, **kwargs):
        if eight_bit:
            return optim.came_8bit(1e-2, block_size=16, min_8bit_size=100, max_grad_norm=max_grad_norm, impl=impl,
                                   **kwargs)
        return optim.came(1e-2, weight_decay=1e-2, max_grad_norm=max_grad_norm, impl=impl, **kwargs)

    ref_params, ref_state = _final(make("xla"), params, grads)
    variants = {"sana": {}, "layer_group=1": {"layer_group": 1}} if max_grad_norm == 1.0 else {"sana": {}}
    for name, kwargs in variants.items():
        out_params, out_state = _final(make("pallas", **kwargs), params, grads)
        _assert_close_but_flips(f"pallas vs xla, {name}: params", ref_params, out_params,
                                _came_inner(out_state).mu)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_state), jax.tree.leaves(out_state)):
            if a.dtype == jnp.uint8:  # a code may round the other way at a half-quantum (_flip_aware_check)
                assert np.abs(np.asarray(a, np.int32) - np.asarray(b, np.int32)).max() <= 1, path
            elif a.dtype != jnp.int32 and not eight_bit:  # the 8-bit r statistics follow any flipped code
                assert_close(f"pallas vs xla, {name}: state {jax.tree_util.keystr(path)}", a, b, "came_fp32")
    if max_grad_norm != 1.0 or eight_bit:
        return
    torch_layout = {"w": grads[0]["blocks"]["fc"]["kernel"][0], "conv": jnp.transpose(grads[0]["conv"]["kernel"])}
    ref, out = (_final(optim.came(1e-2, factorization="last_two", max_grad_norm=max_grad_norm, impl=impl),
                       torch_layout, [torch_layout] * 2)[0] for impl in ("xla", "pallas"))
    _assert_trees_close("pallas vs xla, last_two", ref, out)
    half, half_grads = _awkward_problem(jnp.bfloat16, steps=2)
    _assert_trees_close("pallas vs xla, bf16 params", _final(make("xla"), half, half_grads)[0],
                        _final(make("pallas"), half, half_grads)[0], "tiny_bf16")


@pytest.mark.parametrize("norm", [50.0, 0.05], ids=["clipped", "below_max"])
def test_came_kernels_against_numpy(norm):
    """sana_jax.came_kernels (interpreted) on their own: both sums of g^2, and m' with both sums of the instability
    of the clipped gradient, against numpy in float64, on 3 matrices of 45 x 300 (two row blocks, two column steps,
    both partial); a 1-D leaf is refused."""
    from sana_jax import came_kernels

    rng = np.random.default_rng(2)
    g, mu = (rng.standard_normal((3, 45, 300)).astype(np.float32) for _ in range(2))
    f_a, f_b = rng.random((3, 45)).astype(np.float32), rng.random((3, 300)).astype(np.float32)
    divisor = np.array([1.0, 2.0, 3.0], np.float32)
    clip = (jnp.float32(norm), jnp.float32(0.1))
    gc = g.astype(np.float64) * (0.1 / norm if norm >= 0.1 else 1.0)
    x = g.astype(np.float64) ** 2
    sum_b, sum_a = came_kernels.square_sums(jnp.asarray(g), interpret=True)
    assert_close("square sums over B", x.sum(2), sum_b, "came_fp32")
    assert_close("square sums over A", x.sum(1), sum_a, "came_fp32")
    u = f_a[:, :, None] * f_b[:, None, :] * gc / divisor[:, None, None]
    new_mu = 0.1 * u + 0.9 * mu
    res = (u - new_mu) ** 2 + 1e-16
    out_mu, sum_b, sum_a = came_kernels.confidence(jnp.asarray(g), jnp.asarray(mu), f_a, f_b, divisor, 0.9, 1e-16,
                                                   clip, interpret=True)
    assert_close("new m", new_mu, out_mu, "came_fp32")
    assert_close("instability sums over B", res.sum(2), sum_b, "came_fp32")
    assert_close("instability sums over A", res.sum(1), sum_a, "came_fp32")
    with pytest.raises(ValueError, match=r"at least 2 axes, got shape \(7,\)"):
        came_kernels.square_sums(jnp.ones(7), interpret=True)


def test_max_grad_norm_is_clip_by_global_norm_in_front():
    """came(max_grad_norm=c) is optax.chain(optax.clip_by_global_norm(c), came()), whether the norm is above c
    (every gradient scaled) or below it (none)."""
    params, grads = _small_problem()
    for max_norm in (0.5, 1e6):
        for make in (lambda **k: optim.came(1e-2, weight_decay=1e-2, **k),
                     lambda **k: optim.came_8bit(1e-2, block_size=8, min_8bit_size=100, **k)):
            ref = _final(optax.chain(optax.clip_by_global_norm(max_norm), make()), params, grads)[0]
            _assert_trees_close(f"max_grad_norm={max_norm}", ref, _final(make(max_grad_norm=max_norm), params,
                                                                        grads)[0])
    unclipped = _final(optim.came(1e-2), params, grads)[0]
    clipped = _final(optim.came(1e-2, max_grad_norm=0.5), params, grads)[0]
    assert not np.allclose(unclipped["conv"]["kernel"], clipped["conv"]["kernel"])  # the clip did something


def test_auto_impl_picks_the_kernels_on_one_cuda_gpu_only(monkeypatch):
    """...and CAME reads narrow gradients where the kernels run without layer groups (the train step then hands
    it 16-bit gradients)."""
    assert optim._resolve_impl("auto") == "xla"  # this CPU machine; test_gpu.py checks a real CUDA GPU
    assert optim._resolve_impl("pallas") == "pallas" and optim._resolve_impl("pallas", layer_group=2) == "pallas"
    assert [optim.reads_narrow_gradients(*args) for args in [("auto",), ("xla",), ("pallas",), ("pallas", 2)]] == \
        [False, False, True, False]
    monkeypatch.setattr(optim, "on_cuda", lambda: True)
    assert optim._resolve_impl("auto") == "pallas" and optim.reads_narrow_gradients("auto")
    assert optim._resolve_impl("auto", layer_group=2) == "xla"
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((2,), ("fsdp",))):  # leaves may be sharded
        assert optim._resolve_impl("auto") == "xla" and not optim.reads_narrow_gradients("auto")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_narrow_gradients_update_as_if_widened(impl):
    """bf16 gradients of fp32 params (what the train step hands CAME where `reads_narrow_gradients`) give
    bit-for-bit the params and state of the same gradients widened to fp32 first, with SANA's clipping, for CAME
    (with weight decay), CAME-8bit and layer groups; the update is fp32. Without params, a gradient keeps its own
    width."""
    params, grads = _awkward_problem(steps=2)
    narrow = [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in grads]
    wide = [jax.tree.map(lambda g: g.astype(jnp.float32), g) for g in narrow]
    variants = {"came clipped": optim.came(1e-2, weight_decay=1e-2, max_grad_norm=1.0, impl=impl),
                "came_8bit clipped": optim.came_8bit(1e-2, block_size=16, min_8bit_size=100, max_grad_norm=1.0,
                                                     impl=impl),
                "layer_group=1 clipped": optim.came(1e-2, max_grad_norm=1.0, layer_group=1, impl=impl)}
    for name, tx in variants.items():
        ref, out = _final(tx, params, wide), _final(tx, params, narrow)
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref), jax.tree.leaves(out)):
            np.testing.assert_array_equal(a, b, err_msg=f"{impl} {name}: {jax.tree_util.keystr(path)}")
    # The updates' dtypes, traced (jax.eval_shape): the steps above ran them; op-by-op they cost ~16 s more here.
    tx = variants["came clipped"]
    updates = jax.eval_shape(lambda g, p: tx.update(g, tx.init(p), p)[0], narrow[0], params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.float32)}
    direction = optim.scale_by_came(max_grad_norm=1.0, impl=impl)
    updates = jax.eval_shape(lambda g, p: direction.update(g, direction.init(p))[0], narrow[0], params)
    assert {u.dtype for u in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}


def test_weight_decay_is_decoupled_and_masked():
    """Zero gradients leave only the decay: p (1 - lr wd) where the mask is True, p elsewhere."""
    params, _ = _small_problem(steps=0)
    mask = {"blocks": {"fc": {"kernel": True, "bias": False}}, "conv": {"kernel": True}}
    zeros = [jax.tree.map(jnp.zeros_like, params)]
    out, _ = _final(optim.came(0.1, weight_decay=0.5, mask=mask), params, zeros)
    np.testing.assert_allclose(out["blocks"]["fc"]["kernel"], params["blocks"]["fc"]["kernel"] * 0.95, rtol=1e-6)
    np.testing.assert_array_equal(out["blocks"]["fc"]["bias"], params["blocks"]["fc"]["bias"])
    np.testing.assert_allclose(out["conv"]["kernel"], params["conv"]["kernel"] * 0.95, rtol=1e-6)


def test_bf16_params_keep_fp32_state():
    params, grads = _small_problem()
    params16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    grads16 = [jax.tree.map(lambda x: x.astype(jnp.bfloat16), g) for g in grads]
    for tx in (optim.came(1e-2), optim.came_8bit(1e-2, block_size=8, min_8bit_size=100)):
        state = tx.init(params16)
        updates, state = jax.jit(tx.update)(grads16[0], state, params16)
        assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype(jnp.bfloat16)}
        assert {x.dtype for x in jax.tree.leaves(_came_inner(state)[1:])} <= {jnp.dtype(jnp.float32),
                                                                             jnp.dtype(jnp.uint8)}


@pytest.mark.parametrize("kwargs, match", [
    ({"learning_rate": -1e-4}, "learning_rate"),
    ({"eps": (1e-30,)}, "eps must be a pair"),
    ({"eps": (1e-30, 1e-16, 1e-8)}, "eps must be a pair"),
    ({"eps": 1e-30}, "eps must be a pair"),
    ({"b1": 1.0}, "b1"),
    ({"b2": -0.1}, "b2"),
    ({"b3": 1.5}, "b3"),
    ({"clip_threshold": 0.0}, "clip_threshold"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"factorization": "adafactor"}, "factorization"),
    ({"block_size": 0}, "block_size"),
    ({"min_8bit_size": 1.5}, "min_8bit_size"),
    ({"layer_group": 0}, "layer_group"),
    ({"max_grad_norm": 0.0}, "max_grad_norm"),
    ({"impl": "triton"}, "impl"),
], ids=lambda x: str(x) if isinstance(x, str) else None)
def test_bad_arguments_raise(kwargs, match):
    kwargs = {"learning_rate": 1e-4, **kwargs}
    eight_bit_only = {"block_size", "min_8bit_size"} & set(kwargs)
    for factory in ((optim.came_8bit,) if eight_bit_only else (optim.came, optim.came_8bit)):
        with pytest.raises(ValueError, match=match):
            factory(**kwargs)


# ----------------------------------------------------------------------------------------------------------------
# benchmarks/optimizer_memory.py and benchmarks/came_update.py.


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_table_numbers_on_tiny():
    """optimizer_memory.py's bytes for the tiny config equal a count by hand from the parameter shapes."""
    memory = _load_benchmark("optimizer_memory")
    rows = {r["optimizer"]: r for r in memory.config_rows("tiny")}
    shapes = sana_jax.abstract_params(sana_jax.SanaTransformer(sana_jax.configs.get("tiny")))
    n = sana_jax.count_params(shapes)
    assert n == 188_040
    came = came8 = 4  # the int32 step count
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes):
        name = jax.tree_util.keystr(path)
        layers = leaf.shape[0] if name.startswith("['blocks']") else 1
        per_layer = leaf.shape[1:] if name.startswith("['blocks']") else leaf.shape
        size = int(np.prod(leaf.shape))
        if "scale_shift_table" in name:  # [6 or 2, D]: torch layout, rows first
            rows_, cols = per_layer
        elif name.endswith("['kernel']") and "depth_conv" not in name:  # Dense [in, out] or 1x1 conv [1, 1, in, out]
            cols, rows_ = per_layer[-2:]
        else:  # full second moment v, four (1,) placeholders for the factored slots, no confidence step
            came += 4 * size + 4 * size + 4 * 4
            came8 += 4 * size + 4 * size + 4 * 4 + 2 * 4  # and (1,) placeholders for mu_min / mu_scale
            continue
        stats = 4 * 2 * layers * (rows_ + cols) + 4  # v_row, r_row [rows]; v_col, r_col [cols]; placeholder v
        came += 4 * size + stats
        if rows_ * cols > 16384:  # uint8 m plus one fp32 min and scale per block of 2048 rows (one block here)
            came8 += size + 2 * 4 * layers + stats
        else:  # 8-bit state placeholders for mu_min / mu_scale
            came8 += 4 * size + 2 * 4 + stats
    param_bytes = 4 * n
    assert rows["adamw"]["state_bytes"] == 8 * n + 4
    assert rows["came"]["state_bytes"] == came
    assert rows["came_8bit"]["state_bytes"] == came8
    for row in rows.values():
        assert row["param_bytes"] == row["grad_bytes"] == param_bytes
        assert row["total_bytes"] == 2 * param_bytes + row["state_bytes"]
        assert row["total_vs_adamw"] == pytest.approx(row["total_bytes"] / (2 * param_bytes + 8 * n + 4))
    assert "| tiny (0.00B) | came_8bit |" in memory.markdown(list(rows.values()))


def test_came_update_benchmark_runs_tiny(capsys):
    """benchmarks/came_update.py --tiny end to end (CAME-8bit, whose fp32 leaves run CAME's code, to keep the
    suite fast: each optimizer compiles the whole tiny tree), with the torch anchor."""
    bench = _load_benchmark("came_update")
    rows = bench.main(["--tiny", "--iters", "1", "--optimizers", "sana_jax.optim.came_8bit"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == json.loads(json.dumps(rows))
    names = {r["optimizer"] for r in rows}
    assert names == {"optax.adamw", "sana_jax.optim.came_8bit", "came_pytorch.CAME", "torch.optim.AdamW"}
    for row in rows:
        assert row["ms"] > 0 and row["ratio_vs_adamw"] > 0 and row["params"] == 188_040
