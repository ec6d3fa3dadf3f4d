"""The pure train step, jitted once with explicit shardings over the mesh, and the train state's layout
(what evaluation shares with it, StepConfig and batch placement: core/forward.py).

train_step(state, batch, ref_params, frozen) -> (state, metrics)
  state = {"params": float32 pytree, "opt_state": optax state, "step": int32 scalar}
  With LoRA, state["params"] holds only the trained part (adapters + heads) and `frozen` the base
  weights (model/lora.py); the step merges them, so gradients exist only for the trained part.
  batch = {"tokens" [B,2,L], "response_mask" [B,2,L], "last_index" [B,2], "valid" [B],
           "ref_logp" [B,2] (precomputed reference; absent in live mode)}
  or, packed (StepConfig.packed, data/packing.py; also for shared prompts): "tokens", "positions",
  "segment_ids", "response_mask" [R,T] and the same per-pair keys [B,...], pair b in row b // (B / R).
The state is donated. A non-finite loss or gradient leaves the state unchanged and is reported
through metrics["finite"] = 0, so the host can stop without the bad state ever existing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from haf_jax.core import losses, params as params_lib, sharding
from haf_jax.core.forward import (  # noqa: F401  (StepConfig, LossConfig, put_batch: the step's vocabulary)
    ROW_KEYS,
    LossConfig,
    StepConfig,
    batch_shardings,
    model_params,
    put_batch,
    reference_logprobs,
    step_keys,
)
from haf_jax.model import lora as lora_lib
from haf_jax.model.config import ModelConfig
from haf_jax.model.heads import forward_pairs


def _outputs(params, cfg: StepConfig, batch, ref_params):
    """Model outputs for one (micro-)batch, with the reference log-probs attached."""
    out = forward_pairs(
        params,
        cfg.model,
        batch,
        reward=cfg.loss.needs_reward,
        policy=cfg.loss.needs_policy,
        chunk=cfg.logprob_chunk,
        compute_dtype=cfg.compute_dtype,
        shared_prompt=cfg.share_prompt,
    )
    if cfg.loss.needs_reference:
        if ref_params is not None:  # live reference: frozen initial weights, same tokens
            out = out.replace(ref_logp_Bx2=jax.lax.stop_gradient(reference_logprobs(ref_params, batch, cfg=cfg)))
        else:
            out = out.replace(ref_logp_Bx2=batch["ref_logp"])
    return out


def _loss(params, cfg: StepConfig, batch, ref_params, frozen):
    out = _outputs(model_params(params, frozen, cfg), cfg, batch, ref_params)
    lc = cfg.loss
    loss, metrics = losses.objective(
        out.scores(),
        objective=lc.objective,
        alpha=lc.alpha,
        beta=lc.beta,
        policy_kind=lc.policy,
        margin=lc.margin,
        centering=lc.centering,
        label_smoothing=lc.label_smoothing,
        simpo_gamma=lc.simpo_gamma,
        weight_B=batch["valid"].astype(jnp.float32),
        dpo_scale_by_alpha=lc.dpo_scale_by_alpha,
    )
    if out.logprob_chunks is not None:  # what the LM head ran: the step's FLOPs (flops.step_flops)
        metrics = {**metrics, "logprob_chunks": out.logprob_chunks}
    return loss, metrics


# Metrics that are not means over the pairs: summed (num_pairs) or averaged per micro-batch (logprob_chunks,
# the LM-head chunks one micro-batch ran) under gradient accumulation.
UNWEIGHTED = ("num_pairs", "logprob_chunks")


def train_step(state, batch, ref_params, frozen, *, cfg: StepConfig, optimizer: optax.GradientTransformation):
    """One optimizer step; with grad_accum > 1 the batch is split into micro-batches (lax.scan)."""
    params = state["params"]
    grad_fn = jax.value_and_grad(_loss, has_aux=True)
    if cfg.grad_accum == 1:
        (_, metrics), grads = grad_fn(params, cfg, batch, ref_params, frozen)
    else:
        a = cfg.grad_accum
        micro = micro_batches(batch, a)

        def micro_step(mb):
            # A micro-batch's loss is a mean over its real pairs; weighted by their count and divided by
            # the batch's count below, the sum is the full batch's mean also when filler rows (valid=False)
            # leave the micro-batches unequal (a plain mean over micro-batches would not be).
            (_, m), g = grad_fn(params, cfg, mb, ref_params, frozen)
            n = m["num_pairs"]
            weighted = {k: v if k in UNWEIGHTED else v * n for k, v in m.items()}
            return jax.tree.map(lambda x: x * n, g), weighted

        shapes = jax.eval_shape(micro_step, jax.tree.map(lambda x: x[0], micro))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        (grads, metrics), _ = jax.lax.scan(
            lambda acc, mb: (jax.tree.map(jnp.add, acc, micro_step(mb)), None), zeros, micro
        )
        denom = jnp.maximum(metrics["num_pairs"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        metrics = {k: v if k == "num_pairs" else v / a if k in UNWEIGHTED else v / denom for k, v in metrics.items()}
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)

    def update(operands):
        params, opt_state, grads = operands
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    # Keep the previous weights and moments when anything is non-finite: the bad state never exists.
    # A cond runs one branch, in place; a select between new and old state read both (on the 2-core
    # CPU it took the optimizer step of issue 12's model from 78 to 128 ms).
    params, opt_state = jax.lax.cond(finite, update, lambda operands: operands[:2], (params, state["opt_state"], grads))
    new = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new, {**metrics, "grad_norm": grad_norm, "finite": finite.astype(jnp.float32)}


def micro_batches(batch, a: int):
    """Every key split into `a` micro-batches on a new leading axis: micro-batch j takes rows j, j + a,
    j + 2a, ... (every device keeps an equal share). In a packed batch the pairs follow their rows:
    pair keys are split by row ([B] -> [R, B / R] -> rows j, j + a, ...)."""

    def split(x, per_row=1):
        x = x.reshape(x.shape[0] // per_row, per_row, *x.shape[1:])
        x = jnp.moveaxis(x.reshape(x.shape[0] // a, a, *x.shape[1:]), 1, 0)
        return x.reshape(a, -1, *x.shape[3:])

    if "segment_ids" not in batch:
        return jax.tree.map(split, batch)
    per_row = batch["last_index"].shape[0] // batch["tokens"].shape[0]
    return {k: split(v, 1 if k in ROW_KEYS else per_row) for k, v in batch.items()}


def state_layout(model_cfg: ModelConfig, optimizer, mesh, lora: lora_lib.LoraConfig | None = None):
    """(jitted trainable params -> state, abstract state carrying shardings): nothing is allocated here.

    The trainable params are all parameters, or LoRA's adapters + heads. Every piece of state is
    placed explicitly: each optimizer moment like the parameter it belongs to
    (`optax.tree_map_params`), counts and other scalars replicated. (Left to XLA's propagation, the
    moments came out replicated on TPU: gemma-2b's Adam state alone then overflowed a v5e chip.)
    """
    lora = lora or lora_lib.LoraConfig()  # None: full fine-tuning
    abstract_params = params_lib.abstract_trainable(model_cfg, lora, mesh)
    param_sh = jax.tree.map(lambda x: x.sharding, abstract_params)

    def make_state(params):
        return {"params": params, "opt_state": optimizer.init(params), "step": jnp.zeros((), jnp.int32)}

    shapes = jax.eval_shape(make_state, abstract_params)
    replicated = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, sh: sh, shapes["opt_state"], param_sh, transform_non_params=lambda _: replicated
    )
    state_sh = {"params": param_sh, "opt_state": opt_sh, "step": replicated}
    abstract_state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh)
    return jax.jit(make_state, out_shardings=state_sh, donate_argnums=(0,)), abstract_state


def jit_train_step(cfg: StepConfig, optimizer, mesh, state_shardings, param_shardings, *, live_reference: bool):
    """train_step(state, batch, ref_params, frozen) jitted once: state donated, batch over (data,
    fsdp), metrics replicated. `param_shardings` are those of the full model (reference, frozen base)."""
    keys = step_keys(cfg, live_reference, cfg.packed)
    ref_sh = param_shardings if live_reference else None
    fn = sharding.under_mesh(
        lambda state, batch, ref, frozen: train_step(state, batch, ref, frozen, cfg=cfg, optimizer=optimizer), mesh
    )
    return jax.jit(
        fn,
        in_shardings=(
            state_shardings,
            batch_shardings(mesh, keys, packed=cfg.packed),
            ref_sh,
            _frozen_shardings(cfg, param_shardings),
        ),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=(0,),
    ), keys


def _frozen_shardings(cfg: StepConfig, param_shardings):
    if not cfg.lora.enabled:
        return None
    heads_trained = lora_lib.trainable_heads(cfg.model, cfg.lora)
    return {k: v for k, v in param_shardings.items() if k not in heads_trained}
