"""Sampling maths and the jitted decode loop (no I/O; the CLI is haf_jax.sample).

Per step and row, from the next-token logits (float32):

    temperature 0  -> greedy: argmax of the raw logits (first index on ties, like torch.argmax)
    temperature t  -> logits / t, then top-k (keep the k largest; 0 = off), then top-p (keep the
                      smallest set of most probable tokens whose probability, renormalised after
                      top-k, sums to >= top_p; 1.0 = off), then one categorical draw

This is the order of transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper.
Filtering keeps every token whose logit is at least a threshold (the k-th largest, and the logit
of the last token the nucleus needs), so tokens tied exactly at a threshold are kept together. One
sort of the row serves both filters; top_k / top_p / the EOS ids are traced values, so changing
them does not compile again.

Rows are right-padded prompts with explicit positions: row i's prompt fills positions
0..len_i-1, its new tokens follow at len_i, len_i + 1, ... and write the KV cache slot of their
position (heads.decode), so the padding after a short prompt is overwritten before it could be
attended. Randomness: one key per row, folded with the step number, so what a candidate draws
depends only on its key and its logits, not on the other rows of the batch.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from haf_jax.model import heads, layers
from haf_jax.model.config import ModelConfig

_NEG_INF = -jnp.inf
MAX_EOS_IDS = 8
NUCLEUS_CANDIDATES = 512  # largest logits a row's top-k / top-p filters are read from first


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How to decode. max_new_tokens and pad_id fix shapes and are static (a new value compiles
    again); top_k, top_p and eos_ids are passed as arrays, so one compile serves them all."""

    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int = 0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < len(self.eos_ids) <= MAX_EOS_IDS or min(self.eos_ids) < 0:
            raise ValueError(f"need 1 to {MAX_EOS_IDS} EOS ids >= 0 to stop on, got {self.eos_ids}")


def allowed_tokens(logits_NxV, temperature_N, top_k=0, top_p=1.0):
    """bool [N, V]: the tokens a row may draw after temperature, top-k and top-p (all True when
    both filters are off). A row's temperature must be > 0; top_k (int) and top_p (float) may be
    traced scalars.

    The filters are thresholds read off each row's largest logits in descending order. The
    NUCLEUS_CANDIDATES largest (lax.top_k) decide them whenever the top-k set and the nucleus end
    inside those; only a batch where they do not (a flat distribution, a large top_k) sorts whole
    rows. On CPU a full sort of 32 rows of a 49k vocabulary took 387 ms, lax.top_k of 512 16 ms."""
    scaled_NxV = logits_NxV.astype(jnp.float32) / temperature_N[:, None]
    n, vocab = scaled_NxV.shape
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    largest_NxC = jax.lax.top_k(scaled_NxV, min(vocab, NUCLEUS_CANDIDATES))[0]

    def thresholds(descending_NxS):
        """[N, 1] threshold from a descending prefix of each row that holds the top-k set and the nucleus."""
        width = descending_NxS.shape[1]
        kth_Nx1 = jnp.where(
            k == vocab,
            jnp.min(scaled_NxV, axis=-1, keepdims=True),
            jnp.take_along_axis(descending_NxS, jnp.full((n, 1), jnp.minimum(k, width) - 1), axis=-1),
        )
        in_top_k = descending_NxS >= kth_Nx1
        # the normaliser of the renormalised top-k distribution, over every token of the top-k set
        log_z_Nx1 = jax.nn.logsumexp(jnp.where(scaled_NxV >= kth_Nx1, scaled_NxV, _NEG_INF), axis=-1, keepdims=True)
        probs = jnp.where(in_top_k, jnp.exp(descending_NxS - log_z_Nx1), 0.0)
        mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        needed = (mass_before < top_p) & in_top_k  # the most likely token is always needed
        count_Nx1 = jnp.sum(needed, axis=-1, keepdims=True)
        last_needed_Nx1 = jnp.take_along_axis(descending_NxS, count_Nx1 - 1, axis=-1)
        threshold_Nx1 = jnp.where(top_p < 1.0, jnp.maximum(last_needed_Nx1, kth_Nx1), kth_Nx1)
        # the prefix decided it: no top-k tie and no needed token can lie past its end
        k_inside = (k == vocab) | ((k < width) & (descending_NxS[:, -1:] < kth_Nx1))
        p_inside = (top_p >= 1.0) | (count_Nx1 < width)
        return threshold_Nx1, jnp.all(k_inside & p_inside)

    threshold_Nx1, decided = thresholds(largest_NxC)
    if largest_NxC.shape[1] < vocab:  # else the prefix is the whole sorted row
        threshold_Nx1 = jax.lax.cond(
            decided, lambda: threshold_Nx1, lambda: thresholds(-jnp.sort(-scaled_NxV, axis=-1))[0]
        )
    return scaled_NxV >= threshold_Nx1


def next_tokens(key_N, logits_NxV, temperature_N, top_k=0, top_p=1.0):
    """One token per row, int32 [N]: greedy where temperature_N == 0, else a draw from the
    filtered distribution with the row's own key (the filters are skipped when every row is greedy)."""
    logits = logits_NxV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    hot = temperature_N > 0

    def draw():
        safe_t = jnp.where(hot, temperature_N, 1.0)
        keep = allowed_tokens(logits, safe_t, top_k, top_p)
        filtered = jnp.where(keep, logits / safe_t[:, None], _NEG_INF)
        return jax.vmap(jax.random.categorical)(key_N, filtered).astype(jnp.int32)

    drawn = jax.lax.cond(jnp.any(hot), draw, lambda: greedy)
    return jnp.where(hot, drawn, greedy)


def generate(
    params, prompt_NxP, length_N, temperature_N, key_N, active_N, *, config: ModelConfig, settings: DecodeSettings
):
    """Samples up to settings.max_new_tokens tokens after each row's prompt.

    params: the model's parameters in the compute dtype (the KV cache takes their dtype).
    prompt_NxP int32, right-padded; length_N int32 >= 1 real tokens per row; temperature_N
    float32 (0 = greedy); key_N a typed PRNG key per row; active_N bool (False: filler row that
    generates nothing). Returns (tokens [N, T] int32, T = max_new_tokens, `pad_id` after a row
    stopped; n_new_N int32 tokens generated, EOS included; eos_N bool, True where an EOS ended
    the row). The loop ends as soon as every row has stopped.
    """
    s = settings
    eos_ids_E = np.full(MAX_EOS_IDS, -1, np.int32)  # -1 never matches: one shape for any count
    eos_ids_E[: len(s.eos_ids)] = s.eos_ids
    return _generate(
        params,
        prompt_NxP,
        length_N,
        temperature_N,
        key_N,
        active_N,
        np.int32(s.top_k),
        np.float32(s.top_p),
        eos_ids_E,
        config=config,
        max_new_tokens=s.max_new_tokens,
        pad_id=s.pad_id,
    )


@functools.partial(jax.jit, static_argnames=("config", "max_new_tokens", "pad_id"))
def _generate(
    params,
    prompt_NxP,
    length_N,
    temperature_N,
    key_N,
    active_N,
    top_k,
    top_p,
    eos_ids_E,
    *,
    config: ModelConfig,
    max_new_tokens: int,
    pad_id: int,
):
    n, p = prompt_NxP.shape
    dtype = params["embed_tokens"].dtype
    cache = layers.init_cache(config, n, p + max_new_tokens, dtype)
    positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (n, p))
    logits_NxV, cache = heads.decode(params, config, prompt_NxP, positions, cache, logits_at_N=length_N - 1)

    def keep_going(carry):
        t, _, _, _, done_N, _ = carry
        return (t < max_new_tokens) & ~jnp.all(done_N)

    def step(carry):
        t, logits_NxV, cache, out_NxT, done_N, n_new_N = carry
        keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(key_N, t)
        token_N = next_tokens(keys, logits_NxV, temperature_N, top_k, top_p)
        token_N = jnp.where(done_N, pad_id, token_N)
        out_NxT = out_NxT.at[:, t].set(token_N)
        n_new_N = n_new_N + (~done_N).astype(jnp.int32)
        done_N = done_N | jnp.isin(token_N, eos_ids_E)
        logits, cache = heads.decode(params, config, token_N[:, None], (length_N + t)[:, None], cache)
        return t + 1, logits[:, 0], cache, out_NxT, done_N, n_new_N

    out = jnp.full((n, max_new_tokens), pad_id, jnp.int32)
    carry = (jnp.int32(0), logits_NxV, cache, out, ~active_N, jnp.zeros((n,), jnp.int32))
    _, _, _, out, _, n_new_N = jax.lax.while_loop(keep_going, step, carry)
    last_N = jnp.take_along_axis(out, jnp.maximum(n_new_N - 1, 0)[:, None], axis=1)[:, 0]
    eos_N = (n_new_N > 0) & jnp.isin(last_N, eos_ids_E)
    return out, n_new_N, eos_N
