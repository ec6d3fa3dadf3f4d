"""The whole model: one decoder trunk (layers.Decoder) and two heads read from its hidden states.

reward:   r(x, y) = F(h_last), F a zero-initialised [D, 1] matrix, h_last the final-normed hidden
          state at the last real token (the EOS).
log-prob: log pi(y|x) = sum over response positions of log_softmax(h W^T + b)[target], float32,
          computed for the response positions only, in chunks, so [N, L, V] float32 logits
          never exist at once and prompt and padding positions never reach the LM head.
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

from haf_jax.core import sharding
from haf_jax.core.sharding import constrain
from haf_jax.model import attention, lm_logprobs
from haf_jax.model.config import ModelConfig
from haf_jax.model.layers import INIT, Decoder, param

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
    logprob_chunks: Optional[jax.Array] = None   # float32 scalar: LM-head chunks run (response_logprobs)


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


def sequence_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, *, bias_V=None,
                      final_logit_softcap: float | None = None, chunk: int = 128):
    """Summed log-probs of the response tokens under the LM head -> (logp_N, n_tokens_N), float32.

    The logits at position i predict token i + 1, so position i contributes when token i + 1 is
    marked in `response_mask_NxL`. Only response positions reach the LM head (`response_logprobs`).
    """
    logp, count, _ = response_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL,
                                       jnp.zeros(tokens_NxL.shape, jnp.int32), 1, bias_V=bias_V,
                                       final_logit_softcap=final_logit_softcap, chunk=chunk)
    return logp[:, 0], count[:, 0]


def response_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, column_NxL, num_columns: int, *,
                      bias_V=None, final_logit_softcap: float | None = None, chunk: int = 128):
    """Response log-probs summed per row and column -> (logp_NxG, n_tokens_NxG, chunks run), float32,
    G = num_columns.

    Position i of a row predicts token i + 1; it counts when `response_mask_NxL[n, i + 1]` is set
    and adds to column `column_NxL[n, i + 1]` (0 for a plain row; a packed row's sequence index).

    Only response positions go through the LM head, the costliest matmul of the step: the
    positions of each batch shard (all rows outside a mesh) are flattened, the response ones
    moved to the front in order, and `model/lm_logprobs.py` runs the head over them
    `chunk` per shard at a time, as many chunks as the fullest shard needs, with a hand-written
    backward, so forward and backward hold one [shards, chunk, V] float32 block of logits, never
    [N, L, V], and at most chunk - 1 positions per shard are computed in vain. Prompts and
    padding, typically more than half of a preference batch, cost nothing; a full-length response
    costs what it did. The head (tied embedding or untied matrix) is cast inside the chunk: its
    gradient accumulates in float32 and returns in its own dtype.

    Under a mesh the head is split by vocabulary over every device ("logit_vocab") and each chunk
    of hidden states is gathered to all of them: every device computes all rows' logits for its
    V / devices slice (the log-sum-exp and the target logit reduce across slices). The other way
    round, FSDP's embed-sharded head would be all-gathered whole ([V, D] bf16) and its gradient
    accumulated whole ([V, D] float32) on every device: 3 GiB per chip for a 256k x 2048 head
    (benchmarks/haf_memory.py). Gathering a chunk of hidden states costs shards x chunk x D.
    """
    n, length, _ = hidden_NxLxD.shape
    shards = sharding.shard_count("batch", n)
    rows = n // shards                     # rows per batch shard
    per_shard = rows * (length - 1)        # predicting positions per shard
    flat = lambda x: x.reshape(shards, per_shard, *x.shape[2:])   # [P, rows x (L - 1), ...], row order
    hidden = constrain(flat(hidden_NxLxD[:, :-1]), ("batch", None, None))
    targets = flat(tokens_NxL[:, 1:])
    mask = flat(response_mask_NxL[:, 1:] != 0)
    # Each shard's response positions first, in order; the rest of the index is never used.
    order = jax.vmap(lambda m: jnp.nonzero(m, size=per_shard, fill_value=0)[0])(mask)
    count_P = jnp.sum(mask, axis=1, dtype=jnp.int32)
    block = max(1, min(chunk, per_shard))
    order = jnp.pad(order, ((0, 0), (0, -per_shard % block)))   # whole chunks

    # The first constraint (the parameter's own layout) is where the head's gradient returns to
    # that layout: else the vocabulary split leaks into the optimizer update of the head and its moments.
    head_VxD = constrain(constrain(head_VxD, ("vocab", "embed")), ("logit_vocab", None))
    bias_V = None if bias_V is None else constrain(bias_V, ("logit_vocab",))
    logp_PxT = lm_logprobs.token_logprobs(head_VxD, bias_V, hidden, targets, order, count_P, block=block,
                                          softcap=final_logit_softcap)
    # Each token's log-prob back at its position, then summed per (row, column) in position order:
    # a row's sum does not depend on the other rows of its batch (how the chunks fell).
    hit_NxTxG = (response_mask_NxL[:, 1:, None] != 0) & (column_NxL[:, 1:, None] == jnp.arange(num_columns))
    logp_NxT = logp_PxT.reshape(n, length - 1)
    logp = jnp.sum(jnp.where(hit_NxTxG, logp_NxT[..., None], 0.0), axis=1)
    count = jnp.sum(hit_NxTxG, axis=1, dtype=jnp.float32)
    return logp, count, lm_logprobs.chunks_run(count_P, block).astype(jnp.float32)


def forward_pairs(params, config: ModelConfig, batch, *, reward: bool = True, policy: bool = True,
                  chunk: int = 128, compute_dtype=jnp.float32, shared_prompt: bool = False) -> PairOutputs:
    """Runs the trunk once over chosen and rejected and applies the requested heads.

    batch: tokens [B, 2, L] int32, response_mask [B, 2, L], last_index [B, 2] (pair axis: 0 chosen,
    1 rejected); or a packed batch (data/packing.py: tokens, positions, segment_ids, response_mask
    [R, T], last_index [B, 2] within row b // (B / R)), which gives the same [B, 2] outputs.
    `shared_prompt`: a packed batch's pairs may share their prompts (data.share_prompt; the
    attention kernel must then express that mask: `attention.for_shared_prompt`).
    params: float32 master weights; they are cast to `compute_dtype` for the trunk.
    """
    if "segment_ids" in batch:
        if shared_prompt:
            config = attention.for_shared_prompt(config)
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
        logp, n_tok, chunks = response_logprobs(
            head, hidden, tokens_NxL, batch["response_mask"].reshape(2 * b, length), jnp.zeros_like(tokens_NxL), 1,
            bias_V=bias, final_logit_softcap=config.final_logit_softcap, chunk=chunk)
        out = out.replace(logp_Bx2=logp.reshape(b, 2), n_tokens_Bx2=n_tok.reshape(b, 2), logprob_chunks=chunks)
    return out


def _forward_packed(params, config: ModelConfig, batch, *, reward: bool, policy: bool, chunk: int,
                    compute_dtype) -> PairOutputs:
    """forward_pairs of a packed batch: R rows of T tokens, K = B / R pair slots per row, slot k's
    chosen / rejected sequence being segment 1 + 2k / 2 + 2k of its row (and its shared prompt, if
    any, segment -(k + 1): it holds no response token and no read-out)."""
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
        logp, n_tok, chunks = segment_logprobs(head, hidden, tokens_RxT, batch["response_mask"], batch["segment_ids"],
                                            segments, bias_V=bias, final_logit_softcap=config.final_logit_softcap,
                                            chunk=chunk)
        out = out.replace(logp_Bx2=logp.reshape(b, 2), n_tokens_Bx2=n_tok.reshape(b, 2), logprob_chunks=chunks)
    return out


def segment_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, segment_ids_NxL, num_segments: int,
                     **kw):
    """`response_logprobs` per segment of packed rows -> (logp_NxS, n_tokens_NxS, chunks run), column
    s - 1 for segment id s (1..S; 0 = padding, < 0 shared prompts: no column). Position i predicts
    token i + 1 only inside one segment (the last token of a sequence never predicts the next
    sequence's first), so each segment's sum equals that of the sequence alone in its own row."""
    same = segment_ids_NxL[:, 1:] == segment_ids_NxL[:, :-1]
    mask = response_mask_NxL.astype(bool) & jnp.pad(same, ((0, 0), (1, 0)))   # at the predicted token
    return response_logprobs(head_VxD, hidden_NxLxD, tokens_NxL, mask, segment_ids_NxL.astype(jnp.int32) - 1,
                             num_segments, **kw)


def full_logits(params, config: ModelConfig, tokens_NxL, last_index_N):
    """[N, L, V] float32 logits of the LM head (for tests and small inputs only)."""
    head, bias = lm_head(params, config)
    return lm_logprobs.head_logits(hidden_states(params, config, tokens_NxL, last_index_N), head, bias,
                                   config.final_logit_softcap)


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
    return lm_logprobs.head_logits(hidden, head, bias, config.final_logit_softcap), cache
