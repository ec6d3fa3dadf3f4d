"""HaF losses: Bradley-Terry reward loss, policy (DPO-family) losses and the three objectives.

Every array carries an explicit pair axis: ``[..., 0]`` is the chosen response, ``[..., 1]`` the
rejected one (``reward_Bx2``, ``logp_Bx2``, ...). All arithmetic is float32 whatever the input
dtype. Functions are pure and jit-friendly; string/float options are static Python values.

Objectives (Liu et al., HAF-RM, ACL 2025, the hybrid loss; README.md):
  haf      = L_R + alpha * L_P
  baseline = L_R            (no LM head: ``logp_Bx2`` / ``ref_logp_Bx2`` may be absent)
  dpo      = L_P            (no reward head: ``reward_Bx2`` may be absent; the model is judged by
                             its implicit reward beta * (logp - ref_logp))
             = alpha * L_P  with ``dpo_scale_by_alpha=True``: the paper authors' DPO-only runs keep
                             the 0.2 factor (with Adam this acts only through eps and the
                             gradient-norm clip, which see 5x smaller gradients)
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

OBJECTIVES = ("haf", "baseline", "dpo")
POLICY_KINDS = ("sigmoid", "hinge", "ipo", "simpo")

# Keys of the metrics dict returned by `objective`; always all present (0.0 for parts that were
# not computed) so that metrics.jsonl rows have one fixed schema.
METRIC_KEYS = (
    "loss",
    "reward_loss",
    "policy_loss",
    "reward_accuracy",
    "dpo_accuracy",
    "reward_margin",
    "reward_chosen",
    "reward_rejected",
    "logp_chosen",
    "logp_rejected",
    "implicit_margin",
    "num_pairs",
)


def _f32(x):
    return jnp.asarray(x, jnp.float32)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def bradley_terry(reward_Bx2, *, margin_B=None, centering: float = 0.0):
    """Per-pair Bradley-Terry loss ``-log sigmoid(r_w - r_l - margin) + c * (r_w + r_l)^2``.

    Args:
      reward_Bx2: rewards, [..., 0] chosen, [..., 1] rejected.
      margin_B: optional margin (scalar or [B]) the chosen reward must exceed the rejected one by.
      centering: TRL's reward-centring coefficient (``center_rewards_coefficient``); pushes the
        rewards of a pair towards summing to zero. 0 disables it.
    Returns:
      loss_B, float32.
    """
    reward_Bx2 = _f32(reward_Bx2)
    diff_B = reward_Bx2[..., 0] - reward_Bx2[..., 1]
    if margin_B is not None:
        diff_B = diff_B - _f32(margin_B)
    loss_B = -jax.nn.log_sigmoid(diff_B)
    if centering:
        loss_B = loss_B + centering * jnp.square(reward_Bx2[..., 0] + reward_Bx2[..., 1])
    return loss_B


def implicit_reward(logp_Bx2, ref_logp_Bx2, beta: float):
    """DPO implicit reward ``beta * (logp - ref_logp)``, shape [B, 2], float32."""
    return beta * (_f32(logp_Bx2) - _f32(ref_logp_Bx2))


def _simpo_reward(logp_Bx2, n_tokens_Bx2, beta: float):
    """SimPO's reference-free reward ``beta * logp / n_tokens`` (n clamped to >= 1)."""
    return beta * _f32(logp_Bx2) / jnp.maximum(_f32(n_tokens_Bx2), 1.0)


def policy_loss(
    logp_Bx2,
    ref_logp_Bx2,
    *,
    kind: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    n_tokens_Bx2=None,
    simpo_gamma: float = 0.5,
):
    """Per-pair policy loss on summed response log-probs.

    With ``delta = beta * ((lw - lw_ref) - (ll - ll_ref))``:
      sigmoid: ``-(1 - ls) * log sigmoid(delta) - ls * log sigmoid(-delta)``   (DPO; cDPO smoothing)
      hinge:   ``relu(1 - delta)``
      ipo:     ``((lw - lw_ref) - (ll - ll_ref) - 1 / (2 beta))^2``
      simpo:   ``-(1 - ls) * log sigmoid(s) - ls * log sigmoid(-s)`` with
               ``s = beta * (lw / nw - ll / nl) - simpo_gamma``; reference-free (``ref_logp_Bx2``
               is ignored and may be None), ``n_tokens_Bx2`` (response token counts) required.
    Label smoothing only exists for sigmoid and simpo; passing it with hinge/ipo raises.

    Returns:
      loss_B, float32.
    """
    _check("policy kind", kind, POLICY_KINDS)
    if label_smoothing and kind in ("hinge", "ipo"):
        raise ValueError(f"label_smoothing is not defined for policy kind {kind!r}")
    logp_Bx2 = _f32(logp_Bx2)

    if kind == "simpo":
        if n_tokens_Bx2 is None:
            raise ValueError("policy kind 'simpo' needs n_tokens_Bx2 (response token counts)")
        r_Bx2 = _simpo_reward(logp_Bx2, n_tokens_Bx2, beta)
        s_B = r_Bx2[..., 0] - r_Bx2[..., 1] - simpo_gamma
        return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(s_B) - label_smoothing * jax.nn.log_sigmoid(-s_B)

    if ref_logp_Bx2 is None:
        raise ValueError(f"policy kind {kind!r} needs ref_logp_Bx2")
    d_Bx2 = logp_Bx2 - _f32(ref_logp_Bx2)
    logratio_B = d_Bx2[..., 0] - d_Bx2[..., 1]
    if kind == "ipo":
        return jnp.square(logratio_B - 1.0 / (2.0 * beta))
    delta_B = beta * logratio_B
    if kind == "hinge":
        return jax.nn.relu(1.0 - delta_B)
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(delta_B) - label_smoothing * jax.nn.log_sigmoid(-delta_B)


def _get(scores: Mapping[str, Any], key: str):
    """One per-pair score array as float32, or None when absent."""
    value = scores.get(key)
    return None if value is None else _f32(value)


def _policy_reward_Bx2(out: Mapping[str, Any], beta: float, policy_kind: str):
    """The reward the policy head implies: SimPO's length-normalised one for 'simpo' when token
    counts are given, else the DPO implicit reward; None when the LM head was not computed."""
    logp_Bx2 = _get(out, "logp")
    if logp_Bx2 is None:
        return None
    n_tokens_Bx2 = _get(out, "n_tokens")
    if policy_kind == "simpo" and n_tokens_Bx2 is not None:
        return _simpo_reward(logp_Bx2, n_tokens_Bx2, beta)
    ref_logp_Bx2 = _get(out, "ref_logp")
    if ref_logp_Bx2 is None:
        return None
    return implicit_reward(logp_Bx2, ref_logp_Bx2, beta)


def policy_reward(out: Mapping[str, Any], beta: float = 0.1, *, policy_kind: str = "sigmoid"):
    """The per-response reward [B, 2] the policy head implies (DPO implicit reward, or SimPO's for
    'simpo'); None when `out` lacks what it needs."""
    return _policy_reward_Bx2(out, beta, policy_kind)


def pair_metrics(out: Mapping[str, Any], beta: float = 0.1, *, policy_kind: str = "sigmoid"):
    """Per-pair quantities an eval loop sums over a whole split (then divides by the pair count).

    Returns a dict of float32 [B] arrays:
      correct_reward_B:   1.0 where r_w > r_l strictly (ties are wrong); zeros without a reward.
      correct_dpo_B:      same for the implicit reward beta * (logp - ref_logp) (for 'simpo':
                          beta * logp / n_tokens); zeros without log-probs.
      margin_B:           r_w - r_l (zeros without a reward).
      implicit_margin_B:  implicit reward margin (zeros without log-probs).
    Filler pairs are not masked here: multiply by the pair weights before summing.
    """
    _check("policy kind", policy_kind, POLICY_KINDS)
    reward_Bx2 = _get(out, "reward")
    implicit_Bx2 = _policy_reward_Bx2(out, beta, policy_kind)
    some = reward_Bx2 if reward_Bx2 is not None else implicit_Bx2
    if some is None:
        raise ValueError("pair_metrics needs 'reward' or 'logp' (+ 'ref_logp') in out")
    zeros_B = jnp.zeros(some.shape[:-1], jnp.float32)

    def _margin(x_Bx2):
        return zeros_B if x_Bx2 is None else x_Bx2[..., 0] - x_Bx2[..., 1]

    margin_B = _margin(reward_Bx2)
    implicit_margin_B = _margin(implicit_Bx2)
    return {
        "correct_reward": zeros_B if reward_Bx2 is None else (margin_B > 0).astype(jnp.float32),
        "correct_dpo": zeros_B if implicit_Bx2 is None else (implicit_margin_B > 0).astype(jnp.float32),
        "margin": margin_B,
        "implicit_margin": implicit_margin_B,
    }


def objective(
    out: Mapping[str, Any],
    *,
    objective: str = "haf",
    alpha: float = 0.2,
    beta: float = 0.1,
    policy_kind: str = "sigmoid",
    margin: float = 0.0,
    centering: float = 0.0,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    weight_B=None,
    dpo_scale_by_alpha: bool = False,
):
    """Scalar training loss and batch metrics for one of the objectives 'haf', 'baseline', 'dpo'.

    Args:
      out: model outputs: ``reward_Bx2`` (needed by haf/baseline), ``logp_Bx2`` and
        ``ref_logp_Bx2`` (needed by haf/dpo; ref not needed for 'simpo'), optional
        ``n_tokens_Bx2`` (needed for 'simpo'). Parts present but not used by the objective still
        feed the metrics (e.g. dpo_accuracy under 'baseline' if log-probs are supplied).
      weight_B: float pair weights (1 = real pair, 0 = filler); default all ones. Every mean is
        ``sum(w * x) / max(sum(w), 1)``.
      dpo_scale_by_alpha: objective 'dpo' only: the loss is ``alpha * L_P`` instead of ``L_P``
        (the authors' DPO-only runs); ignored by 'haf' (always ``L_R + alpha * L_P``) and 'baseline'.
    Returns:
      (loss, metrics): loss is a float32 scalar; metrics maps every name in METRIC_KEYS to a float32
      scalar weighted mean (0.0 for a part that is not computed); ``num_pairs`` is ``sum(w)``.
    """
    _check("objective", objective, OBJECTIVES)
    _check("policy kind", policy_kind, POLICY_KINDS)
    reward_Bx2 = _get(out, "reward")
    logp_Bx2 = _get(out, "logp")
    ref_logp_Bx2 = _get(out, "ref_logp")
    n_tokens_Bx2 = _get(out, "n_tokens")

    need_reward = objective in ("haf", "baseline")
    need_policy = objective in ("haf", "dpo")
    if need_reward and reward_Bx2 is None:
        raise ValueError(f"objective {objective!r} needs out['reward']")
    if need_policy and (logp_Bx2 is None or (ref_logp_Bx2 is None and policy_kind != "simpo")):
        raise ValueError(f"objective {objective!r} needs out['logp'] and out['ref_logp']")
    if need_policy and policy_kind == "simpo" and n_tokens_Bx2 is None:
        raise ValueError("policy kind 'simpo' needs out['n_tokens']")
    have_policy = logp_Bx2 is not None and (
        (ref_logp_Bx2 is not None) if policy_kind != "simpo" else (n_tokens_Bx2 is not None)
    )

    some = reward_Bx2 if reward_Bx2 is not None else logp_Bx2
    w_B = jnp.ones(some.shape[:-1], jnp.float32) if weight_B is None else _f32(weight_B)
    num_pairs = jnp.sum(w_B)
    denom = jnp.maximum(num_pairs, 1.0)

    def mean(x_B):
        return jnp.sum(w_B * x_B) / denom

    zero = jnp.zeros((), jnp.float32)
    pm = pair_metrics(out, beta, policy_kind=policy_kind)
    metrics = dict.fromkeys(METRIC_KEYS, zero)
    metrics["num_pairs"] = num_pairs

    loss = zero
    if reward_Bx2 is not None:
        reward_loss = mean(bradley_terry(reward_Bx2, margin_B=margin or None, centering=centering))
        metrics.update(
            reward_loss=reward_loss,
            reward_accuracy=mean(pm["correct_reward"]),
            reward_margin=mean(pm["margin"]),
            reward_chosen=mean(reward_Bx2[..., 0]),
            reward_rejected=mean(reward_Bx2[..., 1]),
        )
        if need_reward:
            loss = loss + reward_loss
    if logp_Bx2 is not None:
        metrics.update(logp_chosen=mean(logp_Bx2[..., 0]), logp_rejected=mean(logp_Bx2[..., 1]))
    if have_policy:
        p_loss = mean(
            policy_loss(
                logp_Bx2,
                ref_logp_Bx2,
                kind=policy_kind,
                beta=beta,
                label_smoothing=label_smoothing,
                n_tokens_Bx2=n_tokens_Bx2,
                simpo_gamma=simpo_gamma,
            )
        )
        metrics.update(
            policy_loss=p_loss,
            dpo_accuracy=mean(pm["correct_dpo"]),
            implicit_margin=mean(pm["implicit_margin"]),
        )
        if need_policy:
            scaled = objective == "haf" or dpo_scale_by_alpha
            loss = loss + (alpha * p_loss if scaled else p_loss)
    metrics["loss"] = loss
    return loss, metrics


# ----------------------------------------------------------------------------- evaluation maths
# Whole-split statistics of per-pair scores (haf_jax.evaluation.evaluator gathers the arrays; the training
# loop, `score` and `evaluate` all aggregate here). Each takes host or device arrays over N pairs.

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error (Guo et al. 2017)


def preference_probability(margin_N):
    """P(chosen preferred) = sigmoid(r_chosen - r_rejected), the Bradley-Terry model, float32 [N]."""
    return jax.nn.sigmoid(_f32(margin_N))


@functools.partial(jax.jit, static_argnames=("n_bins",))
def calibration(margin_N, *, outcome_N=None, n_bins: int = ECE_BINS):
    """Calibration of the Bradley-Terry probability p = sigmoid(margin) against outcomes.

    Args:
      margin_N: r_chosen - r_rejected per pair (the logit of p).
      outcome_N: 1 where the first response really is preferred, 0 where not; default all ones
        (preference data lists the preferred response first).
      n_bins: equal-width bins over the top-label confidence.
    Returns a dict of float32 arrays:
      ece:        sum over bins of (n_bin / N) * |accuracy_bin - confidence_bin|, where each pair
                  predicts "first preferred" when p > 0.5 (a tie p = 0.5 predicts the second, so it is
                  wrong on preference data, like the strict accuracy), with confidence max(p, 1 - p).
                  Confidence lies in [0.5, 1]: bins cover [0, 1] and the lower half stays empty,
                  as in the usual top-label ECE.
      brier:      mean (p - outcome)^2.
      log_loss:   mean -log P(outcome), from the margin (stable for any margin).
      bin_confidence, bin_accuracy, bin_count: [I] per bin (NaN where a bin is empty) for the
                  reliability diagram.
    """
    margin_N = _f32(margin_N)
    y_N = jnp.ones_like(margin_N) if outcome_N is None else _f32(outcome_N)
    p_N = jax.nn.sigmoid(margin_N)
    predicts_first_N = margin_N > 0
    confidence_N = jnp.where(predicts_first_N, p_N, 1.0 - p_N)
    correct_N = (predicts_first_N == (y_N > 0.5)).astype(jnp.float32)
    # Bin i holds confidence in [i / I, (i + 1) / I); confidence 1.0 goes to the last bin.
    bin_N = jnp.clip(jnp.floor(confidence_N * n_bins).astype(jnp.int32), 0, n_bins - 1)
    count_I = jnp.zeros(n_bins, jnp.float32).at[bin_N].add(1.0)
    conf_sum_I = jnp.zeros(n_bins, jnp.float32).at[bin_N].add(confidence_N)
    acc_sum_I = jnp.zeros(n_bins, jnp.float32).at[bin_N].add(correct_N)
    n = jnp.maximum(jnp.float32(margin_N.shape[0]), 1.0)
    ece = jnp.sum(jnp.abs(acc_sum_I - conf_sum_I)) / n  # = sum_i (n_i / N) |acc_i - conf_i|
    safe_I = jnp.maximum(count_I, 1.0)
    empty_I = count_I == 0
    log_p_outcome_N = y_N * jax.nn.log_sigmoid(margin_N) + (1.0 - y_N) * jax.nn.log_sigmoid(-margin_N)
    return {
        "ece": ece,
        "brier": jnp.sum(jnp.square(p_N - y_N)) / n,
        "log_loss": -jnp.sum(log_p_outcome_N) / n,
        "bin_confidence": jnp.where(empty_I, jnp.nan, conf_sum_I / safe_I),
        "bin_accuracy": jnp.where(empty_I, jnp.nan, acc_sum_I / safe_I),
        "bin_count": count_I,
    }


@jax.jit
def pearson(x_N, y_N):
    """Pearson correlation of two [N] arrays, float32; NaN when either is constant or N < 2."""
    x_N, y_N = _f32(x_N), _f32(y_N)
    dx_N, dy_N = x_N - jnp.mean(x_N), y_N - jnp.mean(y_N)
    denom = jnp.sqrt(jnp.sum(dx_N * dx_N) * jnp.sum(dy_N * dy_N))
    return jnp.where(denom > 0, jnp.sum(dx_N * dy_N) / jnp.where(denom > 0, denom, 1.0), jnp.nan)


def evaluation_summary(
    out: Mapping[str, Any], *, beta: float = 0.1, policy_kind: str = "sigmoid", n_bins: int = ECE_BINS
) -> dict:
    """Aggregates over a whole split of per-pair scores, as Python floats (one jitted computation).

    `out` holds [N, 2] arrays (pair axis: 0 chosen, 1 rejected): ``reward_Bx2`` and/or ``logp_Bx2``
    with ``ref_logp_Bx2`` (or ``n_tokens_Bx2`` for 'simpo'), and ``n_tokens_Bx2`` (response token
    counts) for the length correlation. Keys present depend on what `out` allows:
      pairs; with a reward: reward_accuracy, reward_margin (mean r_c - r_r), reward_chosen,
      reward_rejected, ece, brier, log_loss (of sigmoid(r_c - r_r)), reward_length_corr (Pearson of
      reward with response length over all 2N responses; NaN when either is constant); with a policy
      reward: dpo_accuracy, implicit_margin, and dpo_ece, dpo_brier, dpo_log_loss of
      sigmoid(implicit margin).
    """
    arrays = {k: _f32(v) for k in ("reward", "logp", "ref_logp", "n_tokens") if (v := _get(out, k)) is not None}
    some = next(iter(arrays.values()), None)
    n = 0 if some is None else int(some.shape[0])
    if n == 0:
        return {"pairs": n}
    values = _summary(arrays, beta=beta, policy_kind=policy_kind, n_bins=n_bins)
    return {"pairs": n, **{k: float(v) for k, v in jax.device_get(values).items()}}


@functools.partial(jax.jit, static_argnames=("beta", "policy_kind", "n_bins"))
def _summary(out: dict, *, beta: float, policy_kind: str, n_bins: int) -> dict:
    pm = pair_metrics(out, beta, policy_kind=policy_kind)
    result = {}
    reward_Bx2, n_tokens_Bx2 = out.get("reward"), out.get("n_tokens")
    if reward_Bx2 is not None:
        cal = calibration(pm["margin"], n_bins=n_bins)
        result.update(
            reward_accuracy=jnp.mean(pm["correct_reward"]),
            reward_margin=jnp.mean(pm["margin"]),
            reward_chosen=jnp.mean(reward_Bx2[:, 0]),
            reward_rejected=jnp.mean(reward_Bx2[:, 1]),
            ece=cal["ece"],
            brier=cal["brier"],
            log_loss=cal["log_loss"],
        )
        if n_tokens_Bx2 is not None:
            result["reward_length_corr"] = pearson(reward_Bx2.reshape(-1), n_tokens_Bx2.reshape(-1))
    if _policy_reward_Bx2(out, beta, policy_kind) is not None:
        cal = calibration(pm["implicit_margin"], n_bins=n_bins)
        result.update(
            dpo_accuracy=jnp.mean(pm["correct_dpo"]),
            implicit_margin=jnp.mean(pm["implicit_margin"]),
            dpo_ece=cal["ece"],
            dpo_brier=cal["brier"],
            dpo_log_loss=cal["log_loss"],
        )
    return result
