"""ReLU linear attention (SANA LiteLA); maths in README.md."""

from .naive import relu_linear_attention

__all__ = ["relu_linear_attention"]
