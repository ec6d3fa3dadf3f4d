"""Calibration maths (losses.calibration / pearson / evaluation_summary) against NumPy written
here independently, and against analytic values."""

import math

import numpy as np
import pytest

from haf_jax.core import losses


def numpy_calibration(margin, outcome, n_bins=15):
    """Top-label ECE, Brier and log loss of p = sigmoid(margin), straight from the definitions."""
    margin, outcome = np.asarray(margin, np.float64), np.asarray(outcome, np.float64)
    p = 1.0 / (1.0 + np.exp(-margin))
    predicted = (margin > 0).astype(np.float64)  # p = 0.5 predicts "second preferred"
    confidence = np.where(predicted == 1, p, 1 - p)
    correct = (predicted == outcome).astype(np.float64)
    ece = 0.0
    for k in range(n_bins):
        lo, hi = k / n_bins, (k + 1) / n_bins
        in_bin = (confidence >= lo) & ((confidence < hi) if k < n_bins - 1 else (confidence <= hi))
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    brier = np.mean((p - outcome) ** 2)
    log_loss = -np.mean(outcome * np.log(p) + (1 - outcome) * np.log(1 - p))
    return ece, brier, log_loss


def test_ece_brier_log_loss_equal_numpy_on_fixed_inputs():
    rng = np.random.default_rng(0)
    margin = np.concatenate([rng.normal(0.0, 2.0, 997), [0.0, 30.0, -30.0]]).astype(np.float32)
    outcome = (rng.random(1000) < 0.7).astype(np.float32)
    got = losses.calibration(margin, outcome_N=outcome)
    ece, brier, log_loss = numpy_calibration(margin, outcome)
    assert float(got["ece"]) == pytest.approx(ece, abs=1e-5)
    assert float(got["brier"]) == pytest.approx(brier, abs=1e-5)
    assert float(got["log_loss"]) == pytest.approx(log_loss, rel=1e-5)
    assert int(np.asarray(got["bin_count"]).sum()) == 1000 and np.asarray(got["bin_count"])[:7].sum() == 0
    # Preference data (all outcomes 1) is the default.
    default, ones = losses.calibration(margin), losses.calibration(margin, outcome_N=np.ones(1000))
    assert float(default["ece"]) == float(ones["ece"]) and float(default["log_loss"]) == float(ones["log_loss"])


def test_perfectly_calibrated_probabilities_give_ece_near_zero():
    rng = np.random.default_rng(1)
    margin = rng.normal(0.0, 3.0, 200_000)
    outcome = rng.random(margin.size) < 1.0 / (1.0 + np.exp(-margin))  # drawn from the model itself
    assert float(losses.calibration(margin, outcome_N=outcome)["ece"]) < 0.006


def test_miscalibrated_case_gives_the_analytic_ece_brier_and_log_loss():
    # Half the pairs at p = 0.9 (right 50% of the time), half at p = 0.7 (always right): ECE =
    # 0.5 * |0.5 - 0.9| + 0.5 * |1.0 - 0.7| = 0.35.
    m9, m7 = math.log(0.9 / 0.1), math.log(0.7 / 0.3)
    margin = np.array([m9] * 4 + [m7] * 4, np.float32)
    outcome = np.array([1, 0, 1, 0, 1, 1, 1, 1], np.float32)
    got = losses.calibration(margin, outcome_N=outcome)
    assert float(got["ece"]) == pytest.approx(0.35, abs=1e-6)
    assert float(got["brier"]) == pytest.approx((2 * 0.1**2 + 2 * 0.9**2 + 4 * 0.3**2) / 8, abs=1e-6)
    assert float(got["log_loss"]) == pytest.approx(
        -(2 * math.log(0.9) + 2 * math.log(0.1) + 4 * math.log(0.7)) / 8, rel=1e-6
    )
    # An untrained reward head (all margins 0): p = 0.5 everywhere, every pair wrong (ties are wrong).
    zero = losses.calibration(np.zeros(10))
    assert float(zero["ece"]) == pytest.approx(0.5) and float(zero["brier"]) == pytest.approx(0.25)
    assert float(zero["log_loss"]) == pytest.approx(math.log(2), rel=1e-6)


def test_pearson_and_summary_match_numpy():
    rng = np.random.default_rng(2)
    reward = rng.normal(size=(50, 2)).astype(np.float32)
    n_tokens = rng.integers(1, 100, size=(50, 2)).astype(np.float32)
    logp, ref = rng.normal(-50, 5, size=(50, 2)), rng.normal(-50, 5, size=(50, 2))
    s = losses.evaluation_summary({"reward": reward, "n_tokens": n_tokens, "logp": logp, "ref_logp": ref}, beta=0.1)
    margin = reward[:, 0] - reward[:, 1]
    implicit = 0.1 * ((logp[:, 0] - ref[:, 0]) - (logp[:, 1] - ref[:, 1]))
    assert s["pairs"] == 50 and s["reward_accuracy"] == pytest.approx(np.mean(margin > 0))
    assert s["reward_margin"] == pytest.approx(margin.mean(), abs=1e-6)
    assert s["dpo_accuracy"] == pytest.approx(np.mean(implicit > 0))
    assert s["ece"] == pytest.approx(numpy_calibration(margin, np.ones(50))[0], abs=1e-5)
    assert s["dpo_log_loss"] == pytest.approx(numpy_calibration(implicit, np.ones(50))[2], rel=1e-4)
    assert s["reward_length_corr"] == pytest.approx(np.corrcoef(reward.ravel(), n_tokens.ravel())[0, 1], abs=1e-5)
    assert math.isnan(float(losses.pearson(np.ones(5), np.arange(5.0))))
