"""RLHF on Tunix with a haf_jax reward model (needs the `rlhf` extra: pip install -e ".[rlhf]").

  python -m haf_jax.rlhf --config=configs/rlhf.py --workdir=runs/rlhf [--config.algorithm=ppo] [--fit_only]

With no model given, the offline demo: a tiny Qwen2 reward model trained on a rule (the marker word
preferred) and its exported policy, GRPO on the bundled sample's prompts. The workdir gets
metrics.jsonl (reward_mean, reward_std, kl, response_length per step), tensorboard/, checkpoints/
and summary.json (held-out mean reward before and after); the last stdout line is the summary as
JSON. Starting again on the same workdir resumes. --fit_only prints the memory estimate and exits.
"""

from __future__ import annotations

import json

from absl import flags
from ml_collections import config_flags

from haf_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/rlhf.py", "RLHF config file (configs/rlhf.py).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics); resumed when it has a checkpoint."
)
_FIT_ONLY = flags.DEFINE_bool(
    "fit_only", False, "Print the memory estimate (actor, reference, reward, critic) and exit."
)


@cli.command(config_flags=True)
def main(argv) -> None:
    cli.no_arguments(argv)
    cli.require(_WORKDIR)
    try:
        import tunix  # noqa: F401
    except ImportError:
        raise ValueError('RLHF needs Tunix: pip install -e ".[rlhf]"') from None
    from haf_jax.rlhf.run import run

    summary = run(_CONFIG.value, _WORKDIR.value, fit_only=_FIT_ONLY.value)
    print(json.dumps(summary, default=str))


if __name__ == "__main__":
    main.run()
