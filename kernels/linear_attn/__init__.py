"""ReLU linear attention (SANA LiteLA); maths in README.md.

`get(backend)` is the one place a backend is chosen: `"naive"` (`naive.py`, plain PyTorch, any device and
dtype) or `"triton"` (`fused.py`, fused Triton kernels, fp32/fp16/bf16 on CUDA or under the Triton interpreter).
Triton is imported only when that backend is asked for.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch

from .naive import relu_linear_attention

Backend = Literal["naive", "triton"]
BACKENDS: tuple[str, ...] = ("naive", "triton")


def get(backend: Backend) -> Callable[..., torch.Tensor]:
    """The linear-attention op `(q, k, v [B, N, H, D], eps=1e-8) -> [B, N, H, D]` of `backend`.

    Raises:
        ValueError: for a backend not in `BACKENDS`.
    """
    if backend == "naive":
        return relu_linear_attention
    if backend == "triton":
        from .fused import fused_relu_linear_attention

        return fused_relu_linear_attention
    raise ValueError(f"unknown linear attention backend {backend!r}; expected one of {BACKENDS}")


__all__ = ["BACKENDS", "Backend", "get", "relu_linear_attention"]
