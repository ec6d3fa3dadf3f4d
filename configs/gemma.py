"""HaF reward-model training on a Gemma backbone.

Run (offline default: tiny random Gemma-architecture model on the bundled HH-RLHF sample):
  python -m haf_jax.train --config=configs/gemma.py --workdir=runs/tiny
A real backbone (preset name after the colon; weights from a local HF directory or a hub id):
  python -m haf_jax.train --config=configs/gemma.py:gemma2-2b --workdir=runs/g2 \
    --config.model.checkpoint=google/gemma-2-2b --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value.
"""
from ml_collections import ConfigDict

PRESETS = ("tiny", "gemma-2b", "gemma-7b", "gemma2-2b", "gemma2-9b", "gemma2-27b",
           "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b")


def get_config(arg: str = "tiny") -> ConfigDict:
    if arg not in PRESETS:
        raise ValueError(f"unknown preset {arg!r} for configs/gemma.py; choose one of {PRESETS}")
    tiny = arg == "tiny"
    c = ConfigDict()

    c.model = ConfigDict()
    c.model.preset = arg  # architecture when starting from random weights (ignored with a checkpoint)
    c.model.checkpoint = ""  # HF directory or hub id to start from; "" = random init of the preset
    c.model.tokenizer = ""  # tokenizer dir or hub id; "" = the checkpoint's own, or the bundled one
    c.model.compute_dtype = "float32" if tiny else "bfloat16"  # master weights always stay float32
    c.model.remat = not tiny  # rematerialise each block in the backward pass (saves activations)
    c.model.logprob_chunk = 128  # positions per chunk of the LM-head log-prob computation

    c.data = ConfigDict()
    c.data.train = ""  # file path or dataset spec (see haf_jax.data); "" = bundled HH-RLHF sample
    c.data.eval = ""  # same; "" = carve data.eval_fraction out of data.train deterministically
    c.data.eval_fraction = 0.1 if tiny else 0.05  # used only when data.eval is ""
    c.data.template = "none"  # prompt template: none | phi2 | mistral
    c.data.max_length = 256 if tiny else 512  # prompt + response tokens (PAPER.md s5: 512)
    c.data.max_prompt_length = 128  # the prompt keeps its END when cut
    c.data.max_skip_fraction = 0.1  # refuse to start when more rows than this would be skipped

    c.loss = ConfigDict()
    c.loss.objective = "haf"  # haf | baseline | dpo
    c.loss.alpha = 0.2  # weight of the policy loss in haf
    c.loss.beta = 0.1  # DPO temperature (the paper's tau)
    c.loss.policy = "sigmoid"  # sigmoid (DPO) | hinge | ipo | simpo
    c.loss.margin = 0.0  # Bradley-Terry margin
    c.loss.centering = 0.0  # reward-centring coefficient
    c.loss.label_smoothing = 0.0  # conservative-DPO smoothing for sigmoid/simpo
    c.loss.simpo_gamma = 0.5  # SimPO target margin (policy=simpo only)
    c.loss.reference = "precompute"  # precompute (once, cached on disk) | live (frozen copy every step)

    c.optim = ConfigDict()
    c.optim.learning_rate = 1e-3 if tiny else 1e-5  # paper: 1e-5 full fine-tune
    c.optim.warmup_steps = 0  # linear warmup steps (paper: none)
    c.optim.schedule = "linear"  # linear (decay to 0) | cosine | constant
    c.optim.eps = 1e-5  # AdamW epsilon (paper: 1e-5)
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (paper: 0)
    c.optim.clip_norm = 1.0  # global gradient-norm clip (paper: 1.0)
    c.optim.grad_accum = 1  # micro-batches per step (train.batch_size must divide evenly)

    c.train = ConfigDict()
    c.train.steps = 150 if tiny else 3200  # optimizer steps
    c.train.batch_size = 16  # pairs per step, global (paper: 16)
    c.train.eval_every = 50 if tiny else 80  # steps between evals (also evaluated at the end)
    c.train.eval_batch_size = 32  # pairs per eval/reference batch, global
    c.train.log_every = 10  # steps between metrics.jsonl rows (step 1 is always logged)
    c.train.seed = 0  # init and data-order seed; step rng = fold_in(seed, step)

    c.mesh = ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor) sizes; -1 takes the remaining devices

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 50 if tiny else 400  # save every N steps (and at the end)
    c.checkpoint.every_minutes = 0.0  # also save when this many minutes passed (0 = off)
    c.checkpoint.keep = 2  # last K checkpoints kept, plus the best by eval accuracy
    return c
