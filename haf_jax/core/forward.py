"""What training and evaluation both run: the step's static settings (`StepConfig`, `LossConfig`),
the full parameters (LoRA merged), the reference log-probs, and batches placed on the mesh.

Batches (NumPy on the host, then global arrays sharded over (data, fsdp)):
  plain   {"tokens" [B, 2, L], "response_mask" [B, 2, L], "last_index" [B, 2], "valid" [B],
           "ref_logp" [B, 2] (precomputed reference only)}
  packed  "tokens", "positions", "segment_ids", "response_mask" [R, T] and the same per-pair keys
          [B, ...], pair b in row b // (B / R) (data/packing.py; also for shared prompts).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from haf_jax.core import losses, sharding
from haf_jax.model import lora as lora_lib
from haf_jax.model.config import ModelConfig
from haf_jax.model.heads import forward_pairs

BATCH_KEYS = ("tokens", "response_mask", "last_index", "valid", "ref_logp")


PACKED_KEYS = ("positions", "segment_ids")  # row-level keys only packed batches have


ROW_KEYS = ("tokens", "response_mask") + PACKED_KEYS


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Static loss settings (mirrors the `loss` config section)."""

    objective: str = "haf"
    alpha: float = 0.2
    beta: float = 0.1
    policy: str = "sigmoid"
    margin: float = 0.0
    centering: float = 0.0
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    dpo_scale_by_alpha: bool = False  # objective dpo: loss = alpha * L_P (the authors' DPO-only runs)

    @property
    def needs_reward(self) -> bool:
        return self.objective != "dpo"

    @property
    def needs_policy(self) -> bool:  # the baseline never computes the LM head
        return self.objective != "baseline"

    @property
    def needs_reference(self) -> bool:
        return self.needs_policy and self.policy != "simpo"

    @classmethod
    def from_config(cls, loss_cfg) -> LossConfig:
        if loss_cfg.objective not in losses.OBJECTIVES:
            raise ValueError(f"loss.objective={loss_cfg.objective!r}; allowed: {', '.join(losses.OBJECTIVES)}")
        if loss_cfg.policy not in losses.POLICY_KINDS:
            raise ValueError(f"loss.policy={loss_cfg.policy!r}; allowed: {', '.join(losses.POLICY_KINDS)}")
        return cls(
            loss_cfg.objective,
            loss_cfg.alpha,
            loss_cfg.beta,
            loss_cfg.policy,
            loss_cfg.margin,
            loss_cfg.centering,
            loss_cfg.label_smoothing,
            loss_cfg.simpo_gamma,
            bool(loss_cfg.dpo_scale_by_alpha),
        )


@dataclasses.dataclass(frozen=True)
class StepConfig:
    model: ModelConfig
    loss: LossConfig
    compute_dtype: Any = jnp.float32
    logprob_chunk: int = 128
    grad_accum: int = 1
    lora: lora_lib.LoraConfig = lora_lib.LoraConfig()
    packed: bool = False  # training batches are packed rows (data.packing); eval/reference batches never are
    share_prompt: bool = False  # ... whose pairs share their prompts (data.share_prompt; packed is then True)


def model_params(params, frozen, cfg: StepConfig):
    """The full parameters the model runs with: `params` itself, or LoRA's merge with the frozen base."""
    return lora_lib.merge(params, frozen, cfg.lora) if cfg.lora.enabled else params


def reference_logprobs(params, batch, *, cfg: StepConfig):
    """Summed response log-probs [B, 2] of the (initial) weights: the precomputed reference."""
    return forward_pairs(
        params,
        cfg.model,
        batch,
        reward=False,
        chunk=cfg.logprob_chunk,
        compute_dtype=cfg.compute_dtype,
        shared_prompt=cfg.share_prompt,
    ).logp_Bx2


def batch_shardings(mesh, batch_keys, *, packed: bool = False) -> dict[str, NamedSharding]:
    ndims = {"tokens": 3, "response_mask": 3, "last_index": 2, "valid": 1, "ref_logp": 2}
    if packed:
        ndims.update(dict.fromkeys(ROW_KEYS, 2))
    return {k: sharding.batch_sharding(mesh, ndims[k]) for k in batch_keys}


def put_batch(batch: dict, keys, mesh) -> dict:
    """Process-local NumPy batch -> global arrays sharded over (data, fsdp), only the given keys."""
    shardings = batch_shardings(mesh, keys, packed="segment_ids" in keys)
    return {k: jax.make_array_from_process_local_data(shardings[k], np.asarray(batch[k])) for k in keys}


def step_keys(cfg: StepConfig, live_reference: bool, packed: bool = False) -> list[str]:
    """Batch keys a train/eval step takes: ref_logp only when a precomputed reference is used,
    positions and segment_ids only for packed batches."""
    keys = [k for k in BATCH_KEYS if k != "ref_logp" or (cfg.loss.needs_reference and not live_reference)]
    return keys + list(PACKED_KEYS) if packed else keys


def jit_reference(cfg: StepConfig, mesh, param_shardings):
    keys = ["tokens", "response_mask", "last_index"]
    fn = sharding.under_mesh(lambda params, batch: reference_logprobs(params, batch, cfg=cfg), mesh)
    return jax.jit(
        fn, in_shardings=(param_shardings, batch_shardings(mesh, keys)), out_shardings=sharding.replicated(mesh)
    ), keys
