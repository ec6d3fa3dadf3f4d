"""Every configs/<family>.py loads through config_flags as haf_jax.train loads it (by path, from a
directory where configs/ is not importable: it imports haf_jax.config, no path tricks): a tiny offline
default preset (the bundled tokenizer's vocabulary), exactly the family module's presets. (Was in
tests/test_e2e_families.py.)"""

from __future__ import annotations

import pytest

CONFIGS = {
    "llama": "configs/llama.py",
    "mistral": "configs/mistral.py",
    "qwen2": "configs/qwen2.py",
    "phi": "configs/phi.py",
    "gemma": "configs/gemma.py",
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_family_configs_load_by_path(family, tmp_path, monkeypatch, load_config):
    """Every family config loads from any working directory; its default is a tiny offline preset
    (bundled tokenizer's vocabulary), its presets are exactly the family module's: each of them
    loads, another family's is refused."""
    from absl import flags

    from haf_jax.model import families

    monkeypatch.chdir(tmp_path)  # not the repo: configs/ is not importable from here
    module_presets = families.FAMILIES[family].PRESETS
    default = load_config(CONFIGS[family])
    tiny = families.preset(default.model.preset)
    assert default.model.preset.startswith("tiny") and default.model.checkpoint == ""
    assert (tiny.vocab_size, tiny.hidden_size, tiny.num_layers) == (2048, 64, 2)
    assert default.data.train == "" and default.model.compute_dtype == "float32" and default.train.steps == 150
    for name in module_presets:
        c = load_config(f"{CONFIGS[family]}:{name}")
        assert c.model.preset == name and families.preset(name).family.startswith(family)
        assert c.to_dict().keys() == default.to_dict().keys()
    foreign = "tiny-phi" if family != "phi" else "tiny"
    for name in ("nope", foreign):
        with pytest.raises(flags.IllegalFlagValueError, match=f"unknown preset '{name}' for {CONFIGS[family]}"):
            load_config(f"{CONFIGS[family]}:{name}")
