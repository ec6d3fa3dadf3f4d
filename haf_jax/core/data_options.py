"""The `data.load_pairs` keywords a run config's data section sets, read the same way by training
(training/setup.py) and evaluation (a run's own eval split, `--data=run:eval`): the data package
takes explicit arguments and reads no run config.
"""

from __future__ import annotations

import dataclasses

import jax

from haf_jax.data import PairOptions


def fidelity_options(data_cfg) -> dict:
    """data.truncation / degenerate / batching of a run config's `data` section, for both splits."""
    return dict(
        truncation=str(data_cfg.truncation), degenerate=str(data_cfg.degenerate), batching=str(data_cfg.batching)
    )


def eval_options(data_cfg) -> dict:
    """data.eval_subsample[_seed] of a run config's `data` section, for the eval split only (0: all rows)."""
    return dict(subsample=int(data_cfg.eval_subsample), subsample_seed=int(data_cfg.eval_subsample_seed))


def run_pair_options(config) -> tuple[PairOptions, PairOptions]:
    """(train split, eval split) `PairOptions` of a run config: what training loads its data with,
    and what `--data=run:eval` rebuilds the run's eval split with. This process's share of the pairs
    (process index / count) on a multi-host run."""
    d = config.data
    train = PairOptions(
        max_length=d.max_length,
        max_prompt_length=d.max_prompt_length,
        template=d.template,
        eval_fraction=d.eval_fraction,
        seed=config.data.split_seed,  # the eval carve's seed (train.seed orders the batches)
        max_skip_fraction=d.max_skip_fraction,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **fidelity_options(d),
    )
    return train, dataclasses.replace(train, **eval_options(d))
