"""DC-AE: sana_jax.dcae <-> diffusers AutoencoderDC parity on perturbed tiny models, conversion (diffusers and
original mit-han-lab layouts, bit-exact round trips, agreement with diffusers' own converter), released configs,
tiling, bad input, and the tiny benchmark."""

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from diffusers import AutoencoderDC
from diffusers.loaders.single_file_utils import convert_autoencoder_dc_checkpoint_to_diffusers

import sana_jax
from sana_conversion import dcae as cdcae
from sana_conversion._tree import flatten, unflatten
from sana_jax import dcae
from tests.helpers import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dcae.TINY
# Every other option: pixel (un)shuffle resampling, no full-resolution stage (conv_in / conv_out are resamplers),
# BatchNorm (ResBlock and attention), GELU / Mish / swish, no in/out shortcuts, 2 heads of 8.
PIXEL = TINY.replace(
    name="pixel", attention_head_dim=8, downsample_block_type="pixel_unshuffle", upsample_block_type="pixel_shuffle",
    encoder_block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
    encoder_layers_per_block=(0, 1, 2), decoder_layers_per_block=(0, 2, 1),
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock", "ResBlock"),
    encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (3,), ()),
    decoder_norm_types=("rms_norm", "batch_norm", "batch_norm"), decoder_act_fns=("gelu", "mish", "swish"),
    decoder_conv_act_fn="silu", encoder_out_shortcut=False, decoder_in_shortcut=False)
# At most one q/k/v scale per stage: what diffusers' converter of the original layout handles.
ONE_SCALE = TINY.replace(name="one_scale", encoder_qkv_multiscales=((), (3,), (5,)))
CONFIGS = {"tiny": TINY, "pixel": PIXEL, "one_scale": ONE_SCALE}
# f = 4. At 16x12 every attention map has N > D (linear branch); at 8x4 the last stage is 2x1 (TINY, D 4) and
# the last two are 4x2 / 2x1 (PIXEL, D 8), so N <= D takes diffusers' "quadratic" branch there.
SIZES = [(2, 16, 12), (1, 8, 4)]


@functools.lru_cache(maxsize=None)
def perturbed_params(cfg, seed=0):
    """PyTorch-default init, then every leaf perturbed (sana_jax.perturb_params: +randn*0.05 on kernels, *0.3 on
    vectors); BatchNorm variances kept positive. Cached: callers must not modify the tree."""
    params = sana_jax.perturb_params(dcae.init_params(dcae.DCAE(cfg), jax.random.key(seed)), seed=seed)

    def fix(path, leaf):
        return np.abs(leaf) + 0.5 if jax.tree_util.keystr(path).endswith("['var']") else leaf

    return jax.tree_util.tree_map_with_path(fix, params)


@functools.lru_cache(maxsize=None)
def _jitted(model, method):
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def run(model, params, x, method):
    """model.apply(..., method=method) compiled (eager apply dispatches op by op: ~4x slower on tiny models)."""
    return _jitted(model, method)(params, x)


def diffusers_model(cfg, params):
    config = {k: v for k, v in cdcae.diffusers_config(cfg).items() if not k.startswith("_")}
    model = AutoencoderDC(**config).eval()
    state_dict = {k: torch.from_numpy(v) for k, v in cdcae.jax_to_diffusers(params, cfg).items()}
    model.load_state_dict(state_dict, strict=True)
    return model


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x))).permute(0, 3, 1, 2)


def nhwc(t):
    return t.permute(0, 2, 3, 1).numpy()


def images(shape, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (*shape, 3)).astype(np.float32)


def smooth_image(h, w):
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    return np.stack([np.sin(3 * yy + 2 * xx), np.cos(2 * yy - xx), yy * xx], -1)[None].astype(np.float32)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """diffusers runs tiny ops here; on a busy 2-core machine torch's OpenMP workers spin-wait and make them ~50x
    slower (measured). Restored after this module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------------- parity

@pytest.fixture(scope="module", params=["tiny", "pixel"])
def pair(request):
    cfg = CONFIGS[request.param]
    params = perturbed_params(cfg)
    return cfg, dcae.DCAE(cfg), params, diffusers_model(cfg, params)


@pytest.mark.parametrize("shape", SIZES, ids=lambda s: "x".join(map(str, s)))
def test_encode_decode_match_diffusers(pair, shape):
    cfg, model, params, ref = pair
    x = images(shape)
    with torch.no_grad():
        z_ref = nhwc(ref.encode(nchw(x)).latent)
        y_ref = nhwc(ref.decode(nchw(z_ref)).sample)
    f = cfg.spatial_compression
    z = run(model, params, x, "encode")
    assert z.shape == (shape[0], shape[1] // f, shape[2] // f, cfg.latent_channels)
    assert_close(f"{cfg.name} encode {shape}", z_ref, z, "tiny_fp32")
    y = run(model, params, z_ref, "decode")  # the same latents on both sides
    assert y.shape == x.shape
    assert_close(f"{cfg.name} decode {shape}", y_ref, y, "tiny_fp32")


def test_stage_outputs_match_diffusers():
    """Every stage's output is sown (`intermediates`), so a parity failure names the first diverging stage."""
    cfg, params = PIXEL, perturbed_params(PIXEL)
    model, ref = dcae.DCAE(cfg), diffusers_model(cfg, params)
    modules = {"encoder.conv_in": ref.encoder.conv_in, "decoder.conv_in": ref.decoder.conv_in}
    modules.update({f"encoder.down_blocks_{i}": block for i, block in enumerate(ref.encoder.down_blocks)})
    modules.update({f"decoder.up_blocks_{i}": block for i, block in enumerate(ref.decoder.up_blocks)})
    captured = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: captured.__setitem__(name, nhwc(out)))
             for name, module in modules.items()]
    x = images((1, 16, 12))
    with torch.no_grad():
        z = ref.encode(nchw(x)).latent
        ref.decode(z)
    for hook in hooks:
        hook.remove()
    # PIXEL has no decoder in-shortcut, so diffusers' conv_in output is the sown one.
    _, enc = model.apply({"params": params}, x, method="encode", mutable=["intermediates"])
    _, dec = model.apply({"params": params}, nhwc(z), method="decode", mutable=["intermediates"])
    sown = {f"{side}.{key.removesuffix('_out')}": value[0] for side, state in (("encoder", enc), ("decoder", dec))
            for key, value in state["intermediates"][side].items()}
    assert set(sown) == set(captured), sorted(set(sown) ^ set(captured))
    for name in sorted(captured):
        assert_close(f"pixel stage {name}", captured[name], sown[name], "tiny_fp32")


def test_quadratic_branch_equals_linear_attention():
    """The two branches compute the same function (diffusers switches on N <= D for speed only)."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 6, 3, 4)).astype(np.float32) for _ in range(3))
    from sana_jax.linear_attention import relu_linear_attention
    assert_close("quadratic vs linear", relu_linear_attention(q, k, v, eps=1e-15),
                 dcae.relu_quadratic_attention(q, k, v), "tiny_fp32")


@pytest.mark.parametrize("shape", [(2, 5, 3, 6), (1, 1, 4, 2)], ids=["5x3", "1x4"])
def test_nearest_upsample_conv_equals_direct_form(shape):
    """The folded-tap up-sampling conv against its naive sibling: nearest x2 (repeat), then a 3x3 conv."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    kernel = rng.standard_normal((3, 3, shape[-1], 5)).astype(np.float32)
    up = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
    direct = jax.lax.conv_general_dilated(up, kernel, (1, 1), ((1, 1), (1, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                          precision=jax.lax.Precision.HIGHEST)
    assert_close(f"nearest2x_conv3x3 {shape}", direct,
                 dcae.nearest2x_conv3x3(x, kernel, precision=jax.lax.Precision.HIGHEST), "tiny_fp32")


def test_bf16_matches_diffusers_bf16():
    """bf16 against diffusers in bf16 (`.to(torch.bfloat16)`), the same perturbed model and inputs: both are as
    far from the fp32 result (up to 14% on some decodes), so fp32 is no reference here (tolerances.py)."""
    params = perturbed_params(TINY)
    ref = diffusers_model(TINY, params).to(torch.bfloat16)
    model = dcae.DCAE(TINY.replace(compute_dtype="bfloat16"))
    x = images((1, 8, 8))
    latents = np.random.default_rng(1).standard_normal((1, 3, 2, TINY.latent_channels)).astype(np.float32)
    with torch.no_grad():
        z_ref = ref.encode(nchw(x).bfloat16()).latent.float().permute(0, 2, 3, 1).numpy()
        y_ref = ref.decode(nchw(latents).bfloat16()).sample.float().permute(0, 2, 3, 1).numpy()
    z = run(model, params, x, "encode")
    assert z.dtype == np.dtype("bfloat16")
    assert_close("bf16 encode vs diffusers bf16", z_ref, z, "dcae_bf16")
    assert_close("bf16 decode vs diffusers bf16", y_ref, run(model, params, latents, "decode"),
                 "dcae_bf16")


# ------------------------------------------------------------------------------------------- configs

def test_released_parameter_counts():
    """jax.eval_shape counts equal diffusers' (diffusers.md section 8)."""
    params = dcae.abstract_params(dcae.DCAE(dcae.get("dc-ae-f32c32-sana-1.0")))
    assert sana_jax.count_params(params) == 312_250_275
    assert sana_jax.count_params(params["encoder"]) == 153_027_104
    assert sana_jax.count_params(params["decoder"]) == 159_223_171


@pytest.mark.parametrize("name", ["dc-ae-f32c32-sana-1.0", "dc-ae-lite-f32c32-sana-1.1"])
def test_released_configs_build_the_same_diffusers_model(name):
    """Our config.json builds an AutoencoderDC (meta device) with exactly the keys and shapes our table expects."""
    cfg = dcae.get(name)
    config = {k: v for k, v in cdcae.diffusers_config(cfg).items() if not k.startswith("_")}
    with torch.device("meta"):
        model = AutoencoderDC(**config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == cdcae.torch_shapes(cfg, "diffusers")
    assert cdcae.config_from_diffusers(cdcae.diffusers_config(cfg), name=name) == cfg


def test_every_parameter_has_logical_axes():
    model = dcae.DCAE(PIXEL)
    shapes = flatten(dcae.abstract_params(model))
    axes = flatten(dcae.logical_axes(model))
    assert shapes.keys() == axes.keys()
    for path, leaf in shapes.items():
        assert len(axes[path]) == len(leaf.shape), (path, axes[path], leaf.shape)


@pytest.mark.parametrize("bad, message", [
    (dict(encoder_block_types=("ResBlock", "Transformer", "ResBlock")), "encoder_block_types"),
    (dict(decoder_layers_per_block=(1, 1)), "decoder_layers_per_block"),
    (dict(decoder_norm_types=("layer_norm",) * 3), "decoder_norm_types"),
    (dict(upsample_block_type="bicubic"), "upsample_block_type"),
    (dict(attention_head_dim=3), "attention_head_dim"),
    (dict(latent_channels=3), "latent_channels"),
    (dict(decoder_conv_act_fn="relu6"), "activation"),
    (dict(compute_dtype="fp8"), "compute_dtype"),
])
def test_bad_config_values_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        TINY.replace(**bad)


def test_unknown_variant_names_the_known_ones():
    with pytest.raises(ValueError, match="dc-ae-f32c32-sana-1.1"):
        dcae.get("dc-ae-f64c128")


# ------------------------------------------------------------------------------------------- conversion

def same_arrays(ref: dict, out: dict):
    assert set(ref) == set(out), sorted(set(ref) ^ set(out))
    for key in ref:
        a, b = np.asarray(ref[key]), np.asarray(out[key])
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), key


@pytest.mark.parametrize("fmt", ["diffusers", "original"])
@pytest.mark.parametrize("name", ["tiny", "pixel"])
def test_round_trip_is_bit_exact(name, fmt):
    cfg = CONFIGS[name]
    params = perturbed_params(cfg)
    to_torch = cdcae.jax_to_diffusers if fmt == "diffusers" else cdcae.jax_to_original
    to_jax = cdcae.diffusers_to_jax if fmt == "diffusers" else cdcae.original_to_jax
    state_dict = to_torch(params, cfg)
    back = to_jax(state_dict, cfg)
    same_arrays(flatten(params), flatten(back))
    same_arrays(state_dict, to_torch(back, cfg))


@pytest.mark.parametrize("name", ["one_scale", "pixel"])
def test_original_layout_agrees_with_diffusers_converter(name):
    """JAX -> original, then diffusers' own original -> diffusers converter, gives exactly JAX -> diffusers."""
    cfg = CONFIGS[name]
    params = perturbed_params(cfg)
    original = {k: torch.from_numpy(v) for k, v in cdcae.jax_to_original(params, cfg).items()}
    converted = {k: v.numpy() for k, v in convert_autoencoder_dc_checkpoint_to_diffusers(original).items()}
    same_arrays(cdcae.jax_to_diffusers(params, cfg), converted)


def test_export_diffusers_loads_in_diffusers_and_back(tmp_path):
    cfg, params = PIXEL, perturbed_params(PIXEL)
    out = tmp_path / "vae"
    cdcae.export_diffusers(cfg, params, out)
    ref = AutoencoderDC.from_pretrained(out).eval()
    latents = np.random.default_rng(1).standard_normal((1, 3, 2, cfg.latent_channels)).astype(np.float32)
    with torch.no_grad():
        y_ref = nhwc(ref.decode(nchw(latents)).sample)
    model, loaded = dcae.load_pretrained(out)
    assert model.config == cfg.replace(name="diffusers")
    same_arrays(flatten(params), flatten(loaded))
    assert_close("exported decode", y_ref, run(model, loaded, latents, "decode"), "tiny_fp32")
    with pytest.raises(FileExistsError):
        cdcae.export_diffusers(cfg, params, out)
    cdcae.export_diffusers(cfg, params, out, overwrite=True)
    # A pipeline folder: the VAE in vae/.
    model, loaded = dcae.load_pretrained(tmp_path)
    same_arrays(flatten(params), flatten(loaded))


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_export_original_and_load(tmp_path, suffix):
    cfg, params = TINY, perturbed_params(TINY)
    path = tmp_path / f"dcae{suffix}"
    cdcae.export_original(cfg, params, path)
    model, loaded = dcae.load_pretrained(path, config=cfg)
    assert model.config == cfg
    same_arrays(flatten(params), flatten(loaded))
    with pytest.raises(ValueError, match="match no released config"):
        dcae.load_pretrained(path)


def test_original_folder_and_released_recognition(tmp_path):
    cfg, params = TINY, perturbed_params(TINY)
    cdcae.export_original(cfg, params, tmp_path / cdcae.ORIGINAL_WEIGHTS_NAME)
    (tmp_path / "config.json").write_text(json.dumps({"model_name": "dc-ae-f32c32-sana-9.9"}))
    with pytest.raises(ValueError, match="dc-ae-f32c32-sana-9.9"):
        dcae.load_pretrained(tmp_path)
    _, loaded = dcae.load_pretrained(tmp_path, config=cfg)
    same_arrays(flatten(params), flatten(loaded))
    # Released variants are recognised from original key shapes alone (1.0 and 1.1 share them).
    for name in ["dc-ae-f32c32-sana-1.0", "dc-ae-lite-f32c32-sana-1.1"]:
        shapes = cdcae.torch_shapes(dcae.get(name), "original")
        assert cdcae.infer_original_config(shapes).name == name
    assert cdcae.infer_original_config({}, "dc-ae-f32c32-sana-1.1").name == "dc-ae-f32c32-sana-1.1"


# ------------------------------------------------------------------------------------------- bad input

def test_wrong_key_and_wrong_shape_are_named():
    cfg, params = TINY, perturbed_params(TINY)
    state_dict = cdcae.jax_to_diffusers(params, cfg)
    renamed = dict(state_dict)
    renamed["encoder.conv_in.wieght"] = renamed.pop("encoder.conv_in.weight")
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): encoder.conv_in.weight.*unexpected 1 key\(s\): "
                                         r"encoder.conv_in.wieght"):
        cdcae.diffusers_to_jax(renamed, cfg)
    reshaped = dict(state_dict)
    reshaped["decoder.conv_out.weight"] = np.zeros((3, 8, 3, 2), np.float32)
    with pytest.raises(ValueError,
                       match=r"'decoder.conv_out.weight': expected shape \(3, 8, 3, 3\), got \(3, 8, 3, 2\)"):
        cdcae.diffusers_to_jax(reshaped, cfg)
    flat = flatten(params)
    flat["encoder/conv_in/kernel"] = np.zeros((3, 3, 3, 9), np.float32)
    with pytest.raises(ValueError, match=r"encoder/conv_in/kernel.*\(3, 3, 3, 8\).*\(3, 3, 3, 9\)"):
        cdcae.jax_to_original(unflatten(flat), cfg)


def test_bad_images_and_latents_raise():
    model, params = dcae.DCAE(TINY), perturbed_params(TINY)
    with pytest.raises(ValueError, match="not a multiple of the DC-AE's spatial compression 4"):
        model.apply({"params": params}, images((1, 16, 10)), method="encode")
    with pytest.raises(ValueError, match=r"images must be \[B, H, W, 3\]"):
        model.apply({"params": params}, np.zeros((1, 3, 16, 16), np.float32), method="encode")
    with pytest.raises(ValueError, match=r"latents must be \[B, h, w, 4\]"):
        model.apply({"params": params}, np.zeros((1, 4, 4, 32), np.float32), method="decode")
    full = dcae.DCAE(dcae.get("dc-ae-f32c32-sana-1.0"))  # traced only: jax.eval_shape allocates nothing
    with pytest.raises(ValueError, match="image size 1000x1024 is not a multiple of the DC-AE's spatial compression "
                                         "32"):
        jax.eval_shape(lambda p, x: full.apply({"params": p}, x, method="encode"), dcae.abstract_params(full),
                       jax.ShapeDtypeStruct((1, 1000, 1024, 3), np.float32))
    with pytest.raises(ValueError, match="multiples of 4"):
        dcae.tiled_decode(model, params, np.zeros((1, 8, 8, 4), np.float32), tile_size=18, overlap=4)
    with pytest.raises(ValueError, match="overlap < tile_size"):
        dcae.tiled_encode(model, params, images((1, 32, 32)), tile_size=16, overlap=16)


def test_load_pretrained_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError):
        dcae.load_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a DC-AE folder"):
        dcae.load_pretrained(tmp_path)
    cfg, params = TINY, perturbed_params(TINY)
    from safetensors.numpy import save_file
    save_file(cdcae.jax_to_diffusers(params, cfg), str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="diffusers.*no config.json"):
        dcae.load_pretrained(tmp_path / "bare.safetensors")
    _, loaded = dcae.load_pretrained(tmp_path / "bare.safetensors", config=cfg)
    same_arrays(flatten(params), flatten(loaded))
    cdcae.export_diffusers(cfg, params, tmp_path / "vae")
    with pytest.raises(ValueError, match=r"vae: AutoencoderDC state_dict for config 'pixel': missing 50 key\(s\)"):
        dcae.load_pretrained(tmp_path / "vae", config=PIXEL)
    with pytest.raises(ValueError,
                       match=r"'decoder.conv_out.weight': expected shape \(3, 16, 3, 3\), got \(3, 8, 3, 3\)"):
        dcae.load_pretrained(tmp_path / "vae", config=TINY.replace(decoder_block_out_channels=(16, 8, 16)))


# ---------------------------------------------------------------------------------------------- tiling

def test_tiled_matches_diffusers_tiled():
    """Same tiles (16 px, overlap 8 -> 4 latent cells every 2), same blending, 4 x 3 tiles."""
    cfg, params = TINY, perturbed_params(TINY)
    model, ref = dcae.DCAE(cfg), diffusers_model(cfg, params)
    ref.enable_tiling(16, 16, 8, 8)
    x = smooth_image(32, 24)
    with torch.no_grad():
        z_ref = nhwc(ref.encode(nchw(x)).latent)
        y_ref = nhwc(ref.decode(nchw(z_ref)).sample)
    assert_close("tiled encode vs diffusers tiled", z_ref, dcae.tiled_encode(model, params, x, 16, 8), "tiny_fp32")
    assert_close("tiled decode vs diffusers tiled", y_ref, dcae.tiled_decode(model, params, z_ref, 16, 8),
                 "tiny_fp32")


def test_tiled_close_to_untiled():
    """A model without attention, 256 x 192 image, 128 px tiles overlapping by 64: 4 x 3 tiles."""
    cfg = TINY.replace(name="local", encoder_block_types=("ResBlock",) * 3, decoder_block_types=("ResBlock",) * 3)
    model, params = dcae.DCAE(cfg), perturbed_params(cfg)
    x = smooth_image(256, 192)
    z = run(model, params, x, "encode")
    assert_close("tiled encode vs untiled", z, dcae.tiled_encode(model, params, x, 128, 64), "dcae_tiled_local")
    assert_close("tiled decode vs untiled", run(model, params, z, "decode"),
                 dcae.tiled_decode(model, params, z, 128, 64), "dcae_tiled_local")


def test_tiled_is_untiled_when_one_tile_covers():
    model, params = dcae.DCAE(TINY), perturbed_params(TINY)
    x = images((1, 16, 12))
    z = run(model, params, x, "encode")
    assert_close("one-tile encode", z, dcae.tiled_encode(model, params, x, 16, 8), "tiny_fp32")
    assert_close("one-tile decode", run(model, params, z, "decode"),
                 dcae.tiled_decode(model, params, z, 16, 8), "tiny_fp32")


# ------------------------------------------------------------------------------------------- benchmark

def test_benchmark_runs_at_tiny_size():
    script = os.path.join(ROOT, "benchmarks", "dcae_decode.py")
    out = subprocess.run([sys.executable, script, "--tiny", "--sizes", "32"], capture_output=True, text=True,
                         timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    impls = {line.get("impl") for line in lines}
    assert {"jax", "diffusers_eager"} <= impls, lines
    assert all(line["ms"] > 0 for line in lines if "ms" in line)
    assert any("tiled" in line.get("case", "") for line in lines)
