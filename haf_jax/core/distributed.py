"""Joining a multi-process run (TPU pod slices, SLURM, or processes started by hand), and every
collective between processes that haf_jax uses.

Every entry point that may run on several hosts at once (train, export, score) calls
`maybe_initialize()` first; it is a no-op for a single process.

The collectives below are the only calls into `jax.experimental.multihost_utils` in haf_jax. Each
is a collective: every process must call it, in the same order, or the run hangs. With one process
each answers at once without communicating. P below is `jax.process_count()`.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def maybe_initialize() -> None:
    """Joins a multi-process run when the environment describes one.

    TPU pods and SLURM are detected by JAX itself; anywhere else set JAX_COORDINATOR_ADDRESS
    (host:port of process 0), JAX_NUM_PROCESSES and JAX_PROCESS_ID on every process.
    """
    multi = (
        os.environ.get("JAX_COORDINATOR_ADDRESS")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    )
    if multi:
        explicit = {
            k: int(os.environ[v])
            for k, v in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID"))
            if v in os.environ
        }
        jax.distributed.initialize(**explicit)


def everyone(ok: bool) -> bool:
    """True only when `ok` holds on every process (e.g. every host read a checkpoint intact)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.min(multihost_utils.process_allgather(np.int32(ok))))


def anyone(flag: bool) -> bool:
    """True when `flag` holds on at least one process (e.g. one host got SIGTERM)."""
    if jax.process_count() == 1:
        return flag
    return bool(np.max(multihost_utils.process_allgather(np.int32(flag))))


def decided_by_process_0(flag: bool) -> bool:
    """Process 0's `flag` on every process: one decision where each host's would differ (its clock)."""
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.broadcast_one_to_all(np.int32(flag)))


def barrier(name: str) -> None:
    """Returns once every process has reached the barrier of this `name` (the same on all of them).

    For file operations that process 0 does alone and the others must see done before going on.
    """
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def preemption_step_reached(step: int) -> bool:
    """True at the one step where every process stops for a preemption notice any of them received.

    JAX's preemption service (started by jax.distributed.initialize, jax_enable_preemption_service)
    agrees on that step; every process must ask at every step. False when the run is not
    distributed (no service: there is nothing to agree on).
    """
    return multihost_utils.reached_preemption_sync_point(step)


def to_host(tree):
    """Every array leaf of `tree` as a whole numpy array on this process.

    A leaf spread over the devices of several processes (a global jax.Array: any array on a
    multi-process mesh) is gathered across them; every other leaf is copied from its devices.
    Every process must call it with the same tree structure.
    """

    def gathered(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return multihost_utils.process_allgather(x, tiled=True)  # numpy
        return x

    # one device_get for the whole tree: it starts every copy before waiting on the first
    return jax.device_get(jax.tree.map(gathered, tree))


def stack_hosts(local: np.ndarray) -> np.ndarray:
    """[P, *local.shape]: row p is process p's `local` (same shape and dtype on every process)."""
    return np.asarray(multihost_utils.process_allgather(local))


def concat_hosts(local: np.ndarray) -> np.ndarray:
    """[P * n, ...]: every process's `local` [n, ...] (same shape on all) in process order."""
    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
