"""The whole model: one decoder trunk (layers.Decoder) and two heads read from its hidden states.

reward:   r(x, y) = F(h_last), F a zero-initialised [D, 1] matrix, h_last the final-normed hidden
          state at the last real token (the EOS).
log-prob: log pi(y|x) = sum over response positions of log_softmax(h W^T + b)[target], float32,
          computed in chunks over the length so [N, L, V] float32 logits never exist at once.
          W is the embedding (tied) or the model's own `lm_head` [V, D]; b the optional
          `lm_head_bias` [V] (Phi).

The parameter tree is flat at the top: the trunk's entries (`embed_tokens`, `layers_<i>` or, with
scanned layers, the stacked `layers` (model/scan.py), the final norm) beside the heads (`reward_head`, and when untied `lm_head`, `lm_head_bias`).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from haf_jax.model.config import ModelConfig
from haf_jax.model.layers import INIT, Decoder, param
from haf_jax.sharding import constrain

HEAD_KEYS = ("reward_head", "lm_head", "lm_head_bias")


class Heads(nn.Module):
    """Declares the head parameters (applied by the functions below, not by this module)."""

    config: ModelConfig

    @nn.compact
    def __call__(self):
        c = self.config
        # The reward head F: Linear(D -> 1) without bias, zero-initialised (PAPER.md s2).
        param(self, "reward_head", nn.initializers.zeros, (c.hidden_size, 1), ("embed", "reward"))
        if not c.tie_word_embeddings:
            param(self, "lm_head", INIT, (c.vocab_size, c.hidden_size), ("vocab", "embed"))
        if c.lm_head_bias:
            param(self, "lm_head_bias", nn.initializers.zeros, (c.vocab_size,), ("vocab",))


def _init_boxed(config: ModelConfig, rng):
    trunk_rng, head_rng = jax.random.split(rng)
    tokens = np.zeros((1, 2), np.int32)
    # The parameters do not depend on the attention kernel: init with XLA's (no kernel fallback logged).
    xla = dataclasses.replace(config, attention="xla")
    trunk = Decoder(xla).init(trunk_rng, tokens, np.zeros((1, 2), np.int32), np.ones((1, 2), bool))["params"]
    return {**trunk, **Heads(config).init(head_rng)["params"]}


def init_params(config: ModelConfig, rng):
    """Randomly initialised float32 parameters (unboxed)."""
    return nn.unbox(_init_boxed(config, rng))


def abstract_params(config: ModelConfig):
    """(float32 ShapeDtypeStructs, logical axis names as PartitionSpecs), nothing allocated."""
    boxed = jax.eval_shape(lambda r: _init_boxed(config, r), jax.random.key(0))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


def trunk_params(params):
    return {k: v for k, v in params.items() if k not in HEAD_KEYS}


def lm_head(params, config: ModelConfig):
    """(W [V, D], bias [V] or None) of the LM head."""
    w = params["embed_tokens"] if config.tie_word_embeddings else params["lm_head"]
    return w, (params["lm_head_bias"] if config.lm_head_bias else None)


@flax.struct.dataclass
class PairOutputs:
    """What forward_pairs computes, float32, [B, 2] each (pair axis: 0 chosen, 1 rejected);
    a field is None when its head was not requested. ref_logp_Bx2 is attached by the step."""

    reward_Bx2: Optional[jax.Array] = None
    logp_Bx2: Optional[jax.Array] = None
    n_tokens_Bx2: Optional[jax.Array] = None
    ref_logp_Bx2: Optional[jax.Array] = None


def hidden_states(params, config: ModelConfig, tokens_NxL, last_index_N):
    """Final-normed hidden states [N, L, D] of right-padded rows (positions 0..L-1)."""
    n, length = tokens_NxL.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    valid = positions <= last_index_N[:, None]
    hidden, _ = Decoder(config).apply({"params": trunk_params(params)}, tokens_NxL, positions, valid)
    return hidden


def rewards(reward_kernel_Dx1, hidden_NxLxD, last_index_N):
    """Reward read at each row's last real token -> float32 [N]."""
    h_last_NxD = jnp.take_along_axis(hidden_NxLxD, last_index_N[:, None, None], axis=1)[:, 0]
    return h_last_NxD.astype(jnp.float32) @ reward_kernel_Dx1[:, 0].astype(jnp.float32)


def _logits(hidden, head_VxD, bias_V, softcap):
    """float32 logits of hidden [..., D] under the LM head (the head cast to the hidden's dtype)."""
    logits = jnp.einsum("...d,vd->...v", hidden, head_VxD.astype(hidden.dtype), preferred_element_type=jnp.float32)
    if bias_V is not None:
        logits = logits + bias_V.astype(jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def sequence_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, *, bias_V=None,
                      final_logit_softcap: float | None = None, chunk: int = 128):
    """Summed log-probs of the response tokens under the LM head -> (logp_N, n_tokens_N), float32.

    The logits at position i predict token i + 1, so position i contributes when token i + 1 is
    marked in `response_mask_NxL`. The length is processed `chunk` positions at a time under
    `jax.checkpoint`, so forward and backward hold one [N, chunk, V] float32 block, not [N, L, V].
    The head (tied embedding or untied matrix) is cast inside the chunk: its gradient then
    accumulates across chunks in its own (float32 master) dtype, not in the bf16 compute dtype.

    Under a mesh the head is split by vocabulary over every device ("logit_vocab") and each chunk
    of hidden states is gathered to all of them: every device computes all rows' logits for its
    V / devices slice (the log-sum-exp and the target logit reduce across slices). The other way
    round, FSDP's embed-sharded head would be all-gathered whole ([V, D] bf16) and its gradient
    accumulated whole ([V, D] float32) on every device: 3 GiB per chip for a 256k x 2048 head
    (benchmarks/haf_memory.py). Gathering a chunk of hidden states costs N x chunk x D.
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

    # The first constraint (the parameter's own layout) is where the head's gradient returns to
    # that layout: else the vocabulary split leaks into the optimizer update of the head and its moments.
    head_VxD = constrain(constrain(head_VxD, ("vocab", "embed")), ("logit_vocab", None))
    bias_V = None if bias_V is None else constrain(bias_V, ("logit_vocab",))

    @jax.checkpoint
    def chunk_logprob(h_NxCxD, t_NxC, m_NxC):
        h_NxCxD = constrain(h_NxCxD, (None, None, None))
        logits = constrain(_logits(h_NxCxD, head_VxD, bias_V, final_logit_softcap), (None, None, "logit_vocab"))
        # The target's logit as a masked sum over the vocabulary: exact (one non-zero term), and it
        # reduces across vocabulary slices, where a gather along a split axis would not.
        vocab_V = jnp.arange(logits.shape[-1], dtype=t_NxC.dtype)
        target_logit = jnp.sum(jnp.where(vocab_V == t_NxC[..., None], logits, 0.0), axis=-1)
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(logp * m_NxC, axis=-1)

    def body(total_N, xs):
        return total_N + chunk_logprob(*xs), None

    total_N, _ = jax.lax.scan(body, jnp.zeros((n,), jnp.float32), (split(hidden), split(targets), split(mask)))
    return total_N, jnp.sum(mask, axis=-1)


def forward_pairs(params, config: ModelConfig, batch, *, reward: bool = True, policy: bool = True,
                  chunk: int = 128, compute_dtype=jnp.float32) -> PairOutputs:
    """Runs the trunk once over chosen and rejected and applies the requested heads.

    batch: tokens [B, 2, L] int32, response_mask [B, 2, L], last_index [B, 2] (pair axis: 0 chosen,
    1 rejected); or a packed batch (data/packing.py: tokens, positions, segment_ids, response_mask
    [R, T], last_index [B, 2] within row b // (B / R)), which gives the same [B, 2] outputs.
    params: float32 master weights; they are cast to `compute_dtype` for the trunk.
    """
    if "segment_ids" in batch:
        return _forward_packed(params, config, batch, reward=reward, policy=policy, chunk=chunk,
                               compute_dtype=compute_dtype)
    tokens = batch["tokens"]
    b, _, length = tokens.shape
    tokens_NxL = tokens.reshape(2 * b, length)
    last_N = batch["last_index"].reshape(2 * b)
    cast = jax.tree.map(lambda p: p.astype(compute_dtype), trunk_params(params))
    hidden = hidden_states(cast, config, tokens_NxL, last_N)
    out = PairOutputs()
    if reward:
        out = out.replace(reward_Bx2=rewards(params["reward_head"], hidden, last_N).reshape(b, 2))
    if policy:
        head, bias = lm_head(params, config)
        logp, n_tok = sequence_logprobs(
            head, hidden, tokens_NxL, batch["response_mask"].reshape(2 * b, length), bias_V=bias,
            final_logit_softcap=config.final_logit_softcap, chunk=chunk)
        out = out.replace(logp_Bx2=logp.reshape(b, 2), n_tokens_Bx2=n_tok.reshape(b, 2))
    return out


def _forward_packed(params, config: ModelConfig, batch, *, reward: bool, policy: bool, chunk: int,
                    compute_dtype) -> PairOutputs:
    """forward_pairs of a packed batch: R rows of T tokens, K = B / R pair slots per row, slot k's
    chosen / rejected sequence being segment 1 + 2k / 2 + 2k of its row."""
    tokens_RxT = batch["tokens"]
    r, t = tokens_RxT.shape
    b = batch["last_index"].shape[0]
    segments = 2 * (b // r)
    last_RxS = batch["last_index"].reshape(r, segments)     # row r's slots, (chosen, rejected) each
    cast = jax.tree.map(lambda p: p.astype(compute_dtype), trunk_params(params))
    hidden, _ = Decoder(config).apply({"params": cast}, tokens_RxT, batch["positions"], batch["segment_ids"])
    out = PairOutputs()
    if reward:
        h_last_RxSxD = jnp.take_along_axis(hidden, last_RxS[..., None], axis=1)
        r_RxS = h_last_RxSxD.astype(jnp.float32) @ params["reward_head"][:, 0].astype(jnp.float32)
        out = out.replace(reward_Bx2=r_RxS.reshape(b, 2))
    if policy:
        head, bias = lm_head(params, config)
        logp, n_tok = segment_logprobs(head, hidden, tokens_RxT, batch["response_mask"], batch["segment_ids"],
                                       segments, bias_V=bias, final_logit_softcap=config.final_logit_softcap,
                                       chunk=chunk)
        out = out.replace(logp_Bx2=logp.reshape(b, 2), n_tokens_Bx2=n_tok.reshape(b, 2))
    return out


def segment_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, segment_ids_NxL, num_segments: int,
                     *, bias_V=None, final_logit_softcap: float | None = None, chunk: int = 128):
    """`sequence_logprobs` per segment of packed rows -> (logp_NxS, n_tokens_NxS), float32, column
    s - 1 for segment id s (1..S; 0 = padding). Position i predicts token i + 1 only inside one
    segment (the last token of a sequence never predicts the next sequence's first), so each
    segment's sum equals that of the sequence alone in its own row. Same chunking and
    rematerialisation as `sequence_logprobs`: one [N, chunk, V] float32 block at a time."""
    n, length, d = hidden_NxLxD.shape
    seg_next = segment_ids_NxL[:, 1:]
    same = seg_next == segment_ids_NxL[:, :-1]
    mask = (response_mask_NxL[:, 1:] * same).astype(jnp.float32)
    hidden, targets = hidden_NxLxD[:, :-1], tokens_NxL[:, 1:]
    chunk = max(1, min(chunk, length - 1))
    n_chunks = -(-(length - 1) // chunk)
    pad = n_chunks * chunk - (length - 1)
    if pad:  # padded positions carry mask 0, so they add nothing
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets, mask, seg_next = (jnp.pad(x, ((0, 0), (0, pad))) for x in (targets, mask, seg_next))
    split = lambda x: jnp.moveaxis(x.reshape(n, n_chunks, chunk, *x.shape[2:]), 1, 0)
    columns = jnp.arange(1, num_segments + 1, dtype=segment_ids_NxL.dtype)

    @jax.checkpoint
    def chunk_logprob(h_NxCxD, t_NxC, m_NxC, s_NxC):
        logits = _logits(h_NxCxD, head_VxD, bias_V, final_logit_softcap)
        target_logit = jnp.take_along_axis(logits, t_NxC[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        onehot_NxCxS = (s_NxC[..., None] == columns).astype(jnp.float32)
        return jnp.einsum("nc,ncs->ns", logp * m_NxC, onehot_NxCxS), jnp.einsum("nc,ncs->ns", m_NxC, onehot_NxCxS)

    def body(carry, xs):
        logp, count = chunk_logprob(*xs)
        return (carry[0] + logp, carry[1] + count), None

    zeros = jnp.zeros((n, num_segments), jnp.float32)
    (logp_NxS, n_NxS), _ = jax.lax.scan(body, (zeros, zeros),
                                        (split(hidden), split(targets), split(mask), split(seg_next)))
    return logp_NxS, n_NxS


def full_logits(params, config: ModelConfig, tokens_NxL, last_index_N):
    """[N, L, V] float32 logits of the LM head (for tests and small inputs only)."""
    head, bias = lm_head(params, config)
    return _logits(hidden_states(params, config, tokens_NxL, last_index_N), head, bias, config.final_logit_softcap)


def decode(params, config: ModelConfig, tokens_NxL, positions_NxL, cache, logits_at_N=None):
    """Logits [N, L, V] float32 of new tokens at `positions` (contiguous per row) attending to the
    KV cache (layers.init_cache), and the updated cache: prefill with the prompt, then one token
    at a time. Slots beyond a row's current position are never attended. With `logits_at_N` (an
    index into L per row) only that position's logits are computed, [N, V]: a prefill then never
    builds [N, L, V]."""
    hidden, cache = Decoder(config).apply({"params": trunk_params(params)}, tokens_NxL, positions_NxL,
                                          jnp.ones(tokens_NxL.shape, bool), cache)
    if logits_at_N is not None:
        hidden = jnp.take_along_axis(hidden, logits_at_N[:, None, None], axis=1)[:, 0]
    head, bias = lm_head(params, config)
    return _logits(hidden, head, bias, config.final_logit_softcap), cache
