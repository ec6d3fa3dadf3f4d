"""HaF reward-model training on a Llama backbone (Llama 2, Llama 3, 3.1, 3.2).

Run (offline default: tiny random Llama-architecture model, llama3 rope scaling and an untied LM
head, on the bundled HH-RLHF sample; about 2.5 minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/llama.py --workdir=runs/tiny-llama
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/llama.py:llama3-8b --workdir=runs/l3 \
    --config.model.checkpoint=meta-llama/Meta-Llama-3-8B --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
haf_jax/config/base.py.
"""

from haf_jax.config.base import family_config
from haf_jax.model import llama


def get_config(arg: str = "tiny-llama"):
    return family_config(arg, llama.PRESETS, "configs/llama.py", tiny="tiny-llama")
