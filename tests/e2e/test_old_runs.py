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


def test_run_without_split_seed_keeps_its_train_seed_carve(small_data, one_device, tmp_path, capsys):
    """A run written before data.split_seed carved its eval split with train.seed. One with train.seed=3
    (made here: a run with split_seed=3, the key then removed from its saved config) resumes under today's
    default split_seed=0 on the seed-3 carve: the resumed steps and eval repeat the uninterrupted run's
    numbers (the seed-0 carve trains on other pairs; a resume that compared split_seed 3 with 0 is refused)."""
    from helpers.runs import SMALL

    run = [*SMALL, f"--config.data.train={small_data}", "--config.train.seed=3", "--config.train.steps=4"]
    run += ["--config.train.eval_every=2", "--config.checkpoint.every_steps=2", "--config.checkpoint.keep=2"]
    straight = tmp_path / "straight"
    train_in_process(straight, *run, "--config.data.split_seed=3")
    old = pathlib.Path(shutil.copytree(straight, tmp_path / "old"))
    for step in (old / "checkpoints").iterdir():  # resume from step 2, as an interrupted run would
        if step.name.isdigit() and int(step.name) > 2:
            shutil.rmtree(step)
    (old / "summary.json").unlink()
    saved = old / "checkpoints" / "2" / "config" / "metadata"
    config = json.loads(saved.read_text())
    assert config["data"].pop("split_seed") == 3 and config["train"]["seed"] == 3
    saved.write_text(json.dumps(config))  # as the code before data.split_seed wrote it
    capsys.readouterr()

    train_in_process(old, *run)  # data.split_seed left at its default, 0
    logged = capsys.readouterr().err
    assert "was written before data.split_seed: its eval carve keeps train.seed, split_seed=3" in logged
    expected, resumed = train_rows(straight), train_rows(old)
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in (3, 4):
        for key in ("loss", "reward_loss", "policy_loss", "grad_norm"):
            assert resumed[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-7), (step, key)
    for key in ("pairs", "reward_accuracy", "log_loss", "reward_margin"):
        assert eval_rows(old)[4][key] == pytest.approx(eval_rows(straight)[4][key], rel=1e-6), key
