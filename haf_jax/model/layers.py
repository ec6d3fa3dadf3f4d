"""Layers shared by every family: norms, rotary embedding, attention with an optional KV cache,
gated and plain MLPs, and the pre-norm / sandwich / parallel decoder blocks.

Parameters are created in float32 with logical axis names (placed by sharding.RULES) and the
Hugging Face names of the family (`names` below), so import and export are a renaming. A bias of
a projection `p` is the sibling parameter `p_bias` (HF `p.bias`).

Shape letters: N sequences, L new positions, S key positions (L, or the cache length), D model
width, F feed-forward width, Q query heads, K key/value heads, G = Q // K, H head width,
R rotary width (<= H).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from haf_jax.model import attention as attention_lib
from haf_jax.model.config import SLIDING, ModelConfig
from haf_jax.sharding import constrain

INIT = nn.initializers.normal(stddev=0.02)

# Hugging Face module names that differ between families (everything else is shared).
_DEFAULT_NAMES = {"o_proj": "o_proj", "up": "up_proj", "down": "down_proj", "final_norm": "norm",
                  "q_norm": "q_norm", "k_norm": "k_norm"}
_PHI_NAMES = {"o_proj": "dense", "up": "fc1", "down": "fc2", "final_norm": "final_layernorm",
              "q_norm": "q_layernorm", "k_norm": "k_layernorm"}


def names(config: ModelConfig) -> dict[str, str]:
    """The family's module names for the parts whose HF names differ (Phi vs the rest)."""
    return _PHI_NAMES if config.family == "phi" else _DEFAULT_NAMES


def param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class Norm(nn.Module):
    """RMSNorm (x / rms(x) * w, or * (1 + w) with `offset`) or LayerNorm (with bias), in float32."""

    config: ModelConfig
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        c, dim = self.config, x.shape[-1]
        w = param(self, "scale", nn.initializers.zeros if c.norm_offset else nn.initializers.ones,
                  (dim,), (self.axis_name,)).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        if c.norm == "layer":
            b = param(self, "bias", nn.initializers.zeros, (dim,), (self.axis_name,))
            centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
            y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + c.norm_eps)
            return (y * w + b.astype(jnp.float32)).astype(x.dtype)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.norm_eps)
        return (y * ((1.0 + w) if c.norm_offset else w)).astype(x.dtype)


def inverse_frequencies(config: ModelConfig, sliding: bool):
    """Rotary inverse frequencies [R/2] (float32) of a layer, with the family's scaling rule."""
    c, r = config, config.rotary_dim
    local = sliding and c.local_rope_theta is not None
    theta = c.local_rope_theta if local else c.rope_theta
    inv = 1.0 / (theta ** (jnp.arange(0, r, 2, dtype=jnp.float32) / r))
    if local or c.rope_type == "default":
        return inv
    if c.rope_type == "linear":
        return inv / c.rope_factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend in between.
    low_wavelen = c.rope_original_max_positions / c.rope_low_freq_factor
    high_wavelen = c.rope_original_max_positions / c.rope_high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = jnp.where(wavelen > low_wavelen, inv / c.rope_factor, inv)
    smooth = (c.rope_original_max_positions / wavelen - c.rope_low_freq_factor) / (
        c.rope_high_freq_factor - c.rope_low_freq_factor)
    blended = (1 - smooth) * scaled / c.rope_factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, blended, scaled)


def rope(x_NxLxHeadsxH, positions_NxL, inv_freq):
    """Rotary embedding on the first R dims in HF's `rotate_half` layout; the rest pass through."""
    r = 2 * inv_freq.shape[0]
    angles = positions_NxL.astype(jnp.float32)[..., None] * inv_freq  # [N, L, R/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x_NxLxHeadsxH.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x_NxLxHeadsxH.dtype)
    rot, rest = x_NxLxHeadsxH[..., :r], x_NxLxHeadsxH[..., r:]
    x1, x2 = jnp.split(rot, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


class LayerCache(NamedTuple):
    """Keys and values of one attention layer, [N, S, K, H], slot s holding position s."""

    key: jax.Array
    value: jax.Array


class Attention(nn.Module):
    config: ModelConfig
    sliding: bool

    def _proj(self, name, shape, axes, bias_axes):
        w = param(self, name, INIT, shape, axes)
        b = param(self, f"{name}_bias", nn.initializers.zeros, shape[1:], bias_axes) if self.config.qkv_bias else None
        return w, b

    @nn.compact
    def __call__(self, x_NxLxD, positions_NxL, valid_NxS, cache: LayerCache | None = None):
        """Attention over the row's own positions (cache None) or over a KV cache.

        Without a cache, `valid_NxS` (S = L) is bool (True on real tokens) or int32 segment ids
        (packed rows: 0 = padding, then one id per sequence, positions restarting in each): a
        query attends only keys of its own segment (padding is a segment of its own), so real
        tokens never see padding or another sequence. The kernel: `config.attention`.
        With one, the new keys/values are written at slots `positions` (contiguous per row) and
        every slot up to the query position is attended (earlier slots were written before).
        Returns (output [N, L, D], updated cache or None).
        """
        c, dt = self.config, x_NxLxD.dtype
        d, q, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq, bq = self._proj("q_proj", (d, q, h), ("embed", "heads", "head_dim"), ("heads", "head_dim"))
        wk, bk = self._proj("k_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"))
        wv, bv = self._proj("v_proj", (d, k, h), ("embed", "kv_heads", "head_dim"), ("kv_heads", "head_dim"))
        o_name = names(c)["o_proj"]
        wo = param(self, o_name, INIT, (q, h, d), ("heads", "head_dim", "embed"))
        query = jnp.einsum("nld,dqh->nlqh", x_NxLxD, wq.astype(dt))
        key = jnp.einsum("nld,dkh->nlkh", x_NxLxD, wk.astype(dt))
        value = jnp.einsum("nld,dkh->nlkh", x_NxLxD, wv.astype(dt))
        if c.qkv_bias:
            query, key, value = query + bq.astype(dt), key + bk.astype(dt), value + bv.astype(dt)
        if c.qk_norm:
            query = Norm(c, "head_dim", name=names(c)["q_norm"])(query)
            key = Norm(c, "head_dim", name=names(c)["k_norm"])(key)
        inv_freq = inverse_frequencies(c, self.sliding)
        query = rope(query, positions_NxL, inv_freq)
        key = rope(key, positions_NxL, inv_freq)

        n, length = x_NxLxD.shape[:2]
        if cache is None:
            k_pos_NxS = positions_NxL
            q_seg_NxL = k_seg_NxS = valid_NxS.astype(jnp.int32)  # bool valid: one segment + padding
        else:
            write = jax.vmap(lambda buf, new, start: jax.lax.dynamic_update_slice_in_dim(buf, new, start, 0))
            cache = LayerCache(write(cache.key, key.astype(cache.key.dtype), positions_NxL[:, 0]),
                               write(cache.value, value.astype(cache.value.dtype), positions_NxL[:, 0]))
            key, value = cache.key.astype(dt), cache.value.astype(dt)
            slots = key.shape[1]
            k_pos_NxS = jnp.broadcast_to(jnp.arange(slots, dtype=positions_NxL.dtype), (n, slots))
            q_seg_NxL, k_seg_NxS = jnp.ones((n, length), jnp.int32), jnp.ones((n, slots), jnp.int32)
        out = attention_lib.attend(
            query, key, value, q_pos_NxL=positions_NxL, k_pos_NxS=k_pos_NxS, q_seg_NxL=q_seg_NxL,
            k_seg_NxS=k_seg_NxS, scale=c.attention_scale, softcap=c.attn_logit_softcap,
            window=c.sliding_window if self.sliding else None, implementation=c.attention,
            cached=cache is not None)
        out = jnp.einsum("nlqh,qhd->nld", out, wo.astype(dt))
        if c.o_bias:
            out = out + param(self, f"{o_name}_bias", nn.initializers.zeros, (d,), ("norm",)).astype(dt)
        return out, cache


def _activation(name: str):
    return {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
            "gelu": lambda x: jax.nn.gelu(x, approximate=False)}[name]


class MLP(nn.Module):
    """Gated: down(act(gate(x)) * up(x)); plain: down(act(up(x))) (Phi's fc1/fc2)."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_NxLxD):
        c, dt = self.config, x_NxLxD.dtype
        d, f, nm = c.hidden_size, c.intermediate_size, names(c)

        def dense(name, shape, axes, bias_axis):
            w = param(self, name, INIT, shape, axes).astype(dt)
            b = param(self, f"{name}_bias", nn.initializers.zeros, shape[-1:], (bias_axis,)) if c.mlp_bias else None
            return lambda x: x @ w + (b.astype(dt) if b is not None else 0)

        act = _activation(c.activation)
        up = dense(nm["up"], (d, f), ("embed", "mlp"), "mlp")
        down = dense(nm["down"], (f, d), ("mlp", "embed"), "norm")
        if c.mlp == "gated":
            gate = dense("gate_proj", (d, f), ("embed", "mlp"), "mlp")
            return down(act(gate(x_NxLxD)) * up(x_NxLxD))
        return down(act(up(x_NxLxD)))


class Block(nn.Module):
    """One decoder layer: pre-norm, sandwich (Gemma 2/3) or parallel (Phi) residual wiring."""

    config: ModelConfig
    sliding: bool

    @nn.compact
    def __call__(self, x_NxLxD, positions_NxL, valid_NxS, cache: LayerCache | None = None):
        c = self.config
        attention = Attention(c, self.sliding, name="self_attn")
        normed = Norm(c, name="input_layernorm")(x_NxLxD)
        attn, cache = attention(normed, positions_NxL, valid_NxS, cache)
        if c.block == "parallel":  # one norm feeds both sublayers
            return x_NxLxD + attn + MLP(c, name="mlp")(normed), cache
        if c.block == "sandwich":
            x = x_NxLxD + Norm(c, name="post_attention_layernorm")(attn)
            mlp = MLP(c, name="mlp")(Norm(c, name="pre_feedforward_layernorm")(x))
            return x + Norm(c, name="post_feedforward_layernorm")(mlp), cache
        # Pre-norm: HF calls the pre-MLP norm `post_attention_layernorm`.
        x = x_NxLxD + attn
        return x + MLP(c, name="mlp")(Norm(c, name="post_attention_layernorm")(x)), cache


class Decoder(nn.Module):
    """Embedding, decoder stack, final norm: the trunk shared by the reward and LM heads.

    __call__(tokens [N, L] int32, positions [N, L] int32, valid [N, L] bool, cache=None)
      -> (final-normed hidden states [N, L, D] in the compute dtype, updated cache or None).
    The compute dtype is the dtype of the parameters passed to `apply`. Without a cache, rows
    are attended causally by position and padding (valid False) is never a key, so outputs at
    real positions never depend on padding. `cache` is a tuple of LayerCache, one per layer.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_NxL, positions_NxL, valid_NxL, cache=None):
        c = self.config
        embedding = param(self, "embed_tokens", INIT, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        dt = embedding.dtype
        x = jnp.take(embedding, tokens_NxL, axis=0)
        if c.embed_scale:  # Gemma: sqrt(D), rounded to the compute dtype as the reference does
            x = x * jnp.asarray(c.embed_multiplier, dt)
        x = constrain(x, ("batch", None, None))
        block = nn.remat(Block) if c.remat else Block
        new_cache = []
        for i, kind in enumerate(c.layer_types):
            x, layer_cache = block(c, kind == SLIDING, name=f"layers_{i}")(
                x, positions_NxL, valid_NxL, None if cache is None else cache[i])
            x = constrain(x, ("batch", None, None))
            new_cache.append(layer_cache)
        hidden = Norm(c, name=names(c)["final_norm"])(x)
        return hidden, (tuple(new_cache) if cache is not None else None)


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> tuple[LayerCache, ...]:
    """An empty KV cache for `batch` rows of up to `length` positions."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    return tuple(LayerCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(config.num_layers))
