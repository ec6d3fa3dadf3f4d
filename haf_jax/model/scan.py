"""Parameter layout of a scanned decoder stack (`ModelConfig.scan_layers`), and the conversion
between the per-layer and the stacked layout.

With P = config.layer_period and R = num_layers // P full periods, layer i < R * P lives in
`layers/block_{i % P}` at index i // P of a leading axis of size R (logical name "layers"):
Gemma 2's 46 layers become block_0 (sliding) and block_1 (full) of 23 each. The layers of an
incomplete last period (Gemma 3 27B: 62 = 10 x 6 + 2) keep their per-layer names `layers_<i>`,
as every layer has in the unrolled layout. Everything else (embedding, final norm, heads) is the
same in both layouts.

`stack` and `unstack` convert any dict nested like the parameters (the parameters, LoRA adapters,
an optimizer moment) and pass through what is already in the wanted layout, so `to_layout` can
be applied to a whole train state (restoring a checkpoint written in the other layout).
"""

from __future__ import annotations

import re

import jax
import numpy as np
from flax import traverse_util

from haf_jax.model.config import ModelConfig

STACK = "layers"  # the scanned stack's name in the parameter tree, and its logical axis name
_PER_LAYER = re.compile(r"layers_(\d+)$")


def periods(config: ModelConfig) -> tuple[int, int]:
    """(P, R): layers per period and the number of full periods the scan runs over."""
    p = config.layer_period
    return p, config.num_layers // p


def scanned_layers(config: ModelConfig) -> int:
    """How many layers (from layer 0) the scan covers; 0 when the layers are not scanned."""
    p, r = periods(config)
    return p * r if config.scan_layers else 0


def stacked_path(path: str, config: ModelConfig) -> tuple[str, int | None]:
    """'layers_5/mlp/up_proj' -> ('layers/block_1/mlp/up_proj', 2) for a scanned layer (P = 2);
    any other path -> (path, None)."""
    head, _, rest = path.partition("/")
    m = _PER_LAYER.match(head)
    if m is None or int(m.group(1)) >= scanned_layers(config):
        return path, None
    i, p = int(m.group(1)), config.layer_period
    return "/".join(x for x in (STACK, f"block_{i % p}", rest) if x), i // p


def layer_paths(path: str, config: ModelConfig) -> list[str]:
    """The per-layer paths a stacked path holds, in the order of its leading axis ([path] else)."""
    m = re.match(rf"{STACK}/block_(\d+)(/.*)?$", path)
    if m is None:
        return [path]
    p, r = periods(config)
    j, rest = int(m.group(1)), m.group(2) or ""
    return [f"layers_{k * p + j}{rest}" for k in range(r)]


def _is_param_dict(x) -> bool:
    return isinstance(x, dict) and any(k == STACK or _PER_LAYER.match(str(k)) for k in x)


def stack(tree: dict, config: ModelConfig, stack_fn=None) -> dict:
    """The scanned layout of a dict nested like the parameters (a no-op for layers already stacked).

    Every scanned layer must be present: a tree holding some layers of a period's stack but not
    all (e.g. LoRA on layer 3 only) has no scanned layout, and raises ValueError."""
    if not config.scan_layers:
        return tree
    stack_fn = stack_fn or _stack
    flat = traverse_util.flatten_dict(tree, sep="/")
    out, groups = {}, {}
    for path, value in flat.items():
        new, k = stacked_path(path, config)
        if k is None:
            out[path] = value
        else:
            groups.setdefault(new, {})[k] = value
    _, r = periods(config)
    for new, by_index in groups.items():
        if len(by_index) != r:
            missing = [p for p in layer_paths(new, config) if stacked_path(p, config)[1] not in by_index]
            raise ValueError(
                f"{new} stacks {r} layers, but {missing[:3]} are absent: a subset of the "
                f"scanned layers cannot be stacked (model.scan_layers=False lifts this)"
            )
        out[new] = stack_fn([by_index[k] for k in range(r)])
    return traverse_util.unflatten_dict(out, sep="/")


def unstack(tree: dict, config: ModelConfig) -> dict:
    """The per-layer layout (`layers_<i>` for every layer) of a dict nested like the parameters."""
    flat = traverse_util.flatten_dict(tree, sep="/")
    out = {}
    for path, value in flat.items():
        sources = layer_paths(path, config)
        if len(sources) == 1 and sources[0] == path:
            out[path] = value
            continue
        if value.shape[0] != len(sources):
            raise ValueError(f"{path} has {value.shape[0]} layers on its leading axis, the config {len(sources)}")
        for k, source in enumerate(sources):
            out[source] = value[k]
    return traverse_util.unflatten_dict(out, sep="/")


def to_layout(tree, config: ModelConfig):
    """Every parameter-like dict inside `tree` (e.g. a train state: params, Adam moments) in
    `config`'s layout: stacked when config.scan_layers, per layer otherwise."""
    convert = (lambda d: stack(d, config)) if config.scan_layers else (lambda d: unstack(d, config))
    return jax.tree.map(lambda x: convert(x) if _is_param_dict(x) else x, tree, is_leaf=_is_param_dict)


def _stack(values):
    if all(isinstance(v, np.ndarray) for v in values):
        return np.stack(values)
    import jax.numpy as jnp

    return jnp.stack(values)
