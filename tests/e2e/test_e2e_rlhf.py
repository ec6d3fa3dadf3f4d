"""RLHF on Tunix end to end (configs/rlhf.py's offline demo): haf_jax trains a tiny Qwen2 reward model
on a learnable rule (the marker word preferred), exports its policy head, and GRPO raises the mean
reward of the held-out prompts over the initial policy; a run stopped at a checkpoint and started
again on the same workdir continues its step count and its metrics rows."""

import json

import numpy as np
import pytest

pytest.importorskip("tunix")


def test_grpo_raises_heldout_reward_and_resumes(tmp_path, load_config):
    from haf_jax.rlhf.run import run

    overrides = ["--config.checkpoint.every_steps=10", "--config.data.eval_prompts=8"]
    first = run(load_config("configs/rlhf.py", "--config.train.steps=10", *overrides), str(tmp_path))
    assert first["steps"] == 10 and first["resumed_from"] == 0
    summary = run(load_config("configs/rlhf.py", "--config.train.steps=25", *overrides), str(tmp_path))
    assert summary["steps"] == 25 and summary["resumed_from"] == 10
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 26))  # no gap, no repeat across the restart
    assert all(np.isfinite([r["reward_mean"], r["reward_std"], r["kl"], r["response_length"]]).all() for r in rows)
    # the initial policy's held-out reward survives the restart; the final one is measured on the same prompts
    assert summary["heldout_reward_initial"] == first["heldout_reward_initial"]
    gain = summary["heldout_reward_final"] - summary["heldout_reward_initial"]
    assert gain > 1.0, summary  # measured: see docs/REPRODUCE.md "RLHF"
    assert np.mean([r["reward_mean"] for r in rows[-5:]]) > np.mean([r["reward_mean"] for r in rows[:5]]) + 1.0
