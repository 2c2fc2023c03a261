"""SANA's text encoder: the Gemma-2 decoder in Flax linen, and SANA's prompt encoding (CHI, select index).

Reads top to bottom: config -> layers (RMSNorm, Dense, rotary table, attention, MLP) -> decoder layer -> model ->
parameter utilities -> loading -> prompt encoding. The model is `transformers.Gemma2Model.forward` (eager
attention) without a KV cache: it returns the last hidden state, after the final norm. Parameter names mirror the
Hugging Face keys (`embed_tokens`, `layers.self_attn.q_proj`, `post_feedforward_layernorm`, `norm`), so conversion
(`sana_conversion.gemma2`) is a table plus transposes and per-layer stacking. Layers run under `nn.scan`: every
layer parameter has a leading `layers` axis. Shapes: B batch, T tokens, C hidden, N query heads, K key/value
heads, G = N / K query heads per key/value head, D head dim, F MLP width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ComputeDtype = Literal["float32", "bfloat16"]
LayerType = Literal["sliding_attention", "full_attention"]
_COMPUTE_DTYPES = ("float32", "bfloat16")
_LAYER_TYPES = ("sliding_attention", "full_attention")


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
    """A Gemma-2 decoder. Defaults are gemma-2-2b's (what SANA uses); field names are Hugging Face's."""

    name: str = "custom"
    vocab_size: int = 256000  # V
    hidden_size: int = 2304  # C
    intermediate_size: int = 9216  # F, GeGLU width
    num_hidden_layers: int = 26
    num_attention_heads: int = 8  # N
    num_key_value_heads: int = 4  # K (grouped-query attention)
    head_dim: int = 256  # D (N * D need not equal C)
    query_pre_attn_scalar: float = 256  # attention logits are scaled by query_pre_attn_scalar ** -0.5
    sliding_window: int = 4096  # a local layer's query sees itself and the sliding_window - 1 keys before it
    # None: Gemma-2's alternation, layers 0, 2, 4, ... local (sliding window) and 1, 3, 5, ... global.
    layer_types: tuple[LayerType, ...] | None = None
    attn_logit_softcapping: float | None = 50.0  # logits -> cap * tanh(logits / cap); None: no capping
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    compute_dtype: ComputeDtype = "float32"  # activations and matmul inputs; params stay fp32

    def __post_init__(self):
        def fail(msg):
            raise ValueError(f"Gemma2Config {self.name!r}: {msg}")

        for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "head_dim", "sliding_window"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                fail(f"{field} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            fail(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads "
                 f"{self.num_key_value_heads}")
        if self.head_dim % 2:
            fail(f"head_dim must be even (rotary embedding rotates halves), got {self.head_dim}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                fail(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            unknown = sorted(set(self.layer_types) - set(_LAYER_TYPES))
            if unknown:
                fail(f"unknown layer_types {unknown}; known: {_LAYER_TYPES}")
        if not self.query_pre_attn_scalar > 0 or not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            fail("query_pre_attn_scalar, rope_theta and rms_norm_eps must be positive")
        if self.attn_logit_softcapping is not None and not self.attn_logit_softcapping > 0:
            fail(f"attn_logit_softcapping must be positive or None, got {self.attn_logit_softcapping!r}")
        if self.compute_dtype not in _COMPUTE_DTYPES:
            fail(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {self.compute_dtype!r}")

    @property
    def is_sliding(self) -> tuple[bool, ...]:
        """Per layer: True where the layer attends within the sliding window (transformers' default pattern)."""
        if self.layer_types is None:
            return tuple(i % 2 == 0 for i in range(self.num_hidden_layers))
        return tuple(t == "sliding_attention" for t in self.layer_types)

    @property
    def num_groups(self) -> int:
        """G: query heads sharing one key/value head."""
        return self.num_attention_heads // self.num_key_value_heads

    def replace(self, **changes) -> "Gemma2Config":
        return dataclasses.replace(self, **changes)


# google/gemma-2-2b (and -it, and Efficient-Large-Model/gemma-2-2b-it, SANA's encoder) config.json; equal to
# transformers' Gemma2Config defaults (transformers 5.24). 2,614,341,888 parameters without the tied lm_head.
GEMMA2_2B = Gemma2Config(name="gemma2_2b")
# Numeric tests: awkward sizes (N * D != C, D = 12), GQA with G = 2, a window shorter than test sequences, a
# small soft-cap that the tanh actually bends, query_pre_attn_scalar != D so using D instead shows.
TINY = Gemma2Config(name="tiny", vocab_size=160, hidden_size=40, intermediate_size=72, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=12, query_pre_attn_scalar=10,
                    sliding_window=6, attn_logit_softcapping=1.0)
VARIANTS = {cfg.name: cfg for cfg in (GEMMA2_2B, TINY)}


def _dtype(cfg: Gemma2Config) -> jnp.dtype:
    return jnp.dtype(cfg.compute_dtype)


def _precision(cfg: Gemma2Config) -> jax.lax.Precision:
    """fp32 models compute fp32 matmuls exactly (no TF32 on GPU/TPU), as the parity targets require."""
    return jax.lax.Precision.HIGHEST if cfg.compute_dtype == "float32" else jax.lax.Precision.DEFAULT


# Gemma2PreTrainedModel._init_weights: N(0, 0.02) for Linear and Embedding, zeros for RMSNorm (a unit scale).
_normal_002 = nn.initializers.normal(0.02)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * (1 + weight), all in fp32, cast back once at the end (Gemma2RMSNorm)."""

    eps: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                            (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        # Gemma scales by (1 + w) in fp32 before the cast; Llama casts first. It matters in bf16.
        return (normed * (1.0 + weight.astype(jnp.float32))).astype(x.dtype)


class Dense(nn.Module):
    """y = x @ kernel in the compute dtype, no bias; kernel [in, out] (the torch weight transposed)."""

    features: int
    config: Gemma2Config
    axes: tuple[str, str]

    @nn.compact
    def __call__(self, x: Array) -> Array:
        dtype = _dtype(self.config)
        kernel = self.param("kernel", nn.with_logical_partitioning(_normal_002, self.axes),
                            (x.shape[-1], self.features), jnp.float32)
        return jnp.matmul(x.astype(dtype), kernel.astype(dtype), precision=_precision(self.config))


def rotary_table(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each [T, D] fp32, for positions 0..T-1, as Gemma2RotaryEmbedding computes them.

    Every fp32 operation is the one torch does (the divisions and the position x frequency product round the
    same way); pow, cos and sin go through fp64 and round once, so they are correctly rounded whatever the
    backend's fp32 transcendentals do (their errors grow with the argument, up to ~T radians here).
    """
    exponent = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)  # [D/2]
    inv_freq = np.float32(1.0) / np.power(np.float64(theta), exponent.astype(np.float64)).astype(np.float32)
    freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq[None]  # [T, D/2], an fp32 product
    angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)  # [T, D]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _rotate_half(x: Array) -> Array:
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: Array, cos: Array, sin: Array) -> Array:
    """x [B, T, heads, D]; cos, sin [T, D] in x's dtype (the halves layout, not interleaved pairs)."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class Attention(nn.Module):
    """Grouped-query attention with rotary positions, soft-capped logits and an fp32 softmax."""

    config: Gemma2Config

    @nn.compact
    def __call__(self, x: Array, mask: Array, cos: Array, sin: Array) -> Array:
        """x [B, T, C], mask [B, T, T] bool (query, key; True attends), cos/sin [T, D] -> [B, T, C]."""
        cfg = self.config
        b, t, c = x.shape
        n, k, g, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_groups, cfg.head_dim
        precision = _precision(cfg)
        q = Dense(n * d, cfg, ("embed", "heads"), name="q_proj")(x).reshape(b, t, n, d)
        key = Dense(k * d, cfg, ("embed", "kv_heads"), name="k_proj")(x).reshape(b, t, k, d)
        value = Dense(k * d, cfg, ("embed", "kv_heads"), name="v_proj")(x).reshape(b, t, k, d)
        q, key = apply_rotary(q, cos, sin), apply_rotary(key, cos, sin)
        # Query head h = k * G + g reads key/value head k (transformers' repeat_kv order).
        q = q.reshape(b, t, k, g, d)
        logits = jnp.einsum("btkgd,bskd->bkgts", q, key, precision=precision,
                            preferred_element_type=jnp.float32)  # [B, K, G, T, T]
        logits = logits * (cfg.query_pre_attn_scalar ** -0.5)
        if cfg.attn_logit_softcapping is not None:
            cap = cfg.attn_logit_softcapping
            logits = jnp.tanh(logits / cap) * cap
        # transformers adds finfo.min where masked; |capped logits| are far below its ulp, so every masked entry
        # becomes exactly finfo.min, which `where` reproduces. A row with no key left (a padded query beyond a
        # local window) is then uniform over all T keys in both implementations, which keeps padded positions
        # finite and equal to transformers'.
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", weights, value, precision=precision).reshape(b, t, n * d)
        return Dense(c, cfg, ("heads", "embed"), name="o_proj")(out)


class MLP(nn.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)), transformers' `gelu_pytorch_tanh`."""

    config: Gemma2Config

    @nn.compact
    def __call__(self, x: Array) -> Array:  # [B, T, C] -> [B, T, C]
        cfg = self.config
        gate = Dense(cfg.intermediate_size, cfg, ("embed", "mlp"), name="gate_proj")(x)
        up = Dense(cfg.intermediate_size, cfg, ("embed", "mlp"), name="up_proj")(x)
        return Dense(cfg.hidden_size, cfg, ("mlp", "embed"), name="down_proj")(nn.gelu(gate, approximate=True) * up)


class DecoderLayer(nn.Module):
    """Gemma2DecoderLayer: sandwich norms around attention and MLP (pre- and post-norm, then the residual).

    Written as a scan body: `(x, is_sliding, full_mask, sliding_mask, cos, sin) -> (x, None)`; sows `out`.
    """

    config: Gemma2Config

    @nn.compact
    def __call__(self, x: Array, is_sliding: Array, full_mask: Array, sliding_mask: Array, cos: Array,
                 sin: Array):
        cfg = self.config
        mask = jnp.where(is_sliding, sliding_mask, full_mask)  # [B, T, T]: this layer's pattern
        h = RMSNorm(cfg.rms_norm_eps, name="input_layernorm")(x)
        h = Attention(cfg, name="self_attn")(h, mask, cos, sin)
        x = x + RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm")(h)
        h = MLP(cfg, name="mlp")(RMSNorm(cfg.rms_norm_eps, name="pre_feedforward_layernorm")(x))
        x = x + RMSNorm(cfg.rms_norm_eps, name="post_feedforward_layernorm")(h)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        self.sow("intermediates", "out", x)
        return x, None


def attention_masks(attention_mask: Array, sliding_window: int) -> tuple[Array, Array]:
    """(full, sliding) bool [B, T, T] (query, key) from a [B, T] 1/0 padding mask, as transformers' masking_utils:
    causal (key <= query) and key not padded; sliding also needs key > query - sliding_window."""
    t = attention_mask.shape[1]
    q_idx, k_idx = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    keep = attention_mask.astype(bool)[:, None, :]  # [B, 1, T]: padding masks keys only
    causal = k_idx <= q_idx
    local = causal & (k_idx > q_idx - sliding_window)
    return causal[None] & keep, local[None] & keep


class Gemma2(nn.Module):
    """The Gemma-2 decoder stack (transformers' Gemma2Model): token ids -> last hidden state."""

    config: Gemma2Config

    @nn.compact
    def __call__(self, input_ids: Array, attention_mask: Array | None = None) -> Array:
        """Encode token ids.

        Args:
          input_ids: [B, T] int token ids.
          attention_mask: [B, T] 1 keep / 0 pad (padding masks keys only); None keeps all. Positions are always
            0..T-1 (Gemma2Model.forward without position_ids), so pad on the right.
        Returns:
          [B, T, C] last hidden state (after the final RMSNorm) in the compute dtype. Valid positions never see
          padding (right padding, causal attention). Padded positions hold what transformers computes there too:
          they attend to the valid keys their causal (and, in local layers, windowed) mask allows, or uniformly to
          all T keys where a local window holds no valid key.
        """
        cfg = self.config
        dtype = _dtype(cfg)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [B, T], got {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask must be [B, T] = {tuple(input_ids.shape)}, got "
                             f"{tuple(attention_mask.shape)}")
        t = input_ids.shape[1]

        table = self.param("embedding", nn.with_logical_partitioning(_normal_002, ("vocab", "embed")),
                           (cfg.vocab_size, cfg.hidden_size), jnp.float32)
        # Gemma2TextScaledWordEmbedding: sqrt(C) as an fp32 scalar, cast to the weight dtype, multiplied there.
        scale = jnp.asarray(np.float32(cfg.hidden_size ** 0.5)).astype(dtype)
        x = jnp.take(table, input_ids, axis=0).astype(dtype) * scale  # [B, T, C]
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        self.sow("intermediates", "embed", x)

        cos, sin = (jnp.asarray(a, dtype) for a in rotary_table(t, cfg.head_dim, cfg.rope_theta))
        full_mask, sliding_mask = attention_masks(attention_mask, cfg.sliding_window)
        layers = nn.scan(
            DecoderLayer,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=cfg.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, name="layers")
        x, _ = layers(x, jnp.asarray(cfg.is_sliding), full_mask, sliding_mask, cos, sin)
        return RMSNorm(cfg.rms_norm_eps, name="norm")(x)


def _init_boxed(model: Gemma2, rng: jax.Array):
    ids = jnp.zeros((1, 2), jnp.int32)
    return model.init(rng, ids, jnp.ones_like(ids))["params"]


def init_params(model: Gemma2, rng: jax.Array) -> dict:
    """transformers' initialisation (N(0, 0.02) matrices, zero norm weights) as a plain dict of fp32 arrays."""
    return nn.unbox(jax.jit(_init_boxed, static_argnums=0)(model, rng))


def abstract_params(model: Gemma2) -> dict:
    """ShapeDtypeStructs of every parameter, without allocating (the 2B model costs nothing)."""
    return nn.unbox(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def logical_axes(model: Gemma2) -> dict:
    """The logical axis names of every parameter (PartitionSpecs of names, `layers` first under `layers`)."""
    return nn.get_partition_spec(jax.eval_shape(lambda rng: _init_boxed(model, rng), jax.random.key(0)))


def intermediates(model: Gemma2, params, input_ids, attention_mask=None) -> tuple[Array, dict[str, Array]]:
    """Run the model and return (last hidden state, {name: [B, T, C]}) with names `embed` (scaled embeddings),
    `layer.{i}` (decoder layer i's output, before the final norm), so a parity test names the first divergence."""
    out, state = model.apply({"params": params}, input_ids, attention_mask, mutable=["intermediates"])
    sown = state["intermediates"]
    named = {"embed": sown["embed"][0]}
    for i, layer_out in enumerate(sown["layers"]["out"][0]):
        named[f"layer.{i}"] = layer_out
    return out, named


def load_gemma2(path: str, *, compute_dtype: ComputeDtype = "float32", param_dtype: str = "float32"):
    """(Gemma2 model, params) from a Hugging Face Gemma-2 folder (config.json + safetensors; Gemma2Model or
    Gemma2ForCausalLM keys). Weights load strictly (every key used, shapes checked); bf16 files upcast exactly.
    `param_dtype="bfloat16"` halves memory for a frozen encoder (exact for bf16 checkpoints)."""
    from sana_conversion.gemma2 import load_gemma2 as _load

    return _load(path, compute_dtype=compute_dtype, param_dtype=param_dtype)


def load_tokenizer(path: str):
    """The tokenizer of a local Hugging Face folder through `transformers.AutoTokenizer` (never the network)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


# The complex human instruction (CHI) of every released SANA yaml (1.0, 1.5, Sprint) and diffusers' SanaPipeline
# default `complex_human_instruction`; joined with "\n" and prefixed to each prompt with no separator.
SANA_CHI: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual descriptions suitable for "
    "image generation. Evaluate the level of detail in the user prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, textures, and spatial "
    "relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly without "
    "overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round shape, sleeping "
    "peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, featuring glowing street "
    "lamps, a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass "
    "skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including any additional "
    "commentary or evaluations:",
    "User Prompt: ",
)
Preprocess = Literal["sana", "diffusers", "none"]


@dataclasses.dataclass(frozen=True)
class PromptTokens:
    """Host-side tokens of a prompt batch: input_ids, attention_mask [B, T] int32 (right padded); `select` are
    the T-indices kept after encoding (BOS + the last max_length - 1), or None to keep all T."""

    input_ids: np.ndarray
    attention_mask: np.ndarray
    select: tuple[int, ...] | None


def _preprocess(prompt: str, mode: Preprocess) -> str:
    if mode == "sana":  # NVlabs app/sana_pipeline.py: prompt.strip()
        return prompt.strip()
    if mode == "diffusers":  # SanaPipeline._text_preprocessing(clean_caption=False)
        return prompt.lower().strip()
    if mode == "none":
        return prompt
    raise ValueError(f"preprocess must be 'sana', 'diffusers' or 'none', got {mode!r}")


def tokenize_prompts(tokenizer, prompts: str | Sequence[str], *, chi: Sequence[str] | None = SANA_CHI,
                     max_length: int = 300, preprocess: Preprocess = "sana") -> PromptTokens:
    """Tokenize as SANA does (host side): with a CHI, text = "\\n".join(chi) + prompt, padded/truncated to
    T = len(tokens(chi)) + max_length - 2 (len counts BOS; the 2 is "[bos], [_]" in SANA's code), and `select`
    = [0] + [T - max_length + 1, ..., T - 1] (BOS and the last max_length - 1 positions). Without one
    (`chi=None` or empty: the negative / null prompt path) plain max_length padding and no selection."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("prompts is empty")
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    texts = [_preprocess(p, preprocess) for p in prompts]
    select = None
    total = max_length
    if chi:
        chi_text = "\n".join(chi)
        num_chi = len(tokenizer.encode(chi_text))  # with special tokens (BOS), as SANA counts
        if num_chi < 2:
            raise ValueError(f"the CHI tokenizes to {num_chi} token(s); SANA's length rule needs at least 2")
        texts = [chi_text + text for text in texts]
        total = num_chi + max_length - 2
        select = (0,) + tuple(range(total - max_length + 1, total))
    tokens = tokenizer(texts, padding="max_length", max_length=total, truncation=True, add_special_tokens=True,
                       padding_side="right", return_tensors="np")
    return PromptTokens(np.asarray(tokens["input_ids"], np.int32), np.asarray(tokens["attention_mask"], np.int32),
                        select)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _encode(encoder: Gemma2, params, input_ids: Array, attention_mask: Array, select: tuple[int, ...] | None):
    hidden = encoder.apply({"params": params}, input_ids, attention_mask)  # [B, T, C]
    if select is not None:
        index = jnp.asarray(select)
        hidden, attention_mask = hidden[:, index], attention_mask[:, index]
    return hidden, attention_mask


def encode_tokens(encoder: Gemma2, params, tokens: PromptTokens) -> tuple[Array, Array]:
    """The jitted device half of `encode_prompts`: (embeddings [B, L, C], mask [B, L] int32)."""
    return _encode(encoder, params, jnp.asarray(tokens.input_ids), jnp.asarray(tokens.attention_mask),
                   tokens.select)


def encode_prompts(encoder: Gemma2, params, tokenizer, prompts: str | Sequence[str], *,
                   chi: Sequence[str] | None = SANA_CHI, max_length: int = 300,
                   preprocess: Preprocess = "sana") -> tuple[Array, Array]:
    """SANA's caption features for a batch of prompts, for sampling and for the training cache.

    Args:
      encoder, params: a Gemma2 model and its params (e.g. from `load_gemma2`).
      tokenizer: a Hugging Face tokenizer (`load_tokenizer`), run on the host.
      prompts: a prompt or a list of B prompts.
      chi: complex human instruction lines (default SANA's); None or () for the negative / null prompt path,
        which diffusers' SanaPipeline and SANA encode without CHI and without index selection.
      max_length: L, caption tokens kept (SANA: 300).
      preprocess: "sana" strips whitespace (NVlabs inference), "diffusers" also lower-cases (SanaPipeline with
        clean_caption=False), "none" leaves prompts as given.
    Returns:
      (embeddings [B, L, C] in the encoder's compute dtype, mask [B, L] int32 1 keep / 0 pad).
    """
    tokens = tokenize_prompts(tokenizer, prompts, chi=chi, max_length=max_length, preprocess=preprocess)
    return encode_tokens(encoder, params, tokens)
