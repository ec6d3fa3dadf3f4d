"""End-to-end (subprocess) tests of `haf_jax.train`: resume, preemption, failures, config changes,
the metrics.jsonl contract, and `haf_jax.export` / `haf_jax.score` against transformers.

Every run here is a real `python -m haf_jax.train` process on one CPU device (the fake 8-device
XLA flag of conftest.py is stripped from the children: one device is what a user gets, and it is
the fastest to compile). The runs train the tiny preset on a 64-row slice of the bundled sample
(48 train / 16 eval pairs, max_length 64 = one length bucket), 24 steps of 4 pairs (two epochs).
One uninterrupted run ("run A") is shared by every test that only reads it or works on a copy;
under pytest-xdist a file lock makes the workers build it once. The children share a persistent
JAX compilation cache, so only the first run compiles.
"""
from __future__ import annotations

import gzip
import json
import math
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

REPO = pathlib.Path(__file__).resolve().parents[1]
SAMPLE = REPO / "haf_jax" / "samples" / "hh_harmless_base_test.jsonl.gz"
STEPS, EVERY, EVAL_EVERY = 24, 4, 8
SMALL = [
    f"--config.train.steps={STEPS}", "--config.train.batch_size=4", "--config.data.max_length=64",
    "--config.data.max_prompt_length=32", f"--config.train.eval_every={EVAL_EVERY}",
    f"--config.checkpoint.every_steps={EVERY}", "--config.train.log_every=1",
    "--config.train.eval_batch_size=16", "--config.data.eval_fraction=0.25",
]
TIMEOUT = 300

pytestmark = pytest.mark.slow


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    """A directory shared by all xdist workers of this session (the base temp's parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "e2e_shared"
    root.mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="session")
def small_data(shared_root):
    from filelock import FileLock

    path = shared_root / "small.jsonl"
    with FileLock(str(shared_root / "small.lock")):
        if not path.exists():
            with gzip.open(SAMPLE, "rt") as f:
                lines = [next(f) for _ in range(64)]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(lines))
            tmp.rename(path)
    return path


def child_env(cache_dir: pathlib.Path, compile_cache: pathlib.Path | None, **extra) -> dict:
    env = dict(os.environ)
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    env["XLA_FLAGS"] = flags
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HAF_JAX_CACHE=str(cache_dir), TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("HAF_JAX_FAULT_NAN_STEP", None)
    if compile_cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(compile_cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    env.update(extra)
    return env


class Runner:
    """Starts haf_jax CLIs as children with the small config and an isolated reference cache."""

    def __init__(self, shared_root: pathlib.Path, data: pathlib.Path):
        self.shared_root, self.data = shared_root, data

    def env(self, workdir, **extra):
        cache = pathlib.Path(str(workdir) + ".cache")
        return child_env(cache, self.shared_root / "jax_compile_cache", **extra)

    def train_cmd(self, workdir, *overrides):
        return [sys.executable, "-m", "haf_jax.train", "--config=configs/gemma.py", f"--workdir={workdir}",
                f"--config.data.train={self.data}", *SMALL, *overrides]

    def train(self, workdir, *overrides, env=None, check=True):
        p = subprocess.run(self.train_cmd(workdir, *overrides), cwd=REPO, env=self.env(workdir, **(env or {})),
                           capture_output=True, text=True, timeout=TIMEOUT)
        if check:
            assert p.returncode == 0, f"train failed ({p.returncode}):\n{p.stderr[-4000:]}"
        return p

    def start(self, workdir, *overrides, env=None):
        return subprocess.Popen(self.train_cmd(workdir, *overrides), cwd=REPO, env=self.env(workdir, **(env or {})),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def cli(self, module, *args, workdir_for_env, check=True):
        p = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=self.env(workdir_for_env),
                           capture_output=True, text=True, timeout=TIMEOUT)
        if check:
            assert p.returncode == 0, f"{module} failed ({p.returncode}):\n{p.stderr[-4000:]}"
        return p


@pytest.fixture(scope="session")
def runner(shared_root, small_data):
    return Runner(shared_root, small_data)


@pytest.fixture(scope="session")
def run_a(runner, shared_root):
    """The uninterrupted reference run, built once per session (also across xdist workers).

    Tests must not modify it: copy it first (`copy_run`)."""
    from filelock import FileLock

    workdir = shared_root / "run_a"
    with FileLock(str(shared_root / "run_a.lock")):
        if not (workdir / "summary.json").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            runner.train(workdir)
    return workdir


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
            wait_until(lambda: any(committed(s) for s in committed_steps(workdir)), proc)
            proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        if proc.returncode == -signal.SIGKILL and max(committed_steps(workdir)) < steps:
            return workdir
    pytest.fail("could not kill the run before it finished")


def no_traceback(p):
    assert "Traceback" not in p.stderr, p.stderr[-4000:]


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


def test_profiler_trace_of_chosen_steps(runner, tmp_path):
    """train.profile_steps=2-3 leaves a trace that TensorBoard's profile plugin and Perfetto open."""
    workdir = tmp_path / "run"
    runner.train(workdir, "--config.train.steps=4", "--config.train.profile_steps=2-3")
    traces = list((workdir / "profile").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    assert list((workdir / "profile").rglob("*.trace.json.gz"))
    p = runner.train(tmp_path / "bad", "--config.train.steps=4", "--config.train.profile_steps=3-1", check=False)
    assert p.returncode == 2 and "train.profile_steps='3-1'" in p.stderr and "Traceback" not in p.stderr


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


def test_breaking_config_change_is_refused(run_a, runner, tmp_path):
    workdir = copy_run(run_a, tmp_path / "run")
    before = (workdir / "metrics.jsonl").read_text()
    p = runner.train(workdir, "--config.loss.objective=dpo", "--config.loss.beta=0.5",
                     f"--config.data.eval={runner.data}", "--config.train.eval_every=12", check=False)
    assert p.returncode != 0
    no_traceback(p)
    assert "different run configuration" in p.stderr, p.stderr[-3000:]
    assert "loss.objective: saved='haf' current='dpo'" in p.stderr, p.stderr[-3000:]
    assert "loss.beta: saved=0.1 current=0.5" in p.stderr, p.stderr[-3000:]
    # data.eval is harmless between two eval sets, but "" -> a file stops carving eval out of data.train
    assert "data.eval: saved='' current=" in p.stderr, p.stderr[-3000:]
    assert "train.eval_every" not in p.stderr.split("different run configuration")[1]
    assert (workdir / "metrics.jsonl").read_text() == before
    assert committed_steps(workdir) == committed_steps(run_a)


def test_harmless_config_change_is_logged_and_accepted(run_a, runner, tmp_path):
    workdir = copy_run(run_a, tmp_path / "run")
    summary = json.loads((workdir / "summary.json").read_text())
    p = runner.train(workdir, "--config.train.eval_every=12")
    no_traceback(p)
    assert "harmless" in p.stderr and "train.eval_every: saved=8 current=12" in p.stderr, p.stderr[-3000:]
    assert "already complete" in p.stderr
    # the run was finished: nothing retrained, the summary of the run is kept
    after = json.loads((workdir / "summary.json").read_text())
    assert {**after, "workdir": None} == {**summary, "workdir": None}
    assert (workdir / "metrics.jsonl").read_text() == (run_a / "metrics.jsonl").read_text()


def test_nan_stops_run_and_keeps_last_good_checkpoint(runner, tmp_path):
    """The poisoned step is a save and eval step: the guard must stop before writing it."""
    nan_step = 2 * EVAL_EVERY
    workdir = tmp_path / "run"
    p = runner.train(workdir, env={"HAF_JAX_FAULT_NAN_STEP": str(nan_step)}, check=False)
    assert p.returncode != 0
    no_traceback(p)
    assert re.search(rf"non-finite loss or gradient at step {nan_step}\b", p.stderr), p.stderr[-3000:]
    steps = committed_steps(workdir)
    assert steps and max(steps) < nan_step, steps
    assert max(steps) == (nan_step - 1) // EVERY * EVERY  # the last scheduled save before the fault
    assert not list((workdir / "checkpoints").glob("*.orbax-checkpoint-tmp*"))
    assert max(train_rows(workdir)) < nan_step  # no row of the poisoned step
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


def test_no_usable_checkpoint_is_refused(run_a, runner, tmp_path):
    """Every step damaged: a clear refusal, not a silent fresh start over the run's history."""
    workdir = copy_run(run_a, tmp_path / "run")
    for step in committed_steps(workdir):
        (workdir / "checkpoints" / str(step) / "state" / "manifest.ocdbt").unlink()
    p = runner.train(workdir, check=False)
    assert p.returncode != 0
    no_traceback(p)
    assert "none is usable" in p.stderr and f"step {STEPS}: item 'state'" in p.stderr, p.stderr[-3000:]
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


def _score_rows(path):
    return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines() if line]


def transformers_scores(out, pairs, *, max_length, max_prompt_length, batch_size=4) -> dict:
    """{source row: (rewards [2], summed response log-probs [2])} (chosen, rejected) from transformers'
    AutoModelForSequenceClassification on `out/reward_model` and AutoModelForCausalLM on `out/policy`
    (an export), float32 eager, on exactly the tokens the data layer makes: ids = [bos] + tok(prompt) +
    tok(response) + [eos], right-padded with the exported pad token (asserted distinct from EOS) and
    an attention mask up to the EOS. Also shared by tests/test_e2e_families.py."""
    import torch
    import transformers

    from haf_jax import data

    tok = data.load_tokenizer(str(out / "reward_model"))
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    options = data.PairOptions(max_length=max_length, max_prompt_length=max_prompt_length, eval_fraction=0.0,
                               max_skip_fraction=1.0)
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


def test_export_round_trip_with_transformers(run_a, runner, small_data, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")

    out = tmp_path / "export"
    exported = runner.cli("haf_jax.export", f"--workdir={run_a}", f"--out={out}", workdir_for_env=tmp_path / "x")
    info = json.loads(exported.stdout.strip().splitlines()[-1])
    for kind in ("reward_model", "policy"):
        assert (out / kind / "model.safetensors").is_file() and (out / kind / "config.json").is_file()
        assert not list((out / kind).glob("*.bin"))

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(small_data.read_text().splitlines(keepends=True)[:6]))
    common = [f"--data={pairs}", "--max_length=64", "--max_prompt_length=32", "--batch_size=4"]
    run_out, hf_out = tmp_path / "run_scores.jsonl", tmp_path / "hf_scores.jsonl"
    p_run = runner.cli("haf_jax.score", f"--model={run_a}", f"--out={run_out}", *common,
                       workdir_for_env=tmp_path / "x")
    p_hf = runner.cli("haf_jax.score", f"--model={out / 'reward_model'}", f"--reference={out / 'policy'}",
                      f"--out={hf_out}", *common, workdir_for_env=tmp_path / "x")
    s_run = json.loads(p_run.stdout.strip().splitlines()[-1])
    s_hf = json.loads(p_hf.stdout.strip().splitlines()[-1])
    ours, ours_hf = _score_rows(run_out), _score_rows(hf_out)
    assert len(ours) == len(ours_hf) == s_run["pairs"] == 6
    assert "dpo_accuracy" not in s_run and "ref_logp_chosen" not in ours[0]
    assert "dpo_accuracy" in s_hf and s_hf["dpo_accuracy"] == 0.0  # reference == policy: zero implicit margin
    for a, b in zip(ours, ours_hf):
        for k in ("reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"):
            assert b[k] == pytest.approx(a[k], abs=2e-3, rel=1e-4), (k, a, b)
        for side in ("chosen", "rejected"):  # the exported policy is the same network
            assert b[f"ref_logp_{side}"] == pytest.approx(b[f"logp_{side}"], abs=2e-3, rel=1e-4)
    assert s_hf["reward_accuracy"] == s_run["reward_accuracy"]

    # transformers on exactly the tokens the data layer makes
    got = transformers_scores(out, pairs, max_length=64, max_prompt_length=32)
    assert sorted(got) == list(range(6))
    for i, row in enumerate(ours):
        reward, logp = got[i]
        for j, side in enumerate(("chosen", "rejected")):
            assert float(reward[j]) == pytest.approx(row[f"reward_{side}"], abs=2e-3, rel=1e-4), (i, side)
            assert float(logp[j]) == pytest.approx(row[f"logp_{side}"], abs=2e-3, rel=1e-4), (i, side)
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
        assert re.fullmatch(r"\d+x256", report["shape"]) and report["padding_fraction"] < report["unpacked_padding_fraction"]
    else:
        assert re.fullmatch(r"4x\d+(, 4x\d+)*", report["shape"]) and report["tokens_vs_plain"] < 0.9, report
        first = train_rows(whole)[1]
        assert abs(first["policy_loss"] - math.log(2)) <= 1e-5 and abs(first["reward_loss"] - math.log(2)) <= 1e-6
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step > EVAL_EVERY, *packed)
    p = runner.train(workdir, *packed)
    assert re.search(r"resumed from .* at step \d+", p.stderr), p.stderr[-3000:]
    assert_same_losses(whole, workdir)


def test_per_layer_checkpoint_resumes_with_scanned_layers(run_a, runner, tmp_path):
    """A run written with per-layer parameters (every run from before model.scan_layers) resumes
    with scanned layers: its params and Adam moments are stacked, and training continues with the
    same numbers up to float rounding."""
    workdir = kill_after_checkpoint(runner, tmp_path, lambda step: step > EVAL_EVERY)
    p = runner.train(workdir, "--config.model.scan_layers=True")
    no_traceback(p)
    assert "checkpoint parameters converted to model.scan_layers=True" in p.stderr, p.stderr[-3000:]
    assert "model.scan_layers: saved=False current=True" in p.stderr  # logged as harmless
    ra, rb = train_rows(run_a), train_rows(workdir)
    assert sorted(rb) == list(range(1, STEPS + 1))
    for s in range(1, STEPS + 1):
        np.testing.assert_allclose(rb[s]["loss"], ra[s]["loss"], rtol=1e-4, err_msg=f"step {s}")
    assert json.loads((workdir / "model_config.json").read_text())["scan_layers"] is True
