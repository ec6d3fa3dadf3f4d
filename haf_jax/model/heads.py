"""The whole model: one decoder trunk (layers.Decoder) and two heads read from its hidden states.

reward:   r(x, y) = F(h_last), F a zero-initialised [D, 1] matrix, h_last the final-normed hidden
          state at the last real token (the EOS).
log-prob: log pi(y|x) = sum over response positions of log_softmax(h W^T + b)[target], float32,
          computed for the response positions only, in chunks, so [N, L, V] float32 logits
          never exist at once and prompt and padding positions never reach the LM head.
          W is the embedding (tied) or the model's own `lm_head` [V, D]; b the optional
          `lm_head_bias` [V] (Phi).

One path for pairs: a batch, plain [B, 2, L] or packed [R, T] (data/packing.py), is read as rows of
the trunk (`pair_rows`: a plain batch is 2B rows of one sequence, its segments the bool mask of its
real tokens), and the trunk, `rewards` and `response_logprobs` see rows only.

The parameter tree is flat at the top: the trunk's entries (`embed_tokens`, `layers_<i>` or, with
scanned layers, the stacked `layers` (model/scan.py), the final norm) beside the heads
(`reward_head`, and when untied `lm_head`, `lm_head_bias`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

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
        # The reward head F: Linear(D -> 1) without bias, zero-initialised (the paper's reward head; docs/REPRODUCE.md).
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
    """(float32 ShapeDtypeStructs, logical axis names as PartitionSpecs), nothing allocated.

    Fresh containers on every call (callers may edit them) around leaves cached per config: tracing
    the init of a deep unscanned model takes about a second (SmolLM2's 30 layers), and a LoRA run
    asks for the same config's layout a dozen times while it starts."""
    shapes, names = _abstract_params(config)
    return _copy_dicts(shapes), _copy_dicts(names)


def _copy_dicts(tree):
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


@functools.lru_cache(maxsize=32)
def _abstract_params(config: ModelConfig):
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

    reward_Bx2: jax.Array | None = None
    logp_Bx2: jax.Array | None = None
    n_tokens_Bx2: jax.Array | None = None
    ref_logp_Bx2: jax.Array | None = None
    logprob_chunks: jax.Array | None = None  # float32 scalar: LM-head chunks run (response_logprobs)

    def scores(self) -> dict[str, jax.Array]:
        """The per-pair scores computed, keyed as core/losses.py reads them: "reward", "logp",
        "n_tokens", "ref_logp" ([B, 2] each; absent when not computed)."""
        named = {
            "reward": self.reward_Bx2,
            "logp": self.logp_Bx2,
            "n_tokens": self.n_tokens_Bx2,
            "ref_logp": self.ref_logp_Bx2,
        }
        return {k: v for k, v in named.items() if v is not None}


class PairRows(NamedTuple):
    """B pairs as rows of the trunk: R rows of T tokens holding C = 2B / R sequences each; sequence c
    of row r is pair (r C + c) // 2's chosen (c even) or rejected (c odd) sequence.

    tokens_RxT, positions_RxT: int32. segments_RxT: bool for plain rows (True on the row's one
    sequence, False on padding) or int32 ids for packed rows (sequence c is segment c + 1, padding 0,
    a shared prompt < 0: data/packing.py); the trunk's attention and the log-probs take either.
    response_mask_RxT: response tokens non-zero. last_index_RxC: each sequence's last real token (its
    EOS) in its row."""

    tokens_RxT: jax.Array
    positions_RxT: jax.Array
    segments_RxT: jax.Array
    response_mask_RxT: jax.Array
    last_index_RxC: jax.Array


def _plain_layout(tokens_NxL, last_index_N):
    """(positions [N, L] int32, valid [N, L] bool) of right-padded rows holding one sequence each."""
    n, length = tokens_NxL.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (n, length))
    return positions, positions <= last_index_N[:, None]


def pair_rows(batch) -> PairRows:
    """The rows of a pair batch: plain (tokens, response_mask [B, 2, L], last_index [B, 2]) -> 2B rows
    of one sequence (row 2b + j: pair b's side j), nothing copied but reshapes; packed (data/packing.py:
    tokens, positions, segment_ids, response_mask [R, T], last_index [B, 2] within row b // (B / R))
    -> its own R rows, C = 2B / R."""
    tokens, last_Bx2 = batch["tokens"], batch["last_index"]
    pairs = last_Bx2.shape[0]
    if "segment_ids" in batch:
        r = tokens.shape[0]
        if pairs % r:
            raise ValueError(
                f"packed batch: {pairs} pairs do not fill {r} rows evenly (last_index {last_Bx2.shape}, "
                f"tokens {tokens.shape})"
            )
        return PairRows(
            tokens,
            batch["positions"],
            batch["segment_ids"],
            batch["response_mask"],
            last_Bx2.reshape(r, 2 * pairs // r),
        )
    if tokens.ndim != 3 or tokens.shape[:2] != (pairs, 2):
        raise ValueError(f"plain batch: tokens {tokens.shape} is not [B, 2, L] for last_index {last_Bx2.shape}")
    length = tokens.shape[2]
    tokens_NxL, last_Nx1 = tokens.reshape(2 * pairs, length), last_Bx2.reshape(2 * pairs, 1)
    positions, valid = _plain_layout(tokens_NxL, last_Nx1[:, 0])
    return PairRows(tokens_NxL, positions, valid, batch["response_mask"].reshape(2 * pairs, length), last_Nx1)


def hidden_states(params, config: ModelConfig, tokens_RxT, positions_RxT, segments_RxT):
    """Final-normed hidden states [R, T, D] of rows (segments: bool valid or int32 ids, PairRows), in the
    dtype of the trunk's parameters."""
    hidden, _ = Decoder(config).apply({"params": trunk_params(params)}, tokens_RxT, positions_RxT, segments_RxT)
    return hidden


def rewards(reward_kernel_Dx1, hidden_RxTxD, last_index_RxC):
    """Reward of each of a row's C sequences, read at its last real token -> float32 [R, C]."""
    if last_index_RxC.ndim != 2 or last_index_RxC.shape[0] != hidden_RxTxD.shape[0]:
        raise ValueError(f"last_index {last_index_RxC.shape} is not [R, C] for hidden states {hidden_RxTxD.shape}")
    h_last_RxCxD = jnp.take_along_axis(hidden_RxTxD, last_index_RxC[..., None], axis=1)
    return h_last_RxCxD.astype(jnp.float32) @ reward_kernel_Dx1[:, 0].astype(jnp.float32)


def response_logprobs(
    head_VxD,
    hidden_NxLxD,
    tokens_NxL,
    response_mask_NxL,
    segments_NxL,
    num_segments: int,
    *,
    bias_V=None,
    final_logit_softcap: float | None = None,
    chunk: int = 128,
):
    """Summed log-probs of the response tokens of each row's sequences under the LM head -> (logp_NxC,
    n_tokens_NxC, chunks run), float32, C = num_segments: the one log-prob entry point.

    `segments_NxL` as in PairRows: bool (one sequence a row: column 0) or int32 ids (sequence id c in
    column c - 1; padding 0 and shared prompts < 0 have none). Position i of a row predicts token
    i + 1; it counts when `response_mask_NxL[n, i + 1]` is set and tokens i and i + 1 are in one
    segment (a sequence's last token never predicts the next sequence's first), and adds to the
    column of token i + 1's segment: each sequence's sum is that of the sequence alone in a row.

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
    if tokens_NxL.shape != (n, length) or response_mask_NxL.shape != (n, length) or segments_NxL.shape != (n, length):
        raise ValueError(
            f"tokens {tokens_NxL.shape}, response_mask {response_mask_NxL.shape} and segments "
            f"{segments_NxL.shape} must all be [N, L] = {(n, length)} of the hidden states"
        )
    # At predicted token i + 1 (index i of the [N, L - 1] arrays below): counted, and whose column.
    # Elementwise over [N, L - 1]: for plain rows (bool segments) the head's forward + backward ran
    # 0.99x the time of the former one-column path (CPU, 16 rows x 256, V 8192; A/A noise 1.00x).
    column_NxT = segments_NxL[:, 1:].astype(jnp.int32) - 1
    predicted_NxT = (response_mask_NxL[:, 1:] != 0) & (segments_NxL[:, 1:] == segments_NxL[:, :-1]) & (column_NxT >= 0)

    shards = sharding.shard_count("batch", n)
    rows = n // shards  # rows per batch shard
    per_shard = rows * (length - 1)  # predicting positions per shard
    flat = lambda x: x.reshape(shards, per_shard, *x.shape[2:])  # [P, rows x (L - 1), ...], row order
    hidden = constrain(flat(hidden_NxLxD[:, :-1]), ("batch", None, None))
    targets = flat(tokens_NxL[:, 1:])
    mask = flat(predicted_NxT)
    # Each shard's response positions first, in order; the rest of the index is never used.
    order = jax.vmap(lambda m: jnp.nonzero(m, size=per_shard, fill_value=0)[0])(mask)
    count_Z = jnp.sum(mask, axis=1, dtype=jnp.int32)
    block = max(1, min(chunk, per_shard))
    order = jnp.pad(order, ((0, 0), (0, -per_shard % block)))  # whole chunks

    # The first constraint (the parameter's own layout) is where the head's gradient returns to
    # that layout: else the vocabulary split leaks into the optimizer update of the head and its moments.
    head_VxD = constrain(constrain(head_VxD, ("vocab", "embed")), ("logit_vocab", None))
    bias_V = None if bias_V is None else constrain(bias_V, ("logit_vocab",))
    logp_ZxF = lm_logprobs.token_logprobs(
        head_VxD, bias_V, hidden, targets, order, count_Z, block=block, softcap=final_logit_softcap
    )
    # Each token's log-prob back at its position, then summed per (row, column) in position order:
    # a row's sum does not depend on the other rows of its batch (how the chunks fell).
    hit_NxTxC = predicted_NxT[..., None] & (column_NxT[..., None] == jnp.arange(num_segments))
    logp_NxT = logp_ZxF.reshape(n, length - 1)
    logp = jnp.sum(jnp.where(hit_NxTxC, logp_NxT[..., None], 0.0), axis=1)
    count = jnp.sum(hit_NxTxC, axis=1, dtype=jnp.float32)
    return logp, count, lm_logprobs.chunks_run(count_Z, block).astype(jnp.float32)


def forward_pairs(
    params,
    config: ModelConfig,
    batch,
    *,
    reward: bool = True,
    policy: bool = True,
    chunk: int = 128,
    compute_dtype=jnp.float32,
    shared_prompt: bool = False,
) -> PairOutputs:
    """Runs the trunk once over chosen and rejected and applies the requested heads.

    batch: tokens [B, 2, L] int32, response_mask [B, 2, L], last_index [B, 2] (pair axis: 0 chosen,
    1 rejected); or a packed batch (data/packing.py: tokens, positions, segment_ids, response_mask
    [R, T], last_index [B, 2] within row b // (B / R)), which gives the same [B, 2] outputs. Both are
    read as rows (`pair_rows`), so the trunk, the reward read-out and the log-probs are one path.
    `shared_prompt`: a packed batch's pairs may share their prompts (data.share_prompt; the
    attention kernel must then express that mask: `attention.for_shared_prompt`). Plain rows hold
    no shared prompt (evaluation and the reference pass read them with the training config).
    params: float32 master weights; the trunk's are cast to `compute_dtype`, the heads read float32.
    """
    rows = pair_rows(batch)
    if shared_prompt and "segment_ids" in batch:
        config = attention.for_shared_prompt(config)
    pairs = batch["last_index"].shape[0]
    cast = jax.tree.map(lambda p: p.astype(compute_dtype), trunk_params(params))
    hidden = hidden_states(cast, config, rows.tokens_RxT, rows.positions_RxT, rows.segments_RxT)
    out = PairOutputs()
    if reward:
        out = out.replace(reward_Bx2=rewards(params["reward_head"], hidden, rows.last_index_RxC).reshape(pairs, 2))
    if policy:
        head, bias = lm_head(params, config)
        logp, n_tok, chunks = response_logprobs(
            head,
            hidden,
            rows.tokens_RxT,
            rows.response_mask_RxT,
            rows.segments_RxT,
            rows.last_index_RxC.shape[1],
            bias_V=bias,
            final_logit_softcap=config.final_logit_softcap,
            chunk=chunk,
        )
        out = out.replace(logp_Bx2=logp.reshape(pairs, 2), n_tokens_Bx2=n_tok.reshape(pairs, 2), logprob_chunks=chunks)
    return out


def full_logits(params, config: ModelConfig, tokens_NxL, last_index_N):
    """[N, L, V] float32 logits of the LM head (for tests and small inputs only)."""
    head, bias = lm_head(params, config)
    hidden = hidden_states(params, config, tokens_NxL, *_plain_layout(tokens_NxL, last_index_N))
    return lm_logprobs.head_logits(hidden, head, bias, config.final_logit_softcap)


def decode(params, config: ModelConfig, tokens_NxL, positions_NxL, cache, logits_at_N=None):
    """Logits [N, L, V] float32 of new tokens at `positions` (contiguous per row) attending to the
    KV cache (layers.init_cache), and the updated cache: prefill with the prompt, then one token
    at a time. Slots beyond a row's current position are never attended. With `logits_at_N` (an
    index into L per row) only that position's logits are computed, [N, V]: a prefill then never
    builds [N, L, V]."""
    hidden, cache = Decoder(config).apply(
        {"params": trunk_params(params)}, tokens_NxL, positions_NxL, jnp.ones(tokens_NxL.shape, bool), cache
    )
    if logits_at_N is not None:
        hidden = jnp.take_along_axis(hidden, logits_at_N[:, None, None], axis=1)[:, 0]
    head, bias = lm_head(params, config)
    return lm_logprobs.head_logits(hidden, head, bias, config.final_logit_softcap), cache
