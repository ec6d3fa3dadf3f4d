"""HaF reward-model training on a Gemma backbone (Gemma 1, 2, 3 text).

Run (offline default: tiny random Gemma-architecture model on the bundled HH-RLHF sample):
  python -m haf_jax.train --config=configs/gemma.py --workdir=runs/tiny
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/gemma.py:gemma2-2b --workdir=runs/g2 \
    --config.model.checkpoint=google/gemma-2-2b --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
configs/common.py.
"""
import importlib.util
import pathlib

# config_flags loads this file by path, outside any package: load its sibling common.py the same way.
_spec = importlib.util.spec_from_file_location("haf_jax_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

PRESETS = ("tiny", "gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b",
           "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b")


def get_config(arg: str = "tiny"):
    common.check_preset(arg, PRESETS, "configs/gemma.py")
    return common.base_config(arg, tiny=arg == "tiny")
