"""Load a scoring model from a haf_jax run directory or a Hugging Face checkpoint, alike.

A run directory (what `haf_jax.train --workdir` writes) holds checkpoints/, model_config.json
and tokenizer/; a Hugging Face directory (or hub id) holds config.json and safetensors.
"""
from __future__ import annotations

import json
import pathlib

import ml_collections

from haf_jax import checkpoint, params as params_lib, step as step_lib
from haf_jax.data import load_tokenizer
from haf_jax.model import hf
from haf_jax.model.config import ModelConfig


def is_run_dir(path) -> bool:
    p = pathlib.Path(path)
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
    """(params, ModelConfig, tokenizer, info) from a run directory's checkpoint."""
    from haf_jax.loop import optimizer_for

    run_dir = pathlib.Path(run_dir)
    model_cfg = ModelConfig.from_dict(json.loads((run_dir / "model_config.json").read_text()))
    ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True)
    if ckpt.read_config().get("loss", {}).get("objective") == "dpo":  # best by the implicit reward
        ckpt.close()
        ckpt = checkpoint.Checkpointer(run_dir / "checkpoints", every_steps=0, read_only=True,
                                       best_metric="dpo_accuracy")
    step = select_step(ckpt, which)
    config = ml_collections.ConfigDict(ckpt.read_config(step))
    _, abstract_state = step_lib.state_layout(model_cfg, optimizer_for(config), mesh)
    try:  # "last" walks back past a damaged newest step (reported); an explicit or best step must be intact
        state, _, _ = ckpt.restore(None if str(which) == "last" else step, abstract_state)
    except checkpoint.CorruptCheckpointError as e:
        raise ValueError(f"{e}; choose another with --step=last|N") from None
    finally:
        ckpt.close()
    step = ckpt.restored_step
    tokenizer = load_tokenizer(str(run_dir / "tokenizer"))
    return state["params"], model_cfg, tokenizer, {"source": str(run_dir), "step": step}


def load_model(path_or_id: str, mesh, *, which: str | int = "best"):
    """(params, ModelConfig, tokenizer, info) from a run directory, an HF directory or a hub id."""
    if is_run_dir(path_or_id):
        return load_run(path_or_id, mesh, which=which)
    path = hf.resolve_checkpoint(path_or_id)
    model_cfg, _ = hf.load_hf_config(path)
    params, info = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
    return params, model_cfg, load_tokenizer(str(path)), {"source": str(path), **info}
