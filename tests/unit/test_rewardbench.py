"""RewardBench 1 and 2 scoring on fixtures made for these tests in the public schemas.

tests/data/rewardbench_v1.jsonl and rewardbench_v2.jsonl are written in the schemas of
allenai/reward-bench (`filtered`) and allenai/reward-bench-2 (`test`); each response text ends in
"#N", the score a stand-in reward model gives it, so every expected value below is computed by
hand from those numbers, the official per-subset example counts and the official formulas.
"""

import json
import math
import pathlib

import numpy as np
import pytest

from haf_jax.data import DataError
from haf_jax.evaluation import rewardbench

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"
V1, V2 = DATA / "rewardbench_v1.jsonl", DATA / "rewardbench_v2.jsonl"


def _tag(text: str) -> float:
    return float(text.rsplit("#", 1)[1])


def _pair_scores(records):
    return np.array([[_tag(r["chosen"]), _tag(r["rejected"])] for r in records])


def _v1_scores(path=V1, **kw):
    rows = rewardbench.read_v1(str(path))
    records, index = rewardbench.pair_records(rows, 1)
    return (
        rewardbench.score_rows(rows, index, _pair_scores(records), 1)
        if not kw
        else rewardbench.score_v1(
            [r["subset"] for r in rows], [float(_tag(r["chosen"]) > _tag(r["rejected"])) for r in rows], **kw
        )
    )


# By hand: subset accuracies (a tie is wrong) and the official example counts (constants.py).
CHAT = (0.5 * 100 + 1.0 * 40) / (100 + 40)  # alpacaeval-easy 1/2, mt-bench-med 2/2
CHAT_HARD = (0.0 * 37 + 1.0 * 100) / (37 + 100)  # mt-bench-hard 0/2, llmbar-natural 1/1
SAFETY = (1.0 * 100 + 0.0 * 250) / (100 + 250)  # refusals-dangerous 2/2, xstest-should-respond 0/2
REASONING = (0.5 * 984 + 1.0 * 164) / (984 + 164)  # math-prm 1/2, hep-python 2/2
PRIOR = (0.5 + 1.0) / 2  # anthropic_helpful 1/2, shp 1/1
SCORE = (CHAT + CHAT_HARD + SAFETY + REASONING) / 4
SCORE_WITH_PRIOR = (2 * (CHAT + CHAT_HARD + SAFETY + REASONING) + 1 * PRIOR) / 9


def test_v1_sections_and_overall_equal_hand_computed_values():
    got = _v1_scores()
    assert got["subsets"]["alpacaeval-easy"] == 0.5 and got["subsets"]["mt-bench-hard"] == 0.0
    assert got["sections"] == pytest.approx(
        {"Chat": CHAT, "Chat Hard": CHAT_HARD, "Safety": SAFETY, "Reasoning": REASONING}, abs=1e-12
    )
    assert got["score"] == pytest.approx(SCORE, abs=1e-12)
    assert got["prior_sets"] == pytest.approx(PRIOR) and got["score_with_prior_sets"] == pytest.approx(SCORE_WITH_PRIOR)


def test_v1_swapped_weights_or_plain_means_do_not_give_the_official_scores():
    swapped = dict(rewardbench.EXAMPLE_COUNTS)
    swapped["alpacaeval-easy"], swapped["mt-bench-med"] = swapped["mt-bench-med"], swapped["alpacaeval-easy"]
    swapped["math-prm"] = 447  # the real row count instead of the official upweighting
    got = _v1_scores(counts=swapped)
    assert got["sections"]["Chat"] != pytest.approx(CHAT) and got["sections"]["Reasoning"] != pytest.approx(REASONING)
    assert got["score"] != pytest.approx(SCORE)
    plain = _v1_scores(counts=dict.fromkeys(rewardbench.EXAMPLE_COUNTS, 1))
    assert plain["score"] != pytest.approx(SCORE)


def test_v1_parquet_copy_reads_like_the_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in V1.read_text().splitlines()]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "filtered.parquet")
    assert _v1_scores(tmp_path / "filtered.parquet") == _v1_scores()


# By hand (RewardBench 2): best-of-4 with ties split, the Ties composite, the plain mean.
FACTUALITY = (1 + 0.5 + 0) / 3  # top alone; tied with one rejected; beaten
MATH = (0.25 + 1) / 2  # four-way tie; top alone
# Ties: prompt 0 ref gap 5-2=3, tied gap 4-3=1 spread 6-4=2; prompt 1 ref gap 2-3=-1, tied gap 5-1=4 spread 0.
_REF_ACC, _TIED_ACC = 1 / 2, 2 / 2
_PREFERRED = (float(1 > 2) + float(4 > 0)) / 2
_PREFERRED_HARD = (float(min(3, 1) > 2) + float(min(-1, 4) > 0)) / 2
_MARGIN = (math.tanh(1 / 2 - 1) + -1.0) / 2  # min(-1, 4) / 0 = -inf: tanh gives -1
TIES = 0.3 * _TIED_ACC + 0.3 * _REF_ACC + 0.2 * _PREFERRED + 0.2 * _PREFERRED_HARD + 0.01 * _MARGIN


def test_v2_best_of_four_ties_composite_and_score_equal_hand_computed_values():
    rows = rewardbench.read_v2(str(V2))
    records, index = rewardbench.pair_records(rows, 2)
    assert len(records) == 3 * 5 + 2 + (2 + 1) + 1 + (1 + 1)  # each rejected once, each further chosen once
    got = rewardbench.score_rows(rows, index, _pair_scores(records), 2)
    assert got["subsets"] == pytest.approx({"Factuality": FACTUALITY, "Math": MATH, "Ties": TIES}, abs=1e-12)
    assert got["score"] == pytest.approx((FACTUALITY + MATH + TIES) / 3, abs=1e-12)
    # Counting a tie as a full win (no split) would not give the official numbers.
    assert rewardbench.best_of_n_result([2, 2, 1, 0]) == 0.5 and rewardbench.best_of_n_result([1, 3, 0, 0]) == 0.0


@pytest.mark.parametrize(
    "line, field, version",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b", "id": 1}, "subset", 1),
        (
            {"prompt": "p", "chosen": ["a"], "rejected": "b", "subset": "Math", "id": "x", "num_correct": 1},
            "rejected",
            2,
        ),
        (
            {"prompt": "p", "chosen": ["a", "c"], "rejected": ["b"], "subset": "Math", "id": "x", "num_correct": 1},
            "num_correct",
            2,
        ),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, line, field, version):
    path = tmp_path / "bad.jsonl"
    good = V1.read_text().splitlines()[0] if version == 1 else V2.read_text().splitlines()[0]
    path.write_text(good + "\n" + json.dumps(line) + "\n")
    with pytest.raises(DataError) as e:
        (rewardbench.read_v1 if version == 1 else rewardbench.read_v2)(str(path))
    assert str(path) in str(e.value) and "line 2" in str(e.value) and repr(field) in str(e.value)
