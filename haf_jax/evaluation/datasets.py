"""Preference data for a loaded model: a data spec tokenised as the model's run was trained (its
max_length, template, truncation, ...), `run:eval` (a run's own eval split), and batch sizes that
split over the mesh."""

from __future__ import annotations

import jax

from haf_jax import data
from haf_jax.core import data_options
from haf_jax.core.logs import log
from haf_jax.evaluation.loading import LoadedModel

RUN_EVAL = "run:eval"  # data spec: the run's own eval split (data.eval, or the carve out of data.train)


def load_data(
    source: str | data.Records,
    model: LoadedModel,
    *,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    template: str | None = None,
    degenerate: str | None = None,
    truncation: str | None = None,
    report: bool = True,
    whole_prompts: bool = False,
):
    """`source` (a data spec, or `data.Records` in memory) tokenised for `model`: a run's data settings
    unless overridden (degenerate / truncation: the fidelity options data.degenerate / data.truncation;
    None keeps the run's, or the project defaults for a Hugging Face model); `run:eval` is the run's own
    eval split, built exactly as training built it. report: log the data report. whole_prompts: the
    prompt budget is max_prompt_length as given (up to max_length - 2), not capped at half of
    max_length as `score` caps it: only prompt + response + EOS > max_length cuts (Best-of-N's rule)."""
    c = model.run_config
    d = c.data if c is not None else None
    if source == RUN_EVAL:
        if c is None:
            raise ValueError(f"--data={RUN_EVAL} needs a run directory as the model, got {model.name}")
        _, options = data_options.run_pair_options(c)
        ds = data.load_pairs(
            d.eval or d.train or data.sample_paths()["data"],
            model.tokenizer,
            options,
            split="all" if d.eval else "eval",
        )
    else:
        max_length = max_length or (d.max_length if d is not None else 512)
        max_prompt_length = max_prompt_length or (d.max_prompt_length if d is not None else 128)
        max_prompt_length = min(max_prompt_length, max_length - 2 if whole_prompts else max_length // 2)
        fidelity = data_options.fidelity_options(d) if d is not None else {}
        if degenerate:
            fidelity["degenerate"] = degenerate
        if truncation:
            fidelity["truncation"] = truncation
        options = data.PairOptions(
            max_length=max_length,
            max_prompt_length=max_prompt_length,
            template=template or (d.template if d is not None else "none"),
            eval_fraction=0.0,
            max_skip_fraction=1.0,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            **fidelity,
        )
        ds = data.load_pairs(source, model.tokenizer, options, split="all")
    if report:
        log(data.format_report(ds.report))
    return ds


def round_batch(batch_size: int, mesh) -> int:
    """Batches are split over every device: rounded up to a multiple (filler pairs are masked)."""
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    return -(-batch_size // n_shards) * n_shards
