"""haf_jax.RewardFunction: its rewards equal `haf_jax.score`'s reward_chosen for the same texts
(strings and chat messages, in input order, completions paired or alone), the implicit DPO reward
equals beta * (logp - ref_logp) from `score --reference=initial`, the length penalty counts
response tokens, normalisation uses the reference set's mean and std, and bad input is refused."""

import json
import pathlib

import numpy as np
import pytest

import haf_jax
from haf_jax.data import jsonl
from haf_jax.evaluation import scoring

RUN = pathlib.Path(__file__).resolve().parents[1] / "data" / "run_8302abb"  # a tiny Gemma run with a chat template
SETTINGS = dict(max_length=64, max_prompt_length=24, template="none")
PROMPTS = ["Human: how do I bake bread?\n\nAssistant:"] * 3 + ["Human: hi\n\nAssistant:", "Human: name a colour"]
COMPLETIONS = [" Mix flour, water and yeast.", " Use an oven.", " Yes.", " Hello! " * 30, " Blue."]


@pytest.fixture(scope="module", autouse=True)
def one_device_module(tmp_path_factory):
    """The module on one device (as `one_device`, for module-scoped fixtures): sharding is not the
    point here, and one device compiles and runs fastest; its own reference cache."""
    import jax

    devices = jax.devices()[:1]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(jax, "devices", lambda *args, **kwargs: devices)
        mp.setenv("HAF_JAX_CACHE", str(tmp_path_factory.mktemp("haf_jax_cache")))
        yield devices[0]


@pytest.fixture(scope="module")
def fn(one_device_module):
    return haf_jax.RewardFunction(str(RUN), batch_size=4, **SETTINGS)


def _score(directory, rows, **kw):
    """score's rows for explicit pairs `rows`."""
    path = directory / "pairs.jsonl"
    jsonl.write(str(path), rows)
    out = directory / "scores.jsonl"
    scoring.score(str(RUN), str(path), str(out), batch_size=4, **SETTINGS, **kw)
    return [json.loads(line) for line in out.read_text().splitlines()]


# Pairs whose chosen responses are the completions (rejected: the completion and more words): one
# `score --reference=initial --beta=0.5` pass gives every number the string tests compare with
# (reward_chosen, reward_rejected for the normalisation's reference set, the log-probs of both).
REF_ROWS = [{"prompt": p, "chosen": c, "rejected": c + " and more."} for p, c in zip(PROMPTS, COMPLETIONS)]


@pytest.fixture(scope="module")
def scored(one_device_module, tmp_path_factory):
    return _score(tmp_path_factory.mktemp("scored"), REF_ROWS, reference="initial", beta=0.5)


def test_equals_score_reward_chosen(fn, scored):
    expected = np.array([r["reward_chosen"] for r in scored])
    got = fn(PROMPTS, COMPLETIONS, answer=["ignored"] * 5)  # RL libraries pass extra keywords
    assert isinstance(got, list) and all(isinstance(x, float) for x in got)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.ptp(expected) > 1e-4  # the texts score differently: the order is checked
    # alone (no partner) or in another order: the same numbers
    np.testing.assert_allclose(fn(PROMPTS[4:], COMPLETIONS[4:]), expected[4:], atol=1e-5, rtol=0)
    np.testing.assert_allclose(fn(PROMPTS[::-1], COMPLETIONS[::-1]), expected[::-1], atol=1e-5, rtol=0)


def test_chat_messages(fn, tmp_path):
    prompts = [[{"role": "user", "content": "how do I bake bread?"}]] * 2 + [
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "?"}]
    ]
    completions = ["Mix flour and water.", [{"role": "assistant", "content": "Use an oven."}], "Fine."]
    rows = [
        {"prompt": p, "chosen": c if isinstance(c, list) else [{"role": "assistant", "content": c}]}
        for p, c in zip(prompts, completions)
    ]
    rows = [dict(r, rejected=[{"role": "assistant", "content": "filler"}]) for r in rows]
    expected = [r["reward_chosen"] for r in _score(tmp_path, rows)]
    np.testing.assert_allclose(fn(prompts, completions), expected, atol=1e-5, rtol=0)
    # rendered with the chat template: not the same as the bare texts
    plain = fn(["how do I bake bread?"], ["Mix flour and water."])
    assert abs(plain[0] - expected[0]) > 1e-5


def test_implicit_reward_and_length_penalty(scored):
    implicit = np.array([0.5 * (r["logp_chosen"] - r["ref_logp_chosen"]) for r in scored])
    dpo = haf_jax.RewardFunction(str(RUN), kind="dpo", beta=0.5, length_penalty=0.25, batch_size=4, **SETTINGS)
    tokens = dpo.model.tokenizer
    # response tokens as the data layer cuts them: the text, its EOS, at most max_length - prompt tokens
    n_tokens = [
        min(len(tokens(c, add_special_tokens=False)["input_ids"]) + 1, 64 - min(len(tokens(p)["input_ids"]), 24))
        for p, c in zip(PROMPTS, COMPLETIONS)
    ]
    np.testing.assert_allclose(dpo(PROMPTS, COMPLETIONS), implicit - 0.25 * np.array(n_tokens), atol=1e-4, rtol=0)
    assert np.abs(implicit).max() > 1e-3  # two training steps moved the LM head: the reference matters


def test_normalisation(fn, scored, tmp_path):
    ref = REF_ROWS
    raw = np.array([[r["reward_chosen"], r["reward_rejected"]] for r in scored]).ravel()
    path = tmp_path / "ref.jsonl"
    jsonl.write(str(path), ref)
    norm = haf_jax.RewardFunction(fn.model, normalize=str(path), batch_size=4, **SETTINGS)
    assert norm.normalization.pairs == len(ref)
    np.testing.assert_allclose([norm.normalization.mean, norm.normalization.std], [raw.mean(), raw.std()], rtol=1e-5)
    got = np.array(norm(PROMPTS, COMPLETIONS))
    np.testing.assert_allclose(got, (np.array(fn(PROMPTS, COMPLETIONS)) - raw.mean()) / raw.std(), atol=1e-5)
    given = haf_jax.RewardFunction(fn.model, normalize=(1.0, 2.0), **SETTINGS)
    np.testing.assert_allclose(given(PROMPTS, COMPLETIONS), (np.array(fn(PROMPTS, COMPLETIONS)) - 1) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="std must be finite and > 0"):
        haf_jax.RewardFunction(fn.model, normalize=(0.0, 0.0))


def test_bad_input(fn):
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        fn(["a", "b"], ["c"])
    with pytest.raises(ValueError, match=r"completions\[0\] must be a string"):
        fn(["a"], [3])
    with pytest.raises(ValueError, match="mix strings and chat messages"):
        fn(["a", [{"role": "user", "content": "b"}]], ["c", "d"])
    with pytest.raises(ValueError, match="unknown reward kind 'value'"):
        haf_jax.RewardFunction(fn.model, kind="value")
    assert fn([], []) == []
