"""Log-probs of given target tokens under the LM head at listed positions only, chunk by chunk,
with a hand-written backward pass.

The LM head is the costliest matmul of a HaF step (V x D per position for the forward, again to
recompute, twice for the backward), and in preference data most positions are prompt or
padding. `token_logprobs` runs the head over the listed positions only: a `while_loop` over
`ceil(count / block)` chunks of `block` positions, where `count` is the largest number of listed
positions of any batch shard (the same trip count on every device). A `lax.cond` skipping
chunks inside a `scan` (the differentiable way to get a data-dependent trip count) cost 1 GiB of
extra temporaries per chip on TPU (gemma-2b's 256k head, v5e-8: branch buffers that XLA could
not share across the loop), so the backward is written out here instead, as its own loop:

  forward   logits = h W^T (+ b, soft-cap), log p = logits[target] - logsumexp(logits)
  backward  recompute logits; d logits = g * (onehot(target) - softmax(logits)) (* (1 - (logits /
            cap)^2) under a soft-cap); dW += d logits^T h, db += sum d logits, dh = d logits W

so one chunk of [Z, M, V] float32 logits is alive at a time, forward or backward, and nothing
per chunk is kept between the passes. Mixed precision is that of `jnp.einsum` with float32
output: the head is cast to the hidden states' dtype for the matmuls, the logits and their
gradient are float32, the head's gradient accumulates in float32 and returns in the head's dtype.

Sharding (when traced under a mesh): the caller places the head split by vocabulary over all
devices ("logit_vocab") and the hidden states by batch shard; each chunk of gathered hidden
states is replicated, so every device computes all rows' logits for its vocabulary slice.

Shapes (docs/DESIGN.md legend): Z batch shards, F positions of a shard (its rows x positions,
flattened), M positions of one chunk (`block`), D width, V vocabulary.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from haf_jax.core.sharding import constrain
from haf_jax.model.linear import project


def token_logprobs(
    head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, *, block: int, softcap: float | None = None
):
    """log p(target) at the first `count_Z[p]` positions of `order_ZxF[p]` (indices into F, each at
    most once), 0 at every other position -> float32 [Z, F]. Differentiable in the head, the bias
    (None: no bias) and the hidden states."""
    return _token_logprobs(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap)


def chunks_run(count_Z, block: int):
    """How many chunks `token_logprobs` runs (int32 scalar)."""
    return (jnp.max(count_Z) + block - 1) // block


def _chunk(c, order_ZxF, count_Z, block):
    """Chunk c: (positions [Z, M], whether each is listed [Z, M])."""
    index = jax.lax.dynamic_slice_in_dim(order_ZxF, c * block, block, axis=1)
    used = c * block + jnp.arange(block) < count_Z[:, None]
    return index, used


def _take(x_ZxF, index_ZxM):
    return jnp.take_along_axis(x_ZxF, index_ZxM.reshape(index_ZxM.shape + (1,) * (x_ZxF.ndim - 2)), axis=1)


def _put(buffer_ZxF, index_ZxM, values_ZxM):
    return jax.vmap(lambda buf, index, values: buf.at[index].add(values))(buffer_ZxF, index_ZxM, values_ZxM)


def head_logits(hidden, head_VxD, bias_V=None, softcap: float | None = None):
    """float32 logits [..., V] of hidden states [..., D] (up to 3 leading axes) under the LM head (cast
    to the hidden states' dtype), plus its bias, soft-capped: the one definition of the LM head."""
    lead = "nlc"[: hidden.ndim - 1]
    logits = project(f"{lead}d,vd->{lead}v", hidden, head_VxD.astype(hidden.dtype), jnp.float32)
    if bias_V is not None:
        logits = logits + bias_V.astype(jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def _logits(head_VxD, bias_V, hidden_ZxFxD, index_ZxM, softcap):
    """(hidden states of the chunk [Z, M, D], replicated; their float32 logits [Z, M, V], split by vocabulary)."""
    h = constrain(_take(hidden_ZxFxD, index_ZxM), (None, None, None))
    return h, constrain(head_logits(h, head_VxD, bias_V, softcap), (None, None, "logit_vocab"))


def _is_target(logits_ZxMxV, targets_ZxF, index_ZxM):
    # The target's logit as a masked sum over the vocabulary: exact (one non-zero term), and it
    # reduces across vocabulary slices, where a gather along a split axis would not.
    vocab_V = jnp.arange(logits_ZxMxV.shape[-1], dtype=targets_ZxF.dtype)
    return vocab_V == _take(targets_ZxF, index_ZxM)[..., None]


def _forward(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap):
    def body(c, logp_ZxF):
        index, used = _chunk(c, order_ZxF, count_Z, block)
        _, logits = _logits(head_VxD, bias_V, hidden_ZxFxD, index, softcap)
        target = jnp.sum(jnp.where(_is_target(logits, targets_ZxF, index), logits, 0.0), axis=-1)
        return _put(logp_ZxF, index, jnp.where(used, target - jax.nn.logsumexp(logits, axis=-1), 0.0))

    zeros = jnp.zeros(targets_ZxF.shape, jnp.float32)
    return jax.lax.fori_loop(0, chunks_run(count_Z, block), body, zeros)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _token_logprobs(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap):
    return _forward(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap)


def _token_logprobs_fwd(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap):
    out = _forward(head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z, block, softcap)
    return out, (head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z)


def _token_logprobs_bwd(block, softcap, residuals, g_ZxF):
    head_VxD, bias_V, hidden_ZxFxD, targets_ZxF, order_ZxF, count_Z = residuals

    def body(c, carry):
        d_head, d_bias, d_hidden = carry
        index, used = _chunk(c, order_ZxF, count_Z, block)
        h, logits = _logits(head_VxD, bias_V, hidden_ZxFxD, index, softcap)
        probs = jnp.exp(logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True))
        g = jnp.where(used, _take(g_ZxF, index), 0.0)
        d_logits = g[..., None] * (_is_target(logits, targets_ZxF, index) - probs)
        if softcap:
            d_logits = d_logits * (1.0 - jnp.square(logits / softcap))
        d_logits = constrain(d_logits, (None, None, "logit_vocab"))
        d_h = jnp.einsum("pbv,vd->pbd", d_logits, head_VxD.astype(h.dtype), preferred_element_type=jnp.float32)
        # The head's gradient contracts the chunk's positions: merged into one axis (a plain matmul).
        rows = d_logits.shape[0] * d_logits.shape[1]
        d_head = d_head + jnp.einsum(
            "tv,td->vd", d_logits.reshape(rows, -1), h.reshape(rows, -1), preferred_element_type=jnp.float32
        )
        if d_bias is not None:
            d_bias = d_bias + jnp.sum(d_logits, axis=(0, 1))
        d_hidden = constrain(_put(d_hidden, index, d_h.astype(d_hidden.dtype)), ("batch", None, None))
        return constrain(d_head, ("logit_vocab", None)), d_bias, d_hidden

    init = (
        constrain(jnp.zeros(head_VxD.shape, jnp.float32), ("logit_vocab", None)),
        None if bias_V is None else jnp.zeros(bias_V.shape, jnp.float32),
        # each position is written once (padding adds zeros): no float32 accumulator needed
        constrain(jnp.zeros(hidden_ZxFxD.shape, hidden_ZxFxD.dtype), ("batch", None, None)),
    )
    d_head, d_bias, d_hidden = jax.lax.fori_loop(0, chunks_run(count_Z, block), body, init)
    return (
        d_head.astype(head_VxD.dtype),
        None if bias_V is None else d_bias.astype(bias_V.dtype),
        d_hidden,
        None,
        None,
        None,
    )


_token_logprobs.defvjp(_token_logprobs_fwd, _token_logprobs_bwd)
