"""Best-of-N: score N candidates per prompt with a reward model and pick the best.

  python -m haf_jax.bon --reward_model=M [--reward_model2=M2 [--judge=J]] --out=FILE \
      (--prompts=FILE --policy=P [--n=N and the sampling flags of haf_jax.sample] | --candidates=FILE) \
      [--template=none] [--max_length=512] [--length_rule=drop|truncate] [--score_batch_size=8]

With --prompts, the candidates are sampled from --policy as `python -m haf_jax.sample` does (same
flags, defaults: top_p 0.85, T ~ U(0.5, 1.2)) with the paper's distinct rule on (--distinct: draw
until N candidates with distinct texts, at most 2N draws; a prompt left short of N is dropped and
counted). N: --n, else the reward model's `bon.n` when it is a run directory (configs/paper: 4
for Phi-2, 8 for Mistral-7B), else 4. With --candidates they are read from a file in `sample`'s
output format (JSON lines with `prompt` and a non-empty list of strings `candidates`; other
fields are carried over).

Scoring: every (prompt, candidate) is tokenised by the data layer exactly as a training pair's
chosen response (`data.load_pairs` with the same template, EOS appended, empty or identical
candidates kept), and the reward head reads the final EOS, so a candidate's score is the
`reward_chosen` that `haf_jax.score` gives a pair with that text as its chosen response. The pick
is the argmax of the scores; ties go to the lowest candidate index.

Length rule: --length_rule=drop (default, the paper's): a prompt is kept whole and dropped, and
counted, when prompt + one of its candidates + EOS exceeds --max_length tokens under any of the
reward models; --length_rule=truncate: `score`'s cut (the prompt keeps at most
min(--max_prompt_length, --max_length // 2) tokens, a candidate what is left, with its EOS), every
prompt kept and the cut pairs counted in `truncated_pairs`.

--judge=J (needs --reward_model2): a third reward model (a "gold" RM standing in for the paper's
GPT judge) scores every candidate; per prompt, the first model's pick against the second's is a
win, a tie (the same text, or judge scores within --judge_margin) or a loss.

Output: the input rows in order, each with `scores` (one per candidate), `pick` (its index) and
`best` (its text); with --reward_model2 also `scores2` and `pick2`; with --judge also
`judge_scores` and `judge_verdict`. A dropped row has `dropped` ("over_max_length" |
"short_of_n") instead. The last stdout line is a JSON summary: mean score of all candidates, mean
score of the picks (the Best-of-N score), the dropped counts and, with two reward models,
`picks_agree` (the fraction of prompts whose two picks are the same candidate) and
`mean_score2_of_pick`; with a judge, `judge`: wins / ties / losses, their fractions with 95% Wilson
score intervals, and the decisive win rate (ties left out).
"""

from __future__ import annotations

import json

from absl import app, flags

from haf_jax import cli

_SAMPLING = cli.define_sampling_flags(n_default=None, distinct_default=True)
_RM = flags.DEFINE_string("reward_model", None, "Reward model: run directory, HF directory or hub id.")
_RM2 = flags.DEFINE_string("reward_model2", None, "A second reward model: its scores, picks and agreement.")
_JUDGE = flags.DEFINE_string("judge", None, "A third reward model that judges the two models' picks.")
_JUDGE_MARGIN = flags.DEFINE_float("judge_margin", 0.0, "Judge score differences up to this are ties.")
_POLICY = flags.DEFINE_string("policy", None, "Model to sample candidates from (with --prompts).")
_CANDIDATES = flags.DEFINE_string("candidates", None, "Given candidates (haf_jax.sample's output format).")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per prompt.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Scoring: most tokens of prompt + candidate.")
_LENGTH_RULE = flags.DEFINE_enum(
    "length_rule", "drop", ["drop", "truncate"], "Over-long prompt + candidate: drop the prompt | cut the pair."
)
_SCORE_BATCH = flags.DEFINE_integer("score_batch_size", 8, "Scoring: candidate pairs per batch.")


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_RM, _OUT)
    if bool(_CANDIDATES.value) == bool(_SAMPLING.prompts.value):
        raise app.UsageError("give either --candidates or --prompts (with --policy)")
    if _SAMPLING.prompts.value and not _POLICY.value:
        raise app.UsageError("--prompts needs --policy, the model that samples the candidates")
    if _JUDGE.value and not _RM2.value:
        raise app.UsageError("--judge compares two reward models' picks: give --reward_model2 too")
    if _SAMPLING.n.value is not None and _SAMPLING.n.value < 1:
        raise app.UsageError(f"--n must be >= 1, got {_SAMPLING.n.value}")
    cli.output_file(_OUT)
    from haf_jax.data import jsonl
    from haf_jax.generation.best_of_n import best_of_n, default_n, read_candidates
    from haf_jax.generation.candidates import sample

    sampled = None
    if _CANDIDATES.value:
        rows = read_candidates(_CANDIDATES.value)
    else:
        n = _SAMPLING.n.value or default_n(_RM.value)
        rows, sampled = sample(_POLICY.value, _SAMPLING.prompts.value, **{**_SAMPLING.kwargs(), "n": n})
    models = [_RM.value] + ([_RM2.value] if _RM2.value else [])
    rows, summary = best_of_n(
        models,
        rows,
        judge=_JUDGE.value,
        judge_margin=_JUDGE_MARGIN.value,
        length_rule=_LENGTH_RULE.value,
        template=_SAMPLING.template.value,
        max_length=_MAX_LENGTH.value,
        max_prompt_length=_SAMPLING.max_prompt_length.value,
        batch_size=_SCORE_BATCH.value,
        step=_SAMPLING.step.value,
    )
    jsonl.write(_OUT.value, rows)
    print(json.dumps({**summary, **({"sampling": sampled} if sampled else {}), "out": _OUT.value}))


if __name__ == "__main__":
    main.run()
