"""HaF losses: Bradley-Terry reward loss, policy (DPO-family) losses and the three objectives.

Every array carries an explicit pair axis: ``[..., 0]`` is the chosen response, ``[..., 1]`` the
rejected one (``reward_Bx2``, ``logp_Bx2``, ...). All arithmetic is float32 whatever the input
dtype. Functions are pure and jit-friendly; string/float options are static Python values.

Objectives (PAPER.md section 3):
  haf      = L_R + alpha * L_P
  baseline = L_R            (no LM head: ``logp_Bx2`` / ``ref_logp_Bx2`` may be absent)
  dpo      = L_P            (no reward head: ``reward_Bx2`` may be absent; the model is judged by
                             its implicit reward beta * (logp - ref_logp))
             = alpha * L_P  with ``dpo_scale_by_alpha=True``: the paper authors' DPO-only runs keep
                             the 0.2 factor (with Adam this acts only through eps and the
                             gradient-norm clip, which see 5x smaller gradients)
"""

from __future__ import annotations

from typing import Any, Mapping

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


def _get(out, key: str):
    """A field of model outputs: a heads.PairOutputs or a Mapping with the same keys."""
    value = out.get(key) if isinstance(out, Mapping) else getattr(out, key, None)
    return None if value is None else _f32(value)


def _policy_reward_Bx2(out: Mapping[str, Any], beta: float, policy_kind: str):
    """The reward the policy head implies: SimPO's length-normalised one for 'simpo' when token
    counts are given, else the DPO implicit reward; None when the LM head was not computed."""
    logp_Bx2 = _get(out, "logp_Bx2")
    if logp_Bx2 is None:
        return None
    n_tokens_Bx2 = _get(out, "n_tokens_Bx2")
    if policy_kind == "simpo" and n_tokens_Bx2 is not None:
        return _simpo_reward(logp_Bx2, n_tokens_Bx2, beta)
    ref_logp_Bx2 = _get(out, "ref_logp_Bx2")
    if ref_logp_Bx2 is None:
        return None
    return implicit_reward(logp_Bx2, ref_logp_Bx2, beta)


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
    reward_Bx2 = _get(out, "reward_Bx2")
    implicit_Bx2 = _policy_reward_Bx2(out, beta, policy_kind)
    some = reward_Bx2 if reward_Bx2 is not None else implicit_Bx2
    if some is None:
        raise ValueError("pair_metrics needs 'reward_Bx2' or 'logp_Bx2' (+ 'ref_logp_Bx2') in out")
    zeros_B = jnp.zeros(some.shape[:-1], jnp.float32)

    def _margin(x_Bx2):
        return zeros_B if x_Bx2 is None else x_Bx2[..., 0] - x_Bx2[..., 1]

    margin_B = _margin(reward_Bx2)
    implicit_margin_B = _margin(implicit_Bx2)
    return {
        "correct_reward_B": zeros_B if reward_Bx2 is None else (margin_B > 0).astype(jnp.float32),
        "correct_dpo_B": zeros_B if implicit_Bx2 is None else (implicit_margin_B > 0).astype(jnp.float32),
        "margin_B": margin_B,
        "implicit_margin_B": implicit_margin_B,
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
    reward_Bx2 = _get(out, "reward_Bx2")
    logp_Bx2 = _get(out, "logp_Bx2")
    ref_logp_Bx2 = _get(out, "ref_logp_Bx2")
    n_tokens_Bx2 = _get(out, "n_tokens_Bx2")

    need_reward = objective in ("haf", "baseline")
    need_policy = objective in ("haf", "dpo")
    if need_reward and reward_Bx2 is None:
        raise ValueError(f"objective {objective!r} needs out['reward_Bx2']")
    if need_policy and (logp_Bx2 is None or (ref_logp_Bx2 is None and policy_kind != "simpo")):
        raise ValueError(f"objective {objective!r} needs out['logp_Bx2'] and out['ref_logp_Bx2']")
    if need_policy and policy_kind == "simpo" and n_tokens_Bx2 is None:
        raise ValueError("policy kind 'simpo' needs out['n_tokens_Bx2']")
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
    metrics = {k: zero for k in METRIC_KEYS}
    metrics["num_pairs"] = num_pairs

    loss = zero
    if reward_Bx2 is not None:
        reward_loss = mean(bradley_terry(reward_Bx2, margin_B=margin or None, centering=centering))
        metrics.update(
            reward_loss=reward_loss,
            reward_accuracy=mean(pm["correct_reward_B"]),
            reward_margin=mean(pm["margin_B"]),
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
            dpo_accuracy=mean(pm["correct_dpo_B"]),
            implicit_margin=mean(pm["implicit_margin_B"]),
        )
        if need_policy:
            scaled = objective == "haf" or dpo_scale_by_alpha
            loss = loss + (alpha * p_loss if scaled else p_loss)
    metrics["loss"] = loss
    return loss, metrics
