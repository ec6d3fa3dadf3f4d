"""CLI behaviour: haf_jax.score's library (evaluation.scoring: input order, skipped rows kept in place,
summary); train flag errors (the command in this process)."""

import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest
from helpers.commands import command

from haf_jax import data
from haf_jax.core import params as params_lib, sharding
from haf_jax.evaluation.scoring import score
from haf_jax.model import hf
from haf_jax.model.families import preset

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_score_keeps_input_order_and_reports_skipped_rows(tmp_path):
    cfg = dataclasses.replace(preset("tiny"), num_layers=1, layer_types=("full_attention",))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    params = jax.device_get(params_lib.init_params(cfg, jax.random.key(0), mesh))
    params["reward_head"] = np.random.default_rng(0).normal(size=params["reward_head"].shape).astype(np.float32)
    tok = data.load_tokenizer(str(data.sample_paths()["tokenizer"]))
    hf.save_hf(params, cfg, tmp_path / "rm", kind="reward_model", tokenizer=tok)
    records = [
        {"prompt": "Q: a?", "chosen": " yes it is", "rejected": " no", "id": "r0"},
        {"prompt": "Q: b?", "chosen": " same", "rejected": " same", "id": "r1"},  # identical: skipped
        {"prompt": "Q: c?", "chosen": " fine", "rejected": " bad answer here", "id": "r2"},
    ]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = score(
        str(tmp_path / "rm"), str(tmp_path / "pairs.jsonl"), str(tmp_path / "out.jsonl"), batch_size=2, max_length=64
    )
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rows] == [0, 1, 2]
    assert [r.get("id") for r in rows] == ["r0", None, "r2"]
    assert "skipped" in rows[1] and "reward_chosen" not in rows[1]
    assert summary["pairs"] == 2 and summary["skipped"] == 1
    margins = [r["reward_chosen"] - r["reward_rejected"] for r in (rows[0], rows[2])]
    assert summary["reward_accuracy"] == pytest.approx(np.mean([m > 0 for m in margins]))
    assert summary["mean_margin"] == pytest.approx(np.mean(margins), abs=1e-6)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.loss.nope=1", "unknown or invalid config key in --config.loss.nope=1"),
        ("--config.train.steps=abc", "--config.train.steps=abc"),
    ],
)
def test_train_cli_rejects_bad_config_overrides(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exited:
        command("haf_jax.train").invoke(
            ["haf_jax.train", f"--config={ROOT / 'configs' / 'gemma.py'}", f"--workdir={tmp_path}", override]
        )
    err = capsys.readouterr().err
    assert exited.value.code == 2
    assert message in err and "Traceback" not in err


def test_the_same_override_in_a_second_run_in_one_process(tmp_path, capsys):
    """Command.invoke runs a command as `python -m` would, also a second time in one process:
    config_flags defines a flag per `--config.KEY` it parses, which the next run must not define again
    (absl would refuse it as defined twice)."""
    argv = [
        "haf_jax.train",
        f"--config={ROOT / 'configs' / 'gemma.py'}",
        f"--workdir={tmp_path}",
        "--config.train.steps=abc",
    ]
    for _ in range(2):
        with pytest.raises(SystemExit) as exited:
            command("haf_jax.train").invoke(argv)
        err = capsys.readouterr().err
        assert exited.value.code == 2
        assert "--config.train.steps=abc: invalid literal for int()" in err and "defined twice" not in err, err
