"""Reference log-probs for the implicit reward beta * (logp - ref_logp) of a loaded model, on the
datasets it is scored on: a run's initial weights, another model, none, or reference-free."""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from haf_jax.core import forward, model_setup, params as params_lib
from haf_jax.evaluation import evaluator
from haf_jax.evaluation.loading import INITIAL, LoadedModel, load_model

REFERENCES = ("initial", "none", "free")  # besides a model path: see reference_logprobs


@dataclasses.dataclass(frozen=True)
class Reference:
    """A loaded reference: its parameters (float32 or the run's init) and the step settings its
    log-probs are computed with; `what` describes it for reports."""

    params: object
    cfg: forward.StepConfig
    what: str


def reference_logprobs(
    reference: str | None, model: LoadedModel, datasets: list, mesh, *, batch_size: int, which="best"
):
    """([ref_logp float32 [N, 2] per dataset] or None, reference_free, description) for the implicit reward.

    reference: "" / None: a run's initial weights (its own reference) and none for an HF checkpoint;
    "initial": the run's initial weights (its model.checkpoint, or its seeded random init); "none": no
    implicit reward; "free": reference-free (ref_logp = 0, the policy's own log-prob ratio); else a
    model path or hub id (same vocabulary), scored in its own architecture, its weights float32. The
    reference weights are loaded once for all `datasets` and dropped afterwards.
    """
    ref = load_reference(reference, model, mesh, which=which)
    if not isinstance(ref, Reference):
        return None, ref == "free", {"none": "none", "free": "reference-free"}[ref]
    return [reference_pass(ref, ds, mesh, batch_size=batch_size) for ds in datasets], False, ref.what


def load_reference(reference: str | None, model: LoadedModel, mesh, *, which="best") -> Reference | str:
    """The reference `reference` names for `model` (forms: reference_logprobs), loaded once; "none"
    or "free" where there are no reference weights to load."""
    reference = reference or (INITIAL if model.run_config is not None else "none")
    if reference in ("none", "free"):
        return reference
    if reference == INITIAL:
        if model.run_config is None:
            raise ValueError(f"--reference=initial needs a run directory as the model, got {model.name}")
        cfg, path = model_setup.model_source(model.run_config)
        ref_params = model_setup.initial_params(model.run_config, cfg, path, mesh)
        what = f"initial weights of {model.name} ({model.run_config.model.checkpoint or 'seeded random init'})"
        return Reference(ref_params, dataclasses.replace(model.step_cfg, model=cfg), what)
    ref = load_model(reference, mesh, which=which, float32=True)
    if ref.model_cfg.vocab_size != model.model_cfg.vocab_size:
        raise ValueError(
            f"--reference vocab_size {ref.model_cfg.vocab_size} != model vocab_size {model.model_cfg.vocab_size}"
        )
    ref_cfg = forward.StepConfig(
        ref.model_cfg,
        forward.LossConfig(),
        compute_dtype=model.step_cfg.compute_dtype,
        logprob_chunk=model.step_cfg.logprob_chunk,
    )
    return Reference(ref.params, ref_cfg, reference)


def reference_pass(ref: Reference, ds, mesh, *, batch_size: int) -> np.ndarray:
    """The reference's summed response log-probs of every pair of `ds` -> float32 [len(ds), 2]."""
    if not len(ds):
        return np.zeros((0, 2), np.float32)
    ref_fn, keys = _jit_reference(ref.cfg, mesh)
    return evaluator.compute(
        ds,
        ref.params,
        ref_fn,
        lambda b: forward.put_batch(b, keys, mesh),
        batch_size=batch_size,
        desc="reference log-probs",
    )


@functools.lru_cache(maxsize=8)
def _jit_reference(cfg: forward.StepConfig, mesh):
    """forward.jit_reference, compiled once per settings for every model and dataset evaluated."""
    return forward.jit_reference(cfg, mesh, params_lib.param_shardings(cfg.model, mesh))
