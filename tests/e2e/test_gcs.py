"""gs:// for real, against a local Google Cloud Storage emulator (gcp-storage-emulator on 127.0.0.1,
with the generation header it leaves out: tests/helpers/gcs_emulator.py).

The children get only the standard STORAGE_EMULATOR_HOST: gcsfs (behind etils.epath: metrics,
reports, tokenizer, reference arrays, orbax's JSON items and directories) honours it, and
haf_jax.core.paths points tensorstore (orbax's array writes) at the same emulator. The run is trained
into gs://bucket/run, killed with SIGKILL after a checkpoint, resumed from the bucket, and must
match the uninterrupted local run A (tests/e2e/conftest.py) bit for bit; export and score then read
the run from the bucket and write to it, and give what they give for the local run.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from helpers.runs import REPO, STEPS, assert_same_losses, no_traceback, wait_until

from haf_jax.core import paths


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """URL of a fresh in-memory GCS emulator with a bucket named `bucket`; stopped after the module."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path_factory.mktemp("emulator") / "emulator.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "tests" / "helpers" / "gcs_emulator.py"), str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "the GCS emulator did not start"
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def bucket_file(url: str, local):
    """Copies one object of the emulator's bucket to `local` (through gcsfs, as the children read it)."""
    from etils import epath

    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(epath.Path(url).read_bytes())
    return local


def committed(url: str) -> list[int]:
    """The steps orbax sees committed under `url`, from another process than the writer's (this sees
    new steps only because haf_jax.core.paths turns off fsspec's listing cache)."""
    import orbax.checkpoint as ocp
    from etils import epath

    mngr = ocp.CheckpointManager(epath.Path(url), options=ocp.CheckpointManagerOptions(read_only=True))
    try:
        return list(mngr.all_steps())
    finally:
        mngr.close()


@pytest.fixture
def in_emulator(emulator, monkeypatch):
    """This process pointed at the emulator by STORAGE_EMULATOR_HOST; the variables haf_jax.core.paths
    derives from it are removed again afterwards."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return emulator


def test_paths_keep_urls_and_make_local_paths_absolute(tmp_path, monkeypatch):
    import pathlib

    assert str(pathlib.Path("gs://b/run")) == "gs:/b/run"  # the bug paths.path() exists for
    assert str(paths.path("gs://b/run") / "checkpoints") == "gs://b/run/checkpoints"
    monkeypatch.chdir(tmp_path)
    assert str(paths.path("run")) == str(tmp_path / "run") and not paths.is_remote("run")
    paths.write_text("f.txt", "new")
    assert (tmp_path / "f.txt").read_text() == "new" and os.listdir(tmp_path) == ["f.txt"]


def test_paths_and_checkpoints_in_a_bucket(in_emulator, tmp_path):
    from helpers.checkpoint_states import abstract, assert_same, make_state, mesh_of, save

    from haf_jax.checkpoint.manager import Checkpointer

    (tmp_path / "tok" / "sub").mkdir(parents=True)
    (tmp_path / "tok" / "a.json").write_text("{}")
    (tmp_path / "tok" / "sub" / "b.txt").write_text("b")
    paths.upload_dir(tmp_path / "tok", "gs://bucket/t/tok")
    with paths.local_dir("gs://bucket/t/tok") as d:
        assert sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs) == [
            "a.json",
            os.path.join("sub", "b.txt"),
        ]
    with paths.writable_dir("gs://bucket/t/out") as d:
        open(os.path.join(d, "x.bin"), "wb").write(b"\x00\x01")
    assert paths.path("gs://bucket/t/out/x.bin").read_bytes() == b"\x00\x01"
    assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == in_emulator  # derived for tensorstore

    # data files in a bucket: errors name the URL (and the line), as for local files
    from haf_jax.data import DataError, sources

    with pytest.raises(DataError, match=r"^gs://bucket/t/missing.jsonl: file not found"):
        list(sources.read_rows(sources.parse_source("gs://bucket/t/missing.jsonl")))
    paths.write_text("gs://bucket/t/bad.jsonl", '{"chosen": "a", "rejected": "b"}\n{oops\n')
    with pytest.raises(DataError, match=r"^gs://bucket/t/bad.jsonl line 2"):
        list(sources.read_rows(sources.parse_source("gs://bucket/t/bad.jsonl")))
    from haf_jax.data import jsonl  # the one JSON-lines reader/writer: straight to and from the bucket

    jsonl.write("gs://bucket/t/rows.jsonl.gz", [{"a": 1}, {"b": "é"}])
    assert list(jsonl.read("gs://bucket/t/rows.jsonl.gz")) == [(1, {"a": 1}), (2, {"b": "é"})]
    with pytest.raises(DataError, match=r"^gs://bucket/t/bad.jsonl line 2: malformed JSON"):
        list(jsonl.read("gs://bucket/t/bad.jsonl"))
    with pytest.raises(DataError, match=r"^gs://bucket/t/missing.jsonl: file not found$"):
        list(jsonl.read("gs://bucket/t/missing.jsonl"))

    # orbax through tensorstore and gcsfs: round trip, retention, walk-back past a garbled newest step
    states = {s: make_state(mesh_of(1), seed=s) for s in (1, 2, 3)}
    with Checkpointer("gs://bucket/t/ckpt", every_steps=1, keep=1) as c:
        for s, st in states.items():
            save(c, s, st, {"reward_accuracy": {1: 0.9, 2: 0.1, 3: 0.2}[s]})
    c = Checkpointer("gs://bucket/t/ckpt", every_steps=1, read_only=True)
    assert c.all_steps() == [1, 3] and c.best_step() == 1 and c.latest_step() == 3
    restored, data_state, _ = c.restore(None, abstract(mesh_of(1), states[3]))
    assert_same(restored, states[3])
    assert data_state["position"] == 12, data_state
    paths.path("gs://bucket/t/ckpt/3/meta/metadata").write_text("{garbage")
    c = Checkpointer("gs://bucket/t/ckpt", every_steps=1, read_only=True)
    restored, _, _ = c.restore(None, abstract(mesh_of(1), states[3]))
    assert c.restored_step == 1 and 3 in c.unusable_steps()
    assert_same(restored, states[1])


def test_train_kill_resume_export_score_in_a_bucket(emulator, runner, run_a, tmp_path, monkeypatch):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator)
    for name in ("TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"):
        monkeypatch.delenv(name, raising=False)  # haf_jax must derive them from STORAGE_EMULATOR_HOST
    env = {"HAF_JAX_CACHE": str(tmp_path / "cache")}
    run = "gs://bucket/run"

    with open(tmp_path / "killed.log", "w") as log:  # a file, not a pipe nobody reads while we wait
        proc = subprocess.Popen(
            runner.train_cmd(run), cwd=REPO, env=runner.env(tmp_path / "w", **env), stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: any(s > 4 for s in committed(run + "/checkpoints")), proc, poll=0.2)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    killed_at = max(committed(run + "/checkpoints"))
    assert killed_at < STEPS

    p = runner.train(run, env=env)
    no_traceback(p)
    assert f"resumed from {run}/checkpoints at step {killed_at}" in p.stderr, p.stderr[-3000:]
    assert not (REPO / "gs:").exists()  # nothing went to a local "gs:" directory
    local = tmp_path / "from_bucket"
    for name in (
        "metrics.jsonl",
        "summary.json",
        "model_config.json",
        "data_report_train.json",
        "reference_train.npy",
        "tokenizer/tokenizer.json",
    ):
        bucket_file(f"{run}/{name}", local / name)
    assert_same_losses(run_a, local)

    # export and score read the run from the bucket (and the data) and write into it
    runner.cli("haf_jax.export", f"--workdir={run}", "--out=gs://bucket/export", workdir_for_env=tmp_path / "e1")
    runner.cli("haf_jax.export", f"--workdir={run_a}", f"--out={tmp_path / 'export'}", workdir_for_env=tmp_path / "e2")
    for kind in ("reward_model", "policy"):
        got = bucket_file(f"gs://bucket/export/{kind}/model.safetensors", tmp_path / "got" / kind / "m.safetensors")
        assert got.read_bytes() == (tmp_path / "export" / kind / "model.safetensors").read_bytes(), kind
    from etils import epath

    epath.Path("gs://bucket/data.jsonl").write_bytes(runner.data.read_bytes())
    common = ["--max_length=64", "--max_prompt_length=32", "--batch_size=16"]
    p = runner.cli(
        "haf_jax.score",
        f"--model={run}",
        "--data=gs://bucket/data.jsonl",
        "--out=gs://bucket/scores.jsonl",
        *common,
        workdir_for_env=tmp_path / "s1",
    )
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    runner.cli(
        "haf_jax.score",
        f"--model={run_a}",
        f"--data={runner.data}",
        f"--out={tmp_path / 'scores.jsonl'}",
        *common,
        workdir_for_env=tmp_path / "s2",
    )
    got = bucket_file("gs://bucket/scores.jsonl", tmp_path / "got" / "scores.jsonl").read_text()
    assert got == (tmp_path / "scores.jsonl").read_text()
    assert summary["pairs"] == len(got.splitlines()) - summary["skipped"] > 0
    # an exported reward model in the bucket scores like the run it came from
    runner.cli(
        "haf_jax.score",
        "--model=gs://bucket/export/reward_model",
        "--data=gs://bucket/data.jsonl",
        "--out=gs://bucket/scores_export.jsonl",
        *common,
        workdir_for_env=tmp_path / "s3",
    )
    from_export = bucket_file("gs://bucket/scores_export.jsonl", tmp_path / "got" / "scores_export.jsonl").read_text()
    rows_export, rows_run = [[json.loads(line) for line in t.splitlines()] for t in (from_export, got)]
    assert [r["row"] for r in rows_export] == [r["row"] for r in rows_run]
    scored = [(a, b) for a, b in zip(rows_export, rows_run) if "reward_chosen" in b]
    assert len(scored) == summary["pairs"]
    for a, b in scored:
        assert a["reward_chosen"] == pytest.approx(b["reward_chosen"], abs=1e-4), (a, b)

    # evaluate reads the run and the data from the bucket and writes its report and figures there
    p = runner.cli(
        "haf_jax.evaluate",
        f"--model={run}",
        "--data=gs://bucket/data.jsonl",
        "--out=gs://bucket/eval",
        "--step=best",
        *common,
        workdir_for_env=tmp_path / "v1",
    )
    report = json.loads(bucket_file("gs://bucket/eval/report.json", tmp_path / "got" / "report.json").read_text())
    (entry,) = report.values()
    (model,) = entry["models"].values()
    (best,) = model.values()
    assert best["pairs"] == summary["pairs"] and best["reward_accuracy"] == pytest.approx(summary["reward_accuracy"])
    figures = list(epath.Path("gs://bucket/eval").glob("figures/*/*/*.png"))
    assert len(figures) == 3 and all(f.stat().length > 1000 for f in figures), figures
