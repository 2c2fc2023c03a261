"""sana_conversion: bit-exact round trips, the golden fixtures, diffusers export parity, load_pretrained on every
format, config inference for every released variant (shapes only), and bad input that must fail cleanly."""

import json
import os
import stat

import numpy as np
import pytest

import sana_conversion as sc
import sana_jax
from sana_conversion import diffusers as sdiff
from sana_conversion import load, official
from sana_conversion._files import read_safetensors
from sana_conversion._tree import flatten, jax_shapes, unflatten
from sana_jax import configs
from tests.helpers import assert_close

TINY = configs.TINY
SPRINT_FLAGS = dict(qk_norm=True, cross_norm=True, guidance_embeds=True, logvar=True)
CONFIGS = {
    "tiny": TINY,
    "qk_norm": TINY.replace(qk_norm=True),
    "cross_norm": TINY.replace(cross_norm=True),
    "qk_cross_norm": TINY.replace(qk_norm=True, cross_norm=True),
    "sprint": TINY.replace(**SPRINT_FLAGS),
    "patch2": TINY.replace(patch_size=2),
    "pe": TINY.replace(use_pe=True, pe_interpolation=2.0),
}
# diffusers' one qk_norm switch covers self- and cross-attention: only configs with qk_norm == cross_norm.
DIFFUSERS_CONFIGS = ["tiny", "qk_cross_norm", "sprint", "patch2", "pe"]
FIXTURES = {
    "a": ("official_a_sana_ms.safetensors", {}),
    "b": ("official_b_sana_ms_qknorm.safetensors", dict(qk_norm=True, cross_norm=True)),
    "c": ("official_c_sana_ms_sincos_pe.safetensors", dict(use_pe=True)),
    "d": ("official_d_sana_sprint.safetensors", SPRINT_FLAGS),
}


def random_params(cfg, seed=0):
    """Every leaf random (nothing left at an init value that a wrong mapping could reproduce by accident).

    Matrices and conv kernels ~ N(0, 0.1), vectors ~ N(0, 0.3), RMSNorm scales 1 + N(0, 0.3): about the scale of
    trained / fixture weights. Much larger weights amplify fp32 rounding that no implementation controls (one ulp
    of a sinusoid frequency is ~6e-5 rad of phase at t = 937) past the tiny_fp32 tolerance.
    """
    rng = np.random.default_rng(seed)
    flat = {}
    for path, shape in jax_shapes(cfg).items():
        per_block = shape[1:] if path.startswith("blocks/") else shape
        noise = rng.normal(0.0, 0.1 if len(per_block) >= 2 else 0.3, shape).astype(np.float32)
        flat[path] = noise + 1.0 if path.endswith("/weight") else noise
    return unflatten(flat)


def assert_same_arrays(ref: dict, out: dict):
    """Same key set, dtypes and bytes."""
    assert set(ref) == set(out), (sorted(set(ref) ^ set(out)))
    for key in ref:
        assert out[key].dtype == ref[key].dtype, (key, out[key].dtype, ref[key].dtype)
        assert out[key].shape == ref[key].shape and out[key].tobytes() == ref[key].tobytes(), key


def assert_same_params(ref, out):
    assert_same_arrays({k: np.asarray(v) for k, v in flatten(ref).items()},
                       {k: np.asarray(v) for k, v in flatten(out).items()})


def read_fixture(fixtures_dir, name):
    tensors, metadata = read_safetensors(os.path.join(fixtures_dir, FIXTURES[name][0]))
    state_dict = {k[len("state_dict."):]: v for k, v in tensors.items() if k.startswith("state_dict.")}
    return state_dict, tensors, metadata


def fixture_config(name):
    return TINY.replace(**FIXTURES[name][1])


def listing(path):
    return sorted(os.listdir(path))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_official_roundtrip(name):
    cfg = CONFIGS[name]
    params = random_params(cfg)
    state_dict = sc.jax_to_official(params, cfg)
    assert set(state_dict) == set(official.official_shapes(cfg))
    back = sc.official_to_jax(state_dict, cfg)
    assert_same_params(params, back)
    assert_same_arrays(state_dict, sc.jax_to_official(back, cfg))


@pytest.mark.parametrize("name", DIFFUSERS_CONFIGS)
def test_diffusers_roundtrip(name):
    cfg = CONFIGS[name].replace(logvar=False)  # diffusers has no logvar head
    params = random_params(cfg)
    state_dict = sc.jax_to_diffusers(params, cfg)
    assert {k: v.shape for k, v in state_dict.items()} == sdiff.diffusers_shapes(cfg)
    back = sc.diffusers_to_jax(state_dict, cfg)
    assert_same_params(params, back)
    assert_same_arrays(state_dict, sc.jax_to_diffusers(back, cfg))


def test_diffusers_export_drops_logvar():
    cfg = CONFIGS["sprint"]
    state_dict = sc.jax_to_diffusers(random_params(cfg), cfg)
    assert not any("logvar" in key for key in state_dict)
    assert "time_embed.timestep_embedder.linear_1.weight" in state_dict  # Sprint: no `emb.` level
    with pytest.raises(ValueError, match="logvar"):
        sc.diffusers_to_jax(state_dict, cfg)


def test_fp16_and_bf16_checkpoints_upcast_exactly(tmp_path):
    import torch
    from safetensors.torch import save_file

    cfg = CONFIGS["qk_cross_norm"]
    state_dict = sc.jax_to_official(random_params(cfg), cfg)
    half = {k: v.astype(np.float16) for k, v in state_dict.items()}
    params = sc.official_to_jax(half, cfg)
    assert_same_arrays({k: v.astype(np.float32) for k, v in half.items()}, sc.jax_to_official(params, cfg))

    bf16 = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state_dict.items()}
    save_file(bf16, str(tmp_path / "bf16.safetensors"))
    read = sc.read_official(str(tmp_path / "bf16.safetensors"))
    want = {k: v.float().numpy() for k, v in bf16.items()}
    assert_same_arrays(want, read)
    assert_same_arrays(want, sc.jax_to_official(sc.official_to_jax(bf16, cfg), cfg))  # torch bf16 input


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_roundtrip_and_inference(fixtures_dir, name):
    state_dict, _, metadata = read_fixture(fixtures_dir, name)
    cfg = fixture_config(name)
    shapes = {k: v.shape for k, v in state_dict.items()}
    fields = load.shape_fields(shapes)
    original = json.loads(metadata["config_json"])
    assert fields["qk_norm"] == original["qk_norm"] and fields["cross_norm"] == original["cross_norm"]
    assert fields["guidance_embeds"] == original["cfg_embed"] and fields["logvar"] == original["logvar"]
    assert (fields["hidden_size"], fields["depth"], fields["patch_size"]) == (64, 2, 1)
    assert (fields["in_channels"], fields["out_channels"], fields["caption_channels"]) == (8, 8, 24)
    assert (fields["ffn_hidden"], fields["sample_size"], fields["model_max_length"]) == (160, 8, 12)

    # D=64 is no released width: the cross-attention head count must come from config=.
    with pytest.raises(ValueError, match=r"cross-attention head count.*config="):
        sc.infer_config_from_shapes(shapes)
    assert sc.infer_config_from_shapes(shapes, config=cfg) is cfg
    wrong = cfg.replace(qk_norm=not cfg.qk_norm)
    with pytest.raises(ValueError, match="qk_norm: config"):
        sc.infer_config_from_shapes(shapes, config=wrong)

    params = sc.official_to_jax(state_dict, cfg)
    expected = {k: v for k, v in state_dict.items() if k not in official.IGNORED_BUFFERS}
    assert_same_arrays(expected, sc.jax_to_official(params, cfg))


@pytest.mark.parametrize("name", list(FIXTURES))
def test_fixture_forward(fixtures_dir, name):
    """The converted fixture weights reproduce the original model's output (checks every transpose)."""
    state_dict, tensors, _ = read_fixture(fixtures_dir, name)
    cfg = fixture_config(name)
    model = sana_jax.SanaTransformer(cfg)
    params = sc.official_to_jax(state_dict, cfg)
    x = tensors["input.x"].transpose(0, 2, 3, 1)  # NCHW -> NHWC
    y, mask, timestep = tensors["input.y"][:, 0], tensors["input.mask"], tensors["input.timestep"]
    if not cfg.guidance_embeds:
        out = model.apply({"params": params}, x, timestep, y, mask)
    else:  # SanaMSCM's TrigFlow wrapper around the flow model (fixtures/README.md, case d)
        s = timestep.astype(np.float64)
        t = (np.sin(s) / (np.sin(s) + np.cos(s)))[:, None, None, None]
        norm = np.sqrt(t ** 2 + (1 - t) ** 2)
        x_in = (x * norm).astype(np.float32)
        v = np.asarray(model.apply({"params": params}, x_in, t[:, 0, 0, 0].astype(np.float32), y, mask,
                                   guidance=tensors["input.guidance"]))
        out = ((1 - 2 * t) * x_in + (1 - 2 * t + 2 * t ** 2) * v) / norm
    assert_close(f"fixture {name} output", tensors["output"].transpose(0, 2, 3, 1), out, "fixture_fp32")


@pytest.mark.parametrize("name", DIFFUSERS_CONFIGS)
def test_export_diffusers_matches_jax(tmp_path, name):
    import torch
    from diffusers import SanaTransformer2DModel

    cfg = CONFIGS[name]
    params = random_params(cfg, seed=1)
    out_dir = tmp_path / "transformer"
    sc.export_diffusers(cfg, params, str(out_dir))
    assert listing(out_dir) == ["config.json", "diffusion_pytorch_model.safetensors"]
    model = SanaTransformer2DModel.from_pretrained(str(out_dir)).eval()

    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 6, 10, cfg.in_channels)).astype(np.float32)  # non-square grid on purpose
    y = rng.normal(size=(2, 12, cfg.caption_channels)).astype(np.float32)
    mask = np.ones((2, 12), np.float32)
    mask[1, 5:] = 0
    timestep = np.array([0.8, 0.3] if cfg.guidance_embeds else [937.0, 3.0], np.float32)
    guidance = np.array([4.5, 3.0], np.float32) if cfg.guidance_embeds else None
    with torch.no_grad():
        ref = model(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(y), torch.from_numpy(timestep),
                    # diffusers embeds guidance as given; the pipeline scales it, sana_jax scales inside.
                    guidance=None if guidance is None else torch.from_numpy(guidance * cfg.guidance_embeds_scale),
                    encoder_attention_mask=torch.from_numpy(mask)).sample.numpy().transpose(0, 2, 3, 1)
    # diffusers' hard-coded eps (LiteLA 1e-15, cross q/k RMSNorm 1e-5) for exact numerics.
    jax_cfg = cfg.replace(linear_attn_eps=1e-15, cross_norm_eps=1e-5)
    out = sana_jax.SanaTransformer(jax_cfg).apply({"params": params}, x, timestep, y, mask, guidance=guidance)
    assert_close(f"diffusers export {name}", ref, out, "tiny_fp32")


@pytest.mark.parametrize("name", [cfg.name for cfg in load._RELEASED])
def test_infer_config_released_variants(name):
    """Shapes only (official_shapes runs jax_to_official's code on zero-stride stand-ins): no weights."""
    cfg = configs.get(name)
    shapes = official.official_shapes(cfg)
    shapes["pos_embed"] = (1, (cfg.sample_size // cfg.patch_size) ** 2, cfg.hidden_size)
    shapes["y_embedder.y_embedding"] = (cfg.model_max_length, cfg.caption_channels)
    assert sc.infer_config_from_shapes(shapes) == cfg
    # A released width at an unreleased depth (e.g. a pruned SANA-1.5) still gets its cross heads.
    pruned = sc.infer_config_from_shapes(official.official_shapes(cfg.replace(depth=4)))
    assert (pruned.name, pruned.depth, pruned.num_cross_heads) == ("inferred", 4, cfg.num_cross_heads)


def test_infer_config_checks_given_config():
    shapes = official.official_shapes(configs.SANA_1600M)
    without_pe = sc.infer_config_from_shapes(shapes)
    assert without_pe == configs.SANA_1600M  # no pos_embed hint: the 1K (no PE) release
    with pytest.raises(ValueError, match="hidden_size: config 1152, checkpoint 2240"):
        sc.infer_config_from_shapes(shapes, config=configs.SANA_600M)
    assert sc.infer_config_from_shapes(shapes, config=configs.SANA_1600M_2K) is configs.SANA_1600M_2K


# Exact counts of diffusers' own models (reference/diffusers.md section 8): checks diffusers_shapes.
DIFFUSERS_PARAM_COUNTS = {"sana_600m": 591_747_872, "sana_1600m": 1_604_462_752, "sana_1600m_4k": 1_604_462_752,
                          "sana15_1600m": 1_604_641_952, "sana15_4800m": 4_721_825_952,
                          "sana_sprint_600m": 593_501_216, "sana_sprint_1600m": 1_610_237_472}


@pytest.mark.parametrize("name", [cfg.name for cfg in load._RELEASED])
def test_diffusers_config_released_variants(name):
    cfg = configs.get(name)
    config_json = sc.diffusers_config(cfg)
    back = sc.config_from_diffusers(config_json, name=cfg.name, flow_shift=cfg.flow_shift)
    assert back == cfg.replace(logvar=False)
    if name in DIFFUSERS_PARAM_COUNTS:
        count = sum(int(np.prod(s)) for s in sdiff.diffusers_shapes(cfg.replace(logvar=False)).values())
        assert count == DIFFUSERS_PARAM_COUNTS[name]
    if name == "sana_1600m":  # diffusers' constructor defaults are the 1.6B model
        assert {k: v for k, v in config_json.items() if not k.startswith("_")} == sdiff._DIFFUSERS_DEFAULTS


def test_diffusers_config_rejects():
    with pytest.raises(ValueError, match="qk_norm=True but cross_norm=False"):
        sc.diffusers_config(CONFIGS["qk_norm"])
    config_json = sc.diffusers_config(TINY)
    with pytest.raises(ValueError, match="attention_bias"):
        sc.config_from_diffusers({**config_json, "attention_bias": True})
    with pytest.raises(ValueError, match="not_a_field"):
        sc.config_from_diffusers({**config_json, "not_a_field": 1})
    with pytest.raises(ValueError, match="AutoencoderDC"):
        sc.config_from_diffusers({**config_json, "_class_name": "AutoencoderDC"})


def test_load_pretrained_formats(tmp_path, fixtures_dir):
    import torch

    state_dict, _, _ = read_fixture(fixtures_dir, "b")  # with the pos_embed / y_embedding buffers
    cfg = fixture_config("b")
    params = sc.official_to_jax(state_dict, cfg)

    def check(path, config=None, want_cfg=cfg, want=params, **kw):
        model, loaded = sc.load_pretrained(str(path), config=config, **kw)
        assert isinstance(model, sana_jax.SanaTransformer) and model.config == want_cfg
        assert_same_params(want, loaded)

    # official .safetensors / .pth as exported, and the raw fixture state_dict (buffers present and ignored)
    sc.export_official(cfg, params, str(tmp_path / "official.safetensors"))
    sc.export_official(cfg, params, str(tmp_path / "official.pth"))
    torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, tmp_path / "raw.pth")
    for path in ("official.safetensors", "official.pth", "raw.pth"):
        check(tmp_path / path, config=cfg)
        with pytest.raises(ValueError, match=f"{path}.*cross-attention head count"):
            sc.load_pretrained(str(tmp_path / path))
    # sana_jax.load_pretrained is the same loader
    _, loaded = sana_jax.load_pretrained(str(tmp_path / "official.pth"), config=cfg)
    assert_same_params(params, loaded)

    # training checkpoint: DDP prefix, EMA weights picked by ema=True
    ema = sc.official_to_jax({k: v + 1 for k, v in state_dict.items()}, cfg)
    torch.save({"state_dict": {f"module.{k}": torch.from_numpy(v) for k, v in state_dict.items()},
                "state_dict_ema": {f"module.{k}": torch.from_numpy(v + 1) for k, v in state_dict.items()},
                "epoch": 3}, tmp_path / "train.pth")
    check(tmp_path / "train.pth", config=cfg)
    check(tmp_path / "train.pth", config=cfg, want=ema, ema=True)
    with pytest.raises(ValueError, match="state_dict_ema"):
        sc.load_pretrained(str(tmp_path / "official.pth"), config=cfg, ema=True)

    # diffusers folder: config from config.json
    diff_cfg = sc.config_from_diffusers(sc.diffusers_config(cfg))
    sc.export_diffusers(cfg, params, str(tmp_path / "diffusers"))
    check(tmp_path / "diffusers", want_cfg=diff_cfg)

    # sharded diffusers folder inside a pipeline folder (transformer/)
    tensors, _ = read_safetensors(str(tmp_path / "diffusers" / "diffusion_pytorch_model.safetensors"))
    shard_dir = tmp_path / "pipeline" / "transformer"
    shard_dir.mkdir(parents=True)
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps({"_class_name": "SanaPipeline"}))
    (shard_dir / "config.json").write_text((tmp_path / "diffusers" / "config.json").read_text())
    from safetensors.numpy import save_file
    keys = sorted(tensors)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(shard_dir / shard))
        weight_map.update({k: shard for k in part})
    (shard_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    check(tmp_path / "pipeline", want_cfg=diff_cfg)
    check(shard_dir, want_cfg=diff_cfg)

    # sana-jax folder: the config comes back exactly
    sc.save_params(cfg, params, str(tmp_path / "native"))
    assert listing(tmp_path / "native") == ["params.safetensors", "sana_config.json"]
    check(tmp_path / "native", want_cfg=cfg)
    bf16 = cfg.replace(compute_dtype="bfloat16")
    check(tmp_path / "native", config=bf16, want_cfg=bf16)
    with pytest.raises(ValueError, match="blocks/attn/q_norm/weight"):
        sc.load_pretrained(str(tmp_path / "native"), config=TINY)


def convert_to_diffusers(src, dst, config):
    """What a `convert` command does: load anything, export a diffusers folder."""
    model, params = sc.load_pretrained(str(src), config=config)
    sc.export_diffusers(model.config, params, str(dst))


def test_bad_official_state_dicts():
    cfg = CONFIGS["qk_cross_norm"]
    good = sc.jax_to_official(random_params(cfg), cfg)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): blocks.0.attn.extra.weight"):
        sc.official_to_jax({**good, "blocks.0.attn.extra.weight": good["attention_y_norm.weight"]}, cfg)
    with pytest.raises(ValueError, match=r"missing 1 key\(s\): blocks.1.attn.proj.bias"):
        sc.official_to_jax({k: v for k, v in good.items() if k != "blocks.1.attn.proj.bias"}, cfg)
    with pytest.raises(ValueError, match=r"'blocks.1.attn.qkv.weight': expected shape \(192, 64\), got \(64, 192\)"):
        sc.official_to_jax({**good, "blocks.1.attn.qkv.weight": good["blocks.1.attn.qkv.weight"].T}, cfg)
    with pytest.raises(ValueError, match="'t_block.1.bias': dtype int64"):
        sc.official_to_jax({**good, "t_block.1.bias": np.zeros(384, np.int64)}, cfg)
    with pytest.raises(ValueError, match=r"missing .*blocks.0.attn.q_norm.weight"):  # qk_norm config, 1.0 weights
        sc.official_to_jax(sc.jax_to_official(random_params(TINY), TINY), cfg)
    with pytest.raises(ValueError, match=r"JAX params .* missing 1 key\(s\): t_block/bias"):
        params = flatten(random_params(cfg))
        del params["t_block/bias"]
        sc.jax_to_official(unflatten(params), cfg)


def test_bad_diffusers_state_dicts():
    cfg = CONFIGS["qk_cross_norm"]
    good = sc.jax_to_diffusers(random_params(cfg), cfg)
    key = "transformer_blocks.1.attn2.to_v.weight"
    with pytest.raises(ValueError, match=rf"'{key}': expected shape \(64, 64\), got \(64, 32\)"):
        sc.diffusers_to_jax({**good, key: good[key][:, :32]}, cfg)
    with pytest.raises(ValueError, match=rf"missing 1 key\(s\): {key}"):
        sc.diffusers_to_jax({k: v for k, v in good.items() if k != key}, cfg)
    with pytest.raises(ValueError, match=r"unexpected 1 key\(s\): transformer_blocks.2.scale_shift_table"):
        sc.diffusers_to_jax({**good, "transformer_blocks.2.scale_shift_table": np.zeros((6, 64), np.float32)}, cfg)


class NotAWeight:
    """A custom class: pickling it makes a file torch.load(weights_only=True) must refuse."""


def test_bad_files_write_nothing(tmp_path):
    import torch

    cfg = CONFIGS["tiny"]
    params = random_params(cfg)
    sc.export_official(cfg, params, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) - 100])
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00" * 50)
    torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in sc.jax_to_official(params, cfg).items()},
                "extra": NotAWeight()}, tmp_path / "unsafe.pth")
    sc.export_official(cfg, params, str(tmp_path / "good.pth"))
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "good.pth").read_bytes()[:1000])
    cases = {"truncated.safetensors": "not a readable safetensors file",
             "garbage.safetensors": "not a readable safetensors file",
             "unsafe.pth": "weights_only", "truncated.pth": "not a readable torch checkpoint"}
    before = listing(tmp_path)
    for name, message in cases.items():
        path = str(tmp_path / name)
        with pytest.raises(ValueError, match=message) as err:
            convert_to_diffusers(path, tmp_path / "out", cfg)
        assert path in str(err.value)
        assert listing(tmp_path) == before  # no output, no temporary leftovers
    with pytest.raises(FileNotFoundError):
        sc.load_pretrained(str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="not a checkpoint folder"):
        sc.load_pretrained(str(tmp_path))


def test_export_errors_write_nothing(tmp_path, monkeypatch):
    cfg = CONFIGS["qk_cross_norm"]
    params = random_params(cfg)
    bad = flatten(params)
    bad["blocks/attn/qkv/kernel"] = bad["blocks/attn/qkv/kernel"][:, :, :64]
    bad = unflatten(bad)
    for export, out in ((sc.export_diffusers, "d"), (sc.export_official, "o.safetensors"),
                        (sc.export_official, "o.pth"), (sc.save_params, "n")):
        with pytest.raises(ValueError, match=r"'blocks/attn/qkv/kernel': expected shape \(2, 64, 192\), got"):
            export(cfg, bad, str(tmp_path / out))
    with pytest.raises(ValueError, match="cross_norm"):
        sc.export_diffusers(CONFIGS["qk_norm"], random_params(CONFIGS["qk_norm"]), str(tmp_path / "d"))
    with pytest.raises(ValueError, match="suffix"):
        sc.export_official(cfg, params, str(tmp_path / "o.npz"))
    assert listing(tmp_path) == []

    # A failure in the middle of writing (disk full, killed...) leaves neither the target nor temporaries.
    def failing_write(path, tensors, metadata):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(sdiff, "write_safetensors", failing_write)
    with pytest.raises(OSError, match="disk full"):
        sc.export_diffusers(cfg, params, str(tmp_path / "d"))
    assert listing(tmp_path) == []
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"):
        sc.export_diffusers(cfg, params, str(tmp_path / "d"), overwrite=True)
    assert listing(tmp_path) == ["d"] and listing(tmp_path / "d") == ["keep.txt"]


def test_export_refuses_to_overwrite(tmp_path):
    cfg = CONFIGS["tiny"]
    params = random_params(cfg)
    out = tmp_path / "out"
    out.mkdir()
    sc.export_diffusers(cfg, params, str(out))  # an existing empty folder is fine
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sc.export_diffusers(cfg, params, str(out))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sc.save_params(cfg, params, str(out))
    assert "notes.txt" in listing(out)
    sc.export_diffusers(cfg, params, str(out), overwrite=True)
    assert listing(out) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert listing(tmp_path) == ["out"]  # the old folder, moved aside, is gone

    sc.export_official(cfg, params, str(tmp_path / "w.safetensors"))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        sc.export_official(cfg, params, str(tmp_path / "w.safetensors"))
    sc.export_official(cfg, params, str(tmp_path / "w.safetensors"), overwrite=True)

    # Outputs get the permissions of any new file (a private temporary mode must not leak into them).
    def mode(path):
        return stat.S_IMODE(os.stat(path).st_mode)

    (tmp_path / "probe").write_text("")
    (tmp_path / "probe_dir").mkdir()
    assert mode(tmp_path / "w.safetensors") == mode(out / "config.json") == mode(tmp_path / "probe")
    assert mode(out) == mode(tmp_path / "probe_dir")
