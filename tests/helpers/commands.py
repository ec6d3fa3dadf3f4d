"""Commands run in the test process (`python -m haf_jax.X` without a second jax/orbax/transformers
import): `command("haf_jax.X").invoke([program, args...])`.

absl keeps one flag registry per process, and the commands share flag names (--out, --model,
--step, --config, the sampling flags): importing a second command next to a first is absl's
DuplicateFlagError. So a test never imports a command module itself; `command` removes the flags
every haf_jax module defined and imports the asked-for command afresh (module reload), so exactly
its own flags, with its own defaults and help, are registered when it parses its argv.
"""

from __future__ import annotations

import importlib
import sys

from absl import flags

from haf_jax import cli


def _drop_haf_jax_flags() -> None:
    """Removes every flag defined by a haf_jax module (the commands and haf_jax.cli's shared flags)."""
    owned = {
        flag.name
        for module, defined in flags.FLAGS.flags_by_module_dict().items()
        if module == "haf_jax" or module.startswith("haf_jax.")
        for flag in defined
    }
    for name in owned:
        if name in flags.FLAGS:
            delattr(flags.FLAGS, name)


def command(module: str) -> cli.Command:
    """The `main` of command module `module` (e.g. "haf_jax.train", "haf_jax.data.__main__") with its
    own flags, and only those of haf_jax, registered. Call `.invoke([program, args...])` on it: flags
    reset and parsed, then the command's guarded main (SystemExit where `python -m` would exit)."""
    _drop_haf_jax_flags()
    loaded = sys.modules.get(module)
    loaded = importlib.reload(loaded) if loaded is not None else importlib.import_module(module)
    main = loaded.main
    if not isinstance(main, cli.Command):
        raise TypeError(f"{module}.main is not a haf_jax.cli.Command")
    return main
