"""Best-of-N: N candidates per prompt scored with a reward model, the best picked; the library of
`python -m haf_jax.bon`.

Scoring: `haf_jax.RewardFunction` (evaluation/reward_function.py) over the (prompt, candidate)
texts: each is tokenised by the data layer exactly as a training pair's chosen response (the
template given, the reward model's truncation rule, EOS appended, empty or identical candidates
kept), and the reward head reads the final EOS, so a candidate's score is the `reward_chosen` that
`haf_jax.score` gives a pair with that text as its chosen response. The pick is the argmax of the
scores; ties go to the lowest candidate index.

The paper's protocol (the authors' src/inference.py and src/gpt_judge.py; docs/REPRODUCE.md
"Best-of-N"): a prompt is dropped, and counted, when one of its candidates does not fit whole
(prompt + candidate + EOS > max_length tokens under any of the reward models; length_rule="drop"),
or when sampling left it short of n distinct candidates (`short_of_n`); a judge (a third reward
model) then compares the two models' picks of every remaining prompt.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

from haf_jax.data import jsonl
from haf_jax.data.errors import DataError, type_name
from haf_jax.generation.candidates import text_field

LENGTH_RULES = ("drop", "truncate")  # drop: the paper's rule (a prompt with an over-long candidate goes)
CONFIDENCE = 0.95
INTERVAL = "Wilson score interval, 95%"


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
    length_rule: str = "truncate",
):
    """(scores per row, float32 [n_i] each; over-long per row, bool [n_i] each; data report) of
    every candidate under the model's reward head.

    The scoring is `evaluation.reward_function.RewardFunction` (the data layer, then
    evaluation.Evaluator with the reward head only: the path `score` and the loop evaluate with),
    so a candidate's score is `score`'s reward_chosen for the same text. A candidate is over-long
    when it had to be cut: with length_rule "truncate" `score`'s cut (the prompt keeps at most
    min(max_prompt_length, max_length // 2) tokens, the candidate what is left); with "drop" the
    prompt may take up to max_length - 2 tokens, so only prompt + candidate + EOS > max_length cuts
    (the paper's rule)."""
    from haf_jax.evaluation.reward_function import RewardFunction  # here: a bad file fails before jax loads

    if length_rule not in LENGTH_RULES:
        raise ValueError(f"length_rule must be one of {LENGTH_RULES}, got {length_rule!r}")
    drop = length_rule == "drop"
    fn = RewardFunction(
        reward_model,
        step=step,
        batch_size=batch_size,
        max_length=max_length,
        max_prompt_length=max_length - 2 if drop else max_prompt_length,
        template=template,
        whole_prompts=drop,
        mesh=mesh,
    )
    scored = fn.score([r["prompt"] for r in rows for _ in r["candidates"]], [c for r in rows for c in r["candidates"]])
    bounds = np.cumsum([len(r["candidates"]) for r in rows])[:-1]
    return np.split(scored.rewards, bounds), np.split(scored.truncated, bounds), scored.report


def pick(scores: np.ndarray) -> int:
    """Index of the best candidate; ties go to the lowest index (np.argmax)."""
    return int(np.argmax(scores))


def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k / n (n >= 1): it stays inside [0, 1] and
    keeps a width at k = 0 or k = n, where the normal (Wald) interval collapses to a point."""
    z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(text1: str, text2: str, score1: float, score2: float, margin: float = 0.0) -> str:
    """The judge's verdict on the first model's pick against the second's: "tie" when the two are
    the same text (the authors' rule: no judge asked) or their judge scores differ by <= margin,
    else "win" or "loss". A reward model scores each text on its own, so the order in which the
    two are shown cannot change it: one pass stands for the authors' two orders."""
    if text1 == text2 or abs(score1 - score2) <= margin:
        return "tie"
    return "win" if score1 > score2 else "loss"


def judge_summary(verdicts: list[str]) -> dict:
    """Counts, fractions and Wilson intervals of the first model's wins / ties / losses; the
    decisive win rate leaves ties out (the authors' no-tie figure)."""
    n = len(verdicts)
    out = {"judged": n, "interval": INTERVAL}
    for name, key in (("wins", "win"), ("ties", "tie"), ("losses", "loss")):
        k = verdicts.count(key)
        out[name] = k
        out[f"{key}_fraction"] = k / n
        out[f"{key}_fraction_ci"] = list(wilson_interval(k, n))
    decisive = out["wins"] + out["losses"]
    if decisive:
        out["decisive_win_rate"] = out["wins"] / decisive
        out["decisive_win_rate_ci"] = list(wilson_interval(out["wins"], decisive))
    return out


def best_of_n(
    reward_models: list[str],
    rows: list[dict],
    *,
    judge: str | None = None,
    judge_margin: float = 0.0,
    length_rule: str = "drop",
    template: str = "none",
    max_length: int = 512,
    max_prompt_length: int = 128,
    batch_size: int = 8,
    step: str = "best",
    mesh=None,
):
    """(rows with scores and picks, summary) for one or two reward models, and a judge.

    A row dropped by the protocol (module docstring) keeps its input fields and gets `dropped`
    ("over_max_length" | "short_of_n") instead of scores and picks; the summary counts both. With
    `judge` (two reward models needed) every kept row also gets `judge_scores` (the judge's score of
    each candidate) and `judge_verdict` ("win" | "tie" | "loss" of the first model's pick against
    the second's), and the summary `judge` (judge_summary)."""
    if not 1 <= len(reward_models) <= 2:
        raise ValueError(f"need one or two reward models, got {len(reward_models)}")
    if judge and len(reward_models) != 2:
        raise ValueError("a judge compares two reward models' picks: give a second reward model")
    if judge_margin < 0:
        raise ValueError(f"judge_margin must be >= 0, got {judge_margin}")
    scorers = [("", m) for m in reward_models[:1]] + [("2", m) for m in reward_models[1:]]
    scorers += [("judge_", judge)] if judge else []
    scored = {}
    for key, model in scorers:
        scored[key] = score_candidates(
            model,
            rows,
            template=template,
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            batch_size=batch_size,
            step=step,
            mesh=mesh,
            length_rule=length_rule,
        )
    out = [dict(r) for r in rows]
    for i, row in enumerate(out):
        if row.get("short_of_n"):
            row["dropped"] = "short_of_n"
        elif length_rule == "drop" and any(over[i].any() for _, over, _ in scored.values()):
            row["dropped"] = "over_max_length"
    kept = [i for i, r in enumerate(out) if "dropped" not in r]
    summary = {
        "prompts": len(rows),
        "candidates": sum(len(r["candidates"]) for r in rows),
        "tie_rule": "lowest index",
        "length_rule": length_rule,
        "max_length": max_length,
        "scored_prompts": len(kept),
        "dropped_over_max_length": sum(r.get("dropped") == "over_max_length" for r in out),
        "dropped_short_of_n": sum(r.get("dropped") == "short_of_n" for r in out),
    }
    if not kept:
        raise ValueError(
            f"every prompt was dropped ({summary['dropped_over_max_length']} over --max_length={max_length}, "
            f"{summary['dropped_short_of_n']} short of n distinct candidates); raise --max_length or "
            "lower --max_new_tokens"
        )
    for key, model in scorers:  # key: the output fields' suffix ("", "2") or prefix ("judge_")
        scores, _, report = scored[key]
        for i in kept:
            out[i]["judge_scores" if key == "judge_" else f"scores{key}"] = [float(x) for x in scores[i]]
        if key == "judge_":
            continue
        picks = {i: pick(scores[i]) for i in kept}
        for i in kept:
            out[i][f"pick{key}"] = picks[i]
            if key == "":
                out[i]["best"] = out[i]["candidates"][picks[i]]
        summary.update(
            {
                f"reward_model{key}": model,
                f"mean_score{key}": float(np.mean(np.concatenate([scores[i] for i in kept]))),
                f"mean_best_score{key}": float(np.mean([scores[i][picks[i]] for i in kept])),
            }
        )
        if length_rule == "truncate":  # with "drop" nothing that is scored was cut
            summary[f"truncated_pairs{key}"] = report["truncated_response"]
    if len(reward_models) == 2:
        agree = sum(out[i]["pick"] == out[i]["pick2"] for i in kept)
        summary.update(
            picks_agree=agree / len(kept),
            picks_agree_count=agree,
            mean_score2_of_pick=float(np.mean([out[i]["scores2"][out[i]["pick"]] for i in kept])),
        )
    if judge:
        for i in kept:
            r = out[i]
            a, b = r["pick"], r["pick2"]
            r["judge_verdict"] = verdict(
                r["candidates"][a], r["candidates"][b], r["judge_scores"][a], r["judge_scores"][b], judge_margin
            )
        summary["judge"] = {
            "model": judge,
            "margin": judge_margin,
            **judge_summary([out[i]["judge_verdict"] for i in kept]),
        }
    return out, summary


def default_n(reward_model: str) -> int:
    """Candidates per prompt when none is given: the reward model's `bon.n` when it is a run
    directory (the paper configs set 4 for Phi-2, 8 for Mistral-7B), else the base default."""
    from haf_jax.config.base import base_config
    from haf_jax.evaluation.loading import saved_run_config

    config = saved_run_config(reward_model)
    return int((config or base_config()).bon.n)
