"""HaF reward-model training on a Mistral backbone (7B v0.1 with its sliding window, 7B v0.3).

Run (offline default: tiny random Mistral-architecture model with a 64-token sliding window on
every layer, on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/mistral.py --workdir=runs/tiny-mistral
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/mistral.py:mistral-7b-v0.3 --workdir=runs/m7 \
    --config.model.checkpoint=mistralai/Mistral-7B-v0.3 --config.data.train=prefs.jsonl
The real presets use the paper's Mistral prompt template ("[INST] {x} [/INST]") and train all
weights at lr 1e-5 (the paper's full fine-tune setting; its Mistral runs used LoRA at lr 3e-5).
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
configs/common.py.
"""
import importlib.util
import pathlib

# config_flags loads this file by path, outside any package: load its sibling common.py the same way.
_spec = importlib.util.spec_from_file_location("haf_jax_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

PRESETS = ("tiny-mistral", "mistral-7b", "mistral-7b-v0.3")


def get_config(arg: str = "tiny-mistral"):
    common.check_preset(arg, PRESETS, "configs/mistral.py")
    tiny = arg == "tiny-mistral"
    c = common.base_config(arg, tiny=tiny)
    c.data.template = "none" if tiny else "mistral"  # prompt template: none | phi2 | mistral (PAPER.md s5)
    return c
