"""What a checkpoint records about its array tree to check it later: per-leaf layout (shape, dtype),
per-leaf checksums, and whether every float is finite.

Leaves are named by `jax.tree_util.keystr` of their path ("['params']['embed']"), so the records
are JSON objects that do not depend on the mesh the tree was saved from or restored onto.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from haf_jax.core import distributed

_MISSING = "<missing>"


def is_key(x) -> bool:
    """True for a typed PRNG key array (jax.random.key): it has no float bits to check."""
    return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


@jax.jit
def _finite_leaves(leaves):
    """bool []: every inexact leaf of the list `leaves` is free of NaN/Inf (one fused reduction)."""
    flags = [jnp.isfinite(x).all() for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(flags).all() if flags else jnp.bool_(True)


def all_finite(tree) -> bool:
    """True when every float leaf of `tree` is free of NaN/Inf (integer and key leaves pass)."""
    leaves = [x for x in jax.tree.leaves(tree) if not is_key(x)]
    return bool(np.asarray(distributed.to_host(_finite_leaves(leaves))))


def _leaf_checksum(x):
    """uint32 []: position-weighted wraparound sum of the bits of `x` (any shape and dtype).

    Exact and independent of how `x` is sharded: each element's bits times an odd weight derived
    from its flat index, summed modulo 2**32, so a changed element or two swapped ones show.
    """
    if is_key(x):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    u = x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    u = u.astype(jnp.uint32)  # 64-bit types (jax_enable_x64 only) keep their low bits
    idx = jnp.uint32(0)
    for d in range(u.ndim):  # flat index from iotas (partitions cleanly, never materialised)
        stride = int(np.prod(u.shape[d + 1 :], dtype=np.uint64) % 2**32)
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride)
    weight = (idx * jnp.uint32(0x9E3779B1)) | jnp.uint32(1)  # odd: any changed element shows
    return jnp.sum(u * weight, dtype=jnp.uint32)


@jax.jit
def _digest_leaves(leaves):
    """(bool [] all float leaves finite, uint32 [len(leaves)] checksums) of the list `leaves`."""
    finite = _finite_leaves([x for x in leaves if not is_key(x)])
    sums = jnp.stack([_leaf_checksum(x) for x in leaves]) if leaves else jnp.zeros(0, jnp.uint32)
    return finite, sums


def digest(tree) -> tuple[bool, dict[str, int]]:
    """(all float leaves finite, {leaf path: checksum}) of `tree`, in one fused jit.

    A collective when `tree` spans several processes (its results are gathered): call it on all.
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    finite, sums = distributed.to_host(_digest_leaves([x for _, x in flat]))
    sums = np.asarray(sums).tolist()
    return bool(np.asarray(finite)), {jax.tree_util.keystr(p): s for (p, _), s in zip(flat, sums)}


def checksum_problem(tree, checksums: dict[str, int]) -> str | None:
    """None when every leaf of `tree` matches `checksums` (saved by `digest`), else what differs.

    Only the leaves of `tree` are compared: a partial restore checks the part it read.
    """
    _, sums = digest(tree)
    wrong = [k for k, v in sums.items() if k not in checksums or checksums[k] != v]
    return f"checksum mismatch after reading {len(wrong)} leaves, e.g. {wrong[:3]}" if wrong else None


def layout(tree) -> dict[str, list]:
    """{leaf path: [shape, dtype name]} of a tree of arrays or ShapeDtypeStructs (JSON-ready)."""
    return {
        jax.tree_util.keystr(p): [list(x.shape), str(x.dtype)] for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


def layout_diff(saved: dict[str, list], wanted: dict[str, list]) -> list[str]:
    """One line per leaf whose [shape, dtype] differs between two `layout`s, or that only one has."""
    # _MISSING marks a leaf one side lacks (it is printed as such, never compared as a value)
    pairs = [(k, saved.get(k, _MISSING), wanted.get(k, _MISSING)) for k in sorted(set(saved) | set(wanted))]
    return [f"{k}: saved={s} wanted={w}" for k, s, w in pairs if s != w]
