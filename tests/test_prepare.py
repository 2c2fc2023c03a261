"""sana-jax prepare: an image folder -> the training cache, against an independent encoding of every image and
caption; resume after an interruption; the multi-host split; errors that name the file; the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

import sana_jax
from sana_jax import dcae, text
from sana_jax.cli import main
from sana_jax.train import prepare
from sana_jax.train.data import RECORD_KEY, Example, Loader, read_shard_captions, read_shard_header, write_cache
from tests.helpers import assert_close, save_tiny_tokenizer

# A DC-AE with SANA's f = 32 (6 narrow stages, one block in each but the first), so the 512 px buckets encode in
# milliseconds.
VAE = dcae.TINY.replace(
    name="prepare_f32", encoder_block_types=("ResBlock",) * 4 + ("EfficientViTBlock",) * 2,
    decoder_block_types=("ResBlock",) * 6, encoder_block_out_channels=(4, 8, 8, 16, 16, 16),
    decoder_block_out_channels=(4, 8, 8, 16, 16, 16), encoder_layers_per_block=(0, 1, 1, 1, 1, 1),
    decoder_layers_per_block=(0, 0, 0, 0, 0, 1), encoder_qkv_multiscales=((),) * 5 + ((3,),),
    decoder_qkv_multiscales=((),) * 6, decoder_norm_types=("rms_norm",) * 6, decoder_act_fns=("silu",) * 6)
MAX_LENGTH = 12
# name -> (height, width, PIL mode, caption file text, bucket at 512 px by hand: nearest key of height / width).
IMAGES = {
    "a.png": (300, 300, "RGB", "a red fox\nsecond line is ignored", (512, 512)),  # 1.0
    "b.jpg": (240, 500, "RGB", "  a blue cat  ", (352, 736)),  # 0.48
    "c.png": (40, 41, "RGBA", "a green dog", (512, 512)),  # 0.976 -> 1.0 (not 0.94), upscaled 12x
    "sub/d.webp": (230, 480, "RGB", "a red cat", (352, 736)),  # 0.479 -> 0.48
    "e.PNG": (512, 500, "L", "", (512, 512)),  # 1.024 -> 1.0 (not 1.07); empty caption file
}
KW = dict(resolution=512, batch_size=2, shard_size=3, max_length=MAX_LENGTH, progress=False)
# sorted by bucket, then path: shard 0 = the 352 x 736 bucket (one batch), shard 1 = 512 x 512 (two, one padded).
SHARDS = [["b.jpg", "sub/d.webp"], ["a.png", "c.png", "e.PNG"]]


def write_images(folder, names=IMAGES):
    rng = np.random.default_rng(0)
    for name in names:
        h, w, mode, caption, _ = IMAGES[name]
        path = os.path.join(folder, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        yy, xx = np.mgrid[:h, :w]  # smooth gradients + noise: resampling differences show
        rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1) + rng.normal(0, 20, (h, w, 3))
        image = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
        if mode == "RGBA":
            image.putalpha(Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)))
        image.convert(mode).save(path, **({"lossless": True} if name.endswith(".webp") else {}))
        with open(os.path.splitext(path)[0] + ".txt", "w") as f:
            f.write(caption)
    return str(folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    vae = dcae.DCAE(VAE)
    vae_params = sana_jax.perturb_params(dcae.init_params(vae, jax.random.key(0)))
    encoder = text.Gemma2(text.TINY)
    encoder_params = sana_jax.perturb_params(jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                                    text.abstract_params(encoder)), seed=1)
    corpus = list(text.SANA_CHI) + [entry[3] for entry in IMAGES.values()]
    tokenizer_dir = save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpus)
    return vae, vae_params, encoder, encoder_params, text.load_tokenizer(tokenizer_dir), tokenizer_dir


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, models, image_dir):
    """One uninterrupted run: (out folder, result)."""
    out = str(tmp_path_factory.mktemp("baseline") / "cache")
    return out, prepare.prepare_cache(image_dir, out, *models[:5], **KW)


def folder_bytes(folder) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def sana_transform(path, bucket) -> np.ndarray:
    """SANA's T.Resize(resize_size, BICUBIC) + T.CenterCrop + ToTensor + Normalize(0.5, 0.5), written out here."""
    image = Image.open(path).convert("RGB")
    (height, width), (h, w) = bucket, (image.height, image.width)
    resize = (height, int(w * height / h)) if height / h > width / w else (int(h * width / w), width)
    image = image.resize(resize[::-1], Image.Resampling.BICUBIC)
    top, left = int(round((resize[0] - height) / 2.0)), int(round((resize[1] - width) / 2.0))
    crop = np.asarray(image.crop((left, top, left + width, top + height)), np.float32) / 255
    return (crop - 0.5) / 0.5


def read_shard(path):
    """(tensors, record): the record is the file's one metadata entry, parsed."""
    with safe_open(path, framework="np") as f:
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    return tensors, read_shard_header(path)[0]


def test_cache_matches_independent_encoding(baseline, models, image_dir):
    out, result = baseline
    vae, vae_params, encoder, encoder_params, tokenizer, _ = models
    assert result.written == ["shard-00000.safetensors", "shard-00001.safetensors"] and not result.skipped
    assert result.images_encoded == len(IMAGES)
    index = result.index
    assert json.load(open(os.path.join(out, "index.json"))) == json.loads(json.dumps(index))
    assert (index["latent_channels"], index["caption_channels"], index["max_length"]) == (4, 40, MAX_LENGTH)
    assert index["scaling_factor"] == VAE.scaling_factor
    assert [(s["file"], s["count"], s["latent_hw"]) for s in index["shards"]] == [
        ("shard-00000.safetensors", 2, [11, 23]), ("shard-00001.safetensors", 3, [16, 16])]
    encode = jax.jit(lambda x: vae.apply({"params": vae_params}, x, method="encode"))
    for shard, names in zip(index["shards"], SHARDS):
        tensors, record = read_shard(os.path.join(out, shard["file"]))
        captions = [IMAGES[n][3].splitlines()[0].strip() if IMAGES[n][3] else "" for n in names]
        assert record["captions"] == read_shard_captions(os.path.join(out, shard["file"])) == captions
        assert record["images"] == names and record["settings"] == index["prepare"]
        for i, name in enumerate(names):
            image = sana_transform(os.path.join(image_dir, name), IMAGES[name][4])
            latent = np.asarray(encode(image[None]))[0] * VAE.scaling_factor
            assert_close(f"latents[{name}]", latent, tensors["latents"][i], "prepare_fp32")
        y, mask = text.encode_prompts(encoder, encoder_params, tokenizer, captions, max_length=MAX_LENGTH)
        assert_close(f"y[{shard['file']}]", y, tensors["y"], "prepare_fp32")
        np.testing.assert_array_equal(mask, tensors["mask"])
        assert tensors["latents"].dtype == tensors["y"].dtype == np.float32 and tensors["mask"].dtype == np.int32
    null_y, null_mask = text.encode_prompts(encoder, encoder_params, tokenizer, [""], chi=None,
                                            max_length=MAX_LENGTH)
    null, null_record = read_shard(os.path.join(out, "null.safetensors"))
    assert null_record == {"settings": index["prepare"]}
    assert_close("null y", null_y[0], null["y"], "prepare_fp32")
    np.testing.assert_array_equal(null_mask[0], null["mask"])
    batch = Loader(out, 2, seed=0).batch(0)  # the trainer's loader reads it
    assert batch["x0"].shape in {(2, 11, 23, 4), (2, 16, 16, 4)} and batch["null_y"].shape == (MAX_LENGTH, 40)


def test_resume_is_byte_identical_and_skips_finished_shards(baseline, models, image_dir, tmp_path, monkeypatch):
    out = str(tmp_path / "cache")
    encoded = []
    encode = prepare._encode_latents
    monkeypatch.setattr(prepare, "_encode_latents", lambda vae, p, x: encoded.append(len(x)) or encode(vae, p, x))

    def interrupt(name):
        raise KeyboardInterrupt(name)

    with pytest.raises(KeyboardInterrupt, match="shard-00000"):
        prepare.prepare_cache(image_dir, out, *models[:5], on_shard=interrupt, **KW)
    assert sorted(os.listdir(out)) == ["null.safetensors", "shard-00000.safetensors"]  # no index, no temp files
    assert encoded == [2]
    result = prepare.prepare_cache(image_dir, out, *models[:5], **KW)
    assert result.skipped == ["shard-00000.safetensors"] and result.written == ["shard-00001.safetensors"]
    assert encoded == [2, 2, 2] and result.images_encoded == 3  # shard 1 only: a batch of 2, a padded one of 1
    assert folder_bytes(out) == folder_bytes(baseline[0])
    # A finished run redone writes nothing and encodes nothing.
    stamps = {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)}
    again = prepare.prepare_cache(image_dir, out, *models[:5], **KW)
    assert (again.written, again.images_encoded, len(again.skipped)) == ([], 0, 2) and len(encoded) == 3
    assert {name: os.stat(os.path.join(out, name)).st_mtime_ns for name in os.listdir(out)} == stamps
    # A lost shard is computed again, alone.
    os.remove(os.path.join(out, "shard-00000.safetensors"))
    assert prepare.prepare_cache(image_dir, out, *models[:5], **KW).written == ["shard-00000.safetensors"]
    assert folder_bytes(out) == folder_bytes(baseline[0])


def test_processes_take_disjoint_shards_and_process_0_writes_the_index(baseline, models, image_dir, tmp_path):
    out = str(tmp_path / "cache")
    second = prepare.prepare_cache(image_dir, out, *models[:5], process_index=1, process_count=2, **KW)
    assert (second.written, second.index) == (["shard-00001.safetensors"], None)
    assert sorted(os.listdir(out)) == ["shard-00001.safetensors"]  # null.safetensors is process 0's
    first = prepare.prepare_cache(image_dir, out, *models[:5], process_index=0, process_count=2,
                                  barrier=lambda: None, **KW)
    assert first.written == ["shard-00000.safetensors"] and first.index == baseline[1].index
    assert folder_bytes(out) == folder_bytes(baseline[0])


REWRITE_SHARD = """
import sys
from safetensors.numpy import load_file
from sana_jax.train.data import read_shard_header, write_shard
src, out_dir = sys.argv[1:]
tensors, (record, _) = load_file(src), read_shard_header(src)
captions = record.pop("captions")
write_shard(out_dir, "shard.safetensors", tensors["latents"], tensors["y"], tensors["mask"], captions, record)
"""


def test_files_have_one_metadata_entry_and_the_same_bytes_in_every_process(baseline, tmp_path):
    """safetensors keeps metadata in a hash map whose order changes from process to process; with one entry (the
    record) the bytes are a function of the contents: a shard rewritten by `write_shard` in fresh processes with
    different hash seeds is byte-identical to the one `prepare` wrote."""
    out = baseline[0]
    for name in ("null.safetensors", "shard-00000.safetensors", "shard-00001.safetensors"):
        with safe_open(os.path.join(out, name), framework="np") as f:
            assert list(f.metadata()) == [RECORD_KEY], name
    src = os.path.join(out, "shard-00001.safetensors")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for seed in ("0", "1", "2"):
        folder = tmp_path / seed
        folder.mkdir()
        done = subprocess.run([sys.executable, "-c", REWRITE_SHARD, src, str(folder)], cwd=root, capture_output=True,
                              env=dict(os.environ, PYTHONHASHSEED=seed, JAX_PLATFORMS="cpu"), text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        assert (folder / "shard.safetensors").read_bytes() == open(src, "rb").read(), f"PYTHONHASHSEED={seed}"


def test_a_version_1_cache_is_refused_naming_the_file(baseline, models, image_dir, tmp_path):
    """sana-jax-cache/1 kept "captions", "images" and "settings" as separate metadata entries."""
    from safetensors.numpy import save_file

    v1 = tmp_path / "v1"
    v1.mkdir()
    for name in ("null.safetensors", "shard-00000.safetensors", "shard-00001.safetensors"):
        tensors, record = read_shard(os.path.join(baseline[0], name))
        save_file(tensors, str(v1 / name), metadata={k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                                     for k, v in record.items()})
    with pytest.raises(ValueError, match=r"shard-00000.safetensors: no 'sana-jax' record in its metadata \(entries "
                                         r"\['captions', 'images', 'settings'\]\), so not a sana-jax-cache/2 file"):
        read_shard_captions(str(v1 / "shard-00000.safetensors"))
    # An interrupted version-1 run (no index yet): an error, not a silent recomputation.
    with pytest.raises(ValueError, match=r"null.safetensors: no 'sana-jax' record .* so not a sana-jax-cache/2 file"):
        prepare.prepare_cache(image_dir, str(v1), *models[:5], **KW)
    # A finished one: its index names the format.
    index = json.load(open(os.path.join(baseline[0], "index.json")))
    (v1 / "index.json").write_text(json.dumps(dict(index, format="sana-jax-cache/1")))
    with pytest.raises(ValueError, match=r"v1/index.json: format 'sana-jax-cache/1', expected 'sana-jax-cache/2'"):
        Loader(str(v1), 2, seed=0)
    with pytest.raises(ValueError, match=r"index.json: a cache of format 'sana-jax-cache/1', not 'sana-jax-cache/2'"):
        prepare.prepare_cache(image_dir, str(v1), *models[:5], **KW)
    assert sorted(os.listdir(v1)) == ["index.json", "null.safetensors", "shard-00000.safetensors",
                                      "shard-00001.safetensors"]  # nothing rewritten


def test_errors_name_the_file(models, image_dir, baseline, tmp_path):
    vae, vae_params, encoder, encoder_params, tokenizer, _ = models
    args = (vae, vae_params, encoder, encoder_params, tokenizer)
    no_caption = shutil.copytree(image_dir, tmp_path / "no_caption")
    os.remove(no_caption / "sub" / "d.txt")
    with pytest.raises(FileNotFoundError, match=r"sub/d.webp: no caption; expected .*sub/d.txt"):
        prepare.prepare_cache(str(no_caption), str(tmp_path / "o1"), *args, **KW)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="empty: no images"):
        prepare.prepare_cache(str(tmp_path / "empty"), str(tmp_path / "o2"), *args, **KW)
    broken = shutil.copytree(image_dir, tmp_path / "broken")
    (broken / "z.png").write_bytes(b"not a png")
    (broken / "z.txt").write_text("a broken image")
    with pytest.raises(ValueError, match="z.png: unreadable image"):
        prepare.prepare_cache(str(broken), str(tmp_path / "o3"), *args, **KW)
    # Out folders that hold something else.
    other = tmp_path / "other_format"
    other.mkdir()
    (other / "index.json").write_text(json.dumps({"format": "webdataset/1"}))
    with pytest.raises(ValueError, match=r"index.json: a cache of format 'webdataset/1', not 'sana-jax-cache/2'"):
        prepare.prepare_cache(image_dir, str(other), *args, **KW)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "features.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"foreign: holds files that are not part of a sana-jax-cache/2 cache "
                                         r"\(features.npz\)"):
        prepare.prepare_cache(image_dir, str(foreign), *args, **KW)
    in_memory = str(tmp_path / "in_memory")
    write_cache(in_memory, [Example(np.zeros((4, 4, 4)), np.zeros((MAX_LENGTH, 40)), np.ones(MAX_LENGTH), "x")],
                np.zeros((MAX_LENGTH, 40)), np.ones(MAX_LENGTH))
    with pytest.raises(ValueError, match="not written by `sana-jax prepare`"):
        prepare.prepare_cache(image_dir, in_memory, *args, **KW)
    with pytest.raises(ValueError, match=r"other settings \(max_length: 12 there, 10 now"):
        prepare.prepare_cache(image_dir, baseline[0], *args, **dict(KW, max_length=10))
    # Models that do not fit.
    with pytest.raises(ValueError, match="the tokenizer has .* tokens, the text encoder's embedding 10 rows"):
        prepare.prepare_cache(image_dir, str(tmp_path / "o4"), vae, vae_params,
                              text.Gemma2(text.TINY.replace(vocab_size=10)), encoder_params, tokenizer, **KW)
    with pytest.raises(ValueError, match="DC-AE takes 4 input channels"):
        prepare.prepare_cache(image_dir, str(tmp_path / "o5"), dcae.DCAE(VAE.replace(in_channels=4)), vae_params,
                              *args[2:], **KW)
    with pytest.raises(ValueError, match="resolution must be one of"):
        prepare.prepare_cache(image_dir, str(tmp_path / "o6"), *args, **dict(KW, resolution=768))
    assert not any(os.path.exists(tmp_path / f"o{i}") for i in range(1, 7))  # nothing written on bad input


@pytest.fixture(scope="module")
def model_folders(tmp_path_factory, models):
    """The tiny DC-AE as a diffusers folder, the tiny Gemma-2 as a Hugging Face folder with its tokenizer."""
    from sana_conversion.dcae import export_diffusers
    from sana_conversion.gemma2 import export_hf

    vae, vae_params, encoder, encoder_params, tokenizer, _ = models
    root = tmp_path_factory.mktemp("models")
    export_diffusers(vae.config, vae_params, str(root / "vae"))
    export_hf(encoder.config, encoder_params, str(root / "gemma"))
    tokenizer.save_pretrained(str(root / "gemma"))
    return str(root / "vae"), str(root / "gemma")


def cli_args(image_dir, out, model_folders):
    return ["prepare", image_dir, out, "--vae", model_folders[0], "--text-encoder", model_folders[1],
            "--resolution", "512", "--batch-size", "2", "--shard-size", "3", "--max-length", str(MAX_LENGTH)]


def same_tensors(ref_dir, out_dir, link=None):
    for name in ("shard-00000.safetensors", "shard-00001.safetensors", "null.safetensors"):
        ref, ref_record = read_shard(os.path.join(ref_dir, name))
        out, out_record = read_shard(os.path.join(out_dir, name))
        assert all(ref_record.get(k) == out_record.get(k) for k in ("captions", "images")), name
        for key in ref:
            if link is None or key == "mask":
                np.testing.assert_array_equal(ref[key], out[key], err_msg=f"{name}:{key}")
            else:
                assert_close(f"{name}:{key}", ref[key], out[key], link)


def test_cli_prepares_from_model_folders(baseline, image_dir, model_folders, tmp_path, capsys):
    out = str(tmp_path / "cache")
    assert main(cli_args(image_dir, out, model_folders)) == 0
    assert "cache complete: 5 images in 2 shard(s), latent sizes 11x23, 16x16" in capsys.readouterr().out
    same_tensors(baseline[0], out)  # the same weights through the loaders: the same cache
    settings = json.load(open(os.path.join(out, "index.json")))["prepare"]
    assert settings["source"] == {"vae": model_folders[0], "text_encoder": model_folders[1]}
    assert main(cli_args(image_dir, out, model_folders)) == 0
    assert "0 shard(s) written, 2 already done (0 images encoded)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["prepare", image_dir, out, "--vae", model_folders[0]])  # --text-encoder is required
    assert "--text-encoder" in capsys.readouterr().err


def test_cli_on_4_simulated_devices_matches_1_device(baseline, image_dir, model_folders, tmp_path):
    """`python -m sana_jax.cli prepare` with the batch sharded over 4 CPU devices (batch 2 -> padded to 4)."""
    out = str(tmp_path / "cache")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "sana_jax.cli", *cli_args(image_dir, out, model_folders)],
                          env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "prepare: 100%" in done.stderr  # the progress bar, on stderr
    same_tensors(baseline[0], out, "prepare_fp32")
