"""Device mesh and the ONE logical-axis rules table that places every array.

Parameters and activations carry logical axis names (model/layers.py); RULES maps each name to
mesh axes. This module knows no model: callers pass shapes and names.
A mesh axis is dropped for a dimension it does not divide (e.g. one MQA key/value head on a
tensor axis of 2), so every preset runs on every mesh shape.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis (or axes); None = replicated.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    # The LM head's vocabulary while log-probs are computed (heads.response_logprobs): split over
    # every device, so no device ever holds the whole [V, D] head or its gradient.
    "logit_vocab": ("data", "fsdp", "tensor"),
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "norm": None,
    "reward": None,
    "layers": None,  # the stacked layers of a scanned decoder (model/scan.py): each device holds all
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
            raise KeyError(f"logical axis {name!r} has no rule in haf_jax.core.sharding.RULES")
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        if axes and dim % math.prod(mesh.shape[a] for a in axes):
            axes = ()
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return P(*out)


def constrain(x, logical_axes):
    """Pins an activation to the mesh axes its logical names map to, when traced under a mesh.

    Without it GSPMD may follow the FSDP layout of the weights (embed over fsdp) into the
    activations and reshard them back and forth. Outside a mesh context (see `under_mesh`) this
    is the identity; a mesh axis that does not divide its dimension is dropped (spec_for).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(tuple(logical_axes), x.shape, mesh))


def shard_count(logical_axis: str, dim: int) -> int:
    """How many pieces a dimension of size `dim` named `logical_axis` is split into under the
    context mesh (1 outside one, or where the mesh axes do not divide it)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    axes = spec_for((logical_axis,), (dim,), mesh)[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(mesh.shape[a] for a in axes)


def under_mesh(fn, mesh: Mesh):
    """`fn` traced with `mesh` as the context mesh, so `constrain` takes effect."""

    def wrapped(*args):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return fn(*args)

    return wrapped


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (pair-count) axis over data x fsdp, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def named_shardings(shapes, logical_names, mesh: Mesh):
    """NamedSharding for every array of `shapes` from its logical axis names (PartitionSpecs of
    names, as `model.heads.abstract_params` returns them)."""
    return jax.tree.map(
        lambda s, n: NamedSharding(mesh, spec_for(tuple(n), s.shape, mesh)),
        shapes,
        logical_names,
        is_leaf=lambda x: isinstance(x, P),
    )
