"""Joining a multi-process run (TPU pod slices, SLURM, or processes started by hand).

Every entry point that may run on several hosts at once (train, export, score) calls
`maybe_initialize()` first; it is a no-op for a single process.
"""
from __future__ import annotations

import os


def maybe_initialize() -> None:
    """Joins a multi-process run when the environment describes one.

    TPU pods and SLURM are detected by JAX itself; anywhere else set JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    """
    import jax

    multi = (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if multi:
        explicit = {k: int(os.environ[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                        ("process_id", "JAX_PROCESS_ID")) if v in os.environ}
        jax.distributed.initialize(**explicit)
