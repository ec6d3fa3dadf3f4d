"""What the two paper configs share: objectives, datasets with the authors' eval splits, and the
authors' training setup (docs/REPRODUCE.md) on top of the full-size base config.

configs/paper/phi2_full.py and configs/paper/mistral7b_lora.py call `paper_config` and add what
their model differs in:
  python -m haf_jax.train --config=configs/paper/phi2_full.py:haf,helpful --workdir=runs/paper/phi2-haf-helpful
"""

from __future__ import annotations

from ml_collections import ConfigDict

from haf_jax.config.base import base_config, full_size

OBJECTIVES = ("haf", "baseline", "dpo")

# DATASET -> data.train, data.eval ("" = the recipe's own first-N% rule on data.train) and
# data.eval_subsample. Sources are the recipes' hub datasets (haf_jax/data/formats.py RECIPES).
DATASETS = {
    # HH-RLHF single-turn dialogues; the authors evaluate on the test split.
    "helpful": (
        "recipe:hh_helpful:hf:Anthropic/hh-rlhf:data_dir=helpful-base:train",
        "recipe:hh_helpful:hf:Anthropic/hh-rlhf:data_dir=helpful-base:test",
        0,
    ),
    "harmless": (
        "recipe:hh_harmless:hf:Anthropic/hh-rlhf:data_dir=harmless-base:train",
        "recipe:hh_harmless:hf:Anthropic/hh-rlhf:data_dir=harmless-base:test",
        0,
    ),
    # PKU-SafeRLHF pairs with exactly one safe response; eval: 1000 of the test split's such pairs,
    # picked as datasets' shuffle(seed=0).select(range(1000)) (docs/REPRODUCE.md: the other reading).
    "beavertails": (
        "recipe:beavertails_safe:hf:PKU-Alignment/PKU-SafeRLHF:train",
        "recipe:beavertails_safe:hf:PKU-Alignment/PKU-SafeRLHF:test",
        1000,
    ),
    # One split each: the recipe's fixed rule makes the first 10% (AlpacaFarm) / 5% (Arena) eval.
    "alpaca": ("recipe:alpaca_human_pref:hf:tatsu-lab/alpaca_farm:alpaca_human_preference:preference", "", 0),
    "arena": ("recipe:chatbot_arena:hf:lmsys/chatbot_arena_conversations:train", "", 0),
}


def parse(arg: str | None, config_file: str) -> tuple[str, str]:
    """'OBJECTIVE,DATASET' -> (objective, dataset), or a ValueError listing the choices."""
    usage = (
        f"{config_file} takes OBJECTIVE,DATASET after the colon (e.g. {config_file}:haf,helpful) with "
        f"OBJECTIVE in {'|'.join(OBJECTIVES)} and DATASET in {'|'.join(DATASETS)}"
    )
    parts = [p.strip() for p in (arg or "").split(",")]
    if len(parts) != 2:
        raise ValueError(f"got {arg!r}; {usage}")
    objective, dataset = parts
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; {usage}")
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; {usage}")
    return objective, dataset


def paper_config(
    arg: str | None, config_file: str, *, preset: str, checkpoint: str, template: str, learning_rate: float
) -> ConfigDict:
    """The authors' setup for one (objective, dataset): docs/REPRODUCE.md, fidelity options at the authors'
    behaviour except where that behaviour is a bug (docs/REPRODUCE.md lists every deviation)."""
    objective, dataset = parse(arg, config_file)
    c = full_size(base_config())  # bf16 compute, f32 master weights, remat
    c.model.preset = preset
    c.model.checkpoint = checkpoint  # hub id (or a local copy of it)
    c.data.train, c.data.eval, c.data.eval_subsample = DATASETS[dataset]
    c.data.eval_subsample_seed = 0  # BeaverTails eval: shuffle(seed=0)
    c.data.template = template  # docs/REPRODUCE.md prompt template
    c.data.max_length = 512
    c.data.max_prompt_length = 128
    c.data.truncation = "trl"  # TRL 0.7: cut the prompt only when prompt + longer response > 512 (EOS still kept)
    c.data.degenerate = "keep"  # the authors keep empty/identical pairs (identical ones count as wrong)
    c.data.batching = "random"  # the authors' random sampler

    c.loss.objective = objective
    c.loss.alpha = 0.2
    c.loss.beta = 0.1
    c.loss.policy = "sigmoid"
    c.loss.simpo_gamma = 0.0  # the authors' SimPO (policy=simpo, not used here) has no gamma margin
    c.loss.dpo_scale_by_alpha = True  # the authors' DPO-only runs keep the 0.2 factor on L_P
    c.loss.reference = "precompute"  # same numbers as the authors' live reference, once

    c.optim.learning_rate = learning_rate
    c.optim.warmup_steps = 0
    c.optim.schedule = "linear"
    c.optim.eps = 1e-5
    c.optim.weight_decay = 0.0
    c.optim.clip_norm = 1.0

    c.train.steps = 3200
    c.train.batch_size = 16  # effective batch, pairs per optimizer step
    c.train.eval_every = 80  # best checkpoint by eval accuracy (the checkpoint policy keeps it)
    c.train.seed = 0
    return c
