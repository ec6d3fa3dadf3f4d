"""The Gemma 1 / 2 / 3 (text) decoder trunk as Flax Linen modules.

Parameter names follow the Hugging Face checkpoints (q_proj, input_layernorm, ...) so import and
export are a mechanical renaming; every parameter carries logical axis names (see sharding.py).
The trunk returns the final-normed hidden states; the two heads (LM head = tied embedding,
reward head) live in heads.py and read these hidden states.

Shape letters: N sequences, L length, D model width, V vocabulary, F feed-forward width,
Q query heads, K key/value heads, G = Q // K query heads per key head, H head width.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from haf_jax.model.config import SLIDING, ModelConfig
from haf_jax.sharding import shard_batch_axis

_INIT = nn.initializers.normal(stddev=0.02)
_NEG_INF = -2.3819763e38  # large finite negative: fully masked rows can never produce NaN


def _param(module: nn.Module, name: str, init, shape, axes):
    return module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in float32, w zero-initialised."""

    eps: float
    axis_name: str = "norm"

    @nn.compact
    def __call__(self, x):
        w = _param(self, "scale", nn.initializers.zeros, (x.shape[-1],), (self.axis_name,))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)


def rope(x_NxLxHxD, positions_NxL, theta: float, scaling: float):
    """Rotary embedding on the two halves of the head dimension (the HF `rotate_half` layout)."""
    h = x_NxLxHxD.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, h, 2, dtype=jnp.float32) / h)) / scaling
    angles = positions_NxL.astype(jnp.float32)[..., None] * inv_freq  # [N, L, H/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x_NxLxHxD.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x_NxLxHxD.dtype)
    x1, x2 = jnp.split(x_NxLxHxD, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nn.Module):
    config: ModelConfig
    sliding: bool

    @nn.compact
    def __call__(self, x_NxLxD, positions_NxL, valid_NxL):
        c = self.config
        d, q, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        wq = _param(self, "q_proj", _INIT, (d, q, h), ("embed", "heads", "head_dim"))
        wk = _param(self, "k_proj", _INIT, (d, k, h), ("embed", "kv_heads", "head_dim"))
        wv = _param(self, "v_proj", _INIT, (d, k, h), ("embed", "kv_heads", "head_dim"))
        wo = _param(self, "o_proj", _INIT, (q, h, d), ("heads", "head_dim", "embed"))
        dt = x_NxLxD.dtype
        query = jnp.einsum("nld,dqh->nlqh", x_NxLxD, wq.astype(dt))
        key = jnp.einsum("nld,dkh->nlkh", x_NxLxD, wk.astype(dt))
        value = jnp.einsum("nld,dkh->nlkh", x_NxLxD, wv.astype(dt))
        if c.qk_norm:
            query = RMSNorm(c.rms_norm_eps, "head_dim", name="q_norm")(query)
            key = RMSNorm(c.rms_norm_eps, "head_dim", name="k_norm")(key)
        theta, scaling = (c.rope_local_theta, 1.0) if self.sliding else (c.rope_theta, c.rope_scaling)
        query = rope(query, positions_NxL, theta, scaling)
        key = rope(key, positions_NxL, theta, scaling)

        n, length = x_NxLxD.shape[:2]
        query = query.reshape(n, length, k, q // k, h)
        logits = jnp.einsum("nlkgh,nskh->nkgls", query, key, preferred_element_type=jnp.float32)
        logits = logits * c.attention_scale
        if c.attn_logit_softcap:
            logits = jnp.tanh(logits / c.attn_logit_softcap) * c.attn_logit_softcap
        q_pos, k_pos = jnp.arange(length)[:, None], jnp.arange(length)[None, :]
        allowed_LxS = k_pos <= q_pos
        if self.sliding:
            allowed_LxS &= k_pos > q_pos - c.sliding_window
        allowed = allowed_LxS[None] & valid_NxL[:, None, :]  # [N, L, S]: padding keys never attended
        logits = jnp.where(allowed[:, None, None], logits, _NEG_INF)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out = jnp.einsum("nkgls,nskh->nlkgh", probs, value).reshape(n, length, q, h)
        return jnp.einsum("nlqh,qhd->nld", out, wo.astype(dt))


class MLP(nn.Module):
    """GeGLU feed-forward: down(gelu_tanh(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x_NxLxD):
        d, f = self.config.hidden_size, self.config.intermediate_size
        gate = _param(self, "gate_proj", _INIT, (d, f), ("embed", "mlp"))
        up = _param(self, "up_proj", _INIT, (d, f), ("embed", "mlp"))
        down = _param(self, "down_proj", _INIT, (f, d), ("mlp", "embed"))
        dt = x_NxLxD.dtype
        hidden = jax.nn.gelu(x_NxLxD @ gate.astype(dt), approximate=True) * (x_NxLxD @ up.astype(dt))
        return hidden @ down.astype(dt)


class Block(nn.Module):
    """One decoder layer. Gemma 1: pre-norms only; Gemma 2/3: 'sandwich' norms around both sublayers."""

    config: ModelConfig
    sliding: bool

    @nn.compact
    def __call__(self, x_NxLxD, positions_NxL, valid_NxL):
        c, eps = self.config, self.config.rms_norm_eps
        attn = Attention(c, self.sliding, name="self_attn")(
            RMSNorm(eps, name="input_layernorm")(x_NxLxD), positions_NxL, valid_NxL
        )
        if c.sandwich_norm:
            x = x_NxLxD + RMSNorm(eps, name="post_attention_layernorm")(attn)
            mlp = MLP(c, name="mlp")(RMSNorm(eps, name="pre_feedforward_layernorm")(x))
            return x + RMSNorm(eps, name="post_feedforward_layernorm")(mlp)
        # Gemma 1 calls its pre-MLP norm `post_attention_layernorm`; we keep the HF name.
        x = x_NxLxD + attn
        return x + MLP(c, name="mlp")(RMSNorm(eps, name="post_attention_layernorm")(x))


class Transformer(nn.Module):
    """Embedding, decoder stack, final norm, plus the zero-initialised reward head's parameter.

    __call__(tokens_NxL int32, last_index_N int32) -> final-normed hidden states [N, L, D] in the
    compute dtype (the dtype of the parameters passed to `apply`). Rows are right-padded: every
    position after last_index is padding and is masked out as an attention key, so the outputs
    at real positions never depend on padding.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens_NxL, last_index_N):
        c = self.config
        embedding = _param(self, "embed_tokens", _INIT, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        # The reward head F: Linear(D -> 1) without bias, zero-initialised (PAPER.md s2).
        _param(self, "reward_head", nn.initializers.zeros, (c.hidden_size, 1), ("embed", "reward"))
        dt = embedding.dtype
        length = tokens_NxL.shape[1]
        positions_NxL = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens_NxL.shape)
        valid_NxL = positions_NxL <= last_index_N[:, None]
        # Gemma scales embeddings by sqrt(D), rounded to the compute dtype as the reference does.
        x = shard_batch_axis(jnp.take(embedding, tokens_NxL, axis=0) * jnp.asarray(c.embed_scale, dt))
        block = nn.remat(Block) if c.remat else Block
        for i, kind in enumerate(c.layer_types):
            x = shard_batch_axis(block(c, kind == SLIDING, name=f"layers_{i}")(x, positions_NxL, valid_NxL))
        return RMSNorm(c.rms_norm_eps, name="norm")(x)
