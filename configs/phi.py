"""HaF reward-model training on a Phi backbone (phi-2; phi-1 and phi-1.5 from their checkpoints).

Run (offline default: tiny random Phi-architecture model, parallel block, partial rotary 0.4,
untied LM head with a bias, on the bundled HH-RLHF sample; a few minutes on a 2-core CPU):
  python -m haf_jax.train --config=configs/phi.py --workdir=runs/tiny-phi
A real backbone (preset name after the colon; weights from a local HF directory or a hub id) as in
the paper (docs/REPRODUCE.md, the authors' setup: Phi-2, full fine-tune, lr 1e-5, the
"Instruct: {x}\\nOutput:" template):
  python -m haf_jax.train --config=configs/phi.py:phi-2 --workdir=runs/phi2 \
    --config.model.checkpoint=microsoft/phi-2 --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value; every key and its comment is in
haf_jax/config/base.py.
"""

from haf_jax.config.base import family_config
from haf_jax.model import phi


def get_config(arg: str = "tiny-phi"):
    c = family_config(arg, phi.PRESETS, "configs/phi.py", tiny="tiny-phi")
    c.data.template = "none" if arg == "tiny-phi" else "phi2"  # prompt template (docs/REPRODUCE.md)
    return c
