"""One way to load a model for inference: `load_model` -> `LoadedModel`, from a haf_jax run
directory, an export, a Hugging Face directory (local or gs://...) or a hub id, alike.

A run directory (what `haf_jax.train --workdir` writes, local or gs://...) holds checkpoints/,
model_config.json and tokenizer/; a Hugging Face directory (or hub id) holds config.json and
safetensors. Only parameters are ever read (never the optimizer state). A run's saved config is read
through `with_added_defaults`: a run written before a key existed loads with the value it ran with
(haf_jax/config/base.py ADDED_LATER).
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from haf_jax.checkpoint.manager import Checkpointer, CorruptCheckpointError
from haf_jax.config.base import with_added_defaults
from haf_jax.core import forward, model_setup, params as params_lib, paths, sharding
from haf_jax.data import load_tokenizer
from haf_jax.model import hf, lora as lora_lib
from haf_jax.model.config import ModelConfig
from haf_jax.model.heads import HEAD_KEYS

INITIAL = "initial"  # as a run's checkpoint: the weights it started from (untrained heads), for comparison


@dataclasses.dataclass(frozen=True)
class LoraAdapters:
    """What a LoRA run trained, beside the merged parameters: enough for a PEFT export."""

    config: lora_lib.LoraConfig
    adapters: Any  # the adapter tree as the checkpoint holds it ({target path: {"a", "b"}}), sharded
    base: str  # the run's model.checkpoint the adapters were trained on ("" = its seeded random init)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to score or sample with.

    params: the full parameter tree (a LoRA run's adapters merged into its base), on the mesh; the
      trunk in `step_cfg.compute_dtype` and the heads float32, or all float32 (load_model's float32).
    model_cfg: the architecture, with the parameter layout (scan_layers, remat_policy) the
      checkpoint was written in.
    name: the path or id as given; source: where the weights were read (a run directory, the
      resolved HF directory, or the gs:// URL given).
    kind: "run" (a checkpoint), "initial" (the weights a run started from) or "hf".
    step: the checkpoint's step (0 for "initial"; None for Hugging Face checkpoints).
    lora: a LoRA run's adapters (None otherwise).
    run_config: a run directory's saved config (of the step read); None for Hugging Face checkpoints.
    step_cfg: what the forward pass needs: model, loss (beta and policy kind of the implicit reward),
      compute dtype and log-prob chunk.
    """

    name: str
    source: str
    kind: str
    params: Any
    model_cfg: ModelConfig
    tokenizer: Any
    step: int | None
    lora: LoraAdapters | None
    run_config: ml_collections.ConfigDict | None
    step_cfg: forward.StepConfig


def default_mesh():
    """All devices on the fsdp axis: what score, evaluate and bon load onto."""
    return sharding.make_mesh((1, -1, 1))


def is_run_dir(path) -> bool:
    p = paths.path(path)
    return (p / "checkpoints").is_dir() and (p / "model_config.json").is_file()


def saved_run_config(path) -> ml_collections.ConfigDict | None:
    """The config a run directory's last checkpoint recorded (keys added since then at their
    defaults); None for anything that is not a run directory (an export, a Hugging Face model)."""
    if not is_run_dir(path):
        return None
    with Checkpointer(paths.path(path) / "checkpoints", every_steps=0, read_only=True) as ckpt:
        return ml_collections.ConfigDict(with_added_defaults(ckpt.read_config()))


def load_model(
    path: str,
    mesh,
    *,
    which: str | int = "best",
    compute_dtype: str | None = None,
    float32: bool = False,
    beta: float | None = None,
    chunk: int = 128,
) -> LoadedModel:
    """Loads `path` (run directory, export, HF directory or hub id) onto `mesh`, parameters only.

    which: for run directories, "best" (the latest when no eval was recorded), "last" (walks back
      past a damaged newest step: `step` says which was read), a step number, or "initial" (the weights the run
      started from: its model.checkpoint or seeded random init, with the zero reward head).
    compute_dtype: overrides the compute dtype (default: a run's model.compute_dtype, else float32).
      The trunk is cast to it (the heads stay float32): exactly what the training forward computes.
    float32: keep every parameter float32 as saved (export, sampling, a reference model).
    beta: overrides the implicit reward's beta (default: a run's loss.beta, else 0.1).
    chunk: positions per chunk of the log-prob computation (step_cfg.logprob_chunk).
    """
    if float32 and compute_dtype:
        raise ValueError(f"compute_dtype={compute_dtype!r} and float32=True contradict each other")
    if is_run_dir(path):
        read = _read_initial(path, mesh) if str(which) == INITIAL else _read_run(path, mesh, which)
        loss = forward.LossConfig.from_config(read.run_config.loss)
        loss = dataclasses.replace(loss, beta=beta) if beta is not None else loss
        dtype = jnp.dtype(compute_dtype or read.run_config.model.compute_dtype)
    elif str(which) == INITIAL:
        raise ValueError(f"--step=initial needs a run directory, got {path}")
    else:
        read = _read_hf(path, mesh)
        loss = forward.LossConfig(beta=0.1 if beta is None else beta)
        dtype = jnp.dtype(compute_dtype or "float32")
    params = read.params if float32 or dtype == jnp.float32 else cast_trunk(read.params, dtype)
    return LoadedModel(
        name=str(path),
        source=str(read.source),
        kind=read.kind,
        params=params,
        model_cfg=read.model_cfg,
        tokenizer=read.tokenizer,
        step=read.step,
        lora=read.lora,
        run_config=read.run_config,
        step_cfg=forward.StepConfig(model=read.model_cfg, loss=loss, compute_dtype=dtype, logprob_chunk=chunk),
    )


def cast_trunk(params, dtype):
    """The trunk's parameters in `dtype` (what forward_pairs computes with), the heads kept as they
    are (the reward head is read in float32); the input buffers are donated."""
    dtype = jnp.dtype(dtype)
    cast = jax.jit(
        lambda p: {k: v if k in HEAD_KEYS else jax.tree.map(lambda x: x.astype(dtype), v) for k, v in p.items()},
        donate_argnums=0,
    )
    return cast(params)


def parse_step(which: str | int) -> str | int:
    """A --step value checked: "best", "last", "initial" as they are, a step number as an int."""
    if str(which) in ("best", "last", INITIAL):
        return str(which)
    try:
        return int(which)
    except ValueError:
        raise ValueError(f"--step must be best, last, initial or a step number, got {which!r}") from None


def select_step(ckpt: Checkpointer, which: str | int) -> int:
    """'best' (falls back to the latest when no eval was recorded), 'last', or a step number."""
    if str(which) == "best":
        step = ckpt.best_step() or ckpt.latest_step()
    elif str(which) == "last":
        step = ckpt.latest_step()
    else:
        step = parse_step(which)
        if step not in ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step}; available: {ckpt.all_steps()}")
    if step is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
    return step


# ----------------------------------------------------------------------------- the three sources
# Each reads the parameters float32 as stored; load_model casts them and adds the step settings.


class _Read(NamedTuple):
    """What a source gave (LoadedModel's fields of the same names)."""

    source: Any
    kind: str
    params: Any
    model_cfg: ModelConfig
    tokenizer: Any
    step: int | None
    lora: LoraAdapters | None
    run_config: ml_collections.ConfigDict | None


def _read_run(run_dir, mesh, which: str | int) -> _Read:
    """A run directory's checkpoint: parameters only (Checkpointer.restore_params), verified.

    "last" walks back past a damaged newest step; "best" or an explicit step must be intact. A LoRA
    run's checkpoint holds adapters and heads only: its base weights are loaded again from the run's
    model.checkpoint (or its seeded random init), checked against the fingerprint the checkpoint
    recorded, and merged with the adapters.
    """
    run_dir = paths.path(run_dir)
    model_cfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    ckpt = Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True)
    if ckpt.read_config()["loss"]["objective"] == "dpo":  # best by the implicit reward
        ckpt.close()
        ckpt = Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True, best_metric="dpo_accuracy")
    try:
        step = select_step(ckpt, which)
        candidates = (
            [s for s in sorted(ckpt.all_steps(), reverse=True) if s <= step] if str(which) == "last" else [step]
        )
        params, problems = None, []
        for candidate in candidates:
            config = ml_collections.ConfigDict(with_added_defaults(ckpt.read_config(candidate)))
            # Each checkpoint records its parameter layout (runs from before scanned layers: per layer).
            layout_cfg = dataclasses.replace(model_cfg, **model_setup.layout_options(config))
            lora = model_setup.lora_config(config)
            try:
                params = ckpt.restore_params(candidate, params_lib.abstract_trainable(layout_cfg, lora, mesh))
                break
            except CorruptCheckpointError as e:
                problems.append(str(e))
        if params is None:
            raise ValueError("; ".join(problems) + "; choose another with --step=last|N")
        model_cfg = layout_cfg
        saved = with_added_defaults(ckpt.read_config(ckpt.restored_step))
    finally:
        ckpt.close()
    adapters = None
    if lora.enabled:
        _, path = model_setup.model_source(config)
        base = model_setup.initial_params(config, model_cfg, path, mesh)
        frozen = {k: v for k, v in base.items() if k not in lora_lib.trainable_heads(model_cfg, lora)}
        found = model_setup.base_fingerprint(frozen)["base_weights"]
        if found != saved.get("base_weights"):
            raise ValueError(
                f"{run_dir} holds LoRA adapters trained on other base weights (fingerprint "
                f"{saved.get('base_weights')}, {config.model.checkpoint or 'random init'} gives {found})"
            )
        adapters = LoraAdapters(config=lora, adapters=params["lora"], base=config.model.checkpoint)
        params = lora_lib.merge(params, frozen, lora)
    return _Read(
        run_dir,
        "run",
        params,
        model_cfg,
        _run_tokenizer(run_dir),
        ckpt.restored_step,
        adapters,
        ml_collections.ConfigDict(saved),
    )


def _read_initial(run_dir, mesh) -> _Read:
    """The weights a run started from (its model.checkpoint, or its seeded random init, with the
    zero reward head): the untrained model, for comparison."""
    run_dir = paths.path(run_dir)
    with Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True) as ckpt:
        config = ml_collections.ConfigDict(with_added_defaults(ckpt.read_config()))
    model_cfg, path = model_setup.model_source(config)
    params = model_setup.initial_params(config, model_cfg, path, mesh)
    return _Read(run_dir, INITIAL, params, model_cfg, _run_tokenizer(run_dir), 0, None, config)


def _read_hf(path_or_id: str, mesh) -> _Read:
    """A Hugging Face directory (local, or gs://... read from a local copy) or hub id."""
    if paths.is_remote(path_or_id):
        with paths.local_dir(path_or_id) as local:  # the weights are on the devices when it goes
            return _read_hf(local, mesh)._replace(source=str(path_or_id))
    path = hf.resolve_checkpoint(path_or_id)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path_or_id} is neither a haf_jax run directory (checkpoints/ and model_config.json) nor a "
            "Hugging Face model directory such as an export's reward_model/ or policy/ (config.json)"
        )
    model_cfg, _ = hf.load_hf_config(path)
    params, _ = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
    return _Read(path, "hf", params, model_cfg, load_tokenizer(str(path)), None, None, None)


def _run_tokenizer(run_dir):
    with paths.local_dir(run_dir / "tokenizer") as tokenizer_dir:
        return load_tokenizer(tokenizer_dir)
