"""Two real processes (jax.distributed on 127.0.0.1, CPU) train one run together."""

import json
import math
import os
import pathlib
import socket
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = [
    "--config.train.steps=6",
    "--config.train.batch_size=4",
    "--config.data.max_length=64",
    "--config.data.max_prompt_length=32",
    "--config.train.eval_every=3",
    "--config.checkpoint.every_steps=3",
    "--config.train.log_every=1",
    "--config.train.eval_batch_size=16",
]


def test_two_processes_train_one_run(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(2):
        env = dict(
            os.environ,
            JAX_PLATFORMS="cpu",
            XLA_FLAGS="",
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            HAF_JAX_CACHE=str(tmp_path / "cache"),
        )
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "haf_jax.train",
                    "--config=configs/gemma.py",
                    f"--workdir={tmp_path / 'run'}",
                    *SMALL,
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert "eval reward_accuracy of the trained model" in outs[0]  # process 0 reports ...
    assert "eval reward_accuracy of the trained model" not in outs[1]  # ... and only process 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]  # written once, not once per process
    assert train[0]["reward_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert train[0]["policy_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert all(math.isfinite(r["loss"]) for r in train)
    assert [r["step"] for r in rows if r.get("split") == "eval"] == [3, 6]
    steps = sorted(int(d.name) for d in (tmp_path / "run" / "checkpoints").iterdir() if d.name.isdigit())
    assert steps[-1] == 6
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last"]["step"] == 6 and summary["last"]["pairs"] == 231
