"""The `sana-jax` command line: convert and parity on a tiny official checkpoint, errors that name the input."""

import json
import os

import jax
import pytest

import sana_jax
from sana_conversion import export_official
from sana_jax import configs
from sana_jax.cli import main


@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    cfg = configs.TINY
    params = sana_jax.perturb_params(sana_jax.init_params(sana_jax.SanaTransformer(cfg), jax.random.key(0)))
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")
    export_official(cfg, params, path)
    return path, params


def test_convert_to_diffusers_and_back_is_bit_exact(tiny_official, tmp_path):
    path, params = tiny_official
    assert main(["convert", path, str(tmp_path / "diffusers"), "--to", "diffusers", "--config", "tiny"]) == 0
    assert main(["convert", str(tmp_path / "diffusers"), str(tmp_path / "back.safetensors"), "--to", "official",
                 "--config", "tiny"]) == 0
    _, reloaded = sana_jax.load_pretrained(str(tmp_path / "back.safetensors"), config=configs.TINY)
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reloaded)):
        assert (a == b).all()
    with pytest.raises(FileExistsError):  # an existing export is never replaced without --overwrite
        main(["convert", path, str(tmp_path / "diffusers"), "--to", "diffusers", "--config", "tiny"])


def test_parity_report_passes_and_writes_json_and_png(tiny_official, tmp_path, capsys):
    path, _ = tiny_official
    report, png = tmp_path / "report.json", tmp_path / "report.png"
    code = main(["parity", path, "--config", "tiny", "--latent", "4x6", "--tokens", "5", "--json", str(report),
                 "--png", str(png)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "block.1.out" in printed and "jax bfloat16" in printed
    rows = json.loads(report.read_text())["rows"]
    impls = {(r["impl"], r["dtype"]) for r in rows}
    assert {("jax", "float32"), ("diffusers", "float32"), ("jax", "bfloat16"), ("torch_ref", "bfloat16")} <= impls
    assert all(r["rel"] <= 1e-5 for r in rows if r["dtype"] == "float32")
    assert os.path.getsize(png) > 1000


def test_parity_without_config_explains_what_shapes_cannot_tell(tiny_official):
    path, _ = tiny_official
    with pytest.raises(ValueError, match="config"):
        main(["parity", path, "--no-diffusers", "--dtypes", "float32"])


def test_bad_latent_argument_is_named():
    with pytest.raises(SystemExit, match="--latent"):
        main(["parity", "x.safetensors", "--config", "tiny", "--latent", "big"])
