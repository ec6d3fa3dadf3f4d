"""Evaluate reward models on preference data: accuracy, calibration, length bias, RewardBench, OOD grid.

  python -m haf_jax.evaluate --model=M[,M2...] --data=SPEC[,SPEC...] --out=DIR \
      [--reference=initial|none|free|MODEL] [--step=best|last|N[,...]] [--batch_size=N]

M: a run directory (both its best and last checkpoints unless --step says otherwise; `initial` is
the model the run started from, untrained), an export
or any supported Hugging Face checkpoint; parameters only are loaded, the trunk in the compute
dtype. SPEC: any data spec of haf_jax.data, `run:eval` (a run's own eval split),
`rewardbench:PATH` (RewardBench 1 `filtered`, parquet or JSONL) or `rewardbench2:PATH`.
A label may precede a spec or model as LABEL=... (default: the file or directory name).

Writes to DIR:
  report.json   one key per dataset: the first model's first checkpoint's metrics at the top
                (pairs, reward_accuracy, dpo_accuracy when a reference allows it, ece, brier, log_loss,
                reward_margin, implicit_margin, reward_length_corr, ...; RewardBench adds subsets,
                sections, score) and every model and checkpoint under "models"
  report.md     the same as tables
  figures/<dataset>/<model>-<checkpoint>/{reliability,reward_histograms,reward_vs_length}.png
  ood_grid.{json,md,png}   with several models or datasets: reward accuracy, model x dataset
The last stdout line is report.json's path and a one-line summary as JSON.
"""

from __future__ import annotations

import json

from absl import flags

from haf_jax import cli

_MODEL = flags.DEFINE_string(
    "model", None, "Comma-separated run directories / exports / HF checkpoints ([LABEL=]PATH)."
)
_DATA = flags.DEFINE_string(
    "data",
    None,
    "Comma-separated data specs ([LABEL=]SPEC; rewardbench:PATH, "
    "rewardbench2:PATH, run:eval, files, hf:, tfds:, recipe:).",
)
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_REFERENCE = flags.DEFINE_string(
    "reference",
    "",
    "Implicit-reward reference: initial (a run's initial weights; "
    "the default for runs) | none | free (reference-free) | a model path.",
)
_STEPS = flags.DEFINE_string(
    "step",
    "",
    "Run directories: comma-separated best | last | N | initial (the untrained starting weights) (default best,last).",
)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 0, "Max prompt + response tokens (0: a run's own, else 512).")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 0, "Max prompt tokens (0: a run's own, else 128).")
_TEMPLATE = flags.DEFINE_string("template", "", 'Prompt template ("": a run\'s own, else none).')
_BETA = flags.DEFINE_float(
    "beta", None, "DPO temperature of the implicit reward (default: a run's loss.beta, else 0.1)."
)
_COMPUTE_DTYPE = flags.DEFINE_string(
    "compute_dtype", "", 'float32 | bfloat16 ("": a run\'s model.compute_dtype, else float32).'
)
_CHUNK = cli.define_chunk_flag()
_FIGURES = flags.DEFINE_boolean("figures", True, "Write the PNG figures.")


def _split(value: str) -> list[str]:
    """The items of a comma-separated flag value, empty ones dropped."""
    return [x for x in value.split(",") if x]


@cli.command()
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_MODEL, _DATA, _OUT)
    cli.output_dir(_OUT)
    from haf_jax.core import paths
    from haf_jax.core.logs import log
    from haf_jax.evaluation.report import evaluate

    report = evaluate(
        _split(_MODEL.value),
        _split(_DATA.value),
        _OUT.value,
        reference=_REFERENCE.value,
        steps=_split(_STEPS.value),
        batch_size=_BATCH.value,
        max_length=_MAX_LENGTH.value,
        max_prompt_length=_MAX_PROMPT.value,
        template=_TEMPLATE.value,
        beta=_BETA.value,
        compute_dtype=_COMPUTE_DTYPE.value,
        chunk=_CHUNK.value,
        figures=_FIGURES.value,
    )
    log((paths.path(_OUT.value) / "report.md").read_text())
    keys = ("pairs", "reward_accuracy", "dpo_accuracy", "ece", "score")
    print(
        json.dumps(
            {
                "report": str(paths.path(_OUT.value) / "report.json"),
                **{d: {k: e.get(k) for k in keys if k in e} for d, e in report.items()},
            }
        )
    )


if __name__ == "__main__":
    main.run()
