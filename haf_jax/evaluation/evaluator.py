"""The one evaluation path: per-pair scores of a model over a dataset, and their aggregates.

The training loop (eval every N steps), `haf_jax.score` and `haf_jax.evaluate` all call
`Evaluator`: one jitted forward pass per batch gives per-pair arrays, gathered in input order on
the host; every statistic over them (accuracies, margins, calibration, length correlation) is
`losses.evaluation_summary`. Nothing here knows about runs or files.

Per-pair scores, `Result.scores` (float32 [N, 2], pair axis 0 chosen / 1 rejected, N = len(dataset)):
  "reward"    reward-head scores (when the reward head is evaluated)
  "logp"      summed response log-probs under the LM head (when the policy head is evaluated)
  "ref_logp"  the reference's summed response log-probs (precomputed array, live reference
              params, or zeros for the reference-free implicit reward)
  "n_tokens"  response token counts (always)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from haf_jax.core import distributed, forward, losses, params as params_lib, sharding
from haf_jax.data.batching import subset_batches
from haf_jax.model.heads import forward_pairs

BATCH_KEYS = ["tokens", "response_mask", "last_index"]


@dataclasses.dataclass
class Result:
    """What one evaluation pass gives: `scores` {name: float32 [N, 2]} and `summary` (floats)."""

    scores: dict[str, np.ndarray]
    summary: dict


def pair_scores(params, batch, ref_params, frozen, *, cfg: forward.StepConfig, reward: bool, policy: bool):
    """Per-pair scores of one batch: {"reward", "logp", "ref_logp" (live reference only), "n_tokens"},
    each float32 [B, 2]."""
    out = forward_pairs(
        forward.model_params(params, frozen, cfg),
        cfg.model,
        batch,
        reward=reward,
        policy=policy,
        chunk=cfg.logprob_chunk,
        compute_dtype=cfg.compute_dtype,
    )
    # Response tokens as the log-prob counts them: the first position is never a target.
    scores = {"n_tokens": jnp.sum(batch["response_mask"][..., 1:].astype(jnp.float32), axis=-1)}
    if reward:
        scores["reward"] = out.reward_Bx2
    if policy:
        scores["logp"] = out.logp_Bx2
        if ref_params is not None:
            scores["ref_logp"] = forward.reference_logprobs(ref_params, batch, cfg=cfg)
    return scores


class Evaluator:
    """Scores datasets with one jitted pass, compiled once per (settings, batch shape) and shared by
    every Evaluator with the same settings (the loop's evals, each checkpoint `evaluate` reads).

    Args:
      cfg: the model, loss (beta, policy kind: how the implicit reward is read), compute dtype,
        log-prob chunk and LoRA settings (with LoRA, `params` are the adapters + heads and
        `frozen` the base).
      mesh: device mesh; batches are split over (data, fsdp), parameters placed by their logical axes.
      reward, policy: which heads to evaluate (the loop follows the objective; score/evaluate use both).
      live_reference: reference log-probs come from `ref_params` inside the pass (same architecture).
    """

    def __init__(
        self, cfg: forward.StepConfig, mesh, *, reward: bool = True, policy: bool = True, live_reference: bool = False
    ):
        self.cfg, self.mesh, self.reward, self.policy = cfg, mesh, reward, policy
        self.live_reference = live_reference and policy
        self._fn = _jitted_pair_scores(cfg, mesh, reward, policy, self.live_reference)

    def __call__(
        self,
        params,
        dataset,
        *,
        batch_size: int,
        ref_logp_Nx2=None,
        ref_params=None,
        frozen=None,
        reference_free: bool = False,
        desc: str = "eval",
    ) -> Result:
        """Scores every pair of `dataset` (in its pair order) and aggregates.

        The implicit reward beta * (logp - ref_logp) needs a reference: `ref_logp_Nx2` (a
        precomputed float32 [N, 2] array indexed like `dataset`), `ref_params` (live, requires
        live_reference=True), or `reference_free=True` (ref_logp = 0: the policy's own log-prob
        ratio). With none of them (and policy kind other than simpo) no DPO accuracy is reported.
        """
        if (ref_params is not None) != self.live_reference:
            raise ValueError("ref_params must be given exactly when the Evaluator was built with live_reference=True")
        put = lambda b: forward.put_batch(b, BATCH_KEYS, self.mesh)
        n = len(dataset)
        if n:
            scores = pair_pass(
                dataset, lambda b: self._fn(params, b, ref_params, frozen), put, batch_size=batch_size, desc=desc
            )
        else:
            scores = {k: np.zeros((0, 2), np.float32) for k in self._names()}
        if self.policy and ref_params is None:
            if ref_logp_Nx2 is not None:
                ref_logp_Nx2 = np.asarray(ref_logp_Nx2, np.float32)
                if ref_logp_Nx2.shape != (n, 2):
                    raise ValueError(f"reference log-probs have shape {ref_logp_Nx2.shape}, the data {(n, 2)}")
                scores["ref_logp"] = ref_logp_Nx2
            elif reference_free:
                scores["ref_logp"] = np.zeros((n, 2), np.float32)
        result = Result(scores, {})
        lc = self.cfg.loss
        result.summary = losses.evaluation_summary(result.scores, beta=lc.beta, policy_kind=lc.policy)
        return result

    def _names(self):
        return ["n_tokens"] + (["reward"] if self.reward else []) + (["logp"] if self.policy else [])


@functools.lru_cache(maxsize=16)
def _jitted_pair_scores(cfg: forward.StepConfig, mesh, reward: bool, policy: bool, live_reference: bool):
    """pair_scores(params, batch, ref_params, frozen) jitted with explicit shardings (cached: one
    compilation per batch shape for all evaluations with these settings)."""
    full_sh = params_lib.param_shardings(cfg.model, mesh)
    trained_sh = params_lib.trainable_shardings(cfg.model, cfg.lora, mesh)
    fn = sharding.under_mesh(
        lambda p, b, ref, frozen: pair_scores(p, b, ref, frozen, cfg=cfg, reward=reward, policy=policy), mesh
    )
    return jax.jit(
        fn,
        in_shardings=(
            trained_sh,
            forward.batch_shardings(mesh, BATCH_KEYS),
            full_sh if live_reference else None,
            params_lib.frozen_shardings(cfg.model, cfg.lora, mesh),
        ),
        out_shardings=sharding.replicated(mesh),
    )


def pair_pass(dataset, fn, put_batch, *, batch_size: int, desc: str, indices=None) -> dict[str, np.ndarray]:
    """One in-order pass of `dataset`: fn(device batch) -> {name: [B, 2]} gives {name: float32 [N, 2]}.

    Rows land by the dataset's pair index (filler pairs dropped), also when each host holds only
    its slice of every batch. With `indices` (int64 [K], sorted) only those pairs are computed, each
    in the batch shape the full pass gives it (data.batching.subset_batches), the other rows NaN.
    Used for the reference pass and by haf_jax.score.
    """
    from tqdm import tqdm

    out: dict[str, np.ndarray] = {}
    wanted = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
    batches = dataset.batches(batch_size) if indices is None else subset_batches(dataset, wanted, batch_size)
    n_batches = -(-len(wanted) // batch_size)
    bar = tqdm(
        batches,
        total=n_batches,
        desc=desc,
        unit="batch",
        disable=jax.process_index() != 0,
        leave=False,
    )
    for batch in bar:
        values = jax.device_get(fn(put_batch(batch)))
        index, valid = batch["index"], batch["valid"]
        if jax.process_count() > 1:  # each host holds its slice of the indices
            index, valid = distributed.concat_hosts(index), distributed.concat_hosts(valid)
        for name, value in values.items():
            column = out.setdefault(name, np.full((len(dataset), 2), np.nan, np.float32))
            column[index[valid]] = np.asarray(value)[valid]
    for name, column in out.items():
        if np.isnan(column[wanted]).any():
            raise RuntimeError(f"{desc}: {int(np.isnan(column[wanted]).any(axis=1).sum())} pairs got no {name}")
    return out


def compute(
    dataset, params, ref_fn, put_batch, *, batch_size: int, desc: str = "reference", indices=None
) -> np.ndarray:
    """Reference log-probs of `params` for every pair of `dataset`, or only the pairs `indices` (int64
    [K], sorted; the other rows NaN) -> float32 [len(dataset), 2]."""
    fn = lambda b: {"logp": ref_fn(params, b)}
    return pair_pass(dataset, fn, put_batch, batch_size=batch_size, desc=desc, indices=indices)["logp"]
