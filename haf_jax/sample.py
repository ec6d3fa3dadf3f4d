"""Sample N candidate responses per prompt from a causal LM or a trained run's policy (LM) head.

  python -m haf_jax.sample --model=M --prompts=FILE --out=FILE [--n=4] [--top_p=0.85] \
      [--temperature_range=0.5,1.2 | --temperature=T] [--top_k=0] [--max_new_tokens=256] \
      [--seed=0] [--template=none|phi2|mistral] [--max_prompt_length=128] [--batch_size=8]

M: a run directory (its best checkpoint, or --step), a Hugging Face directory or a hub id of any
family haf_jax reads. The defaults are the paper's Best-of-N sampler: N = 4, top_p 0.85, each
candidate's temperature drawn from U(0.5, 1.2). --temperature=T fixes it (0 = greedy).

Prompt file: JSON lines, one object per prompt with a string field `prompt` (other fields are
ignored, `id` is carried over). Plain text is not accepted: prompts (HH dialogues, ...) contain
newlines. A prompt is formatted and tokenised exactly as the data layer does for training pairs
(template, BOS, the prompt keeps its end when longer than --max_prompt_length).

Output: JSON lines, one row per prompt in input order: `prompt`, `id` (when given),
`candidates` (texts, without the final EOS and the template's response prefix, i.e. what a
preference file's `chosen` field would hold), `candidate_ids` (generated ids, EOS included when
produced), `temperatures` (per candidate), `stopped` ("eos" | "length" per candidate). The last
stdout line is a JSON summary with the settings used.

Rows are bucketed by prompt length (data.batching.length_buckets), so a run compiles one decode
loop per bucket; --batch_size prompts (x N candidates) go through the model at once.
"""

from __future__ import annotations

import json

from absl import flags

from haf_jax import cli

_SAMPLING = cli.define_sampling_flags()
_MODEL = flags.DEFINE_string("model", None, "Run directory, Hugging Face directory or hub id to sample from.")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per prompt.")


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_MODEL, _SAMPLING.prompts, _OUT)
    cli.output_file(_OUT)
    from haf_jax.data import jsonl
    from haf_jax.generation.candidates import sample

    rows, summary = sample(_MODEL.value, _SAMPLING.prompts.value, **_SAMPLING.kwargs())
    jsonl.write(_OUT.value, rows)
    print(json.dumps({**summary, "out": _OUT.value}))


if __name__ == "__main__":
    main.run()
