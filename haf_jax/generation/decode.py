"""Sampling maths and the jitted decode loop (no I/O; the CLI is haf_jax.sample).

Per step and row, from the next-token logits (float32):

    temperature 0  -> greedy: argmax of the raw logits (first index on ties, like torch.argmax)
    temperature t  -> logits / t, then top-k (keep the k largest; 0 = off), then top-p (keep the
                      smallest set of most probable tokens whose probability, renormalised after
                      top-k, sums to >= top_p; 1.0 = off), then one categorical draw

This is the order of transformers' TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper.
Filtering keeps every token whose logit is at least a threshold (the k-th largest, and the logit
of the last token the nucleus needs), so tokens tied exactly at a threshold are kept together. No
row is sorted: the thresholds are read off the NUCLEUS_CANDIDATES largest logits (lax.top_k) where
the top-k set and the nucleus end inside them, else found by bisection over float32 order keys
(32 masked count / sum passes over the row, exact: the same tokens as a sort, up to the order the
nucleus mass is summed in). top_k / top_p / the EOS ids are traced values, so changing them does
not compile again.

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
    traced scalars; logits are finite or -inf.

    The filters are thresholds: the k-th largest scaled logit, and the smallest value v of the top-k
    set whose more likely tokens hold < top_p of its probability. The NUCLEUS_CANDIDATES largest
    (lax.top_k) decide them for a row whose top-k set and nucleus end inside those; the other rows,
    if any (a flat distribution, a large top_k), bisect for them over whole rows, no sort (see
    _bisected_thresholds). Each row takes its own path, so its result does not depend on the batch.
    On CPU, 32 rows of a 49k vocabulary: lax.top_k of 512 ~12 ms, then ~12 ms per bisected filter
    where a full sort of the rows took ~330 ms."""
    scaled_NxV = logits_NxV.astype(jnp.float32) / temperature_N[:, None]
    n, vocab = scaled_NxV.shape
    k = jnp.where((top_k > 0) & (top_k < vocab), top_k, vocab)
    width = min(vocab, NUCLEUS_CANDIDATES)
    # The barrier keeps top_k's output whole: XLA's CPU TopK is matched on a sort read only through a
    # leading slice, and the reads below, folded into it, left a full sort of every row (~250 ms).
    descending_NxC = jax.lax.optimization_barrier(jax.lax.top_k(scaled_NxV, width)[0])
    kth_Nx1 = jnp.where(
        k == vocab,
        jnp.min(scaled_NxV, axis=-1, keepdims=True),
        jnp.take_along_axis(descending_NxC, jnp.full((n, 1), jnp.minimum(k, width) - 1), axis=-1),
    )
    in_top_k = descending_NxC >= kth_Nx1
    # the normaliser of the renormalised top-k distribution, over every token of the top-k set
    log_z_Nx1 = jax.nn.logsumexp(jnp.where(scaled_NxV >= kth_Nx1, scaled_NxV, _NEG_INF), axis=-1, keepdims=True)
    probs = jnp.where(in_top_k, jnp.exp(descending_NxC - log_z_Nx1), 0.0)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    needed = (mass_before < top_p) & in_top_k  # the most likely token is always needed
    count_Nx1 = jnp.sum(needed, axis=-1, keepdims=True)
    last_needed_Nx1 = jnp.take_along_axis(descending_NxC, count_Nx1 - 1, axis=-1)
    threshold_Nx1 = jnp.where(top_p < 1.0, jnp.maximum(last_needed_Nx1, kth_Nx1), kth_Nx1)
    if width < vocab:  # else the candidates are the whole sorted row and decide every row
        # the candidates decided the row: no top-k tie and no needed token can lie past their end
        k_inside_Nx1 = (k == vocab) | ((k < width) & (descending_NxC[:, -1:] < kth_Nx1))
        decided_Nx1 = k_inside_Nx1 & ((top_p >= 1.0) | (count_Nx1 < width))
        threshold_Nx1 = jax.lax.cond(
            jnp.all(decided_Nx1),
            lambda: threshold_Nx1,
            lambda: jnp.where(
                decided_Nx1,
                threshold_Nx1,
                _bisected_thresholds(scaled_NxV, k, top_p, kth_Nx1, jnp.all(k_inside_Nx1)),
            ),
        )
    return scaled_NxV >= threshold_Nx1


def _order_key(x):
    """int32 keys in the order of the float32 values x (not NaN; -inf is fine): a float's bits as
    int32 with the magnitude bits of negatives flipped, so more negative is smaller. The map is its
    own inverse (_from_order_key). -0.0, and subnormals where the device flushes them (XLA on CPU),
    get +0.0's key, as they compare equal to it."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jnp.where(x == 0, 0, bits ^ ((bits >> 31) & 0x7FFFFFFF))


def _from_order_key(key):
    return jax.lax.bitcast_convert_type(key ^ ((key >> 31) & 0x7FFFFFFF), jnp.float32)


def _bisect(holds, lo_Nx1, hi_Nx1):
    """(lo, hi) int32 [N, 1], per row where a predicate on order keys that holds up to some key and
    not above it changes: lo the last key it holds at, hi = lo + 1. The bounds given are taken to
    hold / fail, not evaluated (if lo fails after all, both end at lo). They are keys of finite or
    infinite floats, so hi - lo < 2^32 and 32 halvings always meet."""

    def halve(_, bounds):
        lo, hi = bounds
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)  # floor((lo + hi) / 2) without int32 overflow
        up = holds(mid)
        return jnp.where(up, mid, lo), jnp.where(up, hi, mid)

    return jax.lax.fori_loop(0, 32, halve, (lo_Nx1, hi_Nx1))


def _bisected_thresholds(scaled_NxV, k, top_p, kth_Nx1, kth_exact):
    """float32 [N, 1] thresholds of allowed_tokens for any rows, by bisection over order keys: 32
    masked count / sum passes over [N, V] per filter (a sort of the rows took ~25x as long on CPU).
    kth_Nx1 is taken as the k-th largest value when kth_exact (every row's top-k set ended inside
    the candidates), else searched for too.

    k-th largest: the largest key t with count(x >= t) >= k, always a row's value. Nucleus: with p
    the renormalised top-k probabilities (0 outside the set), mass(x > t) is non-increasing in t, so
    the smallest key t* with mass(x > t*) < top_p splits the row's values exactly where "mass of the
    more likely tokens < top_p" does, and the threshold is the smallest value >= t*. A masked sum is
    monotone in its mask too (float additions of non-negative terms in a fixed order), so this
    finds the same tokens as the running sum of a sort unless the two summation orders round a
    boundary differently (the mass within a float32 rounding of top_p)."""
    key_NxV = _order_key(scaled_NxV)
    max_key_Nx1 = jnp.max(key_NxV, axis=-1, keepdims=True)

    def kth_searched():
        def holds_k(t_Nx1):
            return jnp.sum(key_NxV >= t_Nx1, axis=-1, keepdims=True, dtype=jnp.int32) >= k

        # count(x >= min) = V >= k holds, count(x >= max + 1) = 0 does not
        lo_Nx1, _ = _bisect(holds_k, jnp.min(key_NxV, axis=-1, keepdims=True), max_key_Nx1 + 1)
        return _from_order_key(lo_Nx1)

    kth_Nx1 = jax.lax.cond(kth_exact, lambda: kth_Nx1, kth_searched)

    def nucleus():
        kth_key_Nx1 = _order_key(kth_Nx1)
        in_top_k = key_NxV >= kth_key_Nx1
        log_z_Nx1 = jax.nn.logsumexp(jnp.where(in_top_k, scaled_NxV, _NEG_INF), axis=-1, keepdims=True)
        probs_NxV = jnp.where(in_top_k, jnp.exp(scaled_NxV - log_z_Nx1), 0.0)

        def heavy(t_Nx1):  # the tokens above t hold >= top_p: the threshold lies higher
            return jnp.sum(jnp.where(key_NxV > t_Nx1, probs_NxV, 0.0), axis=-1, keepdims=True) >= top_p

        # mass(x > max) = 0 < top_p: the most likely token is always kept; below the k-th largest
        # value the answer is the k-th largest (taken when even the whole set holds < top_p)
        _, t_star_Nx1 = _bisect(heavy, kth_key_Nx1 - 1, max_key_Nx1)
        smallest_Nx1 = jnp.min(jnp.where(key_NxV >= t_star_Nx1, scaled_NxV, jnp.inf), axis=-1, keepdims=True)
        return jnp.maximum(smallest_Nx1, kth_Nx1)

    return jax.lax.cond(top_p < 1.0, nucleus, lambda: kth_Nx1)


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
