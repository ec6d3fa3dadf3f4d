"""Rows in memory (`Records`), the options object (`PairOptions`) and the one JSON-lines reader/writer."""

import dataclasses
import gzip
import re

import numpy as np
import pytest

from haf_jax.data import DataError, PairOptions, Records, jsonl, load_pairs, load_tokenizer, sample_paths

ROWS = [
    {"prompt": "p1", "chosen": " a", "rejected": " b", "id": "x"},
    {"prompt": "p2", "chosen": " c", "rejected": " d"},
    {"prompt": "p3", "chosen": " e", "rejected": " f"},
]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(sample_paths()["tokenizer"])


# ----------------------------------------------------------------------------- Records
def test_records_load_like_the_same_file(tmp_path, tok):
    """Pairs, tokens, report and fingerprint of rows in memory are those of a file holding them; the
    report names the records."""
    path = tmp_path / "r.jsonl"
    jsonl.write(path, ROWS)
    options = PairOptions(max_length=64, max_prompt_length=16)
    ds = load_pairs(Records("candidates", ROWS), tok, options, split="all")
    ref = load_pairs(str(path), tok, options, split="all")
    assert ds.pairs == ref.pairs and len(ds) == 3 and ds.pairs[0]["id"] == "x"
    assert ds.fingerprint == ref.fingerprint  # like a file's path, the name is not part of it
    assert ds.report["source"] == "candidates"
    assert {**ds.report, "source": None} == {**ref.report, "source": None}
    for x, y in zip(ds.batches(2), ref.batches(2)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_records_in_other_forms_splits_and_recipes(tok):
    """Any record form converts; numpy values are taken as Python ones; the eval carve and recipes
    work as for files; a tuple of rows is a list of rows."""
    labelled = [
        {"prompt": f"q{i}", "response_0": f" u{i}", "response_1": f" v{i}", "label": np.int64(i % 2)} for i in range(20)
    ]
    ds = load_pairs(Records("labelled", tuple(labelled)), tok, split="all")
    assert [(p["chosen"], p["rejected"]) for p in ds.pairs[:2]] == [(" u0", " v0"), (" v1", " u1")]
    options = PairOptions(eval_fraction=0.25, seed=1)
    ev = load_pairs(Records("labelled", labelled), tok, options, split="eval")
    tr = load_pairs(Records("labelled", labelled), tok, options, split="train")
    assert len(ev) == 5 and len(tr) == 15
    safe = [
        {
            "prompt": "q",
            "response_0": " a",
            "response_1": " b",
            "is_response_0_safe": True,
            "is_response_1_safe": False,
        },
        {"prompt": "q", "response_0": " a", "response_1": " b", "is_response_0_safe": True, "is_response_1_safe": True},
    ]
    # pairs with exactly one safe response (both safe: dropped); chosen is the safer_response_id one by
    # default (the authors'), the flagged-safe one with the flags recipe: here they disagree
    safe = [{**row, "safer_response_id": 1} for row in safe]
    ds = load_pairs(Records("bt", safe, recipe="beavertails_safe"), tok, split="all")
    assert len(ds) == 1 and ds.report["recipe"] == "beavertails_safe" and ds.pairs[0]["chosen"] == " b"
    ds = load_pairs(Records("bt", safe, recipe="beavertails_safe_flags"), tok, split="all")
    assert len(ds) == 1 and ds.report["recipe"] == "beavertails_safe_flags" and ds.pairs[0]["chosen"] == " a"


@pytest.mark.parametrize(
    "rows,pattern",
    [
        (
            ROWS[:1] + [{"prompt": "p", "chosen": None, "rejected": "b"}],
            r"^candidates record 1, field 'chosen': expected a value, got null$",
        ),
        (
            ROWS[:2] + [{"prompt": "p", "chosen": 3, "rejected": "b"}],
            r"^candidates record 2, field 'chosen': expected a string, got number$",
        ),
        (ROWS[:1] + [{"prompt": "p", "chosen": "a"}], r"^candidates record 1, field 'rejected': missing field"),
        ([{"question": "q"}], r"^candidates record 0: cannot recognise the record form from fields \['question'\]"),
        (ROWS + [["p", "a", "b"]], r"^candidates record 3: expected a record \(dict\), got a list$"),
        (
            [{"prompt": "p", "chosen": " a", "rejected": b"\xe9"}],
            r"^candidates record 0, field 'rejected': not valid UTF-8 \(byte 0xe9",
        ),
    ],
)
def test_bad_record_names_index_and_field(tok, rows, pattern):
    with pytest.raises(DataError) as e:
        load_pairs(Records("candidates", rows), tok, split="all")
    assert re.search(pattern, str(e.value)), str(e.value)


def test_bad_records_themselves(tok):
    with pytest.raises(DataError, match=r"^candidates: no records \(an empty list\)$"):
        Records("candidates", [])
    with pytest.raises(DataError, match="non-empty name"):
        Records("", ROWS)
    with pytest.raises(DataError, match=r"^candidates: expected a list of records \(dicts\), got a dict$"):
        Records("candidates", ROWS[0])
    with pytest.raises(DataError, match=r"^candidates: expected a list of records \(dicts\), got a generator$"):
        Records("candidates", (r for r in ROWS))
    with pytest.raises(DataError, match="unknown recipe 'nope'"):
        load_pairs(Records("candidates", ROWS, recipe="nope"), tok, split="all")


# ----------------------------------------------------------------------------- PairOptions
def test_options_are_checked_when_made():
    for bad, pattern in [
        (dict(truncation="nope"), "unknown truncation 'nope'"),
        (dict(degenerate="drop"), "unknown degenerate 'drop'"),
        (dict(batching="bucket"), "unknown batching 'bucket'"),
        (dict(template="llama"), "unknown template 'llama'"),
        (dict(subsample=-1), "subsample must be a non-negative integer"),
        (dict(subsample=1.5), "subsample must be a non-negative integer"),
        (dict(max_length="512"), "max_length must be an integer"),
        (dict(seed=True), "seed must be an integer"),
        (dict(process_index=2, process_count=2), "bad process_index=2 for process_count=2"),
        (dict(eval_fraction=1.0), r"eval_fraction must be in \[0, 1\)"),
        (dict(max_skip_fraction=-0.1), "max_skip_fraction must be a number >= 0"),
        (dict(keep_eos=1), "keep_eos must be true or false"),
        (dict(fields={"prompt": 3}), "fields must map field names"),
        (dict(buckets=[128, 0]), "buckets must be positive integers"),
    ]:
        with pytest.raises(DataError, match=pattern):
            PairOptions(**bad)


def test_options_are_frozen_values(tok):
    fields = {"prompt": "question"}
    o = PairOptions(fields=fields, buckets=[64, 128])
    fields["prompt"] = "changed"  # the caller's dict is copied
    assert o.fields_dict() == {"prompt": "question"} and o.buckets == (64, 128)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.max_length = 3
    with pytest.raises(TypeError):
        o.fields["prompt"] = "x"
    assert dataclasses.replace(o, subsample=3) == PairOptions(
        fields={"prompt": "question"}, buckets=(64, 128), subsample=3
    )
    with pytest.raises(DataError, match="options must be a PairOptions, got dict"):
        load_pairs("sample", tok, {"max_length": 64}, split="all")
    with pytest.raises(DataError, match="split must be one of"):
        load_pairs("sample", tok, split="test")


# ----------------------------------------------------------------------------- jsonl
@pytest.mark.parametrize("name", ["a.jsonl", "a.jsonl.gz"])
def test_jsonl_round_trip(tmp_path, name):
    rows = [{"prompt": "café ☕", "n": 3, "x": [1.5, None]}, {"prompt": "second"}]
    path = tmp_path / "sub" / name  # the folder is made
    jsonl.write(path, rows)
    assert list(jsonl.read(path)) == [(1, rows[0]), (2, rows[1])]
    raw = path.read_bytes()
    text = (gzip.decompress(raw) if name.endswith(".gz") else raw).decode()
    assert "café ☕" in text and text.count("\n") == 2  # UTF-8, one object per line
    jsonl.write(path, rows)
    assert path.read_bytes() == raw  # same rows, same bytes (gzip mtime 0)
    assert [p.name for p in path.parent.iterdir()] == [name]  # no temporary file left behind


def test_jsonl_read_skips_blank_lines_and_bom(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n   \n{"a": 2}\n')
    assert list(jsonl.read(str(path))) == [(1, {"a": 1}), (4, {"a": 2})]
    (tmp_path / "e.jsonl").write_bytes(b"")
    assert list(jsonl.read(tmp_path / "e.jsonl")) == []


@pytest.mark.parametrize(
    "name,data,pattern",
    [
        ("m.jsonl", b'{"a": 1}\n{"a": 1,, }\n', r"^{f} line 2: malformed JSON \(Expecting property name"),
        ("l.jsonl", b'{"a": 1}\n[1]\n', r"^{f} line 2: expected a JSON object, got a list$"),
        ("arr.jsonl", b'[{"a": 1}]\n', r"^{f} line 1: found a JSON array where JSON lines"),
        ("u.jsonl", b'{"a": "caf\xe9"}\n', r"^{f} line 1: not valid UTF-8 \(byte 0xe9 at byte offset 10"),
        ("g.jsonl.gz", b'{"a": 1}\n', r"^{f}: broken gzip stream after line 0 \(BadGzipFile"),
    ],
)
def test_jsonl_read_errors(tmp_path, name, data, pattern):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(DataError) as e:
        list(jsonl.read(str(path)))
    assert re.search(pattern.format(f=re.escape(str(path))), str(e.value)), str(e.value)


def test_jsonl_read_missing_and_directory(tmp_path):
    with pytest.raises(DataError, match=r"nope.jsonl: file not found$"):
        list(jsonl.read(str(tmp_path / "nope.jsonl")))
    with pytest.raises(DataError, match=r": is a directory, expected a data file$"):
        list(jsonl.read(str(tmp_path)))


def test_jsonl_write_refuses_what_json_cannot_hold(tmp_path):
    path = tmp_path / "w.jsonl"
    with pytest.raises(TypeError, match=r"^record 1: Object of type float32 is not JSON serializable$"):
        jsonl.write(path, [{"a": 1}, {"a": np.float32(1)}])
    with pytest.raises(TypeError, match=r"^record 0: expected a dict, got list$"):
        jsonl.write(path, [[1, 2]])
    assert not path.exists()  # nothing written when a row is bad
