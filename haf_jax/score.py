"""Score preference pairs with a trained run or a Hugging Face reward/causal model.

  python -m haf_jax.score --model=DIR [--reference=DIR] --data=FILE --out=FILE \
      [--batch_size=N] [--max_length=N] [--beta=0.1]

Writes one JSON object per pair, in input order: reward_chosen, reward_rejected, logp_chosen,
logp_rejected (summed response log-probs under the model's LM head) and, with --reference,
ref_logp_chosen, ref_logp_rejected; `row` is the source record (0-based, counting the records a
recipe keeps) and `id` the record's id when it has one. A pair the data layer skips (empty or identical responses, ...) gets a row
{"row", "skipped": reason} in its place. The last stdout line is a JSON summary.

--model, --reference, --data and --out may be gs://... URLs. Multi-host: run the same command on
every host; each scores its slice of every batch, the rows are gathered and process 0 writes.
"""
from __future__ import annotations

import json
import sys

import jax
import numpy as np
from absl import app, flags, logging

_MODEL = flags.DEFINE_string("model", None, "Run directory, Hugging Face directory or hub id to score with.")
_REFERENCE = flags.DEFINE_string("reference", None, "Reference for implicit DPO rewards: a model (same forms), "
                                  "'initial' (a run's initial weights) or 'free' (reference-free).")
_DATA = flags.DEFINE_string("data", None, "Preference data: file path or dataset spec (see haf_jax.data).")
_OUT = flags.DEFINE_string("out", None, "Output JSON-lines file, one row per pair.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Pairs per batch.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Maximum tokens of prompt + response.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 128, "Maximum prompt tokens (the prompt keeps its end); at most max_length // 2.")
_TEMPLATE = flags.DEFINE_string("template", "none", "Prompt template: none | phi2 | mistral.")
_BETA = flags.DEFINE_float("beta", 0.1, "DPO temperature of the implicit reward beta * (logp - ref_logp).")
_STEP = flags.DEFINE_string("step", "best", "For run directories: best | last | a step number.")
_CHUNK = flags.DEFINE_integer("logprob_chunk", 128, "Positions per chunk of the log-prob computation.")


def score(model: str, data_spec: str, out_path: str, *, reference: str | None = None, batch_size: int = 8,
          max_length: int = 512, max_prompt_length: int = 128, template: str = "none", beta: float = 0.1,
          step: str = "best", chunk: int = 128) -> dict:
    """Scores every pair of `data_spec`; writes `out_path`; returns the summary dict.

    The pass is evaluation.Evaluator, the one the training loop evaluates with; the model's
    parameters only are loaded (inference.open_model), its trunk in the compute dtype. On several
    processes each scores its share of every batch; process 0 writes the gathered rows."""
    from haf_jax.core import paths
    from haf_jax.evaluation import inference

    mesh = inference.default_mesh()
    m = inference.open_model(model, mesh, which=step, beta=beta, chunk=chunk)
    ds = inference.load_data(data_spec, m, max_length=max_length, max_prompt_length=max_prompt_length,
                             template=template)
    batch_size = inference.round_batch(batch_size, mesh)
    ref_logp = None
    if reference:  # score's implicit reward needs an explicit --reference (a model, "initial" or "free")
        arrays, free, _ = inference.reference_logprobs(reference, m, [ds], mesh, batch_size=batch_size, which=step)
        ref_logp = np.zeros((len(ds), 2), np.float32) if free else arrays[0] if arrays else None
    result = inference.evaluator_for(m, mesh)(m.params, ds, batch_size=batch_size, ref_logp_Nx2=ref_logp, desc="score")
    cols = {name: result.scores[f"{name}_Nx2"] for name in ("reward", "logp", "ref_logp") if f"{name}_Nx2" in result.scores}
    rows = []  # (source row, order within the row, JSON object): input order, skipped rows included
    for i in range(len(ds)):
        row = {"row": ds.groups[i]} if ds.groups else {}
        if ds.pairs[i].get("id") is not None:
            row["id"] = ds.pairs[i]["id"]
        for name, col in cols.items():
            row[f"{name}_chosen"], row[f"{name}_rejected"] = float(col[i, 0]), float(col[i, 1])
        rows.append((ds.groups[i] if ds.groups else i, i, row))
    rows += [(g, -1, {"row": g, "skipped": reason}) for g, reason in ds.skipped]
    if jax.process_index() == 0:
        paths.write_text(out_path, "".join(json.dumps(row) + "\n" for _, _, row in sorted(rows, key=lambda r: r[:2])))
    s = result.summary
    summary = {
        "pairs": len(ds), "reward_accuracy": s.get("reward_accuracy", 0.0), "mean_margin": s.get("reward_margin", 0.0),
        **{k: s[k] for k in ("ece", "brier", "log_loss") if k in s},
        "skipped": len(ds.skipped), "skipped_by_reason": ds.report.get("skipped_by_reason", {}),
        "model": m.info.get("source"), "out": out_path,
    }
    if "dpo_accuracy" in s:
        summary.update(dpo_accuracy=s["dpo_accuracy"], mean_implicit_margin=s["implicit_margin"],
                       beta=m.step_cfg.loss.beta)
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    for flag in (_MODEL, _DATA, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    from haf_jax.core.distributed import maybe_initialize
    from haf_jax.data import DataError

    maybe_initialize()
    try:
        summary = score(_MODEL.value, _DATA.value, _OUT.value, reference=_REFERENCE.value, batch_size=_BATCH.value,
                        max_length=_MAX_LENGTH.value, max_prompt_length=_MAX_PROMPT.value, template=_TEMPLATE.value,
                        beta=_BETA.value, step=_STEP.value, chunk=_CHUNK.value)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
