"""Reference log-probs of the frozen initial model, precomputed once and cached on disk.

The cache key is a fingerprint of (initial weights, tokenised data, model architecture and
compute settings), so a second run on the same data and weights skips the pass. The arrays are
plain .npy files (read with allow_pickle=False), indexed by the dataset's pair index.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils


def default_cache_dir() -> pathlib.Path:
    root = os.environ.get("HAF_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "haf_jax")
    return pathlib.Path(root) / "reference"


def params_fingerprint(params) -> str:
    """Hash of every parameter's path, shape, dtype and two position-weighted checksums.

    Computed on device (one reduction per leaf), so it is cheap even for sharded 27B weights,
    and any change to any weight changes it with overwhelming probability.
    """
    leaves = jax.tree_util.tree_leaves_with_path(params)

    @jax.jit
    def sums(tree):
        def one(x):
            x = x.astype(jnp.float32).ravel()
            ramp = jnp.cos(jnp.arange(x.size, dtype=jnp.float32) * 0.7071)
            return jnp.stack([jnp.sum(x), jnp.sum(x * ramp)])
        return jax.tree.map(one, tree)

    values = jax.device_get(sums(params))
    h = hashlib.sha256()
    for (path, leaf), (_, v) in zip(leaves, jax.tree_util.tree_leaves_with_path(values)):
        h.update(f"{jax.tree_util.keystr(path)}{leaf.shape}{leaf.dtype}".encode())
        h.update(np.asarray(v, np.float32).tobytes())
    return h.hexdigest()[:32]


def pair_pass(dataset, fn, put_batch, *, batch_size: int, desc: str) -> dict[str, np.ndarray]:
    """One in-order pass of `dataset`: fn(device batch) -> {name: [B, 2]} gives {name: float32 [N, 2]}.

    Rows land by the dataset's pair index (filler pairs dropped), also when each host holds only
    its slice of every batch. Used for the reference pass and by haf_jax.score.
    """
    from tqdm import tqdm

    out: dict[str, np.ndarray] = {}
    n_batches = -(-len(dataset) // batch_size)
    bar = tqdm(dataset.batches(batch_size), total=n_batches, desc=desc, unit="batch",
               disable=jax.process_index() != 0, leave=False)
    for batch in bar:
        values = jax.device_get(fn(put_batch(batch)))
        index, valid = batch["index"], batch["valid"]
        if jax.process_count() > 1:  # each host holds its slice of the indices
            index = multihost_utils.process_allgather(index, tiled=True)
            valid = multihost_utils.process_allgather(valid, tiled=True)
        for name, value in values.items():
            column = out.setdefault(name, np.full((len(dataset), 2), np.nan, np.float32))
            column[index[valid]] = np.asarray(value)[valid]
    for name, column in out.items():
        if np.isnan(column).any():
            raise RuntimeError(f"{desc}: {int(np.isnan(column).any(axis=1).sum())} pairs got no {name}")
    return out


def compute(dataset, params, ref_fn, put_batch, *, batch_size: int, desc: str = "reference") -> np.ndarray:
    """Reference log-probs of `params` for every pair of `dataset` -> float32 [len(dataset), 2]."""
    return pair_pass(dataset, lambda b: {"logp": ref_fn(params, b)}, put_batch, batch_size=batch_size,
                     desc=desc)["logp"]


def cached(key_parts: dict, compute_fn, *, cache_dir: pathlib.Path | None = None) -> tuple[np.ndarray, bool]:
    """Returns (array, hit): loads `<cache>/<hash(key_parts)>.npy` or computes and stores it."""
    cache_dir = pathlib.Path(cache_dir or default_cache_dir())
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:40]
    path = cache_dir / f"{key}.npy"
    if path.exists():
        try:
            return np.load(path, allow_pickle=False), True
        except (ValueError, OSError):  # damaged cache file: recompute below
            pass
    array = compute_fn()
    if jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, array, allow_pickle=False)
        os.replace(tmp, path)
    return array, False
