"""Checkpointer.restore_params: the parameters of a step and nothing else, checksums verified."""

import glob
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.checkpoint.manager import Checkpointer, CorruptCheckpointError
from haf_jax.core import sharding


def _state(mesh):
    rep = sharding.replicated(mesh)
    w = jnp.sin(jnp.arange(64 * 256, dtype=jnp.float32)).reshape(64, 256)  # big enough for a raw chunk file
    params = {"w": jax.device_put(w, rep), "b": jax.device_put(jnp.arange(8, dtype=jnp.float32), rep)}
    # Optimizer state much smaller than the parameters: the biggest data file is the parameters'.
    return {
        "params": params,
        "opt_state": {"count": jax.device_put(jnp.int32(3), rep)},
        "step": jax.device_put(jnp.int32(3), rep),
    }


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_restore_params_reads_only_params_and_verifies_them(tmp_path):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    state = _state(mesh)
    with Checkpointer(tmp_path, every_steps=1, async_save=False) as c:
        c.save(3, state, data_state={}, config={}, force=True)
    with Checkpointer(tmp_path, every_steps=0, read_only=True) as c:
        got = c.restore_params(3, _abstract(state["params"]))
        assert sorted(got) == ["b", "w"] and c.restored_step == 3
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(state["params"]))
        with pytest.raises(ValueError, match="parameters of another shape"):
            c.restore_params(
                3,
                {
                    **_abstract(state["params"]),
                    "b": jax.ShapeDtypeStruct((9,), jnp.float32, sharding=got["b"].sharding),
                },
            )
        with pytest.raises(FileNotFoundError):
            c.restore_params(4, _abstract(state["params"]))
    # Same-size garbling inside the parameters' chunk reads back silently: the checksums catch it.
    biggest = max(glob.glob(f"{tmp_path}/3/state/**/d/*", recursive=True), key=os.path.getsize)
    assert os.path.getsize(biggest) > 50_000  # the (64, 256) float32 chunk (compressed), not a b-tree node
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2 : len(data) // 2 + 8] = bytes(x ^ 0xFF for x in data[len(data) // 2 : len(data) // 2 + 8])
    open(biggest, "wb").write(bytes(data))
    with Checkpointer(tmp_path, every_steps=0, read_only=True) as c:
        with pytest.raises(CorruptCheckpointError, match="checksum mismatch"):
            c.restore_params(3, _abstract(state["params"]))
