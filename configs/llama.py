"""HaF reward-model training on a Llama backbone (Llama 2, Llama 3, 3.1, 3.2).

Run (offline default: tiny random Llama-architecture model, llama3 rope scaling and an untied LM
head, on the bundled HH-RLHF sample; about 2.5 minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/llama.py --workdir=runs/tiny-llama
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/llama.py:llama3-8b --workdir=runs/l3 \
    --config.model.checkpoint=meta-llama/Meta-Llama-3-8B --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
configs/common.py.
"""
import importlib.util
import pathlib

# config_flags loads this file by path, outside any package: load its sibling common.py the same way.
_spec = importlib.util.spec_from_file_location("haf_jax_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

PRESETS = ("tiny-llama", "llama2-7b", "llama3-8b", "llama3.2-1b", "llama3.2-3b")


def get_config(arg: str = "tiny-llama"):
    common.check_preset(arg, PRESETS, "configs/llama.py")
    return common.base_config(arg, tiny=arg == "tiny-llama")
