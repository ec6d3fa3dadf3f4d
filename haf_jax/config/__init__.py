"""Run configs: every key, its default and its meaning, in one place.

- base.py: `base_config()` (every key a run reads, with its comment; the offline demo's values),
  `full_size` (the real-model values), `family_config` (what configs/<family>.py returns) and the
  keys added after runs were already written (`ADDED_LATER`, `with_added_defaults`), which resume,
  score and export fill into an older run's saved config from the same defaults.
- paper.py: the paper's setups (docs/REPRODUCE.md) behind configs/paper/*.py.

The config files themselves stay at the repository top (`--config=configs/gemma.py[:preset]`):
ml_collections loads them by path, and each holds only what makes its family or setup differ.
"""
