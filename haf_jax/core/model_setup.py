"""The model a run config names, built the same way by training, evaluation and the planner: its
ModelConfig and Hugging Face source, initial weights, LoRA and step settings, optimizer.

`config` is a complete run config: a new run's, or a saved one read through
haf_jax.config.base.with_added_defaults (which fills the keys older runs lack)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from haf_jax.core import forward, params as params_lib
from haf_jax.core.logs import log
from haf_jax.core.optim import make_optimizer
from haf_jax.model import hf
from haf_jax.model.families import preset
from haf_jax.model.lora import LoraConfig


def model_source(config):
    """(ModelConfig, HF dir or None) for the config's checkpoint or preset."""
    if config.model.checkpoint:
        path = hf.resolve_checkpoint(config.model.checkpoint)
        model_cfg, _ = hf.load_hf_config(path)
    else:
        path, model_cfg = None, preset(config.model.preset)
    return dataclasses.replace(
        model_cfg, remat=bool(config.model.remat), attention=config.model.attention, **layout_options(config)
    ), path


def layout_options(config) -> dict:
    """The run config's model.scan_layers and model.remat_policy: the parameter layout its checkpoints
    hold. `config`: a ConfigDict or a complete config as a dict."""
    model = config["model"]
    return {"scan_layers": bool(model["scan_layers"]), "remat_policy": str(model["remat_policy"])}


def initial_params(config, model_cfg, path, mesh):
    """The initial weights: the HF checkpoint at `path`, or a random init of `model_cfg` (seeded)."""
    if path is not None:
        params, info = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
        log(f"loaded {path} ({info})")
        return params
    return params_lib.init_params(model_cfg, jax.random.key(config.train.seed), mesh)


def lora_config(config) -> LoraConfig:
    return LoraConfig.from_config(config.model.lora)


def step_config(config, model_cfg) -> forward.StepConfig:
    return forward.StepConfig(
        model=model_cfg,
        loss=forward.LossConfig.from_config(config.loss),
        compute_dtype=jnp.dtype(config.model.compute_dtype),
        logprob_chunk=config.model.logprob_chunk,
        grad_accum=config.optim.grad_accum,
        lora=lora_config(config),
        packed=bool(config.data.packing or config.data.share_prompt),
        share_prompt=bool(config.data.share_prompt),
    )


def base_fingerprint(frozen) -> dict:
    """What a LoRA run's checkpoints record of the base weights they adapt ({} without LoRA)."""
    return {} if frozen is None else {"base_weights": params_lib.params_fingerprint(frozen)}


def optimizer_for(config):
    o = config.optim
    return make_optimizer(
        learning_rate=o.learning_rate,
        total_steps=config.train.steps,
        warmup_steps=o.warmup_steps,
        schedule=o.schedule,
        eps=o.eps,
        weight_decay=o.weight_decay,
        clip_norm=o.clip_norm,
        moment_dtype=o.moment_dtype,
    )
