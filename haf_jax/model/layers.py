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

from haf_jax.core.sharding import constrain
from haf_jax.model import attention as attention_lib, scan as scan_lib
from haf_jax.model.config import REMAT_POLICIES, SLIDING, ModelConfig
from haf_jax.model.linear import project

INIT = nn.initializers.normal(stddev=0.02)

# Hugging Face module names that differ between families (everything else is shared).
_DEFAULT_NAMES = {
    "o_proj": "o_proj",
    "up": "up_proj",
    "down": "down_proj",
    "final_norm": "norm",
    "q_norm": "q_norm",
    "k_norm": "k_norm",
}
_PHI_NAMES = {
    "o_proj": "dense",
    "up": "fc1",
    "down": "fc2",
    "final_norm": "final_layernorm",
    "q_norm": "q_layernorm",
    "k_norm": "k_layernorm",
}


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
        w = param(
            self, "scale", nn.initializers.zeros if c.norm_offset else nn.initializers.ones, (dim,), (self.axis_name,)
        ).astype(jnp.float32)
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
        c.rope_high_freq_factor - c.rope_low_freq_factor
    )
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
        query = project("nld,dqh->nlqh", x_NxLxD, wq.astype(dt))
        key = project("nld,dkh->nlkh", x_NxLxD, wk.astype(dt))
        value = project("nld,dkh->nlkh", x_NxLxD, wv.astype(dt))
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
            cache = LayerCache(
                write(cache.key, key.astype(cache.key.dtype), positions_NxL[:, 0]),
                write(cache.value, value.astype(cache.value.dtype), positions_NxL[:, 0]),
            )
            key, value = cache.key.astype(dt), cache.value.astype(dt)
            slots = key.shape[1]
            k_pos_NxS = jnp.broadcast_to(jnp.arange(slots, dtype=positions_NxL.dtype), (n, slots))
            q_seg_NxL, k_seg_NxS = jnp.ones((n, length), jnp.int32), jnp.ones((n, slots), jnp.int32)
        out = attention_lib.attend(
            query,
            key,
            value,
            q_pos_NxL=positions_NxL,
            k_pos_NxS=k_pos_NxS,
            q_seg_NxL=q_seg_NxL,
            k_seg_NxS=k_seg_NxS,
            scale=c.attention_scale,
            softcap=c.attn_logit_softcap,
            window=c.sliding_window if self.sliding else None,
            implementation=c.attention,
            cached=cache is not None,
        )
        out = project("nlqh,qhd->nld", out, wo.astype(dt))
        if c.o_bias:
            out = out + param(self, f"{o_name}_bias", nn.initializers.zeros, (d,), ("norm",)).astype(dt)
        return out, cache


def _activation(name: str):
    return {
        "silu": jax.nn.silu,
        "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]


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
            return lambda x: project("nld,df->nlf", x, w) + (b.astype(dt) if b is not None else 0)

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


class BlockGroup(nn.Module):
    """One period of the layer pattern: blocks `block_0` .. `block_{P-1}` (sliding flags `kinds`),
    applied in order. Scanned by the Decoder (carry: the hidden states), so a period compiles once."""

    config: ModelConfig
    kinds: tuple[bool, ...]

    @nn.compact
    def __call__(self, x_NxLxD, positions_NxL, valid_NxS, cache: tuple[LayerCache, ...] | None = None):
        block = _block_class(self.config, scanned=True)
        new_cache = []
        for j, sliding in enumerate(self.kinds):
            x_NxLxD, layer_cache = block(self.config, sliding, name=f"block_{j}")(
                x_NxLxD, positions_NxL, valid_NxS, None if cache is None else cache[j]
            )
            x_NxLxD = constrain(x_NxLxD, ("batch", None, None))
            new_cache.append(layer_cache)
        return x_NxLxD, (tuple(new_cache) if cache is not None else None)


def _block_class(config: ModelConfig, scanned: bool):
    """Block, or Block rematerialised in the backward pass with the config's policy (inside a
    scan, XLA cannot merge the recomputation with the forward pass, so CSE prevention is off)."""
    if not config.remat:
        return Block
    policy = getattr(jax.checkpoint_policies, REMAT_POLICIES[config.remat_policy])
    return nn.remat(Block, policy=policy, prevent_cse=not scanned)


class StackCache(NamedTuple):
    """KV cache of a scanned decoder: per position j of the period, the caches of its R layers
    stacked [R, N, S, K, H] (`stacked[j]`), and one LayerCache per layer after the last full period."""

    stacked: tuple[LayerCache, ...]
    rest: tuple[LayerCache, ...]


class Decoder(nn.Module):
    """Embedding, decoder stack, final norm: the trunk shared by the reward and LM heads.

    __call__(tokens [N, L] int32, positions [N, L] int32, valid [N, L] bool, cache=None)
      -> (final-normed hidden states [N, L, D] in the compute dtype, updated cache or None).
    The compute dtype is the dtype of the parameters passed to `apply`. Without a cache, rows
    are attended causally by position and padding (valid False) is never a key, so outputs at
    real positions never depend on padding. `cache` is what `init_cache` makes: a tuple of
    LayerCache, one per layer, or a StackCache when the layers are scanned.
    With `config.scan_layers` the layers of each full period of the layer pattern run as one
    scanned BlockGroup named `layers` (parameters stacked [R, ...], model/scan.py); the layers of
    an incomplete last period, and all layers otherwise, are blocks named `layers_<i>`.
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
        first = scan_lib.scanned_layers(c)
        stacked_cache, rest_cache = None, cache
        if first:
            period, repeats = scan_lib.periods(c)
            group = nn.scan(
                BlockGroup,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, 0),
                length=repeats,
                metadata_params={nn.PARTITION_NAME: scan_lib.STACK},
            )
            kinds = tuple(t == SLIDING for t in c.layer_types[:period])
            x, stacked_cache = group(c, kinds, name=scan_lib.STACK)(
                x, positions_NxL, valid_NxL, None if cache is None else cache.stacked
            )
            rest_cache = None if cache is None else cache.rest
        block = _block_class(c, scanned=False)
        new_cache = []
        for i in range(first, c.num_layers):
            x, layer_cache = block(c, c.layer_types[i] == SLIDING, name=f"layers_{i}")(
                x, positions_NxL, valid_NxL, None if cache is None else rest_cache[i - first]
            )
            x = constrain(x, ("batch", None, None))
            new_cache.append(layer_cache)
        hidden = Norm(c, name=names(c)["final_norm"])(x)
        if cache is None:
            return hidden, None
        return hidden, (StackCache(stacked_cache, tuple(new_cache)) if first else tuple(new_cache))


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32):
    """An empty KV cache for `batch` rows of up to `length` positions, laid out as the Decoder
    takes it: a tuple of LayerCache [N, S, K, H] per layer, or a StackCache for scanned layers."""
    shape = (batch, length, config.num_kv_heads, config.head_dim)
    empty = lambda lead=(): LayerCache(jnp.zeros(lead + shape, dtype), jnp.zeros(lead + shape, dtype))
    first = scan_lib.scanned_layers(config)
    rest = tuple(empty() for _ in range(first, config.num_layers))
    if not first:
        return rest
    period, repeats = scan_lib.periods(config)
    return StackCache(tuple(empty((repeats,)) for _ in range(period)), rest)
