"""Train a reward model: `python -m haf_jax.train --config=configs/gemma.py [--workdir=DIR]`.

With no other argument this runs the tiny preset on the bundled HH-RLHF sample, offline.
Starting on a workdir that holds a checkpoint resumes from it. Multi-host: run the same command
on every host; `jax.distributed.initialize()` is called when the launcher says the run spans
several processes.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from haf_jax import cli
from haf_jax.core.distributed import maybe_initialize
from haf_jax.training.resume import RunError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/gemma.py[:preset]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics.jsonl, TensorBoard.")


@cli.command(errors=(RunError,), config_flags=True)
def main(argv) -> None:
    cli.no_arguments(argv)
    from haf_jax.training.loop import train

    maybe_initialize()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/gemma.py")
    cli.output_dir(_WORKDIR)
    train(config, _WORKDIR.value)


if __name__ == "__main__":
    main.run()
