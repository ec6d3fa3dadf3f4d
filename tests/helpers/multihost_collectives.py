"""Every collective of haf_jax.core.distributed, called by each process of a 2-process job.

Run by tests/e2e/test_multihost.py as `python -m tests.helpers.multihost_collectives` on two
processes (one CPU device each); each prints one JSON line of what it got back, which the test
compares.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from haf_jax.checkpoint import integrity
from haf_jax.core import distributed


def main() -> None:
    distributed.maybe_initialize()
    pid = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    # [4, 3] float32 split by rows over the two processes' devices: neither holds all of it
    spread = jax.make_array_from_callback(
        (4, 3), NamedSharding(mesh, P("x")), lambda index: np.arange(12, dtype=np.float32).reshape(4, 3)[index]
    )
    local = jnp.full((2,), pid, jnp.int32)  # on this process's device only
    distributed.barrier("haf_jax_test_collectives")
    on_host = distributed.to_host({"spread": spread, "local": local})
    got = {
        "everyone_differs": distributed.everyone(pid == 0),
        "everyone_agrees": distributed.everyone(True),
        "anyone_one": distributed.anyone(pid == 1),
        "anyone_none": distributed.anyone(False),
        "process_0": distributed.decided_by_process_0(pid == 0),
        "stack": distributed.stack_hosts(np.array([pid, 10 + pid], np.int32)).tolist(),
        "concat": distributed.concat_hosts(np.array([pid, 10 + pid], np.int32)).tolist(),
        "to_host": {k: np.asarray(v).tolist() for k, v in on_host.items()},
        "digest": integrity.digest({"w": spread}),
        "finite": integrity.all_finite({"w": spread}),
        "preemption": distributed.preemption_step_reached(0) if jax.config.jax_enable_preemption_service else None,
    }
    print(json.dumps(got, sort_keys=True))


if __name__ == "__main__":
    main()
