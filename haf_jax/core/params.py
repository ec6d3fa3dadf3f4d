"""Model parameters placed on a device mesh: shardings from the logical names, sharded random init,
counts. (The model layer only names axes; the mesh lives here and in sharding.py.)"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from haf_jax.core import sharding
from haf_jax.model import heads, lora as lora_lib, scan
from haf_jax.model.config import ModelConfig
from haf_jax.model.lora import LoraConfig


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding for every parameter of `config`'s model on `mesh`."""
    return sharding.named_shardings(*heads.abstract_params(config), mesh)


def abstract_params(config: ModelConfig, mesh: Mesh):
    """ShapeDtypeStructs of the parameters carrying their shardings on `mesh`."""
    shapes, _ = heads.abstract_params(config)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, param_shardings(config, mesh)
    )


def trainable_shardings(config: ModelConfig, lora: LoraConfig, mesh: Mesh):
    """Shardings of what the optimizer trains: every parameter, or LoRA's adapters + heads."""
    if not lora.enabled:
        return param_shardings(config, mesh)
    return sharding.named_shardings(*lora_lib.abstract_trainable(config, lora), mesh)


def abstract_trainable(config: ModelConfig, lora: LoraConfig, mesh: Mesh):
    if not lora.enabled:
        return abstract_params(config, mesh)
    shapes, _ = lora_lib.abstract_trainable(config, lora)
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        shapes,
        trainable_shardings(config, lora, mesh),
    )


def frozen_shardings(config: ModelConfig, lora: LoraConfig, mesh: Mesh):
    """Shardings of LoRA's frozen base (all parameters but the trained heads); None without LoRA."""
    if not lora.enabled:
        return None
    heads_trained = lora_lib.trainable_heads(config, lora)
    return {k: v for k, v in param_shardings(config, mesh).items() if k not in heads_trained}


def init_params(config: ModelConfig, rng, mesh: Mesh):
    """Random init, jitted with out_shardings so no parameter is ever materialised unsharded."""
    init = jax.jit(functools.partial(heads.init_params, config), out_shardings=param_shardings(config, mesh))
    return init(rng)


def param_count(tree) -> int:
    """Number of parameters (elements) in a tree of arrays or abstract shapes."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def relayout(tree, config: ModelConfig, abstract):
    """`tree` (parameters, or a train state holding parameter-like trees) in `config`'s layer
    layout (scanned or per layer, model/scan.py), placed as the ShapeDtypeStructs of `abstract` say."""
    converted = scan.to_layout(tree, config)
    return jax.jit(lambda x: x, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))(converted)


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
