"""haf_jax.bon: Best-of-N scores equal what haf_jax.score gives the same text as a chosen response
and what transformers' sequence classifier gives the token sequence of the data contract; the
pick is the argmax (lowest index on ties); two reward models' agreement on a constructed case;
the paper's length rule (a prompt with an over-long candidate dropped, the others scored whole) at
its boundary; the judge's wins / ties / losses on cases whose answer follows from how the models
were built, and its Wilson intervals against SciPy; bad candidate files; the command end to end
(sampling from a policy with the distinct rule, two reward models and a judge)."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers as T
from helpers.commands import command
from helpers.parity import perturb
from helpers.word_models import BOS, EOS, V, build_causal_lm, word_tokenizer

from haf_jax.core import sharding
from haf_jax.data import DataError
from haf_jax.evaluation import scoring as score_lib
from haf_jax.generation import best_of_n as bon

T.logging.set_verbosity_error()

TEMPLATE = "phi2"  # "Instruct: {x}\nOutput:" and a response prefix " ": both must reach the tokens
MAX_LENGTH, MAX_PROMPT = 24, 8


def _reward_model(directory, seed, sign=1.0):
    """A perturbed tiny Llama reward model (tied head, so the directory also has the LM head);
    `sign=-1` negates its score head: the same trunk ranking every candidate the other way."""
    config = T.LlamaConfig(
        vocab_size=V,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=None,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        num_labels=1,
    )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = perturb(T.LlamaForSequenceClassification(config), seed=seed).eval()
    with torch.no_grad():
        model.score.weight.mul_(sign)
    model.save_pretrained(directory, safe_serialization=True)
    word_tokenizer().save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def rms(tmp_path_factory):
    root = tmp_path_factory.mktemp("rms")
    return {name: (root / name, _reward_model(root / name, 7, sign)) for name, sign in (("rm", 1.0), ("neg", -1.0))}


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


ROWS = [
    {"prompt": "w10 w11 w12", "id": "a", "candidates": ["w5 w6 w7", "w20", "w30 w31 w32 w33 w34"]},
    # the middle candidate is cut to the response budget (24 - 8 prompt tokens), keeping its EOS
    {
        "prompt": "w40 w41 w42 w43 w44 w45 w46 w47 w48 w49",
        "candidates": ["w50 w51", " ".join(f"w{i}" for i in range(60, 80)), "w90", "w91 w92"],
    },
    {"prompt": "w100", "candidates": ["w7 w7", "w7 w7", ""]},  # a tie and an empty candidate
]


def _contract_ids(prompt, candidate):
    """The data contract written out: BOS + tok(template(prompt)) keeping its end (8 tokens in all),
    + tok(" " + candidate) cut to the remaining budget keeping the EOS; "Instruct:" and "Output:"
    are unknown words here (id 0)."""
    words = lambda text: [int(w[1:]) if w.startswith("w") else 0 for w in text.split()]
    prompt_ids = [BOS] + words(f"Instruct: {prompt}\nOutput:")[-(MAX_PROMPT - 1) :]
    response = words(" " + candidate) + [EOS]
    budget = MAX_LENGTH - len(prompt_ids)
    return prompt_ids + (response if len(response) <= budget else response[: budget - 1] + [EOS])


def test_scores_equal_score_and_transformers_and_pick_is_argmax(rms, mesh, tmp_path):
    rm_dir, rm_torch = rms["rm"]
    out, summary = bon.best_of_n(
        [str(rm_dir)],
        ROWS,
        length_rule="truncate",  # score's cut: every prompt kept (the paper's "drop": the next test)
        template=TEMPLATE,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
        batch_size=2,
        mesh=mesh,
    )
    assert [r["prompt"] for r in out] == [r["prompt"] for r in ROWS] and out[0]["id"] == "a"

    # transformers' classifier on the contract's token sequence of each candidate
    for row in out:
        want = []
        for c in row["candidates"]:
            with torch.no_grad():
                want.append(rm_torch(input_ids=torch.tensor([_contract_ids(row["prompt"], c)])).logits[0, 0].item())
        np.testing.assert_allclose(row["scores"], want, atol=2e-5, rtol=1e-5)
        assert row["pick"] == int(np.argmax(want)) and row["best"] == row["candidates"][row["pick"]]
    assert len(set(out[1]["scores"])) == 4  # distinct scores: the argmax is not by construction
    assert out[2]["scores"][0] == out[2]["scores"][1] and out[2]["pick"] in (0, 2)  # tie -> lowest index
    assert np.isfinite(out[2]["scores"][2])
    assert summary["mean_best_score"] == pytest.approx(np.mean([max(r["scores"]) for r in out]), abs=1e-6)
    assert summary["truncated_pairs"] == 1  # scoring pairs (2 candidates each) with a candidate cut

    # haf_jax.score on pairs whose chosen response is the candidate (it skips an empty response)
    pairs = tmp_path / "pairs.jsonl"
    kept = [(i, j) for i, r in enumerate(ROWS) for j, c in enumerate(r["candidates"]) if c]
    pairs.write_text(
        "".join(
            json.dumps({"prompt": ROWS[i]["prompt"], "chosen": ROWS[i]["candidates"][j], "rejected": "w3 w4"}) + "\n"
            for i, j in kept
        )
    )
    scored = tmp_path / "scored.jsonl"
    score_lib.score(
        str(rm_dir),
        str(pairs),
        str(scored),
        template=TEMPLATE,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
        batch_size=4,
    )
    rewards = [json.loads(line)["reward_chosen"] for line in scored.read_text().splitlines()]
    np.testing.assert_allclose([out[i]["scores"][j] for i, j in kept], rewards, atol=1e-5, rtol=1e-6)


def test_two_reward_models_agreement(rms, mesh):
    """The second model is the first with its reward head negated: its pick is the worst candidate,
    so the picks agree only on the row whose candidates all tie (1 of 3)."""
    rows = [
        {"prompt": "w10", "candidates": ["w5 w6", "w5 w6"]},
        {"prompt": "w11 w12", "candidates": ["w20 w21", "w22", "w23 w24 w25"]},
        {"prompt": "w13", "candidates": ["w30", "w31 w32"]},
    ]
    out, summary = bon.best_of_n(
        [str(rms["rm"][0]), str(rms["neg"][0])],
        rows,
        length_rule="truncate",
        template="none",
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
        mesh=mesh,
    )
    for r in out:
        np.testing.assert_allclose(r["scores2"], -np.array(r["scores"]), atol=1e-6)
        assert r["pick"] == int(np.argmax(r["scores"])) and r["pick2"] == int(np.argmin(r["scores"]))
    assert [r["pick"] == r["pick2"] for r in out] == [True, False, False]
    assert summary["picks_agree"] == pytest.approx(1 / 3) and summary["picks_agree_count"] == 1
    assert summary["mean_score2_of_pick"] == pytest.approx(-summary["mean_best_score"], abs=1e-6)


def test_length_rule_drops_prompts_with_an_over_long_candidate(rms, mesh):
    """The paper's rule at its boundary: "w100" is BOS + Instruct: w100 Output: (4 tokens), a
    candidate of k words adds k + 1 (the EOS), so 19 words make 24 = MAX_LENGTH tokens (kept) and
    20 make 25 (the prompt is dropped). A 10-word prompt (13 tokens, more than MAX_PROMPT) is scored
    whole, not cut as with length_rule="truncate"; a row short of n distinct candidates is dropped
    too."""
    rm_dir, rm_torch = rms["rm"]
    words = lambda k, start: " ".join(f"w{i}" for i in range(start, start + k))
    long_prompt = words(10, 40)
    rows = [
        {"prompt": "w100", "candidates": [words(19, 200), "w5"]},
        {"prompt": "w100", "candidates": ["w5", words(20, 200)]},
        {"prompt": long_prompt, "candidates": ["w50 w51", "w52"]},
        {"prompt": "w101", "candidates": ["w6"], "short_of_n": True},
    ]
    out, summary = bon.best_of_n(
        [str(rm_dir)], rows, template=TEMPLATE, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, mesh=mesh
    )
    assert [r.get("dropped") for r in out] == [None, "over_max_length", None, "short_of_n"]
    assert "scores" not in out[1] and "pick" not in out[3] and out[1]["candidates"] == rows[1]["candidates"]
    assert summary["scored_prompts"] == 2 and summary["dropped_over_max_length"] == 1
    assert summary["dropped_short_of_n"] == 1 and "truncated_pairs" not in summary

    ids = lambda prompt, c: (
        [BOS] + [int(w[1:]) if w.startswith("w") else 0 for w in f"Instruct: {prompt}\nOutput: {c}".split()] + [EOS]
    )
    for r in (out[0], out[2]):
        with torch.no_grad():
            want = [
                rm_torch(input_ids=torch.tensor([ids(r["prompt"], c)])).logits[0, 0].item() for c in r["candidates"]
            ]
        np.testing.assert_allclose(r["scores"], want, atol=2e-5, rtol=1e-5)
    assert len(ids(rows[0]["prompt"], rows[0]["candidates"][0])) == MAX_LENGTH  # the boundary case is kept
    assert len(ids(long_prompt, "w52")) > MAX_PROMPT + 2  # that prompt would have been cut by "truncate"
    with pytest.raises(ValueError, match="every prompt was dropped"):
        bon.best_of_n([str(rm_dir)], rows[1:2], template=TEMPLATE, max_length=MAX_LENGTH, mesh=mesh)


JUDGED_ROWS = [
    {"prompt": "w10", "candidates": ["w5 w6", "w5 w6"]},  # one text twice: the picks are the same text
    {"prompt": "w11 w12", "candidates": ["w20 w21", "w22", "w23 w24 w25"]},
    {"prompt": "w13", "candidates": ["w30", "w31 w32"]},
    {"prompt": "w14 w15", "candidates": ["w40", "w41", "w42 w43", "w44"]},
]


@pytest.mark.parametrize("order", ["rm_first", "neg_first"])
def test_judge_counts_on_a_case_with_a_known_answer(rms, mesh, order):
    """The judge is `rm` itself and the other model is `rm` with its head negated: `rm`'s pick is
    the judge's favourite and `neg`'s its least liked, so `rm` wins every prompt whose candidates
    differ and ties the one whose two candidates are the same text; swapping the models turns every
    win into a loss."""
    rm, neg = str(rms["rm"][0]), str(rms["neg"][0])
    models = [rm, neg] if order == "rm_first" else [neg, rm]
    out, summary = bon.best_of_n(
        models, JUDGED_ROWS, judge=rm, template="none", max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT, mesh=mesh
    )
    first_wins = order == "rm_first"
    want = ["tie"] + ["win" if first_wins else "loss"] * 3
    assert [r["judge_verdict"] for r in out] == want
    for r in out:
        assert r["judge_scores"] == r["scores" if first_wins else "scores2"]  # the judge is rm, scored alike
        assert len(set(r["judge_scores"])) == len(set(r["candidates"]))  # distinct texts, distinct scores
    judged = summary["judge"]
    assert (judged["wins"], judged["ties"], judged["losses"]) == ((3, 1, 0) if first_wins else (0, 1, 3))
    assert judged["judged"] == 4 and judged["model"] == rm and judged["interval"] == "Wilson score interval, 95%"
    assert judged["decisive_win_rate"] == (1.0 if first_wins else 0.0)
    # a margin wider than every judge score gap turns every verdict into a tie
    gap = max(max(r["judge_scores"]) - min(r["judge_scores"]) for r in out)
    wide, _ = bon.best_of_n(
        models, JUDGED_ROWS, judge=rm, judge_margin=gap, template="none", max_length=MAX_LENGTH, mesh=mesh
    )
    assert [r["judge_verdict"] for r in wide] == ["tie"] * 4


def test_judge_summary_and_wilson_interval_against_scipy():
    from scipy.stats import binomtest

    verdicts = ["win"] * 7 + ["tie"] * 2 + ["loss"] * 3
    got = bon.judge_summary(verdicts)
    assert (got["wins"], got["ties"], got["losses"], got["judged"]) == (7, 2, 3, 12)
    for key, k, n in (("win", 7, 12), ("tie", 2, 12), ("loss", 3, 12)):
        assert got[f"{key}_fraction"] == pytest.approx(k / n)
        want = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        np.testing.assert_allclose(got[f"{key}_fraction_ci"], [want.low, want.high], rtol=1e-9)
    want = binomtest(7, 10).proportion_ci(method="wilson")
    assert got["decisive_win_rate"] == pytest.approx(0.7)
    np.testing.assert_allclose(got["decisive_win_rate_ci"], [want.low, want.high], rtol=1e-9)
    for k, n in ((0, 5), (5, 5), (1, 1), (40, 1000)):  # the edges keep a width
        want = binomtest(k, n).proportion_ci(method="wilson")
        np.testing.assert_allclose(bon.wilson_interval(k, n), [want.low, want.high], rtol=1e-9, atol=1e-12)
    assert "decisive_win_rate" not in bon.judge_summary(["tie", "tie"])
    assert bon.verdict("a", "a", 0.0, 5.0) == "tie"  # the same text: no judging
    assert bon.verdict("a", "b", 1.0, 0.5) == "win" and bon.verdict("a", "b", 0.5, 1.0) == "loss"
    assert bon.verdict("a", "b", 1.0, 0.5, margin=0.5) == "tie"


@pytest.mark.parametrize(
    "row,message",
    [
        ({"candidates": ["a"]}, r"c\.jsonl line 2, field 'prompt': missing"),
        ({"prompt": "p"}, r"c\.jsonl line 2, field 'candidates': missing"),
        ({"prompt": "p", "candidates": []}, r"c\.jsonl line 2, field 'candidates': expected a non-empty list"),
        (
            {"prompt": "p", "candidates": "a b"},
            r"c\.jsonl line 2, field 'candidates': expected a non-empty list of strings, got str",
        ),
        (
            {"prompt": "p", "candidates": ["a", None]},
            r"c\.jsonl line 2, field 'candidates\[1\]': expected a string, got null",
        ),
    ],
)
def test_bad_candidates_file(tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "candidates": ["x"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(DataError, match=message):
        bon.read_candidates(str(path))


@pytest.mark.slow
def test_bon_cli_samples_and_scores(rms, one_device, tmp_path, capsys):
    """The command (in this process, on one device) samples from a policy (as haf_jax.sample does,
    distinct candidates by default) and scores with two models and a judge; --judge alone is a
    usage error."""
    policy = tmp_path / "policy"
    build_causal_lm("llama", policy)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("w5 w6", "w7 w8 w9 w10", "w11")))
    out = tmp_path / "bon.jsonl"
    argv = [
        "haf_jax.bon",
        f"--reward_model={rms['rm'][0]}",
        f"--reward_model2={rms['neg'][0]}",
        f"--judge={rms['rm'][0]}",
        f"--prompts={prompts}",
        f"--policy={policy}",
        "--n=3",
        "--max_new_tokens=5",
        f"--out={out}",
    ]
    command("haf_jax.bon").invoke(argv)  # exit 0: no SystemExit
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["w5 w6", "w7 w8 w9 w10", "w11"]
    assert summary["sampling"]["n"] == 3 and summary["sampling"]["distinct"] is True
    kept = [r for r in rows if "dropped" not in r]
    assert summary["scored_prompts"] == len(kept) >= 1 and summary["length_rule"] == "drop"
    for r in kept:
        assert len(r["candidates"]) == len(r["candidate_ids"]) == len(r["scores"]) == len(r["scores2"]) == 3
        assert len({c.strip() for c in r["candidates"]}) == 3 and 3 <= r["draws"] <= 6
        assert r["pick"] == int(np.argmax(r["scores"])) and r["best"] == r["candidates"][r["pick"]]
        assert r["judge_verdict"] == ("tie" if r["pick"] == r["pick2"] else "win")  # the judge is rm
    agree = np.mean([r["pick"] == r["pick2"] for r in kept])
    assert summary["picks_agree"] == pytest.approx(agree)
    assert summary["judge"]["wins"] + summary["judge"]["ties"] == len(kept) and summary["judge"]["losses"] == 0

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        command("haf_jax.bon").invoke([a for a in argv if not a.startswith("--reward_model2")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "error: --judge compares two reward models' picks" in err, err
