"""Reference log-probs of the frozen initial model, precomputed once and cached on disk.

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


def cached(key_parts: dict, compute_fn, *, cache_dir=None) -> tuple[np.ndarray, bool]:
    """Returns (array, hit): loads `<cache>/<hash(key_parts)>.npy` or computes and stores it."""
    cache_dir = paths.path(cache_dir or default_cache_dir())
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:40]
    path = cache_dir / f"{key}.npy"
    if path.exists():
        try:
            return _load(path), True
        except (ValueError, OSError):  # damaged cache file: recompute below
            pass
    array = compute_fn()
    if jax.process_index() == 0:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _save(path, array)
    return array, False


def _local_reference(local, ds) -> np.ndarray | None:
    """The workdir's reference array for `ds`, or None when absent, damaged or made for other data
    (data.eval may change on resume; a run killed while writing leaves a partial file)."""
    if local is None or not local.exists() or not local.with_suffix(".json").exists():
        return None
    try:
        meta = json.loads(local.with_suffix(".json").read_text())
        array = _load(local)
    except (ValueError, OSError):
        return None
    if not isinstance(meta, dict) or meta.get("data") != ds.fingerprint or array.shape != (len(ds), 2):
        return None
    return array


def for_run(s, params0, workdir, load_params0=None) -> dict[str, np.ndarray]:
    """Precomputed reference log-probs per split of the run built as `s` (haf_jax.training.setup.Setup): from
    the workdir, the global cache, or one pass.

    `params0` are the initial weights, or None with `load_params0()` to get them only when needed."""
    ref_fn, keys = forward.jit_reference(s.step_cfg, s.mesh, s.param_shardings)
    out = {}
    for name, ds in (("train", s.train_ds), ("eval", s.eval_ds)):
        local = workdir / f"reference_{name}.npy" if workdir is not None else None
        array = _local_reference(local, ds)
        if array is not None:
            out[name] = array
            continue
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
        array, hit = cached(
            key,
            functools.partial(
                compute,
                ds,
                params0,
                ref_fn,
                functools.partial(forward.put_batch, keys=keys, mesh=s.mesh),
                batch_size=s.config.train.eval_batch_size,
                desc=f"reference log-probs ({name})",
            ),
        )
        log(f"reference log-probs ({name}, {len(ds)} pairs): {'cache hit' if hit else 'computed'}")
        if local is not None and jax.process_index() == 0:
            _save(local, array)
            paths.write_text(local.with_suffix(".json"), json.dumps({"data": ds.fingerprint, "pairs": len(ds)}))
        out[name] = array
    return out
