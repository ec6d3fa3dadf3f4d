"""`hf:` sources from a dataset repository on local disk, laid out as on the hub, network off.

The repositories are written in the test with the public schemas (column names and types as on
the hub) of the paper recipes' datasets: Anthropic/hh-rlhf (data_dir folders, parquet shards),
PKU-Alignment/PKU-SafeRLHF (README `configs:` over JSON lines per source model),
tatsu-lab/alpaca_farm (named config, split "preference") and lmsys/chatbot_arena_conversations
(data/train-*.parquet, message lists). `hf:DIR...` must read them as `datasets` reads the hub and
give the same pairs, fingerprints and batches as the same records from a JSON lines file.
"""
from __future__ import annotations

import gzip
import json
import os
import pathlib
import re
import socket
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from haf_jax.data import DataError, PairOptions, load_pairs, load_tokenizer, sample_paths

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Every connection attempt is refused and recorded: reading a local repository makes none."""
    attempts = []

    def refuse(self, address, *a, **k):
        attempts.append(address)
        raise ConnectionRefusedError(f"test: no network ({address!r})")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    yield
    assert not attempts, f"network connections attempted: {attempts}"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(sample_paths()["tokenizer"])


def _sample(n):
    with gzip.open(sample_paths()["data"], "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _pku(i):
    safe0, safe1 = (True, False) if i % 3 == 0 else (False, True) if i % 3 == 1 else (True, True)
    harm = lambda s: {"Violence": not s, "Privacy Violation": False, "Cybercrime": False}  # noqa: E731
    return {"prompt": f"How do I do thing {i}?", "response_0": f"Safe answer {i}." if safe0 else f"Harm {i}.",
            "response_1": f"Safe reply {i}." if safe1 else f"Danger {i}.", "prompt_source": "BeaverTails",
            "response_0_source": "Alpaca-7B", "response_1_source": "Alpaca-7B",
            "is_response_0_safe": safe0, "is_response_1_safe": safe1,
            "response_0_harm_category": harm(safe0), "response_1_harm_category": harm(safe1),
            "response_0_severity_level": 0 if safe0 else 2, "response_1_severity_level": 0 if safe1 else 1,
            "better_response_id": i % 2, "safer_response_id": 0 if safe0 else 1,
            "response_0_sha256": f"{i:064x}", "response_1_sha256": f"{i + 1:064x}"}


def _alpaca(i):
    return {"instruction": f"Write a line about {i}.", "input": "" if i % 2 else f"context {i}",
            "output_1": f"Line one {i}", "output_2": f"Line two {i}", "preference": 1 + i % 2,
            "raw_preference": 1 + i % 2, "annotator_index": i % 4, "dataset": "helpful_base", "datasplit": "preference"}


def _conv(q, a, turns=1):
    msgs = []
    for t in range(turns):
        msgs += [{"content": f"{q} ({t})" if t else q, "role": "user"},
                 {"content": f"{a} ({t})" if t else a, "role": "assistant"}]
    return msgs


def _arena(i):
    winner = ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4]
    turns = 2 if i % 5 == 4 else 1
    flag = {"flagged": False, "probability": 0.01}
    return {"question_id": f"q{i:04d}", "model_a": "vicuna-13b", "model_b": "koala-13b", "winner": winner,
            "judge": f"arena_user_{i}", "conversation_a": _conv(f"Question {i}", f"Answer A{i}", turns),
            "conversation_b": _conv(f"Question {i}", f"Answer B{i}", turns), "turn": turns, "anony": True,
            "language": "English", "tstamp": 1682351591.1322 + i,
            "openai_moderation": {"categories": {"harassment": False, "violence": False},
                                  "category_scores": {"harassment": 0.001, "violence": 0.002}, "flagged": False},
            "toxic_chat_tag": {"roberta-large": flag, "t5-large": flag}}


HH = _sample(360)
ROWS = {   # (repository, data file inside it) -> rows
    ("Anthropic/hh-rlhf", "harmless-base/train-00000-of-00001.parquet"): HH[:160],
    ("Anthropic/hh-rlhf", "harmless-base/test-00000-of-00001.parquet"): HH[160:240],
    ("Anthropic/hh-rlhf", "helpful-base/train-00000-of-00002.parquet"): HH[240:280],
    ("Anthropic/hh-rlhf", "helpful-base/train-00001-of-00002.parquet"): HH[280:320],
    ("Anthropic/hh-rlhf", "helpful-base/test-00000-of-00001.parquet"): HH[320:360],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca-7B/train.jsonl"): [_pku(i) for i in range(12)],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca2-7B/train.jsonl"): [_pku(i) for i in range(12, 24)],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca-7B/test.jsonl"): [_pku(i) for i in range(24, 30)],
    ("tatsu-lab/alpaca_farm", "alpaca_human_preference/preference-00000-of-00001.parquet"):
        [_alpaca(i) for i in range(20)],
    ("lmsys/chatbot_arena_conversations", "data/train-00000-of-00001-cced8514c7ed782a.parquet"):
        [_arena(i) for i in range(80)],
    # plain record forms and broken data
    ("local/explicit", "data/train-00000-of-00001.parquet"):
        [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)],
    ("local/broken", "data/train-00000-of-00001.parquet"):
        [{"prompt": f"p{i}", "chosen": None if i == 3 else f"c{i}", "rejected": f"r{i}"} for i in range(5)],
    ("local/binary", "data/train-00000-of-00001.parquet"):
        [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": b"caf\xe9" if i == 1 else f"r{i}".encode()}
         for i in range(3)],
}
READMES = {
    "PKU-Alignment/PKU-SafeRLHF": """---
configs:
- config_name: default
  data_files:
  - split: train
    path: data/*/train.jsonl
  - split: test
    path: data/*/test.jsonl
- config_name: alpaca-7b
  data_files:
  - split: train
    path: data/Alpaca-7B/train.jsonl
  - split: test
    path: data/Alpaca-7B/test.jsonl
---
""",
    "tatsu-lab/alpaca_farm": """---
configs:
- config_name: alpaca_human_preference
  data_files:
  - split: preference
    path: alpaca_human_preference/preference-*.parquet
---
""",
}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A directory holding local copies of the repositories in ROWS (hub layout)."""
    root = tmp_path_factory.mktemp("hub")
    for (repo, rel), rows in ROWS.items():
        path = root / repo / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".jsonl"):
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            pq.write_table(pa.Table.from_pylist(rows), path)
    for repo, text in READMES.items():
        (root / repo / "README.md").write_text(text + f"# {repo} (local test copy)\n")
    return root


def rows_of(repo, prefix):
    return [r for (rp, rel), rows in ROWS.items() if rp == repo and rel.startswith(prefix) for r in rows]


def jsonl(tmp_path, rows, name="ref.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def same(a, b):
    assert a.pairs == b.pairs and a.skipped == b.skipped
    assert a.report["filtered_by_reason"] == b.report["filtered_by_reason"]
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.batches(8), b.batches(8), strict=True):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# (recipe, hf spec tail after the repository dir, repository, row prefix, pairs expected)
RECIPE_CASES = [
    ("hh_harmless", ":data_dir=harmless-base:test", "Anthropic/hh-rlhf", "harmless-base/test", None),
    ("hh_helpful", ":data_dir=helpful-base:train", "Anthropic/hh-rlhf", "helpful-base/train", None),
    ("beavertails_safe", ":train", "PKU-Alignment/PKU-SafeRLHF", "data/Alpaca", 16),
    ("alpaca_human_pref", ":alpaca_human_preference:preference", "tatsu-lab/alpaca_farm", "alpaca_human", 20),
    ("chatbot_arena", ":train", "lmsys/chatbot_arena_conversations", "data/", 32),
]


@pytest.mark.parametrize("recipe,tail,repo,prefix,n", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipes_read_local_hub_repositories(recipe, tail, repo, prefix, n, hub, tok, tmp_path):
    """Each paper recipe over its dataset's hub layout and public schema = over the same JSON lines."""
    spec = f"recipe:{recipe}:hf:{hub / repo}{tail}"
    rows = rows_of(repo, prefix)
    if recipe == "beavertails_safe":       # the default config reads train.jsonl of every model folder
        rows = [r for (rp, rel), rs in ROWS.items() if rp == repo and rel.endswith("/train.jsonl") for r in rs]
    ref_spec = f"recipe:{recipe}:{jsonl(tmp_path, rows)}"
    for split in ("all", "train", "eval"):
        a = load_pairs(spec, tok, PairOptions(max_length=128, max_prompt_length=64), split=split)
        b = load_pairs(ref_spec, tok, PairOptions(max_length=128, max_prompt_length=64), split=split)
        same(a, b)
        if split == "all":
            assert a.report["source"] == f"hf:{hub / repo}{tail}"
            assert n is None or len(a) == n
            assert len(a) > 0


def test_plain_forms_configs_and_slices(hub, tok, tmp_path, monkeypatch):
    hh = str(hub / "Anthropic/hh-rlhf")
    a = load_pairs(f"hf:{hh}:data_dir=harmless-base:test", tok, split="all")
    same(a, load_pairs(jsonl(tmp_path, ROWS[("Anthropic/hh-rlhf", "harmless-base/test-00000-of-00001.parquet")]),
                       tok, split="all"))
    assert load_pairs(f"hf:{hh}:data_dir=harmless-base:test[:10]", tok, split="all").pairs == [
        p for p in a.pairs if a.groups[a.pairs.index(p)] < 10]
    block = load_pairs({"hf": hh, "data_dir": "harmless-base", "split": "test"}, tok, split="all")
    assert block.pairs == a.pairs
    pku = str(hub / "PKU-Alignment/PKU-SafeRLHF")
    one = load_pairs(f"recipe:beavertails_safe:hf:{pku}:alpaca-7b:train", tok, split="all")
    assert len(one) == 8                          # the named config reads one model folder only
    ex = load_pairs(f"hf:{hub / 'local/explicit'}:train", tok, split="all")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in ex.pairs] == [
        (f"p{i}", f"c{i}", f"r{i}") for i in range(6)]
    # relative paths from the working directory ("./DIR" or a bare existing directory name)
    monkeypatch.chdir(hub)
    assert load_pairs("hf:./local/explicit:train", tok, split="all").pairs == ex.pairs
    assert load_pairs("hf:local/explicit:train", tok, split="all").pairs == ex.pairs


def _error(spec, tok, **options) -> str:
    with pytest.raises(DataError) as e:
        load_pairs(spec, tok, PairOptions(**options), split="all")
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    return msg


def test_bad_local_repositories_one_line_errors(hub, tok):
    hh = hub / "Anthropic/hh-rlhf"
    assert _error(f"hf:{hub}/no/such:train", tok) == (
        f"hf:{hub}/no/such:train: local dataset directory '{hub}/no/such' not found (an hf: NAME that is a "
        "path must be a directory laid out as a hub dataset repository)")
    assert _error(f"hf:{hh}:data_dir=red-team:train", tok) == (
        f"hf:{hh}:data_dir=red-team:train: no folder 'red-team' in the local dataset directory {hh}")
    assert re.fullmatch(rf"hf:{re.escape(str(hh))}:data_dir=harmless-base:validation: cannot load local dataset "
                        r"directory \(ValueError: Unknown split \"validation\". "
                        r"Should be one of \['train', 'test'\].\)",
                        _error(f"hf:{hh}:data_dir=harmless-base:validation", tok))
    af = hub / "tatsu-lab/alpaca_farm"
    assert "BuilderConfig 'alpaca_gpt4_preference' not found" in _error(
        f"hf:{af}:alpaca_gpt4_preference:preference", tok)
    src = f"hf:{hub / 'local/broken'}:train"
    assert _error(src, tok) == f"{src} row 3, field 'chosen': expected a value, got null"
    src = f"hf:{hub / 'local/binary'}:train"
    assert _error(src, tok) == f"{src} row 1, field 'rejected': not valid UTF-8 (byte 0xe9 at byte offset 3)"
    src = f"hf:{hh}:data_dir=harmless-base:test"
    assert _error(f"recipe:beavertails_safe:{src}", tok).startswith(
        f"{src} row 0, field 'is_response_0_safe': missing field (row has ['chosen', 'rejected'])")
    src = f"hf:{hub / 'lmsys/chatbot_arena_conversations'}:train"
    assert _error(f"recipe:alpaca_human_pref:{src}", tok).startswith(f"{src} row 0, field 'instruction': missing field")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_from_local_hub_repository(hub, tok, tmp_path):
    """The README's hh_harmless command with the hub id replaced by a local copy, offline."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", "")).strip()
    for key in [k for k in env if k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "HAF_JAX_FAULT"))]:
        env.pop(key)
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               HAF_JAX_CACHE=str(tmp_path / "cache"), TQDM_DISABLE="1")
    hh = hub / "Anthropic/hh-rlhf"
    workdir = tmp_path / "run"
    p = subprocess.run([sys.executable, "-m", "haf_jax.train", "--config=configs/gemma.py", f"--workdir={workdir}",
                        f"--config.data.train=recipe:hh_harmless:hf:{hh}:data_dir=harmless-base:train",
                        f"--config.data.eval=recipe:hh_harmless:hf:{hh}:data_dir=harmless-base:test",
                        "--config.train.steps=2", "--config.train.batch_size=4", "--config.data.max_length=64",
                        "--config.data.max_prompt_length=32", "--config.train.eval_every=2",
                        "--config.train.eval_batch_size=8", "--config.checkpoint.every_steps=2"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["last"]["step"] == 2 and summary["last"]["pairs"] > 0
    for name, part in (("train", "harmless-base/train"), ("eval", "harmless-base/test")):
        report = json.loads((workdir / f"data_report_{name}.json").read_text())
        ref = load_pairs(f"recipe:hh_harmless:{jsonl(tmp_path, rows_of('Anthropic/hh-rlhf', part), name + '.jsonl')}",
                         tok, PairOptions(max_length=64, max_prompt_length=32), split="all")
        assert report["fingerprint"] == ref.fingerprint and report["pairs"] == len(ref)
