"""Fidelity options (haf_jax/config/base.py; docs/REPRODUCE.md): each default is this project's behaviour,
each alternative the paper authors'. Every test uses a crafted example on which the two values give
different results, so it fails if the option is ignored anywhere between the config and the numbers.

data.truncation (always | trl), data.degenerate (skip | keep), data.batching (length_grouped | random),
data.eval_subsample[_seed] (datasets' shuffle(seed).select(range(N))), loss.dpo_scale_by_alpha; and
loop.build passing the data keys through (the step keys go through loop.step_config).
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict

from haf_jax.config.base import base_config, with_added_defaults
from haf_jax.core import forward, losses
from haf_jax.core.data_options import eval_options, fidelity_options
from haf_jax.data import DataError, PairLoader, PairOptions, format_report, load_pairs
from haf_jax.data.tokenize import PROMPT_CUT, RESPONSE_CUT, encode_pairs
from haf_jax.model import heads
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib

BOS, EOS = 2, 1  # the bundled tokenizer's
MODEL = dataclasses.replace(preset("tiny"), vocab_size=2048)
FIDELITY_DATA_KEYS = ("truncation", "degenerate", "batching", "eval_subsample", "eval_subsample_seed")


def data_section(**values) -> ConfigDict:
    """The base config's data section with `values` set."""
    d = base_config().data
    d.update(values)
    return d


def older_run() -> ConfigDict:
    """A run config saved before the fidelity keys existed, read back as resume/score/export read it."""
    saved = json.loads(base_config().to_json_best_effort())
    for key in FIDELITY_DATA_KEYS:
        del saved["data"][key]
    del saved["loss"]["dpo_scale_by_alpha"]
    return ConfigDict(with_added_defaults(saved))


OLDER_RUN = older_run()


@pytest.fixture(scope="module")
def tok(tok):
    """The bundled tokenizer (tests/conftest.py), with the BOS and EOS ids this module builds rows from."""
    assert (tok.bos_token_id, tok.eos_token_id) == (BOS, EOS)
    return tok


def words(n, w=" the"):
    """Text of exactly n tokens under the bundled tokenizer (checked in the tests)."""
    return w * n


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# ----------------------------------------------------------------------------- data.truncation
def test_truncation_trl_cuts_only_what_does_not_fit(tok):
    assert len(tok(words(489), add_special_tokens=False)["input_ids"]) == 489
    assert len(tok(words(500, " a"), add_special_tokens=False)["input_ids"]) == 500
    pairs = [
        # A: 490-token prompt (BOS + 489), 3-token responses (2 + EOS): 493 <= 512
        {"prompt": words(489), "chosen": " a a", "rejected": " I I"},
        # B: 50-token prompt, a 501-token response: too long; the prompt is under 128 already
        {"prompt": words(49), "chosen": words(500, " a"), "rejected": " I I"},
        # C: 200-token prompt, 401-token response: both rules end at 128 + 384
        {"prompt": words(199), "chosen": words(400, " a"), "rejected": " I I"},
    ]
    kw = dict(max_length=512, max_prompt_length=128)
    always = encode_pairs(tok, pairs, **kw)
    trl = encode_pairs(tok, pairs, truncation="trl", **kw)
    default = encode_pairs(tok, pairs, **kw)
    # A: kept whole under trl, cut to its last 128 tokens (BOS first) under always
    assert len(trl.prompt[0]) == 490 and trl.flags[0] == 0 and trl.lengths[0].tolist() == [493, 493]
    assert len(always.prompt[0]) == 128 and always.flags[0] == PROMPT_CUT
    assert always.prompt[0].tolist() == [BOS] + trl.prompt[0].tolist()[-127:]
    # B: trl gives the responses TRL's fixed budget 512 - 128 = 384; always gives what the prompt leaves
    assert len(trl.prompt[0 + 1]) == 50 and len(always.prompt[1]) == 50
    assert len(trl.chosen[1]) == 384 and len(always.chosen[1]) == 462
    for t in (trl, always):
        assert t.chosen[1][-1] == EOS and t.flags[1] == RESPONSE_CUT  # the EOS is kept in both
        assert t.rejected[1].tolist() == always.rejected[1].tolist()  # the short side is untouched
    # C: the same result by both rules
    for f in ("prompt", "chosen", "rejected"):
        np.testing.assert_array_equal(getattr(trl, f)[2], getattr(always, f)[2])
    assert len(trl.prompt[2]) + len(trl.chosen[2]) == 512
    # default = always
    for f in ("prompt", "chosen", "rejected"):
        for x, y in zip(getattr(default, f), getattr(always, f)):
            np.testing.assert_array_equal(x, y)
    with pytest.raises(DataError, match="unknown truncation 'nope'"):
        encode_pairs(tok, pairs, truncation="nope", **kw)


def test_truncation_from_config_reaches_the_batches(tok, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"prompt": words(489), "chosen": " a a", "rejected": " I I"}])
    got = {}
    for value in ("always", "trl"):
        d = data_section(truncation=value)
        ds = load_pairs(
            path, tok, PairOptions(max_length=512, max_prompt_length=128, **fidelity_options(d)), split="all"
        )
        b = next(ds.batches(1))
        got[value] = (ds.report["truncated_prompt"], int(b["last_index"][0, 0]) + 1, ds.fingerprint)
    assert got["always"][:2] == (1, 131) and got["trl"][:2] == (0, 493)
    assert got["always"][2] != got["trl"][2]  # a different reference cache key
    # a config without the key (written before it existed) = always, and the same fingerprint as before
    assert fidelity_options(OLDER_RUN.data)["truncation"] == "always"
    assert load_pairs(path, tok, PairOptions(max_length=512), split="all").fingerprint == got["always"][2]


# ----------------------------------------------------------------------------- data.degenerate
DEGENERATE_ROWS = [{"prompt": f"q{i}", "chosen": " yes", "rejected": " no"} for i in range(3)] + [
    {"prompt": "same", "chosen": " twin", "rejected": " twin"},
    {"prompt": "empty", "chosen": "", "rejected": " no"},
]


@pytest.fixture(scope="module")
def tiny_model():
    params = heads.init_params(MODEL, jax.random.key(0))
    params = {**params, "reward_head": jax.random.normal(jax.random.key(1), params["reward_head"].shape)}
    fwd = jax.jit(lambda p, b: heads.forward_pairs(p, MODEL, b, chunk=32))
    return params, fwd


def test_degenerate_keep_vs_skip(tok, tmp_path, tiny_model):
    path = write_jsonl(tmp_path / "d.jsonl", DEGENERATE_ROWS)
    skip = load_pairs(path, tok, PairOptions(max_skip_fraction=0.5, **fidelity_options(OLDER_RUN.data)), split="all")
    keep = load_pairs(path, tok, PairOptions(**fidelity_options(data_section(degenerate="keep"))), split="all")
    # skip (default): gone, counted as skipped (and toward max_skip_fraction: 40% > 10% refuses)
    assert len(skip) == 3 and skip.report["skipped_by_reason"] == {"empty_chosen": 1, "identical": 1}
    assert skip.report["degenerate_kept_by_reason"] == {} and len(skip.skipped) == 2
    with pytest.raises(DataError, match="40.0% of the pairs would be skipped"):
        load_pairs(path, tok, split="all")
    # keep: pairs like any other, reported as kept, not as skipped (nothing refused)
    assert len(keep) == 5 and keep.report["skipped_by_reason"] == {} and keep.skipped == []
    assert keep.report["degenerate_kept_by_reason"] == {"empty_chosen": 1, "identical": 1}
    assert keep.report[
        "skipped_fraction"
    ] == 0 and "kept (data.degenerate=keep): empty_chosen 1, identical 1" in format_report(keep.report)
    assert [p.get("degenerate") for p in keep.pairs] == [None, None, None, "identical", "empty_chosen"]
    assert keep.fingerprint != skip.fingerprint
    b = next(keep.batches(8))
    # the empty response is just the EOS; the identical pair is the same tokens twice
    assert keep.tokens.chosen[4].tolist() == [EOS]
    np.testing.assert_array_equal(b["tokens"][3, 0], b["tokens"][3, 1])
    # ... so its rewards are equal and strict accuracy counts it wrong, whatever the model
    params, fwd = tiny_model
    out = fwd(params, {k: jnp.asarray(b[k]) for k in ("tokens", "response_mask", "last_index")})
    correct = np.asarray(losses.pair_metrics({"reward": out.reward_Bx2})["correct_reward"])[:5]
    r = np.asarray(out.reward_Bx2)
    assert r[3, 0] == r[3, 1] and correct[3] == 0.0
    assert len(set(np.round(r[:5, 0], 5))) == 5  # a real reward head: not all ties


# ----------------------------------------------------------------------------- data.batching
def test_batching_random_is_the_plain_permutation(tok, tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"prompt": f"q{i}", "chosen": words(int(rng.integers(1, 200)), " a"), "rejected": " no"} for i in range(64)]
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    spread = {}
    for value in ("length_grouped", "random"):
        options = PairOptions(max_length=256, max_prompt_length=32, **fidelity_options(data_section(batching=value)))
        ds = load_pairs(path, tok, options, split="all")
        assert ds.batching == value and ds.report["batching"] == value
        with PairLoader(ds, 8, seed=0, prefetch=0) as loader:
            batches = [next(loader) for _ in range(8)]
        idx = np.stack([b["index"] for b in batches])
        lengths = ds.all_lengths.max(axis=1)[idx]
        spread[value] = float(np.mean(lengths.max(axis=1) - lengths.min(axis=1)))
        plain = np.random.default_rng([0, 0, 0]).permutation(64).reshape(8, 8)
        if value == "random":  # the authors' random sampler: batch k = the k-th run of the permutation
            np.testing.assert_array_equal(idx, plain)
        else:
            assert not np.array_equal(idx, plain)
        assert sorted(idx.ravel().tolist()) == list(range(64))  # one epoch sees every pair once either way
    assert spread["length_grouped"] < 0.3 * spread["random"], spread
    with pytest.raises(DataError, match="unknown batching 'bucket'"):
        load_pairs(path, tok, PairOptions(batching="bucket"), split="all")


# ----------------------------------------------------------------------------- data.eval_subsample
def test_eval_subsample_is_datasets_shuffle_select(tok, tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [
        {
            "prompt": f"p{i}",
            "response_0": f"a{i}",
            "response_1": f"b{i}",
            "is_response_0_safe": i % 3 != 1,
            "is_response_1_safe": i % 3 == 1 or i % 5 == 0,
            "safer_response_id": 1 if i % 3 == 1 else 0,  # the recipe's chosen label (the hub schema has it)
        }
        for i in range(60)
    ]
    path = "recipe:beavertails_safe:" + write_jsonl(tmp_path / "s.jsonl", rows)
    full = load_pairs(path, tok, split="all")
    kept_rows = [r for r in rows if r["is_response_0_safe"] != r["is_response_1_safe"]]
    assert len(full) == len(kept_rows) > 20
    want = datasets.Dataset.from_list(kept_rows).shuffle(seed=0).select(range(7))["prompt"]
    sub = load_pairs(path, tok, PairOptions(**eval_options(data_section(eval_subsample=7))), split="all")
    assert sorted(p["prompt"] for p in sub.pairs) == sorted(want)
    assert [p["prompt"] for p in sub.pairs] == [p["prompt"] for p in full.pairs if p["prompt"] in set(want)]
    other = load_pairs(path, tok, PairOptions(subsample=7, subsample_seed=1), split="all")
    assert {p["prompt"] for p in other.pairs} != set(want)
    assert len(load_pairs(path, tok, PairOptions(subsample=1000), split="all")) == len(full)  # more than there is: all
    assert eval_options(OLDER_RUN.data) == {"subsample": 0, "subsample_seed": 0}


# ----------------------------------------------------------------------------- loss.dpo_scale_by_alpha
def np_log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def test_dpo_scale_by_alpha_golden():
    rng = np.random.default_rng(0)
    lp, ref = rng.normal(-40, 8, (16, 2)), rng.normal(-40, 8, (16, 2))
    r = rng.normal(0, 1, (16, 2))
    alpha, beta = 0.2, 0.1
    l_p = np.mean(-np_log_sigmoid(beta * ((lp[:, 0] - ref[:, 0]) - (lp[:, 1] - ref[:, 1]))))
    l_r = np.mean(-np_log_sigmoid(r[:, 0] - r[:, 1]))
    out = {"reward": r, "logp": lp, "ref_logp": ref}
    want = {
        ("dpo", False): l_p,
        ("dpo", True): alpha * l_p,
        ("haf", False): l_r + alpha * l_p,
        ("haf", True): l_r + alpha * l_p,
        ("baseline", False): l_r,
        ("baseline", True): l_r,
    }
    for (objective, flag), value in want.items():
        loss, metrics = losses.objective(out, objective=objective, alpha=alpha, beta=beta, dpo_scale_by_alpha=flag)
        # float32 against float64 NumPy: measured relative error <= 1.3e-7
        np.testing.assert_allclose(float(loss), value, rtol=1e-6, err_msg=str((objective, flag)))
        np.testing.assert_allclose(float(metrics["policy_loss"]), l_p, rtol=1e-6)  # logged unscaled
    assert abs(l_p - alpha * l_p) > 0.1


def test_dpo_scale_by_alpha_reaches_the_step(tiny_model):
    params, _ = tiny_model
    rng = np.random.default_rng(1)
    tokens = rng.integers(4, 2048, (4, 2, 16)).astype(np.int32)
    mask = np.zeros((4, 2, 16), np.int32)
    mask[:, :, 6:] = 1
    batch = {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": np.full((4, 2), 15, np.int32),
        "valid": np.ones(4, bool),
        "ref_logp": rng.normal(-120, 5, (4, 2)).astype(np.float32),
    }
    got = {}
    for flag in (False, True):
        lc = forward.LossConfig.from_config(
            ConfigDict(
                {
                    "objective": "dpo",
                    "alpha": 0.2,
                    "beta": 0.1,
                    "policy": "sigmoid",
                    "margin": 0.0,
                    "centering": 0.0,
                    "label_smoothing": 0.0,
                    "simpo_gamma": 0.0,
                    "dpo_scale_by_alpha": flag,
                }
            )
        )
        cfg = forward.StepConfig(MODEL, lc, logprob_chunk=16)
        got[flag] = jax.jit(
            lambda p, b, cfg=cfg: jax.value_and_grad(step_lib._loss, has_aux=True)(p, cfg, b, None, None)
        )(params, batch)
    (l0, _), g0 = got[False]
    (l1, _), g1 = got[True]
    assert not forward.LossConfig.from_config(OLDER_RUN.loss).dpo_scale_by_alpha  # runs from before the key
    np.testing.assert_allclose(float(l1), 0.2 * float(l0), rtol=1e-6)  # measured: equal
    a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g1)])  # the gradient scales with the loss
    b = 0.2 * np.concatenate([np.ravel(x) for x in jax.tree.leaves(g0)])
    assert np.abs(b).max() > 0
    np.testing.assert_allclose(a, b, rtol=0, atol=5e-6 * np.abs(b).max())  # measured 2.3e-8 = 5.8e-7 x max


# ----------------------------------------------------------------------------- loop wiring
def test_loop_build_passes_the_data_options(tok, tmp_path, load_config):
    """loop.build hands data.truncation/degenerate/batching to both splits and data.eval_subsample to eval."""
    from haf_jax.training import loop, resume as run_config

    rows = [{"prompt": words(200) + f" q{i}", "chosen": " yes", "rejected": " no"} for i in range(24)] + [
        {"prompt": "same", "chosen": " twin", "rejected": " twin"}
    ]
    path = write_jsonl(tmp_path / "l.jsonl", rows)
    default = load_config("configs/gemma.py")
    c = load_config("configs/gemma.py")
    c.data.train, c.data.eval = path, path
    c.data.truncation, c.data.degenerate, c.data.batching = "trl", "keep", "random"
    c.data.eval_subsample = 5
    c.loss.objective, c.loss.dpo_scale_by_alpha = "dpo", True
    s = loop.build(c, None)
    for ds, n in ((s.train_ds, 25), (s.eval_ds, 5)):
        r = ds.report
        assert len(ds) == n and (r["truncation"], r["degenerate"], r["batching"]) == ("trl", "keep", "random")
        assert r["truncated_prompt"] == 0  # 201 + 3 tokens fit in 256: kept whole under trl
    assert s.train_ds.report["degenerate_kept_by_reason"] == {"identical": 1}
    assert s.eval_ds.report["subsample"] == 5 and s.train_ds.report["subsample"] == 0
    assert s.step_cfg.loss.dpo_scale_by_alpha
    # runs written before these keys existed compare equal to today's defaults (resume stays possible)
    saved = json.loads(default.to_json_best_effort())
    for key in FIDELITY_DATA_KEYS:
        del saved["data"][key]
    del saved["loss"]["dpo_scale_by_alpha"]
    breaking, _ = run_config.compare_configs(with_added_defaults(saved), run_config.config_dict(default))
    assert breaking == []
    breaking, _ = run_config.compare_configs(with_added_defaults(saved), run_config.config_dict(c))
    assert {line.split(":")[0] for line in breaking} >= {
        "data.truncation",
        "data.degenerate",
        "data.batching",
        "data.eval_subsample",
        "loss.dpo_scale_by_alpha",
    }
