"""Local file formats, spec grammar, and every bad-input message (file, line/row, field)."""

import gzip
import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers.commands import command

from haf_jax.data import DataError, load_pairs
from haf_jax.data.sources import Source, parse_source, read_rows

ROOT = pathlib.Path(__file__).resolve().parents[2]

ROWS = [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def texts(ds):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in ds.pairs]


def test_all_local_formats_agree(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(jsonl(ROWS))
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(jsonl(ROWS))
    (tmp_path / "a.json").write_text(json.dumps(ROWS))
    (tmp_path / "a.csv").write_text("prompt,chosen,rejected\np1,a,b\np2,c,d\n")
    pq.write_table(pa.Table.from_pylist(ROWS), tmp_path / "a.parquet")
    want = [("p1", "a", "b"), ("p2", "c", "d")]
    for name in ("a.jsonl", "a.jsonl.gz", "a.json", "a.csv", "a.parquet"):
        assert texts(load_pairs(str(tmp_path / name), tok, split="all")) == want, name


def test_spec_grammar():
    assert parse_source("x/y.jsonl") == Source("file", "x/y.jsonl")
    assert parse_source("hf:Anthropic/hh-rlhf:data_dir=harmless-base:test") == Source(
        "hf", "Anthropic/hh-rlhf", "test", None, "harmless-base"
    )
    assert parse_source("hf:tatsu-lab/alpaca_farm:alpaca_human_preference:preference") == Source(
        "hf", "tatsu-lab/alpaca_farm", "preference", "alpaca_human_preference", None
    )
    assert parse_source("tfds:foo:train") == Source("tfds", "foo", "train")
    assert parse_source("tfds:foo/cfg:data_dir=gs://b/tfds:train[:10%]") == Source(
        "tfds", "foo/cfg", "train[:10%]", None, "gs://b/tfds"
    )
    assert parse_source({"tfds": "foo", "split": "test", "data_dir": "/d"}).label == "tfds:foo:data_dir=/d:test"
    assert parse_source("hf:/data/hh-rlhf:data_dir=harmless-base:test[10:20]") == Source(
        "hf", "/data/hh-rlhf", "test[10:20]", None, "harmless-base"
    )
    assert parse_source({"hf": "a/b", "split": "test"}) == Source("hf", "a/b", "test")
    assert parse_source("sample").name.endswith(".jsonl.gz")
    for bad in ("hf:onlyname", "tfds:x", "tfds:x:cfg:train", "tfds:x::train", "hf:x:a:b:c", "", {"nope": 1}):
        with pytest.raises(DataError):
            parse_source(bad)


def test_hub_offline_and_tfds_missing_messages(tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DataError, match=r"hf:nobody/no-such-dataset:train: cannot load hub dataset.*offline"):
        load_pairs("hf:nobody/no-such-dataset:train", tok)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # as without the tfds extra
    with pytest.raises(DataError, match=r"tfds:mnist:train: TensorFlow Datasets is not installed.*haf_jax\[tfds\]"):
        list(read_rows(parse_source("tfds:mnist:train")))
    with pytest.raises(DataError, match="unknown recipe 'nope'"):
        load_pairs("recipe:nope:x.jsonl", tok)


# (file name, bytes, expected message regex). {f} is the file path.
GOOD = jsonl(ROWS).encode()
BAD = [
    (
        "malformed.jsonl",
        GOOD + b'{"prompt": "p", "chosen": "a",, }\n',
        r"{f} line 3: malformed JSON \(Expecting property name enclosed in double quotes at column 31\)",
    ),
    ("missing.jsonl", GOOD + b'{"prompt": "p", "chosen": "a"}\n', r"{f} line 3, field 'rejected': missing field"),
    (
        "nonstring.jsonl",
        b'{"prompt": "p", "chosen": 3, "rejected": "b"}\n',
        r"{f} line 1, field 'chosen': expected a string, got number",
    ),
    (
        "null.jsonl",
        GOOD + b'{"prompt": null, "chosen": "a", "rejected": "b"}\n',
        r"{f} line 3, field 'prompt': expected a value, got null",
    ),
    (
        "list.jsonl",
        b'{"prompt": "p", "chosen": "a", "rejected": "b"}\n[1, 2]\n',
        r"{f} line 2: expected a JSON object, got a list",
    ),
    (
        "array.jsonl",
        json.dumps(ROWS, indent=1).encode(),
        r"{f} line 1: found a JSON array where JSON lines .* were expected",
    ),
    ("empty.jsonl", b"", r"{f}: empty file \(0 bytes"),
    ("blank.jsonl", b"\n\n  \n", r"{f}: empty file \(no records\)"),
    (
        "latin1.jsonl",
        GOOD + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'.encode("latin-1"),
        r"{f} line 3: not valid UTF-8 \(byte 0xe9",
    ),
    ("notgzip.jsonl.gz", GOOD, r"{f}: broken gzip stream after line 0 \(BadGzipFile"),
    ("truncated.jsonl.gz", gzip.compress(GOOD * 50)[:-30], r"{f}: broken gzip stream after line \d+"),
    ("data.txt", GOOD, r"{f}: unsupported file type '.txt'; expected one of .jsonl"),
    ("bad.json", b'[{"prompt": "p", "chosen": "a", "rejected": "b"}, 5]', r"{f} row 1: expected a JSON object"),
    ("broken.json", b'[{"prompt": "p",\n "chosen": }]', r"{f} line 2: malformed JSON"),
    ("fake.parquet", b"this is not parquet", r"{f}: cannot read as parquet"),
    (
        "nullcell.csv",
        b"prompt,chosen,rejected\np1,a,b\np2,,d\n",
        r"{f} line 3, field 'chosen': expected a value, got null",
    ),
    ("badbytes.csv", b"prompt,chosen,rejected\np1,a,\xff\n", r"{f} line 2: not valid UTF-8 \(byte 0xff"),
    (
        "unknown.jsonl",
        b'{"question": "q", "answer": "a"}\n',
        r"{f} line 1: cannot recognise the record form from fields \['answer', 'question'\]",
    ),
    (
        "label.jsonl",
        b'{"prompt": "p", "response_0": "a", "response_1": "b", "label": 2}\n',
        r"{f} line 1, field 'label': expected 0 or 1, got 2",
    ),
    (
        "rank.jsonl",
        b'{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}\n',
        r"{f} line 1, field 'ranking': expected a permutation of 0..1",
    ),
    (
        "msgs.jsonl",
        b'{"prompt": [{"role": "user"}], "chosen": [], "rejected": []}\n',
        r"{f} line 1, field 'prompt': message 0 must be",
    ),
]


@pytest.mark.parametrize("name,data,pattern", BAD, ids=[b[0] for b in BAD])
def test_bad_input_messages(tmp_path, tok, name, data, pattern):
    import re

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        load_pairs(str(path), tok, split="all")
    assert re.search(pattern.format(f=re.escape(str(path))), str(e.value)), str(e.value)
    assert "\n" not in str(e.value), str(e.value)  # one line (a traceback is the CLI's, see below)


def test_missing_file_and_directory(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        load_pairs(str(tmp_path / "nope.jsonl"), tok)
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        load_pairs(str(tmp_path / "d.jsonl"), tok)


def test_recipe_field_errors(tmp_path, tok):
    p = tmp_path / "b.jsonl"
    p.write_text(
        json.dumps(
            {
                "prompt": "p",
                "response_0": "a",
                "response_1": "b",
                "is_response_0_safe": "yes",
                "is_response_1_safe": False,
            }
        )
        + "\n"
    )
    with pytest.raises(DataError, match=r"line 1, field 'is_response_0_safe': expected true/false"):
        load_pairs(f"recipe:beavertails_safe:{p}", tok, split="all")


def test_cli_reports_and_fails_cleanly(tmp_path, capsys):
    main = command("haf_jax.data.__main__")  # with its own flags only (see helpers.commands)
    good = tmp_path / "g.jsonl"
    good.write_text(jsonl(ROWS))
    main.invoke(["haf_jax.data", str(good), "--out", str(tmp_path / "r.json")])  # exit 0: no SystemExit
    out = capsys.readouterr().out
    assert "rows read 2, pairs 2" in out and "skipped: none" in out
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == 2
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "chosen": null, "rejected": "b"}\n')
    with pytest.raises(SystemExit) as e:
        main.invoke(["haf_jax.data", str(bad)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == f"data error: {bad} line 1, field 'chosen': expected a value, got null"


def test_cli_bad_data_in_a_child_process_is_one_line_without_traceback(tmp_path):
    """`python -m haf_jax.data` as a user runs it: what reaches the terminal is the one message and
    exit status 2 (an in-process run cannot show a traceback that Python's top level would print)."""
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    p = subprocess.run(
        [sys.executable, "-m", "haf_jax.data", str(bad)], capture_output=True, text=True, env=env, timeout=300
    )
    assert p.returncode == 2, p.stderr[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    assert p.stderr.strip().splitlines()[-1].startswith(f"data error: {bad} line 2"), p.stderr[-4000:]
