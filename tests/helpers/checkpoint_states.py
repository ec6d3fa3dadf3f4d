"""A small, sharded train-like state and the checkpoint calls around it (tests/unit/test_checkpoint.py,
tests/e2e/test_gcs.py): params {"embed" [16, 8], "mlp" {"w" [8, 32], "b" [32]}, "head" [64, 256]},
Adam moments, a step count and a PRNG key, on a 1- or 8-device mesh."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from haf_jax.checkpoint import integrity

AXES = ("data", "fsdp", "tensor")
SPECS = {"embed": P("fsdp", "tensor"), "mlp": {"w": P(None, "tensor"), "b": P()}, "head": P("fsdp", None)}
CONFIG = {"model": {"preset": "tiny", "dims": [2, 4]}, "loss": {"objective": "haf"}, "train": {"seed": 0}}


def mesh_of(n):
    shape = {8: (2, 2, 2), 1: (1, 1, 1)}[n]
    return jax.make_mesh(shape, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=jax.devices()[:n])


def shardings_for(mesh, tree):
    """Params-like leaves by SPECS (via shape), everything else replicated."""
    by_shape = {(16, 8): SPECS["embed"], (8, 32): SPECS["mlp"]["w"], (64, 256): SPECS["head"]}
    return jax.tree.map(lambda x: NamedSharding(mesh, by_shape.get(getattr(x, "shape", ()), P())), tree)


def make_state(mesh, seed=0):
    """Built by one jit with out_shardings (eager sharded ops compile one by one: slow)."""
    return _jitted_init(mesh)(jnp.uint32(seed))


@functools.cache
def _jitted_init(mesh):  # one compile per mesh, not per seed
    out = shardings_for(mesh, jax.eval_shape(_init_state, jnp.uint32(0)))
    return jax.jit(_init_state, out_shardings=out)


def _init_state(seed):
    def values(*shape):  # cheap to compile, unlike jax.random.normal on 8 devices
        return jnp.sin(jnp.arange(np.prod(shape), dtype=jnp.float32) * (seed + 1.7)).reshape(shape)

    params = {
        "embed": values(16, 8),
        "mlp": {"w": values(8, 32), "b": values(32)},
        "head": values(64, 256),
    }  # big enough for raw chunk files
    tx = optax.adam(1e-2)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(params, opt_state, params)  # non-trivial moments and count
    params = optax.apply_updates(params, updates)
    state = {"params": params, "opt_state": opt_state, "step": jnp.int32(7), "rng": jax.random.key(seed + 42)}
    return state


def abstract(mesh, state):
    shardings = shardings_for(mesh, state)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


def as_numpy(tree):
    return jax.tree.map(lambda x: np.asarray(jax.random.key_data(x) if integrity.is_key(x) else x), tree)


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, as_numpy(a), as_numpy(b))


def save(c, step, state, metrics=None, **kw):
    return c.save(step, state, data_state={"epoch": 0, "position": step * 4}, config=CONFIG, metrics=metrics, **kw)
