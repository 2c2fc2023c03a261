"""Helpers shared by the transformer (model.py), its kernels (glu_conv.py) and the optimizer (optim.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def on_cuda() -> bool:
    """Whether the default backend is a CUDA GPU: where "auto" implementations pick their Pallas / cuDNN kernels."""
    return jax.default_backend() == "gpu" and "cuda" in jax.devices()[0].client.platform_version.lower()


# XLA options of the programs that run the transformer (the train step, the sampling loop, the benchmarks):
# XLA:GPU's Triton GEMM fusions off, so every matmul is a cuBLAS call whose algorithm XLA autotunes, with the
# bias (and a residual add) in cuBLAS's epilogue. On an H200 (benchmarks/RESULTS.md, twentieth session) the 1.6B
# b32 forward took 168.8 ms instead of 171.3 and the b48 training step 783.0 ms instead of 789.4, with 3.9 GiB less
# peak memory. Ignored off GPUs, so CPU results (and the parity tests) do not change; on a GPU a bf16 output can
# differ in its last bit, as cuBLAS adds an epilogue's bias before rounding the product. An option this jax does
# not know fails compilation, in the CPU tests too.
TRANSFORMER_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def triton_params(interpret: bool):
    """compiler_params of a Pallas kernel written for Triton: Triton's defaults (4 warps), named, since without
    compiler params Pallas picks its GPU backend from the jax_pallas_use_mosaic_gpu flag (True by default since jax
    0.10), and Mosaic GPU cannot lower Triton-style kernels. None when interpreted."""
    from jax.experimental.pallas import triton as plgpu

    return None if interpret else plgpu.CompilerParams()


def accum_dtype(dtype) -> jnp.dtype:
    """Where SANA computes in fp32 whatever the activation dtype (norms, softmax, LiteLA): fp32, or fp64 if higher."""
    return jnp.promote_types(dtype, jnp.float32)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """y [..., C] + bias [C]. Same value and gradients as `y + bias`, but the bias gradient (a sum over every
    token) is reduced from the cotangent behind an optimization barrier: in the 1.6B training step XLA:GPU fused
    the SiLU gradient into the inverted conv's bias reduction, one kernel of 4.9 ms per block (profiled,
    benchmarks/RESULTS.md), more than the block's matmuls take."""
    return y + bias


def _add_bias_fwd(y, bias):
    return y + bias, None


def _add_bias_bwd(_, g):
    rows = jax.lax.optimization_barrier(g)  # a plain reduction of the materialised cotangent, nothing fused in
    grad = jnp.sum(rows.astype(accum_dtype(g.dtype)), axis=tuple(range(g.ndim - 1)))
    return g, grad.astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)
