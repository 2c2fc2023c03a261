"""SANA (`SanaMS`: SANA-1.0, SANA-1.5, SANA-Sprint) in one readable pure-PyTorch file.

Module and parameter names are exactly the keys of the official NVlabs/Sana state_dict (commit 47777fb), so a
released checkpoint loads without remapping (`load_official`). Channels-first at the API (latents
`[B, C, H, W]`), tokens row-major over (h, w) inside. fp32-capable; the compute dtype is the parameter dtype.

Shape letters: B batch, N = h*w image tokens, L caption tokens, D hidden size, H heads, C channels.
"""

from __future__ import annotations

import math
import os
import pickle
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from sana_kernels.linear_attn import Backend, get as get_linear_attention
from sana_kernels.linear_attn.naive import relu_linear_attention

# (q, k, v [B, N, H, D], eps) -> [B, N, H, D]; see kernels/linear_attn/README.md.
LinearAttention = Callable[..., torch.Tensor]

# Buffers of the official model that the forward never reads: `pos_embed` is recomputed for every grid and
# `y_embedder.y_embedding` is the null caption (a training-time stand-in for dropped captions).
IGNORED_OFFICIAL_KEYS = ("pos_embed", "y_embedder.y_embedding")

FP16_MAX = 65504.0


def t2i_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


def get_2d_sincos_pos_embed(dim: int, grid_hw: tuple[int, int], base_size: int,
                            pe_interpolation: float) -> torch.Tensor:
    """SANA's 2-D sin-cos position embedding for an h x w token grid, `[h*w, dim]` float32, tokens row-major.

    Coordinates (float32): row i / (h / base_size) / pe_interpolation, column j / (w / base_size) / pe_interpolation.
    The first dim/2 channels encode the column (w) coordinate, the last dim/2 the row (h); each half is
    [sin(pos * omega), cos(pos * omega)] with omega = 1 / 10000^(arange(dim/4) / (dim/4)), computed in float64.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    h, w = grid_hw
    rows = torch.arange(h, dtype=torch.float32) / (h / base_size) / pe_interpolation  # [h]
    cols = torch.arange(w, dtype=torch.float32) / (w / base_size) / pe_interpolation  # [w]
    rows = rows[:, None].expand(h, w).reshape(-1).double()  # [N]
    cols = cols[None, :].expand(h, w).reshape(-1).double()  # [N]
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]

    def embed_1d(pos):  # [N] -> [N, dim/2]
        out = pos[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(cols), embed_1d(rows)], dim=1).float()  # [N, dim]


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """Where SANA computes in fp32 whatever the activation dtype: fp32, or fp64 for fp64 parity checks."""
    return torch.promote_types(dtype, torch.float32)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis: normalised in fp32, times the weight, cast back to the input dtype."""

    def __init__(self, dim: int, eps: float, scale_factor: float = 1.0):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim) * scale_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(accum_dtype(x.dtype))
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, N, D]


class TimestepEmbedder(nn.Module):
    """Sinusoidal features (256: [cos | sin], fp32) of a float scalar per row, then Linear, SiLU, Linear."""

    def __init__(self, dim: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)
        args = t[:, None].to(dtype) * freqs[None]  # [B, half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        dtype = self.mlp[0].weight.dtype
        t_freq = self.sinusoidal(t, self.frequency_dim, dtype=accum_dtype(dtype)).to(dtype)
        return self.mlp(t_freq)  # [B, D]


class CaptionMlp(nn.Module):
    """timm `Mlp` as SANA builds it: fc1, GELU(tanh), fc2."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(y)))


class CaptionEmbedder(nn.Module):
    def __init__(self, caption_channels: int, dim: int):
        super().__init__()
        self.y_proj = CaptionMlp(caption_channels, dim)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)  # [B, L, C_cap] -> [B, L, D]


class LiteLA(nn.Module):
    """Linear self-attention: qkv (no bias), optional RMSNorm on q and k over all of D, ReLU linear attention, proj."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, norm_eps: float, eps: float,
                 linear_attn: LinearAttention):
        super().__init__()
        self.num_heads = num_heads
        self.eps = eps
        self.linear_attn = linear_attn
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, eps=norm_eps) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps=norm_eps) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # [B, N, C] each
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.reshape(B, N, self.num_heads, -1) for t in (q, k, v))  # [B, N, H, C/H]
        out = self.linear_attn(q, k, v, eps=self.eps).reshape(B, N, C).to(x.dtype)
        out = self.proj(out)
        if out.dtype == torch.float16:
            # The original clips under fp16 so that an overflowing projection saturates instead of becoming inf.
            out = out.clip(-FP16_MAX, FP16_MAX)
        return out


class MultiHeadCrossAttention(nn.Module):
    """Softmax cross-attention from image tokens to caption tokens, softmax in fp32 (Sprint's "vanilla" form).

    q from `q_linear`, [k | v] from `kv_linear` (k first); optional RMSNorm on q and k over all of D before the
    head split; scale 1/sqrt(head dim); the caption mask arrives as an additive bias over the keys.
    """

    def __init__(self, dim: int, num_heads: int, cross_norm: bool, cross_norm_eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(dim, eps=cross_norm_eps) if cross_norm else nn.Identity()
        self.k_norm = RMSNorm(dim, eps=cross_norm_eps) if cross_norm else nn.Identity()

    def forward(self, x: torch.Tensor, y: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        L = y.shape[1]
        q = self.q_norm(self.q_linear(x))  # [B, N, C]
        k, v = self.kv_linear(y).chunk(2, dim=-1)  # [B, L, C] each
        k = self.k_norm(k)
        acc = accum_dtype(x.dtype)
        q = q.reshape(B, N, self.num_heads, -1).transpose(1, 2).to(acc)  # [B, H, N, C/H]
        k = k.reshape(B, L, self.num_heads, -1).transpose(1, 2).to(acc)  # [B, H, L, C/H]
        v = v.reshape(B, L, self.num_heads, -1).transpose(1, 2).to(acc)  # [B, H, L, C/H]
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias  # [B, H, N, L]
        out = torch.softmax(scores, dim=-1) @ v  # [B, H, N, C/H]
        out = out.to(x.dtype).transpose(1, 2).reshape(B, N, C)
        return self.proj(out)


class ConvLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, groups: int = 1, bias: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, kernel_size, padding=kernel_size // 2, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class GLUMBConv(nn.Module):
    """SANA's FFN: 1x1 conv D -> 2F + SiLU, 3x3 depthwise, split (value, gate), value * SiLU(gate), 1x1 F -> D."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.inverted_conv = ConvLayer(dim, 2 * hidden, 1)
        self.depth_conv = ConvLayer(2 * hidden, 2 * hidden, 3, groups=2 * hidden)
        self.point_conv = ConvLayer(hidden, dim, 1, bias=False)

    def forward(self, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
        B, N, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *hw)  # [B, D, h, w]
        x = F.silu(self.inverted_conv(x))  # [B, 2F, h, w]
        x = self.depth_conv(x)  # [B, 2F, h, w]
        x, gate = x.chunk(2, dim=1)  # [B, F, h, w] each
        x = self.point_conv(x * F.silu(gate))  # [B, D, h, w]
        return x.reshape(B, C, N).transpose(1, 2)  # [B, N, D]


class SanaMSBlock(nn.Module):
    """adaLN-single block: gated linear self-attention, ungated cross-attention, gated GLUMBConv."""

    def __init__(self, cfg: Any, linear_attn: LinearAttention):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.attn = LiteLA(D, D // cfg.linear_head_dim, cfg.qk_norm, cfg.norm_eps, cfg.linear_attn_eps, linear_attn)
        self.cross_attn = MultiHeadCrossAttention(D, cfg.num_cross_heads, cfg.cross_norm, cfg.cross_norm_eps)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = GLUMBConv(D, int(D * cfg.mlp_ratio))
        self.scale_shift_table = nn.Parameter(torch.randn(6, D) / D**0.5)

    def forward(self, x: torch.Tensor, y: torch.Tensor, t0: torch.Tensor, y_bias: torch.Tensor,
                hw: tuple[int, int]) -> torch.Tensor:
        B = x.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t0.reshape(B, 6, -1)
        ).chunk(6, dim=1)  # [B, 1, D] each
        x = x + gate_msa * self.attn(t2i_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + self.cross_attn(x, y, y_bias)
        x = x + gate_mlp * self.mlp(t2i_modulate(self.norm2(x), shift_mlp, scale_mlp), hw)
        return x  # [B, N, D]


class T2IFinalLayer(nn.Module):
    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)  # [B, 1, D] each
        return self.linear(t2i_modulate(self.norm_final(x), shift, scale))  # [B, N, p*p*C_out]


def _check_config(cfg: Any) -> None:
    D = cfg.hidden_size
    if D % cfg.linear_head_dim:
        raise ValueError(f"hidden_size {D} is not a multiple of linear_head_dim {cfg.linear_head_dim}")
    if D % cfg.num_cross_heads:
        raise ValueError(f"hidden_size {D} is not a multiple of num_cross_heads {cfg.num_cross_heads}")
    if cfg.logvar and not cfg.guidance_embeds:
        raise ValueError("logvar=True is a Sprint head and needs guidance_embeds=True")


class SanaRef(nn.Module):
    """SanaMS with the official parameter names.

    Args:
        cfg: any object with `sana_jax.configs.SanaConfig`'s field names (hidden_size, depth, linear_head_dim,
            num_cross_heads, mlp_ratio, caption_channels, in_channels, out_channels, patch_size, sample_size,
            qk_norm, cross_norm, use_pe, pe_interpolation, guidance_embeds, guidance_embeds_scale, logvar,
            y_norm_scale_factor, norm_eps, cross_norm_eps, linear_attn_eps). Kept as `self.config`.
        linear_attn: the linear self-attention op, `(q, k, v [B, N, H, D], eps) -> [B, N, H, D]`, or a backend
            name for `sana_kernels.linear_attn.get`: `"naive"` or `"triton"` (fused kernels, CUDA, fp32/fp16/bf16).
            Default: `sana_kernels.linear_attn.naive.relu_linear_attention` (= `"naive"`).

    Parameters are initialised as the original `initialize_weights` does (see `_init_weights`).
    """

    def __init__(self, cfg: Any, linear_attn: LinearAttention | Backend = relu_linear_attention):
        super().__init__()
        _check_config(cfg)
        if isinstance(linear_attn, str):
            linear_attn = get_linear_attention(linear_attn)
        self.config = cfg
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.cfg_embedder = TimestepEmbedder(D) if cfg.guidance_embeds else None
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, D)
        self.attention_y_norm = RMSNorm(D, eps=cfg.norm_eps, scale_factor=cfg.y_norm_scale_factor)
        self.blocks = nn.ModuleList([SanaMSBlock(cfg, linear_attn) for _ in range(cfg.depth)])
        self.final_layer = T2IFinalLayer(D, cfg.patch_size, cfg.out_channels)
        self.logvar_linear = nn.Linear(D, 1) if cfg.logvar else None
        self._init_weights()

    def _init_weights(self) -> None:
        """Original SANA init (47777fb): every Linear xavier-uniform with zero bias; the patch-embedding conv
        xavier-uniform on its [D, C*p*p] view; N(0, 0.02) for the timestep MLP, t_block and caption MLP weights.
        Convs keep PyTorch's default, RMSNorm weights ones * scale, scale_shift_tables randn / sqrt(D). No zero-init.
        """
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        for linear in (self.t_embedder.mlp[0], self.t_embedder.mlp[2], self.t_block[1],
                       self.y_embedder.y_proj.fc1, self.y_embedder.y_proj.fc2):
            nn.init.normal_(linear.weight, std=0.02)

    @property
    def dtype(self) -> torch.dtype:
        return self.x_embedder.proj.weight.dtype

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                guidance: torch.Tensor | None = None, return_intermediates: bool = False,
                return_logvar: bool = False):
        """Flow velocity for latents `x`.

        Args:
            x: `[B, C_in, H, W]` latents; H and W multiples of `patch_size`.
            timestep: `[B]` float, embedded as given (no truncation here: SANA/1.5 samplers pass 0..1000,
                truncated to integers by the caller as diffusers' scheduler does; Sprint passes t in [0, 1]).
            y: `[B, L, caption_channels]` or the original's `[B, 1, L, caption_channels]`.
            mask: `[B, L]`, 1 keep / 0 padding (any dtype), or None for no padding. Becomes the additive bias
                (1 - mask) * -10000 over cross-attention keys; padded tokens still pass through y_proj and y_norm.
            guidance: `[B]` raw guidance scale (e.g. 4.5); required iff `config.guidance_embeds`. Embedded as
                `cfg_embedder(guidance * guidance_embeds_scale)` and added to the timestep embedding.
            return_intermediates: also return a dict of named activations (the golden fixtures' names):
                `x_embedder` [B, N, D] (before PE), `t_embedder` [B, D] (before the guidance embedding is
                added), `cfg_embedder` [B, D] (Sprint), `t_block` [B, 6D], `y_embedder` [B, L, D],
                `attention_y_norm` [B, L, D], `block.{i}.out` [B, N, D], `final_layer` [B, N, p*p*C_out].
            return_logvar: also return `logvar_linear(t)` [B, 1] (Sprint's sCM loss head) on the combined
                timestep (+ guidance) embedding, as the original SanaMS does.

        Returns:
            `[B, C_out, H, W]` in the parameter dtype; with the flags, a tuple
            `(out, logvar)`, `(out, intermediates)` or `(out, logvar, intermediates)`.
        """
        cfg = self.config
        if x.ndim != 4:
            raise ValueError(f"x must be [B, C, H, W], got shape {tuple(x.shape)}")
        B, _, H, W = x.shape
        p = cfg.patch_size
        if H % p or W % p:
            raise ValueError(f"latent size {H}x{W} is not a multiple of patch_size {p}")
        hw = (H // p, W // p)
        if y.ndim == 4:
            if y.shape[1] != 1:
                raise ValueError(f"4-D y must be [B, 1, L, C], got shape {tuple(y.shape)}")
            y = y[:, 0]
        if y.ndim != 3 or y.shape[0] != B:
            raise ValueError(f"y must be [B={B}, L, C], got shape {tuple(y.shape)}")
        if mask is not None and tuple(mask.shape) != tuple(y.shape[:2]):
            raise ValueError(f"mask must be [B, L] = {tuple(y.shape[:2])}, got shape {tuple(mask.shape)}")
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this model embeds the guidance scale (config.guidance_embeds): pass guidance=[B]")
        if not cfg.guidance_embeds and guidance is not None:
            raise ValueError("guidance was given but config.guidance_embeds is off: the model has no cfg_embedder")
        if return_logvar and self.logvar_linear is None:
            raise ValueError("return_logvar=True needs config.logvar")

        dtype = self.dtype
        inter: dict[str, torch.Tensor] = {}
        x = self.x_embedder(x.to(dtype))  # [B, N, D]
        inter["x_embedder"] = x
        if cfg.use_pe:
            pos = get_2d_sincos_pos_embed(cfg.hidden_size, hw, cfg.sample_size // p, cfg.pe_interpolation)
            x = x + pos.to(x.device, dtype)[None]

        t = self.t_embedder(timestep)  # [B, D]
        inter["t_embedder"] = t
        if self.cfg_embedder is not None:
            g = self.cfg_embedder(guidance * cfg.guidance_embeds_scale)  # [B, D]
            inter["cfg_embedder"] = g
            t = t + g
        t0 = self.t_block(t)  # [B, 6D]
        inter["t_block"] = t0

        y = self.y_embedder(y.to(dtype))  # [B, L, D]
        inter["y_embedder"] = y
        y = self.attention_y_norm(y)
        inter["attention_y_norm"] = y
        if mask is None:
            y_bias = torch.zeros(B, 1, 1, y.shape[1], device=y.device)
        else:
            y_bias = ((1 - mask.float()) * -10000.0)[:, None, None, :]  # [B, 1, 1, L]

        for i, block in enumerate(self.blocks):
            x = block(x, y, t0, y_bias, hw)  # [B, N, D]
            inter[f"block.{i}.out"] = x

        x = self.final_layer(x, t)  # [B, N, p*p*C_out]
        inter["final_layer"] = x
        c = cfg.out_channels
        x = x.reshape(B, hw[0], hw[1], p, p, c)
        out = torch.einsum("nhwpqc->nchpwq", x).reshape(B, c, H, W)  # [B, C_out, H, W]

        extras = []
        if return_logvar:
            extras.append(self.logvar_linear(t))  # [B, 1]
        if return_intermediates:
            extras.append(inter)
        return (out, *extras) if extras else out


def trigflow_forward(model: SanaRef, x: torch.Tensor, s: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None,
                     guidance: torch.Tensor, return_intermediates: bool = False, return_logvar: bool = False):
    """SANA-Sprint's TrigFlow wrapper (`SanaMSCM.forward`, diffusers' `SanaSprintPipeline` step) around `model`.

    With s `[B]` the TrigFlow time in [0, pi/2]: t = sin s / (sin s + cos s); x_in = x * sqrt(t^2 + (1-t)^2);
    F = model(x_in, t, ...) with t passed as continuous [0, 1] (no x1000);
    returns ((1 - 2t) x_in + (1 - 2t + 2t^2) F) / sqrt(t^2 + (1-t)^2), `[B, C_out, H, W]`, plus logvar and
    intermediates as `SanaRef.forward` returns them. The sigma_data scaling of the Sprint sampler is not here.
    """
    t = torch.sin(s) / (torch.sin(s) + torch.cos(s))  # [B]
    tb = t.view(-1, 1, 1, 1)
    norm = torch.sqrt(tb**2 + (1 - tb) ** 2)
    x_in = x * norm
    result = model(x_in, t, y, mask, guidance=guidance, return_intermediates=return_intermediates,
                   return_logvar=return_logvar)
    flow, extras = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    out = ((1 - 2 * tb) * x_in + (1 - 2 * tb + 2 * tb**2) * flow) / norm
    return (out, *extras) if extras else out


def _read_state_dict(source: Mapping[str, Any] | str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    if isinstance(source, Mapping):
        state_dict, origin = source, "state_dict"
    else:
        path = os.fspath(source)
        origin = path
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state_dict = load_file(path)
        elif path.endswith((".pth", ".pt", ".bin")):
            try:
                state_dict = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e:
                raise ValueError(
                    f"{path}: refusing to load: not a weights-only checkpoint (torch.load(weights_only=True) "
                    f"failed; it pickles objects other than tensors and containers): {e}"
                ) from None
            if isinstance(state_dict, Mapping) and "state_dict" in state_dict:
                state_dict = state_dict["state_dict"]
        else:
            raise ValueError(f"{path}: unknown checkpoint format (expected .pth/.pt/.bin or .safetensors)")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{origin}: expected a mapping of parameter names to tensors, got {type(state_dict).__name__}")
    tensors = {}
    for key, value in state_dict.items():
        if hasattr(value, "__array__") and not isinstance(value, torch.Tensor):
            value = torch.tensor(value)
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = value
    return tensors, origin


def load_official(source: Mapping[str, Any] | str | os.PathLike, cfg: Any, strict: bool = True,
                  linear_attn: LinearAttention | Backend = relu_linear_attention) -> SanaRef:
    """A `SanaRef(cfg)` holding an official NVlabs/Sana state_dict, loaded under its own key names.

    Args:
        source: a state_dict (name -> torch tensor or numpy array), or a path to a `.pth` (read with
            `torch.load(weights_only=True)`; a `{"state_dict": ...}` wrapper is unwrapped) or `.safetensors` file.
        cfg: the model configuration (see `SanaRef`); key shapes are checked against it.
        strict: if True (default), any missing or unexpected key raises. `pos_embed` and
            `y_embedder.y_embedding` may always be absent or present: the forward never reads them.
        linear_attn: passed to `SanaRef` (an op or `"naive"` / `"triton"`).

    Raises:
        ValueError: naming every missing/unexpected key and every shape mismatch (key, checkpoint shape,
            model shape); for a `.pth` that is not weights-only; for an unknown file type.
    """
    state_dict, origin = _read_state_dict(source)
    model = SanaRef(cfg, linear_attn=linear_attn)
    expected = model.state_dict()
    given = {k: v for k, v in state_dict.items() if k not in IGNORED_OFFICIAL_KEYS}
    problems = []
    if strict:
        problems += [f"missing key {k!r} (model shape {tuple(v.shape)})" for k, v in expected.items() if k not in given]
        problems += [f"unexpected key {k!r} (checkpoint shape {tuple(v.shape)})"
                     for k, v in given.items() if k not in expected]
    problems += [
        f"{k!r}: checkpoint shape {tuple(v.shape)} != model shape {tuple(expected[k].shape)}"
        for k, v in given.items() if k in expected and v.shape != expected[k].shape
    ]
    if problems:
        raise ValueError(f"{origin} does not match SanaRef({getattr(cfg, 'name', 'config')}):\n  "
                         + "\n  ".join(problems))
    model.load_state_dict({k: v for k, v in given.items() if k in expected}, strict=strict)
    return model
