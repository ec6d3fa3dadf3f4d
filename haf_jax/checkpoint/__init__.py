"""Checkpoints of a training run, one job per module:

- `manager`: `Checkpointer` (save, retention, restore with walk-back past damaged steps,
  parameters-only restore for inference) and `CorruptCheckpointError`; the only module that
  calls orbax.
- `integrity`: what a step records to be checked when read back: per-leaf layout and checksums,
  and the NaN/Inf guard (`all_finite`).
- `drain`: the asyncio event-loop policy under which orbax's reads run, so that a failed restore
  leaves no pending array read behind.

Import names from the module that holds them (`from haf_jax.checkpoint.manager import
Checkpointer`). The package imports only haf_jax.core (tests/test_imports.py).
"""
