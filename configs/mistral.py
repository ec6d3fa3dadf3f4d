"""HaF reward-model training on a Mistral backbone (7B v0.1 with its sliding window, 7B v0.2, 7B v0.3).

Run (offline default: tiny random Mistral-architecture model with a 64-token sliding window on
every layer, on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/mistral.py --workdir=runs/tiny-mistral
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/mistral.py:mistral-7b-v0.3 --workdir=runs/m7 \
    --config.model.checkpoint=mistralai/Mistral-7B-v0.3 --config.data.train=prefs.jsonl
The real presets use the paper's Mistral prompt template ("[INST] {x} [/INST]") and train all
weights at lr 1e-5 (the paper's full fine-tune setting; its Mistral runs used LoRA at lr 3e-5).
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
haf_jax/config/base.py.
"""

from haf_jax.config.base import family_config
from haf_jax.model import mistral


def get_config(arg: str = "tiny-mistral"):
    c = family_config(arg, mistral.PRESETS, "configs/mistral.py", tiny="tiny-mistral")
    c.data.template = "none" if arg == "tiny-mistral" else "mistral"  # prompt template (docs/REPRODUCE.md)
    return c
