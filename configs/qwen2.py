"""HaF reward-model training on a Qwen2 backbone (0.5B, 1.5B, 7B).

Run (offline default: tiny random Qwen2-architecture model with q/k/v biases and a tied LM head,
on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/qwen2.py --workdir=runs/tiny-qwen2
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/qwen2.py:qwen2-1.5b --workdir=runs/q2 \
    --config.model.checkpoint=Qwen/Qwen2-1.5B --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
haf_jax/config/base.py.
"""

from haf_jax.config.base import family_config
from haf_jax.model import qwen2


def get_config(arg: str = "tiny-qwen2"):
    return family_config(arg, qwen2.PRESETS, "configs/qwen2.py", tiny="tiny-qwen2")
