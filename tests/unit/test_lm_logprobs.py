"""heads.response_logprobs (model/lm_logprobs.py: response positions only, hand-written backward)
against the full log-softmax over every position: values and gradients in the head, its bias and
the hidden states, with and without a final-logit soft-cap, for chunks of 1, 4 and all positions;
and the number of chunks it runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.model import heads, lm_logprobs

N, L, D, V = 6, 37, 8, 50


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    f32 = lambda x: jnp.asarray(x, jnp.float32)
    return (
        f32(rng.normal(size=(V, D))),
        f32(rng.normal(size=(V,))),
        f32(rng.normal(size=(N, L, D))),
        jnp.asarray(rng.integers(0, V, (N, L)), jnp.int32),
        jnp.asarray(rng.random((N, L)) < 0.4, jnp.int32),
    )


def full_softmax_logprobs(head, bias, hidden, tokens, mask, softcap):
    logits = jnp.einsum("nld,vd->nlv", hidden, head) + (0.0 if bias is None else bias)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    logp = jax.nn.log_softmax(logits, axis=-1)[:, :-1]
    return jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0] * mask[:, 1:], axis=-1)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("chunk", [1, 4, 128])
def test_values_and_gradients_equal_the_full_log_softmax(inputs, softcap, with_bias, chunk):
    head, bias, hidden, tokens, mask = inputs
    bias = bias if with_bias else None
    one_sequence = jnp.ones(tokens.shape, bool)  # every row one sequence: column 0
    ours = lambda w, b, h: heads.response_logprobs(
        w, h, tokens, mask, one_sequence, 1, bias_V=b, final_logit_softcap=softcap, chunk=chunk
    )[0][:, 0]
    ref = lambda w, b, h: full_softmax_logprobs(w, b, h, tokens, mask, softcap)
    np.testing.assert_allclose(ours(head, bias, hidden), ref(head, bias, hidden), rtol=1e-6, atol=3e-5)
    weights = jnp.arange(1.0, N + 1)  # a different cotangent per row
    grad = lambda f: jax.grad(lambda *a: jnp.sum(f(*a) * weights), argnums=(0, 1, 2))(head, bias, hidden)
    for g, g_ref in zip(grad(ours), grad(ref)):
        if g_ref is not None:
            np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=3e-5)
    # prompt and padding positions get no gradient: only the response tokens' predictors do
    d_hidden = np.asarray(grad(ours)[2])
    predictor = np.zeros((N, L), bool)
    predictor[:, :-1] = np.asarray(mask)[:, 1:] != 0
    assert np.all(d_hidden[~predictor] == 0) and np.all(np.abs(d_hidden[predictor]).sum(-1) > 0)


def test_chunks_run_cover_the_fullest_shard_only():
    count = jnp.asarray([14, 3], jnp.int32)
    assert int(lm_logprobs.chunks_run(count, 16)) == 1
    assert int(lm_logprobs.chunks_run(count.at[0].set(17), 16)) == 2
    assert int(lm_logprobs.chunks_run(jnp.zeros(2, jnp.int32), 16)) == 0
