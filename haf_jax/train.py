"""Train a reward model: `python -m haf_jax.train --config=configs/gemma.py [--workdir=DIR]`.

With no other argument this runs the tiny preset on the bundled HH-RLHF sample, offline.
Starting on a workdir that holds a checkpoint resumes from it. Multi-host: run the same command
on every host; `jax.distributed.initialize()` is called when the launcher says the run spans
several processes.
"""
from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from haf_jax.core.distributed import maybe_initialize

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/gemma.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "runs/default", "Run directory: checkpoints, metrics.jsonl, TensorBoard.")


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from haf_jax.data import DataError
    from haf_jax.training.loop import RunError, train

    maybe_initialize()
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/gemma.py")
    try:
        train(config, _WORKDIR.value)
    except (DataError, RunError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def parse_flags(argv):
    """absl flag parsing with config-override errors (unknown keys, wrong types) as one clear line."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # config file raised: keep its message
            lines = [lines[0], lines[-1]]
        print("error: " + "\n".join(lines) + "\nPass --helpfull to see the flags.", file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        print(f"error: unknown or invalid config key in {' '.join(bad or argv[1:])} ({type(e).__name__}: {e})\n"
              "Every key is listed with its default and a comment in haf_jax/config/base.py.", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
