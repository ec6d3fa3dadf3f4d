"""The two heads on one trunk: the reward head F and the policy (LM) head K.

reward:   r(x, y) = F(h_last), h_last = final-normed hidden state at the last real token (the EOS).
log-prob: log pi(y|x) = sum over response positions of log_softmax(logits)[target], float32,
          computed in chunks over the length so [N, L, V] float32 logits never exist at once.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from haf_jax.model.config import ModelConfig
from haf_jax.model.gemma import Transformer


def rewards(reward_kernel_Dx1, hidden_NxLxD, last_index_N):
    """Reward read at each row's last real token -> float32 [N]."""
    h_last_NxD = jnp.take_along_axis(hidden_NxLxD, last_index_N[:, None, None], axis=1)[:, 0]
    return h_last_NxD.astype(jnp.float32) @ reward_kernel_Dx1[:, 0].astype(jnp.float32)


def sequence_logprobs(embedding_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, *,
                      final_logit_softcap: float | None = None, chunk: int = 128):
    """Summed log-probs of the response tokens under the tied LM head -> (logp_N, n_tokens_N), float32.

    The logits at position i predict token i + 1, so position i contributes when token i + 1 is
    marked in `response_mask_NxL`. The length is processed `chunk` positions at a time under
    `jax.checkpoint`, so forward and backward hold one [N, chunk, V] float32 block, not [N, L, V].
    """
    n, length, d = hidden_NxLxD.shape
    hidden = hidden_NxLxD[:, :-1]
    targets = tokens_NxL[:, 1:]
    mask = response_mask_NxL[:, 1:].astype(jnp.float32)
    chunk = max(1, min(chunk, length - 1))
    n_chunks = -(-(length - 1) // chunk)
    pad = n_chunks * chunk - (length - 1)
    if pad:  # padded positions carry mask 0, so they add nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    # [C, N, chunk, ...]: scan over the leading chunk axis.
    split = lambda x: jnp.moveaxis(x.reshape(n, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_logprob(h_NxCxD, t_NxC, m_NxC):
        # Cast inside the chunk: the embedding's gradient then accumulates across chunks in the
        # embedding's own (float32 master) dtype, not in the bf16 compute dtype.
        embedding = embedding_VxD.astype(h_NxCxD.dtype)
        logits = jnp.einsum("ncd,vd->ncv", h_NxCxD, embedding, preferred_element_type=jnp.float32)
        if final_logit_softcap:
            logits = jnp.tanh(logits / final_logit_softcap) * final_logit_softcap
        target_logit = jnp.take_along_axis(logits, t_NxC[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(logp * m_NxC, axis=-1)

    def body(total_N, xs):
        return total_N + chunk_logprob(*xs), None

    total_N, _ = jax.lax.scan(body, jnp.zeros((n,), jnp.float32), (split(hidden), split(targets), split(mask)))
    return total_N, jnp.sum(mask, axis=-1)


def forward_pairs(params, config: ModelConfig, batch, *, reward: bool = True, policy: bool = True,
                  chunk: int = 128, compute_dtype=jnp.float32):
    """Runs the trunk once over chosen and rejected and applies the requested heads.

    batch: tokens [B, 2, L] int32, response_mask [B, 2, L], last_index [B, 2] (pair axis: 0 chosen,
    1 rejected). params: float32 master weights; they are cast to `compute_dtype` for the trunk.
    Returns a dict with reward_Bx2 (if reward) and logp_Bx2, n_tokens_Bx2 (if policy), float32.
    """
    tokens = batch["tokens"]
    b, _, length = tokens.shape
    tokens_NxL = tokens.reshape(2 * b, length)
    last_N = batch["last_index"].reshape(2 * b)
    cast = jax.tree.map(lambda p: p.astype(compute_dtype), params)
    hidden = Transformer(config).apply({"params": cast}, tokens_NxL, last_N)
    out = {}
    if reward:
        out["reward_Bx2"] = rewards(params["reward_head"], hidden, last_N).reshape(b, 2)
    if policy:
        logp, n_tok = sequence_logprobs(
            params["embed_tokens"], hidden, tokens_NxL, batch["response_mask"].reshape(2 * b, length),
            final_logit_softcap=config.final_logit_softcap, chunk=chunk,
        )
        out["logp_Bx2"], out["n_tokens_Bx2"] = logp.reshape(b, 2), n_tok.reshape(b, 2)
    return out


def full_logits(params, config: ModelConfig, tokens_NxL, last_index_N):
    """[N, L, V] float32 logits of the LM head (for tests and small inputs only)."""
    hidden = Transformer(config).apply({"params": params}, tokens_NxL, last_index_N)
    logits = jnp.einsum("nld,vd->nlv", hidden, params["embed_tokens"], preferred_element_type=jnp.float32)
    if config.final_logit_softcap:
        logits = jnp.tanh(logits / config.final_logit_softcap) * config.final_logit_softcap
    return logits

