"""Parameter counts of the real-size presets via jax.eval_shape (nothing is allocated)."""

import math

import jax
import pytest

from haf_jax.core import params as params_lib, sharding
from haf_jax.model import heads
from haf_jax.model.families import PRESETS

SIGLIP = 0.417e9  # Gemma 3 4b/12b/27b published sizes include a ~417M-parameter SigLIP vision tower

PUBLISHED = {
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-1b": 999_885_952,  # text-only model
    # multimodal checkpoints: compare our text model to (published - vision tower)
    "gemma3-4b": 4.3e9 - SIGLIP,
    "gemma3-12b": 12.2e9 - SIGLIP,
    "gemma3-27b": 27.4e9 - SIGLIP,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    config = PRESETS[name]
    shapes, _ = heads.abstract_params(config)
    # Our tree also holds the D-parameter reward head, which the published LM sizes do not: exclude it.
    count = params_lib.param_count(shapes) - config.hidden_size
    assert shapes["reward_head"].shape == (config.hidden_size, 1)
    assert abs(count - PUBLISHED[name]) <= 0.01 * PUBLISHED[name], (name, count, PUBLISHED[name])
    if name in ("gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b", "gemma3-1b"):
        # exact published numbers (HF model.num_parameters()) are matched exactly
        assert count == PUBLISHED[name], (name, count)


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 8, 1), (1, 2, 4)])
def test_every_preset_places_on_every_mesh(shape):
    """Every parameter of every preset (biases and untied heads included) gets a sharding whose
    mesh axes divide its dimensions, from the one rules table (nothing allocated)."""
    mesh = sharding.make_mesh(shape)
    for name, config in PRESETS.items():
        shapes, _ = heads.abstract_params(config)
        placed = params_lib.param_shardings(config, mesh)
        for s, sh in zip(jax.tree.leaves(shapes), jax.tree.leaves(placed)):
            for dim, axes in zip(s.shape, sh.spec):
                axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
                assert dim % math.prod(mesh.shape[a] for a in axes) == 0, (name, s.shape, sh.spec)
        # the big matrices really are split (FSDP on embed)
        assert len(placed["embed_tokens"].spec) == 2 and placed["embed_tokens"].spec != jax.sharding.PartitionSpec()
