"""Tokenisation contract (DESIGN.md s3), truncation rules, tokenizer loading."""

import json

import numpy as np
import pytest

from haf_jax.data import DataError, PairOptions, load_pairs, load_tokenizer
from haf_jax.data.tokenize import encode_pairs


@pytest.fixture(scope="module")
def gemma(shared_data):
    return load_tokenizer(shared_data / "gemma-tokenizer")


def ids(t, text):
    return t(text, add_special_tokens=False)["input_ids"]


def one(t, prompt, chosen, rejected, **kw):
    kw.setdefault("max_length", 512)
    kw.setdefault("max_prompt_length", 128)
    return encode_pairs(t, [{"prompt": prompt, "chosen": chosen, "rejected": rejected}], **kw)


def test_bundled_tokenizer_specials(tok):
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 2048
    text = "\n\nHuman: héllo 🙂\n\nAssistant: ok"
    assert tok.decode(ids(tok, text)) == text  # byte-level: lossless


def test_gemma_expected_ids(gemma):
    assert ids(gemma, "Hello world! The quick brown fox.") == [4521, 2134, 235341, 714, 4320, 8426, 25341, 235265]
    t = one(gemma, "Hello world!", " The quick brown fox.", " No.")
    assert t.prompt[0].tolist() == [2, 4521, 2134, 235341]
    assert t.chosen[0].tolist() == [714, 4320, 8426, 25341, 235265, 1]
    full = np.concatenate([t.prompt[0], t.chosen[0]]).tolist()
    assert full[:-1] == [2, 4521, 2134, 235341, 714, 4320, 8426, 25341, 235265]


def test_gemma_no_double_bos_and_one_eos(gemma):
    # prompt text that itself starts with "<bos>" must not give a second BOS
    t = one(gemma, "<bos>Hi there", " yes", " no")
    assert t.prompt[0].tolist().count(2) == 1 and t.prompt[0][0] == 2
    for y in (t.chosen[0], t.rejected[0]):
        assert y.tolist().count(1) == 1 and y[-1] == 1


def test_gemma_chat_template(tmp_path, gemma):
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Yo"}],
        "rejected": [{"role": "assistant", "content": "Bye"}],
    }
    path = tmp_path / "m.jsonl"
    path.write_text(json.dumps(row) + "\n")
    ds = load_pairs(str(path), gemma, split="all")
    b = next(ds.batches(1))
    n = b["last_index"][0, 0] + 1
    row0 = b["tokens"][0, 0, :n].tolist()
    # <bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nYo<end_of_turn>
    assert row0 == [2, 106, 1645, 108, 2151, 107, 108, 106, 2516, 108, 19845, 107]
    assert b["response_mask"][0, 0, :n].tolist() == [0] * 10 + [1, 1]
    assert row0.count(2) == 1


def test_same_prompt_tokens_both_sides_and_mask(tok):
    t = one(tok, "Question: why?", " Because.", " No idea at all, sorry.")
    assert t.lengths[0].tolist() == [len(t.prompt[0]) + len(t.chosen[0]), len(t.prompt[0]) + len(t.rejected[0])]
    assert t.chosen[0].tolist() == ids(tok, " Because.") + [1]


def test_prompt_keeps_its_end(tok):
    prompt = " ".join(f"w{i}" for i in range(200))
    p_ids = ids(tok, prompt)
    t = one(tok, prompt, " a", " b", max_length=64, max_prompt_length=16)
    assert t.prompt[0].tolist() == [2] + p_ids[-15:]
    assert t.flags[0] & 1


def test_responses_cut_by_same_rule_keep_eos(tok):
    long_c = " ".join(f"c{i}" for i in range(300))
    long_r = " ".join(f"r{i}" for i in range(300))
    t = one(tok, "p", long_c, long_r, max_length=64, max_prompt_length=16)
    budget = 64 - len(t.prompt[0])
    for y, text in ((t.chosen[0], long_c), (t.rejected[0], long_r)):
        assert len(y) == budget and y[-1] == 1
        assert y[:-1].tolist() == ids(tok, text)[: budget - 1]
    assert t.lengths[0].tolist() == [64, 64]
    assert t.flags[0] == 2  # response cut, EOS kept
    t2 = one(tok, "p", long_c, " short", max_length=64, max_prompt_length=16, keep_eos=False)
    assert t2.chosen[0][-1] != 1 and t2.rejected[0][-1] == 1 and t2.flags[0] == 2 | 4


def test_report_counts_truncation(tmp_path, tok):
    rows = [
        {"prompt": "x " * 300, "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "y " * 600, "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = load_pairs(str(path), tok, PairOptions(max_length=128, max_prompt_length=32), split="all").report
    assert (r["truncated_prompt"], r["truncated_response"], r["lost_eos"]) == (1, 1, 0)
    assert r["tokens"]["max"] == 128 and r["tokens_raw"]["max"] > 128
    r = load_pairs(
        str(path), tok, PairOptions(max_length=128, max_prompt_length=32, keep_eos=False), split="all"
    ).report
    assert r["lost_eos"] == 1


def test_bad_lengths(tok):
    with pytest.raises(DataError, match="max_length >= max_prompt_length"):
        one(tok, "p", "a", "b", max_length=10, max_prompt_length=10)


def test_tokenizer_without_bos(tmp_path, tok):
    tok.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["bos_token"] = None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    t2 = load_tokenizer(str(tmp_path))
    assert t2.bos_token_id is None
    t = one(t2, "Hi", " a", " b")
    assert t.prompt[0].tolist() == ids(tok, "Hi")


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(DataError, match="got a file"):
        load_tokenizer(str(tmp_path / "f.txt"))


def test_gemma_contract_on_real_hh_rows(tmp_path, shared_data, gemma):
    import gzip

    src = shared_data / "hh-rlhf-harmless-base" / "test.jsonl.gz"
    lines = gzip.open(src, "rt", encoding="utf-8").readlines()[:150]
    path = tmp_path / "hh.jsonl"
    path.write_text("".join(lines))
    ds = load_pairs(str(path), gemma, PairOptions(max_length=512, max_prompt_length=128), split="all")
    for b in ds.batches(16):
        for r in np.flatnonzero(b["valid"]):
            pair = ds.pairs[b["index"][r]]
            for s, text in ((0, pair["chosen"]), (1, pair["rejected"])):
                n = b["last_index"][r, s] + 1
                row = b["tokens"][r, s, :n].tolist()
                assert row[0] == 2 and row.count(2) == 1  # one BOS
                assert row[-1] == 1 and row.count(1) == 1  # one EOS, last
                resp = b["tokens"][r, s][b["response_mask"][r, s] == 1].tolist()
                y = ids(gemma, text)
                assert resp == (y + [1] if len(resp) == len(y) + 1 else y[: len(resp) - 1] + [1])
            m0 = np.flatnonzero(b["response_mask"][r, 0])[0]
            m1 = np.flatnonzero(b["response_mask"][r, 1])[0]
            assert m0 == m1 and (b["tokens"][r, 0, :m0] == b["tokens"][r, 1, :m1]).all()
            p = ids(gemma, pair["prompt"])
            assert b["tokens"][r, 0, 1:m0].tolist() == p[-(m0 - 1) :]  # prompt keeps its end
