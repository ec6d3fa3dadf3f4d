"""The one evaluation path: the training loop, `score` and `evaluate` agree on the same pairs;
inference restores parameters only; reports, figures and RewardBench through a trained run.

One tiny run (2 steps of 8 pairs, max_length 48) trained in-process is shared by the module.
"""

import gzip
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from haf_jax import data
from haf_jax.checkpoint.manager import Checkpointer
from haf_jax.core import losses, sharding
from haf_jax.data import jsonl
from haf_jax.evaluation import loading, plots, rewardbench
from haf_jax.evaluation.report import evaluate
from haf_jax.evaluation.scoring import score
from haf_jax.training.metrics import MetricsLog, read_rows

REPO = pathlib.Path(__file__).resolve().parents[2]
RB_V1, RB_V2 = REPO / "tests" / "data" / "rewardbench_v1.jsonl", REPO / "tests" / "data" / "rewardbench_v2.jsonl"
MAX_LENGTH, MAX_PROMPT = 48, 24


def _config(load_config, train, eval_):
    c = load_config("configs/gemma.py:tiny")
    c.data.train, c.data.eval = str(train), str(eval_)
    c.data.max_length, c.data.max_prompt_length = MAX_LENGTH, MAX_PROMPT
    c.train.steps, c.train.batch_size, c.train.eval_every, c.train.eval_batch_size = 2, 8, 2, 8
    c.checkpoint.every_steps = 2
    return c


@pytest.fixture(scope="module")
def run(tmp_path_factory, load_config):
    from haf_jax.training.loop import train

    root = tmp_path_factory.mktemp("evaluate")
    rows = [json.loads(line) for line in gzip.open(data.sample_paths()["data"], "rt")][:24]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[16:]))
    old = os.environ.get("HAF_JAX_CACHE")
    os.environ["HAF_JAX_CACHE"] = str(root / "cache")
    try:
        train(_config(load_config, root / "train.jsonl", root / "eval.jsonl"), root / "run")
    finally:
        if old is None:
            os.environ.pop("HAF_JAX_CACHE")
        else:
            os.environ["HAF_JAX_CACHE"] = old
    return root


KEYS = ("reward_accuracy", "dpo_accuracy", "reward_margin", "implicit_margin", "ece", "brier", "log_loss")


def _never(*args, **kwargs):
    raise AssertionError("inference must not restore the whole train state (optimizer state included)")


def test_loop_score_and_evaluate_agree_and_evaluate_writes_its_report(run, tmp_path, monkeypatch):
    monkeypatch.setattr(Checkpointer, "restore", _never)  # score/evaluate: parameters only
    loop_row = [r for r in read_rows(run / "run" / "metrics.jsonl") if r.get("split") == "eval"][-1]
    assert loop_row["step"] == 2 and loop_row["pairs"] == 8
    report = evaluate([str(run / "run")], ["run:eval"], str(tmp_path / "out"), steps=["last", "initial"], batch_size=8)
    assert list(report) == ["run_eval"]  # one key per dataset
    entry = report["run_eval"]
    assert entry["checkpoint"] == "last" and entry["step"] == 2 and entry["pairs"] == 8 and entry["ece_bins"] == 15
    for key in KEYS:
        assert entry[key] == pytest.approx(loop_row[key], abs=1e-6), key
    untrained = entry["models"]["run"]["initial"]  # zero reward head, policy = reference
    assert untrained["reward_accuracy"] == 0.0 and untrained["dpo_accuracy"] == 0.0
    assert untrained["log_loss"] == pytest.approx(np.log(2), abs=1e-6) and untrained["reward_length_corr"] is None
    s = score(
        str(run / "run"),
        str(run / "eval.jsonl"),
        str(tmp_path / "scores.jsonl"),
        reference="initial",
        step="last",
        batch_size=8,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
    )
    for key, loop_key in (
        ("reward_accuracy", "reward_accuracy"),
        ("dpo_accuracy", "dpo_accuracy"),
        ("mean_margin", "reward_margin"),
        ("mean_implicit_margin", "implicit_margin"),
        ("ece", "ece"),
        ("log_loss", "log_loss"),
    ):
        assert s[key] == pytest.approx(loop_row[loop_key], abs=1e-6), key
    rows = [json.loads(line) for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    margins = np.array([r["reward_chosen"] - r["reward_rejected"] for r in rows])
    assert np.mean(margins) == pytest.approx(loop_row["reward_margin"], abs=1e-6)
    assert float(losses.calibration(margins)["brier"]) == pytest.approx(loop_row["brier"], abs=1e-6)

    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text())["run_eval"]["pairs"] == 8
    md = (out / "report.md").read_text()
    assert "| run | last | 2 | 8 |" in md and "15 equal-width bins" in md
    for fig in ("reliability", "reward_histograms", "reward_vs_length"):
        png = out / "figures" / "run_eval" / "run-last" / f"{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png


def test_inference_restores_parameters_only(run, monkeypatch):
    import orbax.checkpoint as ocp

    restored = []
    real = ocp.PyTreeCheckpointHandler.restore

    def spy(self, directory, *args, **kwargs):
        out = real(self, directory, *args, **kwargs)
        restored.append(out)
        return out

    monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "restore", spy)
    monkeypatch.setattr(Checkpointer, "restore", _never)
    mesh = sharding.make_mesh((1, -1, 1))
    loaded = loading.load_model(str(run / "run"), mesh, which="last", float32=True)
    params = loaded.params
    assert loaded.step == 2 and len(restored) == 1
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(restored[0])[0]]
    assert paths and all(p.startswith("['params']") for p in paths)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))
    assert nbytes(restored[0]) == nbytes(params)
    # What was left on disk: Adam's two moments, twice the parameters' bytes, never read.
    layout = json.loads((run / "run" / "checkpoints" / "2" / "meta" / "metadata").read_text())["layout"]
    opt_bytes = sum(
        np.prod(shape) * np.dtype(dtype).itemsize
        for k, (shape, dtype) in layout.items()
        if k.startswith("['opt_state']")
    )
    assert opt_bytes >= 2 * nbytes(params)
    # The compute dtype: the trunk cast, the heads kept in float32 (as the training forward pass).
    cast = loading.cast_trunk(params, "bfloat16")
    assert cast["reward_head"].dtype == np.float32 and cast["embed_tokens"].dtype == jax.numpy.bfloat16


def test_rewardbench_through_a_run_matches_score_rows(run, tmp_path, monkeypatch):
    monkeypatch.setattr(Checkpointer, "restore", _never)
    report = evaluate(
        [str(run / "run")],
        [f"rewardbench:{RB_V1}", f"rewardbench2:{RB_V2}"],
        str(tmp_path / "rb"),
        steps=["last"],
        batch_size=8,
        figures=False,
    )
    v1, v2 = report["rewardbench"], report["rewardbench2"]
    assert v1["rows"] == 18 and v1["pairs"] == 18 and v2["rows"] == 9 and v2["pairs"] == 23
    assert set(v1["sections"]) == {"Chat", "Chat Hard", "Safety", "Reasoning"} and "score_with_prior_sets" in v1
    assert set(v2["subsets"]) == {"Factuality", "Math", "Ties"} and "dpo" in v1 and "dpo" in v2
    # The same numbers from `score`'s per-pair rewards and the scoring functions.
    rows = rewardbench.read_v1(str(RB_V1))
    records, index = rewardbench.pair_records(rows, 1)
    pairs = str(tmp_path / "v1_pairs.jsonl")
    jsonl.write(pairs, records)
    score(
        str(run / "run"),
        pairs,
        str(tmp_path / "v1_scores.jsonl"),
        step="last",
        batch_size=8,
        max_length=MAX_LENGTH,
        max_prompt_length=MAX_PROMPT,
    )
    scored = [json.loads(line) for line in (tmp_path / "v1_scores.jsonl").read_text().splitlines()]
    expect = rewardbench.score_rows(rows, index, [[r["reward_chosen"], r["reward_rejected"]] for r in scored], 1)
    assert v1["subsets"] == pytest.approx(expect["subsets"]) and v1["score"] == pytest.approx(expect["score"])
    # Two datasets: the out-of-distribution grid (model x dataset).
    grid = json.loads((tmp_path / "rb" / "ood_grid.json").read_text())["reward_accuracy"]
    assert grid["models"] == ["run"] and grid["datasets"] == ["rewardbench", "rewardbench2"]
    assert grid["values"] == [[pytest.approx(v1["reward_accuracy"]), pytest.approx(v2["reward_accuracy"])]]
    assert "| run |" in (tmp_path / "rb" / "ood_grid.md").read_text()


def test_figures_have_the_expected_axes_and_reach_tensorboard(tmp_path):
    rng = np.random.default_rng(0)
    scores = {"reward": rng.normal(size=(40, 2)), "n_tokens": rng.integers(1, 60, size=(40, 2))}
    figs = plots.eval_figures(scores, title="t")
    labels = {name: [(ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes] for name, fig in figs.items()}
    assert labels["reliability"][0][1] == "accuracy" and labels["reliability"][0][0].startswith("confidence")
    assert labels["reward_histograms"][:2] == [
        ("reward", "responses"),
        ("reward margin r_chosen - r_rejected", "pairs"),
    ]
    assert labels["reward_vs_length"] == [("response length (tokens)", "reward")]
    grid = plots.accuracy_heatmap(np.array([[0.7, np.nan]]), ["m"], ["a", "b"])
    assert (grid.axes[0].get_xlabel(), grid.axes[0].get_ylabel()) == ("test data", "model (trained on)")
    log = MetricsLog(tmp_path)
    tags = log.write_figures(5, lambda: plots.eval_figures(scores))
    log.close()
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert tags == ["eval/reliability", "eval/reward_histograms", "eval/reward_vs_length"]
    assert all(t.encode() in events for t in tags) and b"PNG" in events
