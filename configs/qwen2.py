"""HaF reward-model training on a Qwen2 backbone (0.5B, 1.5B, 7B).

Run (offline default: tiny random Qwen2-architecture model with q/k/v biases and a tied LM head,
on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/qwen2.py --workdir=runs/tiny-qwen2
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/qwen2.py:qwen2-1.5b --workdir=runs/q2 \
    --config.model.checkpoint=Qwen/Qwen2-1.5B --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
configs/common.py.
"""
import importlib.util
import pathlib

# config_flags loads this file by path, outside any package: load its sibling common.py the same way.
_spec = importlib.util.spec_from_file_location("haf_jax_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

PRESETS = ("tiny-qwen2", "qwen2-0.5b", "qwen2-1.5b", "qwen2-7b")


def get_config(arg: str = "tiny-qwen2"):
    common.check_preset(arg, PRESETS, "configs/qwen2.py")
    return common.base_config(arg, tiny=arg == "tiny-qwen2")
