"""Reference log-probs of the frozen initial model, precomputed once and cached on disk.

Only the pairs a run visits are computed (`for_run`): a NaN row is a pair not computed yet.
Two layers: the run's own copy (`WORKDIR/reference_{train,eval}.npy` + a .json naming the data it
was made for, so a resumed run never needs the initial weights again), and a global cache keyed
by a fingerprint of (initial weights, tokenised data, model architecture and compute settings),
so a second run on the same data and weights skips the pass. The arrays are plain .npy files
(read with allow_pickle=False), indexed by the dataset's pair index; both may live on gs://.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os

import jax
import numpy as np

from haf_jax.core import forward, params as params_lib, paths
from haf_jax.core.logs import log
from haf_jax.evaluation.evaluator import compute
from haf_jax.training.resume import RunError


def default_cache_dir():
    root = os.environ.get("HAF_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "haf_jax")
    return paths.path(root) / "reference"


def _load(path) -> np.ndarray:
    with path.open("rb") as f:
        return np.load(f, allow_pickle=False)


def _save(path, array: np.ndarray) -> None:
    """Atomic: a kill never leaves half a file."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    paths.write_bytes(path, buf.getvalue())


def _cache_path(key_parts: dict, cache_dir):
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:40]
    return paths.path(cache_dir or default_cache_dir()) / f"{key}.npy"


def _read(path, shape) -> np.ndarray | None:
    """The array at `path` when it reads back with `shape`; None when absent or damaged."""
    if path is None or not path.exists():
        return None
    try:
        array = _load(path)
    except (ValueError, OSError):  # damaged: recomputed
        return None
    return array if array.shape == shape else None


def cached(key_parts: dict, compute_fn, needed: np.ndarray, n: int, *, known=None, cache_dir=None):
    """Rows `needed` (int64 [K]) of the [n, 2] array cached under `hash(key_parts)`: the rows the
    cache (or `known`, an [n, 2] array with NaN rows) lacks are computed by `compute_fn(indices=...)` ->
    [n, 2] (NaN elsewhere) and the cache is extended with them. Returns (array [n, 2], NaN where
    nothing was computed, and how many rows were computed now)."""
    path = _cache_path(key_parts, cache_dir)
    array = _read(path, (n, 2))
    array = np.full((n, 2), np.nan, np.float32) if array is None else array
    if known is not None:
        array = np.where(np.isnan(array), known, array)
    missing = needed[np.isnan(array[needed]).any(axis=1)]
    if len(missing) and jax.process_count() > 1:
        # Several processes compute the whole split, in the full pass's process layout: a partial pass
        # (data.batching.subset_batches) deals a batch's pairs to processes by index, which can hand one
        # process more than its share, and the processes must run the same batches (collectives).
        missing = np.arange(n)
    if len(missing):
        fresh = compute_fn(indices=None if len(missing) == n else missing)
        array[missing] = fresh[missing]
        if jax.process_index() == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            _save(path, array)
    return array, len(missing)


def lookup(array_Nx2: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows `index` (int64 [B] or a packed batch's [R, S]) of a reference array -> float32 [..., 2]; a
    filler slot (index -1) gets 0, not the last row: that row may be a pair not computed (NaN), and a
    masked-out NaN would still poison the loss (0 * NaN)."""
    return np.where((index >= 0)[..., None], array_Nx2[np.maximum(index, 0)], 0.0).astype(np.float32)


def _partial(local) -> bool:
    """Whether the workdir array `local` may hold pairs not computed (NaN rows): those this code writes
    say so; older ones (and a test's injected faults) hold a value in every row, NaN ones included."""
    try:
        return bool(json.loads(local.with_suffix(".json").read_text()).get("partial"))
    except (ValueError, OSError, AttributeError):
        return False


def _local_reference(local, ds) -> np.ndarray | None:
    """The workdir's reference array for `ds` (NaN rows: pairs not computed), or None when absent,
    damaged or made for other data (data.eval may change on resume; a kill can leave a partial file)."""
    if local is None or not local.exists() or not local.with_suffix(".json").exists():
        return None
    try:
        meta = json.loads(local.with_suffix(".json").read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(meta, dict) or meta.get("data") != ds.fingerprint:
        return None
    return _read(local, (len(ds), 2))


def for_run(s, params0, workdir, load_params0=None, *, train_pairs=None, steps=None) -> dict[str, np.ndarray]:
    """Precomputed reference log-probs per split of the run built as `s` (haf_jax.training.setup.Setup): from
    the workdir, the global cache, or a pass over what is missing.

    The eval split is computed whole; the train split only for `train_pairs` (int64 [K], the pairs the
    run's steps visit: `PairLoader.pairs_of_steps`; None = all), so a short run on a large split pays
    for what it trains on, and a resumed or longer run extends the arrays (rows not computed are NaN).
    `steps` (first, last) only words the log line. `params0` are the initial weights, or None with
    `load_params0()` to get them only when needed."""
    ref_fn, keys = forward.jit_reference(s.step_cfg, s.mesh, s.param_shardings)
    out = {}
    for name, ds in (("train", s.train_ds), ("eval", s.eval_ds)):
        local = workdir / f"reference_{name}.npy" if workdir is not None else None
        needed = np.arange(len(ds)) if name == "eval" or train_pairs is None else np.asarray(train_pairs, np.int64)
        array = _local_reference(local, ds)
        if array is not None and not (_partial(local) and np.isnan(array[needed]).any()):
            out[name] = array
            continue
        array = array if array is not None and _partial(local) else None  # a complete one would have done
        if params0 is None and load_params0 is not None:
            params0 = load_params0()
        if params0 is None:
            raise RunError(f"{local} is missing and the initial weights are not available to recompute it")
        key = {
            "weights": params_lib.params_fingerprint(params0),
            "data": ds.fingerprint,
            "model": dataclasses.asdict(s.model_config),
            "dtype": str(s.step_cfg.compute_dtype),
            "chunk": s.step_cfg.logprob_chunk,
            "mesh": dict(s.mesh.shape),
        }
        compute_fn = functools.partial(
            compute,
            ds,
            params0,
            ref_fn,
            functools.partial(forward.put_batch, keys=keys, mesh=s.mesh),
            batch_size=s.config.train.eval_batch_size,
            desc=f"reference log-probs ({name})",
        )
        array, computed = cached(key, compute_fn, needed, len(ds), known=array)
        which = (
            f"the {len(needed)} of {len(ds)} pairs steps {steps[0]}-{steps[1]} visit"
            if name == "train" and train_pairs is not None and steps is not None
            else f"{len(needed)} of {len(ds)} pairs"
        )
        log(f"reference log-probs ({name}, {which}): {computed} computed, {len(needed) - computed} cached")
        if local is not None and jax.process_index() == 0:
            _save(local, array)
            covered = int((~np.isnan(array).any(axis=1)).sum())
            meta = {"data": ds.fingerprint, "pairs": len(ds), "computed": covered, "partial": True}
            paths.write_text(local.with_suffix(".json"), json.dumps(meta))
        out[name] = array
    return out
