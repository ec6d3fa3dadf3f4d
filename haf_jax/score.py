"""Score preference pairs with a trained run or a Hugging Face reward/causal model.

  python -m haf_jax.score --model=DIR [--reference=DIR] --data=FILE --out=FILE \
      [--batch_size=N] [--max_length=N] [--beta=0.1] [--truncation=always|trl] [--degenerate=skip|keep]

Writes one JSON object per pair, in input order: reward_chosen, reward_rejected, logp_chosen,
logp_rejected (summed response log-probs under the model's LM head) and, with --reference,
ref_logp_chosen, ref_logp_rejected; `row` is the source record (0-based, counting the records a
recipe keeps) and `id` the record's id when it has one. A pair the data layer skips (empty or
identical responses, ...) gets a row {"row", "skipped": reason} in its place. The last stdout line is a JSON summary.

--model, --reference, --data and --out may be gs://... URLs. Multi-host: run the same command on
every host; each scores its slice of every batch, the rows are gathered and process 0 writes.
"""

from __future__ import annotations

import json

from absl import flags

from haf_jax import cli

_MODEL = flags.DEFINE_string("model", None, "Run directory, Hugging Face directory or hub id to score with.")
_REFERENCE = flags.DEFINE_string(
    "reference",
    None,
    "Reference for implicit DPO rewards: a model (same forms), "
    "'initial' (a run's initial weights) or 'free' (reference-free).",
)
_DATA = flags.DEFINE_string("data", None, "Preference data: file path or dataset spec (see haf_jax.data).")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per pair.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Maximum tokens of prompt + response.")
_MAX_PROMPT = flags.DEFINE_integer(
    "max_prompt_length", 128, "Maximum prompt tokens (the prompt keeps its end); at most max_length // 2."
)
_TEMPLATE = flags.DEFINE_string("template", "none", "Prompt template: none | phi2 | mistral.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO temperature of the implicit reward beta * (logp - ref_logp).")
_TRUNCATION = flags.DEFINE_string(
    "truncation", "", 'data.truncation: always | trl ("": a run\'s own, else always; docs/REPRODUCE.md).'
)
_DEGENERATE = flags.DEFINE_string(
    "degenerate", "", 'data.degenerate: skip | keep empty/identical pairs ("": a run\'s own, else skip).'
)
_STEP = cli.define_step_flag()
_CHUNK = cli.define_chunk_flag()


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_MODEL, _DATA, _OUT)
    cli.output_file(_OUT)
    import jax

    from haf_jax.core.distributed import maybe_initialize
    from haf_jax.evaluation.scoring import score

    maybe_initialize()
    summary = score(
        _MODEL.value,
        _DATA.value,
        _OUT.value,
        reference=_REFERENCE.value,
        batch_size=_BATCH.value,
        max_length=_MAX_LENGTH.value,
        max_prompt_length=_MAX_PROMPT.value,
        template=_TEMPLATE.value,
        beta=_BETA.value,
        step=_STEP.value,
        chunk=_CHUNK.value,
        truncation=_TRUNCATION.value or None,
        degenerate=_DEGENERATE.value or None,
    )
    if jax.process_index() == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main.run()
