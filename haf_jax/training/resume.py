"""The run configuration as checkpoints record it, and when a checkpoint may be resumed under a config.

A checkpoint stores `config_dict(config)` plus, for LoRA runs, the fingerprint of the frozen base
weights. Resuming compares that with the current config (`check_resumable`): differences that
change the trained state (model, objective, loss weights, data, seed, batch size, optimizer,
train.steps through the LR schedule, keys that appeared or disappeared) refuse the resume;
differences in eval/log cadence, checkpoint options and the eval data are reported and accepted.
A checkpoint written before a key existed is compared as if it had the key's default
(haf_jax/config/base.py ADDED_LATER), so adding a key never breaks a resume.
"""

from __future__ import annotations

import json

from haf_jax.checkpoint.manager import Checkpointer
from haf_jax.config.base import with_added_defaults
from haf_jax.core import paths
from haf_jax.core.logs import log


class RunError(RuntimeError):
    """A run that must stop with a clear message (no traceback)."""


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


# Keys (haf_jax/config/base.py) that never change the trained state.
HARMLESS_PREFIXES = (
    "train.eval_every",
    "train.log_every",
    "train.profile_steps",
    "checkpoint.",
    "data.eval",
    "model.scan_layers",
    "model.remat_policy",
)  # a resume converts the layout; same numbers
_MISSING = "<missing>"


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out if out or not prefix else {prefix[:-1]: {}}
    return {prefix[:-1]: d}


def _matches(key: str, prefix: str) -> bool:
    if prefix.endswith("."):
        return key.startswith(prefix)
    return key == prefix or key.startswith(prefix + ".")


def compare_configs(saved: dict, current: dict, *, harmless_prefixes=HARMLESS_PREFIXES) -> tuple[list[str], list[str]]:
    """Differences between a checkpoint's config and the current one, as (breaking, harmless).

    Nested dicts are flattened to dotted keys and compared after a JSON round trip (so a tuple
    equals a list).  Each difference reads "key: saved=X current=Y" (`<missing>` for a key on one
    side only).  A key is harmless when it equals one of `harmless_prefixes` or lies under it
    ("a.b" covers "a.b" and "a.b.*"; "a." covers "a.*"); everything else is breaking.
    """
    a = _flatten(json.loads(json.dumps(saved)))
    b = _flatten(json.loads(json.dumps(current)))
    breaking, harmless = [], []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key, _MISSING), b.get(key, _MISSING)
        if x == y:
            continue
        line = f"{key}: saved={x!r} current={y!r}"
        (harmless if any(_matches(key, p) for p in harmless_prefixes) else breaking).append(line)
    return breaking, harmless


def check_resumable(saved: dict, config, base: dict, workdir, *, scan_layers: bool) -> list[str]:
    """The harmless differences between a checkpoint's config `saved` and `config` (+ `base`, the
    LoRA base-weights fingerprint; `scan_layers` the run's parameter layout); raises RunError when
    the checkpoint belongs to another run."""
    saved = with_added_defaults(saved)
    saved_scan = bool(saved["model"]["scan_layers"])
    if saved.get("base_weights") != base.get("base_weights") and saved_scan != scan_layers:
        # the base's fingerprint covers its layout: adapters are converted, the frozen base is not
        raise RunError(
            f"{workdir} holds LoRA adapters of a run with model.scan_layers={saved_scan}: resume "
            f"it with --config.model.scan_layers={saved_scan}"
        )
    if saved.get("base_weights") != base.get("base_weights"):
        raise RunError(
            f"{workdir} holds LoRA adapters trained on other base weights (fingerprint "
            f"{saved.get('base_weights')}; model.checkpoint={config.model.checkpoint!r} gives "
            f"{base.get('base_weights')}): resume with the base they were trained on, or use a new --workdir"
        )
    breaking, harmless = compare_configs(saved, {**config_dict(config), **base})
    was_eval = saved["data"]["eval"]
    if bool(was_eval) != bool(config.data.eval):  # "" carves the eval split out of data.train
        harmless = [line for line in harmless if not line.startswith("data.eval:")]
        breaking.append(
            f"data.eval: saved={was_eval!r} current={config.data.eval!r} (an empty data.eval takes "
            f"the eval split out of data.train, so this changes the training data)"
        )
    if breaking:
        raise RunError(
            f"{workdir} holds a checkpoint from a different run configuration:\n  "
            + "\n  ".join(breaking)
            + "\nuse a new --workdir or restore the old settings"
        )
    return harmless


def keep_old_split_seed(config, workdir) -> None:
    """Sets `config.data.split_seed` to the run's `train.seed` when `workdir` holds a run written
    before data.split_seed existed: it carved its eval split with train.seed, and resuming it must
    train and evaluate on the same pairs (a new run, or one that records the key, is left alone)."""
    directory = paths.path(workdir) / "checkpoints"
    if not directory.is_dir():
        return
    with Checkpointer(directory, every_steps=0, read_only=True) as ckpt:
        if ckpt.latest_step() is None:
            return
        saved = ckpt.read_config()
    if "split_seed" in saved.get("data", {}):
        return
    seed = with_added_defaults(saved)["data"]["split_seed"]
    if seed != config.data.split_seed:
        log(f"{workdir} was written before data.split_seed: its eval carve keeps train.seed, split_seed={seed}")
        config.data.split_seed = seed
