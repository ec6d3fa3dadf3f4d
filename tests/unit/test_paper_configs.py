"""configs/paper/phi2_full.py and configs/paper/mistral7b_lora.py: all 2 x 3 x 5 runs of the paper.

Every OBJECTIVE,DATASET loads through config_flags by path (as haf_jax.train does, from a directory
where configs/ is not importable) with the paper's hyperparameters (docs/REPRODUCE.md); each dataset's
train and eval specs build on local copies of the hub datasets in their public schemas (the
`hub` fixture of tests/conftest.py), with the options build.build passes; the real-size parameter
trees are shaped with jax.eval_shape (nothing allocated; the LoRA adapter count checked exactly);
and the train step of each setup and objective compiles on a shrunken model of the same family
(6 compiles).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import pathlib
import re

import jax
import jax.numpy as jnp
import pytest
from helpers.hub_repos import ROWS

from haf_jax import data
from haf_jax.core import data_options, model_setup, params as params_lib, sharding
from haf_jax.data.formats import RECIPES, parse_spec
from haf_jax.model import heads, lora as lora_lib
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py: the hub copies are local
SETUPS = {
    "phi2_full": ("configs/paper/phi2_full.py", "phi-2", "microsoft/phi-2", "phi2", 1e-5, 0),
    "mistral7b_lora": (
        "configs/paper/mistral7b_lora.py",
        "mistral-7b-v0.2",
        "mistralai/Mistral-7B-Instruct-v0.2",
        "mistral",
        3e-5,
        64,
    ),
}
OBJECTIVES = ("haf", "baseline", "dpo")
DATASETS = {
    "helpful": "hh_helpful",
    "harmless": "hh_harmless",
    "beavertails": "beavertails_safe",
    "alpaca": "alpaca_human_pref",
    "arena": "chatbot_arena",
}
TEMPLATE_PREFIX = {"phi2": "Instruct: ", "mistral": "[INST] "}


@pytest.fixture(scope="module")
def configs(tmp_path_factory, load_config):
    """{(setup, objective, dataset): config} for all 30 combinations, loaded from outside the repo."""
    cwd = pathlib.Path.cwd()
    import os

    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        return {
            (s, o, d): load_config(f"{SETUPS[s][0]}:{o},{d}")
            for s, o, d in itertools.product(SETUPS, OBJECTIVES, DATASETS)
        }
    finally:
        os.chdir(cwd)


def test_every_combination_loads_with_the_paper_setup(configs):
    assert len(configs) == 30
    for (setup, objective, dataset), c in configs.items():
        _, preset_name, checkpoint, template, lr, rank = SETUPS[setup]
        assert (c.model.preset, c.model.checkpoint, c.data.template) == (preset_name, checkpoint, template)
        assert c.model.lora.rank == rank and c.optim.learning_rate == lr
        if rank:  # r=64, alpha 16, MLP projections only; attention, embeddings and LM head frozen
            assert c.model.lora.alpha == 16 and c.model.lora.dropout == 0
            assert not c.model.lora.train_lm_head and not c.model.lora.train_embeddings
            assert adapted(preset_name, c.model.lora.targets) == ["down_proj", "gate_proj", "up_proj"]
        assert (c.train.batch_size, c.train.steps, c.train.eval_every, c.train.seed) == (16, 3200, 80, 0)
        assert (c.data.max_length, c.data.max_prompt_length) == (512, 128)
        assert (
            c.optim.eps,
            c.optim.weight_decay,
            c.optim.clip_norm,
            c.optim.schedule,
            c.optim.warmup_steps,
            c.optim.grad_accum,
        ) == (1e-5, 0.0, 1.0, "linear", 0, 1)
        assert (c.loss.objective, c.loss.alpha, c.loss.beta, c.loss.policy) == (objective, 0.2, 0.1, "sigmoid")
        assert c.loss.simpo_gamma == 0.0 and c.loss.dpo_scale_by_alpha
        assert (c.data.truncation, c.data.degenerate, c.data.batching) == ("trl", "keep", "random")
        assert c.model.compute_dtype == "bfloat16" and c.checkpoint.keep >= 1
        # the dataset's recipe, reading its hub dataset; train = the recipe's own default source
        recipe, source = parse_spec(c.data.train)
        assert recipe == DATASETS[dataset] and source == RECIPES[recipe].default_source
        if dataset in ("helpful", "harmless"):  # the authors' eval: the HH test split
            assert c.data.eval == c.data.train[: -len("train")] + "test" and c.data.eval_subsample == 0
        elif dataset == "beavertails":  # 1000 exactly-one-safe test pairs, shuffled with seed 0
            assert c.data.eval == c.data.train[: -len("train")] + "test"
            assert (c.data.eval_subsample, c.data.eval_subsample_seed) == (1000, 0)
        else:  # first 10% / 5% of the one split (the recipe's rule)
            assert c.data.eval == "" and RECIPES[recipe].first_eval_fraction == {"alpaca": 0.10, "arena": 0.05}[dataset]
        # the step config the loop builds from it
        sc = model_setup.step_config(c, preset(preset_name))
        assert sc.loss.objective == objective and sc.loss.dpo_scale_by_alpha and sc.lora.rank == rank
        assert sc.compute_dtype == jnp.bfloat16


@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_bad_arguments_list_the_choices(setup, load_config):
    from absl import flags

    path = SETUPS[setup][0]
    for arg, what in (
        ("haf,nope", "unknown dataset 'nope'"),
        ("sft,helpful", "unknown objective 'sft'"),
        ("haf", "got 'haf'"),
        (None, "got None"),
    ):
        with pytest.raises(flags.IllegalFlagValueError) as e:
            load_config(f"{path}:{arg}" if arg else path)
        msg = str(e.value)
        assert what in msg and "OBJECTIVE in haf|baseline|dpo" in msg, msg
        assert "DATASET in helpful|harmless|beavertails|alpaca|arena" in msg


@functools.cache
def adapted(preset_name, targets):
    """The kinds of matrix the LoRA targets adapt in the real-size preset (an eval_shape: computed once)."""
    names = lora_lib.targets(preset(preset_name), lora_lib.LoraConfig(rank=64, targets=targets))
    return sorted({p.split("/")[-1] for p in names})


def lora_config(c):
    return lora_lib.LoraConfig.from_config(c.model.lora)


def local(spec, hub_dir):
    """The spec with its hub dataset replaced by the local copy in the hub layout."""
    return re.sub(r"hf:([^:]+)", lambda m: f"hf:{hub_dir / m.group(1)}", spec) if spec else spec


def loaded_splits(c, hub_dir, tokenizer):
    """(train, eval) as build.build loads them, from the local hub copies."""
    options, eval_opts = data_options.run_pair_options(c)  # as training/setup.build makes them
    train = local(c.data.train, hub_dir)
    if c.data.eval:
        return (
            data.load_pairs(train, tokenizer, options, split="all"),
            data.load_pairs(local(c.data.eval, hub_dir), tokenizer, eval_opts, split="all"),
        )
    return (
        data.load_pairs(train, tokenizer, options, split="train"),
        data.load_pairs(train, tokenizer, eval_opts, split="eval"),
    )


@pytest.mark.parametrize("dataset", list(DATASETS))
def test_recipes_build_on_the_public_schemas(dataset, configs, hub, tok):
    datasets = pytest.importorskip("datasets")
    for setup in SETUPS:  # the data of a dataset does not depend on the objective; the template does
        c = configs[(setup, "haf", dataset)]
        train, ev = loaded_splits(c, hub, tok)
        prefix = TEMPLATE_PREFIX[c.data.template]
        for ds in (train, ev):
            assert len(ds) > 0 and all(p["prompt"].startswith(prefix) for p in ds.pairs)
            assert (ds.report["truncation"], ds.report["degenerate"], ds.batching) == ("trl", "keep", "random")
        assert not {p["prompt"] for p in train.pairs} & {p["prompt"] for p in ev.pairs}
        if dataset == "alpaca":  # first 10% of the rows
            assert len(ev) == 2 and len(train) == 18
        if dataset == "arena":  # first 5% of the kept (single-turn, no tie) rows
            assert len(ev) == int(0.05 * (len(ev) + len(train)))
    if dataset == "beavertails":  # the subsample picks what datasets' shuffle(seed=0).select would
        c = configs[("mistral7b_lora", "haf", dataset)]
        with c.unlocked():
            c.data.eval_subsample = 3
        _, ev = loaded_splits(c, hub, tok)
        rows = [
            r
            for (repo, rel), rs in ROWS.items()
            if repo == "PKU-Alignment/PKU-SafeRLHF" and rel.endswith("test.jsonl")
            for r in rs
            if r["is_response_0_safe"] != r["is_response_1_safe"]
        ]
        want = datasets.Dataset.from_list(rows).shuffle(seed=0).select(range(3))["prompt"]
        assert sorted(p["prompt"] for p in ev.pairs) == sorted(f"[INST] {x} [/INST]" for x in want)


# ----------------------------------------------------------------------------- model side
MISTRAL_LORA_PARAMS = 32 * (64 * (4096 + 14336) + 64 * (4096 + 14336) + 64 * (14336 + 4096))  # 113,246,208


def test_real_size_parameter_trees(configs):
    """Phi-2 full fine-tune trains all 2.78B parameters; Mistral-7B LoRA trains the adapters + reward head."""
    c = configs[("phi2_full", "haf", "helpful")]
    phi = preset(c.model.preset)
    shapes, _ = heads.abstract_params(phi)
    trained, _ = lora_lib.abstract_trainable(phi, lora_config(c)) if c.model.lora.rank else (shapes, None)
    n_phi = params_lib.param_count(trained)
    assert n_phi == params_lib.param_count(shapes) == 2_779_683_840 + 2560, n_phi  # published + reward head
    c = configs[("mistral7b_lora", "haf", "helpful")]
    mistral = preset(c.model.preset)
    full = params_lib.param_count(heads.abstract_params(mistral)[0])
    trained, _ = lora_lib.abstract_trainable(mistral, lora_config(c))
    n_adapters = params_lib.param_count(trained["lora"])
    assert n_adapters == MISTRAL_LORA_PARAMS == 113_246_208
    assert params_lib.param_count(trained) == n_adapters + 4096  # + the reward head
    assert full == 7_241_732_096 + 4096, full  # Mistral-7B-v0.2 as published + head
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trained))


def shrunk(name):
    """The preset's family and options (parallel block / partial rotary / biases; GQA / untied head) at toy size."""
    cfg = preset(name)
    kv = 4 if cfg.num_kv_heads == cfg.num_heads else 1
    return dataclasses.replace(
        cfg,
        num_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=4,
        num_kv_heads=kv,
        head_dim=16,
        vocab_size=512,
        layer_types=(),
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )


@pytest.mark.parametrize("objective", ["haf", "baseline", "dpo"])
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_train_step_compiles_on_a_shrunken_model(setup, objective, configs):
    """The step built from the paper config (build.step_config / optimizer_for: bf16, remat, LoRA) lowers
    and compiles for a full batch of 16 pairs x 512 tokens. The step depends on the setup and the
    objective only (the dataset selects data), so this covers every combination's step."""
    c = configs[(setup, objective, "helpful")]
    assert all(
        configs[(setup, objective, d)].loss.to_dict() == c.loss.to_dict()
        and configs[(setup, objective, d)].model.to_dict() == c.model.to_dict()
        for d in DATASETS
    )
    model_cfg = dataclasses.replace(shrunk(c.model.preset), remat=bool(c.model.remat))
    assert model_cfg.family == preset(c.model.preset).family
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = model_setup.step_config(c, model_cfg)
    opt = model_setup.optimizer_for(c)
    _, abstract = step_lib.state_layout(model_cfg, opt, mesh, cfg.lora)
    psh = params_lib.param_shardings(model_cfg, mesh)
    fn, keys = step_lib.jit_train_step(
        cfg, opt, mesh, jax.tree.map(lambda x: x.sharding, abstract), psh, live_reference=False
    )
    full = params_lib.abstract_params(model_cfg, mesh)
    frozen = (
        None
        if not cfg.lora.enabled
        else {k: v for k, v in full.items() if k not in lora_lib.trainable_heads(model_cfg, cfg.lora)}
    )
    b, length = c.train.batch_size, c.data.max_length
    batch = {
        "tokens": jax.ShapeDtypeStruct((b, 2, length), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((b, 2, length), jnp.int32),
        "last_index": jax.ShapeDtypeStruct((b, 2), jnp.int32),
        "valid": jax.ShapeDtypeStruct((b,), jnp.bool_),
        "ref_logp": jax.ShapeDtypeStruct((b, 2), jnp.float32),
    }
    compiled = fn.lower(abstract, {k: batch[k] for k in keys}, None, frozen).compile()
    trained = abstract["params"]
    if cfg.lora.enabled:
        assert set(trained) == {"lora", "reward_head"} and frozen is not None
        assert set(jax.tree.leaves(jax.tree.map(lambda x: x.shape[-1], trained["lora"]))) >= {64}
    else:
        assert set(trained) == set(full)
    # What plan reports per chip: the arguments are exactly the state, the batch and (LoRA) the frozen
    # base weights (each buffer at its own size; XLA's CPU client pads none of these), and the donated
    # state's outputs alias its arguments (measured: phi2_full haf 1,726,492 argument bytes, 1,595,148
    # aliased; mistral7b_lora haf 1,558,812 and 885,516: the LoRA state is the adapters' and head's only).
    memory = compiled.memory_analysis()
    inputs = (abstract, {k: batch[k] for k in keys}, frozen)
    nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(inputs))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    if objective != "baseline":
        assert memory.argument_size_in_bytes == nbytes, (memory.argument_size_in_bytes, nbytes)
        assert memory.alias_size_in_bytes == state_bytes, (memory.alias_size_in_bytes, state_bytes)
    else:  # baseline never reads the LM head, and jit drops unused arguments (measured: phi2_full 1,660,828
        # of 1,726,364 bytes; mistral7b_lora 1,362,076 of 1,558,684: its frozen [V, D] head)
        assert state_bytes <= memory.argument_size_in_bytes < nbytes, (memory.argument_size_in_bytes, nbytes)
        assert 0 < memory.alias_size_in_bytes <= state_bytes, (memory.alias_size_in_bytes, state_bytes)
