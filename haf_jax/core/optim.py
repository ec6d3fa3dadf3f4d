"""Optimiser: global-norm clipping -> AdamW with a learning-rate schedule, optional accumulation.

Paper defaults (the authors' training setup, docs/REPRODUCE.md): AdamW, eps 1e-5, weight decay 0,
gradient clipping at global norm 1.0, learning rate decayed linearly to 0, no warmup.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

SCHEDULES = ("linear", "cosine", "constant")
MOMENT_DTYPES = ("float32", "bfloat16")


def learning_rate_schedule(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
) -> optax.Schedule:
    """Learning rate as a function of the optimiser-update count (0 for the first update).

    Warmup (if any) rises linearly from 0 at count 0 to ``learning_rate`` at ``warmup_steps``
    (as Hugging Face's ``get_*_schedule_with_warmup``; the first update has lr 0 when warming up).
    After warmup:
      linear:   decays linearly to 0 at ``total_steps`` (the last update, count total_steps - 1,
                still has a positive lr);
      cosine:   half-cosine from ``learning_rate`` to 0 at ``total_steps``;
      constant: stays at ``learning_rate``.
    Counts past ``total_steps`` keep the end value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if schedule != "constant" and total_steps <= warmup_steps:
        raise ValueError(
            f"total_steps ({total_steps}) must exceed warmup_steps ({warmup_steps}) for a {schedule!r} schedule"
        )
    decay_steps = max(total_steps - warmup_steps, 1)
    if schedule == "linear":
        main = optax.linear_schedule(learning_rate, 0.0, decay_steps)
    elif schedule == "cosine":
        main = optax.cosine_decay_schedule(learning_rate, decay_steps, alpha=0.0)
    else:
        main = optax.constant_schedule(learning_rate)
    if warmup_steps == 0:
        return main
    warmup = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def make_optimizer(
    *,
    learning_rate: float,
    total_steps: int,
    warmup_steps: int = 0,
    schedule: str = "linear",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-5,
    weight_decay: float = 0.0,
    clip_norm: float | None = 1.0,
    accumulation_steps: int = 1,
    moment_dtype=None,
) -> optax.GradientTransformation:
    """``chain(clip_by_global_norm(clip_norm), adamw(schedule, ...))``, optionally accumulated.

    Step counting: ``total_steps`` and ``warmup_steps`` count OPTIMISER UPDATES, not calls. With
    ``accumulation_steps = k > 1`` the chain is wrapped in ``optax.MultiSteps``: each call adds a
    micro-batch gradient; the first k - 1 calls return zero updates and every k-th call applies the
    chain once to the MEAN of the k gradients (so clipping sees the averaged gradient and the
    schedule advances once per k calls). A run of ``total_steps`` updates therefore takes
    ``k * total_steps`` calls; the learning rate used at call c is ``schedule(c // k)``.
    A ``clip_norm`` of None or 0 disables clipping. Weight decay is decoupled (AdamW) and applies
    to every parameter.

    ``moment_dtype`` (e.g. "bfloat16"; None = the parameters' float32) stores Adam's first moment
    in that dtype (optax's ``mu_dtype``), 2 bytes less per trained parameter in bfloat16. The
    second moment stays float32: its update adds (1 - b2) = 0.1% per step, below bfloat16's
    resolution (0.4%), so a bfloat16 second moment would stop following the gradients.
    """
    if accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be >= 1, got {accumulation_steps}")
    lr = learning_rate_schedule(
        learning_rate=learning_rate, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule
    )
    parts = []
    if clip_norm:
        parts.append(optax.clip_by_global_norm(clip_norm))
    if moment_dtype not in (None, *MOMENT_DTYPES):
        raise ValueError(f"optim.moment_dtype={moment_dtype!r}; allowed: {', '.join(MOMENT_DTYPES)}")
    mu_dtype = None if moment_dtype in (None, "float32") else jnp.dtype(moment_dtype)
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype))
    tx = optax.chain(*parts)
    if accumulation_steps > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accumulation_steps).gradient_transformation()
    return tx
