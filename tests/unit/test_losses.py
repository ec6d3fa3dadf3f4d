"""haf_jax.core.losses against an independent float64 NumPy implementation."""

import itertools
import math
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.core import losses

B = 16
TOL = dict(rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- NumPy reference
def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def np_reward_loss(r, margin, centering):
    rw, rl = r[:, 0], r[:, 1]
    return -np_log_sigmoid(rw - rl - margin) + centering * (rw + rl) ** 2


def np_policy_loss(lp, ref, kind, beta, ls, n, gamma):
    lw, ll = lp[:, 0], lp[:, 1]
    if kind == "simpo":
        s = beta * (lw / n[:, 0] - ll / n[:, 1]) - gamma
        return -(1 - ls) * np_log_sigmoid(s) - ls * np_log_sigmoid(-s)
    h = (lw - ref[:, 0]) - (ll - ref[:, 1])
    if kind == "sigmoid":
        return -(1 - ls) * np_log_sigmoid(beta * h) - ls * np_log_sigmoid(-beta * h)
    if kind == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    if kind == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    raise AssertionError(kind)


def np_objective(inp, objective, kind, alpha, beta, margin, centering, ls, gamma, w):
    def mean(x):
        return float(np.sum(w * x) / max(np.sum(w), 1.0))

    r, lp, ref, n = inp["reward"], inp["logp"], inp["ref_logp"], inp["n_tokens"]
    m = dict.fromkeys(losses.METRIC_KEYS, 0.0)
    m["num_pairs"] = float(np.sum(w))
    loss = 0.0
    if objective in ("haf", "baseline"):
        m["reward_loss"] = mean(np_reward_loss(r, margin, centering))
        m["reward_accuracy"] = mean((r[:, 0] > r[:, 1]).astype(float))
        m["reward_margin"] = mean(r[:, 0] - r[:, 1])
        m["reward_chosen"], m["reward_rejected"] = mean(r[:, 0]), mean(r[:, 1])
        loss += m["reward_loss"]
    if objective in ("haf", "dpo"):
        m["policy_loss"] = mean(np_policy_loss(lp, ref, kind, beta, ls, n, gamma))
        imp = beta * lp / n if kind == "simpo" else beta * (lp - ref)
        m["dpo_accuracy"] = mean((imp[:, 0] > imp[:, 1]).astype(float))
        m["implicit_margin"] = mean(imp[:, 0] - imp[:, 1])
        m["logp_chosen"], m["logp_rejected"] = mean(lp[:, 0]), mean(lp[:, 1])
        loss += alpha * m["policy_loss"] if objective == "haf" else m["policy_loss"]
    m["loss"] = loss
    return loss, m


# ----------------------------------------------------------------------------- helpers
def make_inputs(seed, objective):
    rng = np.random.default_rng(seed)
    r = rng.normal(0.0, 2.0, (B, 2))
    lp = -rng.uniform(5.0, 80.0, (B, 2))
    ref = lp + rng.normal(0.0, 3.0, (B, 2))
    n = rng.integers(1, 40, (B, 2)).astype(np.float64)
    full = {"reward": r, "logp": lp, "ref_logp": ref, "n_tokens": n}
    out = {k: jnp.asarray(v, jnp.float32) for k, v in full.items()}
    if objective == "dpo":
        out["reward"] = None
    if objective == "baseline":
        out["logp"] = out["ref_logp"] = out["n_tokens"] = None
    # the float32 values are what both implementations see
    full = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in full.items()}
    return out, full


WEIGHTS = {
    "none": None,
    "zeros": np.array([1, 0, 1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1, 0, 1, 1], np.float32),
}

# label smoothing is undefined for hinge/ipo (it raises; tested below); baseline ignores every
# policy option, so it runs once per (margin, centering, weights).
CASES = [
    c
    for c in itertools.product(
        losses.OBJECTIVES,
        losses.POLICY_KINDS,
        [(0.0, 0.0), (0.7, 0.01)],  # (BT margin, reward centring)
        [0.0, 0.1],  # label smoothing
        list(WEIGHTS),
    )
    if not (c[3] and c[1] in ("hinge", "ipo")) and not (c[0] == "baseline" and (c[1] != "sigmoid" or c[3]))
]


@pytest.mark.parametrize("objective,kind,reward_opts,ls,weights", CASES)
def test_objective_matches_numpy(objective, kind, reward_opts, ls, weights):
    margin, centering = reward_opts
    seed = zlib.crc32(repr((objective, kind, margin, centering, ls, weights)).encode())
    out, full = make_inputs(seed, objective)
    w = WEIGHTS[weights]
    kw = dict(
        alpha=0.3,
        beta=0.1 if kind != "simpo" else 2.0,
        margin=margin,
        centering=centering,
        label_smoothing=ls,
        simpo_gamma=0.5,
    )
    loss, metrics = losses.objective(
        out, objective=objective, policy_kind=kind, weight_B=None if w is None else jnp.asarray(w), **kw
    )
    np_w = np.ones(B) if w is None else w.astype(np.float64)
    ref_loss, ref_metrics = np_objective(
        full, objective, kind, kw["alpha"], kw["beta"], margin, centering, ls, 0.5, np_w
    )
    assert loss.dtype == jnp.float32 and loss.shape == ()
    np.testing.assert_allclose(float(loss), ref_loss, **TOL)
    assert set(metrics) == set(losses.METRIC_KEYS)
    for k in losses.METRIC_KEYS:
        assert metrics[k].dtype == jnp.float32 and metrics[k].shape == (), k
        np.testing.assert_allclose(float(metrics[k]), ref_metrics[k], err_msg=k, **TOL)


@pytest.mark.parametrize("kind", losses.POLICY_KINDS)
def test_policy_loss_per_pair(kind):
    _, full = make_inputs(3, "haf")
    ls = 0.2 if kind in ("sigmoid", "simpo") else 0.0
    got = losses.policy_loss(
        full["logp"],
        full["ref_logp"],
        kind=kind,
        beta=0.3,
        label_smoothing=ls,
        n_tokens_Bx2=full["n_tokens"],
        simpo_gamma=0.4,
    )
    want = np_policy_loss(full["logp"], full["ref_logp"], kind, 0.3, ls, full["n_tokens"], 0.4)
    assert got.shape == (B,) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_bradley_terry_per_pair_margin_and_bf16_input():
    _, full = make_inputs(4, "haf")
    m = np.linspace(-1, 1, B)
    got = losses.bradley_terry(jnp.asarray(full["reward"], jnp.bfloat16), margin_B=m, centering=0.05)
    r16 = np.asarray(jnp.asarray(full["reward"], jnp.bfloat16).astype(jnp.float32), np.float64)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np_reward_loss(r16, m, 0.05), **TOL)


def test_extreme_values_are_finite():
    r = jnp.array([[1e4, -1e4], [-1e4, 1e4]], jnp.float32)
    bt = losses.bradley_terry(r)
    assert np.all(np.isfinite(bt)) and float(bt[0]) == 0.0
    np.testing.assert_allclose(float(bt[1]), 2e4, rtol=1e-6)


def test_step_one_property():
    """Zero reward head and policy == reference: both losses are ln 2, accuracies 0 (strict)."""
    lp = -jnp.abs(jax.random.normal(jax.random.key(0), (8, 2))) * 30
    out = {"reward": jnp.zeros((8, 2)), "logp": lp, "ref_logp": lp}
    loss, m = losses.objective(out, objective="haf", alpha=0.2)
    np.testing.assert_allclose(float(m["reward_loss"]), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(m["policy_loss"]), math.log(2), rtol=1e-6)
    np.testing.assert_allclose(float(loss), 1.2 * math.log(2), rtol=1e-6)
    assert float(m["reward_accuracy"]) == 0.0 and float(m["dpo_accuracy"]) == 0.0
    # also for the single-part objectives
    _, mb = losses.objective({"reward": jnp.zeros((8, 2))}, objective="baseline")
    np.testing.assert_allclose(float(mb["reward_loss"]), math.log(2), rtol=1e-6)
    assert float(mb["policy_loss"]) == 0.0 and float(mb["dpo_accuracy"]) == 0.0
    _, md = losses.objective({"logp": lp, "ref_logp": lp}, objective="dpo")
    np.testing.assert_allclose(float(md["policy_loss"]), math.log(2), rtol=1e-6)
    assert float(md["reward_loss"]) == 0.0 and float(md["reward_accuracy"]) == 0.0


def test_accuracy_is_strict():
    r = jnp.array([[1.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 5.0]])
    lp = jnp.array([[-3.0, -3.0], [-1.0, -2.0], [-1.0, -2.0], [-4.0, -1.0]])
    out = {"reward": r, "logp": lp, "ref_logp": jnp.zeros((4, 2))}
    _, m = losses.objective(out)
    assert float(m["reward_accuracy"]) == 0.25
    assert float(m["dpo_accuracy"]) == 0.5
    pm = losses.pair_metrics(out, 0.1)
    np.testing.assert_array_equal(np.asarray(pm["correct_reward"]), [0, 1, 0, 0])
    np.testing.assert_array_equal(np.asarray(pm["correct_dpo"]), [0, 1, 1, 0])
    np.testing.assert_allclose(np.asarray(pm["margin"]), [0, 1, -3, 0])
    np.testing.assert_allclose(np.asarray(pm["implicit_margin"]), [0, 0.1, 0.1, -0.3], rtol=1e-6)


def test_pair_metrics_sum_to_batch_metrics():
    out, _ = make_inputs(7, "haf")
    w = jnp.asarray(WEIGHTS["zeros"])
    _, m = losses.objective(out, weight_B=w)
    pm = losses.pair_metrics(out, 0.1)
    n = float(jnp.sum(w))
    np.testing.assert_allclose(float(jnp.sum(w * pm["correct_reward"])) / n, float(m["reward_accuracy"]), **TOL)
    np.testing.assert_allclose(float(jnp.sum(w * pm["correct_dpo"])) / n, float(m["dpo_accuracy"]), **TOL)
    np.testing.assert_allclose(float(jnp.sum(w * pm["margin"])) / n, float(m["reward_margin"]), **TOL)
    # without a part, its per-pair metrics are zeros
    pm_b = losses.pair_metrics({"reward": out["reward"]}, 0.1)
    assert float(jnp.sum(pm_b["correct_dpo"])) == 0.0


def test_all_filler_batch_is_zero_not_nan():
    out, _ = make_inputs(8, "haf")
    loss, m = losses.objective(out, weight_B=jnp.zeros(B))
    assert float(loss) == 0.0 and all(np.isfinite(float(v)) for v in m.values())


@pytest.mark.parametrize(
    "objective,kind",
    [("haf", k) for k in losses.POLICY_KINDS] + [("baseline", "sigmoid"), ("dpo", "sigmoid")],
)
def test_gradients_finite(objective, kind):
    out, _ = make_inputs(9, objective)

    def fn(o):
        return losses.objective(o, objective=objective, policy_kind=kind, weight_B=jnp.asarray(WEIGHTS["zeros"]))[0]

    grads = jax.grad(fn)(out)
    for k, g in grads.items():
        if out[k] is not None:
            assert np.all(np.isfinite(np.asarray(g))), k
    if out["reward"] is not None:
        g = np.asarray(grads["reward"])
        # filler pairs get no gradient; the chosen reward is pushed up, the rejected one down
        assert np.all(g[WEIGHTS["zeros"] == 0] == 0)
        real = WEIGHTS["zeros"] == 1
        assert np.all(g[real, 0] < 0) and np.all(g[real, 1] > 0)
    if out["logp"] is not None and kind != "hinge":  # hinge has zero gradient past the margin
        assert np.any(np.asarray(grads["logp"]) != 0)


def test_unknown_names_and_missing_parts_raise():
    out, _ = make_inputs(10, "haf")
    with pytest.raises(ValueError, match="haf, baseline, dpo"):
        losses.objective(out, objective="orpo")
    with pytest.raises(ValueError, match="sigmoid, hinge, ipo, simpo"):
        losses.objective(out, policy_kind="kto")
    with pytest.raises(ValueError, match="reward"):
        losses.objective({"logp": out["logp"], "ref_logp": out["ref_logp"]})
    with pytest.raises(ValueError, match="logp"):
        losses.objective({"reward": out["reward"]}, objective="dpo")
    with pytest.raises(ValueError, match="n_tokens"):
        losses.policy_loss(out["logp"], None, kind="simpo")
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.policy_loss(out["logp"], out["ref_logp"], kind="ipo", label_smoothing=0.1)
