"""Parameter counts of the real-size Gemma presets via jax.eval_shape (nothing is allocated), exactly,
and against transformers' models on the meta device (the other families: test_model_families.py)."""

import dataclasses
import math

import jax
import pytest

from haf_jax.core import params as params_lib, sharding
from haf_jax.model import families, heads
from haf_jax.model.families import PRESETS

PUBLISHED = {  # HF model.num_parameters() of the language model (no reward head)
    "gemma-2b": 2_506_172_416,
    "gemma-7b": 8_537_680_896,
    "gemma2-2b": 2_614_341_888,
    "gemma2-9b": 9_241_705_984,
    "gemma2-27b": 27_227_128_320,
    "gemma3-1b": 999_885_952,  # text-only model
    # Gemma 3 4b/12b/27b are published as multimodal checkpoints (4.3e9 / 12.2e9 / 27.4e9 with a ~0.42e9
    # SigLIP vision tower and projector); haf_jax builds their text model, Gemma3ForCausalLM: these are
    # transformers' counts of that model (below, on the meta device)
    "gemma3-4b": 3_880_263_168,
    "gemma3-12b": 11_766_034_176,
    "gemma3-27b": 27_009_346_304,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_count(name):
    config = PRESETS[name]
    shapes, _ = heads.abstract_params(config)
    # Our tree also holds the D-parameter reward head, which the published LM sizes do not: exclude it.
    assert shapes["reward_head"].shape == (config.hidden_size, 1)
    assert params_lib.param_count(shapes) - config.hidden_size == PUBLISHED[name], name
    # independently: transformers builds the same architecture from our exported config on the meta
    # device (nothing allocated), and our config survives the trip through transformers' config class
    torch = pytest.importorskip("torch")
    import transformers

    hf_config = transformers.AutoConfig.for_model(**families.to_hf(config))
    assert families.from_hf(hf_config.to_dict()) == dataclasses.replace(config, scan_layers=False)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert model.num_parameters() == PUBLISHED[name], (name, model.num_parameters())


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
