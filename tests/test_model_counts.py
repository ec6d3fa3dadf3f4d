"""Parameter counts of the real-size presets via jax.eval_shape (nothing is allocated)."""
import pytest

from haf_jax.model import heads
from haf_jax import params as params_lib
from haf_jax import sharding
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
