"""Bundled offline sample: Anthropic HH-RLHF harmless-base test split + a small BPE tokenizer."""

import pathlib

_HERE = pathlib.Path(__file__).resolve().parent


def sample_paths() -> dict:
    """{"data": path of the bundled .jsonl.gz, "tokenizer": dir of the bundled HF tokenizer,
    "license": path of the data licence}."""
    return {
        "data": _HERE / "hh_harmless_base_test.jsonl.gz",
        "tokenizer": _HERE / "tokenizer",
        "license": _HERE / "LICENSE.txt",
    }
