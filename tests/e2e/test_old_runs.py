"""A run written by the flat-package code before the rooms redesign (tests/data/run_8302abb: its
README says how it was made) still resumes, scores, evaluates and exports with today's code, and
gives the numbers the old code recorded for it."""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest
from helpers.runs import eval_rows, train_in_process, train_rows

OLD_RUN = pathlib.Path(__file__).resolve().parents[1] / "data" / "run_8302abb"
# The overrides the old run was trained with (its README); the rest is configs/gemma.py's default.
OVERRIDES = (
    "--config.train.steps=4",
    "--config.train.eval_every=2",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=2",
    "--config.checkpoint.keep=2",
    "--config.train.batch_size=8",
    "--config.train.eval_batch_size=8",
)


@pytest.fixture
def old_run(tmp_path):
    """A writable copy of the old run (tests never touch tests/data)."""
    return pathlib.Path(shutil.copytree(OLD_RUN, tmp_path / "run"))


def test_old_run_resumes_with_the_losses_the_old_code_recorded(old_run, one_device):
    recorded = train_rows(OLD_RUN)
    train_in_process(old_run, *OVERRIDES)
    resumed = train_rows(old_run)
    for step in (3, 4):  # trained again from the old step-2 checkpoint
        for key in ("loss", "reward_loss", "policy_loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(recorded[step][key], rel=1e-4, abs=1e-6), (step, key)
    assert eval_rows(old_run)[4]["reward_accuracy"] == pytest.approx(eval_rows(OLD_RUN)[4]["reward_accuracy"])


def test_old_run_scores_evaluates_and_exports(old_run, one_device, tmp_path):
    from haf_jax.evaluation.export import export
    from haf_jax.evaluation.report import evaluate
    from haf_jax.evaluation.scoring import score

    step2 = eval_rows(OLD_RUN)[2]  # the old code's eval of its step-2 checkpoint (the best: the only one kept)
    summary = score(
        str(old_run), "run:eval", str(tmp_path / "scores.jsonl"), reference="initial", step="best", batch_size=8
    )
    assert summary["pairs"] == step2["pairs"]
    assert summary["reward_accuracy"] == pytest.approx(step2["reward_accuracy"], abs=1e-6)
    assert summary["dpo_accuracy"] == pytest.approx(step2["dpo_accuracy"], abs=1e-6)
    report = evaluate([str(old_run)], ["run:eval"], str(tmp_path / "eval"), steps=["best"], batch_size=8, figures=False)
    assert report["run_eval"]["reward_accuracy"] == pytest.approx(step2["reward_accuracy"], abs=1e-6)
    out = tmp_path / "export"
    export(str(old_run), str(out))
    for part, head in (("reward_model", "ForSequenceClassification"), ("policy", "ForCausalLM")):
        config = json.loads((out / part / "config.json").read_text())
        assert config["architectures"][0].endswith(head) and list((out / part).glob("*.safetensors")), part
