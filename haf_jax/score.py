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
_REFERENCE = flags.DEFINE_string("reference", None, "Reference model (same forms) for implicit DPO rewards.")
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
    """Scores every pair of `data_spec`; writes `out_path`; returns the summary dict."""
    from haf_jax import data, params as params_lib, paths, sharding, step as step_lib
    from haf_jax.reference import pair_pass
    from haf_jax.model.heads import forward_pairs
    from haf_jax.runs import load_model

    mesh = sharding.make_mesh((1, -1, 1))
    params, model_cfg, tokenizer, info = load_model(model, mesh, which=step)
    ref_params = None
    if reference:
        ref_params, ref_cfg, _, _ = load_model(reference, mesh, which=step)
        if ref_cfg.vocab_size != model_cfg.vocab_size:
            raise ValueError(f"--reference vocab_size {ref_cfg.vocab_size} != model vocab_size {model_cfg.vocab_size}")
    # A short --max_length alone should just work: the prompt then gets at most half of it.
    max_prompt_length = min(max_prompt_length, max_length // 2)
    ds = data.load_pairs(data_spec, tokenizer, split="all", max_length=max_length,
                         max_prompt_length=max_prompt_length, template=template, eval_fraction=0.0,
                         max_skip_fraction=1.0, process_index=jax.process_index(), process_count=jax.process_count())
    print(data.format_report(ds.report), file=sys.stderr)
    # Batches are split over every device: round up to a multiple (filler pairs are masked).
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    batch_size = -(-batch_size // n_shards) * n_shards
    keys = ["tokens", "response_mask", "last_index"]
    psh = params_lib.param_shardings(model_cfg, mesh)
    bsh = step_lib.batch_shardings(mesh, keys)
    rep = sharding.replicated(mesh)
    model_fn = jax.jit(lambda p, b: forward_pairs(p, model_cfg, b, chunk=chunk), in_shardings=(psh, bsh),
                       out_shardings=rep)
    ref_fn = None
    if ref_params is not None:  # the same jitted pass that precomputes a training reference
        ref_cfg = step_lib.StepConfig(ref_cfg, step_lib.LossConfig(), logprob_chunk=chunk)
        ref_fn, _ = step_lib.jit_reference(ref_cfg, mesh, params_lib.param_shardings(ref_cfg.model, mesh))

    def score_batch(b):
        out = model_fn(params, b)
        cols = {"reward": out.reward_Bx2, "logp": out.logp_Bx2}
        if ref_fn is not None:
            cols["ref_logp"] = ref_fn(ref_params, b)
        return cols

    n = len(ds)
    cols = pair_pass(ds, score_batch, lambda b: step_lib.put_batch(b, keys, mesh),
                     batch_size=batch_size, desc="score")
    rows = []  # (source row, order within the row, JSON object): input order, skipped rows included
    for i in range(n):
        row = {"row": ds.groups[i]} if ds.groups else {}
        if ds.pairs[i].get("id") is not None:
            row["id"] = ds.pairs[i]["id"]
        for name in ("reward", "logp") + (("ref_logp",) if ref_fn is not None else ()):
            row[f"{name}_chosen"], row[f"{name}_rejected"] = float(cols[name][i, 0]), float(cols[name][i, 1])
        rows.append((ds.groups[i] if ds.groups else i, i, row))
    rows += [(g, -1, {"row": g, "skipped": reason}) for g, reason in ds.skipped]
    if jax.process_index() == 0:
        paths.write_text(out_path, "".join(json.dumps(row) + "\n" for _, _, row in sorted(rows, key=lambda r: r[:2])))
    margin = cols["reward"][:, 0] - cols["reward"][:, 1]
    summary = {
        "pairs": n, "reward_accuracy": float(np.mean(margin > 0)) if n else 0.0,
        "mean_margin": float(np.mean(margin)) if n else 0.0, "skipped": len(ds.skipped),
        "skipped_by_reason": ds.report.get("skipped_by_reason", {}),
        "model": info.get("source"), "out": out_path,
    }
    if ref_fn is not None:
        implicit = beta * ((cols["logp"][:, 0] - cols["ref_logp"][:, 0]) - (cols["logp"][:, 1] - cols["ref_logp"][:, 1]))
        summary.update(dpo_accuracy=float(np.mean(implicit > 0)) if n else 0.0,
                       mean_implicit_margin=float(np.mean(implicit)) if n else 0.0, beta=beta)
    return summary


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    for flag in (_MODEL, _DATA, _OUT):
        if not flag.value:
            raise app.UsageError(f"--{flag.name} is required")
    from haf_jax.data import DataError
    from haf_jax.distributed import maybe_initialize

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
