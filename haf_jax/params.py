"""Model parameters placed on a device mesh: shardings from the logical names, sharded random init,
counts. (The model layer only names axes; the mesh lives here and in sharding.py.)"""
from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import Mesh

from haf_jax import sharding
from haf_jax.model import heads
from haf_jax.model.config import ModelConfig


def param_shardings(config: ModelConfig, mesh: Mesh):
    """NamedSharding for every parameter of `config`'s model on `mesh`."""
    return sharding.named_shardings(*heads.abstract_params(config), mesh)


def abstract_params(config: ModelConfig, mesh: Mesh):
    """ShapeDtypeStructs of the parameters carrying their shardings on `mesh`."""
    shapes, _ = heads.abstract_params(config)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                        param_shardings(config, mesh))


def init_params(config: ModelConfig, rng, mesh: Mesh):
    """Random init, jitted with out_shardings so no parameter is ever materialised unsharded."""
    init = jax.jit(functools.partial(heads.init_params, config), out_shardings=param_shardings(config, mesh))
    return init(rng)


def param_count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
