"""Replication rules of a run (issue 23): "best" is the best evaluated step everywhere, and the
reference pass covers only the pairs the run's steps visit, extended when a longer run needs more.
Tiny in-process runs (tests/helpers/runs.py SMALL settings, 48 train / 16 eval pairs) that differ in
train.steps alone: a constant learning rate keeps the step count out of the compiled train step, so
with the session's persistent compilation cache (tests/conftest.py) the module compiles each program once."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers.runs import REPO, SMALL, eval_rows, load_config, train_in_process

# lr 0.05 (constant) moves the tiny model enough in a few steps for evals to differ (measured reward
# accuracy at steps 2/4/6/8: 0.375/0.4375/0.4375/0.375, so the best is step 4, tied with 6); evals every 2
# steps, periodic saves never (100 > steps) and one kept: only "best" keeps an earlier step
RUN = [
    *SMALL,
    "--config.optim.schedule=constant",
    "--config.optim.learning_rate=0.05",
    "--config.train.eval_every=2",
    "--config.checkpoint.every_steps=100",
    "--config.checkpoint.keep=1",
]
pytestmark = pytest.mark.usefixtures("one_device")


def test_step_best_loads_the_step_summary_names(small_data, tmp_path):
    """Evals every 2 steps, a periodic save only at the end and one kept: before, "best" could
    only be the step 8 save; now every new best eval is saved and kept, and --step=best loads the step
    summary.json names."""
    from haf_jax.evaluation.loading import default_mesh, load_model

    workdir = tmp_path / "run"
    summary = train_in_process(workdir, *RUN, f"--config.data.train={small_data}", "--config.train.steps=8")
    best = summary["best"]["step"]
    evals = eval_rows(workdir)
    accuracies = [evals[s]["reward_accuracy"] for s in sorted(evals)]
    # these settings make the best an earlier step than the last (the case the old policy got wrong),
    # and the first to reach the best accuracy (ties keep the earliest, as TRL does)
    assert best < 8 and evals[best]["reward_accuracy"] == max(accuracies)
    assert best == min(s for s in evals if evals[s]["reward_accuracy"] == max(accuracies))
    kept = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [best, 8]
    assert json.loads((workdir / "summary.json").read_text())["best"]["step"] == best
    assert load_model(str(workdir), default_mesh(), which="best").step == best


def test_reference_pass_covers_the_visited_pairs_and_extends(small_data, tmp_path, capsys):
    """3 steps of 4 pairs visit 12 of the 48 train pairs: only those get reference log-probs; a 6-step
    run on the same data and weights computes the pairs of steps 4-6 alone and extends the cache;
    every computed row equals a full in-order pass of the initial model (bit for bit: each pair is
    computed in the batch shape the full pass gives it)."""
    from haf_jax.core import forward
    from haf_jax.core.model_setup import initial_params
    from haf_jax.evaluation.evaluator import compute
    from haf_jax.training import setup

    workdir = tmp_path / "run"
    base = [*RUN, f"--config.data.train={small_data}", "--config.train.eval_every=100"]  # one eval, at the end
    train_in_process(workdir, *base, "--config.train.steps=3")
    first = np.load(workdir / "reference_train.npy")
    assert "(train, the 12 of 48 pairs steps 1-3 visit): 12 computed, 0 cached" in capsys.readouterr().err
    config = load_config(str(REPO / "configs/gemma.py"), *base, "--config.train.steps=6")
    s = setup.build(config, None)
    loader = setup.train_loader(s)
    visited = {n: set(loader.pairs_of_steps(1, n).tolist()) for n in (3, 6)}
    batches = [next(loader)["index"].tolist() for _ in range(6)]
    loader.close()
    assert visited[3] == set(sum(batches[:3], [])) and visited[6] == set(sum(batches, []))
    assert set(np.flatnonzero(~np.isnan(first).any(axis=1)).tolist()) == visited[3]

    longer = tmp_path / "longer"  # a longer run on the same data and weights: the shared cache is extended
    train_in_process(longer, *base, "--config.train.steps=6")
    new = len(visited[6] - visited[3])
    assert f"(train, the {len(visited[6])} of 48 pairs steps 1-6 visit): {new} computed, 12 cached" in (
        capsys.readouterr().err
    )
    second = np.load(longer / "reference_train.npy")
    assert set(np.flatnonzero(~np.isnan(second).any(axis=1)).tolist()) == visited[6]
    rows = sorted(visited[3])
    np.testing.assert_array_equal(second[rows], first[rows])  # extended, not recomputed

    params0 = initial_params(config, s.model_config, s.model_path, s.mesh)
    ref_fn, keys = forward.jit_reference(s.step_cfg, s.mesh, s.param_shardings)
    put = lambda b: forward.put_batch(b, keys=keys, mesh=s.mesh)
    full = compute(s.train_ds, params0, ref_fn, put, batch_size=config.train.eval_batch_size)
    rows = sorted(visited[6])
    np.testing.assert_array_equal(second[rows], full[rows])
