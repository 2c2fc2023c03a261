"""`sana-jax prepare`: an image folder with captions -> the training cache (`sana-jax-cache/2`, train/data.py).

Input, SANA's convention (SanaImgDataset, diffusion/data/datasets/sana_data.py): images (.png, .jpg, .jpeg,
.webp, any case, subfolders included, hidden files skipped), each with a same-named .txt beside it (`cat.png` +
`cat.txt`); as in SANA the caption is the file's first line, stripped (an empty file is the empty caption).

Per image, SANA's multi-scale transform (SanaWebDatasetMS, diffusion/data/datasets/sana_data_multi_scale.py):
the bucket is the entry of the resolution's aspect-ratio table (`pipeline.aspect_ratio_bins`) whose key is
nearest height / width; the image is converted to RGB, resized (PIL) so that it covers the bucket with the other
side truncated by int(), bicubic (Lanczos at 2048 px, as SANA), centre-cropped with torchvision's rounding
(zero-padded where the truncation left it a pixel short), and scaled to [-1, 1]. Smaller images are upscaled, as
SANA does; EXIF orientation is not applied (SANA's transform does not either). Latents: DC-AE `encode` x
scaling_factor, fp32 (untiled: a 4096 px bucket needs the memory of a full-size encode). Captions:
`text.encode_prompts` with SANA's CHI, select index and max length (300); the null caption "" without CHI
(SANA's y_embedding) goes to null.safetensors. Shards also record the "images" (relative paths) of their rows.

Plan (deterministic): images sorted by relative path, grouped by bucket (buckets in (height, width) order), each
bucket cut into chunks of shard_size; chunk j is shard-{j:05d}.safetensors.

Resume: each shard records its image list and the settings (resolution, shard size, max_length, CHI, preprocess,
both model configs, the model paths given) in its record (the one "sana-jax" metadata entry, train/data.py); the
null file records the settings. An existing shard with the same list, settings and tensor shapes is skipped; one
with another image list (the folder changed) is recomputed; one with other settings is an error (a cache is built
with one set of encoders), and so is a file of another cache format. Files are written atomically (temporary
name + rename), so an interrupted run leaves whole shards only: rerunning the command continues where it stopped,
and rerunning a finished run writes nothing. The weights themselves are not fingerprinted: new weights under the same
path and config need a new out folder.

Devices and hosts: a process encodes batches sharded over its local devices (1-D mesh "data", parameters
replicated, batch_size rounded up to a multiple of the device count, the last batch padded by repeating its last
image). Process p of P handles the shards j with j % P == p. Merge: the shards are self-describing; process 0
writes null.safetensors first; after their shards all processes meet at a barrier (jax's sync_global_devices when
jax.distributed runs more than one process), then process 0 checks every planned shard and writes index.json,
last. Without a barrier (process_index / process_count given by hand for independent jobs) process 0 writes the
index only if every shard is there, so run it last, or rerun with one process afterwards (it skips every
finished shard and computes any missing one).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from PIL import Image
from tqdm import tqdm

from sana_jax import pipeline, text
from sana_jax.train.data import (FORMAT, CacheFormatError, make_index, read_shard_header, shard_name, write_index,
                                 write_null, write_shard)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
RESOLUTIONS = (512, 1024, 2048, 4096)
_CACHE_FILE = re.compile(r"(shard-\d{5}\.safetensors|null\.safetensors|index\.json)(\.tmp)?")


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of the plan: `path` relative to the image folder ("/"-separated), its caption and its bucket
    (height, width) in pixels."""

    path: str
    caption: str
    bucket: tuple[int, int]


@dataclasses.dataclass(frozen=True)
class Shard:
    """One unit of work: the images of shard-{number:05d}.safetensors, all of one bucket."""

    number: int
    bucket: tuple[int, int]
    items: tuple[Item, ...]

    @property
    def name(self) -> str:
        return shard_name(self.number)


@dataclasses.dataclass(frozen=True)
class PrepareResult:
    """index: the written (or unchanged) index, None where this process wrote none; written / skipped: this
    process's shard files; images_encoded: images this process ran through the DC-AE."""

    index: dict | None
    written: list[str]
    skipped: list[str]
    images_encoded: int


# ----------------------------------------------------------------------------------------------- the plan

def find_images(image_dir: str) -> list[str]:
    """Image paths relative to image_dir ("/"-separated), sorted; hidden files and folders are skipped."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"{image_dir}: image folder not found")
    found = []
    for root, dirs, files in os.walk(image_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES):
                found.append(os.path.relpath(os.path.join(root, name), image_dir).replace(os.sep, "/"))
    if not found:
        raise ValueError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)}) in this folder or its subfolders")
    return sorted(found)


def read_caption(image_path: str) -> str:
    """The first line, stripped, of the .txt beside the image (SanaImgDataset: `f.readlines()[0].strip()`)."""
    txt = os.path.splitext(image_path)[0] + ".txt"
    if not os.path.isfile(txt):
        raise FileNotFoundError(f"{image_path}: no caption; expected {txt} (a same-named .txt beside each image)")
    try:
        with open(txt, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{txt}: caption is not UTF-8 text ({e})") from None
    return lines[0].strip() if lines else ""


def image_size(path: str) -> tuple[int, int]:
    """(height, width) from the file header."""
    try:
        with Image.open(path) as im:
            width, height = im.size
    except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ... for bad files
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    return height, width


def buckets(resolution: int) -> dict[str, tuple[int, int]]:
    """The aspect-ratio table of a training resolution (512, 1024, 2048 or 4096 px)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS} (SANA's aspect-ratio tables), got {resolution}")
    return pipeline.aspect_ratio_bins(resolution // 32)


def plan_shards(image_dir: str, resolution: int, shard_size: int) -> list[Shard]:
    """The deterministic work list: every image and caption read and bucketed (errors name the file)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    table = buckets(resolution)
    paths = find_images(image_dir)
    captions = [read_caption(os.path.join(image_dir, rel)) for rel in paths]  # a missing caption fails first
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # headers only
        sizes = list(pool.map(image_size, [os.path.join(image_dir, rel) for rel in paths]))
    by_bucket: dict[tuple[int, int], list[Item]] = {}
    for rel, caption, size in zip(paths, captions, sizes):
        bucket = pipeline.classify_height_width_bin(*size, table)
        by_bucket.setdefault(bucket, []).append(Item(rel, caption, bucket))
    shards = []
    for bucket in sorted(by_bucket):
        items = by_bucket[bucket]
        for start in range(0, len(items), shard_size):
            shards.append(Shard(len(shards), bucket, tuple(items[start:start + shard_size])))
    return shards


def load_image(path: str, bucket: tuple[int, int], resample: int = Image.Resampling.BICUBIC) -> np.ndarray:
    """SANA's transform: RGB, resize to cover `bucket` (height, width), centre crop, [-1, 1] -> [H, W, 3] fp32."""
    height, width = bucket
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            h, w = im.height, im.width
            if height / h > width / w:
                size = (height, int(w * height / h))
            else:
                size = (int(h * width / w), width)
            pixels = np.asarray(im.resize((size[1], size[0]), resample), np.float32)
    except Exception as e:
        raise ValueError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None
    # torchvision's CenterCrop: zero-pad a side shorter than the crop, then start at round((size - crop) / 2).
    pad_h, pad_w = max(height - pixels.shape[0], 0), max(width - pixels.shape[1], 0)
    if pad_h or pad_w:
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
    top, left = round((pixels.shape[0] - height) / 2), round((pixels.shape[1] - width) / 2)
    pixels = pixels[top:top + height, left:left + width]
    # ToTensor (/ 255) then Normalize(0.5, 0.5), in fp32 as torchvision computes them.
    return (pixels / np.float32(255) - np.float32(0.5)) / np.float32(0.5)


# ----------------------------------------------------------------------------------------------- encoding

@functools.partial(jax.jit, static_argnums=0)
def _encode_latents(vae, params, images: jax.Array) -> jax.Array:
    """images [B, H, W, 3] in [-1, 1] -> DC-AE latents x scaling_factor [B, H/f, W/f, C], fp32."""
    latents = vae.apply({"params": params}, images, method="encode")
    return latents.astype(jnp.float32) * vae.config.scaling_factor


def _latent_shapes(vae, params, sizes) -> dict[tuple[int, int], tuple[int, int, int]]:
    """bucket (height, width) -> latent [h, w, C], traced without computing (a DC-AE whose empty stages skip their
    down-sampling compresses less than config.spatial_compression says). A bucket the DC-AE cannot encode, or
    params that do not fit its config, raise here, before any work."""
    shapes = {}
    for height, width in sorted(set(sizes)):
        images = jax.ShapeDtypeStruct((1, height, width, vae.config.in_channels), jnp.float32)
        out = jax.eval_shape(lambda p, x: vae.apply({"params": p}, x, method="encode"), params, images)
        shapes[(height, width)] = tuple(out.shape[1:])
    return shapes


def _pad(a: np.ndarray, size: int) -> np.ndarray:
    """Pad axis 0 to `size` by repeating the last row (the extra rows are encoded and dropped)."""
    return np.concatenate([a, np.repeat(a[-1:], size - len(a), axis=0)]) if len(a) < size else a


class _Encoders:
    """Both encoders with their parameters replicated over a 1-D "data" mesh of `devices`."""

    def __init__(self, vae, vae_params, encoder, encoder_params, tokenizer, devices, *, max_length, preprocess):
        self.mesh = Mesh(np.asarray(devices), ("data",))
        replicated = NamedSharding(self.mesh, P())
        self.batch = NamedSharding(self.mesh, P("data"))
        self.vae, self.encoder, self.tokenizer = vae, encoder, tokenizer
        self.vae_params = jax.device_put(vae_params, replicated)
        self.encoder_params = jax.device_put(encoder_params, replicated)
        self.max_length, self.preprocess = max_length, preprocess

    def latents(self, images: np.ndarray, padded: int) -> np.ndarray:
        n = len(images)
        x = jax.device_put(_pad(images, padded), self.batch)
        return np.asarray(_encode_latents(self.vae, self.vae_params, x))[:n]

    def captions(self, captions: Sequence[str], padded: int, chi=None) -> tuple[np.ndarray, np.ndarray]:
        """The same tokens and jitted encoder as `text.encode_prompts`, with the batch sharded."""
        n = len(captions)
        tokens = text.tokenize_prompts(self.tokenizer, list(captions), chi=chi, max_length=self.max_length,
                                       preprocess=self.preprocess)
        tokens = dataclasses.replace(tokens, input_ids=jax.device_put(_pad(tokens.input_ids, padded), self.batch),
                                     attention_mask=jax.device_put(_pad(tokens.attention_mask, padded), self.batch))
        y, mask = text.encode_tokens(self.encoder, self.encoder_params, tokens)
        return np.asarray(y, np.float32)[:n], np.asarray(mask, np.int32)[:n]


# ------------------------------------------------------------------------------------------ the out folder

def _differences(ours: dict, theirs: dict) -> str:
    keys = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    return ", ".join(f"{k}: {theirs.get(k)!r} there, {ours.get(k)!r} now" if not isinstance(ours.get(k), dict)
                     else f"{k} differs" for k in keys)


def _check_out_dir(out_dir: str, settings: dict) -> None:
    """Refuse a folder that holds anything but (part of) a prepare cache with these settings."""
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir}: not a folder")
    index_path = os.path.join(out_dir, "index.json")
    if os.path.exists(index_path):
        try:
            with open(index_path) as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{index_path}: not a cache index ({e}); choose an empty or new out folder") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            found = index.get("format") if isinstance(index, dict) else None
            raise ValueError(f"{index_path}: a cache of format {found!r}, not {FORMAT!r}; choose an empty or new "
                             "out folder")
        if "prepare" not in index:
            raise ValueError(f"{index_path}: a {FORMAT} cache not written by `sana-jax prepare` (no settings to "
                             "resume from); choose an empty or new out folder")
        if index["prepare"] != settings:
            raise ValueError(f"{index_path}: the cache was built with other settings ("
                             f"{_differences(settings, index['prepare'])}); choose a new out folder")
    foreign = sorted(name for name in os.listdir(out_dir) if not _CACHE_FILE.fullmatch(name))
    if foreign:
        raise ValueError(f"{out_dir}: holds files that are not part of a {FORMAT} cache ({', '.join(foreign[:3])}"
                         f"{', ...' if len(foreign) > 3 else ''}); choose an empty or new out folder")


def _is_done(path: str, settings: dict, images: list[str] | None, shapes: dict) -> bool:
    """Whether `path` is a finished file of this plan. Other settings, or another cache format, are an error, not
    a redo."""
    if not os.path.exists(path):
        return False
    try:
        record, found = read_shard_header(path)
    except CacheFormatError:  # e.g. a sana-jax-cache/1 shard: its message names the file and the format
        raise
    except Exception:  # unreadable (e.g. truncated by something other than us): compute it again
        return False
    if "settings" in record and record["settings"] != settings:
        raise ValueError(f"{path} was written with other settings ({_differences(settings, record['settings'])}); "
                         "choose a new out folder")
    if images is not None and record.get("images") != images:
        return False
    return record.get("settings") == settings and found == shapes


# ---------------------------------------------------------------------------------------------- the command

def prepare_cache(image_dir: str, out_dir: str, vae, vae_params, encoder, encoder_params, tokenizer, *,
                  resolution: int = 1024, batch_size: int = 8, shard_size: int = 256, max_length: int = 300,
                  chi: Sequence[str] | None = text.SANA_CHI, preprocess: text.Preprocess = "sana",
                  devices: Sequence | None = None, process_index: int | None = None,
                  process_count: int | None = None, barrier: Callable[[], None] | None = None,
                  source: dict | None = None, progress: bool = True,
                  on_shard: Callable[[str], None] | None = None) -> PrepareResult:
    """Build (or continue) the training cache of an image folder; see the module docstring.

    Args:
      image_dir: images with a same-named .txt caption beside each.
      out_dir: the cache folder: new, empty, or an unfinished / finished run of the same settings.
      vae, vae_params: a `sana_jax.dcae.DCAE` and its params (`dcae.load_pretrained`).
      encoder, encoder_params, tokenizer: Gemma-2 (`text.load_gemma2`) and its tokenizer (`text.load_tokenizer`).
      resolution: 512, 1024, 2048 or 4096: which aspect-ratio table buckets the images.
      batch_size: images per encoder call (rounded up to a multiple of the local device count).
      shard_size: images per shard file (a bucket's last shard holds the rest); at SANA's sizes a row is
        ~2.8 MB (y is 300 x 2304 fp32), so 256 rows make ~0.7 GB files.
      max_length: L, caption tokens kept (SANA: 300). chi / preprocess: as `text.encode_prompts`.
      devices: this process's devices for the batch mesh (default `jax.local_devices()`).
      process_index, process_count: this process's slice of the shards (default jax's).
      barrier: called after this process's shards, before process 0 writes the index (default: jax's
        `sync_global_devices` when jax runs several processes, else none).
      source: recorded in the settings (the CLI records the model paths).
      on_shard: called with each shard's file name after it is written (tests interrupt a run with it).
    Returns:
      PrepareResult.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside 0..{process_count - 1}")
    if barrier is None and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        barrier = functools.partial(multihost_utils.sync_global_devices, "sana-jax prepare")

    vcfg, tcfg = vae.config, encoder.config
    if vcfg.in_channels != 3:
        raise ValueError(f"the DC-AE takes {vcfg.in_channels} input channels, images have 3 (config {vcfg.name!r})")
    if len(tokenizer) > tcfg.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, the text encoder's embedding "
                         f"{tcfg.vocab_size} rows (config {tcfg.name!r}): they do not belong together")
    settings = {"resolution": resolution, "shard_size": shard_size, "max_length": max_length,
                "chi": list(chi) if chi else None, "preprocess": preprocess,
                "vae": dataclasses.asdict(vcfg), "text_encoder": dataclasses.asdict(tcfg), "source": source or {}}
    settings = json.loads(json.dumps(settings))  # tuples -> lists, as index.json and the records read back

    shards = plan_shards(image_dir, resolution, shard_size)
    _check_out_dir(out_dir, settings)
    latent_shapes = _latent_shapes(vae, vae_params, [s.bucket for s in shards])
    os.makedirs(out_dir, exist_ok=True)
    devices = list(jax.local_devices() if devices is None else devices)
    padded = math.ceil(batch_size / len(devices)) * len(devices)
    enc = _Encoders(vae, vae_params, encoder, encoder_params, tokenizer, devices, max_length=max_length,
                    preprocess=preprocess)
    c_lat, c_cap = vcfg.latent_channels, tcfg.hidden_size

    def shapes(shard: Shard) -> dict:
        n = len(shard.items)
        return {"latents": (n, *latent_shapes[shard.bucket]), "y": (n, max_length, c_cap), "mask": (n, max_length)}

    def done(shard: Shard) -> bool:
        return _is_done(os.path.join(out_dir, shard.name), settings, [i.path for i in shard.items],
                        shapes(shard))

    null_path = os.path.join(out_dir, "null.safetensors")
    null_shapes = {"y": (max_length, c_cap), "mask": (max_length,)}
    if process_index == 0 and not _is_done(null_path, settings, None, null_shapes):
        null_y, null_mask = enc.captions([""], len(devices), chi=None)  # SANA's y_embedding: "" without CHI
        write_null(out_dir, null_y[0], null_mask[0], {"settings": settings})

    mine = [s for s in shards if s.number % process_count == process_index]
    finished = {s.number for s in mine if done(s)}
    skipped = [s for s in mine if s.number in finished]
    todo = [s for s in mine if s.number not in finished]
    resample = Image.Resampling.LANCZOS if resolution == 2048 else Image.Resampling.BICUBIC
    written, encoded = [], 0
    with tqdm(total=sum(len(s.items) for s in mine), initial=sum(len(s.items) for s in skipped), unit="img",
              desc="prepare", file=sys.stderr, disable=not progress) as bar, \
            concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:

        def load(batch: Sequence[Item], bucket):
            return [pool.submit(load_image, os.path.join(image_dir, it.path), bucket, resample) for it in batch]

        for shard in todo:
            bar.set_postfix_str(shard.name)
            batches = [shard.items[i:i + batch_size] for i in range(0, len(shard.items), batch_size)]
            parts = []
            pending = load(batches[0], shard.bucket)
            for k, batch in enumerate(batches):
                images = np.stack([future.result() for future in pending])
                if k + 1 < len(batches):  # decode the next batch on the host while this one encodes
                    pending = load(batches[k + 1], shard.bucket)
                latents = enc.latents(images, padded)
                y, mask = enc.captions([it.caption for it in batch], padded, chi=chi)
                parts.append((latents, y, mask))
                encoded += len(batch)
                bar.update(len(batch))
            latents, y, mask = (np.concatenate(p) for p in zip(*parts))
            write_shard(out_dir, shard.name, latents, y, mask, [it.caption for it in shard.items],
                        {"images": [it.path for it in shard.items], "settings": settings})
            written.append(shard.name)
            if on_shard is not None:
                on_shard(shard.name)

    if barrier is not None:
        barrier()
    index = None
    if process_index == 0:
        missing = [s.name for s in shards if not done(s)]
        if missing and barrier is not None:
            raise RuntimeError(f"{out_dir}: {len(missing)} shard(s) missing after every process finished "
                               f"({', '.join(missing[:3])}); rerun the same command to compute them")
        if not missing:
            entries = [{"file": s.name, "count": len(s.items), "latent_hw": list(latent_shapes[s.bucket][:2])}
                       for s in shards]
            index = make_index(entries, c_lat, c_cap, max_length, vcfg.scaling_factor, {"prepare": settings})
            index_path = os.path.join(out_dir, "index.json")
            previous = None
            if os.path.exists(index_path):
                with open(index_path) as f_index:
                    previous = json.load(f_index)
            if previous != json.loads(json.dumps(index)):
                write_index(out_dir, index)
    return PrepareResult(index, written, [s.name for s in skipped], encoded)


def load_encoders(vae_path: str, text_encoder_path: str, dtype: str = "float32"):
    """(vae, vae_params, encoder, encoder_params, tokenizer) from a DC-AE folder/file (`dcae.load_pretrained`) and a
    Gemma-2 folder with its tokenizer (`text.load_gemma2` + `text.load_tokenizer`); dtype is both compute dtypes
    (bfloat16 also keeps Gemma's parameters in bf16, exact for its bf16 checkpoints)."""
    from sana_jax import dcae

    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {dtype!r}")
    vae, vae_params = dcae.load_pretrained(vae_path)
    vae = dcae.DCAE(vae.config.replace(compute_dtype=dtype))
    encoder, encoder_params = text.load_gemma2(text_encoder_path, compute_dtype=dtype, param_dtype=dtype)
    return vae, vae_params, encoder, encoder_params, text.load_tokenizer(text_encoder_path)
