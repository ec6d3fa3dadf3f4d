"""HaF reward-model training on a Phi backbone (phi-2; phi-1 and phi-1.5 from their checkpoints).

Run (offline default: tiny random Phi-architecture model, parallel block, partial rotary 0.4,
untied LM head with a bias, on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/phi.py --workdir=runs/tiny-phi
A real backbone (preset name after the colon; weights from a local HF directory or a hub id) as in
the paper (PAPER.md s5: Phi-2, full fine-tune, lr 1e-5, the "Instruct: {x}\\nOutput:" template):
  python -m haf_jax.train --config=configs/phi.py:phi-2 --workdir=runs/phi2 \
    --config.model.checkpoint=microsoft/phi-2 --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
configs/common.py.
"""
import importlib.util
import pathlib

# config_flags loads this file by path, outside any package: load its sibling common.py the same way.
_spec = importlib.util.spec_from_file_location("haf_jax_configs_common", pathlib.Path(__file__).with_name("common.py"))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

PRESETS = ("tiny-phi", "phi-2")


def get_config(arg: str = "tiny-phi"):
    common.check_preset(arg, PRESETS, "configs/phi.py")
    tiny = arg == "tiny-phi"
    c = common.base_config(arg, tiny=tiny)
    c.data.template = "none" if tiny else "phi2"  # prompt template: none | phi2 | mistral (PAPER.md s5)
    return c
