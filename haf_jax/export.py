"""Export a run as Hugging Face checkpoints.

  python -m haf_jax.export --workdir=RUN --out=DIR [--step=best|last|N]

Writes DIR/reward_model (a *ForSequenceClassification checkpoint, num_labels=1, safetensors,
tokenizer with a pad token distinct from EOS) and DIR/policy (a *ForCausalLM checkpoint, the
trained LM head), both loadable with transformers' Auto* classes. A LoRA run's adapters are merged
into both; DIR/adapter also holds them in the PEFT layout, to load onto the base model's
*ForSequenceClassification with `peft.PeftModel.from_pretrained`.

RUN and DIR may be gs://... URLs. Multi-host: run the same command on every host (as training);
the parameters are gathered across processes and process 0 writes. The last stdout line is JSON:
the step exported and the directories written.
"""

from __future__ import annotations

import json

from absl import app, flags

from haf_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by haf_jax.train.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = cli.define_step_flag("best | last | a step number.")


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required")
    cli.output_dir(_OUT)
    import jax

    from haf_jax.core.distributed import maybe_initialize
    from haf_jax.evaluation.export import export

    maybe_initialize()
    result = export(_WORKDIR.value, _OUT.value, which=_STEP.value)
    if jax.process_index() == 0:
        print(json.dumps(result))


if __name__ == "__main__":
    main.run()
