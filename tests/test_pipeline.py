"""sana_jax.pipeline against diffusers' SanaPipeline / SanaSprintPipeline and the sana_torch_ref sampling path, on
tiny perturbed models; resolution binning against diffusers; seeds, sharding over 8 simulated devices, the
`sana-jax generate` CLI, and errors."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import sana_jax
from sana_jax import configs, pipeline
from tests.helpers import assert_close, save_tiny_tokenizer

# SANA's own eps values (LiteLA 1e-8, cross q/k norm 1e-6; diffusers hard-codes 1e-15 and 1e-5): their effect on
# these outputs is ~1e-7 relative, far below the sampling tolerance, and one config for every test (and the CLI's
# `--config tiny`) lets the tests share one compiled sampling loop.
TINY = configs.TINY
TINY_SPRINT = TINY.replace(name="tiny_sprint", qk_norm=True, cross_norm=True, guidance_embeds=True)
B, L, LATENT = 2, 12, (4, 6)  # 2 prompts, 12 caption tokens, 128 x 192 px at the DC-AE's factor 32
HEIGHT, WIDTH = 32 * LATENT[0], 32 * LATENT[1]


def random_params(cfg, seed=0):
    """Perturbed zeros (every parameter nonzero and distinct): jitting the real init costs ~15 s of compile."""
    model = sana_jax.SanaTransformer(cfg)
    zeros = jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), sana_jax.abstract_params(model))
    return model, sana_jax.perturb_params(zeros, seed=seed)


@pytest.fixture(scope="module")
def tiny():
    return random_params(TINY)


@pytest.fixture(scope="module")
def tiny_sprint():
    return random_params(TINY_SPRINT, seed=1)


@pytest.fixture(scope="module")
def captions():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((B, L, TINY.caption_channels)).astype(np.float32)
    mask = np.ones((B, L), np.int64)
    mask[1, 5:] = 0  # a padded caption
    y_null = rng.standard_normal((1, L, TINY.caption_channels)).astype(np.float32)
    mask_null = np.zeros((1, L), np.int64)
    mask_null[:, 0] = 1  # "" -> BOS only, as Gemma's tokenizer gives it
    noise = rng.standard_normal((B, *LATENT, TINY.in_channels)).astype(np.float32)
    return {"y": y, "mask": mask, "y_null": y_null, "mask_null": mask_null, "noise": noise}


def diffusers_transformer(cfg, params):
    from diffusers import SanaTransformer2DModel

    from sana_conversion import diffusers_config, jax_to_diffusers

    model = SanaTransformer2DModel.from_config({k: v for k, v in diffusers_config(cfg).items()
                                                if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in jax_to_diffusers(params, cfg).items()}, strict=True)
    return model.eval()


def nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def nhwc(x):
    return x.detach().float().numpy().transpose(0, 2, 3, 1)


# --- resolution binning --------------------------------------------------------------------------------------------

def test_aspect_ratio_tables_equal_diffusers():
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN, ASPECT_RATIO_1024_BIN
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import ASPECT_RATIO_2048_BIN
    from diffusers.pipelines.sana.pipeline_sana import ASPECT_RATIO_4096_BIN

    theirs = {16: ASPECT_RATIO_512_BIN, 32: ASPECT_RATIO_1024_BIN, 64: ASPECT_RATIO_2048_BIN,
              128: ASPECT_RATIO_4096_BIN}
    for sample_size, table in theirs.items():
        ours = pipeline.aspect_ratio_bins(sample_size)
        assert list(ours) == list(table)  # same keys in the same order (ties resolve to the first)
        assert {k: tuple(map(float, v)) for k, v in ours.items()} == {k: tuple(v) for k, v in table.items()}
    assert [len(pipeline.aspect_ratio_bins(s)) for s in (16, 32, 64, 128)] == [33, 33, 40, 40]


def test_classify_bin_matches_diffusers():
    from diffusers.image_processor import PixArtImageProcessor

    sizes = [(h, w) for h in range(64, 4200, 173) for w in range(64, 4200, 211)] + [(32, 32), (768, 1360)]
    for sample_size in (16, 32, 64, 128):
        table = pipeline.aspect_ratio_bins(sample_size)
        for h, w in sizes:
            expected = PixArtImageProcessor.classify_height_width_bin(h, w, ratios=table)
            assert pipeline.classify_height_width_bin(h, w, table) == expected
    assert pipeline.classify_height_width_bin(768, 1360, pipeline.ASPECT_RATIO_1024_BIN) == (768, 1344)


@pytest.mark.parametrize("target", [(70, 50), (128, 200), (64, 96), (200, 90)])
def test_resize_and_crop_matches_diffusers(target):
    from diffusers.image_processor import PixArtImageProcessor

    images = np.random.default_rng(1).uniform(-1, 1, (2, 64, 96, 3)).astype(np.float32)
    ref = PixArtImageProcessor.resize_and_crop_tensor(nchw(images), target[1], target[0])
    out = pipeline.resize_and_crop(jnp.asarray(images), *target)
    assert out.shape == (2, *target, 3)
    assert_close(f"resize_and_crop {target}", nhwc(ref), out, "sampler_fp32")


def test_to_uint8_matches_diffusers_postprocess():
    from diffusers.image_processor import VaeImageProcessor

    images = np.random.default_rng(2).uniform(-1.2, 1.2, (2, 8, 8, 3)).astype(np.float32)
    ref = VaeImageProcessor().postprocess(nchw(images), output_type="np")
    np.testing.assert_array_equal(pipeline.to_uint8(images), np.round(ref * 255).astype(np.uint8))


# --- end to end against diffusers' pipelines -----------------------------------------------------------------------

def test_cfg_matches_diffusers_sana_pipeline(tiny, captions):
    """diffusers convention: negative prompt's own mask, int64 DPM timesteps; 20 steps, CFG 4.5."""
    from diffusers import DPMSolverMultistepScheduler, SanaPipeline

    model, params = tiny
    c = captions
    y_null, mask_null = np.repeat(c["y_null"], B, 0), np.repeat(c["mask_null"], B, 0)
    scheduler = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0)
    ref_pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None,
                            transformer=diffusers_transformer(TINY, params), scheduler=scheduler)
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(prompt=None, negative_prompt=None, prompt_embeds=torch.from_numpy(c["y"]),
                       prompt_attention_mask=torch.from_numpy(c["mask"]),
                       negative_prompt_embeds=torch.from_numpy(y_null),
                       negative_prompt_attention_mask=torch.from_numpy(mask_null), height=HEIGHT, width=WIDTH,
                       num_inference_steps=20, guidance_scale=4.5, use_resolution_binning=False,
                       latents=nchw(c["noise"]), output_type="latent", return_dict=False)[0]
    out = pipeline.SanaPipeline(model, params)(
        prompt_embeds=c["y"], prompt_mask=c["mask"], negative_embeds=c["y_null"], negative_mask=c["mask_null"],
        height=HEIGHT, width=WIDTH, resolution_binning=False, noise=c["noise"], uncond_mask="negative",
        timestep_convention="diffusers")
    assert out.size == (HEIGHT, WIDTH) and out.images is None
    assert_close("SanaPipeline 20-step CFG latents", nhwc(ref), out.latents, "sample_fp32")


def test_sprint_matches_diffusers_sprint_pipeline(tiny_sprint, captions):
    """SanaSprintPipeline: SCM, 2 steps [1.5708, 1.3, 0], embedded guidance 4.5, latents x sigma_data."""
    from diffusers import SanaSprintPipeline, SCMScheduler

    model, params = tiny_sprint
    c = captions
    ref_pipe = SanaSprintPipeline(tokenizer=None, text_encoder=None, vae=None,
                                  transformer=diffusers_transformer(TINY_SPRINT, params), scheduler=SCMScheduler())
    ref_pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ref = ref_pipe(prompt=None, prompt_embeds=torch.from_numpy(c["y"]),
                       prompt_attention_mask=torch.from_numpy(c["mask"]), height=HEIGHT, width=WIDTH,
                       num_inference_steps=2, guidance_scale=4.5, use_resolution_binning=False,
                       latents=nchw(c["noise"]), generator=torch.Generator().manual_seed(7), output_type="latent",
                       return_dict=False)[0]
    replay = torch.Generator().manual_seed(7)  # the scheduler's per-step draws, in order
    step_noise = np.stack([nhwc(torch.randn((B, TINY.in_channels, *LATENT), generator=replay)) for _ in range(2)])
    out = pipeline.SanaPipeline(model, params)(
        prompt_embeds=c["y"], prompt_mask=c["mask"], height=HEIGHT, width=WIDTH, resolution_binning=False,
        noise=c["noise"], step_noise=step_noise)
    assert_close("SanaSprintPipeline 2-step latents", nhwc(ref), out.latents, "sample_fp32")


# --- the CUDA inference path (sana_torch_ref) gives the same latents -----------------------------------------------

@pytest.mark.parametrize("method,steps,guidance", [("flow_dpm_solver", 20, 4.5), ("flow_euler", 6, 4.5),
                                                   ("flow_dpm_solver", 20, 1.0)])
def test_torch_ref_path_matches(tiny, captions, tmp_path, method, steps, guidance):
    """SANA's semantics on both stacks: cond mask for the uncond half, floor(t) timesteps; official weights.
    guidance 1: no CFG pass (diffusers' rule, g > 1)."""
    from sana_conversion import export_official
    from sana_torch_ref import load_official, sampling as ref_sampling

    model, params = tiny
    c = captions
    export_official(TINY, params, str(tmp_path / "tiny.safetensors"))
    ref_model = load_official(str(tmp_path / "tiny.safetensors"), TINY).eval()
    with torch.no_grad():
        velocity = ref_sampling.cfg_velocity(ref_model, torch.from_numpy(c["y"]), torch.from_numpy(c["mask"]),
                                             torch.from_numpy(c["y_null"]), guidance_scale=guidance)
        ref = ref_sampling.sample(velocity, nchw(c["noise"]), method=method, steps=steps, flow_shift=3.0)
    negative = {"negative_embeds": c["y_null"]} if guidance > 1 else {}  # g <= 1 needs no null caption
    out = pipeline.SanaPipeline(model, params)(
        prompt_embeds=c["y"], prompt_mask=c["mask"], height=HEIGHT, width=WIDTH, resolution_binning=False,
        noise=c["noise"], method=method, steps=steps, flow_shift=3.0, guidance_scale=guidance, **negative)
    assert_close(f"sana_torch_ref {method} {steps} steps g={guidance}", nhwc(ref), out.latents, "sample_fp32")


def test_torch_ref_path_matches_sprint(tiny_sprint, captions, tmp_path):
    from sana_conversion import export_official
    from sana_torch_ref import load_official, sampling as ref_sampling

    model, params = tiny_sprint
    c = captions
    export_official(TINY_SPRINT, params, str(tmp_path / "sprint.safetensors"))
    ref_model = load_official(str(tmp_path / "sprint.safetensors"), TINY_SPRINT).eval()
    step_noise = np.random.default_rng(3).standard_normal((2, B, *LATENT, TINY.in_channels)).astype(np.float32)
    with torch.no_grad():
        velocity = ref_sampling.sprint_velocity(ref_model, torch.from_numpy(c["y"]), torch.from_numpy(c["mask"]))
        ref = ref_sampling.sample(velocity, nchw(c["noise"]), method="scm", steps=2,
                                  step_noise=torch.stack([nchw(z) for z in step_noise]))
    out = pipeline.SanaPipeline(model, params)(
        prompt_embeds=c["y"], prompt_mask=c["mask"], height=HEIGHT, width=WIDTH, resolution_binning=False,
        noise=c["noise"], step_noise=step_noise)
    assert_close("sana_torch_ref scm 2 steps", nhwc(ref), out.latents, "sample_fp32")


# --- seeds, per-prompt copies, decoding and binning ----------------------------------------------------------------

def test_seeds_are_reproducible(tiny, captions):
    model, params = tiny
    c = captions
    pipe = pipeline.SanaPipeline(model, params)
    kw = dict(prompt_embeds=c["y"], prompt_mask=c["mask"], negative_embeds=c["y_null"], height=HEIGHT, width=WIDTH,
              resolution_binning=False)
    a, b, other = (pipe(seed=seed, **kw).latents for seed in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, other)


def test_noise_of_image_i_depends_on_seed_and_index_only():
    """Image i draws from default_rng([seed, offset + i]): chunks of a long list equal one call; copies differ."""
    whole_start, whole_steps = pipeline.draw_noise(5, 0, 6, (4, 6, 8), 2)
    part_start, part_steps = pipeline.draw_noise(5, 2, 3, (4, 6, 8), 2)
    np.testing.assert_array_equal(whole_start[2:5], part_start)
    np.testing.assert_array_equal(whole_steps[:, 2:5], part_steps)
    assert not np.allclose(whole_start[0], whole_start[1])
    assert not np.allclose(whole_steps[0], whole_steps[1])
    np.testing.assert_array_equal(pipeline.draw_noise(5, 0, 6, (4, 6, 8))[0], whole_start)  # steps do not shift it
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        pipeline.draw_noise(-1, 0, 1, (2,))


def test_decoder_scaling_and_binning(tiny, captions):
    """Latents / scaling_factor reach the decoder; binning generates at the bin and resizes back to the request."""
    model, params = random_params(TINY.replace(sample_size=16))  # 512-px bins; sample_size only sets the table
    c = captions
    seen = {}

    def decoder(z):  # a stand-in DC-AE: nearest upsampling by 32 of the first 3 channels
        seen["z"] = z
        return jnp.tanh(jnp.repeat(jnp.repeat(z[..., :3], 32, axis=1), 32, axis=2))

    pipe = pipeline.SanaPipeline(model, params, decoder=decoder, scaling_factor=0.5)
    out = pipe(prompt_embeds=c["y"], prompt_mask=c["mask"], negative_embeds=c["y_null"], height=300, width=200,
               steps=2)
    assert out.size == (608, 416)  # aspect 1.5 -> the "1.46" bin of the 512 table
    assert out.latents.shape == (B, 19, 13, TINY.in_channels)
    assert_close("decoder input", out.latents / 0.5, seen["z"], "roundtrip")
    assert out.images.shape == (B, 300, 200, 3) and out.images.dtype == np.uint8
    expected = pipeline.to_uint8(pipeline.resize_and_crop(decoder(out.latents / 0.5), 300, 200))
    np.testing.assert_array_equal(out.images, expected)


def test_prompt_strings_go_through_the_prompt_encoder(tiny, captions):
    """Prompts are encoded with negative=False, the negative prompt alone with negative=True (no CHI)."""
    c = captions
    calls = []

    def encoder(prompts, *, negative=False):
        calls.append((list(prompts), negative))
        return (c["y_null"], c["mask_null"]) if negative else (c["y"][:len(prompts)], c["mask"][:len(prompts)])

    pipe = pipeline.SanaPipeline(*tiny, prompt_encoder=encoder)
    kw = dict(height=HEIGHT, width=WIDTH, resolution_binning=False)
    by_text = pipe(["a cat", "a dog"], negative_prompt="blurry", **kw).latents
    assert calls == [(["a cat", "a dog"], False), (["blurry"], True)]
    by_embeds = pipe(prompt_embeds=c["y"], prompt_mask=c["mask"], negative_embeds=c["y_null"], **kw).latents
    np.testing.assert_array_equal(by_text, by_embeds)


def test_gemma_prompt_encoder_matches_sana_jax_text(tmp_path):
    """CHI and select index for prompts, neither for the negative prompt (SANA and diffusers)."""
    from sana_jax import text

    tokenizer = text.load_tokenizer(save_tiny_tokenizer(tmp_path, list(text.SANA_CHI) + ["a red fox"]))
    encoder = text.Gemma2(text.TINY)
    params = sana_jax.perturb_params(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                            text.abstract_params(encoder)))
    encode = pipeline.gemma_prompt_encoder(encoder, params, tokenizer, max_length=8)
    for negative, prompts, chi in ((False, ["a red fox"], text.SANA_CHI), (True, [""], None)):
        emb, mask = encode(prompts, negative=negative)
        ref, ref_mask = text.encode_prompts(encoder, params, tokenizer, prompts, chi=chi, max_length=8)
        assert emb.shape == (1, 8, text.TINY.hidden_size)
        np.testing.assert_array_equal(emb, ref)
        np.testing.assert_array_equal(mask, ref_mask)
    assert int(encode([""], negative=True)[1].sum()) == 1  # "" -> BOS only


# --- data-parallel sharding on 8 simulated CPU devices -------------------------------------------------------------

SHARDING_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    import sana_jax
    from sana_jax import configs, pipeline
    assert len(jax.devices()) == 8, jax.devices()
    cfg = configs.TINY
    model = sana_jax.SanaTransformer(cfg)
    params = sana_jax.perturb_params(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                            sana_jax.abstract_params(model)))
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 12, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((3, 12), np.int32); mask[::2, 7:] = 0
    null = rng.standard_normal((1, 12, cfg.caption_channels)).astype(np.float32)
    decoder = lambda z: jnp.tanh(jnp.repeat(jnp.repeat(z[..., :3], 32, 1), 32, 2))
    # 3 prompts x 2 images = 6 images, padded to 8 on the mesh.
    kw = dict(prompt_embeds=y, prompt_mask=mask, negative_embeds=null, height=128, width=192,
              resolution_binning=False, steps=4, seed=3, num_images_per_prompt=2)
    single = pipeline.SanaPipeline(model, params, decoder=decoder)(**kw)
    mesh = jax.make_mesh((8,), ("data",))  # Explicit axis types by default: the pipeline must cope
    pipe = pipeline.SanaPipeline(model, params, decoder=decoder, mesh=mesh)
    sharded = pipe(**kw)
    # The Pallas kernels (interpreted here) run per device on the mesh too (sana_jax.model.on_batch_shards):
    # 8 images x 2 (CFG) over 8 devices = 2 rows per kernel launch.
    from sana_jax import model as model_lib
    rows, on_batch_shards = [], model_lib.on_batch_shards
    def spy(fn, batched, shared=()):
        def counted(*args):
            rows.append(args[0].shape[0])
            return fn(*args)
        return on_batch_shards(counted, batched, shared)
    model_lib.on_batch_shards = spy
    kernels = pipeline.SanaPipeline(sana_jax.SanaTransformer(cfg.replace(glu_impl="pallas", linear_attn_impl="pallas")),
                                    params, decoder=decoder, mesh=mesh)(**dict(kw, steps=2))
    single_2 = pipeline.SanaPipeline(model, params, decoder=decoder)(**dict(kw, steps=2))
    a, b = np.asarray(single.latents), np.asarray(sharded.latents)
    c, d = np.asarray(single_2.latents), np.asarray(kernels.latents)
    print(json.dumps({"rel": float(np.abs(a - b).max() / np.abs(a).max()),
                      "rel_kernels": float(np.abs(c - d).max() / np.abs(c).max()), "kernel_rows": sorted(set(rows)),
                      "images_equal": bool((single.images == sharded.images).all()),
                      "shape": list(b.shape),
                      "devices": len(sharded.latents.sharding.device_set),
                      "params_replicated": all(x.sharding.is_fully_replicated
                                               for x in jax.tree_util.tree_leaves(pipe.params))}))
""")


def test_batch_sharding_on_8_simulated_devices():
    """8 CPU devices (XLA_FLAGS set before jax is imported, hence a subprocess): the batch is padded to a multiple
    of the mesh, sharded over it, parameters replicated; latents and images equal the single-device run."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(report)
    assert report["shape"] == [6, *LATENT, TINY.in_channels]
    assert report["devices"] == 8 and report["params_replicated"]
    assert report["rel"] <= 1e-5 and report["images_equal"]
    assert report["rel_kernels"] <= 1e-5 and report["kernel_rows"] == [2]


# --- the CLI -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny, captions):
    from safetensors.numpy import save_file

    from sana_conversion import export_official

    folder = tmp_path_factory.mktemp("generate")
    export_official(TINY, tiny[1], str(folder / "tiny.safetensors"))
    # Three prompts: the third is the first with a longer mask, so chunking by 2 pads the last call.
    y = np.concatenate([captions["y"], captions["y"][:1]])
    mask = np.concatenate([captions["mask"], captions["mask"][1:]]).astype(np.int32)
    save_file({"prompt_embeds": y, "prompt_mask": mask, "negative_embeds": captions["y_null"]},
              str(folder / "embeds.safetensors"))
    return folder


@pytest.mark.parametrize("per_prompt,batch_size", [(2, 2), (1, 2)])
def test_generate_cli_writes_latents_without_vae(tiny_checkpoint, tiny, tmp_path, capsys, per_prompt, batch_size):
    """Chunked calls (image_offset; the last chunk padded to the same shape) equal direct pipeline calls."""
    from safetensors.numpy import load_file

    from sana_jax.cli import main

    folder = tiny_checkpoint
    code = main(["generate", "--checkpoint", str(folder / "tiny.safetensors"), "--config", "tiny",
                 "--prompt-embeds", str(folder / "embeds.safetensors"), "--height", str(HEIGHT), "--width",
                 str(WIDTH), "--no-binning", "--seed", "1", "--num-images-per-prompt", str(per_prompt),
                 "--batch-size", str(batch_size), "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0
    assert "images need --vae" in captured.err
    latents = load_file(str(tmp_path / "latents.safetensors"))["latents"]
    assert latents.shape == (3 * per_prompt, *LATENT, TINY.in_channels)
    embeds = load_file(str(folder / "embeds.safetensors"))
    pipe = pipeline.SanaPipeline(*tiny)
    prompts_per_call = batch_size // per_prompt
    for start in range(0, 3, prompts_per_call):
        index = np.minimum(np.arange(start, start + prompts_per_call), 2)
        out = pipe(prompt_embeds=embeds["prompt_embeds"][index], prompt_mask=embeds["prompt_mask"][index],
                   negative_embeds=embeds["negative_embeds"], height=HEIGHT, width=WIDTH, resolution_binning=False,
                   seed=1, num_images_per_prompt=per_prompt, image_offset=start * per_prompt)
        got = latents[start * per_prompt:(start + prompts_per_call) * per_prompt]
        np.testing.assert_array_equal(out.latents[:len(got)], got)


def test_generate_cli_writes_pngs_and_grid_with_vae(tiny_checkpoint, tmp_path):
    """A tiny DC-AE folder (diffusers layout, 8 latent channels like the tiny transformer, factor 4)."""
    dcae = pytest.importorskip("sana_jax.dcae")
    conv = pytest.importorskip("sana_conversion.dcae")
    from PIL import Image
    from safetensors.numpy import load_file, save_file

    from sana_jax.cli import main

    vae_cfg = dcae.TINY.replace(latent_channels=TINY.in_channels)
    vae = dcae.DCAE(vae_cfg)
    vae_params = sana_jax.perturb_params(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                                dcae.abstract_params(vae)))
    vae_dir = tmp_path / "vae"
    vae_dir.mkdir()
    (vae_dir / "config.json").write_text(json.dumps(conv.diffusers_config(vae_cfg)))
    save_file({k: np.ascontiguousarray(v) for k, v in conv.jax_to_diffusers(vae_params, vae_cfg).items()},
              str(vae_dir / "diffusion_pytorch_model.safetensors"))
    f = vae_cfg.spatial_compression
    out = tmp_path / "out"
    code = main(["generate", "--checkpoint", str(tiny_checkpoint / "tiny.safetensors"), "--config", "tiny",
                 "--prompt-embeds", str(tiny_checkpoint / "embeds.safetensors"), "--vae", str(vae_dir),
                 "--height", str(LATENT[0] * f), "--width", str(LATENT[1] * f), "--no-binning", "--batch-size", "2",
                 "--out", str(out)])
    assert code == 0
    for name in ("0000.png", "0001.png", "0002.png", "grid.png", "latents.safetensors"):
        assert (out / name).exists(), name
    latents = load_file(str(out / "latents.safetensors"))["latents"][:2]
    decoded = pipeline.to_uint8(pipeline.dcae_decoder(vae, vae_params)(latents / vae_cfg.scaling_factor))
    np.testing.assert_array_equal(np.asarray(Image.open(out / "0001.png")), decoded[1])
    assert Image.open(out / "grid.png").size == (2 * LATENT[1] * f + 2, 2 * LATENT[0] * f + 2)  # 2 x 2 grid


def test_generate_cli_errors(tiny_checkpoint, tmp_path):
    from sana_jax.cli import main

    with pytest.raises(SystemExit, match="--prompt needs --text-encoder"):
        main(["generate", "--checkpoint", str(tiny_checkpoint / "tiny.safetensors"), "--prompt", "a cat"])
    with pytest.raises(SystemExit, match="pass --no-binning"):  # tiny's sample_size has no bin table
        main(["generate", "--checkpoint", str(tiny_checkpoint / "tiny.safetensors"), "--config", "tiny",
              "--prompt-embeds", str(tiny_checkpoint / "embeds.safetensors"), "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="no such file"):
        main(["generate", "--checkpoint", str(tiny_checkpoint / "tiny.safetensors"), "--config", "tiny",
              "--prompt-embeds", str(tmp_path / "missing.safetensors")])


# --- clear errors --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"height": 100, "resolution_binning": False}, "multiples of 32"),
    ({"height": 0}, "height must be a positive integer"),
    ({"steps": 0}, "steps must be an integer >= 1"),
    ({"method": "euler"}, "unknown method 'euler'"),
    ({"prompt_embeds": np.zeros((2, L, 7), np.float32)}, r"prompt_embeds must be \[B, L, 24\]"),
    ({"prompt_mask": np.ones((2, L + 1))}, r"prompt_mask must be \[B, L\] = \(2, 12\)"),
    ({"negative_embeds": np.zeros((1, L - 1, 24), np.float32)}, r"negative_embeds must be \[1 or 2, 12, 24\]"),
    ({"negative_embeds": None}, "needs the null caption"),
    ({"prompt": "a cat", "prompt_embeds": None}, "need a prompt_encoder"),
    ({"prompt": "a cat"}, "exactly one of prompt"),
    ({"resolution_binning": True}, "no aspect-ratio bins for sample_size 8"),
    ({"uncond_mask": "none"}, "uncond_mask must be"),
    ({"uncond_mask": "negative"}, "needs negative_mask"),
    ({"noise": np.zeros((2, 4, 4, 8))}, r"noise must be \[B, h, w, C\]"),
    ({"num_images_per_prompt": 0}, "num_images_per_prompt must be"),
])
def test_errors(tiny, captions, kwargs, match):
    model, params = tiny
    base = dict(prompt_embeds=captions["y"], prompt_mask=captions["mask"], negative_embeds=captions["y_null"],
                height=HEIGHT, width=WIDTH, resolution_binning=False)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        pipeline.SanaPipeline(model, params)(**base)
