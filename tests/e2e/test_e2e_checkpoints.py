"""End-to-end tests of `haf_jax.train`: resume, preemption, failures, config changes, the
metrics.jsonl contract, and `haf_jax.export` / `haf_jax.score` against transformers.

The runs train the small config of tests/helpers/runs.py (the tiny preset, 48 train / 16 eval pairs,
24 steps of 4 pairs) on one CPU device. Runs that are killed or signalled, and the runs whose
numbers are compared bit for bit with run A, are real `python -m haf_jax.train` children (an
in-process run sees the 8 fake devices of tests/conftest.py while it uses one, and its float
rounding differs from a one-device child's from step 2 on). Everything else runs in this process,
on one device (`one_device`), with no second jax/orbax/transformers import: config refusals, the
NaN guard, the already-complete resume, the profiled run and the bad profile range (the command,
`Runner.invoke_train`), the resume with scanned layers (compared to float rounding), and export and
score (their libraries). One uninterrupted run ("run A", tests/e2e/conftest.py) is shared by every
test that only reads it or works on a copy; under pytest-xdist a file lock makes the workers build
it once. The children share a persistent JAX compilation cache, so only the first run compiles.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time

import numpy as np
import pytest
from helpers.runs import (
    EVAL_EVERY,
    EVERY,
    REPO,
    SMALL,
    STEPS,
    assert_same_losses,
    committed_steps,
    copy_run,
    eval_rows,
    kill_after_checkpoint,
    load_config,
    no_traceback,
    score_rows,
    train_in_process,
    train_rows,
    transformers_scores,
    wait_until,
)

from haf_jax.training.resume import RunError

# ----------------------------------------------------------------------------- tests


def test_metrics_contract(run_a):
    """Step 1 reflects the initial model; eval rows carry split; TensorBoard events exist."""
    r = train_rows(run_a)
    assert sorted(r) == list(range(1, STEPS + 1))  # log_every=1
    first = r[1]
    assert abs(first["reward_loss"] - math.log(2)) <= 1e-5
    assert abs(first["policy_loss"] - math.log(2)) <= 1e-5
    assert first["reward_accuracy"] == 0
    for key in ("loss", "reward_loss", "policy_loss", "reward_accuracy", "compile_s"):
        assert all(key in row for row in r.values()), key
    # step 1 compiles: its time is compile_s, not a rate; later rows report rates of real steps only
    assert first["compile_s"] > 0 and "pairs_per_s" not in first and "mfu" not in first
    steady = [row for row in r.values() if "pairs_per_s" in row]
    assert len(steady) >= STEPS // 2
    for row in steady:
        assert row["pairs_per_s"] * row["step_s"] == pytest.approx(4, rel=1e-6)  # 4 real pairs a step
        assert row["tokens_per_s"] > row["pairs_per_s"] * 2 * 8  # each pair has two sequences of > 8 tokens
        assert 0 < row["mfu"] < 1  # the step's FLOPs over its time and this host's measured peak
    ev = eval_rows(run_a)
    assert sorted(ev) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    for row in ev.values():
        assert row["split"] == "eval" and row["pairs"] == 16 and 0 <= row["reward_accuracy"] <= 1
    assert list(run_a.glob("**/events.out.tfevents.*")), "no TensorBoard event files in the workdir"
    summary = json.loads((run_a / "summary.json").read_text())
    assert summary["last"]["step"] == STEPS and summary["last"]["reward_accuracy"] == ev[STEPS]["reward_accuracy"]


def test_profiler_trace_of_chosen_steps(runner, small_data, one_device, tmp_path, capsys):
    """train.profile_steps=2-3 leaves a trace that TensorBoard's profile plugin and Perfetto open;
    a bad range is the command's one error line and exit status 2."""
    workdir = tmp_path / "run"
    train_in_process(
        workdir,
        f"--config.data.train={small_data}",
        *SMALL,
        "--config.train.steps=4",
        "--config.train.profile_steps=2-3",
    )
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((workdir / "profile").rglob("*.trace.json.gz"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        runner.invoke_train(tmp_path / "bad", "--config.train.steps=4", "--config.train.profile_steps=3-1")
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "train.profile_steps='3-1'" in err and "Traceback" not in err


def test_sigkill_and_resume_is_bit_exact(run_a, runner, tmp_path):
    """SIGKILL once a checkpoint after the first eval is committed (so the restart must also carry
    the pre-kill evals into its summary); the restart reproduces run A exactly."""
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step > EVAL_EVERY)
    killed_at = max(train_rows(workdir), default=0) if (workdir / "metrics.jsonl").exists() else 0
    p = runner.train(workdir)
    assert re.search(r"resumed from .* at step \d+", p.stderr), p.stderr[-3000:]
    resumed = int(re.search(r"resumed from .* at step (\d+)", p.stderr).group(1))
    assert resumed % EVERY == 0 and EVAL_EVERY < resumed < STEPS, (resumed, killed_at)
    assert_same_losses(run_a, workdir)


def test_sigterm_checkpoints_and_exits_cleanly(run_a, runner, tmp_path):
    workdir = tmp_path / "run"
    proc = runner.start(workdir)
    try:
        # the handler is installed before the first step; step 1's row is written during step 2
        started = wait_until(lambda: (workdir / "metrics.jsonl").exists() and train_rows(workdir), proc)
        assert started, proc.communicate()[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert took < 20, f"took {took:.1f}s to exit after SIGTERM"
    m = re.search(r"preemption requested: checkpoint at step (\d+) written", err)
    assert m, err[-3000:]
    stopped = int(m.group(1))
    assert stopped < STEPS, "the run finished before SIGTERM arrived"
    assert max(committed_steps(workdir)) == stopped
    assert not (workdir / "summary.json").exists()
    assert max(train_rows(workdir)) <= stopped
    p = runner.train(workdir)
    assert f"at step {stopped}" in p.stderr
    assert (workdir / "summary.json").exists()
    assert_same_losses(run_a, workdir)  # an off-schedule checkpoint resumes exactly too


def test_breaking_config_change_is_refused(run_a, small_data, one_device, tmp_path):
    workdir = copy_run(run_a, tmp_path / "run")
    before = (workdir / "metrics.jsonl").read_text()
    with pytest.raises(RunError) as refused:  # the command prints it as one "error: ..." line, exit 2
        train_in_process(
            workdir,
            f"--config.data.train={small_data}",
            *SMALL,
            "--config.loss.objective=dpo",
            "--config.loss.beta=0.5",
            f"--config.data.eval={small_data}",
            "--config.train.eval_every=12",
        )
    message = str(refused.value)
    assert "different run configuration" in message, message
    assert "loss.objective: saved='haf' current='dpo'" in message, message
    assert "loss.beta: saved=0.1 current=0.5" in message, message
    # data.eval is harmless between two eval sets, but "" -> a file stops carving eval out of data.train
    assert "data.eval: saved='' current=" in message, message
    assert "train.eval_every" not in message.split("different run configuration")[1]
    assert (workdir / "metrics.jsonl").read_text() == before
    assert committed_steps(workdir) == committed_steps(run_a)


def test_harmless_config_change_is_logged_and_accepted(run_a, small_data, one_device, tmp_path, capsys):
    workdir = copy_run(run_a, tmp_path / "run")
    summary = json.loads((workdir / "summary.json").read_text())
    train_in_process(workdir, f"--config.data.train={small_data}", *SMALL, "--config.train.eval_every=12")
    err = capsys.readouterr().err
    assert "harmless" in err and "train.eval_every: saved=8 current=12" in err, err[-3000:]
    assert "already complete" in err
    # the run was finished: nothing retrained, the summary of the run is kept
    after = json.loads((workdir / "summary.json").read_text())
    assert {**after, "workdir": None} == {**summary, "workdir": None}
    assert (workdir / "metrics.jsonl").read_text() == (run_a / "metrics.jsonl").read_text()


def poison_reference(workdir, step: int, *overrides: str) -> list[int]:
    """Writes the run's precomputed reference of its train split (WORKDIR/reference_train.npy and the
    .json naming its data, which the run then reuses instead of computing) as zeros, except NaN for
    the pairs of train step `step`: that step's loss is NaN, every other step's finite. The pairs are
    found by replaying the run's own loader (same data, config and seed). Returns them."""
    from haf_jax.training import setup

    config = load_config(str(REPO / "configs" / "gemma.py"), *overrides)
    s = setup.build(config, None)
    ds = s.train_ds
    loader = setup.train_loader(s)
    try:
        for _ in range(step):
            batch = next(loader)
    finally:
        loader.close()
    poisoned = batch["index"][batch["valid"].astype(bool)]
    reference = np.zeros((len(ds), 2), np.float32)
    reference[poisoned] = np.nan
    workdir.mkdir(parents=True)
    np.save(workdir / "reference_train.npy", reference)
    (workdir / "reference_train.json").write_text(json.dumps({"data": ds.fingerprint, "pairs": len(ds)}))
    return sorted(poisoned.tolist())


def test_nan_stops_run_and_keeps_last_good_checkpoint(small_data, one_device, tmp_path):
    """A batch whose loss is NaN (its reference log-probs are) at a save and eval step: the guard must
    stop the run there, before evaluating or writing that state. The step is in the first epoch, so
    its pairs are in no earlier batch."""
    nan_step = EVAL_EVERY
    workdir = tmp_path / "run"
    overrides = (f"--config.data.train={small_data}", *SMALL)
    assert len(poison_reference(workdir, nan_step, *overrides)) == 4
    with pytest.raises(RunError, match=rf"non-finite loss or gradient at step {nan_step}\b"):
        train_in_process(workdir, *overrides)
    steps = committed_steps(workdir)
    assert steps and max(steps) < nan_step, steps
    assert max(steps) == (nan_step - 1) // EVERY * EVERY  # the last scheduled save before the fault
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    train = train_rows(workdir)
    assert max(train) < nan_step  # no row of the poisoned step
    assert all(math.isfinite(row["loss"]) for row in train.values())  # the steps before it were fine
    assert not (workdir / "summary.json").exists()


def test_truncated_checkpoint_is_skipped(run_a, runner, tmp_path):
    workdir = copy_run(run_a, tmp_path / "run")
    steps = committed_steps(workdir)
    latest, previous = steps[-1], steps[-2]
    assert latest == STEPS
    files = [f for f in (workdir / "checkpoints" / str(latest) / "state").rglob("*") if f.is_file()]
    biggest = max(files, key=lambda f: f.stat().st_size)
    size = biggest.stat().st_size
    with open(biggest, "r+b") as f:
        f.truncate(size // 2)
    p = runner.train(workdir)
    no_traceback(p)
    assert re.search(rf"checkpoint step {latest}\b.*unusable", p.stderr), p.stderr[-3000:]
    assert f"resumed from {workdir / 'checkpoints'} at step {previous}" in p.stderr, p.stderr[-3000:]
    assert committed_steps(workdir)[-1] == STEPS  # a good one replaced it
    assert list((workdir / "checkpoints" / "set_aside").iterdir()), "the bad step was not kept aside"
    assert_same_losses(run_a, workdir)


def test_no_usable_checkpoint_is_refused(run_a, small_data, one_device, tmp_path):
    """Every step damaged: a clear refusal, not a silent fresh start over the run's history."""
    workdir = copy_run(run_a, tmp_path / "run")
    for step in committed_steps(workdir):
        (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    with pytest.raises(RunError) as refused:  # the command prints it as one "error: ..." line, exit 2
        train_in_process(workdir, f"--config.data.train={small_data}", *SMALL)
    message = str(refused.value)
    assert "none is usable" in message and f"step {STEPS}: item 'state'" in message, message
    assert (workdir / "metrics.jsonl").read_text() == (run_a / "metrics.jsonl").read_text()


def test_workdir_reference_is_reused_only_for_its_data(tmp_path):
    """reference_<split>.npy in a workdir is tied to the data it was computed for (data.eval may change
    on resume) and is written atomically."""
    from haf_jax.training import reference

    ds = type("DS", (), {"fingerprint": "abc", "__len__": lambda self: 3})()
    local = tmp_path / "reference_eval.npy"
    assert reference._local_reference(local, ds) is None
    np.save(local, np.ones((3, 2), np.float32))
    assert reference._local_reference(local, ds) is None  # no record of its data: recompute
    local.with_suffix(".json").write_text(json.dumps({"data": "abc", "pairs": 3}))
    assert reference._local_reference(local, ds).shape == (3, 2)
    local.with_suffix(".json").write_text(json.dumps({"data": "other", "pairs": 3}))
    assert reference._local_reference(local, ds) is None
    local.with_suffix(".json").write_text(json.dumps({"data": "abc", "pairs": 3}))
    local.write_bytes(local.read_bytes()[:40])  # half-written
    assert reference._local_reference(local, ds) is None


# ----------------------------------------------------------------------------- export / score


def test_export_round_trip_with_transformers(run_a, small_data, one_device, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from haf_jax.evaluation.export import export
    from haf_jax.evaluation.scoring import score

    out = tmp_path / "export"
    info = export(str(run_a), str(out))  # what `haf_jax.export` prints as its last line
    for kind in ("reward_model", "policy"):
        assert (out / kind / "model.safetensors").is_file() and (out / kind / "config.json").is_file()
        assert not list((out / kind).glob("*.bin"))

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(small_data.read_text().splitlines(keepends=True)[:6]))
    common = dict(max_length=64, max_prompt_length=32, batch_size=4)
    run_out, hf_out = tmp_path / "run_scores.jsonl", tmp_path / "hf_scores.jsonl"
    s_run = score(str(run_a), str(pairs), str(run_out), **common)  # `haf_jax.score`'s summary line
    s_hf = score(str(out / "reward_model"), str(pairs), str(hf_out), reference=str(out / "policy"), **common)
    ours, ours_hf = score_rows(run_out), score_rows(hf_out)
    assert len(ours) == len(ours_hf) == s_run["pairs"] == 6
    assert "dpo_accuracy" not in s_run and "ref_logp_chosen" not in ours[0]
    assert "dpo_accuracy" in s_hf and s_hf["dpo_accuracy"] == 0.0  # reference == policy: zero implicit margin
    for a, b in zip(ours, ours_hf):
        for k in ("reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
            # the same scorer on the same weights: measured 0.0 (test_e2e_objectives.py); ~3 float32 ulps
            assert b[k] == pytest.approx(a[k], rel=2e-7, abs=1e-6), (k, a, b)
        for side in ("chosen", "rejected"):  # the exported policy is the same network
            assert b[f"ref_logp_{side}"] == pytest.approx(b[f"logp_{side}"], rel=2e-7, abs=1e-6)
    assert s_hf["reward_accuracy"] == s_run["reward_accuracy"]

    # transformers on exactly the tokens the data layer makes
    got = transformers_scores(out, pairs, max_length=64, max_prompt_length=32)
    assert sorted(got) == list(range(6))
    for i, row in enumerate(ours):
        reward, logp = got[i]
        for j, side in enumerate(("chosen", "rejected")):
            # vs transformers (float32 eager): unit parity measured <= 2.2e-6 (rewards) and 2.0e-5 at |logp| ~ 200
            # (test_model_hf.py); here 10x the unit tolerances (longer trained sequences)
            assert float(reward[j]) == pytest.approx(row[f"reward_{side}"], abs=1e-4), (i, side)
            assert float(logp[j]) == pytest.approx(row[f"logp_{side}"], abs=1e-4, rel=5e-6), (i, side)
    assert info["step"] in committed_steps(run_a)


@pytest.mark.parametrize("layout", ["packing", "share_prompt"])
def test_packed_run_logs_padding_and_resumes_bit_exact(runner, tmp_path, layout):
    """data.packing: one static batch shape, the padding before/after in the train data report;
    data.share_prompt: one pair a row with its prompt run once, fewer row tokens than unshared
    pairs, and step 1's policy loss ln 2 (its log-probs equal the reference precomputed on plain
    rows). Either way a SIGKILLed run resumes (the loader's state in the checkpoint) to the same losses."""
    packed = (f"--config.data.{layout}=True",)
    whole = tmp_path / f"{layout}_a"
    runner.train(whole, *packed)
    report = json.loads((whole / "data_report_train.json").read_text())["batches"]
    if layout == "packing":
        assert re.fullmatch(r"\d+x256", report["shape"])
        assert report["padding_fraction"] < report["unpacked_padding_fraction"]
    else:
        assert re.fullmatch(r"4x\d+(, 4x\d+)*", report["shape"]) and report["tokens_vs_plain"] < 0.9, report
        first = train_rows(whole)[1]
        assert abs(first["policy_loss"] - math.log(2)) <= 1e-5 and abs(first["reward_loss"] - math.log(2)) <= 1e-6
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step > EVAL_EVERY, *packed)
    p = runner.train(workdir, *packed)
    assert re.search(r"resumed from .* at step \d+", p.stderr), p.stderr[-3000:]
    assert_same_losses(whole, workdir)


def test_per_layer_checkpoint_resumes_with_scanned_layers(run_a, runner, one_device, tmp_path, capsys):
    """A run written with per-layer parameters (every run from before model.scan_layers) resumes
    with scanned layers: its params and Adam moments are stacked, and training continues with the
    same numbers up to float rounding."""
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step > EVAL_EVERY)
    runner.invoke_train(workdir, "--config.model.scan_layers=True")
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-4000:]
    assert "checkpoint parameters converted to model.scan_layers=True" in err, err[-3000:]
    assert "model.scan_layers: saved=False current=True" in err  # logged as harmless
    ra, rb = train_rows(run_a), train_rows(workdir)
    assert sorted(rb) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        np.testing.assert_allclose(rb[s]["loss"], ra[s]["loss"], rtol=1e-4, err_msg=f"step {s}")
    assert json.loads((workdir / "model_config.json").read_text())["scan_layers"] is True
