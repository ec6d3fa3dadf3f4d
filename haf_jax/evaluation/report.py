"""Reward models evaluated on preference data, written as a report: what `python -m haf_jax.evaluate`
does. Accuracy, calibration, length bias per model, checkpoint and dataset, RewardBench scores,
figures, and the out-of-distribution grid (model x dataset).

Written to the output directory: report.json (one key per dataset: the first model's first
checkpoint's metrics at the top and every model and checkpoint under "models"), report.md (the
same as tables), figures/<dataset>/<model>-<checkpoint>/*.png and, with several models or
datasets, ood_grid.{json,md} and ood_grid_<metric>.png.
"""

from __future__ import annotations

import json
import pathlib
import re

import numpy as np

from haf_jax import data
from haf_jax.core import losses, paths
from haf_jax.evaluation import plots, rewardbench
from haf_jax.evaluation.datasets import load_data, round_batch
from haf_jax.evaluation.evaluator import Evaluator
from haf_jax.evaluation.loading import default_mesh, is_run_dir, load_model, parse_step
from haf_jax.evaluation.references import reference_logprobs

TABLE_KEYS = (
    "pairs",
    "reward_accuracy",
    "dpo_accuracy",
    "ece",
    "brier",
    "log_loss",
    "reward_margin",
    "implicit_margin",
    "reward_length_corr",
)
RB_PREFIXES = {"rewardbench": 1, "rewardbench2": 2}


def _label(spec: str) -> tuple[str, str]:
    """(label, spec) of '[LABEL=]SPEC'; the default label is the file / directory / dataset name."""
    m = re.fullmatch(r"([A-Za-z0-9_.-]+)=(.+)", spec)
    if m and not spec.startswith(("hf:", "tfds:", "recipe:")):
        return m.group(1), m.group(2)
    kind, _, rest = spec.partition(":")
    if kind in RB_PREFIXES:
        return kind, spec
    if spec == "run:eval":
        return "run_eval", spec
    if kind == "recipe":
        return rest.split(":")[0], spec
    if kind in ("hf", "tfds"):
        parts = rest.split(":")
        return f"{pathlib.Path(parts[0]).name}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', parts[-1])}", spec
    name = pathlib.Path(spec.rstrip("/")).name
    for suffix in (".gz", ".jsonl", ".json", ".parquet", ".csv"):
        name = name[: -len(suffix)] if name.endswith(suffix) else name
    return name or spec, spec


def _labelled(items: list[str]) -> list[tuple[str, str]]:
    out, seen = [], {}
    for label, spec in map(_label, items):
        seen[label] = seen.get(label, 0) + 1
        out.append((label if seen[label] == 1 else f"{label}_{seen[label]}", spec))
    return out


def _checkpoints(path: str, steps: list[str]) -> list[str]:
    if not is_run_dir(path):
        return ["final"]
    return steps or ["best", "last"]


def evaluate(
    models: list[str],
    data_specs: list[str],
    out_dir: str,
    *,
    reference: str = "",
    steps: list[str] | None = None,
    batch_size: int = 8,
    max_length: int = 0,
    max_prompt_length: int = 0,
    template: str = "",
    beta: float | None = None,
    compute_dtype: str = "",
    chunk: int = 128,
    figures: bool = True,
) -> dict:
    """Evaluates every model (and checkpoint) on every dataset; writes the report; returns report.json's dict."""
    for step in steps or []:  # a bad one fails before any model is loaded
        parse_step(step)
    out = paths.path(out_dir)  # local or remote (gs://...)
    out.mkdir(parents=True, exist_ok=True)
    mesh = default_mesh()
    batch_size = round_batch(batch_size, mesh)
    model_items, data_items = _labelled(models), _labelled(data_specs)
    results: dict[str, dict[str, dict[str, dict]]] = {d: {} for d, _ in data_items}  # dataset -> model -> ckpt
    rb_rows: dict[str, tuple[int, list, list]] = {}  # dataset -> (version, rows, pair index)
    for d_label, spec in data_items:  # RewardBench files become explicit pairs once, for every model
        kind, _, path = spec.partition(":")
        if kind in RB_PREFIXES:
            version = RB_PREFIXES[kind]
            rows = rewardbench.read_v1(path) if version == 1 else rewardbench.read_v2(path)
            records, index = rewardbench.pair_records(rows, version)
            rb_rows[d_label] = (version, rows, index)
            data_items = [(lab, data.Records(lab, records) if lab == d_label else s) for lab, s in data_items]
    for m_label, m_path in model_items:
        ckpts = _checkpoints(m_path, list(steps or []))
        datasets, refs, evaluator, done = {}, {}, None, {}
        for ckpt in ckpts:
            model = load_model(
                m_path,
                mesh,
                which=ckpt if ckpt != "final" else "best",
                beta=beta,
                chunk=chunk,
                compute_dtype=compute_dtype or None,
            )
            step = model.step
            if evaluator is None:
                evaluator = Evaluator(model.step_cfg, mesh)
                for d_label, spec in data_items:
                    datasets[d_label] = load_data(
                        spec,
                        model,
                        max_length=max_length or None,
                        max_prompt_length=max_prompt_length or None,
                        template=template or None,
                        degenerate="keep" if d_label in rb_rows else None,
                    )
                arrays, free, ref_what = reference_logprobs(
                    reference, model, list(datasets.values()), mesh, batch_size=batch_size
                )
                refs = {d: (arrays[i] if arrays else None) for i, d in enumerate(datasets)}
            for d_label, _ in data_items:
                if (step, d_label) in done:  # best and last are the same step
                    results[d_label].setdefault(m_label, {})[ckpt] = {**done[(step, d_label)], "checkpoint": ckpt}
                    continue
                ds = datasets[d_label]
                result = evaluator(
                    model.params,
                    ds,
                    batch_size=batch_size,
                    ref_logp_Nx2=refs[d_label],
                    reference_free=free,
                    desc=f"{m_label}/{ckpt} on {d_label}",
                )
                entry = {
                    **result.summary,
                    "ece_bins": 15,
                    "model": m_path,
                    "checkpoint": ckpt,
                    "reference": ref_what,
                    "beta": model.step_cfg.loss.beta,
                    "compute_dtype": str(np.dtype(model.step_cfg.compute_dtype)),
                    "skipped": len(ds.skipped),
                }
                if step is not None:
                    entry["step"] = step
                if d_label in rb_rows:
                    entry.update(_rewardbench_entry(rb_rows[d_label], ds, result, model))
                if figures:
                    fig_dir = out / "figures" / d_label / f"{m_label}-{ckpt}"
                    fig_dir.mkdir(parents=True, exist_ok=True)
                    title = f"{m_label} ({ckpt}) on {d_label}"
                    for name, fig in plots.eval_figures(result.scores, title=title).items():
                        plots.save(fig, fig_dir / f"{name}.png")
                    entry["figures"] = str(fig_dir)
                done[(step, d_label)] = entry
                results[d_label].setdefault(m_label, {})[ckpt] = entry
            model = None  # free the parameters before the next checkpoint
    report = {}
    for d_label, by_model in results.items():
        first = next(iter(next(iter(by_model.values())).values()))
        report[d_label] = {**first, "models": by_model}
    report = _finite(report)  # strict JSON: an undefined value (NaN correlation of a constant reward) is null
    paths.write_text(out / "report.json", json.dumps(report, indent=1, default=_json_default, allow_nan=False))
    paths.write_text(out / "report.md", markdown_report(report))
    if len(model_items) > 1 or len(data_items) > 1:
        write_ood_grid(report, out, figures=figures)
    return report


def _finite(tree):
    if isinstance(tree, dict):
        return {k: _finite(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_finite(v) for v in tree]
    if isinstance(tree, (float, np.floating)) and not np.isfinite(tree):
        return None
    return tree


def _json_default(v):
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _rewardbench_entry(rb, ds, result, model) -> dict:
    """subsets / sections / score of the reward head, and of the implicit reward when there is one."""
    version, rows, index = rb
    if len(ds) != len(index):  # degenerate pairs are kept, so every pair must be there
        raise ValueError(
            f"RewardBench: {len(index) - len(ds)} of {len(index)} pairs were not scored "
            f"({ds.report.get('skipped_by_reason')})"
        )
    order = np.asarray(ds.groups if ds.groups else range(len(ds)))  # dataset pair -> written record
    heads = {}
    if "reward" in result.scores:
        heads["reward"] = result.scores["reward"]
    implicit = losses.policy_reward(result.scores, model.step_cfg.loss.beta, policy_kind=model.step_cfg.loss.policy)
    if implicit is not None:
        heads["dpo"] = np.asarray(implicit)
    out = {"rows": len(rows)}
    for head, pair_Nx2 in heads.items():
        by_record = np.empty_like(pair_Nx2)
        by_record[order] = pair_Nx2
        scored = rewardbench.score_rows(rows, index, by_record, version)
        if head == "reward":
            out.update(scored)
        else:
            out["dpo"] = scored
    return out


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.4f}"
    return "" if v is None else str(v)


def markdown_report(report: dict) -> str:
    lines = [
        "# Evaluation report",
        "",
        "Accuracy counts a pair as right only when the chosen response scores strictly higher. "
        "Calibration is of P(chosen > rejected) = sigmoid(r_chosen - r_rejected): ECE over 15 "
        "equal-width bins of the top-label confidence max(p, 1 - p), Brier score and log loss. "
        "dpo_accuracy uses the implicit reward beta * (log pi - log pi_ref). reward_length_corr is "
        "the Pearson correlation of reward with response length in tokens.",
        "",
    ]
    for d_label, entry in report.items():
        lines += [
            f"## {d_label}",
            "",
            "| model | checkpoint | step | " + " | ".join(TABLE_KEYS) + " |",
            "|---|---|---|" + "---|" * len(TABLE_KEYS),
        ]
        for m_label, by_ckpt in entry["models"].items():
            for ckpt, e in by_ckpt.items():
                lines.append(
                    f"| {m_label} | {ckpt} | {_fmt(e.get('step'))} | "
                    + " | ".join(_fmt(e.get(k)) for k in TABLE_KEYS)
                    + " |"
                )
        lines.append("")
        for m_label, by_ckpt in entry["models"].items():
            for ckpt, e in by_ckpt.items():
                if "sections" in e:
                    lines += [
                        f"RewardBench ({m_label}, {ckpt}): score **{_fmt(e['score'])}**"
                        + (
                            f", with prior sets {_fmt(e['score_with_prior_sets'])}"
                            if "score_with_prior_sets" in e
                            else ""
                        )
                        + (f"; implicit reward score {_fmt(e['dpo']['score'])}" if "dpo" in e else ""),
                        "",
                        "| section | score |",
                        "|---|---|",
                    ]
                    lines += [f"| {k} | {_fmt(v)} |" for k, v in e["sections"].items()]
                    lines += ["", "| subset | accuracy |", "|---|---|"]
                    lines += [f"| {k} | {_fmt(v)} |" for k, v in e["subsets"].items()]
                    lines.append("")
        lines.append(
            f"Reference: {entry.get('reference')}; beta {entry.get('beta')}; compute dtype "
            f"{entry.get('compute_dtype')}; skipped pairs {entry.get('skipped')}."
        )
        lines.append("")
    return "\n".join(lines)


def ood_grid(report: dict, key: str = "reward_accuracy") -> tuple[list[str], list[str], np.ndarray]:
    """(models, datasets, [M, D] values of `key` at each model's first checkpoint; NaN where absent)."""
    datasets = list(report)
    models = list(dict.fromkeys(m for d in datasets for m in report[d]["models"]))
    grid = np.full((len(models), len(datasets)), np.nan)
    for j, d in enumerate(datasets):
        for i, m in enumerate(models):
            by_ckpt = report[d]["models"].get(m)
            if by_ckpt:
                v = next(iter(by_ckpt.values())).get(key)
                grid[i, j] = v if isinstance(v, (int, float)) else np.nan
    return models, datasets, grid


def write_ood_grid(report: dict, out, *, figures: bool = True) -> dict:
    """ood_grid.json / .md / .png: train-on-row (model) / test-on-column (dataset) accuracy."""
    tables = {}
    md = [
        "# Out-of-distribution grid",
        "",
        "Rows: models (trained on X); columns: evaluation data (Y); cells: accuracy at each model's "
        "first evaluated checkpoint.",
        "",
    ]
    for key in ("reward_accuracy", "dpo_accuracy"):
        models, datasets, grid = ood_grid(report, key)
        if np.isnan(grid).all():
            continue
        tables[key] = {
            "models": models,
            "datasets": datasets,
            "values": [[None if np.isnan(v) else float(v) for v in row] for row in grid],
        }
        md += [f"## {key}", "", "| model \\ data | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
        md += [
            f"| {m} | " + " | ".join(_fmt(float(v)) if np.isfinite(v) else "" for v in row) + " |"
            for m, row in zip(models, grid)
        ]
        md.append("")
        if figures:
            plots.save(plots.accuracy_heatmap(grid, models, datasets, title=key), out / f"ood_grid_{key}.png")
    paths.write_text(out / "ood_grid.json", json.dumps(tables, indent=1))
    paths.write_text(out / "ood_grid.md", "\n".join(md))
    return tables
