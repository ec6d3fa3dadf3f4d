"""Load a scoring model from a haf_jax run directory or a Hugging Face checkpoint, alike.

A run directory (what `haf_jax.train --workdir` writes, local or gs://...) holds checkpoints/,
model_config.json and tokenizer/; a Hugging Face directory (or hub id) holds config.json and
safetensors.
"""
from __future__ import annotations

import json

import ml_collections

from haf_jax import build, checkpoint, params as params_lib, paths, step as step_lib
from haf_jax.data import load_tokenizer
from haf_jax.model import hf, lora as lora_lib
from haf_jax.model.config import ModelConfig


def is_run_dir(path) -> bool:
    p = paths.path(path)
    return (p / "checkpoints").is_dir() and (p / "model_config.json").is_file()


def select_step(ckpt: checkpoint.Checkpointer, which: str | int) -> int:
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


def load_run(run_dir, mesh, *, which: str | int = "best"):
    """(params, ModelConfig, tokenizer, info) from a run directory's checkpoint.

    A LoRA run's checkpoint holds adapters and heads only: its base weights are loaded again from
    the run's model.checkpoint (or its seeded random init), checked against the fingerprint the
    checkpoint recorded, and merged with the adapters; info["lora"] then carries the LoraConfig,
    the trained adapters and the base's name for a PEFT export.
    """
    run_dir = paths.path(run_dir)
    model_cfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True)
    if ckpt.read_config().get("loss", {}).get("objective") == "dpo":  # best by the implicit reward
        ckpt.close()
        ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True,
                                       best_metric="dpo_accuracy")
    step = select_step(ckpt, which)
    saved = ckpt.read_config(step)
    config = ml_collections.ConfigDict(saved)
    lora = build.lora_config(config)
    _, abstract_state = step_lib.state_layout(model_cfg, build.optimizer_for(config), mesh, lora)
    try:  # "last" walks back past a damaged newest step (reported); an explicit or best step must be intact
        state, _, _ = ckpt.restore(None if str(which) == "last" else step, abstract_state)
    except checkpoint.CorruptCheckpointError as e:
        raise ValueError(f"{e}; choose another with --step=last|N") from None
    finally:
        ckpt.close()
    info = {"source": str(run_dir), "step": ckpt.restored_step}
    params = state["params"]
    if lora.enabled:
        _, path = build.model_source(config)
        base = build.initial_params(config, model_cfg, path, mesh)
        frozen = {k: v for k, v in base.items() if k not in lora_lib.trainable_heads(model_cfg, lora)}
        found = build.base_fingerprint(frozen)["base_weights"]
        if found != saved.get("base_weights"):
            raise ValueError(f"{run_dir} holds LoRA adapters trained on other base weights (fingerprint "
                             f"{saved.get('base_weights')}, {config.model.checkpoint or 'random init'} gives {found})")
        info["lora"] = {"config": lora, "adapters": params["lora"], "base": config.model.checkpoint}
        params = lora_lib.merge(params, frozen, lora)
    with paths.local_dir(run_dir / "tokenizer") as tokenizer_dir:
        tokenizer = load_tokenizer(tokenizer_dir)
    return params, model_cfg, tokenizer, info


def load_model(path_or_id: str, mesh, *, which: str | int = "best"):
    """(params, ModelConfig, tokenizer, info) from a run directory, an HF directory or a hub id."""
    if is_run_dir(path_or_id):
        return load_run(path_or_id, mesh, which=which)
    path = hf.resolve_checkpoint(path_or_id)
    model_cfg, _ = hf.load_hf_config(path)
    params, info = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
    return params, model_cfg, load_tokenizer(str(path)), {"source": str(path), **info}
