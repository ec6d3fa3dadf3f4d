"""Local copies of the paper recipes' hub datasets in their public schemas (column names and types as
on the hub): Anthropic/hh-rlhf (data_dir folders, parquet shards), PKU-Alignment/PKU-SafeRLHF (README
`configs:` over JSON lines per source model), tatsu-lab/alpaca_farm (named config, split "preference")
and lmsys/chatbot_arena_conversations (data/train-*.parquet, message lists). ROWS maps (repository,
data file inside it) to its records; `write_hub(root)` lays them out as on the hub (the `hub` fixture
of tests/conftest.py). Used by tests/unit/test_data_hub_local.py, test_paper_configs.py, test_data_tfds.py.
"""

from __future__ import annotations

import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from haf_jax.data import DataError, PairOptions, load_pairs, sample_paths


def _sample(n):
    with gzip.open(sample_paths()["data"], "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _pku(i):
    safe0, safe1 = (True, False) if i % 3 == 0 else (False, True) if i % 3 == 1 else (True, True)
    harm = lambda s: {"Violence": not s, "Privacy Violation": False, "Cybercrime": False}
    return {
        "prompt": f"How do I do thing {i}?",
        "response_0": f"Safe answer {i}." if safe0 else f"Harm {i}.",
        "response_1": f"Safe reply {i}." if safe1 else f"Danger {i}.",
        "prompt_source": "BeaverTails",
        "response_0_source": "Alpaca-7B",
        "response_1_source": "Alpaca-7B",
        "is_response_0_safe": safe0,
        "is_response_1_safe": safe1,
        "response_0_harm_category": harm(safe0),
        "response_1_harm_category": harm(safe1),
        "response_0_severity_level": 0 if safe0 else 2,
        "response_1_severity_level": 0 if safe1 else 1,
        "better_response_id": i % 2,
        "safer_response_id": 0 if safe0 else 1,
        "response_0_sha256": f"{i:064x}",
        "response_1_sha256": f"{i + 1:064x}",
    }


def _alpaca(i):
    return {
        "instruction": f"Write a line about {i}.",
        "input": "" if i % 2 else f"context {i}",
        "output_1": f"Line one {i}",
        "output_2": f"Line two {i}",
        "preference": 1 + i % 2,
        "raw_preference": 1 + i % 2,
        "annotator_index": i % 4,
        "dataset": "helpful_base",
        "datasplit": "preference",
    }


def _conv(q, a, turns=1):
    msgs = []
    for t in range(turns):
        msgs += [
            {"content": f"{q} ({t})" if t else q, "role": "user"},
            {"content": f"{a} ({t})" if t else a, "role": "assistant"},
        ]
    return msgs


def _arena(i):
    winner = ["model_a", "model_b", "tie", "tie (bothbad)"][i % 4]
    turns = 2 if i % 5 == 4 else 1
    flag = {"flagged": False, "probability": 0.01}
    return {
        "question_id": f"q{i:04d}",
        "model_a": "vicuna-13b",
        "model_b": "koala-13b",
        "winner": winner,
        "judge": f"arena_user_{i}",
        "conversation_a": _conv(f"Question {i}", f"Answer A{i}", turns),
        "conversation_b": _conv(f"Question {i}", f"Answer B{i}", turns),
        "turn": turns,
        "anony": True,
        "language": "English",
        "tstamp": 1682351591.1322 + i,
        "openai_moderation": {
            "categories": {"harassment": False, "violence": False},
            "category_scores": {"harassment": 0.001, "violence": 0.002},
            "flagged": False,
        },
        "toxic_chat_tag": {"roberta-large": flag, "t5-large": flag},
    }


HH = _sample(360)
ROWS = {  # (repository, data file inside it) -> rows
    ("Anthropic/hh-rlhf", "harmless-base/train-00000-of-00001.parquet"): HH[:160],
    ("Anthropic/hh-rlhf", "harmless-base/test-00000-of-00001.parquet"): HH[160:240],
    ("Anthropic/hh-rlhf", "helpful-base/train-00000-of-00002.parquet"): HH[240:280],
    ("Anthropic/hh-rlhf", "helpful-base/train-00001-of-00002.parquet"): HH[280:320],
    ("Anthropic/hh-rlhf", "helpful-base/test-00000-of-00001.parquet"): HH[320:360],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca-7B/train.jsonl"): [_pku(i) for i in range(12)],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca2-7B/train.jsonl"): [_pku(i) for i in range(12, 24)],
    ("PKU-Alignment/PKU-SafeRLHF", "data/Alpaca-7B/test.jsonl"): [_pku(i) for i in range(24, 30)],
    ("tatsu-lab/alpaca_farm", "alpaca_human_preference/preference-00000-of-00001.parquet"): [
        _alpaca(i) for i in range(20)
    ],
    ("lmsys/chatbot_arena_conversations", "data/train-00000-of-00001-cced8514c7ed782a.parquet"): [
        _arena(i) for i in range(80)
    ],
    # plain record forms and broken data
    ("local/explicit", "data/train-00000-of-00001.parquet"): [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)
    ],
    ("local/broken", "data/train-00000-of-00001.parquet"): [
        {"prompt": f"p{i}", "chosen": None if i == 3 else f"c{i}", "rejected": f"r{i}"} for i in range(5)
    ],
    ("local/binary", "data/train-00000-of-00001.parquet"): [
        {"prompt": f"p{i}", "chosen": f"c{i}", "rejected": b"caf\xe9" if i == 1 else f"r{i}".encode()} for i in range(3)
    ],
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


def write_hub(root):
    """Writes the repositories of ROWS (and their READMEs) under `root`, in hub layout; returns root."""
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


def one_line_error(spec, tok, **kw) -> str:
    """The DataError message of loading `spec`, asserted to be one line."""
    with pytest.raises(DataError) as e:
        load_pairs(spec, tok, PairOptions(**kw), split="all")
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg
