"""Typed, frozen SANA transformer configurations and the released variants.

Every released variant cites the NVlabs/Sana yaml (commit 47777fb) or diffusers repo it comes from. Sizes that
follow from others (heads, head dims, FFN width) are properties, never fields.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

ComputeDtype = Literal["float32", "bfloat16", "float16", "float64"]
RematPolicy = Literal["none", "full", "dots_saveable"]
AttentionImpl = Literal["auto", "xla", "cudnn"]
KernelImpl = Literal["auto", "xla", "pallas"]

_COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "float64")
_REMAT_POLICIES = ("none", "full", "dots_saveable")
_ATTENTION_IMPLS = ("auto", "xla", "cudnn")
_KERNEL_IMPLS = ("auto", "xla", "pallas")


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """A SANA / SANA-1.5 / SANA-Sprint transformer (the T2I `SanaMS` family, patch embedding + linear DiT)."""

    name: str = "custom"
    in_channels: int = 32  # DC-AE f32c32 latent channels
    out_channels: int = 32  # pred_sigma=False: no sigma channels
    hidden_size: int = 1152  # D
    depth: int = 28  # number of SanaMSBlocks
    linear_head_dim: int = 32  # LiteLA head dim; self-attention heads = D / 32
    num_cross_heads: int = 16  # cross-attention heads; head dim = D / heads
    mlp_ratio: float = 2.5  # GLUMBConv gated width int(D * ratio); first conv expands to 2x that
    caption_channels: int = 2304  # Gemma-2-2B hidden size
    model_max_length: int = 300  # caption tokens (for shapes of examples; the model takes any L)
    patch_size: int = 1
    sample_size: int = 32  # latent grid side at the trained resolution (image px / 32): PE base size
    qk_norm: bool = False  # SANA-1.5 / Sprint: RMSNorm over all heads on self-attention q, k
    cross_norm: bool = False  # SANA-1.5 / Sprint: RMSNorm over all heads on cross-attention q, k
    use_pe: bool = False  # 2K/4K: 2-D sin-cos position embedding added after the patch embedding
    pe_interpolation: float = 1.0  # sin-cos grid divisor (2K 1.0, 4K 2.0)
    guidance_embeds: bool = False  # Sprint: second timestep embedder for the guidance scale
    guidance_embeds_scale: float = 0.1  # Sprint's cfg_embed_scale: guidance is embedded as g * 0.1
    logvar: bool = False  # Sprint: logvar_linear head, used only by the sCM training loss
    y_norm_scale_factor: float = 0.01  # init of attention_y_norm.weight
    norm_eps: float = 1e-5  # y_norm and self-attention q/k RMSNorm
    cross_norm_eps: float = 1e-6  # cross-attention q/k RMSNorm (diffusers uses 1e-5 here)
    linear_attn_eps: float = 1e-8  # LiteLA denominator eps as SanaMS builds it (diffusers: 1e-15)
    timestep_scale: float = 1.0  # diffusers pipeline multiplies t by this before the model (Sprint teacher)
    flow_shift: float = 3.0  # sampling/training flow shift of the released recipe
    compute_dtype: ComputeDtype = "float32"  # activations and matmul inputs; params stay fp32. float64 is for
    # parity checks of gradients (needs jax_enable_x64): it removes fp32 rounding from the comparison.
    remat_policy: RematPolicy = "none"  # per scanned block: keep all / recompute all / keep matmul outputs
    # The blocks run under nn.scan (parameters stacked [depth, ...] either way). False: one loop over the blocks.
    # True: the scan fully unrolled, so XLA sees each block's weights and saved activations as their own buffers,
    # with no per-block copies into and out of stacked arrays (H100, 1.6B b8 dots_saveable training step: 217 ->
    # 177 ms, compile 53 -> 60 s, peak 28.6 -> 32.8 GiB). Unrolled, a remat policy saves no memory: XLA computes
    # the rematerialised values beside the forward (1.6B b8: none 181.6 ms, dots_saveable 182.9 ms, the same 32.8
    # GiB peak; XLA:CPU's memory analysis says the same of "full"), so the batch is what fits without remat (1.6B:
    # b24, 449.7 ms, 48.0% MFU, 68.4 GiB, with XLA_PYTHON_CLIENT_MEM_FRACTION=0.95; b16 under JAX's default 75%
    # cap, 305.0-314.5 ms, 45.8-47.2% MFU, 50.6 GiB). Not the default: the unrolled 1.6B forward
    # at b32 did not finish compiling and timing within 160 s (38 s scanned), and the 4.8B was measured scanned,
    # with remat.
    unroll_blocks: bool = False
    # Cross-attention kernel. "xla": einsums + fp32 softmax, any backend and dtype. "cudnn": cuDNN flash attention
    # (CUDA GPUs, bf16/fp16 compute; logits stay fp32 inside the kernel, the [B, H, N, L] probabilities are never
    # stored). "auto": cudnn when the default backend is a CUDA GPU and compute_dtype is 16-bit, else xla.
    attention_impl: AttentionImpl = "auto"
    # GLUMBConv's depthwise 3x3 + gating (sana_jax/glu_conv.py). "xla": nine shifted multiply-adds, any backend.
    # "pallas": one fused GPU kernel, same fp32 accumulation (compiled on CUDA GPUs, interpreted elsewhere: slow,
    # for tests). "auto": pallas on a CUDA GPU, else xla. Both kernels run per device on batch-sharded meshes.
    glu_impl: KernelImpl = "auto"
    # LiteLA (sana_jax/linear_attention.py): "xla" einsums in fp32, any backend; "pallas" two-pass GPU kernels
    # (forward and backward) reading q, k, v straight from the qkv projection, fp32-exact products (interpreted
    # off CUDA); "auto": pallas on a CUDA GPU.
    linear_attn_impl: KernelImpl = "auto"

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"SanaConfig {self.name!r}: {msg}")

        for field in ("in_channels", "out_channels", "hidden_size", "depth", "linear_head_dim",
                      "num_cross_heads", "caption_channels", "model_max_length", "patch_size", "sample_size"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{field} must be a positive int, got {value!r}")
        for field in ("qk_norm", "cross_norm", "use_pe", "guidance_embeds", "logvar", "unroll_blocks"):
            if not isinstance(getattr(self, field), bool):
                fail(f"{field} must be a bool, got {getattr(self, field)!r}")
        if self.hidden_size % self.linear_head_dim:
            fail(f"hidden_size {self.hidden_size} is not a multiple of linear_head_dim {self.linear_head_dim}")
        if self.hidden_size % self.num_cross_heads:
            fail(f"hidden_size {self.hidden_size} is not a multiple of num_cross_heads {self.num_cross_heads}")
        if self.mlp_ratio <= 0 or int(self.hidden_size * self.mlp_ratio) <= 0:
            fail(f"mlp_ratio must give a positive FFN width, got {self.mlp_ratio!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            fail(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}")
        if self.remat_policy not in _REMAT_POLICIES:
            fail(f"remat_policy must be one of {_REMAT_POLICIES}, got {self.remat_policy!r}")
        if self.attention_impl not in _ATTENTION_IMPLS:
            fail(f"attention_impl must be one of {_ATTENTION_IMPLS}, got {self.attention_impl!r}")
        if self.attention_impl == "cudnn" and self.compute_dtype not in ("bfloat16", "float16"):
            fail(f"attention_impl='cudnn' needs a bfloat16 or float16 compute_dtype, got {self.compute_dtype!r}")
        for field in ("glu_impl", "linear_attn_impl"):
            if getattr(self, field) not in _KERNEL_IMPLS:
                fail(f"{field} must be one of {_KERNEL_IMPLS}, got {getattr(self, field)!r}")
        if self.logvar and not self.guidance_embeds:
            fail("logvar=True is a Sprint head and needs guidance_embeds=True")

    @property
    def num_heads(self) -> int:
        """LiteLA self-attention heads (36 for 0.6B, 70 for 1.6B)."""
        return self.hidden_size // self.linear_head_dim

    @property
    def cross_head_dim(self) -> int:
        return self.hidden_size // self.num_cross_heads

    @property
    def ffn_hidden(self) -> int:
        """GLUMBConv gated width int(D * mlp_ratio): 2880 for 0.6B, 5600 for 1.6B."""
        return int(self.hidden_size * self.mlp_ratio)

    def replace(self, **changes) -> "SanaConfig":
        return dataclasses.replace(self, **changes)


# configs/Sana_600M_config/Sana_600M_img1024.yaml (SanaMS_600M_P1_D28, flow_shift 4.0 at 1024 px).
SANA_600M = SanaConfig(name="sana_600m", hidden_size=1152, depth=28, num_cross_heads=16, sample_size=32,
                       flow_shift=4.0)
# configs/Sana_1600M_config/Sana_1600M_img1024.yaml (SanaMS_1600M_P1_D20).
SANA_1600M = SanaConfig(name="sana_1600m", hidden_size=2240, depth=20, num_cross_heads=20, sample_size=32,
                        flow_shift=3.0)
# configs/sana_config/512ms/Sana_600M_img512.yaml: 16x16 latents, no PE, flow_shift 3.0.
SANA_600M_512 = SANA_600M.replace(name="sana_600m_512", sample_size=16, flow_shift=3.0)
# configs/sana_config/512ms/Sana_1600M_img512.yaml: 16x16 latents, no PE, flow_shift 3.0.
SANA_1600M_512 = SANA_1600M.replace(name="sana_1600m_512", sample_size=16)
# configs/Sana_1600M_config/Sana_1600M_img2048.yaml: use_pe, sincos, pe_interpolation 1.0, 64x64 latents.
SANA_1600M_2K = SANA_1600M.replace(name="sana_1600m_2k", sample_size=64, use_pe=True, pe_interpolation=1.0)
# configs/Sana_1600M_config/Sana_1600M_img4096_bf16.yaml: use_pe, pe_interpolation 2.0, flow_shift 6.0.
SANA_1600M_4K = SANA_1600M.replace(name="sana_1600m_4k", sample_size=128, use_pe=True, pe_interpolation=2.0,
                                   flow_shift=6.0)
# configs/sana1-5_config/1024ms/Sana_1600M_1024px_*.yaml: SANA-1.5 adds qk_norm and cross_norm.
SANA15_1600M = SANA_1600M.replace(name="sana15_1600m", qk_norm=True, cross_norm=True)
# configs/sana1-5_config/1024ms/Sana_4800M_1024px_*.yaml (SanaMS_4800M_P1_D60).
SANA15_4800M = SANA15_1600M.replace(name="sana15_4800m", depth=60)
# configs/sana_sprint_config/1024ms/SanaSprint_600M_1024px_allqknorm_bf16_scm_ladd.yaml:
# qk/cross norm, cfg_embed (scale 0.1), logvar head, vanilla (fp32 softmax) cross-attention.
SANA_SPRINT_600M = SANA_600M.replace(name="sana_sprint_600m", qk_norm=True, cross_norm=True,
                                     guidance_embeds=True, logvar=True, flow_shift=3.0)
# configs/sana_sprint_config/1024ms/SanaSprint_1600M_1024px_allqknorm_bf16_scm_ladd.yaml.
SANA_SPRINT_1600M = SANA_1600M.replace(name="sana_sprint_1600m", qk_norm=True, cross_norm=True,
                                       guidance_embeds=True, logvar=True)
# Numeric tests: the shape of the golden fixtures (2 blocks, D=64, 2 LiteLA heads, 4 cross heads).
TINY = SanaConfig(name="tiny", in_channels=8, out_channels=8, hidden_size=64, depth=2, num_cross_heads=4,
                  caption_channels=24, model_max_length=12, sample_size=8)

VARIANTS: dict[str, SanaConfig] = {
    cfg.name: cfg
    # Order matters to sana_conversion.load: a checkpoint without a pos_embed size hint gets the first match.
    for cfg in (SANA_600M, SANA_1600M, SANA_1600M_2K, SANA_1600M_4K, SANA15_1600M, SANA15_4800M,
                SANA_SPRINT_600M, SANA_SPRINT_1600M, SANA_600M_512, SANA_1600M_512, TINY)
}


def get(name: str, **overrides) -> SanaConfig:
    """A released variant by name, e.g. `get("sana_1600m", compute_dtype="bfloat16")`."""
    if name not in VARIANTS:
        raise ValueError(f"unknown SANA config {name!r}; known: {', '.join(sorted(VARIANTS))}")
    return VARIANTS[name].replace(**overrides) if overrides else VARIANTS[name]
