"""`hf:` sources from a dataset repository on local disk, laid out as on the hub, network off.

The repositories (tests/helpers/hub_repos.py, written by the `hub` fixture) have the public schemas
(column names and types as on the hub) of the paper recipes' datasets: Anthropic/hh-rlhf (data_dir
folders, parquet shards), PKU-Alignment/PKU-SafeRLHF (README `configs:` over JSON lines per source model),
tatsu-lab/alpaca_farm (named config, split "preference") and lmsys/chatbot_arena_conversations
(data/train-*.parquet, message lists). `hf:DIR...` must read them as `datasets` reads the hub and
give the same pairs, fingerprints and batches as the same records from a JSON lines file.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from helpers.hub_repos import ROWS, one_line_error as _error
from helpers.runs import train_in_process

from haf_jax.data import PairOptions, load_pairs

pytestmark = pytest.mark.usefixtures("no_network")  # tests/conftest.py: reading a local copy connects nowhere


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
    if recipe == "beavertails_safe":  # the default config reads train.jsonl of every model folder
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
    same(
        a,
        load_pairs(
            jsonl(tmp_path, ROWS[("Anthropic/hh-rlhf", "harmless-base/test-00000-of-00001.parquet")]), tok, split="all"
        ),
    )
    assert load_pairs(f"hf:{hh}:data_dir=harmless-base:test[:10]", tok, split="all").pairs == [
        p for p in a.pairs if a.groups[a.pairs.index(p)] < 10
    ]
    block = load_pairs({"hf": hh, "data_dir": "harmless-base", "split": "test"}, tok, split="all")
    assert block.pairs == a.pairs
    pku = str(hub / "PKU-Alignment/PKU-SafeRLHF")
    one = load_pairs(f"recipe:beavertails_safe:hf:{pku}:alpaca-7b:train", tok, split="all")
    assert len(one) == 8  # the named config reads one model folder only
    ex = load_pairs(f"hf:{hub / 'local/explicit'}:train", tok, split="all")
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in ex.pairs] == [
        (f"p{i}", f"c{i}", f"r{i}") for i in range(6)
    ]
    # relative paths from the working directory ("./DIR" or a bare existing directory name)
    monkeypatch.chdir(hub)
    assert load_pairs("hf:./local/explicit:train", tok, split="all").pairs == ex.pairs
    assert load_pairs("hf:local/explicit:train", tok, split="all").pairs == ex.pairs


def test_bad_local_repositories_one_line_errors(hub, tok):
    hh = hub / "Anthropic/hh-rlhf"
    assert _error(f"hf:{hub}/no/such:train", tok) == (
        f"hf:{hub}/no/such:train: local dataset directory '{hub}/no/such' not found (an hf: NAME that is a "
        "path must be a directory laid out as a hub dataset repository)"
    )
    assert _error(f"hf:{hh}:data_dir=red-team:train", tok) == (
        f"hf:{hh}:data_dir=red-team:train: no folder 'red-team' in the local dataset directory {hh}"
    )
    assert re.fullmatch(
        rf"hf:{re.escape(str(hh))}:data_dir=harmless-base:validation: cannot load local dataset "
        r"directory \(ValueError: Unknown split \"validation\". "
        r"Should be one of \['train', 'test'\].\)",
        _error(f"hf:{hh}:data_dir=harmless-base:validation", tok),
    )
    af = hub / "tatsu-lab/alpaca_farm"
    assert "BuilderConfig 'alpaca_gpt4_preference' not found" in _error(
        f"hf:{af}:alpaca_gpt4_preference:preference", tok
    )
    src = f"hf:{hub / 'local/broken'}:train"
    assert _error(src, tok) == f"{src} row 3, field 'chosen': expected a value, got null"
    src = f"hf:{hub / 'local/binary'}:train"
    assert _error(src, tok) == f"{src} row 1, field 'rejected': not valid UTF-8 (byte 0xe9 at byte offset 3)"
    src = f"hf:{hh}:data_dir=harmless-base:test"
    assert _error(f"recipe:beavertails_safe:{src}", tok).startswith(
        f"{src} row 0, field 'is_response_0_safe': missing field (row has ['chosen', 'rejected'])"
    )
    src = f"hf:{hub / 'lmsys/chatbot_arena_conversations'}:train"
    assert _error(f"recipe:alpaca_human_pref:{src}", tok).startswith(f"{src} row 0, field 'instruction': missing field")


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_from_local_hub_repository(hub, tok, one_device, tmp_path):
    """The README's hh_harmless command with the hub id replaced by a local copy, offline (in this
    process, on one device)."""
    hh = hub / "Anthropic/hh-rlhf"
    workdir = tmp_path / "run"
    train_in_process(
        workdir,
        f"--config.data.train=recipe:hh_harmless:hf:{hh}:data_dir=harmless-base:train",
        f"--config.data.eval=recipe:hh_harmless:hf:{hh}:data_dir=harmless-base:test",
        "--config.train.steps=2",
        "--config.train.batch_size=4",
        "--config.data.max_length=64",
        "--config.data.max_prompt_length=32",
        "--config.train.eval_every=2",
        "--config.train.eval_batch_size=8",
        "--config.checkpoint.every_steps=2",
    )
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["last"]["step"] == 2 and summary["last"]["pairs"] > 0
    for name, part in (("train", "harmless-base/train"), ("eval", "harmless-base/test")):
        report = json.loads((workdir / f"data_report_{name}.json").read_text())
        ref = load_pairs(
            f"recipe:hh_harmless:{jsonl(tmp_path, rows_of('Anthropic/hh-rlhf', part), name + '.jsonl')}",
            tok,
            PairOptions(max_length=64, max_prompt_length=32),
            split="all",
        )
        assert report["fingerprint"] == ref.fingerprint and report["pairs"] == len(ref)
