"""Reading checkpoint files with errors that name the file, and atomic writes.

Writes go to a temporary file or folder beside the target and are moved into place with `os.replace`, so a
crash or an error never leaves a half-written checkpoint, and an existing non-empty target is only replaced
when the caller says `overwrite=True`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import stat
import struct
import tempfile
import uuid

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from sana_conversion._tree import to_numpy

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file; BF16 tensors are upcast to fp32 (exact).

    A truncated or corrupt file raises ValueError naming it.
    """
    try:
        with safe_open(path, framework="np") as f:
            metadata = dict(f.metadata() or {})
            dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
            tensors = {key: f.get_tensor(key) for key, dtype in dtypes.items() if dtype != "BF16"}
    except (SafetensorError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable safetensors file (truncated or corrupt?): {err}") from err
    bf16 = [key for key, dtype in dtypes.items() if dtype == "BF16"]
    if bf16:
        tensors.update(_read_bf16_as_fp32(path, bf16))
    return tensors, metadata


def _read_bf16_as_fp32(path: str, keys: list[str]) -> dict[str, np.ndarray]:
    # numpy has no bfloat16, so safetensors' numpy backend refuses it. The header was validated by safe_open
    # above; read the raw bytes and widen: bf16 is the top half of an fp32 bit pattern.
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        out = {}
        for key in keys:
            start, end = header[key]["data_offsets"]
            f.seek(8 + header_len + start)
            bits = np.frombuffer(f.read(end - start), dtype="<u2").astype(np.uint32) << 16
            out[key] = bits.view(np.float32).reshape(header[key]["shape"])
    return out


def read_torch(path: str):
    """torch.load(path, map_location="cpu", weights_only=True): only tensors and plain containers.

    A pickle that needs arbitrary code (a custom class, a callable) or a truncated file raises ValueError
    naming the file. torch is imported here only, so the JAX side never needs it.
    """
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: refused to load: not a plain weights file (torch.load weights_only=True "
                         f"rejects the objects it pickles; re-save it as a plain state_dict): {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {err}") from err


def tensors_to_numpy(tree):
    """Nested dicts/lists of torch tensors -> the same structure of numpy arrays; other leaves unchanged."""
    if isinstance(tree, dict):
        return {key: tensors_to_numpy(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(tensors_to_numpy(value) for value in tree)
    if type(tree).__module__.startswith("torch") and hasattr(tree, "detach"):
        return to_numpy(tree)
    return tree


def _check_target(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        if os.listdir(path) and not overwrite:
            raise FileExistsError(f"{path} exists and is not empty; pass overwrite=True to replace it")
    elif os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")


def _temp_name(parent: str, name: str) -> str:
    """A fresh hidden path beside the target: same filesystem, so os.replace is atomic."""
    return os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_dir(out_dir: str, overwrite: bool = False):
    """Yield a temporary folder beside `out_dir`; on success it replaces `out_dir`, on error it is removed."""
    out_dir = os.path.abspath(out_dir)
    _check_target(out_dir, overwrite)
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"{out_dir} exists and is not a folder")
    parent, name = os.path.split(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_name(parent, name)
    os.mkdir(tmp)  # not tempfile.mkdtemp: its 0o700 mode would stick to the published folder
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: str, out_dir: str) -> None:
    if not os.path.lexists(out_dir):
        os.replace(tmp, out_dir)
        return
    # A folder cannot be renamed over a non-empty one: move the old one aside first, restore it on failure.
    parent, name = os.path.split(out_dir)
    old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_file(out_path: str, overwrite: bool = False):
    """Yield a temporary path beside `out_path`; on success it replaces `out_path`, on error it is removed."""
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path):
        raise IsADirectoryError(f"{out_path} is a folder; expected a file path")
    _check_target(out_path, overwrite)
    parent, name = os.path.split(out_path)
    os.makedirs(parent, exist_ok=True)
    tmp = _temp_name(parent, name)  # the writer creates it, with the usual (umask) permissions
    try:
        yield tmp
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write contiguous numpy arrays (no atomicity here: call inside atomic_file / atomic_dir)."""
    # safetensors creates its file with mode 0o600; give it the mode any new file gets here (the umask's).
    with open(path, "wb"):
        pass
    mode = stat.S_IMODE(os.stat(path).st_mode)
    # np.require keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d, e.g. BatchNorm counters).
    save_file({key: np.require(value, requirements="C") for key, value in tensors.items()}, path, metadata=metadata)
    os.chmod(path, mode)


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
