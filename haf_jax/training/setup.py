"""Everything a run builds from its config before the first step: model config and initial weights,
tokenizer, data, mesh, step config, optimizer and the state layout (`build` -> `Setup`).

What training alone needs; the factories evaluation and the planner share with it are core/model_setup.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib

import jax
from etils import epath

from haf_jax import data
from haf_jax.core import data_options, forward, params as params_lib, paths, sharding
from haf_jax.core.logs import log
from haf_jax.core.model_setup import model_source, optimizer_for, step_config
from haf_jax.model import lora as lora_lib
from haf_jax.training import step as step_lib
from haf_jax.training.resume import RunError


@dataclasses.dataclass
class Setup:
    """Everything built from the config before the first step."""

    config: object
    model_config: object
    tokenizer: object
    train_ds: object
    eval_ds: object
    mesh: object
    step_cfg: forward.StepConfig
    optimizer: object
    param_shardings: object  # of the full model (reference, frozen base)
    trained_shardings: object  # of what the optimizer trains (all params, or LoRA adapters + heads)
    init_state: object  # jitted trainable params -> state
    abstract_state: object
    checkpoint_dir: epath.Path | None
    model_path: pathlib.Path | None  # HF directory the initial weights come from (None: random init)


def build(config, workdir: epath.Path | None) -> Setup:
    """Model config, tokenizer, data, mesh, step config, optimizer and state layout from `config`;
    with a `workdir` (local or remote), also writes its data reports, model_config.json and tokenizer."""
    model_cfg, path = model_source(config)
    tok_source = config.model.tokenizer or (str(path) if path is not None else data.sample_paths()["tokenizer"])
    with paths.local_dir(tok_source) if paths.is_remote(tok_source) else contextlib.nullcontext(tok_source) as t:
        tokenizer = data.load_tokenizer(t)
    if len(tokenizer) > model_cfg.vocab_size:
        raise RunError(
            f"tokenizer {tok_source} has {len(tokenizer)} tokens but the model's vocab_size is {model_cfg.vocab_size}"
        )
    d = config.data
    train_spec = d.train or data.sample_paths()["data"]
    options, eval_opts = data_options.run_pair_options(config)  # eval: data.eval_subsample[_seed] too
    if d.eval:  # separate files: each is used whole
        train_ds = data.load_pairs(train_spec, tokenizer, options, split="all")
        eval_ds = data.load_pairs(d.eval, tokenizer, eval_opts, split="all")
    else:  # one source: a deterministic eval carve (eval_fraction, or the recipe's own rule)
        train_ds = data.load_pairs(train_spec, tokenizer, options, split="train")
        eval_ds = data.load_pairs(train_spec, tokenizer, eval_opts, split="eval")
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        log(f"data report ({name}):\n{data.format_report(ds.report)}")
        if workdir is not None and jax.process_index() == 0:
            paths.write_text(workdir / f"data_report_{name}.json", json.dumps(ds.report, indent=1, default=str))

    if workdir is not None and jax.process_index() == 0:  # a run directory is self-describing
        paths.write_text(workdir / "model_config.json", json.dumps(dataclasses.asdict(model_cfg), indent=1))
        with paths.writable_dir(workdir / "tokenizer") as tokenizer_dir:
            tokenizer.save_pretrained(tokenizer_dir)
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
        if config.train[key] % (n_shards * config.optim.grad_accum if key == "batch_size" else n_shards):
            raise RunError(
                f"train.{key}={config.train[key]} must be a multiple of the data-parallel size "
                f"{n_shards} (mesh {dict(mesh.shape)})"
                + (f" times optim.grad_accum={config.optim.grad_accum}" if key == "batch_size" else "")
            )
    step_cfg = step_config(config, model_cfg)
    optimizer = optimizer_for(config)
    param_sh = params_lib.param_shardings(model_cfg, mesh)
    trained_sh = params_lib.trainable_shardings(model_cfg, step_cfg.lora, mesh)
    init_state, abstract_state = step_lib.state_layout(model_cfg, optimizer, mesh, step_cfg.lora)
    return Setup(
        config,
        model_cfg,
        tokenizer,
        train_ds,
        eval_ds,
        mesh,
        step_cfg,
        optimizer,
        param_sh,
        trained_sh,
        init_state,
        abstract_state,
        workdir / "checkpoints" if workdir is not None else None,
        path,
    )


def train_loader(s: Setup):
    """The run's train batches (plain, packed or shared-prompt, as data.* says), in the seeded order:
    rows a multiple of the data-parallel size times optim.grad_accum. The caller closes it."""
    c, d = s.config, s.config.data
    return data.train_loader(
        s.train_ds,
        c.train.batch_size,
        seed=c.train.seed,
        packing=d.packing,
        share_prompt=d.share_prompt,
        pack_length=d.pack_length,
        pack_rows=d.pack_rows,
        row_multiple=s.mesh.shape["data"] * s.mesh.shape["fsdp"] * c.optim.grad_accum,
    )


def split_trainable(s: Setup, params0):
    """(trainable params, frozen base or None): LoRA's fresh adapters + heads, or everything."""
    lora = s.step_cfg.lora
    if not lora.enabled:
        return params0, None
    trainable, frozen = lora_lib.split(params0, s.model_config, lora, jax.random.key(s.config.train.seed + 1))
    trainable = {**trainable, "lora": jax.device_put(trainable["lora"], s.trained_shardings["lora"])}
    return trainable, frozen
