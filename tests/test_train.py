"""Training: config parsing, SANA's flow recipe, the cache format and loader, exact resume, sharded = unsharded."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sana_jax.configs import SanaConfig
from sana_jax.train import shapes, sharding
from sana_jax.train.config import FlowConfig, MeshConfig, OptimConfig, TrainConfig, load_config
from sana_jax.train.data import Example, Loader, write_cache
from sana_jax.train.flow import sigmas_and_timesteps
from sana_jax.train.loop import train
from tests.helpers import assert_close

MODEL = SanaConfig(name="train_test", in_channels=48, out_channels=48, hidden_size=64, depth=2, num_cross_heads=2,
                   caption_channels=shapes.CAPTION_CHANNELS, model_max_length=shapes.MAX_LENGTH, sample_size=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("cache") / "data")
    null_y, null_mask = shapes.encode_caption("", shapes.word_table())
    write_cache(path, shapes.examples(96, seed=0), null_y, null_mask, shard_size=40)
    return path


def tiny_config(cache, out_dir, **changes) -> TrainConfig:
    base = TrainConfig(model=MODEL, optim=OptimConfig(name="came", lr=1e-3, warmup_steps=2, clip_grad_norm=0.1),
                       data_dir=cache, out_dir=str(out_dir), batch_size=8, steps=6, log_every=1,
                       checkpoint_every=3, seed=0)
    return dataclasses.replace(base, **changes)


def test_load_config_recipes_files_and_overrides(tmp_path):
    cfg = load_config("sana15_4800m_1024", overrides=["optim.lr=3e-5", "data_dir=/data/cache", "model.depth=40"])
    assert cfg.optim.name == "came_8bit" and cfg.optim.lr == 3e-5 and cfg.data_dir == "/data/cache"
    assert cfg.model.depth == 40 and cfg.model.qk_norm and cfg.flow.shift == 3.0
    path = tmp_path / "c.yaml"
    path.write_text("model: {name: sana_600m}\nflow: {shift: 4.0}\nbatch_size: 16\n")
    cfg = load_config(path=str(path))
    assert cfg.model.hidden_size == 1152 and cfg.flow.shift == 4.0 and cfg.batch_size == 16
    with pytest.raises(ValueError, match=r"config.optim: unknown key\(s\) \['learning_rate'\]"):
        load_config(overrides=["optim.learning_rate=1"])
    with pytest.raises(ValueError, match="unknown recipe"):
        load_config("sana_9000m")
    with pytest.raises(ValueError, match="caption_dropout"):
        load_config(overrides=["flow.caption_dropout=1.5"])
    with pytest.raises(ValueError, match="layer_group must be >= 0"):
        load_config("sana_600m_1024", overrides=["optim.layer_group=-1"])


# Released recipe facts (NVlabs/Sana yamls; reference/sana-original.md sections 1 and 5): model, latent side
# (image px / 32), position embedding (PE interpolation), flow shift, optimizer, lr, batch, parameters (diffusers').
RECIPE_FACTS = {
    "sana_600m_512": ("sana_600m_512", 16, None, 3.0, "came", 1e-4, 128, 591_747_872),
    "sana_600m_1024": ("sana_600m", 32, None, 4.0, "came", 1e-4, 64, 591_747_872),
    "sana_1600m_512": ("sana_1600m_512", 16, None, 3.0, "came", 1e-4, 64, 1_604_462_752),
    "sana_1600m_1024": ("sana_1600m", 32, None, 3.0, "came", 1e-4, 64, 1_604_462_752),
    "sana_1600m_2k": ("sana_1600m_2k", 64, 1.0, 3.0, "came", 1e-4, 4, 1_604_462_752),
    "sana_1600m_4k": ("sana_1600m_4k", 128, 2.0, 6.0, "came", 1e-4, 8, 1_604_462_752),
    "sana15_1600m_1024": ("sana15_1600m", 32, None, 3.0, "came", 2e-5, 64, 1_604_641_952),
    "sana15_4800m_1024": ("sana15_4800m", 32, None, 3.0, "came_8bit", 2e-5, 32, 4_721_825_952),
}


def test_released_recipes_match_the_yamls():
    """Every recipe, full size, through jax.eval_shape only: params, the sharded train state, and a forward at
    the recipe's latent size (the 2K / 4K sin-cos PE is built there)."""
    import sana_jax
    from sana_jax.train.config import RECIPES
    from sana_jax.train.step import make_optimizer, state_shardings

    assert sorted(RECIPES) == sorted(RECIPE_FACTS)
    for name, (model, side, pe, shift, optimizer, lr, batch, count) in RECIPE_FACTS.items():
        cfg = load_config(name)
        m = cfg.model
        got = (m.name, m.sample_size, m.pe_interpolation if m.use_pe else None, cfg.flow.shift, cfg.optim.name,
               cfg.optim.lr, cfg.batch_size)
        assert got == (model, side, pe, shift, optimizer, lr, batch), name
        assert m.flow_shift == cfg.flow.shift and cfg.optim.clip_grad_norm == 0.1 and cfg.optim.warmup_steps == 2000
        assert (m.compute_dtype, m.remat_policy) == ("bfloat16", "full")
        transformer = sana_jax.SanaTransformer(m)
        params = sana_jax.abstract_params(transformer)
        assert sana_jax.count_params(params) == count, name
        abstract, _ = state_shardings(cfg, sharding.make_mesh(cfg.mesh), make_optimizer(cfg))
        assert jax.tree.structure(abstract.params) == jax.tree.structure(params)
        x = jax.ShapeDtypeStruct((1, side, side, m.in_channels), jnp.float32)
        y = jax.ShapeDtypeStruct((1, m.model_max_length, m.caption_channels), jnp.float32)
        out = jax.eval_shape(lambda p, x, y: transformer.apply({"params": p}, x, jnp.ones((1,)), y,
                                                               jnp.ones((1, m.model_max_length), jnp.int32)),
                             params, x, y)
        assert out.shape == (1, side, side, m.out_channels), name


def test_sana_integer_timesteps_and_shift():
    u = np.linspace(0.0005, 0.9995, 101)
    sigma, t = sigmas_and_timesteps(u, FlowConfig(shift=3.0, integer_timesteps=True))
    grid = np.floor(u * 1000) / 1000
    np.testing.assert_allclose(sigma, 3 * grid / (1 + 2 * grid), rtol=1e-6)
    np.testing.assert_array_equal(t, np.floor(np.asarray(sigma) * 1000))
    assert np.all((np.asarray(t) >= 0) & (np.asarray(t) <= 999))
    sigma_c, t_c = sigmas_and_timesteps(u, FlowConfig(shift=1.0, integer_timesteps=False))
    np.testing.assert_allclose(sigma_c, u, rtol=1e-6)
    np.testing.assert_allclose(t_c, u * 1000, rtol=1e-6)


def test_loader_is_deterministic_and_splits_batches_across_processes(cache):
    one = Loader(cache, global_batch=8, seed=3)
    assert one.batches_per_epoch == 12 and one.index["shards"][0]["count"] == 40
    first = one.batch(5)
    np.testing.assert_array_equal(first["x0"], Loader(cache, 8, seed=3).batch(5)["x0"])
    assert not np.array_equal(first["x0"], one.batch(5 + one.batches_per_epoch)["x0"])  # next epoch reshuffles
    halves = [Loader(cache, 8, seed=3, process_index=p, process_count=2).batch(5) for p in range(2)]
    together = np.concatenate([h["x0"] for h in halves])
    assert sorted(map(bytes, together)) == sorted(map(bytes, first["x0"]))  # same rows, split across hosts


def test_cache_errors_name_the_problem(tmp_path, cache):
    with pytest.raises(FileNotFoundError, match="no cache index"):
        Loader(str(tmp_path), 8, 0)
    with pytest.raises(FileExistsError, match="not empty"):
        write_cache(cache, [], np.zeros((5, 32)), np.ones(5))
    bad = [Example(np.zeros((8, 8, 48)), np.zeros((5, 32)), np.ones(5), "a"),
           Example(np.zeros((8, 8, 12)), np.zeros((5, 32)), np.ones(5), "b")]
    with pytest.raises(ValueError, match="differs from the first example"):
        write_cache(str(tmp_path / "bad"), bad, np.zeros((5, 32)), np.ones(5))
    with pytest.raises(ValueError, match="no bucket holds a full global batch"):
        Loader(cache, 4096, 0)


def test_bad_configs_fail_before_compiling(cache, tmp_path):
    with pytest.raises(ValueError, match="latents have 48 channels"):
        train(tiny_config(cache, tmp_path / "a", model=MODEL.replace(in_channels=4, out_channels=4)))
    with pytest.raises(ValueError, match="does not divide"):
        train(tiny_config(cache, tmp_path / "b", mesh=MeshConfig(data=3)))


@pytest.mark.parametrize("optim_changes, narrow, unrolled", [
    ({"came_impl": "pallas"}, True, False), ({"name": "came_8bit", "came_impl": "pallas"}, True, False),
    ({"came_impl": "pallas"}, True, True),
    ({"came_impl": "xla"}, False, False), ({"came_impl": "pallas", "layer_group": 1}, False, False),
    ({"came_impl": "pallas", "grad_accum": 2}, False, False), ({"name": "adamw"}, False, False)],
    ids=["came_kernels", "came_8bit_kernels", "came_kernels_unrolled", "came_xla", "layer_groups", "accumulation",
         "adamw"])
def test_step_hands_16bit_gradients_only_to_the_came_kernels(tmp_path, optim_changes, narrow, unrolled):
    """The step differentiates the bf16 compute copies (sana_jax.model.compute_copies) where CAME's kernels read
    16-bit gradients, and the fp32 params elsewhere: the dtypes of the gradients the optimizer is handed, traced
    (unrolled: layer by layer, `per_layer_value_and_grad`). RMSNorm weights, applied at full width, always get fp32
    gradients."""
    from sana_jax.train.step import make_optimizer, state_shardings, train_step

    model = MODEL.replace(compute_dtype="bfloat16", qk_norm=True, cross_norm=True, unroll_blocks=unrolled)
    cfg = tiny_config(str(tmp_path), tmp_path, model=model,
                      optim=dataclasses.replace(OptimConfig(name="came", lr=1e-3, clip_grad_norm=0.1),
                                                **optim_changes))
    mesh = sharding.make_mesh(cfg.mesh)
    tx, handed = make_optimizer(cfg), {}

    def spy_update(grads, state, params=None):
        handed.update({jax.tree_util.keystr(path): g.dtype for path, g in jax.tree_util.tree_leaves_with_path(grads)})
        return tx.update(grads, state, params)

    spy = optax.GradientTransformation(tx.init, spy_update)
    abstract, _ = state_shardings(cfg, mesh, tx)
    length, channels = shapes.MAX_LENGTH, shapes.CAPTION_CHANNELS
    batch = {"x0": jax.ShapeDtypeStruct((8, 8, 8, 48), jnp.float32),
             "mask": jax.ShapeDtypeStruct((8, length), jnp.int32),
             "y": jax.ShapeDtypeStruct((8, length, channels), jnp.float32),
             "null_y": jax.ShapeDtypeStruct((length, channels), jnp.float32)}
    with nn.logical_axis_rules(sharding.LOGICAL_RULES), jax.set_mesh(mesh):
        jax.eval_shape(train_step(cfg, spy), abstract, batch)
    norm_weights = {name for name in handed if name.endswith("['weight']")}
    assert len(norm_weights) == 5 and {handed[name] for name in norm_weights} == {jnp.dtype(jnp.float32)}
    others = {handed[name] for name in handed if name not in norm_weights}
    assert others == {jnp.dtype(jnp.bfloat16 if narrow else jnp.float32)}


def resume_config(cache, out_dir) -> TrainConfig:
    return tiny_config(cache, out_dir, optim=OptimConfig(name="came", lr=1e-3, warmup_steps=2, clip_grad_norm=0.1,
                                                         ema_decay=0.9),
                       sample_every=3, sample_count=5, sample_steps=3)


def test_resume_is_exact_and_the_run_exports(cache, tmp_path):
    """Kill at step 3 and resume: the same losses, weights and sample grids (check_sample_grids) as one run."""
    straight = train(resume_config(cache, tmp_path / "straight"), progress=False)
    assert len(straight.losses) == 6 and all(np.isfinite(v) for _, v in straight.losses)
    assert os.path.exists(tmp_path / "straight" / "loss.png")
    assert any(name.startswith("events") for name in os.listdir(tmp_path / "straight" / "tensorboard"))

    cfg = resume_config(cache, tmp_path / "resumed")
    killed = train(cfg, stop_after=3, progress=False)
    assert [s for s, _ in killed.losses] == [1, 2, 3]
    resumed = train(cfg, progress=False)
    assert resumed.losses == straight.losses  # bit-exact: same data, same randomness, restored optimizer state
    for a, b in zip(jax.tree.leaves((straight.state.params, straight.state.ema)),
                    jax.tree.leaves((resumed.state.params, resumed.state.ema))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    check_sample_grids(resume_config(cache, tmp_path / "straight"), straight, tmp_path / "resumed")

    import sana_jax
    from sana_jax.cli import main

    for ema, tree in ((False, straight.state.params), (True, straight.state.ema)):
        dest = tmp_path / f"export-ema{ema}.safetensors"
        assert main(["export", str(tmp_path / "straight"), str(dest), "--to", "official"] + ["--ema"] * ema) == 0
        _, exported = sana_jax.load_pretrained(str(dest), config=MODEL)
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(exported)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_of_another_model_is_refused(cache, tmp_path):
    train(tiny_config(cache, tmp_path / "run", steps=1), progress=False)
    with pytest.raises(ValueError, match="checkpoint|does not match"):
        train(tiny_config(cache, tmp_path / "run", steps=2, model=MODEL.replace(depth=3)), progress=False)


_SHARDED_RUN = """
import json, sys
from tests.test_train import sharded_test_config
from sana_jax.train.config import MeshConfig
from sana_jax.train.loop import train
import jax
assert jax.device_count() == 8, jax.devices()
cfg = sharded_test_config(sys.argv[1], sys.argv[2], mesh=MeshConfig(data=2, fsdp=4))
print(json.dumps(train(cfg, progress=False).losses))
"""


def sharded_test_config(cache, out_dir, **changes) -> TrainConfig:
    # lr 1e-4: fp32 reduction-order noise (1e-7 at step 2) grows with every CAME step in proportion to the lr on
    # this random model; at 1e-3 it reaches 1.6e-4 by step 9 on both sides of a correct sharding (measured).
    return tiny_config(cache, out_dir, steps=10, checkpoint_every=10,
                       optim=OptimConfig(name="came", lr=1e-4, warmup_steps=2, clip_grad_norm=0.1), **changes)


def run_on_eight_devices(cache, out_dir) -> list:
    """Train (or resume) sharded_test_config on 8 simulated devices (data 2 x fsdp 4) in a subprocess."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SHARDED_RUN, cache, str(out_dir)], env=env,
                         cwd=root, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def single_device_losses(cache, tmp_path_factory):
    return train(sharded_test_config(cache, tmp_path_factory.mktemp("single")), progress=False).losses


def test_eight_simulated_devices_match_one(cache, tmp_path, single_device_losses):
    sharded = run_on_eight_devices(cache, tmp_path / "sharded")
    assert [s for s, _ in sharded] == [s for s, _ in single_device_losses]
    assert_close("8-device vs 1-device loss trajectory", np.array([v for _, v in single_device_losses]),
                 np.array([v for _, v in sharded]), "sharded_fp32")


def test_resume_onto_another_mesh(cache, tmp_path, single_device_losses):
    """Half the run on 1 device, the rest restored onto a data 2 x fsdp 4 mesh of 8 devices."""
    train(sharded_test_config(cache, tmp_path / "run"), stop_after=5, progress=False)
    resumed = run_on_eight_devices(cache, tmp_path / "run")
    assert [s for s, _ in resumed] == [s for s, _ in single_device_losses]
    assert_close("1 -> 8 device resume vs 1-device trajectory", np.array([v for _, v in single_device_losses]),
                 np.array([v for _, v in resumed]), "sharded_fp32")


def test_main_job_runs_end_to_end(tmp_path):
    """The demo's plumbing at a size that cannot learn: cache, train, kill + resume, sample, measure, export."""
    from sana_jax.train.demo import run_demo

    # 2 steps (of ~3 s each at the demo's batch 32): stopped after 1, resumed from its checkpoint for the other.
    code = run_demo(str(tmp_path), steps=2, samples_per_caption=1, num_examples=64)
    report = json.loads((tmp_path / "report.json").read_text())
    assert code in (0, 1) and report["resumed_from_step"] == 1 and report["samples"] == 18
    assert report["export_parity_worst_fp32"] <= 1e-5  # the export of the trained weights matches sana_torch_ref
    assert (tmp_path / "samples.png").exists() and (tmp_path / "run" / "loss.png").exists()
    from PIL import Image

    from sana_jax.train import samples

    # The end-of-run grid through the shapes decoder: 32-px images upscaled x3, 18 captions in 5 columns.
    grid = Image.open(tmp_path / "run" / "samples" / "step-0000002.png")
    assert grid.size == samples.grid_size(18, (32, 32)) == (5 * 96, 4 * (96 + samples.LABEL_HEIGHT))


def check_sample_grids(cfg: TrainConfig, result, resumed_dir) -> None:
    """Sample grids of a 6-step run with sample_every 3 and EMA (test_resume_is_exact_and_the_run_exports): the
    expected files and pixel size, the cache's first distinct captions, a deterministic function of the weights,
    the EMA weights, the same grid after a kill and resume, and a TensorBoard image summary."""
    from PIL import Image

    from sana_jax.train import samples
    from sana_jax.train.data import read_shard_captions

    out = os.path.join(cfg.out_dir, "samples")
    assert sorted(os.listdir(out)) == ["step-0000003.png", "step-0000006.png"]
    assert sorted(os.listdir(resumed_dir / "samples")) == sorted(os.listdir(out))  # the killed run wrote step 3
    png = np.asarray(Image.open(os.path.join(out, "step-0000006.png")).convert("RGB"))
    np.testing.assert_array_equal(png, np.asarray(Image.open(resumed_dir / "samples" / "step-0000006.png")))
    # latent preview: 8x8 latents upscaled x12 to 96-px tiles, ceil(sqrt(5)) = 3 columns, 2 rows of tile + label
    assert png.shape == (2 * (96 + samples.LABEL_HEIGHT), 3 * 96, 3)
    assert samples.grid_size(5, (8, 8)) == (png.shape[1], png.shape[0])

    grids = samples.SampleGrids(cfg, os.path.join(cfg.out_dir, "check"))
    captions = grids.prompts["captions"]
    first = read_shard_captions(os.path.join(cfg.data_dir, "shard-00000.safetensors"))
    assert captions == list(dict.fromkeys(first))[:5]  # the cache's first distinct captions
    ema = grids.images(result.state.ema)
    np.testing.assert_array_equal(ema, grids.images(result.state.ema))  # deterministic: same weights, same grid
    params = grids.images(result.state.params)
    assert np.abs(ema - params).max() > 1e-3  # EMA (decay 0.9) and params differ after 6 steps
    np.testing.assert_array_equal(png, np.asarray(samples.grid_image(ema, captions)))  # the written grid is EMA's
    tensorboard = os.path.join(cfg.out_dir, "tensorboard")
    assert any(b"samples" in open(os.path.join(tensorboard, f), "rb").read() for f in os.listdir(tensorboard))


def test_sample_decoders(tmp_path):
    """The three sample_decoder kinds: latent preview, the shapes pixel shuffle, a DC-AE folder."""
    from safetensors.numpy import save_file

    from sana_conversion.dcae import diffusers_config, jax_to_diffusers
    from sana_jax import dcae
    from sana_jax.train import samples

    latents = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    preview, f = samples.make_decoder("", 4, 1.0)
    image = preview(latents)
    assert f == 1 and image.shape == (2, 3, 5, 3)
    np.testing.assert_allclose(image.min(axis=(1, 2, 3)), -1.0)  # min-max per image
    np.testing.assert_allclose(image.max(axis=(1, 2, 3)), 1.0, rtol=1e-6)
    assert samples.latent_preview(latents[..., :1]).shape == (2, 3, 5, 3)  # fewer than 3 channels: grey

    pixel, f = samples.make_decoder("shapes", 48, 1.0)
    image = shapes.render("red", "circle", np.random.default_rng(0))
    np.testing.assert_array_equal(pixel(shapes.to_latent(image)[None])[0], image)
    with pytest.raises(ValueError, match="48-channel"):
        samples.make_decoder("shapes", 32, 1.0)
    with pytest.raises(FileNotFoundError, match="sample_decoder"):
        samples.make_decoder(str(tmp_path / "missing"), 4, 1.0)

    vae = dcae.DCAE(dcae.TINY)
    params = dcae.init_params(vae, jax.random.key(0))
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(diffusers_config(dcae.TINY)))
    save_file(jax_to_diffusers(params, dcae.TINY), str(folder / "diffusion_pytorch_model.safetensors"))
    decode, f = samples.make_decoder(str(folder), 4, 0.5)
    expected = vae.apply({"params": params}, latents / 0.5, method="decode")
    assert f == dcae.TINY.spatial_compression and expected.shape == (2, 3 * f, 5 * f, 3)
    np.testing.assert_allclose(decode(latents), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="latent channels"):
        samples.make_decoder(str(folder), 32, 0.5)


def test_per_layer_gradients_equal_the_stacked_ones_without_the_layers_concatenate():
    """per_layer_value_and_grad (the unrolled step's) gives value_and_grad's loss and gradients bit for bit, and with
    the copy kernel (interpreted here) XLA keeps no concatenate of the layers' gradients: it folds the loss's
    re-stacking into the unrolled scan's slicing, both ways."""
    import re

    import sana_jax
    from sana_jax.train.step import per_layer_value_and_grad

    cfg = MODEL.replace(unroll_blocks=True, depth=5)
    model = sana_jax.SanaTransformer(cfg)
    params = sana_jax.perturb_params(sana_jax.init_params(model, jax.random.key(0)), seed=1)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 6, cfg.in_channels)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((2, 5, cfg.caption_channels)), jnp.float32)
    t, mask = jnp.asarray([3.0, 500.0]), jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], jnp.int32)
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x, t, y, mask)))  # noqa: E731
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss))(params)
    per_layer = jax.jit(lambda p: per_layer_value_and_grad(loss, p, "pallas"))
    got_loss, got_grads = per_layer(params)
    assert float(got_loss) == float(ref_loss)
    assert jax.tree.structure(got_grads) == jax.tree.structure(ref_grads)
    for a, b in zip(jax.tree.leaves(ref_grads), jax.tree.leaves(got_grads)):
        assert a.shape == b.shape and bool(jnp.array_equal(a, b))
    text = per_layer.lower(params).compile().as_text()
    stacked = [line for line in text.splitlines()
               if re.search(r"= f32\[5,[\d,]*\]\S* concatenate\(", line)]  # a [depth, ...] concatenate
    assert not stacked, stacked[:2]
    plain = jax.jit(jax.value_and_grad(loss)).lower(params).compile().as_text()
    assert re.search(r"= f32\[5,[\d,]*\]\S* concatenate\(", plain)  # what the check above would catch
