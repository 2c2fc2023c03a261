"""Gemma-2 prompt encoding: sana_jax.text (jit) vs transformers Gemma2Model eager and torch.compile, one run.

All three run the same random weights (transformers' init, converted with sana_conversion.gemma2) on the same
right-padded token batch in bf16, so the JSON lines also report how far the JAX output is from the eager one.
One JSON object per line: per implementation ms (median), prompts/s, analytic TFLOP/s; then a summary with the
speed ratios. FLOPs: 2 x matmul MACs (projections, MLP, QK^T and PV at full T x T, as both implementations
compute them); the embedding gather and norms are not counted.

GPU (2B config, bf16):  python3 benchmarks/gemma2_encode.py --batch 32 --seq-len 300
CPU smoke test:         python benchmarks/gemma2_encode.py --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# torch shares the GPU in this run: keep JAX from reserving its default 75% of the memory up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sana_conversion import gemma2 as g2  # noqa: E402
from sana_jax import text  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import median_ms  # noqa: E402

PEAK_TFLOPS = 989.0  # H100/H200 dense bf16 (DESIGN.md)


def flops(cfg: text.Gemma2Config, batch: int, length: int) -> float:
    """Forward FLOPs of the decoder stack: 2 per multiply-add of every matmul (see the module docstring)."""
    c, n, k, d, f = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                     cfg.intermediate_size)
    per_token = c * n * d * 2 + c * k * d * 2 + 3 * c * f  # q and o, k and v, gate/up/down
    attention = 2 * n * length * d  # QK^T and PV per query token
    return 2.0 * batch * length * cfg.num_hidden_layers * (per_token + attention)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny config on CPU (smoke test)")
    parser.add_argument("--batch", type=int, default=None, help="prompts per batch (default 32; tiny 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per prompt (default 300; tiny 24)")
    parser.add_argument("--iters", type=int, default=None, help="timed calls (default 20; tiny 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile anchor")
    parser.add_argument("--parity-batch", type=int, default=4,
                        help="prompts of the fp32 full-model parity check after the timings (0 skips it)")
    args = parser.parse_args(argv)

    import torch
    from transformers import Gemma2Config as HFConfig
    from transformers import Gemma2Model

    cfg = (text.TINY if args.tiny else text.GEMMA2_2B).replace(compute_dtype="bfloat16")
    batch = args.batch or (2 if args.tiny else 32)
    length = args.seq_len or (24 if args.tiny else 300)
    iters = args.iters or (2 if args.tiny else 20)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    base = dict(bench="gemma2_encode", config=cfg.name, batch=batch, seq_len=length, dtype="bfloat16",
                torch_device=device, jax_device=str(jax.devices()[0]))

    hf_cfg = HFConfig(**{key: value for key, value in g2.hf_config(cfg).items()
                         if key not in ("architectures", "torch_dtype", "model_type")})
    hf_cfg._attn_implementation = "eager"  # Gemma-2's default: SDPA cannot soft-cap logits
    torch.manual_seed(0)
    with torch.device(device):
        model = Gemma2Model(hf_cfg).eval()
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to(torch.bfloat16)
    # `.to` also rounds the buffers (rotary inv_freq, embedding scale); from_pretrained(dtype=bfloat16) keeps
    # inv_freq in fp32 and the forward casts the scale to the weight dtype, so fp32 buffers reproduce it and keep
    # the fp32 parity check below exact.
    for name, buffer in buffers.items():
        module_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, buffer)
    if device == "cuda":
        torch.cuda.empty_cache()  # release the fp32 init copy before JAX allocates
    # The same weights for JAX: bf16 -> fp32 is exact, and back to bf16 params on the device.
    params = g2.hf_to_jax(model.state_dict(), cfg)
    params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.bfloat16), params)

    rng = np.random.default_rng(0)
    ids = rng.integers(4, cfg.vocab_size, (batch, length)).astype(np.int32)
    lengths = rng.integers(length // 4, length + 1, batch)
    mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)  # right padding, as SANA tokenizes
    ids = np.where(mask == 1, ids, 0).astype(np.int32)

    encoder = text.Gemma2(cfg)
    apply = jax.jit(encoder.apply)
    jax_ids, jax_mask = jnp.asarray(ids), jnp.asarray(mask)
    jax_out = apply({"params": params}, jax_ids, jax_mask)
    jax_ms = median_ms(lambda: apply({"params": params}, jax_ids, jax_mask), jax.block_until_ready,
                       args.warmup, iters)

    torch_ids, torch_mask = torch.as_tensor(ids, device=device).long(), torch.as_tensor(mask, device=device)

    def sync(out):
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    results = {"jax": jax_ms}
    with torch.inference_mode():
        eager_out = model(torch_ids, attention_mask=torch_mask).last_hidden_state
        results["torch_eager"] = median_ms(lambda: model(torch_ids, attention_mask=torch_mask).last_hidden_state,
                                           sync, args.warmup, iters)
        if not args.no_compile:
            compiled = torch.compile(model)
            results["torch_compile"] = median_ms(
                lambda: compiled(torch_ids, attention_mask=torch_mask).last_hidden_state, sync, args.warmup, iters)

    total = flops(cfg, batch, length)
    for impl, ms in results.items():
        tflops = total / (ms * 1e-3) / 1e12
        line = dict(base, impl=impl, ms=round(ms, 3), prompts_per_s=round(batch / (ms * 1e-3), 2),
                    tflops=round(tflops, 2))
        if device == "cuda":
            line["mfu"] = round(tflops / PEAK_TFLOPS, 4)
        print(json.dumps(line), flush=True)

    ref = eager_out.float().cpu().numpy()
    out = np.asarray(jax_out.astype(jnp.float32))
    summary = dict(base, impl="summary", flops=total,
                   speedup_vs_torch_eager=round(results["torch_eager"] / jax_ms, 3),
                   max_rel_diff_jax_vs_torch_eager=float(np.abs(out - ref).max() / np.abs(ref).max()))
    if "torch_compile" in results:
        summary["speedup_vs_torch_compile"] = round(results["torch_compile"] / jax_ms, 3)
    print(json.dumps(summary), flush=True)
    if args.parity_batch:
        del params, apply
        print(json.dumps(dict(base, **parity_fp32(cfg, model, ids[:args.parity_batch], mask[:args.parity_batch]),
                              impl="parity_fp32", dtype="float32")), flush=True)
    return 0


def parity_fp32(cfg, model, ids: np.ndarray, mask: np.ndarray) -> dict:
    """The same weights in fp32 on both sides (torch without TF32, JAX at HIGHEST precision): relative error of the
    JAX last hidden state, at valid and at padded positions (DESIGN.md target at full size: 1e-4)."""
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    model.float()  # the bf16 weights, exactly; the buffers are fp32 already
    device = model.embed_tokens.weight.device
    with torch.inference_mode():
        ref = model(torch.as_tensor(ids, device=device).long(),
                    attention_mask=torch.as_tensor(mask, device=device)).last_hidden_state.cpu().numpy()
    params = jax.tree_util.tree_map(jnp.asarray, g2.hf_to_jax(model.state_dict(), cfg))
    out = np.asarray(jax.jit(text.Gemma2(cfg.replace(compute_dtype="float32")).apply)(
        {"params": params}, jnp.asarray(ids), jnp.asarray(mask)))
    valid = mask == 1
    scale = np.abs(ref).max()
    return dict(parity_batch=int(ids.shape[0]),
                max_rel_diff_valid=float(np.abs(out - ref)[valid].max() / scale),
                max_rel_diff_padded=float(np.abs(out - ref)[~valid].max() / scale) if (~valid).any() else 0.0)


if __name__ == "__main__":
    sys.exit(main())
