"""launch/tpu_vm.sh without Google Cloud: --dry-run prints exactly the gcloud commands a real run
executes (a stand-in `gcloud` on PATH records them), and nothing is created."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "launch" / "tpu_vm.sh"
ARGS = [
    "my-tpu",
    "us-central2-b",
    "configs/gemma.py:gemma-2b",
    "gs://bucket/runs/g2",
    "--config.mesh.shape=(1,-1,4)",
    "--config.data.train=it's $HOME/a b.jsonl",
]


@pytest.fixture
def fake_gcloud(tmp_path):
    """A `gcloud` that appends its argv (JSON) to calls.jsonl; `describe` fails when FAIL_DESCRIBE=1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.environ['GCLOUD_CALLS'], 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
        "sys.exit(1 if 'describe' in sys.argv and os.environ.get('FAIL_DESCRIBE') == '1' else 0)\n"
    )
    (bin_dir / "gcloud").chmod(0o755)
    calls = tmp_path / "calls.jsonl"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "GCLOUD_CALLS": str(calls), "TMPDIR": str(tmp_path)}
    read = lambda: [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
    return env, read


def launch(env, *args):
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=60)


def test_dry_run_prints_exactly_what_a_run_executes(fake_gcloud, tmp_path):
    env, calls = fake_gcloud
    dry = launch(env, "--dry-run", "--setup", *ARGS)
    assert dry.returncode == 0, dry.stderr
    assert calls() == []  # a dry run calls nothing
    lines = dry.stdout.splitlines()
    assert [line.split()[:5] for line in lines] == [
        ["gcloud", "compute", "tpus", "tpu-vm", "describe"],
        ["git", "-C", str(ROOT), "archive", "--format=tar.gz"],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh"],
    ]
    pasted = subprocess.run(["bash", "-euc", dry.stdout], env=env, capture_output=True, text=True, timeout=60)
    assert pasted.returncode == 0, pasted.stderr
    printed = calls()  # what the printed lines do when pasted into a shell
    (tmp_path / "calls.jsonl").unlink()

    real = launch(env, "--setup", *ARGS)
    assert real.returncode == 0, real.stderr
    assert calls() == printed and len(printed) == 5
    assert (tmp_path / "haf_jax-my-tpu.tar.gz").stat().st_size > 0  # the archive of HEAD, really written

    # the job on a worker: run the remote command in a stand-in home; the overrides survive both shells
    start = next(c for c in printed if c[-1].startswith("--command=cd ~/haf_jax"))
    assert "--worker=all" in start
    home, bin_dir = tmp_path / "home", tmp_path / "bin"
    (home / "haf_jax_venv" / "bin").mkdir(parents=True)
    (home / "haf_jax").mkdir()
    (home / "haf_jax_venv" / "bin" / "activate").write_text("")
    (bin_dir / "python").write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        "open(os.path.expanduser('~/job.json'), 'w').write(json.dumps(sys.argv[1:]))\n"
    )
    (bin_dir / "python").chmod(0o755)
    subprocess.run(
        ["bash", "-c", start[-1][len("--command=") :]], env={**env, "HOME": str(home)}, check=True, timeout=30
    )
    deadline = time.monotonic() + 30
    while not (home / "job.json").exists() and time.monotonic() < deadline:  # the job runs detached
        time.sleep(0.1)
    assert json.loads((home / "job.json").read_text()) == [
        "-m",
        "haf_jax.train",
        "--config=configs/gemma.py:gemma-2b",
        "--workdir=gs://bucket/runs/g2",
        *ARGS[4:],
    ]
    assert (home / "haf_jax_train.log").exists()


def test_a_missing_tpu_is_reported_not_created(fake_gcloud):
    env, calls = fake_gcloud
    r = launch({**env, "FAIL_DESCRIBE": "1"}, "--setup", *ARGS)
    assert r.returncode == 1
    assert "creates nothing" in r.stderr and "gcloud compute tpus tpu-vm create my-tpu" in r.stderr
    assert [c[:4] for c in calls()] == [["compute", "tpus", "tpu-vm", "describe"]]  # nothing else ran


def test_bad_arguments_are_one_line_errors(fake_gcloud):
    env, calls = fake_gcloud
    for args, message in (
        (["--dry-run", "my-tpu", "zone"], "expected TPU_NAME ZONE CONFIG WORKDIR"),
        (["--bogus", *ARGS], "unknown option --bogus"),
    ):
        r = launch(env, *args)
        assert r.returncode == 2 and message in r.stderr and "usage: launch/tpu_vm.sh" in r.stderr
    assert calls() == []


def test_tail_only_follows_worker_0(fake_gcloud):
    env, calls = fake_gcloud
    assert launch(env, "--tail-only", *ARGS).returncode == 0
    last = calls()[-1]
    assert "--worker=0" in last and last[-1] == "--command=tail -n +1 -F ~/haf_jax_train.log"
    assert len(calls()) == 2  # describe, then the tail: no job started
