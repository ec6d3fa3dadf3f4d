"""Every configs/<family>.py loads through config_flags as haf_jax.train loads it (by path, from a
directory where configs/ is not importable): common.py beside it, a tiny offline default preset (the
bundled tokenizer's vocabulary), the family module's presets. (Was in tests/test_e2e_families.py.)"""
from __future__ import annotations

import importlib.util

import pytest
from helpers.runs import REPO
from helpers.runs import load_config as _load_config_as_train_does

CONFIGS = {"llama": "configs/llama.py", "mistral": "configs/mistral.py", "qwen2": "configs/qwen2.py",
           "phi": "configs/phi.py", "gemma": "configs/gemma.py"}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_configs_load_by_path(family, tmp_path, monkeypatch):
    """Every family config loads common.py beside it from any working directory; its default is a
    tiny offline preset (bundled tokenizer's vocabulary), its presets are the family module's."""
    from absl import flags

    from haf_jax.model import families

    monkeypatch.chdir(tmp_path)  # not the repo: configs/ is not importable from here
    path = REPO / CONFIGS[family]
    spec = importlib.util.spec_from_file_location(f"cfg_{family}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module_presets = families.FAMILIES[family].PRESETS
    assert set(module.PRESETS) == set(module_presets), (family, module.PRESETS, sorted(module_presets))
    default = _load_config_as_train_does(path)
    tiny = families.preset(default.model.preset)
    assert default.model.preset.startswith("tiny") and default.model.checkpoint == ""
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers) == (2048, 64, 2)
    assert default.data.train == "" and default.model.compute_dtype == "float32" and default.train.steps == 150
    for name in module.PRESETS:
        c = _load_config_as_train_does(f"{path}:{name}")
        assert c.model.preset == name and families.preset(name).family.startswith(family)
        assert c.to_dict().keys() == default.to_dict().keys()
    with pytest.raises(flags.IllegalFlagValueError, match=f"unknown preset 'nope' for {CONFIGS[family]}"):
        _load_config_as_train_does(f"{path}:nope")
