"""Multi-host faults with two real processes (jax.distributed on 127.0.0.1, one CPU device each).

A SIGTERM to one process only (a preemption notice that reached one host) must make both save the
same step and exit 0; exporting or scoring that run from two processes (parameters sharded
across them, gathered; each process scores its slice of every batch) must give the same files as
from one.
"""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SMALL = [
    "--config.train.steps=500",
    "--config.train.batch_size=4",
    "--config.data.max_length=64",
    "--config.data.max_prompt_length=32",
    "--config.train.eval_every=1000",
    "--config.checkpoint.every_steps=1000",
    "--config.train.log_every=1",
    "--config.train.eval_batch_size=16",
]


def sample_rows(path: pathlib.Path, n: int) -> pathlib.Path:
    """The first n records of the bundled sample as a JSON-lines file."""
    with gzip.open(ROOT / "haf_jax" / "samples" / "hh_harmless_base_test.jsonl.gz", "rt") as f:
        path.write_text("".join(next(f) for _ in range(n)))
    return path


def start(module_args: list[str], n: int, cache) -> list[subprocess.Popen]:
    """`python -m module_args...` as n processes of one jax.distributed job (n=1: a plain process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for pid in range(n):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="", HAF_JAX_CACHE=str(cache), TQDM_DISABLE="1")
        if n > 1:
            env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(n), JAX_PROCESS_ID=str(pid))
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", *module_args],
                cwd=ROOT,
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    return procs


def finish(procs) -> list[str]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    """(workdir, outputs): a 2-process run whose process 1 alone got SIGTERM after step 2."""
    tmp = tmp_path_factory.mktemp("multihost")
    workdir = tmp / "run"
    data = sample_rows(tmp / "data.jsonl", 64)  # a short reference pass before step 1
    procs = start(
        [
            "haf_jax.train",
            "--config=configs/gemma.py",
            f"--workdir={workdir}",
            f"--config.data.train={data}",
            "--config.data.eval_fraction=0.25",
            *SMALL,
        ],
        2,
        tmp / "cache",
    )
    try:
        deadline = time.monotonic() + 600
        metrics = workdir / "metrics.jsonl"
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, procs[0].stdout.read()
            time.sleep(0.1)
        procs[1].send_signal(signal.SIGTERM)
        outs = finish(procs)
    finally:
        for p in procs:
            p.kill()
    return workdir, outs


def test_sigterm_on_one_host_saves_one_step_on_all(preempted):
    workdir, outs = preempted
    stops = [line for line in outs[0].splitlines() if line.startswith("preemption requested")]
    assert len(stops) == 1, outs[0][-3000:]
    step = int(stops[0].split("at step ")[1].split()[0])
    assert 2 <= step < 500
    assert "Traceback" not in outs[1] and "preemption requested" not in outs[1]  # process 0 reports
    steps = sorted(int(d.name) for d in (workdir / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [step]  # one checkpoint, written by both processes together
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, step + 1))


def test_two_process_export_equals_one_process(preempted, tmp_path):
    workdir, _ = preempted
    outs = finish(
        start(
            ["haf_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'two'}", "--step=last"],
            2,
            tmp_path / "cache",
        )
    )
    assert json.loads(outs[0].strip().splitlines()[-1])["reward_model"] == str(tmp_path / "two" / "reward_model")
    finish(
        start(
            ["haf_jax.export", f"--workdir={workdir}", f"--out={tmp_path / 'one'}", "--step=last"],
            1,
            tmp_path / "cache",
        )
    )
    one = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*") if p.is_file())
    two = sorted(p.relative_to(tmp_path / "two") for p in (tmp_path / "two").rglob("*") if p.is_file())
    assert one == two and any(p.suffix == ".safetensors" for p in one)
    for rel in one:
        assert (tmp_path / "one" / rel).read_bytes() == (tmp_path / "two" / rel).read_bytes(), rel


def test_two_process_score_equals_one_process(preempted, tmp_path):
    workdir, _ = preempted
    data = sample_rows(tmp_path / "data.jsonl", 70)  # 70: a ragged last batch
    args = [
        "haf_jax.score",
        f"--model={workdir}",
        "--step=last",
        f"--data={data}",
        "--max_length=64",
        "--max_prompt_length=32",
        "--batch_size=16",
    ]
    outs = finish(start([*args, f"--out={tmp_path / 'two.jsonl'}"], 2, tmp_path / "cache"))
    summary = json.loads(outs[0].strip().splitlines()[-1])
    finish(start([*args, f"--out={tmp_path / 'one.jsonl'}"], 1, tmp_path / "cache"))
    two, one = (
        [json.loads(line) for line in (tmp_path / f"{n}.jsonl").read_text().splitlines()] for n in ("two", "one")
    )
    assert len(two) == summary["pairs"] + summary["skipped"] == 70  # each pair once
    for a, b in zip(two, one):  # in order; values to float32 reduction order (2 devices vs 1)
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6) for k in a), (a, b)


def test_collectives_agree_across_two_processes(tmp_path):
    """Each collective of haf_jax.core.distributed gives both processes the same, right answer
    (tests/helpers/multihost_collectives.py): agreements, gathers, and checksums of an array spread over both."""
    import jax.numpy as jnp

    from haf_jax.checkpoint import integrity

    outs = finish(start(["tests.helpers.multihost_collectives"], 2, tmp_path / "cache"))
    got = [json.loads(out.strip().splitlines()[-1]) for out in outs]
    whole = jnp.arange(12, dtype=jnp.float32).reshape(4, 3)
    shared = {
        "everyone_differs": False,
        "everyone_agrees": True,
        "anyone_one": True,
        "anyone_none": False,
        "process_0": True,
        "stack": [[0, 10], [1, 11]],
        "concat": [0, 10, 1, 11],
        "digest": [True, integrity.digest({"w": whole})[1]],
        "finite": True,
        "preemption": False,
    }
    for pid, g in enumerate(got):
        assert {k: g[k] for k in shared} == shared, (pid, g)
        assert g["to_host"] == {"spread": whole.tolist(), "local": [pid, pid]}, (pid, g)
