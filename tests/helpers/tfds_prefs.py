"""Small TFDS builders for the tests (tests/unit/test_data_tfds.py): one per record form, plus broken ones.

A real `tfds.core.GeneratorBasedBuilder` in its own importable module, as a user's dataset would
be. `prepare(name, data_dir)` writes it in the array_record file format (no TensorFlow needed);
after that `tfds:NAME:data_dir=DIR:SPLIT` reads it in any process, without this module (TFDS
reads prepared datasets from their files). `ROWS[name][split]` are the rows as Python values
(text as str), so a test can write the same records to JSON lines and compare.
"""

from __future__ import annotations

import gzip

import numpy as np
import tensorflow_datasets as tfds

from haf_jax.data import sample_paths

TEXT = tfds.features.Text
MESSAGES = tfds.features.Sequence({"role": TEXT(), "content": TEXT()})


def _sample_rows(n: int) -> list[dict]:
    import json

    with gzip.open(sample_paths()["data"], "rt", encoding="utf-8") as f:
        return [json.loads(next(f)) for _ in range(n)]


def _msg(role, content):
    return {"role": role, "content": content}


_HH = _sample_rows(64)

ROWS: dict[str, dict[str, list[dict]]] = {
    # explicit {prompt, chosen, rejected} (+ a numeric id)
    "explicit_prefs": {
        "train": [
            {
                "prompt": f"Question {i}: name a colour. ünïcödé ✓",
                "chosen": f" Blue {i}.",
                "rejected": f" I won't {i}.",
                "id": i,
            }
            for i in range(12)
        ],
        "test": [
            {"prompt": f"Test {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}.", "id": 100 + i} for i in range(4)
        ],
    },
    # HH-style full dialogues: the first 64 rows of the bundled HH-RLHF sample (48 train / 16 test)
    "hh_prefs": {"train": _HH[:48], "test": _HH[48:]},
    # message lists with a separate prompt
    "messages_prefs": {
        "train": [
            {
                "prompt": [_msg("user", f"Hi {i}")],
                "chosen": [_msg("assistant", f"Hello {i}!")],
                "rejected": [_msg("assistant", f"Go away {i}.")],
            }
            for i in range(8)
        ],
    },
    # message lists holding whole conversations (shared prefix = prompt)
    "conversation_prefs": {
        "train": [
            {
                "chosen": [_msg("user", f"Q{i}"), _msg("assistant", f"Good {i}")],
                "rejected": [_msg("user", f"Q{i}"), _msg("assistant", f"Bad {i}")],
            }
            for i in range(6)
        ],
    },
    # labelled pairs under the dataset's own feature names (read with fields=LABELLED_FIELDS)
    "labelled_prefs": {
        "train": [{"question": f"x{i}?", "answer_a": f"A{i}", "answer_b": f"B{i}", "winner": i % 2} for i in range(8)],
    },
    # rankings: a Sequence of text and a Sequence of float scores
    "ranking_prefs": {
        "train": [
            {"prompt": f"r{i}", "responses": [f"a{i}", f"b{i}", f"c{i}"], "scores": [1.0, 3.0, 2.0]} for i in range(4)
        ],
    },
}
LABELLED_FIELDS = {"prompt": "question", "response_0": "answer_a", "response_1": "answer_b", "label": "winner"}

FEATURES = {
    "explicit_prefs": {"prompt": TEXT(), "chosen": TEXT(), "rejected": TEXT(), "id": np.int64},
    "hh_prefs": {"chosen": TEXT(), "rejected": TEXT()},
    "messages_prefs": {"prompt": MESSAGES, "chosen": MESSAGES, "rejected": MESSAGES},
    "conversation_prefs": {"chosen": MESSAGES, "rejected": MESSAGES},
    "labelled_prefs": {"question": TEXT(), "answer_a": TEXT(), "answer_b": TEXT(), "winner": np.int64},
    "ranking_prefs": {
        "prompt": TEXT(),
        "responses": tfds.features.Sequence(TEXT()),
        "scores": tfds.features.Sequence(np.float32),
    },
    # broken: no 'rejected' feature (it is called 'answer'); row 2 of 'chosen' is Latin-1, not
    # UTF-8; 'blob' is binary in every row (nothing reads it, so it must not matter)
    "broken_prefs": {
        "prompt": TEXT(),
        "chosen": TEXT(),
        "answer": TEXT(),
        "blob": tfds.features.Tensor(shape=(), dtype=np.object_),
    },
    # broken: the content of the assistant message of row 1 is not UTF-8
    "broken_messages_prefs": {"chosen": MESSAGES, "rejected": MESSAGES},
}
ROWS["broken_prefs"] = {
    "train": [
        {
            "prompt": f"p{i}",
            "chosen": "café".encode("latin-1") if i == 2 else f"c{i}",
            "answer": f"a{i}",
            "blob": b"\x89PNG\xff\x00",
        }
        for i in range(4)
    ]
}
ROWS["broken_messages_prefs"] = {
    "train": [
        {
            "chosen": [_msg("user", f"Q{i}"), _msg("assistant", b"ol\xe9" if i == 1 else f"Good {i}")],
            "rejected": [_msg("user", f"Q{i}"), _msg("assistant", f"Bad {i}")],
        }
        for i in range(3)
    ]
}


class _Prefs(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Rows and features from ROWS / FEATURES under the builder's name; source order kept."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(FEATURES[self.name]), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(split) for split in ROWS[self.name]}

    def _generate_examples(self, split):
        yield from enumerate(ROWS[self.name][split])


BUILDERS = {
    name: type("".join(w.title() for w in name.split("_")), (_Prefs,), {"__module__": __name__}) for name in FEATURES
}


def prepare(name: str, data_dir) -> None:
    """Build dataset `name` under `data_dir` in the array_record format (idempotent)."""
    tfds.disable_progress_bar()
    BUILDERS[name](data_dir=str(data_dir), file_format="array_record").download_and_prepare()
