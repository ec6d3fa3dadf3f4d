"""Will it fit? Compile the configured train step ahead of time for a topology and report memory per chip.

  python -m haf_jax.plan --config=configs/gemma.py:gemma-2b --topology=v5litepod-8 [--config.key=value ...]

Nothing is read or loaded: the architecture comes from model.preset (or model.checkpoint's
config.json when that is a local directory), the state and a batch of train.batch_size pairs x 2 x
data.max_length are abstract arrays with the run's shardings, and the real train step (objective,
compute dtype, remat, LoRA, grad_accum, reference mode of the config) is lowered and compiled for
the topology. TPU topologies compile through libtpu (the `tpu` extra) on any x86 machine.

Per chip, from `compiled.memory_analysis()`:
  total = arguments (params + optimizer state + batch) + temporaries + outputs - aliased
(the state is donated, so its outputs alias its arguments and are counted once). The last stdout
line is JSON.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
from ml_collections import config_flags

from haf_jax import cli
from haf_jax.training import planning

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/gemma.py[:preset]).", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "v5e:2x4 | v5p:2x2x2 | v4:2x2x1 | v6e:2x4 | v5litepod-8 | v5e-8 | v6e-8 | v4-32 | v5p-64 | cpu:N"
)


@cli.command(config_flags=True)
def main(argv) -> None:
    cli.no_arguments(argv)
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required, e.g. --config=configs/gemma.py")
    report = planning.plan(config, _TOPOLOGY.value)
    print(planning.format_report(report), flush=True)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    planning.prepare_backend(sys.argv)
    main.run()
