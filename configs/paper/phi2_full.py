"""The paper's Phi-2 runs (docs/REPRODUCE.md): microsoft/phi-2, full fine-tune, lr 1e-5.

  python -m haf_jax.train --config=configs/paper/phi2_full.py:haf,helpful --workdir=runs/paper/phi2-haf-helpful

The argument after the colon is OBJECTIVE,DATASET: OBJECTIVE in haf|baseline|dpo, DATASET in
helpful|harmless|beavertails|alpaca|arena (each with the authors' eval split; haf_jax/config/paper.py).
Batch 16, 3200 steps, 512 tokens, eval every 80 steps, AdamW eps 1e-5 / wd 0 / clip 1.0, linear
decay without warmup, alpha 0.2, beta 0.1, the "Instruct: {x}\\nOutput:" template. Every command of
the paper's tables and every deviation from the authors' code: docs/REPRODUCE.md.
"""

from haf_jax.config.paper import paper_config


def get_config(arg: str | None = None):
    c = paper_config(
        arg,
        "configs/paper/phi2_full.py",
        preset="phi-2",
        checkpoint="microsoft/phi-2",
        template="phi2",
        learning_rate=1e-5,
    )
    c.model.lora.rank = 0  # full fine-tune: every weight is trained
    c.bon.n = 4  # Best-of-N candidates per prompt (the authors' Phi-2 runs: result_1..result_4)
    return c
