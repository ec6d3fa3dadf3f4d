"""Best-of-N: score N candidates per prompt with a reward model and pick the best.

  python -m haf_jax.bon --reward_model=M [--reward_model2=M2] --out=FILE \
      (--prompts=FILE --policy=P [--n=4 and the sampling flags of haf_jax.sample] | --candidates=FILE) \
      [--template=none] [--max_length=512] [--max_prompt_length=128] [--score_batch_size=8]

With --prompts, the candidates are sampled from --policy exactly as `python -m haf_jax.sample`
does (same flags, defaults: the paper's N = 4, top_p 0.85, T ~ U(0.5, 1.2)); with --candidates
they are read from a file in `sample`'s output format (JSON lines with `prompt` and a non-empty
list of strings `candidates`; other fields are carried over).

Scoring: every (prompt, candidate) is tokenised by the data layer exactly as a training pair's
chosen response (`data.load_pairs` with the same template, truncation "always", EOS appended,
empty or identical candidates kept), and the reward head reads the final EOS, so a candidate's
score is the `reward_chosen` that `haf_jax.score` gives a pair with that text as its chosen
response. The pick is the argmax of the scores; ties go to the lowest candidate index.

Output: the input rows in order, each with `scores` (one per candidate), `pick` (its index) and
`best` (its text); with --reward_model2 also `scores2` and `pick2`. The last stdout line is a JSON
summary: mean score of all candidates, mean score of the picks (the Best-of-N score) and, with two
reward models, `picks_agree` = the fraction of prompts whose two picks are the same candidate and
`mean_score2_of_pick` = the second model's mean score of the first model's picks.
`truncated_pairs` counts the scoring pairs (two candidates of a prompt each) in which a candidate
was cut to --max_length (it keeps its first tokens and the EOS, as in training).
"""

from __future__ import annotations

import json

from absl import app, flags

from haf_jax import cli

_SAMPLING = cli.define_sampling_flags()
_RM = flags.DEFINE_string("reward_model", None, "Reward model: run directory, HF directory or hub id.")
_RM2 = flags.DEFINE_string("reward_model2", None, "A second reward model: its scores, picks and agreement.")
_POLICY = flags.DEFINE_string("policy", None, "Model to sample candidates from (with --prompts).")
_CANDIDATES = flags.DEFINE_string("candidates", None, "Given candidates (haf_jax.sample's output format).")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per prompt.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Scoring: most tokens of prompt + candidate.")
_SCORE_BATCH = flags.DEFINE_integer("score_batch_size", 8, "Scoring: candidate pairs per batch.")


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_RM, _OUT)
    if bool(_CANDIDATES.value) == bool(_SAMPLING.prompts.value):
        raise app.UsageError("give either --candidates or --prompts (with --policy)")
    if _SAMPLING.prompts.value and not _POLICY.value:
        raise app.UsageError("--prompts needs --policy, the model that samples the candidates")
    cli.output_file(_OUT)
    from haf_jax.data import jsonl
    from haf_jax.generation.best_of_n import best_of_n, read_candidates
    from haf_jax.generation.candidates import sample

    sampled = None
    if _CANDIDATES.value:
        rows = read_candidates(_CANDIDATES.value)
    else:
        rows, sampled = sample(_POLICY.value, _SAMPLING.prompts.value, **_SAMPLING.kwargs())
    models = [_RM.value] + ([_RM2.value] if _RM2.value else [])
    rows, summary = best_of_n(
        models,
        rows,
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
