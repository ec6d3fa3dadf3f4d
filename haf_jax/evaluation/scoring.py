"""Per-pair scores of a preference file, in input order: what `python -m haf_jax.score` writes."""

from __future__ import annotations

import jax
import numpy as np

from haf_jax.data import jsonl
from haf_jax.evaluation import datasets
from haf_jax.evaluation.evaluator import Evaluator
from haf_jax.evaluation.loading import default_mesh, load_model
from haf_jax.evaluation.references import reference_logprobs


def score(
    model: str,
    data_spec: str,
    out_path: str,
    *,
    reference: str | None = None,
    batch_size: int = 8,
    max_length: int = 512,
    max_prompt_length: int = 128,
    template: str = "none",
    beta: float = 0.1,
    step: str = "best",
    chunk: int = 128,
    truncation: str | None = None,
    degenerate: str | None = None,
) -> dict:
    """Scores every pair of `data_spec`; writes `out_path`; returns the summary dict.

    truncation / degenerate: the fidelity options (data.truncation / data.degenerate); None keeps a
    run's own (a Hugging Face model: always / skip).

    The pass is evaluation.Evaluator, the one the training loop evaluates with; the model's
    parameters only are loaded (loading.load_model), its trunk in the compute dtype. On several
    processes each scores its share of every batch; process 0 writes the gathered rows.

    Rows (one JSON object per source record, in input order): reward_chosen / reward_rejected,
    logp_chosen / logp_rejected and, with `reference`, ref_logp_chosen / ref_logp_rejected; `row`
    (the source record) and `id` when the record has one; a skipped record is {"row", "skipped"}.
    """
    mesh = default_mesh()
    m = load_model(model, mesh, which=step, beta=beta, chunk=chunk)
    ds = datasets.load_data(
        data_spec,
        m,
        max_length=max_length,
        max_prompt_length=max_prompt_length,
        template=template,
        truncation=truncation,
        degenerate=degenerate,
    )
    batch_size = datasets.round_batch(batch_size, mesh)
    ref_logp = None
    if reference:  # score's implicit reward needs an explicit --reference (a model, "initial" or "free")
        arrays, free, _ = reference_logprobs(reference, m, [ds], mesh, batch_size=batch_size, which=step)
        ref_logp = np.zeros((len(ds), 2), np.float32) if free else arrays[0] if arrays else None
    result = Evaluator(m.step_cfg, mesh)(m.params, ds, batch_size=batch_size, ref_logp_Nx2=ref_logp, desc="score")
    cols = {name: result.scores[name] for name in ("reward", "logp", "ref_logp") if name in result.scores}
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
        jsonl.write(out_path, [row for _, _, row in sorted(rows, key=lambda r: r[:2])])
    s = result.summary
    summary = {
        "pairs": len(ds),
        "reward_accuracy": s.get("reward_accuracy", 0.0),
        "mean_margin": s.get("reward_margin", 0.0),
        **{k: s[k] for k in ("ece", "brier", "log_loss") if k in s},
        "skipped": len(ds.skipped),
        "skipped_by_reason": ds.report.get("skipped_by_reason", {}),
        "model": m.source,
        "out": out_path,
    }
    if "dpo_accuracy" in s:
        summary.update(
            dpo_accuracy=s["dpo_accuracy"], mean_implicit_margin=s["implicit_margin"], beta=m.step_cfg.loss.beta
        )
    return summary
