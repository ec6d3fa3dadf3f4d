"""HaF reward-model training on a Gemma backbone (Gemma 1, 2, 3 text).

Run (offline default: tiny random Gemma-architecture model on the bundled HH-RLHF sample):
  python -m haf_jax.train --config=configs/gemma.py --workdir=runs/tiny
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/gemma.py:gemma2-2b --workdir=runs/g2 \
    --config.model.checkpoint=google/gemma-2-2b --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
haf_jax/config/base.py.
"""

from haf_jax.config.base import family_config
from haf_jax.model import gemma


def get_config(arg: str = "tiny"):
    return family_config(arg, gemma.PRESETS, "configs/gemma.py", tiny="tiny")
