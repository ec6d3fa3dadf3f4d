"""TFDS sources for real: datasets built in the test (tests/helpers/tfds_prefs.py, array_record, no
TensorFlow), read through `tfds:NAME[:data_dir=DIR]:SPLIT`, compared with the same records from
JSON lines (pairs, fingerprint, batches), sharded, resumed, broken, and trained and scored from."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

pytest.importorskip("tensorflow_datasets", reason="the tfds extra is not installed: pip install -e '.[tfds]'")

from helpers import tfds_prefs  # the builders
from helpers.commands import command
from helpers.hub_repos import one_line_error as _error  # one-line DataError message of a spec
from helpers.runs import train_in_process

from haf_jax.data import PairLoader, PairOptions, load_pairs

FORMS = ["explicit_prefs", "hh_prefs", "messages_prefs", "conversation_prefs", "labelled_prefs", "ranking_prefs"]
FIELDS = {"labelled_prefs": tfds_prefs.LABELLED_FIELDS}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds")
    for name in tfds_prefs.BUILDERS:
        tfds_prefs.prepare(name, d)
    return d


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def same_batches(a, b, batch_size=4):
    for x, y in zip(a.batches(batch_size), b.batches(batch_size), strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def same_dataset(a, b):
    assert a.pairs == b.pairs
    assert a.fingerprint == b.fingerprint
    np.testing.assert_array_equal(a.all_lengths, b.all_lengths)
    same_batches(a, b)
    with PairLoader(a, 4, seed=3) as la, PairLoader(b, 4, seed=3) as lb:
        for _ in range(5):
            x, y = next(la), next(lb)
            for k in x:
                np.testing.assert_array_equal(x[k], y[k], err_msg=k)


@pytest.mark.parametrize("name", FORMS)
def test_each_record_form_reads_like_jsonl(name, data_dir, tok, tmp_path):
    """Every record form from TFDS: the same pairs, fingerprint and tokenised batches as from a
    JSON lines file of the same records."""
    options = PairOptions(max_length=64, max_prompt_length=32, fields=FIELDS.get(name))
    ds = load_pairs(f"tfds:{name}:data_dir={data_dir}:train", tok, options, split="all")
    ref = load_pairs(str(write_jsonl(tmp_path / "a.jsonl", tfds_prefs.ROWS[name]["train"])), tok, options, split="all")
    assert len(ds) > 0 and ds.report["source"] == f"tfds:{name}:data_dir={data_dir}:train"
    same_dataset(ds, ref)


def test_decoded_values(data_dir, tok):
    """Text comes back as str (UTF-8), numbers as Python numbers, message Sequences as lists of dicts."""
    from haf_jax.data.sources import parse_source, read_rows

    rows = list(read_rows(parse_source(f"tfds:explicit_prefs:data_dir={data_dir}:train")))
    assert rows[3] == ("row 3", tfds_prefs.ROWS["explicit_prefs"]["train"][3])
    assert type(rows[3][1]["id"]) is int
    where, row = list(read_rows(parse_source(f"tfds:conversation_prefs:data_dir={data_dir}:train")))[1]
    assert row["chosen"] == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "Good 1"}]
    ds = load_pairs(f"tfds:messages_prefs:data_dir={data_dir}:train", tok, split="all")
    assert ds.pairs[0]["chat"] and ds.pairs[0]["prompt"] == "<bos><|user|>\nHi 0<eos><|assistant|>\n"
    ds = load_pairs(
        f"tfds:labelled_prefs:data_dir={data_dir}:train",
        tok,
        PairOptions(fields=tfds_prefs.LABELLED_FIELDS),
        split="all",
    )
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in ds.pairs[:2]] == [
        ("x0?", "A0", "B0"),
        ("x1?", "B1", "A1"),
    ]


def test_data_dir_forms_recipe_and_slices(data_dir, tok, tmp_path, monkeypatch):
    """TFDS_DATA_DIR, the config block, a recipe over TFDS, split slices, and the carve."""
    want = load_pairs(f"tfds:hh_prefs:data_dir={data_dir}:test", tok, split="all")
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    assert load_pairs("tfds:hh_prefs:test", tok, split="all").pairs == want.pairs
    block = load_pairs({"tfds": "hh_prefs", "split": "test", "data_dir": str(data_dir)}, tok, split="all")
    assert block.pairs == want.pairs and block.report["source"] == f"tfds:hh_prefs:data_dir={data_dir}:test"
    assert load_pairs("tfds:hh_prefs:test[:5]", tok, split="all").pairs == want.pairs[:5]
    rows = tfds_prefs.ROWS["hh_prefs"]["train"]
    jl = write_jsonl(tmp_path / "hh.jsonl", rows)
    for split in ("train", "eval"):  # the deterministic eval carve picks the same rows
        a = load_pairs("tfds:hh_prefs:train", tok, PairOptions(eval_fraction=0.25, seed=1), split=split)
        b = load_pairs(str(jl), tok, PairOptions(eval_fraction=0.25, seed=1), split=split)
        same_dataset(a, b)
    a = load_pairs("recipe:hh_harmless:tfds:hh_prefs:train", tok, split="all")
    b = load_pairs(f"recipe:hh_harmless:{jl}", tok, split="all")
    assert a.pairs == b.pairs and a.report["filtered_by_reason"] == b.report["filtered_by_reason"]


def test_host_sharding_and_resume(data_dir, tok, tmp_path):
    """Two simulated processes own disjoint pairs exactly as for a file; a stopped loader resumes."""
    spec = f"tfds:hh_prefs:data_dir={data_dir}:train"
    jl = str(write_jsonl(tmp_path / "hh.jsonl", tfds_prefs.ROWS["hh_prefs"]["train"]))
    for p in range(2):
        options = PairOptions(max_length=64, max_prompt_length=32, process_index=p, process_count=2)
        a, b = load_pairs(spec, tok, options, split="all"), load_pairs(jl, tok, options, split="all")
        np.testing.assert_array_equal(a.local_indices, b.local_indices)
        same_batches(a, b)
    ds = load_pairs(spec, tok, PairOptions(max_length=64, max_prompt_length=32), split="all")
    with PairLoader(ds, 8, seed=5) as ref:
        want = [next(ref) for _ in range(9)]
    with PairLoader(ds, 8, seed=5) as a:
        for _ in range(4):
            next(a)
        state = json.loads(json.dumps(a.state))
    with PairLoader(ds, 8, seed=0) as b:
        b.restore(state)
        for w in want[4:]:
            np.testing.assert_array_equal(next(b)["tokens"], w["tokens"])


def test_broken_datasets_one_line_errors(data_dir, tok):
    """Missing feature, non-UTF-8 text (plain and inside a message), bad split, not prepared:
    one line naming the dataset, split, row and field."""
    d = data_dir
    src = f"tfds:broken_prefs:data_dir={d}:train"
    assert _error(src, tok) == (
        f"{src} row 0: cannot recognise the record form from fields "
        "['answer', 'blob', 'chosen', 'prompt']; expected prompt/chosen/rejected, "
        "chosen/rejected (HH dialogues or message lists), response_0/response_1/label "
        "or responses/ranking|scores (see fields=)"
    )
    assert _error(src, tok, fields={"form": "explicit"}).startswith(
        f"{src} row 0, field 'rejected': missing field (row has ['answer', 'blob', 'chosen', 'prompt'])"
    )
    assert _error(src, tok, fields={"rejected": "answer"}) == (
        f"{src} row 2, field 'chosen': not valid UTF-8 (byte 0xe9 at byte offset 3)"
    )
    # the binary 'blob' feature is never read: the rows before the bad one load
    ok = load_pairs(
        f"tfds:broken_prefs:data_dir={d}:train[:2]", tok, PairOptions(fields={"rejected": "answer"}), split="all"
    )
    assert [p["rejected"] for p in ok.pairs] == ["a0", "a1"]
    src = f"tfds:broken_messages_prefs:data_dir={d}:train"
    assert _error(src, tok) == (
        f"{src} row 1, field 'chosen': not valid UTF-8 (byte 0xe9 at byte offset 2) in [1]['content']"
    )
    src = f"tfds:explicit_prefs:data_dir={d}:train"
    assert _error(f"recipe:beavertails_safe:{src}", tok).startswith(
        f"{src} row 0, field 'is_response_0_safe': missing field"
    )
    assert re.fullmatch(
        rf"tfds:explicit_prefs:data_dir={re.escape(str(d))}:validation: cannot read split "
        r"'validation' from data_dir .*Unknown split 'validation'.*",
        _error(f"tfds:explicit_prefs:data_dir={d}:validation", tok),
    )
    assert _error(f"tfds:nothing_here:data_dir={d}:train", tok) == (
        f"tfds:nothing_here:data_dir={d}:train: dataset not found (not prepared) in data_dir {d}"
    )
    assert _error(f"tfds:explicit_prefs:data_dir={d}/nope:train", tok) == (
        f"tfds:explicit_prefs:data_dir={d}/nope:train: TFDS data_dir '{d}/nope' is not a directory"
    )
    for bad in ("tfds:x", "tfds:x:cfg:train", "tfds:x::train"):
        assert "bad TFDS spec" in _error(bad, tok)


def test_cli_check_and_missing_package(data_dir, tmp_path, capsys, monkeypatch):
    main = command("haf_jax.data.__main__")  # with its own flags only (see helpers.commands)
    main.invoke(["haf_jax.data", f"tfds:hh_prefs:data_dir={data_dir}:test"])  # exit 0: no SystemExit
    assert "rows read 16" in capsys.readouterr().out
    src = f"tfds:broken_prefs:data_dir={data_dir}:train"
    with pytest.raises(SystemExit) as e:
        main.invoke(["haf_jax.data", f"recipe:hh_helpful:{src}"])
    assert e.value.code == 2
    assert (
        capsys.readouterr().err.strip() == f"data error: {src} row 0, field 'rejected': missing field "
        "(row has ['answer', 'blob', 'chosen', 'prompt'])"
    )
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as without the extra
    with pytest.raises(SystemExit) as e:
        main.invoke(["haf_jax.data", "tfds:hh_prefs:test"])
    assert e.value.code == 2
    assert re.fullmatch(
        r"data error: tfds:hh_prefs:test: TensorFlow Datasets is not installed; "
        r"pip install 'haf_jax\[tfds\]' .*",
        capsys.readouterr().err.strip(),
    )


# ----------------------------------------------------------------------------- end to end


TINY = [
    "--config.train.steps=2",
    "--config.train.batch_size=4",
    "--config.data.max_length=64",
    "--config.data.max_prompt_length=32",
    "--config.train.eval_every=2",
    "--config.train.eval_batch_size=16",
    "--config.train.log_every=1",
    "--config.checkpoint.every_steps=2",
]


@pytest.mark.slow
def test_train_and_score_from_tfds(data_dir, tok, one_device, tmp_path, monkeypatch):
    """Training on `--config.data.train=tfds:hh_prefs:train --config.data.eval=tfds:hh_prefs:test` with
    TFDS_DATA_DIR (in this process, on one device); the run's data is the JSON lines data, token for
    token; then evaluation.scoring.score (what `haf_jax.score` runs) scores the TFDS test split."""
    from haf_jax.evaluation.scoring import score

    workdir = tmp_path / "run"
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    train_in_process(workdir, "--config.data.train=tfds:hh_prefs:train", "--config.data.eval=tfds:hh_prefs:test", *TINY)
    monkeypatch.delenv("TFDS_DATA_DIR")  # the scored spec names its data_dir
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["last"]["step"] == 2 and summary["last"]["pairs"] == 16
    options = PairOptions(max_length=64, max_prompt_length=32)
    for split in ("train", "test"):
        report = json.loads((workdir / f"data_report_{'eval' if split == 'test' else 'train'}.json").read_text())
        assert report["source"] == f"tfds:hh_prefs:{split}"
        rows = tfds_prefs.ROWS["hh_prefs"][split]
        ref = load_pairs(str(write_jsonl(tmp_path / f"{split}.jsonl", rows)), tok, options, split="all")
        assert report["fingerprint"] == ref.fingerprint  # rows + tokenizer + tokenisation settings
        same_batches(load_pairs(f"tfds:hh_prefs:data_dir={data_dir}:{split}", tok, options, split="all"), ref)

    out = tmp_path / "scores.jsonl"
    score(str(workdir), f"tfds:hh_prefs:data_dir={data_dir}:test", str(out), max_length=64, batch_size=16)
    scores = [json.loads(line) for line in out.read_text().splitlines()]
    assert [s["row"] for s in scores] == list(range(16))
    assert all(np.isfinite([s["reward_chosen"], s["reward_rejected"]]).all() for s in scores)
