"""Best-of-N: N candidates per prompt scored with a reward model, the best picked; the library of
`python -m haf_jax.bon`.

Scoring: every (prompt, candidate) is tokenised by the data layer exactly as a training pair's
chosen response (`data.load_pairs` with the same template, truncation "always", EOS appended,
empty or identical candidates kept), and the reward head reads the final EOS, so a candidate's
score is the `reward_chosen` that `haf_jax.score` gives a pair with that text as its chosen
response. The pick is the argmax of the scores; ties go to the lowest candidate index.
"""

from __future__ import annotations

import os

import numpy as np

from haf_jax.data import jsonl
from haf_jax.data.errors import DataError, type_name
from haf_jax.generation.candidates import text_field


def read_candidates(path: str) -> list[dict]:
    """The rows of a candidates file (`sample`'s output format), checked."""
    rows = []
    for lineno, row in jsonl.read(path):
        text_field(row, "prompt", path, lineno)
        cands = row.get("candidates")
        if cands is None:
            raise DataError("missing", source=path, where=f"line {lineno}", field="candidates")
        if not isinstance(cands, list) or not cands:
            got = type_name(cands) if cands != [] else "an empty list"
            raise DataError(
                f"expected a non-empty list of strings, got {got}",
                source=path,
                where=f"line {lineno}",
                field="candidates",
            )
        for j, c in enumerate(cands):
            if not isinstance(c, str):
                raise DataError(
                    f"expected a string, got {type_name(c)}",
                    source=path,
                    where=f"line {lineno}",
                    field=f"candidates[{j}]",
                )
        rows.append(row)
    if not rows:
        raise DataError("no rows (empty file)", source=path)
    return rows


def candidate_pairs(rows: list[dict]) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """Explicit pairs holding every candidate once, two per pair (the last one twice when a row has
    an odd count), and where each candidate went: (row, pair index, side 0 | 1) per candidate."""
    pairs, where = [], []
    for i, row in enumerate(rows):
        cands = row["candidates"]
        for j in range(0, len(cands), 2):
            k = min(j + 1, len(cands) - 1)
            where.append((i, len(pairs), 0))
            if k != j:
                where.append((i, len(pairs), 1))
            pairs.append({"prompt": row["prompt"], "chosen": cands[j], "rejected": cands[k]})
    return pairs, where


def score_candidates(
    reward_model: str,
    rows: list[dict],
    *,
    template: str = "none",
    max_length: int = 512,
    max_prompt_length: int = 128,
    batch_size: int = 8,
    step: str = "best",
    mesh=None,
):
    """(scores per row, float32 [n_i] each; data report) of every candidate under the model's reward head.

    The candidates go through the data layer as (prompt, candidate) pairs and the pass is
    evaluation.Evaluator with the reward head only: the path `score` and the loop evaluate with,
    so a candidate's score is `score`'s reward_chosen for the same text."""
    from haf_jax import data  # here, not above: a bad candidates file fails before jax is imported
    from haf_jax.evaluation.datasets import round_batch
    from haf_jax.evaluation.evaluator import Evaluator
    from haf_jax.evaluation.loading import default_mesh, load_model

    mesh = mesh or default_mesh()
    model = load_model(reward_model, mesh, which=step)
    pairs, where = candidate_pairs(rows)
    # score's settings (the prompt gets at most half of max_length); nothing may be dropped
    options = data.PairOptions(
        max_length=max_length,
        max_prompt_length=min(max_prompt_length, max_length // 2),
        template=template,
        eval_fraction=0.0,
        degenerate="keep",
        max_skip_fraction=0.0,
    )
    ds = data.load_pairs(data.Records("candidates", pairs), model.tokenizer, options, split="all")
    if len(ds) != len(pairs):
        raise RuntimeError(f"the data layer kept {len(ds)} of {len(pairs)} candidate pairs")
    evaluator = Evaluator(model.step_cfg, mesh, policy=False)
    reward = evaluator(
        model.params,
        ds,
        batch_size=round_batch(batch_size, mesh),
        desc=f"score {os.path.basename(str(reward_model).rstrip('/'))}",
    ).scores["reward"]
    scores = [np.zeros(len(r["candidates"]), np.float32) for r in rows]
    counters = [0] * len(rows)
    for i, pair, side in where:
        scores[i][counters[i]] = reward[pair, side]
        counters[i] += 1
    return scores, ds.report


def pick(scores: np.ndarray) -> int:
    """Index of the best candidate; ties go to the lowest index (np.argmax)."""
    return int(np.argmax(scores))


def best_of_n(
    reward_models: list[str],
    rows: list[dict],
    *,
    template: str = "none",
    max_length: int = 512,
    max_prompt_length: int = 128,
    batch_size: int = 8,
    step: str = "best",
    mesh=None,
):
    """(rows with scores and picks, summary) for one or two reward models."""
    if not 1 <= len(reward_models) <= 2:
        raise ValueError(f"need one or two reward models, got {len(reward_models)}")
    out = [dict(r) for r in rows]
    summary = {"prompts": len(rows), "candidates": sum(len(r["candidates"]) for r in rows), "tie_rule": "lowest index"}
    picks = []
    for m, model in enumerate(reward_models):
        suffix = "" if m == 0 else str(m + 1)
        scores, report = score_candidates(
            model,
            rows,
            template=template,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=batch_size,
            step=step,
            mesh=mesh,
        )
        picks.append([pick(s) for s in scores])
        for row, s, k in zip(out, scores, picks[-1]):
            row[f"scores{suffix}"] = [float(x) for x in s]
            row[f"pick{suffix}"] = k
            if m == 0:
                row["best"] = row["candidates"][k]
        summary.update(
            {
                f"reward_model{suffix}": model,
                f"mean_score{suffix}": float(np.mean(np.concatenate(scores))),
                f"mean_best_score{suffix}": float(np.mean([s[k] for s, k in zip(scores, picks[-1])])),
                f"truncated_pairs{suffix}": report["truncated_response"],
            }
        )
    if len(reward_models) == 2:
        agree = sum(a == b for a, b in zip(*picks))
        summary.update(
            picks_agree=agree / len(rows),
            picks_agree_count=agree,
            mean_score2_of_pick=float(np.mean([r["scores2"][r["pick"]] for r in out])),
        )
    return out, summary
