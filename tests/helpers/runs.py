"""End-to-end run helpers (tests/e2e): the small training config, training in-process through the
library or as a `python -m haf_jax.train` child, and readers of what a run leaves in its workdir.

The small config trains the tiny preset on a 64-row slice of the bundled sample (48 train / 16 eval
pairs, max_length 64 = one length bucket), 24 steps of 4 pairs (two epochs), a checkpoint every 4
steps and an eval every 8. Children and in-process runs alike use one CPU device (the fake 8-device
XLA flag of tests/conftest.py is stripped from children; `one_device` in tests/conftest.py restricts
this process): one device is what a user gets, and the fastest to compile. The two agree to float
rounding, not bit for bit (this process still has 8 devices): a run compared bit for bit with a
child's must be a child too.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO / "haf_jax" / "samples" / "hh_harmless_base_test.jsonl.gz"
STEPS, EVERY, EVAL_EVERY = 24, 4, 8
SMALL = [
    f"--config.train.steps={STEPS}",
    "--config.train.batch_size=4",
    "--config.data.max_length=64",
    "--config.data.max_prompt_length=32",
    f"--config.train.eval_every={EVAL_EVERY}",
    f"--config.checkpoint.every_steps={EVERY}",
    "--config.train.log_every=1",
    "--config.train.eval_batch_size=16",
    "--config.data.eval_fraction=0.25",
]
TIMEOUT = 300
# LoRA runs (tests/e2e/test_e2e_lora.py): rank-4 adapters, 8 steps, a checkpoint every 2, an eval every 4
LORA_STEPS, LORA_EVERY, LORA_EVAL_EVERY = 8, 2, 4
LORA = [
    "--config.model.lora.rank=4",
    "--config.model.lora.alpha=8.0",
    f"--config.train.steps={LORA_STEPS}",
    f"--config.checkpoint.every_steps={LORA_EVERY}",
    f"--config.train.eval_every={LORA_EVAL_EVERY}",
    "--config.optim.learning_rate=0.01",
]

# The SmolLM2-135M LoRA HaF run (tests/e2e/test_e2e_smollm2.py, fixture `smollm2_run`): 3 steps of 2
# pairs at 64 tokens; scanned layers (the 30-layer stack compiles as one block); rank-8 adapters at
# lr 1e-3, so that two updates move them enough for the merged export to differ from the base; a
# checkpoint every step (steps 2 and 3 kept), one eval (2 pairs) at the end.
SMOLLM2_STEPS, SMOLLM2_MAX_LENGTH, SMOLLM2_MAX_PROMPT = 3, 64, 48
SMOLLM2_LORA = [
    "--config.model.lora.rank=8",
    "--config.model.scan_layers=True",
    "--config.optim.learning_rate=1e-3",
    "--config.train.batch_size=2",
    f"--config.train.steps={SMOLLM2_STEPS}",
    f"--config.train.eval_every={SMOLLM2_STEPS}",
    "--config.train.eval_batch_size=2",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=1",
    f"--config.data.max_length={SMOLLM2_MAX_LENGTH}",
    f"--config.data.max_prompt_length={SMOLLM2_MAX_PROMPT}",
    "--config.data.eval_fraction=0.25",
]


def smollm2_train_argv(workdir, model_dir, pairs) -> list[str]:
    """`haf_jax.train`'s flags of the SmolLM2 LoRA run (configs/llama.py by absolute path)."""
    return [
        f"--config={REPO / 'configs' / 'llama.py'}",
        f"--workdir={workdir}",
        f"--config.model.checkpoint={model_dir}",
        f"--config.data.train={pairs}",
        *SMOLLM2_LORA,
    ]


def load_config(spec: str, *overrides: str):
    """A run config parsed by config_flags exactly as `python -m haf_jax.train --config=SPEC OVERRIDES...`
    parses it (file loaded by path, `--config.KEY=VALUE` overrides)."""
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={spec}", *overrides]
    fv = flags.FlagValues()
    # the override flags (--config.KEY) are declared from the argv they will parse (sys.argv for the command)
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def restrict_to_one_device(monkeypatch, cache_dir):
    """Through `monkeypatch`: jax.devices() lists only the first device (this process seen as the
    one-device machine a child is; tests/conftest.py fakes 8) and HAF_JAX_CACHE (the reference
    log-prob cache) is `cache_dir`. Returns the device. The `one_device` fixture (tests/conftest.py)
    is this for one test; a session fixture that trains in-process calls it inside
    `pytest.MonkeyPatch.context()`, so the tests around it keep their 8 devices."""
    import jax

    devices = jax.devices()[:1]
    monkeypatch.setattr(jax, "devices", lambda *args, **kwargs: devices)
    monkeypatch.setenv("HAF_JAX_CACHE", str(cache_dir))
    return devices[0]


def train_in_process(workdir, *overrides: str, config: str = "configs/gemma.py") -> dict:
    """haf_jax.training.loop.train on `config` + `overrides` (paths relative to the repository);
    returns the summary. Raises what train raises (RunError, DataError, ...)."""
    from haf_jax.training.loop import train

    return train(load_config(str(REPO / config), *overrides), str(workdir))


def child_xla_flags(flags: str) -> str:
    """XLA_FLAGS for a child process: tests/conftest.py's flags of the test processes removed (8 fake
    devices, the backend's optimisation level 0), so the child is a one-device machine compiling as a
    user's run does."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    return re.sub(r"--xla_backend_optimization_level=\d+", "", flags).strip()


def drop_compile_cache(env: dict) -> dict:
    """`env` without JAX's persistent compilation cache settings (tests/conftest.py sets them), in place."""
    for key in [k for k in env if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))]:
        del env[key]
    return env


def child_env(cache_dir: pathlib.Path, compile_cache: bool = True, **extra) -> dict:
    """The environment of a training child: one CPU device, offline, its own reference cache and the
    session's persistent JAX compilation cache (tests/conftest.py), or none when not `compile_cache`."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = child_xla_flags(env.get("XLA_FLAGS", ""))
    env.update(
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        HAF_JAX_CACHE=str(cache_dir),
        TQDM_DISABLE="1",
        PYTHONUNBUFFERED="1",
    )
    if not compile_cache:
        drop_compile_cache(env)
    env.update(extra)
    return env


class Runner:
    """Starts haf_jax CLIs as children with the small config and an isolated reference cache (and runs
    `haf_jax.train` in this process, `invoke_train`)."""

    def __init__(self, shared_root: pathlib.Path, data: pathlib.Path):
        self.shared_root, self.data = shared_root, data

    def env(self, workdir, **extra):
        cache = pathlib.Path(str(workdir) + ".cache")
        return child_env(cache, **extra)

    def train_cmd(self, workdir, *overrides):
        return [
            sys.executable,
            "-m",
            "haf_jax.train",
            "--config=configs/gemma.py",
            f"--workdir={workdir}",
            f"--config.data.train={self.data}",
            *SMALL,
            *overrides,
        ]

    def invoke_train(self, workdir, *overrides):
        """The command of `train_cmd` run in this process (helpers.commands; the config file by absolute
        path): exits (SystemExit) and prints where the child would. Needs the `one_device` fixture."""
        from helpers.commands import command

        command("haf_jax.train").invoke(
            [
                "haf_jax.train",
                f"--config={REPO / 'configs' / 'gemma.py'}",
                f"--workdir={workdir}",
                f"--config.data.train={self.data}",
                *SMALL,
                *overrides,
            ]
        )

    def train(self, workdir, *overrides, env=None, check=True):
        p = subprocess.run(
            self.train_cmd(workdir, *overrides),
            cwd=REPO,
            env=self.env(workdir, **(env or {})),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if check:
            assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stderr[-4000:]}"
        return p

    def start(self, workdir, *overrides, env=None):
        return subprocess.Popen(
            self.train_cmd(workdir, *overrides),
            cwd=REPO,
            env=self.env(workdir, **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(self, module, *args, workdir_for_env, check=True):
        p = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=self.env(workdir_for_env),
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )
        if check:
            assert p.returncode == 0, f"{module} failed ({p.returncode}):\n{p.stderr[-4000:]}"
        return p


def copy_run(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    shutil.copytree(src, dst)
    return dst


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines() if line]


def train_rows(workdir) -> dict[int, dict]:
    """step -> train row; asserts each step is logged once."""
    out = {}
    for r in rows(workdir):
        if "split" not in r:
            assert r["step"] not in out, f"step {r['step']} logged twice in {workdir}"
            out[r["step"]] = r
    return out


def eval_rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in rows(workdir) if r.get("split") == "eval"}


def committed_steps(workdir) -> list[int]:
    d = pathlib.Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def assert_same_losses(a, b, steps=range(1, STEPS + 1)):
    ra, rb = train_rows(a), train_rows(b)
    assert sorted(rb) == sorted(ra) == list(range(1, STEPS + 1))
    for s in steps:
        for k in ("loss", "reward_loss", "policy_loss", "grad_norm", "reward_accuracy", "dpo_accuracy"):
            assert ra[s][k] == rb[s][k], f"step {s} {k}: uninterrupted {ra[s][k]!r} != resumed {rb[s][k]!r}"
    ea, eb = eval_rows(a), eval_rows(b)
    assert sorted(ea) == sorted(eb)
    for s in ea:
        assert ea[s] == eb[s], f"eval at step {s} differs: {ea[s]} vs {eb[s]}"
    sa, sb = (json.loads((pathlib.Path(d) / "summary.json").read_text()) for d in (a, b))
    assert (sa["best"], sa["last"]) == (sb["best"], sb["last"])  # the summary covers evals before the restart


def wait_until(pred, proc, timeout=TIMEOUT, poll=0.02):
    """Polls pred() until true; returns False when the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        if proc.poll() is not None:
            return pred()
        time.sleep(poll)
    proc.kill()
    raise AssertionError("timed out waiting for the child process")


def kill_after_checkpoint(runner, tmp_path, committed, *overrides, steps=STEPS):
    """SIGKILLs a training child once a step with `committed(step)` is committed and before it
    finishes `steps`; returns its workdir (a very fast child may finish first: tried 3 times)."""
    for attempt in range(3):
        workdir = tmp_path / f"b{attempt}"
        proc = runner.start(workdir, *overrides)
        try:
            wait_until(lambda workdir=workdir: any(committed(s) for s in committed_steps(workdir)), proc)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        if proc.returncode == -signal.SIGKILL and max(committed_steps(workdir)) < steps:
            return workdir
    pytest.fail("could not kill the run before it finished")


def no_traceback(p):
    assert "Traceback" not in p.stderr, p.stderr[-4000:]


def score_rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def transformers_scores(out, pairs, *, max_length, max_prompt_length, batch_size=4) -> dict:
    """{source row: (rewards [2], summed response log-probs [2])} (chosen, rejected) from transformers'
    AutoModelForSequenceClassification on `out/reward_model` and AutoModelForCausalLM on `out/policy`
    (an export), float32 eager, on exactly the tokens the data layer makes: ids = [bos] + tok(prompt) +
    tok(response) + [eos], right-padded with the exported pad token (asserted distinct from EOS) and
    an attention mask up to the EOS."""
    import torch
    import transformers

    from haf_jax import data

    tok = data.load_tokenizer(str(out / "reward_model"))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    options = data.PairOptions(
        max_length=max_length, max_prompt_length=max_prompt_length, eval_fraction=0.0, max_skip_fraction=1.0
    )
    ds = data.load_pairs(str(pairs), tok, options, split="all")
    kw = dict(torch_dtype=torch.float32, attn_implementation="eager")
    rm = transformers.AutoModelForSequenceClassification.from_pretrained(str(out / "reward_model"), **kw).eval()
    lm = transformers.AutoModelForCausalLM.from_pretrained(str(out / "policy"), **kw).eval()
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    got = {}
    with torch.no_grad():
        for batch in ds.batches(batch_size):
            b, _, length = batch["tokens"].shape
            ids = torch.from_numpy(batch["tokens"].reshape(2 * b, length)).long()
            last = torch.from_numpy(batch["last_index"].reshape(2 * b)).long()
            attn = (torch.arange(length)[None, :] <= last[:, None]).long()
            assert (ids[attn == 0] == tok.pad_token_id).all()  # right padding with the exported pad token
            assert (ids.gather(1, last[:, None])[:, 0] == tok.eos_token_id).all()  # every row ends at its EOS
            if tok.bos_token_id is not None:
                assert (ids[:, 0] == tok.bos_token_id).all()
            reward = rm(input_ids=ids, attention_mask=attn).logits[:, 0].reshape(b, 2)
            logits = lm(input_ids=ids, attention_mask=attn).logits.float()
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            mask = torch.from_numpy(batch["response_mask"].reshape(2 * b, length)[:, 1:]).float()
            logp = (lp * mask).sum(-1).reshape(b, 2)
            for row in np.flatnonzero(batch["valid"]):
                got[int(batch["index"][row])] = (reward[row].numpy(), logp[row].numpy())
    return got
