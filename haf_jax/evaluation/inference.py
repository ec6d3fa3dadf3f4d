"""A model opened for inference, its data and its reference: what `score` and `evaluate` share.

`open_model` loads parameters only (never optimizer state) from a run directory, an export or any
supported Hugging Face checkpoint, with the trunk in the compute dtype (a run's model.compute_dtype).
`load_data` tokenises a data spec as the run was trained (its max_length, template, truncation, ...),
and the spec `run:eval` is a run's own eval split. `reference_logprobs` gives the reference log-probs
of the implicit reward: the run's initial weights, another model, none, or reference-free.
Scoring itself is `evaluator.Evaluator`, the path the training loop evaluates with.
"""
from __future__ import annotations

import dataclasses
import functools
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from haf_jax import data
from haf_jax.core import forward, model_setup, sharding
from haf_jax.core import params as params_lib
from haf_jax.evaluation import evaluator
from haf_jax.evaluation import loading as runs

RUN_EVAL = "run:eval"  # data spec: the run's own eval split (data.eval, or the carve out of data.train)
REFERENCES = ("initial", "none", "free")  # besides a model path: see reference_logprobs
INITIAL = "initial"  # as a run's checkpoint: the weights it started from (untrained heads), for comparison


@dataclasses.dataclass
class Model:
    """A model ready to score: full parameters (LoRA merged), config, tokenizer and where they came from."""

    name: str
    params: object
    model_cfg: object
    tokenizer: object
    info: dict
    step_cfg: forward.StepConfig
    run_config: ml_collections.ConfigDict | None  # a run directory's saved config; None for HF checkpoints


def open_model(path: str, mesh, *, which: str | int = "best", beta: float | None = None, chunk: int = 128,
               compute_dtype: str | None = None) -> Model:
    """Loads `path` (run directory, export or HF checkpoint) for inference.

    beta / policy kind of the implicit reward come from a run's loss config (`beta` overrides);
    the compute dtype is a run's model.compute_dtype (`compute_dtype` overrides), float32 otherwise.
    """
    is_run = runs.is_run_dir(path)
    if str(which) == INITIAL:
        if not is_run:
            raise ValueError(f"--step=initial needs a run directory, got {path}")
        params, model_cfg, tokenizer, info = runs.load_initial(path, mesh, compute_dtype=compute_dtype or True)
    else:
        params, model_cfg, tokenizer, info = runs.load_model(path, mesh, which=which,
                                                             compute_dtype=compute_dtype or is_run)
    run_config = ml_collections.ConfigDict(info.pop("config")) if is_run else None
    if run_config is not None:
        loss = forward.LossConfig.from_config(run_config.loss)
        loss = dataclasses.replace(loss, beta=beta) if beta is not None else loss
        dtype = jnp.dtype(compute_dtype or run_config.model.compute_dtype)
    else:
        loss, dtype = forward.LossConfig(beta=0.1 if beta is None else beta), jnp.dtype(compute_dtype or "float32")
    step_cfg = forward.StepConfig(model=model_cfg, loss=loss, compute_dtype=dtype, logprob_chunk=chunk)
    return Model(str(path), params, model_cfg, tokenizer, info, step_cfg, run_config)


def load_data(source: str | data.Records, model: Model, *, max_length: int | None = None,
              max_prompt_length: int | None = None, template: str | None = None, degenerate: str | None = None,
              log=True):
    """`source` (a data spec, or `data.Records` in memory) tokenised for `model`: a run's data settings
    unless overridden; `run:eval` is the run's own eval split, built exactly as training built it."""
    c = model.run_config
    d = c.data if c is not None else None
    if source == RUN_EVAL:
        if c is None:
            raise ValueError(f"--data={RUN_EVAL} needs a run directory as the model, got {model.name}")
        options = data.PairOptions(
            max_length=d.max_length, max_prompt_length=d.max_prompt_length, template=d.template,
            eval_fraction=d.eval_fraction, seed=c.train.seed, max_skip_fraction=d.max_skip_fraction,
            process_index=jax.process_index(), process_count=jax.process_count(),
            **data.config_options(d), **data.eval_options(d))
        ds = data.load_pairs(d.eval or d.train or data.sample_paths()["data"], model.tokenizer, options,
                             split="all" if d.eval else "eval")
    else:
        max_length = max_length or (d.max_length if d is not None else 512)
        max_prompt_length = min(max_prompt_length or (d.max_prompt_length if d is not None else 128), max_length // 2)
        fidelity = data.config_options(d) if d is not None else {}
        if degenerate:
            fidelity["degenerate"] = degenerate
        options = data.PairOptions(
            max_length=max_length, max_prompt_length=max_prompt_length,
            template=template or (d.template if d is not None else "none"), eval_fraction=0.0,
            max_skip_fraction=1.0, process_index=jax.process_index(), process_count=jax.process_count(), **fidelity)
        ds = data.load_pairs(source, model.tokenizer, options, split="all")
    if log:
        print(data.format_report(ds.report), file=sys.stderr)
    return ds


def reference_logprobs(reference: str | None, model: Model, datasets: list, mesh, *, batch_size: int,
                       which="best"):
    """([ref_logp float32 [N, 2] per dataset] or None, reference_free, description) for the implicit reward.

    reference: "" / None: a run's initial weights (its own reference) and none for an HF checkpoint;
    "initial": the run's initial weights (its model.checkpoint, or its seeded random init); "none": no
    implicit reward; "free": reference-free (ref_logp = 0, the policy's own log-prob ratio); else a
    model path or hub id (same vocabulary), scored in its own architecture. The reference weights
    are loaded once for all `datasets` and dropped afterwards.
    """
    reference = reference or (INITIAL if model.run_config is not None else "none")
    if reference == "none":
        return None, False, "none"
    if reference == "free":
        return None, True, "reference-free"
    if reference == INITIAL:
        if model.run_config is None:
            raise ValueError(f"--reference=initial needs a run directory as the model, got {model.name}")
        cfg, path = model_setup.model_source(model.run_config)
        ref_params = model_setup.initial_params(model.run_config, cfg, path, mesh)
        what = f"initial weights of {model.name} ({model.run_config.model.checkpoint or 'seeded random init'})"
        ref_cfg = dataclasses.replace(model.step_cfg, model=cfg)
    else:
        ref_params, cfg, _, _ = runs.load_model(reference, mesh, which=which)
        if cfg.vocab_size != model.model_cfg.vocab_size:
            raise ValueError(f"--reference vocab_size {cfg.vocab_size} != model vocab_size "
                             f"{model.model_cfg.vocab_size}")
        what = reference
        ref_cfg = forward.StepConfig(cfg, forward.LossConfig(), compute_dtype=model.step_cfg.compute_dtype,
                                      logprob_chunk=model.step_cfg.logprob_chunk)
    ref_fn, keys = _jit_reference(ref_cfg, mesh)
    arrays = [evaluator.compute(ds, ref_params, ref_fn, lambda b: forward.put_batch(b, keys, mesh),
                                    batch_size=batch_size, desc="reference log-probs")
              if len(ds) else np.zeros((0, 2), np.float32) for ds in datasets]
    return arrays, False, what


@functools.lru_cache(maxsize=8)
def _jit_reference(cfg: forward.StepConfig, mesh):
    """step.jit_reference, compiled once per settings for every model and dataset evaluated."""
    return forward.jit_reference(cfg, mesh, params_lib.param_shardings(cfg.model, mesh))


def default_mesh():
    return sharding.make_mesh((1, -1, 1))


def round_batch(batch_size: int, mesh) -> int:
    """Batches are split over every device: rounded up to a multiple (filler pairs are masked)."""
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-batch_size // n_shards) * n_shards


def evaluator_for(model: Model, mesh) -> evaluator.Evaluator:
    """Both heads, the full (merged) parameters, precomputed or no reference."""
    return evaluator.Evaluator(model.step_cfg, mesh)
