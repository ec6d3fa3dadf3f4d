"""The paper's Mistral-7B runs (docs/REPRODUCE.md): Mistral-7B v0.2 (the authors' `Mistral-7B-v02`) with LoRA, lr 3e-5.

  python -m haf_jax.train --config=configs/paper/mistral7b_lora.py:haf,beavertails --workdir=runs/paper/m7-haf-beaver

The argument after the colon is OBJECTIVE,DATASET: OBJECTIVE in haf|baseline|dpo, DATASET in
helpful|harmless|beavertails|alpaca|arena (each with the authors' eval split; haf_jax/config/paper.py).
LoRA r=64, alpha 16 on the MLP projections (gate/up/down) only; attention, embeddings and LM head
frozen; the reward head trained in full. Batch 16, 3200 steps, 512 tokens, eval every 80 steps,
AdamW eps 1e-5 / wd 0 / clip 1.0, linear decay without warmup, alpha 0.2, beta 0.1, the
"[INST] {x} [/INST]" template. The backbone is mistralai/Mistral-7B-Instruct-v0.2 (preset mistral-7b-v0.2:
32k vocabulary, rope base 1e6, no sliding window), the hub's v0.2 with the authors' shapes and template; the
base v0.2 weights (mistral-community/Mistral-7B-v0.2, same shapes) or v0.3 are one override away:
  --config.model.checkpoint=mistral-community/Mistral-7B-v0.2
  --config.model.preset=mistral-7b-v0.3 --config.model.checkpoint=mistralai/Mistral-7B-v0.3
Every command of the paper's tables and every deviation from the authors' code: docs/REPRODUCE.md.
"""

from haf_jax.config.paper import paper_config


def get_config(arg: str | None = None):
    c = paper_config(
        arg,
        "configs/paper/mistral7b_lora.py",
        preset="mistral-7b-v0.2",
        checkpoint="mistralai/Mistral-7B-Instruct-v0.2",  # the authors' /root/model/Mistral-7B-v02
        template="mistral",
        learning_rate=3e-5,
    )
    c.model.lora.rank = 64
    c.model.lora.alpha = 16.0  # adapters add (16 / 64) * A @ B
    c.model.lora.dropout = 0.0  # adapters are merged into the weights (docs/REPRODUCE.md: deviation)
    c.model.lora.targets = r"mlp\.(gate_proj|up_proj|down_proj)\.weight$"  # MLP projections only
    c.model.lora.train_lm_head = False
    c.model.lora.train_embeddings = False
    c.bon.n = 8  # Best-of-N candidates per prompt (the authors' Mistral runs: result_1..result_8)
    return c
