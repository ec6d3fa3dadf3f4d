"""The base run config: every key a run reads, with its default and what it means.

`base_config()` is the offline demo (the tiny Gemma preset on the bundled HH-RLHF sample, float32,
a short run); `full_size(c)` moves it to a real backbone's setup (docs/REPRODUCE.md, the authors' setup: bf16 compute,
lr 1e-5, 512 tokens, 3200 steps); `family_config` is what configs/<family>.py returns:
  python -m haf_jax.train --config=configs/llama.py --workdir=runs/tiny-llama
  python -m haf_jax.train --config=configs/llama.py:llama3-8b --workdir=runs/l3 \
    --config.model.checkpoint=meta-llama/Meta-Llama-3-8B --config.data.train=prefs.jsonl
Any key can be overridden with --config.<section>.<key>=value.

A key added after runs were already written goes into ADDED_LATER, with a default here that
reproduces those runs: resume, score and export read an older run's saved config through
`with_added_defaults`, so the one set of defaults serves new runs and old checkpoints alike.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping

from ml_collections import ConfigDict


def base_config() -> ConfigDict:
    """The full run config of the offline demo; every key has its comment (full size: `full_size`)."""
    c = ConfigDict()

    c.model = ConfigDict()
    c.model.preset = "tiny"  # architecture when starting from random weights (ignored with a checkpoint)
    c.model.checkpoint = ""  # HF directory or hub id to start from; "" = random init of the preset
    c.model.tokenizer = ""  # tokenizer dir or hub id; "" = the checkpoint's own, or the bundled one
    c.model.compute_dtype = "float32"  # full size: bfloat16; master weights always stay float32
    c.model.remat = False  # rematerialise each block in the backward pass (saves activations); full size: on
    c.model.remat_policy = "nothing"  # what remat keeps: nothing | dots | dots_no_batch (matmul outputs)
    # One compiled block per repeating layer pattern (compiles much faster); full size: on. Off is
    # also the layout of runs written before the key existed (per-layer parameters).
    c.model.scan_layers = False
    # Response positions per batch shard per chunk of the LM-head log-probs: smaller wastes less on
    # short responses (at most chunk - 1 per shard); on TPU 512 (the full-size value) keeps HaF's
    # temporaries near Baseline's (gemma-2b, v5e-8: 1.08x; 128: 1.19x, benchmarks/haf_memory.py).
    c.model.logprob_chunk = 128
    c.model.attention = "auto"  # auto (splash on TPU, cudnn on GPU, else xla) | xla | cudnn | splash
    c.model.lora = ConfigDict()  # low-rank adapters (haf_jax/model/lora.py); rank 0 = full fine-tuning
    c.model.lora.rank = 0  # adapter rank r (paper, Mistral-7B: 64)
    c.model.lora.alpha = 16.0  # adapters add (alpha / rank) * A @ B (paper: 16)
    c.model.lora.dropout = 0.0  # input dropout of the adapters: only 0 (they are merged into the weights)
    c.model.lora.targets = r"mlp\.(gate_proj|up_proj|down_proj|fc1|fc2)\.weight$"  # regex over HF parameter names
    c.model.lora.train_lm_head = False  # also train the LM head in full (the embedding when tied)
    c.model.lora.train_embeddings = False  # also train the token embedding in full

    c.data = ConfigDict()
    c.data.train = ""  # file path or dataset spec (see haf_jax.data); "" = bundled HH-RLHF sample
    c.data.eval = ""  # same; "" = carve data.eval_fraction out of data.train deterministically
    c.data.eval_fraction = 0.1  # used only when data.eval is ""; full size: 0.05
    # Seed of that eval carve, apart from train.seed so that a seed sweep trains on different orders
    # and inits but evaluates on the same pairs. Runs written before the key carved with train.seed
    # (ADDED_LATER_FROM: they keep doing so on resume and evaluation).
    c.data.split_seed = 0
    c.data.template = "none"  # prompt template: none | phi2 | mistral
    c.data.max_length = 256  # prompt + response tokens; full size: 512 (docs/REPRODUCE.md)
    c.data.max_prompt_length = 128  # the prompt keeps its END when cut
    c.data.max_skip_fraction = 0.1  # refuse to start when more rows than this would be skipped
    # Fidelity options: the defaults are this project's behaviour, the alternatives the paper
    # authors' (configs/paper/ sets them; docs/REPRODUCE.md says why each default differs).
    # always: the prompt is always cut to max_prompt_length | trl (TRL 0.7): only when prompt + longer
    # response > max_length; if still too long, responses keep max_length - max_prompt_length. EOS kept.
    c.data.truncation = "always"
    c.data.degenerate = "skip"  # empty/identical responses: skip (counted) | keep (identical = a wrong pair)
    c.data.batching = "length_grouped"  # length_grouped (similar lengths, less padding) | random
    c.data.eval_subsample = 0  # > 0: eval = N rows of the eval split, as datasets' shuffle(seed).select(range(N))
    c.data.eval_subsample_seed = 0  # that shuffle's seed (paper BeaverTails eval: 1000 rows, seed 0)
    # Packing (haf_jax/data/packing.py): several pairs per row of pack_length tokens, one static
    # shape, ~4% padding on HH instead of 25-50%; a step then holds about train.batch_size pairs.
    c.data.packing = False
    c.data.pack_length = 0  # tokens per packed row; 0 = 4 * max_length (at least 2 * max_length)
    c.data.pack_rows = 0  # rows per step; 0 = train.batch_size pairs of the mean length, rounded down
    # Shared prompts (haf_jax/data/packing.py): a pair's prompt is run once for both responses
    # (one row per pair, or packed with data.packing); same numbers, fewer tokens.
    c.data.share_prompt = False

    c.loss = ConfigDict()
    c.loss.objective = "haf"  # haf | baseline | dpo
    c.loss.alpha = 0.2  # weight of the policy loss in haf
    c.loss.beta = 0.1  # DPO temperature (the paper's tau)
    c.loss.policy = "sigmoid"  # sigmoid (DPO) | hinge | ipo | simpo
    c.loss.margin = 0.0  # Bradley-Terry margin
    c.loss.centering = 0.0  # reward-centring coefficient
    c.loss.label_smoothing = 0.0  # conservative-DPO smoothing for sigmoid/simpo
    c.loss.simpo_gamma = 0.5  # SimPO target margin (policy=simpo only; the authors' SimPO has none: 0)
    c.loss.dpo_scale_by_alpha = False  # objective dpo: loss = alpha * L_P (the authors' DPO-only runs), not L_P
    c.loss.reference = "precompute"  # precompute (once, cached on disk) | live (frozen copy every step)

    c.optim = ConfigDict()
    # 5e-4 for the demo (at 1e-3 its reward head overshot: eval log loss back above ln 2 after step
    # 50); full size: 1e-5 (the paper's full fine-tune)
    c.optim.learning_rate = 5e-4
    c.optim.warmup_steps = 0  # linear warmup steps (paper: none)
    c.optim.schedule = "linear"  # linear (decay to 0) | cosine | constant
    c.optim.eps = 1e-5  # AdamW epsilon (paper: 1e-5)
    c.optim.weight_decay = 0.0  # AdamW decoupled weight decay (paper: 0)
    c.optim.clip_norm = 1.0  # global gradient-norm clip (paper: 1.0)
    c.optim.grad_accum = 1  # micro-batches per step (train.batch_size must divide evenly)
    c.optim.moment_dtype = "float32"  # Adam's first moment: float32 | bfloat16 (2 bytes less per trained parameter)

    c.train = ConfigDict()
    c.train.steps = 150  # optimizer steps; full size: 3200
    c.train.batch_size = 16  # pairs per step, global (paper: 16)
    c.train.eval_every = 50  # steps between evals (also evaluated at the end); full size: 80
    c.train.eval_batch_size = 32  # pairs per eval/reference batch, global
    c.train.log_every = 10  # steps between metrics.jsonl rows (step 1 is always logged)
    c.train.seed = 0  # init and data-order seed; step rng = fold_in(seed, step)
    c.train.profile_steps = ""  # "A-B": JAX profiler trace of steps A..B in WORKDIR/profile; "" = off

    c.mesh = ConfigDict()
    c.mesh.shape = (1, -1, 1)  # (data, fsdp, tensor) sizes; -1 takes the remaining devices

    c.checkpoint = ConfigDict()
    c.checkpoint.every_steps = 50  # save every N steps (and at the end); full size: 400
    c.checkpoint.every_minutes = 0.0  # also save when this many minutes passed (0 = off)
    c.checkpoint.keep = 2  # last K checkpoints kept, plus the best by eval accuracy

    c.bon = ConfigDict()  # Best-of-N with this run as the reward model (python -m haf_jax.bon)
    c.bon.n = 4  # candidates per prompt when bon's --n is not given (paper: 4 for Phi-2, 8 for Mistral-7B)
    return c


def full_size(c: ConfigDict) -> ConfigDict:
    """`c` (a base config) with a real backbone's setup, changed in place and returned: bf16 compute,
    remat and scanned layers, 512 tokens, lr 1e-5, 3200 steps (docs/REPRODUCE.md)."""
    c.model.compute_dtype = "bfloat16"
    c.model.remat = True
    c.model.scan_layers = True
    c.model.logprob_chunk = 512
    c.data.eval_fraction = 0.05
    c.data.max_length = 512
    c.optim.learning_rate = 1e-5
    c.train.steps = 3200
    c.train.eval_every = 80
    c.checkpoint.every_steps = 400
    return c


def family_config(arg: str, presets: Mapping, config_file: str, *, tiny: str) -> ConfigDict:
    """The run config of preset `arg`: the demo's values for `tiny`, full size for the others.

    presets: a family module's PRESETS (haf_jax/model/<family>.py); config_file names the config
    file in the error for a preset outside them.
    """
    if arg not in presets:
        raise ValueError(f"unknown preset {arg!r} for {config_file}; choose one of {tuple(presets)}")
    c = base_config()
    c.model.preset = arg
    return c if arg == tiny else full_size(c)


# Keys added after runs were already written ("section.key"; a section key covers its whole subtree).
# Their base_config values are what those runs did: tests/test_checkpoint.py pins them.
ADDED_LATER = (
    "model.lora",
    "model.attention",
    "model.scan_layers",
    "model.remat_policy",
    "data.truncation",
    "data.degenerate",
    "data.batching",
    "data.eval_subsample",
    "data.eval_subsample_seed",
    "data.packing",
    "data.pack_length",
    "data.pack_rows",
    "data.share_prompt",
    "loss.dpo_scale_by_alpha",
    "train.profile_steps",
    "optim.moment_dtype",
    "bon.n",
    "data.split_seed",
)


# Keys added later whose older runs did what another key of theirs says, not a fixed default:
# "section.key" -> the "section.key" whose saved value it takes (before data.split_seed, the eval
# carve was seeded with train.seed).
ADDED_LATER_FROM = {"data.split_seed": "train.seed"}


def with_added_defaults(saved: dict) -> dict:
    """A copy of `saved` (a run config as a checkpoint records it, JSON types) with every ADDED_LATER
    key it lacks taken from `base_config()` (an ADDED_LATER_FROM key: from the saved key it names).
    Other keys, and keys it has, are left as they are: a key missing for another reason still shows
    up when resume compares the configs."""
    defaults = json.loads(base_config().to_json_best_effort())
    out = copy.deepcopy(saved)
    for key, source in ADDED_LATER_FROM.items():
        (section, name), (from_section, from_name) = key.split("."), source.split(".")
        if name not in out.get(section, {}) and from_name in out.get(from_section, {}):
            out.setdefault(section, {})[name] = copy.deepcopy(out[from_section][from_name])
    for key in ADDED_LATER:
        section, name = key.split(".")
        if section not in out:
            out[section] = {}
        _fill(out[section], name, defaults[section][name])
    return out


def _fill(target: dict, name: str, default) -> None:
    """target[name] = default when absent; when both are dicts, the same for each of default's keys."""
    if name not in target:
        target[name] = copy.deepcopy(default)
    elif isinstance(default, dict) and isinstance(target[name], dict):
        for key, value in default.items():
            _fill(target[name], key, value)
