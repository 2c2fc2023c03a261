"""sana_jax.text: the Gemma-2 encoder against transformers.Gemma2Model, conversion (sana_conversion.gemma2), and SANA's
prompt encoding against diffusers' SanaPipeline.encode_prompt with a tiny tokenizer built offline."""

import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Gemma2Config as HFConfig
from transformers import Gemma2ForCausalLM, Gemma2Model

from sana_conversion import gemma2 as g2
from sana_conversion._tree import flatten, unflatten
from sana_jax import text
from tests.helpers import assert_close, relative_error, save_tiny_tokenizer
from tests.tolerances import TOLERANCES

TINY = text.TINY
CONFIGS = {
    # GQA (G = 2), local layers first, soft-capping 1.0, window 6 < T.
    "gqa": TINY,
    # MQA (one key/value head), a custom layer order, another window and rope theta, query_pre_attn_scalar = D.
    "mqa": TINY.replace(num_key_value_heads=1, layer_types=("full_attention", "sliding_attention",
                                                            "sliding_attention"),
                        sliding_window=5, head_dim=8, query_pre_attn_scalar=8, rope_theta=500.0),
    # MHA without soft-capping (Gemma2Config allows None).
    "mha_nocap": TINY.replace(num_key_value_heads=4, attn_logit_softcapping=None, num_hidden_layers=2),
}
LENGTHS = (21, 13, 4)  # T = 21 > every window; the 4-token row has padded queries with no key in their window


def hf_model(cfg: text.Gemma2Config, seed: int = 0, cls=Gemma2Model):
    """A transformers model of `cfg` (eager attention, Gemma-2's default), every parameter perturbed from its init:
    + randn * 0.05 for matrices, * 0.3 for vectors (norm weights leave 0, i.e. scales leave 1)."""
    hf_cfg = HFConfig(**{k: v for k, v in g2.hf_config(cfg).items()
                         if k not in ("architectures", "torch_dtype", "model_type")})
    hf_cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(hf_cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * (0.05 if param.ndim >= 2 else 0.3))
    return model


def state_dict_numpy(model) -> dict:
    return {key: value.detach().float().numpy() for key, value in model.state_dict().items()}


def make_batch(cfg, lengths=LENGTHS, seed=0):
    """Right-padded ids [B, T] (pad id 0 after each length) and mask [B, T]."""
    rng = np.random.default_rng(seed)
    t = max(lengths)
    mask = (np.arange(t)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(1, cfg.vocab_size, (len(lengths), t)), 0).astype(np.int32)
    return ids, mask


def hf_hidden(model, ids, mask) -> np.ndarray:
    with torch.no_grad():
        out = model(torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long()).last_hidden_state
    return out.float().numpy()


@functools.lru_cache(maxsize=None)
def jitted_apply(cfg):
    return jax.jit(text.Gemma2(cfg).apply)


def jax_hidden(cfg, params, ids, mask) -> np.ndarray:
    return np.asarray(jitted_apply(cfg)({"params": params}, jnp.asarray(ids), jnp.asarray(mask)), np.float32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def parity_case(request):
    cfg = CONFIGS[request.param]
    model = hf_model(cfg)
    params = g2.hf_to_jax(state_dict_numpy(model), cfg)
    ids, mask = make_batch(cfg)
    return request.param, cfg, model, params, ids, mask


def test_parity_fp32(parity_case):
    """Hidden states at valid and at padded positions: padded queries attend to the valid keys their causal (and
    local) window allows, or - when a local window holds none - uniformly to all T keys, as transformers' finfo.min
    mask makes them. Deterministic in both, so both are compared."""
    name, cfg, model, params, ids, mask = parity_case
    ref, out = hf_hidden(model, ids, mask), jax_hidden(cfg, params, ids, mask)
    valid = mask == 1
    # Per layer first, so a failure names the first diverging one. transformers' hidden_states are the embeddings,
    # then each layer's output, except the last entry, which is the normed final output.
    with torch.no_grad():
        hf_states = model(torch.as_tensor(ids).long(), attention_mask=torch.as_tensor(mask).long(),
                          output_hidden_states=True).hidden_states
    _, named = jax.jit(functools.partial(text.intermediates, text.Gemma2(cfg)))(params, ids, mask)
    assert_close(f"gemma2[{name}] embed", hf_states[0], named["embed"], "gemma2_fp32")
    for i in range(cfg.num_hidden_layers - 1):
        assert_close(f"gemma2[{name}] layer.{i}", hf_states[i + 1], named[f"layer.{i}"], "gemma2_fp32")
    assert_close(f"gemma2[{name}] valid positions", ref[valid], out[valid], "gemma2_fp32")
    assert_close(f"gemma2[{name}] padded positions", ref[~valid], out[~valid], "gemma2_fp32")
    if name != "gqa":
        return
    # The test can see each feature: without the window the output moves a lot. Padding cannot reach valid
    # positions (right padding, causal attention) but changes the padded ones.
    no_window = jax_hidden(cfg.replace(sliding_window=10 * ids.shape[1]), params, ids, mask)
    assert relative_error(ref[valid], no_window[valid]) > 1e-2
    unpadded = jax_hidden(cfg, params, ids, np.ones_like(mask))
    assert relative_error(ref[~valid], unpadded[~valid]) > 1e-2
    if cfg.attn_logit_softcapping is not None:
        uncapped = jax_hidden(cfg.replace(attn_logit_softcapping=None), params, ids, mask)
        assert relative_error(ref, uncapped) > 1e-3


def test_bf16_tracks_fp32(parity_case):
    name, cfg, model, params, ids, mask = parity_case
    fp32 = jax_hidden(cfg, params, ids, mask)
    bf16 = jitted_apply(cfg.replace(compute_dtype="bfloat16"))({"params": params}, ids, mask)
    assert bf16.dtype == jnp.bfloat16
    err = assert_close(f"gemma2[{name}] bf16 vs fp32", fp32, bf16, "gemma2_bf16")
    # And no worse than transformers' own bf16 run of the same model. `.to(bfloat16)` also rounds the rotary
    # inv_freq buffer, which from_pretrained(dtype=bfloat16) keeps in fp32: put the fp32 one back.
    bf16_model = hf_model(cfg).to(torch.bfloat16)
    bf16_model.rotary_emb.inv_freq = model.rotary_emb.inv_freq.clone()
    assert bf16_model.rotary_emb.inv_freq.dtype == torch.float32
    hf_err = relative_error(hf_hidden(model, ids, mask), hf_hidden(bf16_model, ids, mask))
    print(f"transformers bf16 vs fp32 on the same model: {hf_err:.3e} (sana_jax {err:.3e})")
    assert err <= 1.5 * hf_err


def test_no_mask_equals_all_ones_and_bad_shapes_raise():
    cfg = TINY
    params = random_params(cfg)
    ids, _ = make_batch(cfg, (7, 7))
    model = text.Gemma2(cfg)
    np.testing.assert_array_equal(jitted_apply(cfg)({"params": params}, ids),
                                  jitted_apply(cfg)({"params": params}, ids, np.ones_like(ids)))
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \(2, 7\), got \(2, 6\)"):
        model.apply({"params": params}, ids, np.ones((2, 6), np.int32))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model.apply({"params": params}, ids[0])


def test_init_matches_transformers_init():
    params = text.init_params(text.Gemma2(TINY), jax.random.key(0))
    for path, leaf in flatten(params).items():
        if path.endswith("weight"):  # Gemma RMSNorm weights start at 0: a scale of 1 + 0
            np.testing.assert_array_equal(leaf, 0.0)
        else:
            assert abs(float(np.std(leaf)) - 0.02) < 0.004, path


def test_gemma2_2b_config_is_transformers_default():
    """Every GEMMA2_2B field against transformers' Gemma2Config defaults (= google/gemma-2-2b config.json)."""
    hf = HFConfig()
    cfg = text.GEMMA2_2B
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window",
                  "attn_logit_softcapping", "rms_norm_eps"):
        assert getattr(cfg, field) == getattr(hf, field), field
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 10000.0
    assert [("sliding_attention" if s else "full_attention") for s in cfg.is_sliding] == hf.layer_types
    assert hf.hidden_activation == "gelu_pytorch_tanh"
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.intermediate_size, cfg.sliding_window, cfg.query_pre_attn_scalar,
            cfg.attn_logit_softcapping, cfg.rms_norm_eps) == (2304, 26, 8, 4, 256, 9216, 4096, 256, 50.0, 1e-6)


def test_gemma2_2b_parameter_count_and_shapes():
    """jax.eval_shape of the 2B config against transformers' Gemma2Model (meta device: no memory)."""
    model = text.Gemma2(text.GEMMA2_2B)
    abstract = flatten(text.abstract_params(model))
    # Gemma2Model(Gemma2Config()) on the meta device, summed in transformers 5.24: 2,614,341,888.
    assert sum(int(np.prod(leaf.shape)) for leaf in abstract.values()) == 2_614_341_888
    with torch.device("meta"):
        hf = Gemma2Model(HFConfig())
    hf_shapes = {key: tuple(value.shape) for key, value in hf.state_dict().items()}
    assert hf_shapes == g2.hf_shapes(text.GEMMA2_2B)
    assert abstract["layers/self_attn/k_proj/kernel"].shape == (26, 2304, 1024)
    # The whole forward at SANA's size, shapes only.
    ids = jax.ShapeDtypeStruct((2, 300), jnp.int32)
    out = jax.eval_shape(model.apply, {"params": text.abstract_params(model)}, ids, ids)
    assert out.shape == (2, 300, 2304) and out.dtype == jnp.float32


def test_every_parameter_has_logical_axes():
    axes = flatten(text.logical_axes(text.Gemma2(TINY)))
    shapes = flatten(text.abstract_params(text.Gemma2(TINY)))
    assert axes.keys() == shapes.keys()
    for path, spec in axes.items():
        assert len(spec) == len(shapes[path].shape) and all(name is not None for name in spec), (path, spec)
        assert (spec[0] == "layers") == path.startswith("layers/"), (path, spec)
    assert tuple(axes["embedding"]) == ("vocab", "embed")
    assert tuple(axes["layers/self_attn/q_proj/kernel"]) == ("layers", "embed", "heads")


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="not a multiple of num_key_value_heads"):
        TINY.replace(num_key_value_heads=3)
    with pytest.raises(ValueError, match="layer_types has 2 entries for 3 layers"):
        TINY.replace(layer_types=("full_attention", "full_attention"))
    with pytest.raises(ValueError, match="unknown layer_types"):
        TINY.replace(layer_types=("full_attention", "chunked_attention", "full_attention"))
    with pytest.raises(ValueError, match="compute_dtype"):
        TINY.replace(compute_dtype="float16")


def random_params(cfg, seed=0):
    rng = np.random.default_rng(seed)
    shapes = g2.jax_shapes(cfg)
    return unflatten({path: rng.standard_normal(shape).astype(np.float32) for path, shape in shapes.items()})


def test_round_trips_are_bit_exact():
    cfg = CONFIGS["mqa"]
    params = random_params(cfg)
    back = g2.hf_to_jax(g2.jax_to_hf(params, cfg), cfg)
    for path, value in flatten(params).items():
        np.testing.assert_array_equal(flatten(back)[path], value, err_msg=path)
    state = state_dict_numpy(hf_model(cfg))
    again = g2.jax_to_hf(g2.hf_to_jax(state, cfg), cfg)
    assert again.keys() == state.keys()
    for key, value in state.items():
        np.testing.assert_array_equal(again[key], value, err_msg=key)


def test_causal_lm_layout_and_lm_head():
    cfg = TINY
    state = state_dict_numpy(hf_model(cfg))
    expected = g2.hf_to_jax(state, cfg)
    lm = {f"model.{key}": value for key, value in state.items()}
    for with_head in (False, True):
        if with_head:
            lm["lm_head.weight"] = state["embed_tokens.weight"]
        got = g2.hf_to_jax(lm, cfg)
        for path, value in flatten(expected).items():
            np.testing.assert_array_equal(flatten(got)[path], value, err_msg=path)
    lm["lm_head.weight"] = np.zeros((cfg.vocab_size, 3), np.float32)
    with pytest.raises(ValueError, match=r"'lm_head.weight': expected shape \(160, 40\), got \(160, 3\)"):
        g2.hf_to_jax(lm, cfg)


@pytest.mark.parametrize("bad", ["unknown", "missing", "shape", "mixed_prefix", "dtype"])
def test_conversion_is_strict(bad):
    cfg = TINY
    state = g2.jax_to_hf(random_params(cfg), cfg)
    if bad == "unknown":
        state["layers.0.self_attn.q_norm.weight"] = np.zeros(12, np.float32)
        message = r"unexpected 1 key\(s\): layers.0.self_attn.q_norm.weight"
    elif bad == "missing":
        del state["layers.2.mlp.up_proj.weight"]
        message = r"missing 1 key\(s\): layers.2.mlp.up_proj.weight"
    elif bad == "shape":
        state["layers.1.self_attn.k_proj.weight"] = np.zeros((12, 40), np.float32)
        message = r"'layers.1.self_attn.k_proj.weight': expected shape \(24, 40\), got \(12, 40\)"
    elif bad == "mixed_prefix":
        state["model.norm.weight"] = state.pop("norm.weight")
        state["model.layers.0.mlp.up_proj.weight"] = state.pop("layers.0.mlp.up_proj.weight")
        message = r"my.safetensors: mixes Gemma2ForCausalLM keys \(model.\*\) with 33 key\(s\) outside model\."
    else:
        state["norm.weight"] = state["norm.weight"].astype(np.float64)
        message = r"'norm.weight': dtype float64"
    with pytest.raises(ValueError, match=message):
        g2.hf_to_jax(state, cfg, source="my.safetensors")
    with pytest.raises(ValueError, match="params for config 'tiny'.*missing 1 key"):
        params = flatten(random_params(cfg))
        del params["norm/weight"]
        g2.jax_to_hf(unflatten(params), cfg)


@pytest.mark.parametrize("layout", ["causal_lm_bf16", "model_fp32"])
def test_load_gemma2_from_transformers_folder(tmp_path, layout):
    """save_pretrained folders (tied lm_head, bf16 or fp32) load strictly and reproduce transformers' output."""
    cfg = TINY
    if layout == "causal_lm_bf16":
        hf_model(cfg, cls=Gemma2ForCausalLM).to(torch.bfloat16).save_pretrained(tmp_path)
        # Read back by transformers in fp32 (`.float()` on the bf16 model would keep its bf16-rounded rotary
        # inv_freq buffer, which from_pretrained recomputes in fp32).
        reference = Gemma2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32,
                                                      attn_implementation="eager").model.eval()
    else:
        reference = hf_model(cfg)
        reference.save_pretrained(tmp_path)
    encoder, params = text.load_gemma2(str(tmp_path))
    assert encoder.config.replace(name=TINY.name) == TINY.replace(layer_types=tuple(
        "sliding_attention" if s else "full_attention" for s in TINY.is_sliding))
    ids, mask = make_batch(cfg)
    assert_close(f"load_gemma2[{layout}]", hf_hidden(reference, ids, mask),
                 jitted_apply(encoder.config)({"params": params}, ids, mask), "gemma2_fp32")
    _, bf16_params = text.load_gemma2(str(tmp_path), compute_dtype="bfloat16", param_dtype="bfloat16")
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(bf16_params)} == {jnp.dtype(jnp.bfloat16)}


def test_export_hf_loads_in_transformers(tmp_path):
    cfg = CONFIGS["mqa"]
    params = g2.hf_to_jax(state_dict_numpy(hf_model(cfg, seed=3)), cfg)
    g2.export_hf(cfg, params, str(tmp_path / "out"))
    reloaded = Gemma2Model.from_pretrained(str(tmp_path / "out"), attn_implementation="eager").eval()
    ids, mask = make_batch(cfg)
    assert_close("export_hf -> transformers", jax_hidden(cfg, params, ids, mask), hf_hidden(reloaded, ids, mask),
                 "gemma2_fp32")
    with pytest.raises(FileExistsError):
        g2.export_hf(cfg, params, str(tmp_path / "out"))


def test_read_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        g2.read_hf_folder(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(g2.hf_config(TINY)))
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        g2.read_hf_folder(str(tmp_path))
    for field, value in (("hidden_activation", "gelu"), ("model_type", "gemma3"), ("attention_bias", True),
                         ("rope_scaling", {"rope_type": "linear", "factor": 2.0})):
        with pytest.raises(ValueError, match=field if field != "model_type" else "model_type 'gemma3'"):
            g2.config_from_hf(dict(g2.hf_config(TINY), **{field: value}))
    # transformers 5 writes rope_parameters; older configs rope_theta; omitted fields take Gemma-2 defaults.
    assert g2.config_from_hf({"rope_parameters": {"rope_theta": 123.0, "rope_type": "default"}}).rope_theta == 123.0
    assert g2.config_from_hf({"model_type": "gemma2"}).replace(name="gemma2_2b") == text.GEMMA2_2B


# ---- prompt encoding ----

PROMPTS = ["A red FOX jumps over the lazy dog  ", "an astronaut riding a horse on the moon",
           " ".join(["a very long prompt about a cat and a dog"] * 4)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny WordLevel tokenizer (tests/helpers.py) over SANA's CHI and the prompts."""
    corpus = list(text.SANA_CHI) + [p.lower() for p in PROMPTS]
    path = save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"), corpus)
    assert len(text.load_tokenizer(path)) <= TINY.vocab_size
    return path


def test_tokenize_prompts_length_rule_and_select_index(tokenizer_dir):
    tokenizer = text.load_tokenizer(tokenizer_dir)
    num_chi = len(tokenizer.encode("\n".join(text.SANA_CHI)))
    tokens = text.tokenize_prompts(tokenizer, PROMPTS, max_length=16)
    total = num_chi + 16 - 2
    assert tokens.input_ids.shape == tokens.attention_mask.shape == (3, total)
    assert tokens.select == (0,) + tuple(range(total - 15, total))
    assert (tokens.input_ids[:, 0] == 2).all()  # BOS, kept by select
    lengths = tokens.attention_mask.sum(1)
    assert lengths[2] == total  # truncated to T
    # Right padding, pad id 0; prompt 0 = CHI + 8 words ("sana" strips but keeps case: "FOX" maps to <unk>).
    assert (tokens.input_ids[0] == 3).sum() >= 1
    assert lengths[0] == num_chi + 8 and (tokens.input_ids[0, lengths[0]:] == 0).all()
    negative = text.tokenize_prompts(tokenizer, ["", ""], chi=None, max_length=16)
    assert negative.select is None and negative.input_ids.shape == (2, 16)
    np.testing.assert_array_equal(negative.attention_mask.sum(1), [1, 1])  # BOS only
    with pytest.raises(ValueError, match="prompts is empty"):
        text.tokenize_prompts(tokenizer, [])


def test_encode_prompts_matches_diffusers(tokenizer_dir):
    """sana_jax.text.encode_prompts == SanaPipeline.encode_prompt: prompts with CHI, without CHI, the negative
    prompt (no CHI, no select index); embeddings within fp32 rounding at every position, masks equal."""
    from diffusers import SanaPipeline

    cfg = TINY
    model = hf_model(cfg, seed=5)
    params = g2.hf_to_jax(state_dict_numpy(model), cfg)
    tokenizer = text.load_tokenizer(tokenizer_dir)
    pipe = SanaPipeline(tokenizer=tokenizer, text_encoder=model, vae=None, transformer=None, scheduler=None)
    encoder = text.Gemma2(cfg)
    for chi in (text.SANA_CHI, None):
        with torch.no_grad():
            emb, mask, neg_emb, neg_mask = pipe.encode_prompt(
                PROMPTS, do_classifier_free_guidance=True, negative_prompt="", max_sequence_length=16,
                complex_human_instruction=list(chi) if chi else None, device="cpu")
        ours, our_mask = text.encode_prompts(encoder, params, tokenizer, PROMPTS, chi=chi, max_length=16,
                                             preprocess="diffusers")
        neg, our_neg_mask = text.encode_prompts(encoder, params, tokenizer, [""] * len(PROMPTS), chi=None,
                                                max_length=16, preprocess="diffusers")
        label = "chi" if chi else "no_chi"
        assert ours.shape == (3, 16, cfg.hidden_size) and neg.shape == (3, 16, cfg.hidden_size)
        np.testing.assert_array_equal(np.asarray(our_mask), mask.numpy())
        np.testing.assert_array_equal(np.asarray(our_neg_mask), neg_mask.numpy())
        assert_close(f"encode_prompts[{label}] embeddings", emb, ours, "gemma2_fp32")
        assert_close(f"encode_prompts[{label}] negative embeddings", neg_emb, neg, "gemma2_fp32")
    assert int(np.asarray(our_neg_mask).sum()) == 3  # "" is BOS alone
    # "sana" preprocessing keeps case (NVlabs strips only), so the upper-case prompt encodes differently.
    kept_case, _ = text.encode_prompts(encoder, params, tokenizer, PROMPTS[:1], max_length=16)
    lowered, _ = text.encode_prompts(encoder, params, tokenizer, PROMPTS[:1], max_length=16, preprocess="diffusers")
    assert relative_error(lowered, kept_case) > 1e-3


def test_benchmark_runs_tiny(capsys):
    """benchmarks/gemma2_encode.py --tiny on CPU (without the slow CPU torch.compile): JSON lines, sane numbers."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks",
                        "gemma2_encode.py")
    spec = importlib.util.spec_from_file_location("gemma2_encode_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--no-compile", "--iters", "1", "--warmup", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [line["impl"] for line in lines] == ["jax", "torch_eager", "summary", "parity_fp32"]
    assert all(line["ms"] > 0 for line in lines[:2])
    summary, parity = lines[2], lines[3]
    # bf16 on both sides, same weights: a few bf16 roundings apart.
    assert summary["max_rel_diff_jax_vs_torch_eager"] < TOLERANCES["gemma2_bf16"]
    assert summary["flops"] == bench.flops(text.TINY, 2, 24)
    assert parity["max_rel_diff_valid"] <= TOLERANCES["gemma2_fp32"]
    assert parity["max_rel_diff_padded"] <= TOLERANCES["gemma2_fp32"]
