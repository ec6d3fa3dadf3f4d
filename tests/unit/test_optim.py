"""haf_jax.core.optim: schedules, clipping, AdamW defaults and gradient accumulation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from haf_jax.core.optim import learning_rate_schedule, make_optimizer


def lrs(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def test_linear_schedule_no_warmup():
    s = learning_rate_schedule(learning_rate=1e-5, total_steps=3200)
    np.testing.assert_allclose(
        lrs(s, [0, 1600, 3199, 3200, 5000]), [1e-5, 5e-6, 1e-5 / 3200, 0.0, 0.0], rtol=1e-5, atol=1e-12
    )


def test_linear_schedule_with_warmup():
    s = learning_rate_schedule(learning_rate=1.0, total_steps=110, warmup_steps=10)
    np.testing.assert_allclose(lrs(s, [0, 5, 10, 60, 110, 200]), [0.0, 0.5, 1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_cosine_and_constant_schedules():
    c = learning_rate_schedule(learning_rate=2.0, total_steps=100, schedule="cosine")
    np.testing.assert_allclose(lrs(c, [0, 50, 100]), [2.0, 1.0, 0.0], atol=1e-6)
    cw = learning_rate_schedule(learning_rate=2.0, total_steps=110, warmup_steps=10, schedule="cosine")
    np.testing.assert_allclose(lrs(cw, [0, 5, 10, 60, 110]), [0.0, 1.0, 2.0, 1.0, 0.0], atol=1e-6)
    k = learning_rate_schedule(learning_rate=3.0, total_steps=10, warmup_steps=4, schedule="constant")
    np.testing.assert_allclose(lrs(k, [0, 2, 4, 9, 1000]), [0.0, 1.5, 3.0, 3.0, 3.0], atol=1e-6)


def test_schedule_validation():
    with pytest.raises(ValueError, match="linear, cosine, constant"):
        learning_rate_schedule(learning_rate=1.0, total_steps=10, schedule="step")
    with pytest.raises(ValueError, match="total_steps"):
        learning_rate_schedule(learning_rate=1.0, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="accumulation_steps"):
        make_optimizer(learning_rate=1.0, total_steps=10, accumulation_steps=0)


def test_adamw_defaults_match_paper():
    """First AdamW update is -lr * g / (|g| + eps) after bias correction; eps = 1e-5, wd = 0."""
    tx = make_optimizer(learning_rate=0.1, total_steps=10)
    params = {"w": jnp.array([3.0, -2.0])}
    g = {"w": jnp.array([1e-5, -1e-5])}
    upd, _ = jax.jit(tx.update)(g, tx.init(params), params)
    np.testing.assert_allclose(np.asarray(upd["w"]), [-0.05, 0.05], rtol=1e-4)
    # zero gradient and zero weight decay: no update at all
    upd0, _ = jax.jit(tx.update)({"w": jnp.zeros(2)}, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(upd0["w"]), 0.0)
    # decoupled weight decay: -lr * wd * p
    txd = make_optimizer(learning_rate=0.1, total_steps=10, weight_decay=0.5)
    updd, _ = jax.jit(txd.update)({"w": jnp.zeros(2)}, txd.init(params), params)
    np.testing.assert_allclose(np.asarray(updd["w"]), [-0.15, 0.1], rtol=1e-6)


def test_clipping_clips():
    params = {"a": jnp.ones(3), "b": jnp.ones(2)}
    huge = {"a": jnp.full(3, 1e6), "b": jnp.full(2, -1e6)}
    small = {"a": jnp.full(3, 0.1), "b": jnp.full(2, 0.1)}
    lr = 1e-2

    def two_steps(clip_norm):
        tx = make_optimizer(learning_rate=lr, total_steps=1000, clip_norm=clip_norm)
        update = jax.jit(tx.update)
        state = tx.init(params)
        upd1, state = update(huge, state, params)
        upd2, state = update(small, state, params)
        return upd1, upd2, state

    upd1, upd2, state = two_steps(1.0)
    # the first update of AdamW is bounded by lr per coordinate whatever the gradient
    for u in jax.tree.leaves(upd1):
        assert np.all(np.abs(np.asarray(u)) <= lr * (1 + 1e-6))
    # Adam's second moment saw the CLIPPED gradient: nu = (1 - b2) * g_clipped^2, ||g_clipped|| = 1
    adam_state = state[1][0]
    nu = jax.tree.leaves(adam_state.nu)
    nu_total = sum(float(jnp.sum(n)) for n in nu)
    g2 = 0.1**2 * 5
    np.testing.assert_allclose(nu_total, 0.999 * (1 - 0.999) * 1.0 + (1 - 0.999) * min(g2, 1.0), rtol=1e-4)
    # equivalently: the clipped optimiser == the unclipped one fed the pre-clipped gradient
    norm = float(optax.tree.norm(huge))
    pre = jax.tree.map(lambda g: g / norm, huge)
    tx_free = make_optimizer(learning_rate=lr, total_steps=1000, clip_norm=None)
    update_free = jax.jit(tx_free.update)
    st = tx_free.init(params)
    _, st = update_free(pre, st, params)
    ref2, _ = update_free(small, st, params)
    _, noclip2, _ = two_steps(None)
    for k in params:
        np.testing.assert_allclose(np.asarray(upd2[k]), np.asarray(ref2[k]), rtol=1e-5)
        assert not np.allclose(np.asarray(upd2[k]), np.asarray(noclip2[k]), rtol=1e-2)


def test_accumulation_equals_averaged_gradient_step():
    """k micro-steps of accumulation == one plain step on the mean gradient; the schedule counts
    optimiser updates (two updates with total_steps=2 use lr and lr/2)."""
    k, d = 4, 5
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(k, 2, 8, d)), jnp.float32)  # per update, per micro-batch
    b = jnp.asarray(rng.normal(size=(k, 2, 8)), jnp.float32)

    def loss(p, a_, b_):  # a small quadratic
        return 0.5 * jnp.mean(jnp.square(a_ @ p["w"] - b_))

    grad = jax.jit(jax.grad(loss))
    kw = dict(learning_rate=0.1, total_steps=2, clip_norm=0.5)
    p0 = {"w": jnp.asarray(rng.normal(size=d), jnp.float32)}

    tx_acc = make_optimizer(accumulation_steps=k, **kw)
    update_acc = jax.jit(tx_acc.update)
    p, st = p0, tx_acc.init(p0)
    for upd_i in range(2):
        for micro in range(k):
            u, st = update_acc(grad(p, a[micro, upd_i], b[micro, upd_i]), st, p)
            if micro < k - 1:
                assert float(jnp.max(jnp.abs(u["w"]))) == 0.0
            p = optax.apply_updates(p, u)
    p_acc = p

    tx = make_optimizer(**kw)
    update = jax.jit(tx.update)
    p, st = p0, tx.init(p0)
    for upd_i in range(2):
        gs = [grad(p, a[micro, upd_i], b[micro, upd_i]) for micro in range(k)]
        g_mean = jax.tree.map(lambda *x: sum(x) / k, *gs)
        u, st = update(g_mean, st, p)
        p = optax.apply_updates(p, u)
    np.testing.assert_allclose(np.asarray(p_acc["w"]), np.asarray(p["w"]), rtol=1e-6, atol=1e-6)
    assert not np.allclose(np.asarray(p["w"]), np.asarray(p0["w"]))


def test_moment_dtype_keeps_the_first_moment_in_bfloat16():
    params = {"w": jnp.ones((3, 4), jnp.float32), "b": jnp.zeros((4,), jnp.float32)}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
    half = make_optimizer(learning_rate=1e-2, total_steps=4, moment_dtype="bfloat16")
    full = make_optimizer(learning_rate=1e-2, total_steps=4)
    s_half, s_full = half.init(params), full.init(params)
    for _ in range(2):  # the dtype survives updates (a jitted step's state keeps its layout)
        u_half, s_half = jax.jit(half.update)(grads, s_half, params)
        u_full, s_full = full.update(grads, s_full, params)
    adam_half, adam_full = s_half[1][0], s_full[1][0]
    assert {x.dtype for x in jax.tree.leaves(adam_half.mu)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(adam_half.nu)} == {jnp.dtype(jnp.float32)}  # see make_optimizer
    assert {x.dtype for x in jax.tree.leaves(adam_full.mu)} == {jnp.dtype(jnp.float32)}
    np.testing.assert_allclose(u_half["w"], u_full["w"], rtol=1e-2)  # the same updates, to bf16 precision
    with pytest.raises(ValueError, match="optim.moment_dtype='float16'; allowed: float32, bfloat16"):
        make_optimizer(learning_rate=1e-2, total_steps=4, moment_dtype="float16")
