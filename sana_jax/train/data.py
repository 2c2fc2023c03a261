"""The training cache: latents + caption embeddings + masks on disk, and a deterministic per-host loader.

On-disk format (`sana-jax-cache/2`), one folder:
  index.json         {"format", "latent_channels", "caption_channels", "max_length", "scaling_factor",
                      "shards": [{"file", "count", "latent_hw": [h, w]}, ...]}
  null.safetensors   y [L, C_cap] fp32 (the caption encoder's output for "", SANA's null caption), mask [L] int32
  shard-NNNNN.safetensors
                     latents [n, h, w, C] fp32 (already multiplied by the VAE scaling factor), y [n, L, C_cap]
                     fp32, mask [n, L] int32
Every .safetensors file is written by `safetensors.numpy.save_file` with exactly one metadata entry, "sana-jax":
the file's record, a JSON object (keys sorted, compact). A shard's record holds "captions" (the n captions, in row
order); `sana-jax prepare` adds "images" (the rows' image paths) and "settings" (its settings object), which make
a shard self-describing for resuming. The null file's record is {} (prepare: {"settings"}). One entry, because
safetensors keeps the metadata in a hash map whose order changes from process to process: with one entry the
header, hence the file, is a function of the contents alone, and a resumed cache is byte-identical to an
uninterrupted one. `read_shard_header` and `read_shard_captions` read records. (`sana-jax-cache/1` kept
"captions", "images" and "settings" as separate metadata entries; its index and files are refused, naming the
file.)
Every shard holds one latent size (an aspect-ratio bucket); a bucket may span many shards. Files are written
atomically (temporary name, then rename), so an interrupted writer leaves whole shards only, and `index.json`
is written last. `write_shard`, `write_null` and `write_index` are the one writing path: `write_cache` (examples
in memory) and `sana_jax.train.prepare` (an image folder through the DC-AE and Gemma-2) both use them.

Loading: grain MapDatasets over random-access row sources. Batch k of the run is a pure function of (seed, k):
epoch e = k // batches_per_epoch shuffles the rows of each bucket and the order of the buckets' batches with
seed + e, so resuming at step k needs no iterator state. Each process reads only its slice of every batch.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import grain
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

FORMAT = "sana-jax-cache/2"
RECORD_KEY = "sana-jax"  # the one metadata entry of every .safetensors file of the cache


class CacheFormatError(ValueError):
    """A cache file that is not of this FORMAT (e.g. written by an older sana-jax)."""


@dataclasses.dataclass(frozen=True)
class Example:
    latent: np.ndarray  # [h, w, C]
    y: np.ndarray  # [L, C_cap]
    mask: np.ndarray  # [L]
    caption: str


def shard_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def _atomic_save(path: str, tensors: dict[str, np.ndarray], record: dict) -> None:
    """`safetensors.numpy.save_file` to a temporary name, then rename. The metadata is the one entry RECORD_KEY:
    the record as JSON with sorted keys, so that equal contents give equal bytes in any process."""
    tmp = path + ".tmp"
    save_file({name: np.ascontiguousarray(a) for name, a in tensors.items()}, tmp,
              metadata={RECORD_KEY: json.dumps(record, sort_keys=True, separators=(",", ":"))})
    os.replace(tmp, path)


def _atomic_json(path: str, value: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def write_shard(out_dir: str, name: str, latents: np.ndarray, y: np.ndarray, mask: np.ndarray,
                captions: list[str], record: dict | None = None) -> dict:
    """Write one shard atomically; returns its index entry {"file", "count", "latent_hw"}.

    latents [n, h, w, C] (already x scaling_factor), y [n, L, C_cap], mask [n, L], n captions; `record` adds
    JSON-able entries to the shard's record beside "captions" (sana-jax prepare: "images" and "settings").
    """
    n = len(captions)
    if latents.ndim != 4 or y.ndim != 3 or mask.shape != y.shape[:2] or latents.shape[0] != n or y.shape[0] != n:
        raise ValueError(f"{name}: expected latents [n, h, w, C], y [n, L, C_cap], mask [n, L] for n = {n} "
                         f"captions, got {latents.shape}, {y.shape}, {mask.shape}")
    if "captions" in (record or {}):
        raise ValueError(f"{name}: the record's \"captions\" are the captions argument")
    _atomic_save(os.path.join(out_dir, name), {"latents": np.asarray(latents, np.float32),
                                               "y": np.asarray(y, np.float32),
                                               "mask": np.asarray(mask, np.int32)},
                 {"captions": list(captions), **(record or {})})
    return {"file": name, "count": n, "latent_hw": [int(latents.shape[1]), int(latents.shape[2])]}


def read_shard_header(path: str) -> tuple[dict, dict[str, tuple[int, ...]]]:
    """(record, {tensor name: shape}) of a cache file (shard or null) without reading its tensors.

    Raises CacheFormatError, naming the file, where the metadata holds no RECORD_KEY JSON object (a
    `sana-jax-cache/1` file, or another program's); safetensors' own error where the file is not safetensors.
    """
    with safe_open(path, framework="np") as f:
        metadata = dict(f.metadata() or {})
        shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    if RECORD_KEY not in metadata:
        raise CacheFormatError(f"{path}: no {RECORD_KEY!r} record in its metadata (entries {sorted(metadata)}), "
                               f"so not a {FORMAT} file (sana-jax-cache/1 kept \"captions\", \"images\" and "
                               "\"settings\" as entries of their own); rebuild the cache into a new folder")
    try:
        record = json.loads(metadata[RECORD_KEY])
    except ValueError as e:
        raise CacheFormatError(f"{path}: the {RECORD_KEY!r} metadata entry is not JSON ({e})") from None
    if not isinstance(record, dict):
        raise CacheFormatError(f"{path}: the {RECORD_KEY!r} metadata entry is not a JSON object")
    return record, shapes


def read_shard_captions(path: str) -> list[str]:
    """The captions of a shard, one per row (checked against its tensors)."""
    record, shapes = read_shard_header(path)
    captions = record.get("captions")
    rows = shapes.get("latents", (None,))[0]
    if not isinstance(captions, list) or len(captions) != rows or not all(isinstance(c, str) for c in captions):
        raise CacheFormatError(f"{path}: the record's \"captions\" should list {rows} strings (one per row of "
                               f"latents), got {type(captions).__name__}"
                               f"{f' of {len(captions)}' if isinstance(captions, list) else ''}")
    return captions


def write_null(out_dir: str, null_y: np.ndarray, null_mask: np.ndarray, record: dict | None = None):
    """null.safetensors: y [L, C_cap] fp32 and mask [L] int32 of the null caption; `record` its record."""
    _atomic_save(os.path.join(out_dir, "null.safetensors"), {"y": np.asarray(null_y, np.float32),
                                                             "mask": np.asarray(null_mask, np.int32)}, record or {})


def make_index(shards: list[dict], latent_channels: int, caption_channels: int, max_length: int,
               scaling_factor: float, extra: dict | None = None) -> dict:
    """The index.json contents for these shard entries; `extra` adds top-level keys (prepare's settings)."""
    if not shards:
        raise ValueError("no examples to write")
    index = {"format": FORMAT, "latent_channels": int(latent_channels), "caption_channels": int(caption_channels),
             "max_length": int(max_length), "scaling_factor": float(scaling_factor), "shards": list(shards)}
    index.update(extra or {})
    return index


def write_index(out_dir: str, index: dict) -> dict:
    """index.json, atomically; written last, after every shard and null.safetensors. Returns the index."""
    _atomic_json(os.path.join(out_dir, "index.json"), index)
    return index


def write_cache(out_dir: str, examples: Iterable[Example], null_y: np.ndarray, null_mask: np.ndarray,
                scaling_factor: float = 1.0, shard_size: int = 1024) -> dict:
    """Write examples into shards grouped by latent size; returns the index. Refuses a non-empty out_dir."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} exists and is not empty; choose a new folder for the cache")
    os.makedirs(out_dir, exist_ok=True)
    pending: dict[tuple[int, int], list[Example]] = {}
    shards = []
    dims = {}

    def flush(hw):
        batch = pending.pop(hw)
        shards.append(write_shard(out_dir, shard_name(len(shards)), np.stack([e.latent for e in batch]),
                                  np.stack([e.y for e in batch]), np.stack([e.mask for e in batch]),
                                  [e.caption for e in batch]))

    for ex in examples:
        shape = (ex.latent.shape[-1], ex.y.shape[-1], ex.y.shape[0])
        if dims.setdefault("shape", shape) != shape:
            raise ValueError(f"example {ex.caption!r}: (latent channels, caption channels, L) {shape} differs "
                             f"from the first example's {dims['shape']}")
        hw = tuple(ex.latent.shape[:2])
        pending.setdefault(hw, []).append(ex)
        if len(pending[hw]) == shard_size:
            flush(hw)
    for hw in list(pending):
        flush(hw)
    if not shards:
        raise ValueError("no examples to write")
    write_null(out_dir, null_y, null_mask)
    return write_index(out_dir, make_index(shards, *dims["shape"], scaling_factor))


def read_index(data_dir: str) -> dict:
    path = os.path.join(data_dir, "index.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no cache index (build one with `sana-jax prepare` or the demo)")
    with open(path) as f:
        index = json.load(f)
    if index.get("format") != FORMAT:
        raise CacheFormatError(f"{path}: format {index.get('format')!r}, expected {FORMAT!r}; rebuild the cache "
                               "into a new folder with this version (`sana-jax prepare` or the demo)")
    for shard in index["shards"]:
        if not os.path.exists(os.path.join(data_dir, shard["file"])):
            raise FileNotFoundError(f"{os.path.join(data_dir, shard['file'])}: listed in {path} but missing")
    return index


class BucketSource:
    """Random access to the rows of every shard of one latent size (a grain data source)."""

    def __init__(self, data_dir: str, shards: list[dict]):
        self._files = [os.path.join(data_dir, s["file"]) for s in shards]
        self._starts = np.cumsum([0] + [s["count"] for s in shards])
        self._handles: dict[int, object] = {}

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, i: int) -> dict:
        shard = int(np.searchsorted(self._starts, i, side="right") - 1)
        row = int(i - self._starts[shard])
        if shard not in self._handles:
            self._handles[shard] = safe_open(self._files[shard], framework="np")
        f = self._handles[shard]
        return {key: f.get_slice(key)[row:row + 1][0] for key in ("latents", "y", "mask")}


class Loader:
    """batch(k) -> this process's rows of global batch k: {"x0", "y", "mask", "null_y"} as numpy."""

    def __init__(self, data_dir: str, global_batch: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        if global_batch % process_count:
            raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
        self.index = read_index(data_dir)
        self.global_batch, self.seed = global_batch, seed
        self.process_index, self.process_count = process_index, process_count
        self.per_process = global_batch // process_count
        buckets: dict[tuple[int, int], list[dict]] = {}
        for shard in self.index["shards"]:
            buckets.setdefault(tuple(shard["latent_hw"]), []).append(shard)
        self.sources = {hw: BucketSource(data_dir, shards) for hw, shards in sorted(buckets.items())}
        self.batches_per_bucket = {hw: len(src) // global_batch for hw, src in self.sources.items()}
        self.batches_per_epoch = sum(self.batches_per_bucket.values())
        if self.batches_per_epoch == 0:
            sizes = {f"{h}x{w}": len(s) for (h, w), s in self.sources.items()}
            raise ValueError(f"{data_dir}: no bucket holds a full global batch of {global_batch} (rows {sizes})")
        with safe_open(os.path.join(data_dir, "null.safetensors"), framework="np") as f:
            self.null_y = f.get_tensor("y")

    def _epoch(self, epoch: int):
        seed = self.seed + epoch
        per_bucket = []
        for hw, src in self.sources.items():
            usable = self.batches_per_bucket[hw] * self.global_batch
            ds = grain.MapDataset.source(src).shuffle(seed=seed).slice(slice(0, usable))
            ds = ds.slice(slice(self.process_index, None, self.process_count)).batch(self.per_process)
            per_bucket += [(hw, ds, i) for i in range(self.batches_per_bucket[hw])]
        order = np.random.default_rng(seed).permutation(len(per_bucket))
        return [per_bucket[i] for i in order]

    def batch(self, k: int) -> dict:
        epoch, position = divmod(k, self.batches_per_epoch)
        if getattr(self, "_cached_epoch", None) != epoch:
            self._cached_epoch, self._cached_order = epoch, self._epoch(epoch)
        _, ds, i = self._cached_order[position]
        rows = ds[i]
        return {"x0": rows["latents"], "y": rows["y"], "mask": rows["mask"], "null_y": self.null_y}

    def batch_shapes(self, k: int = 0) -> dict:
        return {key: value.shape for key, value in self.batch(k).items()}
