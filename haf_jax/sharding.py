"""Device mesh and the ONE logical-axis rules table that places every array.

Parameters carry logical axis names (model/gemma.py); RULES maps each name to mesh axes.
A mesh axis is dropped for a dimension it does not divide (e.g. one MQA key/value head on a
tensor axis of 2), so every preset runs on every mesh shape.
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes); None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "reward": None,
}


def make_mesh(shape=(1, -1, 1), devices=None) -> Mesh:
    """Mesh over (data, fsdp, tensor); one entry may be -1 to take the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    shape = list(shape)
    if len(shape) != 3 or shape.count(-1) > 1:
        raise ValueError(f"mesh shape must be 3 sizes for {MESH_AXES} with at most one -1, got {shape}")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"cannot fill mesh {shape}: {len(devices)} devices not divisible by {known}")
        shape[shape.index(-1)] = len(devices) // known
    if math.prod(shape) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, have {len(devices)}")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def spec_for(logical_axes, shape, mesh: Mesh) -> P:
    """PartitionSpec for one array from its logical axis names, dropping non-dividing mesh axes."""
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape):
        axes = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule in haf_jax.sharding.RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def shard_batch_axis(x):
    """Pins an activation's leading (sequence) axis to (data, fsdp) when traced under a mesh.

    Without it GSPMD may follow the FSDP layout of the weights (embed over fsdp) into the
    activations and reshard them back and forth; outside a mesh context this is the identity.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or x.shape[0] % (mesh.shape["data"] * mesh.shape["fsdp"]):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def under_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the context mesh, so shard_batch_axis can take effect."""
    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)
    return wrapped


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (pair-count) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def abstract_params(config):
    """(abstract float32 params, logical axis names) of a preset, without allocating anything."""
    from haf_jax.model.gemma import Transformer

    def init(rng):
        tokens = np.zeros((1, 2), np.int32)
        return Transformer(config).init(rng, tokens, np.ones((1,), np.int32))["params"]

    boxed = jax.eval_shape(init, jax.random.key(0))
    names = nn.get_partition_spec(boxed)
    return nn.unbox(boxed), names


def param_shardings(config, mesh: Mesh):
    """NamedSharding for every parameter of `config`'s model on `mesh`."""
    shapes, names = abstract_params(config)
    return jax.tree.map(lambda s, n: NamedSharding(mesh, spec_for(tuple(n), s.shape, mesh)), shapes, names,
                        is_leaf=lambda x: isinstance(x, P))


def init_params(config, rng, mesh: Mesh):
    """Random init, jitted with out_shardings so no parameter is ever materialised unsharded."""
    from haf_jax.model.gemma import Transformer

    def init(key):
        tokens = np.zeros((1, 2), np.int32)
        return nn.unbox(Transformer(config).init(key, tokens, np.ones((1,), np.int32))["params"])

    return jax.jit(init, out_shardings=param_shardings(config, mesh))(rng)


def param_count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
