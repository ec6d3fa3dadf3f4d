"""Load a scoring model from a haf_jax run directory or a Hugging Face checkpoint, alike.

A run directory (what `haf_jax.train --workdir` writes, local or gs://...) holds checkpoints/,
model_config.json and tokenizer/; a Hugging Face directory (or hub id) holds config.json and
safetensors.
"""
from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import ml_collections

from haf_jax.checkpoint.manager import Checkpointer, CorruptCheckpointError
from haf_jax.core import model_setup, paths
from haf_jax.core import params as params_lib
from haf_jax.data import load_tokenizer
from haf_jax.model import hf
from haf_jax.model import lora as lora_lib
from haf_jax.model.config import ModelConfig
from haf_jax.model.heads import HEAD_KEYS


def is_run_dir(path) -> bool:
    p = paths.path(path)
    return (p / "checkpoints").is_dir() and (p / "model_config.json").is_file()


def select_step(ckpt: Checkpointer, which: str | int) -> int:
    """'best' (falls back to the latest when no eval was recorded), 'last', or a step number."""
    if str(which) == "best":
        step = ckpt.best_step() or ckpt.latest_step()
    elif str(which) == "last":
        step = ckpt.latest_step()
    else:
        step = int(which)
        if step not in ckpt.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step}; available: {ckpt.all_steps()}")
    if step is None:
        raise FileNotFoundError(f"no readable checkpoint in {ckpt.directory}")
    return step


def load_run(run_dir, mesh, *, which: str | int = "best", compute_dtype: bool = False):
    """(params, ModelConfig, tokenizer, info) from a run directory's checkpoint: parameters only.

    Only the parameters are read (Checkpointer.restore_params): the optimizer state is never read
    nor allocated. "last" walks back past a damaged newest step (reported); "best" or an explicit
    step must be intact. With compute_dtype=True the trunk is cast to the run's model.compute_dtype
    (the heads stay float32), which is exactly what the training forward pass computes with.

    A LoRA run's checkpoint holds adapters and heads only: its base weights are loaded again from
    the run's model.checkpoint (or its seeded random init), checked against the fingerprint the
    checkpoint recorded, and merged with the adapters; info["lora"] then carries the LoraConfig,
    the trained adapters and the base's name for a PEFT export.
    """
    run_dir = paths.path(run_dir)
    model_cfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    ckpt = Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True)
    if ckpt.read_config().get("loss", {}).get("objective") == "dpo":  # best by the implicit reward
        ckpt.close()
        ckpt = Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True, best_metric="dpo_accuracy")
    try:
        step = select_step(ckpt, which)
        candidates = [s for s in sorted(ckpt.all_steps(), reverse=True) if s <= step] if str(which) == "last" else [step]
        params, problems = None, []
        for candidate in candidates:
            config = ml_collections.ConfigDict(ckpt.read_config(candidate))
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
        saved = ckpt.read_config(ckpt.restored_step)
    finally:
        ckpt.close()
    info = {"source": str(run_dir), "step": ckpt.restored_step, "config": saved}
    if lora.enabled:
        _, path = model_setup.model_source(config)
        base = model_setup.initial_params(config, model_cfg, path, mesh)
        frozen = {k: v for k, v in base.items() if k not in lora_lib.trainable_heads(model_cfg, lora)}
        found = model_setup.base_fingerprint(frozen)["base_weights"]
        if found != saved.get("base_weights"):
            raise ValueError(f"{run_dir} holds LoRA adapters trained on other base weights (fingerprint "
                             f"{saved.get('base_weights')}, {config.model.checkpoint or 'random init'} gives {found})")
        info["lora"] = {"config": lora, "adapters": params["lora"], "base": config.model.checkpoint}
        params = lora_lib.merge(params, frozen, lora)
    if compute_dtype:
        params = cast_trunk(params, config.model.compute_dtype)
        info["compute_dtype"] = str(jnp.dtype(config.model.compute_dtype))
    with paths.local_dir(run_dir / "tokenizer") as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    return params, model_cfg, tokenizer, info


def load_initial(run_dir, mesh, *, compute_dtype: bool | str = False):
    """(params, ModelConfig, tokenizer, info) of the weights a run started from (its model.checkpoint,
    or its seeded random init, with the zero reward head): the untrained model, for comparison."""
    run_dir = paths.path(run_dir)
    with Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True) as ckpt:
        saved = ckpt.read_config()
    config = ml_collections.ConfigDict(saved)
    model_cfg, path = model_setup.model_source(config)
    params = model_setup.initial_params(config, model_cfg, path, mesh)
    if compute_dtype:
        dtype = config.model.compute_dtype if compute_dtype is True else compute_dtype
        params = cast_trunk(params, dtype)
    info = {"source": str(run_dir), "step": 0, "config": saved, "initial": config.model.checkpoint or "random init"}
    with paths.local_dir(run_dir / "tokenizer") as tokenizer_dir:
        return params, model_cfg, load_tokenizer(tokenizer_dir), info


def cast_trunk(params, dtype):
    """The trunk's parameters in `dtype` (what forward_pairs computes with), the heads kept as they
    are (the reward head is read in float32); the input buffers are donated."""
    dtype = jnp.dtype(dtype)
    cast = jax.jit(lambda p: {k: v if k in HEAD_KEYS else jax.tree.map(lambda x: x.astype(dtype), v)
                              for k, v in p.items()}, donate_argnums=0)
    return cast(params)


def load_model(path_or_id: str, mesh, *, which: str | int = "best", compute_dtype: str | bool = False):
    """(params, ModelConfig, tokenizer, info) from a run directory, an HF directory (local or gs://...)
    or a hub id.

    compute_dtype: True casts a run's trunk to its model.compute_dtype; a dtype name casts any
    model's trunk to that dtype; False keeps the float32 weights."""
    if is_run_dir(path_or_id):
        if isinstance(compute_dtype, str):
            params, cfg, tok, info = load_run(path_or_id, mesh, which=which)
            return cast_trunk(params, compute_dtype), cfg, tok, {**info, "compute_dtype": compute_dtype}
        return load_run(path_or_id, mesh, which=which, compute_dtype=compute_dtype)
    if paths.is_remote(path_or_id):  # an export or HF directory in a bucket: read from a local copy
        with paths.local_dir(path_or_id) as local:  # the weights are on the devices when it goes
            params, model_cfg, tokenizer, info = load_model(local, mesh, which=which, compute_dtype=compute_dtype)
        return params, model_cfg, tokenizer, {**info, "source": str(path_or_id)}
    path = hf.resolve_checkpoint(path_or_id)
    model_cfg, _ = hf.load_hf_config(path)
    params, info = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
    info = {"source": str(path), **info}
    if isinstance(compute_dtype, str):
        params, info["compute_dtype"] = cast_trunk(params, compute_dtype), compute_dtype
    return params, model_cfg, load_tokenizer(str(path)), info
