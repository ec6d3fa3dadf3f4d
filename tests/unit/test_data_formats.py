"""Record forms and paper recipes -> {prompt, chosen, rejected} (+ tokens), skipping, splits."""

import gzip
import json

import numpy as np
import pytest

from haf_jax.data import DataError, PairOptions, load_pairs, sample_paths
from haf_jax.data.formats import convert_rows


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def triples(ds):
    return [(p["prompt"], p["chosen"], p["rejected"]) for p in ds.pairs]


def load(tmp_path, rows, tok, name="d.jsonl", **options):
    """Split "all" of `rows` written to a JSON-lines file, loaded with PairOptions(**options)."""
    return load_pairs(write_jsonl(tmp_path / name, rows), tok, PairOptions(**options), split="all")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_explicit_round_trip_and_tokens(tmp_path, tok):
    ds = load(tmp_path, [{"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "id": "a"}], tok)
    assert triples(ds) == [("Q: 2+2?", " 4", " 5")]
    assert ds.pairs[0]["id"] == "a"
    b = next(ds.batches(1))
    p, c, r = ids(tok, "Q: 2+2?"), ids(tok, " 4"), ids(tok, " 5")
    for side, y in ((0, c), (1, r)):
        want = [tok.bos_token_id] + p + y + [tok.eos_token_id]
        n = len(want)
        assert b["tokens"][0, side, :n].tolist() == want
        assert (b["tokens"][0, side, n:] == tok.pad_token_id).all()
        assert b["response_mask"][0, side].tolist() == [0] * (1 + len(p)) + [1] * (len(y) + 1) + [0] * (
            b["tokens"].shape[2] - n
        )
        assert b["last_index"][0, side] == n - 1


def test_hh_implicit_prompt(tmp_path, tok):
    c = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Fine, thanks."
    r = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant: Go away."
    ds = load(tmp_path, [{"chosen": c, "rejected": r}], tok)
    prompt = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: How are you?\n\nAssistant:"
    assert triples(ds) == [(prompt, " Fine, thanks.", " Go away.")]


def test_messages_prompt_and_full_conversations(tmp_path, tok):
    rows = [
        {
            "prompt": [{"role": "user", "content": "Hi"}],
            "chosen": [{"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "assistant", "content": "Go"}],
        },
        {
            "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
            "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Go"}],
        },
    ]
    ds = load(tmp_path, rows, tok)
    want = ("<bos><|user|>\nHi<eos><|assistant|>\n", "Hello<eos>", "Go<eos>")
    assert triples(ds) == [want, want]
    b = next(ds.batches(2))
    row = b["tokens"][0, 0, : b["last_index"][0, 0] + 1].tolist()
    assert row.count(tok.bos_token_id) == 1 and row[0] == tok.bos_token_id
    assert row.count(tok.eos_token_id) == 2  # user turn end + assistant turn end
    assert row[-1] == tok.eos_token_id
    resp = [t for t, m in zip(b["tokens"][0, 0], b["response_mask"][0, 0]) if m]
    assert resp == ids(tok, "Hello") + [tok.eos_token_id]


def test_labelled_pairs_and_custom_fields(tmp_path, tok):
    rows = [{"q": "x?", "a": "yes", "b": "no", "better": 1}, {"q": "y?", "a": "A", "b": "B", "better": 0}]
    fields = {"prompt": "q", "response_0": "a", "response_1": "b", "label": "better"}
    ds = load(tmp_path, rows, tok, fields=fields)
    assert triples(ds) == [("x?", "no", "yes"), ("y?", "A", "B")]
    ds = load(tmp_path, [{"prompt": "p", "response_0": "u", "response_1": "v", "label": 1}], tok, name="e.jsonl")
    assert triples(ds) == [("p", "v", "u")]


def test_ranking_expanded_to_pairs(tmp_path, tok):
    rows = [
        {"prompt": "p", "responses": ["a", "b", "c"], "ranking": [2, 0, 1], "id": 7},
        {"prompt": "q", "responses": ["x", "y", "z"], "scores": [1.0, 3.0, 1.0]},
    ]
    ds = load(tmp_path, rows, tok)
    assert sorted(triples(ds)) == sorted(
        [("p", "c", "a"), ("p", "c", "b"), ("p", "a", "b"), ("q", "y", "x"), ("q", "y", "z")]
    )
    assert {p.get("id") for p in ds.pairs[:3]} == {"7#2>0", "7#2>1", "7#0>1"}


@pytest.mark.parametrize(
    "template,prompt,chosen",
    [
        ("none", "Say hi", "hi"),
        ("phi2", "Instruct: Say hi\nOutput:", " hi"),
        ("mistral", "[INST] Say hi [/INST]", "hi"),
    ],
)
def test_templates(tmp_path, tok, template, prompt, chosen):
    ds = load(tmp_path, [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"}], tok, template=template)
    assert triples(ds)[0][:2] == (prompt, chosen)


def test_hh_recipe_single_turn_only_and_template(tmp_path, tok):
    rows = [
        {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: No."},
        {
            "chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
            "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: e",
        },
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    for name in ("hh_harmless", "hh_helpful"):
        ds = load_pairs(f"recipe:{name}:{path}", tok, split="all")
        assert triples(ds) == [("\n\nHuman: Hi?\n\nAssistant:", " Hello.", " No.")]
        assert ds.report["filtered_by_reason"] == {"multi_turn": 1}
    ds = load_pairs(f"recipe:hh_harmless:{path}", tok, PairOptions(template="phi2"), split="all")
    assert triples(ds) == [("Instruct: Hi?\nOutput:", " Hello.", " No.")]


def test_beavertails_safe_recipe(tmp_path, tok):
    base = {
        "prompt": "How do I pick a lock?",
        "response_0": "Call a locksmith.",
        "response_1": "Use a pin.",
        "better_response_id": 1,
        "safer_response_id": 0,
    }
    rows = [
        dict(base, is_response_0_safe=True, is_response_1_safe=False),
        dict(base, is_response_0_safe=False, is_response_1_safe=True),
        dict(base, is_response_0_safe=True, is_response_1_safe=True),
        dict(base, is_response_0_safe=False, is_response_1_safe=False),
    ]
    rows.append(dict(rows[1], safer_response_id=1, response_1=" Use a pin.  "))  # texts are not stripped
    path = write_jsonl(tmp_path / "b.jsonl", rows)
    # the authors' label (default): chosen = safer_response_id, also where the safety flags say otherwise
    ds = load_pairs("recipe:beavertails_safe:" + path, tok, PairOptions(template="mistral"), split="all")
    assert triples(ds) == [
        ("[INST] How do I pick a lock? [/INST]", "Call a locksmith.", "Use a pin."),
        ("[INST] How do I pick a lock? [/INST]", "Call a locksmith.", "Use a pin."),
        ("[INST] How do I pick a lock? [/INST]", " Use a pin.  ", "Call a locksmith."),
    ]
    assert ds.report["filtered_by_reason"] == {"not_exactly_one_safe": 2}
    # the option: chosen = the response flagged safe
    flags = load_pairs("recipe:beavertails_safe_flags:" + path, tok, PairOptions(template="mistral"), split="all")
    assert [t[1] for t in triples(flags)] == ["Call a locksmith.", "Use a pin.", " Use a pin.  "]
    bad = dict(rows[0], safer_response_id=2)
    with pytest.raises(DataError, match="safer_response_id.*expected 0 or 1, got 2"):
        load_pairs("recipe:beavertails_safe:" + write_jsonl(tmp_path / "bad.jsonl", [bad]), tok, split="all")


def test_alpaca_recipe_first_10_percent_eval(tmp_path, tok):
    rows = [
        {
            "instruction": f"Task {i}",
            "input": "ctx" if i == 0 else "",
            "output_1": f"o1-{i}",
            "output_2": f"o2-{i}",
            "preference": 1 + i % 2,
        }
        for i in range(20)
    ]
    path = "recipe:alpaca_human_pref:" + write_jsonl(tmp_path / "a.jsonl", rows)
    ev = load_pairs(path, tok, PairOptions(eval_fraction=0.5), split="eval")  # recipe rule wins
    tr = load_pairs(path, tok, split="train")
    # the authors' prompt: instruction + "\n" + input, also for an empty input
    assert triples(ev) == [("Task 0\nctx", "o1-0", "o2-0"), ("Task 1\n", "o2-1", "o1-1")]
    assert len(tr) == 18 and tr.pairs[0]["prompt"] == "Task 2\n"


def test_chatbot_arena_recipe(tmp_path, tok):
    def conv(q, a, extra=False):
        m = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        return m + m if extra else m

    rows = []
    for i in range(100):
        winner = ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4]
        rows.append(
            {
                "question_id": str(i),
                "model_a": "m1",
                "model_b": "m2",
                "winner": winner,
                "conversation_a": conv(f"q{i}", f"a{i}", extra=i == 4),
                "conversation_b": conv(f"q{i}", f"b{i}", extra=i == 4),
                "turn": 2 if i == 4 else 1,
                "language": "English",
            }
        )
    path = "recipe:chatbot_arena:" + write_jsonl(tmp_path / "c.jsonl", rows)
    all_ = load_pairs(path, tok, split="all")
    assert all_.report["filtered_by_reason"] == {"multi_turn": 1, "tie": 50}
    assert triples(all_)[:2] == [("q0", "a0", "b0"), ("q1", "b1", "a1")]
    assert len(all_) == 49
    ev = load_pairs(path, tok, split="eval")
    assert triples(ev) == [("q0", "a0", "b0"), ("q1", "b1", "a1")]  # first 5% of the 49 kept rows
    assert len(load_pairs(path, tok, split="train")) == 47


def test_skips_counted_by_reason_and_refusal(tmp_path, tok):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 7 + [
        {"prompt": "p", "chosen": "  ", "rejected": "b"},
        {"prompt": "p", "chosen": "a", "rejected": ""},
        {"prompt": "p", "chosen": "same", "rejected": "same"},
    ]
    ds = load(tmp_path, rows, tok, max_skip_fraction=0.5)
    assert len(ds) == 7
    assert ds.report["skipped_by_reason"] == {"empty_chosen": 1, "empty_rejected": 1, "identical": 1}
    with pytest.raises(DataError, match=r"30.0% of the pairs would be skipped.*max_skip_fraction"):
        load(tmp_path, rows, tok, max_skip_fraction=0.1)


def test_eval_carve_is_deterministic_and_disjoint(tmp_path, tok):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(100)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    tr = load_pairs(path, tok, PairOptions(eval_fraction=0.1, seed=3), split="train")
    ev = load_pairs(path, tok, PairOptions(eval_fraction=0.1, seed=3), split="eval")
    ev2 = load_pairs(path, tok, PairOptions(eval_fraction=0.1, seed=3), split="eval")
    assert len(tr) == 90 and len(ev) == 10
    assert triples(ev) == triples(ev2)
    assert not set(triples(tr)) & set(triples(ev))
    assert set(triples(tr)) | set(triples(ev)) == set(triples(load_pairs(path, tok, split="all")))
    assert triples(load_pairs(path, tok, PairOptions(eval_fraction=0.1, seed=4), split="eval")) != triples(ev)
    assert tr.fingerprint != ev.fingerprint


def test_fingerprint_tracks_rows_tokenizer_and_settings(tmp_path, tok):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "c"}])
    fa = load_pairs(a, tok, split="all").fingerprint
    assert fa == load_pairs(a, tok, split="all").fingerprint
    assert fa != load_pairs(b, tok, split="all").fingerprint
    assert fa != load_pairs(a, tok, PairOptions(max_length=256), split="all").fingerprint
    assert fa != load_pairs(a, tok, PairOptions(template="phi2"), split="all").fingerprint


def test_hh_prompts_on_real_file(tok):
    path = sample_paths()["data"]  # the bundled HH-RLHF harmless-base test file (2,312 rows)
    rows = [json.loads(line) for line in gzip.open(path, "rt", encoding="utf-8")]
    conv = convert_rows(((f"line {i + 1}", r) for i, r in enumerate(rows)), source=str(path))
    by_group = {p["group"]: p for p in conv.pairs}
    shared = 0
    for i, r in enumerate(rows):
        cut_c = r["chosen"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        cut_r = r["rejected"].rfind("\n\nAssistant:") + len("\n\nAssistant:")
        if r["chosen"][:cut_c] != r["rejected"][:cut_r]:
            assert i not in by_group
            continue
        shared += 1
        if i in by_group:  # absent only when skipped for an empty response
            assert by_group[i]["prompt"] == r["chosen"][:cut_c]
            assert by_group[i]["prompt"] + by_group[i]["chosen"] == r["chosen"]
            assert by_group[i]["prompt"] + by_group[i]["rejected"] == r["rejected"]
    assert shared == 2307 and len(conv.pairs) == 2303
    assert dict(__import__("collections").Counter(r for _, r in conv.skipped)) == {
        "prompt_mismatch": 5,
        "empty_chosen": 4,
    }
    ds = load_pairs(f"recipe:hh_harmless:{path}", tok, split="all")
    assert ds.report["rows_read"] == 2312 and ds.report["filtered_by_reason"]["multi_turn"] > 1000
    assert all(p["prompt"].count("\n\nHuman:") == 1 for p in ds.pairs)
    assert np.all(ds.all_lengths <= 512)
    # The authors' split rule (their get_anthropic_hh, written out here): a row is kept when each text
    # splits into two on "\n\nHuman: "; query / response are the first two parts on "\n\nAssistant: ".
    authors = []
    for r in rows:
        cs, rs = r["chosen"].split("\n\nHuman: "), r["rejected"].split("\n\nHuman: ")
        if len(cs) == 2 and len(rs) == 2:
            cs, rs = cs[1].split("\n\nAssistant: "), rs[1].split("\n\nAssistant: ")
            authors.append((f"Instruct: {cs[0].strip()}\nOutput:", " " + cs[1].strip(), " " + rs[1].strip()))
    keep = load_pairs(f"recipe:hh_harmless:{path}", tok, PairOptions(template="phi2", degenerate="keep"), split="all")
    assert len(authors) == 662 and triples(keep) == authors  # 661 before: one response quotes an Assistant turn
