"""Every command's error paths (issue 23 item 16), each command in this process (helpers.commands):
bad input, a missing required flag and an unknown flag alike are one `error:` line naming the bad
value or the flag and exit status 2, never a traceback (an exception other than SystemExit would fail
the test).

The run-directory cases read tests/data/run_8302abb (a small run of an older version, kept read-only);
none loads weights, so nothing compiles.
"""

from __future__ import annotations

import json
import pathlib
import re

import pytest
from helpers.commands import command

REPO = pathlib.Path(__file__).resolve().parents[2]
RUN = str(REPO / "tests" / "data" / "run_8302abb")  # checkpoints: step 2 only
TINY = f"--config={REPO / 'configs' / 'gemma.py'}:tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs and outputs the cases name: {name: path}."""
    root = tmp_path_factory.mktemp("command_errors")
    (root / "pairs.jsonl").write_text(json.dumps({"prompt": "p", "chosen": " a", "rejected": " b"}) + "\n")
    (root / "prompts.jsonl").write_text(json.dumps({"prompt": "p"}) + "\n")
    (root / "cands.jsonl").write_text(json.dumps({"prompt": "p", "candidates": [" a", " b"]}) + "\n")
    (root / "empty_cands.jsonl").write_text(json.dumps({"prompt": "p", "candidates": []}) + "\n")
    (root / "a_file").write_text("not a directory\n")
    (root / "a_dir").mkdir()
    (root / "not_a_model").mkdir()
    (root / "not_a_model" / "notes.txt").write_text("neither a run nor a Hugging Face directory\n")
    named = {p.name.removesuffix(".jsonl"): str(p) for p in root.iterdir()}
    return named | {"missing": str(root / "missing.jsonl"), "new": str(root)}


def run_command(name: str, args: list[str], files: dict, capsys) -> tuple[int | None, str]:
    """(exit status, stderr) of `python -m haf_jax.NAME ARGS` run in this process; {key} in an argument
    is files[key]."""
    argv = [f"haf_jax.{name}", *(a.format(**files) for a in args)]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        command(f"haf_jax.{name}").invoke(argv)
    return exited.value.code, capsys.readouterr().err


def check_one_error_line(name, args, message, files, capsys, prefix="error"):
    code, err = run_command(name, args, files, capsys)
    lines = [line for line in err.splitlines() if line.startswith(f"{prefix}: ")]
    assert code == 2, err[-3000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert re.search(message.format(**{k: re.escape(v) for k, v in files.items()}), lines[0]), lines[0]


SCORE = ["--data={pairs}", "--out={new}/scores.jsonl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model={not_a_model}", *SCORE], r"{not_a_model} is neither a haf_jax run directory .* nor a Hugging Face"),
        ([f"--model={RUN}", "--step=foo", *SCORE], r"--step must be best, last, initial or a step number, got 'foo'"),
        ([f"--model={RUN}", "--step=99", *SCORE], r"no checkpoint for step 99; available: \[2\]"),
        ([f"--model={RUN}", "--data={pairs}", "--out={a_dir}"], r"--out={a_dir} is a directory"),
        ([f"--model={RUN}", "--template=nope", *SCORE], r"unknown template 'nope'"),
        ([f"--model={RUN}", "--data={missing}", "--out={new}/s.jsonl"], r"{missing}: file not found"),
        ([f"--model={RUN}", "--data=hf:", "--out={new}/s.jsonl"], r"bad hub spec 'hf:'"),
    ],
    ids=["not-a-model", "step-foo", "step-missing", "out-is-dir", "template", "data-missing", "data-spec"],
)
def test_score_errors(args, message, files, capsys):
    check_one_error_line("score", args, message, files, capsys)


EVALUATE = ["--data={pairs}", "--out={new}/report"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model={not_a_model}", *EVALUATE], r"{not_a_model} is neither a haf_jax run directory"),
        ([f"--model={RUN}", "--step=last,foo", *EVALUATE], r"got 'foo'"),
        ([f"--model={RUN}", "--step=99", *EVALUATE], r"no checkpoint for step 99; available: \[2\]"),
        ([f"--model={RUN}", "--data={pairs}", "--out={a_file}"], r"--out={a_file} is a file"),
        ([f"--model={RUN}", "--template=nope", *EVALUATE], r"unknown template 'nope'"),
        ([f"--model={RUN}", "--data=bogus:x", "--out={new}/report"], r"bogus:x: unsupported file type"),
    ],
    ids=["not-a-model", "step-foo", "step-missing", "out-is-file", "template", "data-spec"],
)
def test_evaluate_errors(args, message, files, capsys):
    check_one_error_line("evaluate", args, message, files, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--workdir={not_a_model}", "--out={new}/export"], r"{not_a_model} is not a haf_jax run directory"),
        ([f"--workdir={RUN}", "--step=foo", "--out={new}/export"], r"got 'foo'"),
        ([f"--workdir={RUN}", "--step=99", "--out={new}/export"], r"no checkpoint for step 99; available: \[2\]"),
        ([f"--workdir={RUN}", "--out={a_file}"], r"--out={a_file} is a file"),
    ],
    ids=["not-a-run", "step-foo", "step-missing", "out-is-file"],
)
def test_export_errors(args, message, files, capsys):
    check_one_error_line("export", args, message, files, capsys)


SAMPLE = ["--prompts={prompts}", "--out={new}/samples.jsonl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model={not_a_model}", *SAMPLE], r"{not_a_model} is neither a haf_jax run directory"),
        ([f"--model={RUN}", "--step=foo", *SAMPLE], r"got 'foo'"),
        ([f"--model={RUN}", "--temperature_range=1.2,0.5", *SAMPLE], r"0 < LOW <= HIGH, got 1.2,0.5"),
        ([f"--model={RUN}", "--temperature_range=hot", *SAMPLE], r"--temperature_range must be LOW,HIGH, got 'hot'"),
        ([f"--model={RUN}", "--n=0", *SAMPLE], r"got n=0"),
        ([f"--model={RUN}", "--template=nope", *SAMPLE], r"unknown template 'nope'"),
        ([f"--model={RUN}", "--prompts={prompts}", "--out={a_dir}"], r"--out={a_dir} is a directory"),
        ([f"--model={RUN}", "--prompts={missing}", "--out={new}/s.jsonl"], r"{missing}: file not found"),
    ],
    ids=["not-a-model", "step-foo", "range-order", "range-text", "n-0", "template", "out-is-dir", "prompts-missing"],
)
def test_sample_errors(args, message, files, capsys):
    check_one_error_line("sample", args, message, files, capsys)


BON = ["--candidates={cands}", "--out={new}/bon.jsonl"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--reward_model={not_a_model}", *BON], r"{not_a_model} is neither a haf_jax run directory"),
        ([f"--reward_model={RUN}", "--step=foo", *BON], r"got 'foo'"),
        ([f"--reward_model={RUN}", "--candidates={empty_cands}", "--out={new}/b.jsonl"], r"field 'candidates'"),
        ([f"--reward_model={RUN}", "--candidates={pairs}", "--out={new}/b.jsonl"], r"'candidates': missing"),
        ([f"--reward_model={RUN}", "--candidates={missing}", "--out={new}/b.jsonl"], r"file not found"),
        ([f"--reward_model={RUN}", "--candidates={cands}", "--out={a_dir}"], r"--out={a_dir} is a directory"),
    ],
    ids=["not-a-model", "step-foo", "candidates-empty", "candidates-field", "candidates-missing", "out-is-dir"],
)
def test_bon_errors(args, message, files, capsys):
    check_one_error_line("bon", args, message, files, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        ([TINY, "--topology=cpu:64"], r"cpu:64 needs 64 CPU devices, this process has 8"),
        (
            [TINY, "--topology=cpu:8", "--config.train.batch_size=3"],
            r"batch_size=3 must be a multiple of the data-parallel size 8",
        ),
        ([TINY, "--topology=v9-8"], r"unknown topology 'v9-8'"),
    ],
    ids=["cpu-over-devices", "batch-split", "topology"],
)
def test_plan_errors(args, message, files, capsys):
    check_one_error_line("plan", args, message, files, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        ([TINY, "--workdir={a_file}"], r"--workdir={a_file} is a file"),
        ([TINY, "--workdir={new}/run1", "--config.data.train=bogus:x"], r"bogus:x: unsupported file type"),
        ([TINY, "--workdir={new}/run2", "--config.data.template=nope"], r"unknown template 'nope'"),
        ([TINY, "--workdir={new}/run3", "--config.train.steps=abc"], r"--config.train.steps=abc"),
    ],
    ids=["workdir-is-file", "data-spec", "template", "override"],
)
def test_train_errors(args, message, files, capsys):
    check_one_error_line("train", args, message, files, capsys)


@pytest.mark.parametrize(
    "args, message",
    [
        (["{missing}"], r"{missing}: file not found"),
        (["bogus:x"], r"bogus:x: unsupported file type"),
        (["{pairs}", "--template=nope"], r"unknown template 'nope'"),
        (["{cands}"], r"{cands} line 1: cannot recognise the record form"),
    ],
    ids=["missing", "spec", "template", "fields"],
)
def test_data_errors(args, message, files, capsys):
    check_one_error_line("data.__main__", args, message, files, capsys, prefix="data error")


@pytest.mark.parametrize(
    "name, args, flag",
    [
        ("score", ["--data=x.jsonl", "--out=o.jsonl"], "--model"),
        ("evaluate", ["--model=m", "--out=o"], "--data"),
        ("export", ["--workdir=w"], "--workdir and --out"),
        ("sample", ["--model=m", "--out=o.jsonl"], "--prompts"),
        ("bon", ["--out=o.jsonl"], "--reward_model"),
        ("bon", ["--reward_model=m", "--out=o.jsonl"], "either --candidates or --prompts"),
        ("bon", ["--reward_model=m", "--prompts=p.jsonl", "--out=o.jsonl"], "--prompts needs --policy"),
        ("plan", ["--topology=cpu:1"], "--config is required"),
        ("train", [], "--config is required"),
        ("data.__main__", [], "expected one SPEC"),
    ],
)
def test_missing_required_flags_are_one_error_line(name, args, flag, files, capsys):
    prefix = "data error" if name == "data.__main__" else "error"
    check_one_error_line(name, args, re.escape(flag), files, capsys, prefix=prefix)


@pytest.mark.parametrize("name", ["score", "train", "data.__main__"])
def test_unknown_flags_are_one_error_line(name, files, capsys):
    check_one_error_line(name, ["--no_such_flag=1"], "no_such_flag", files, capsys)
