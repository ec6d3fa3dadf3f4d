"""The offline default, exactly as the README runs it: no argument beyond the config.

One process (a few minutes on a 2-core CPU), nothing shared with other tests: its own reference
cache, no compilation cache, one CPU device as on a laptop.
"""

import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
from helpers.runs import child_xla_flags, drop_compile_cache

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_offline_default_run(tmp_path):
    env = dict(os.environ)
    env["XLA_FLAGS"] = child_xla_flags(env.get("XLA_FLAGS", ""))
    drop_compile_cache(env)
    env.update(
        HAF_JAX_CACHE=str(tmp_path / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
    )
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    # The README's relative --workdir, resolved against the current directory (orbax itself
    # only takes absolute paths, so this guards that conversion).
    workdir = tmp_path / "runs" / "default"
    p = subprocess.run(
        [sys.executable, "-m", "haf_jax.train", f"--config={REPO / 'configs' / 'gemma.py'}", "--workdir=runs/default"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    m = re.search(r"eval reward_accuracy of the trained model: ([0-9.]+) \((\d+) pairs\)", p.stdout)
    assert m, p.stdout[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["objective"] == "haf" and summary["steps"] == summary["last"]["step"] == 150
    assert summary["last"]["reward_accuracy"] == pytest.approx(float(m.group(1)), abs=5e-5)
    assert summary["last"]["pairs"] == int(m.group(2)) > 0
    # The trained model must have learned: chance is 0.5, and on the 231 eval pairs 0.56 is above
    # chance at p < 0.05 (one-sided binomial). At the demo's former lr 1e-3 runs gave 0.57-0.58 on one
    # CPU and 0.558 on another (float order changes the trajectory); at 5e-4: 0.610 (reward) / 0.654.
    assert summary["last"]["reward_accuracy"] >= 0.56, summary["last"]
    assert summary["last"]["dpo_accuracy"] >= 0.56, summary["last"]
    # `evaluate` on the default run, offline: the trained model against the untrained one it started
    # from (zero reward head, policy = reference) on the same eval pairs, and the same numbers as the
    # loop's eval. Untrained: accuracy 0 (ties are wrong), log loss ln 2 = 0.693, Brier 0.25; the
    # trained policy head gave log loss 0.649-0.651 and Brier 0.227-0.229: the margins below are under half.
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "haf_jax.evaluate",
            "--model=runs/default",
            "--data=run:eval",
            "--step=initial,last",
            "--out=runs/default_eval",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stderr[-4000:]
    entry = json.loads((tmp_path / "runs" / "default_eval" / "report.json").read_text())["run_eval"]
    trained, untrained = entry["models"]["default"]["last"], entry["models"]["default"]["initial"]
    assert trained["pairs"] == untrained["pairs"] == summary["last"]["pairs"]
    for key in ("reward_accuracy", "dpo_accuracy", "ece", "brier", "log_loss", "dpo_brier", "dpo_log_loss"):
        assert trained[key] == pytest.approx(summary["last"][key], abs=1e-6), key
    # The trained accuracies are the summary's (>= 0.56 above); the untrained model's are exactly 0: its
    # zero reward head ties every pair and its policy is its reference (every implicit margin 0).
    assert untrained["reward_accuracy"] == untrained["dpo_accuracy"] == 0.0, untrained
    assert untrained["log_loss"] == pytest.approx(math.log(2)) and untrained["brier"] == pytest.approx(0.25)
    # Calibration improves on the policy head (implicit reward); the reward head's log loss drifted
    # around ln 2 from run to run at the former lr 1e-3 (float reduction order changes the trajectory
    # after ~60 steps: 0.672, 0.678, 0.699 and 0.700 seen; 0.667 at 5e-4), so it is not asserted.
    assert trained["dpo_log_loss"] <= untrained["dpo_log_loss"] - 0.01, (trained, untrained)
    assert trained["dpo_brier"] <= untrained["dpo_brier"] - 0.005, (trained, untrained)
    figures = tmp_path / "runs" / "default_eval" / "figures" / "run_eval" / "default-last"
    assert all(
        (figures / f"{name}.png").stat().st_size > 10_000
        for name in ("reliability", "reward_histograms", "reward_vs_length")
    )
    # "best" is the eval row with the highest reward accuracy in metrics.jsonl (first on ties)
    evals = [
        json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if '"split": "eval"' in line
    ]
    top = max(evals, key=lambda r: (r["reward_accuracy"], -r["step"]))
    assert (summary["best"]["step"], summary["best"]["reward_accuracy"]) == (top["step"], top["reward_accuracy"])
    assert (workdir / "metrics.jsonl").is_file() and (workdir / "checkpoints").is_dir()
