"""The `data.load_pairs` keywords a run config's data section sets, read the same way by training
(training/setup.py) and evaluation (a run's own eval split, `--data=run:eval`): the data package
takes explicit arguments and reads no run config.
"""

from __future__ import annotations


def fidelity_options(data_cfg) -> dict:
    """data.truncation / degenerate / batching of a run config's `data` section, for both splits."""
    return dict(
        truncation=str(data_cfg.truncation), degenerate=str(data_cfg.degenerate), batching=str(data_cfg.batching)
    )


def eval_options(data_cfg) -> dict:
    """data.eval_subsample[_seed] of a run config's `data` section, for the eval split only (0: all rows)."""
    return dict(subsample=int(data_cfg.eval_subsample), subsample_seed=int(data_cfg.eval_subsample_seed))
