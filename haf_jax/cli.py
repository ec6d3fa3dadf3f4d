"""The one command-line pattern: every `python -m haf_jax.X` defines absl flags and a `main`, marks
it `@cli.command(...)` and ends with `main.run()`.

What every command gets from here:
- bad input (DataError, ValueError, FileNotFoundError, and what a command adds, e.g. train's
  RunError) is one line `error: MESSAGE` on stderr, no traceback, exit status 2;
- a missing, unknown or wrong flag (absl's flag errors, `app.UsageError`) is the same: one line
  `error: MESSAGE` naming the flag, a pointer to --helpfull, exit status 2;
- absl logging at WARNING, set once here (orbax logs every file it reads or writes at INFO);
  messages go through `core.logs.log` (stderr, process 0);
- the flags several commands share: the sampling flags (`sample`, `bon`), the checkpoint and
  log-prob chunk flags (`score`, `sample`, `bon`, `evaluate`), and the config-file flag parser
  (`train`, `plan`).
`Command.invoke(argv)` runs a command in this process exactly as `python -m` would (tests).
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from collections.abc import Callable

from absl import app, flags, logging

from haf_jax.data.errors import DataError

BAD_INPUT = (DataError, ValueError, FileNotFoundError)  # a clear message, exit 2 (PlanError is a ValueError)
STEP_HELP = "For run directories: best | last | a step number."
HELP_HINT = "Pass --helpfull to see the flags."


# ----------------------------------------------------------------------------- running a command


@dataclasses.dataclass(frozen=True)
class Command:
    """A command's `main(argv)` with its error path.

    errors: exception types besides BAD_INPUT that are bad input of this command (one line, exit 2).
    prefix: what the error line starts with ("error", or "data error" for `python -m haf_jax.data`).
    config_flags: parse the flags with `parse_config_flags` (commands taking `--config` overrides).
    """

    main: Callable[[list[str]], None]
    errors: tuple[type[BaseException], ...] = ()
    prefix: str = "error"
    config_flags: bool = False

    def __call__(self, argv: list[str]) -> None:
        """Runs main(argv) (flags already parsed); bad input exits 2 with one line on stderr."""
        logging.set_verbosity(logging.WARNING)
        try:
            self.main(argv)
        except (*BAD_INPUT, *self.errors) as e:
            print(f"{self.prefix}: {e}", file=sys.stderr)
            sys.exit(2)
        except app.UsageError as e:
            print(f"{self.prefix}: {e}\n{HELP_HINT}", file=sys.stderr)
            sys.exit(2)

    def run(self) -> None:
        """`python -m`: absl parses sys.argv, then the guarded main."""
        app.run(self, flags_parser=parse_config_flags if self.config_flags else parse_flags)

    def invoke(self, argv: list[str]) -> None:
        """The command in this process: every flag back to its default, `argv` ([program, args...])
        parsed, then the guarded main. Exits (SystemExit) where the command would."""
        flags.FLAGS.unparse_flags()
        _drop_config_overrides()
        saved, sys.argv = sys.argv, list(argv)  # config_flags reads --config.key overrides from sys.argv
        try:
            rest = (parse_config_flags if self.config_flags else parse_flags)(list(argv))
        finally:
            sys.argv = saved
        self(rest)


def _drop_config_overrides() -> None:
    """Removes the `--config.KEY` flags an earlier parse in this process defined: config_flags defines
    one flag per override it parses, and defining it again (the same override in a second run of a
    command) would be absl's DuplicateFlagError. No other flag name has a dot."""
    for name in [name for name in flags.FLAGS if "." in name]:
        delattr(flags.FLAGS, name)


def command(*, errors: tuple[type[BaseException], ...] = (), prefix: str = "error", config_flags: bool = False):
    """Decorator: `main(argv)` becomes a `Command` (see there)."""
    return functools.partial(Command, errors=errors, prefix=prefix, config_flags=config_flags)


def no_arguments(argv: list[str]) -> None:
    """Usage error for positional arguments (absl passes them to main after the program name)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")


def require(*holders: flags.FlagHolder) -> None:
    """Usage error naming the first of `holders` that has no value."""
    for holder in holders:
        if not holder.value:
            raise app.UsageError(f"--{holder.name} is required")


def output_file(holder: flags.FlagHolder) -> None:
    """Bad input naming `holder` (an --out written as one file) when its value is an existing directory:
    checked before any model is loaded, so a run does not compute everything and fail at the end."""
    from haf_jax.core import paths

    if holder.value and paths.path(holder.value).is_dir():
        raise ValueError(f"--{holder.name}={holder.value} is a directory; it names the file to write")


def output_dir(holder: flags.FlagHolder) -> None:
    """Bad input naming `holder` (an --out or --workdir written as a directory) when its value is an
    existing file."""
    from haf_jax.core import paths

    if holder.value and paths.path(holder.value).is_file():
        raise ValueError(f"--{holder.name}={holder.value} is a file; it names the directory to write into")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where a flag error (unknown flag, bad value) is one line and exit 2."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        print(f"error: {e}\n{HELP_HINT}", file=sys.stderr)
        sys.exit(2)


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl flag parsing where config-override errors (unknown keys, wrong types, a config file that
    raises) are one clear message and exit 2 instead of a traceback."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        lines = [line for line in str(e).splitlines() if line.strip()]
        if any(line.startswith("Traceback") for line in lines):  # the config file raised: keep its message
            lines = [lines[0], lines[-1]]
        print("error: " + "\n".join(lines) + "\n" + HELP_HINT, file=sys.stderr)
    except (AttributeError, KeyError, TypeError, ValueError) as e:
        bad = [a for a in argv[1:] if a.startswith("--config.")]
        print(
            f"error: unknown or invalid config key in {' '.join(bad or argv[1:])} ({type(e).__name__}: {e})\n"
            "Every key is listed with its default and a comment in haf_jax/config/base.py.",
            file=sys.stderr,
        )
    sys.exit(2)


# ----------------------------------------------------------------------------- shared flags


def define_step_flag(help: str = STEP_HELP) -> flags.FlagHolder:
    """--step: which checkpoint of a run directory (best | last | N)."""
    return flags.DEFINE_string("step", "best", help)


def define_chunk_flag() -> flags.FlagHolder:
    """--logprob_chunk: response positions per chunk of the LM head's log-prob loop."""
    return flags.DEFINE_integer("logprob_chunk", 128, "Positions per chunk of the log-prob computation.")


@dataclasses.dataclass(frozen=True)
class SamplingFlags:
    """The flags `sample` and `bon` share (each defines its own others)."""

    prompts: flags.FlagHolder
    n: flags.FlagHolder
    temperature: flags.FlagHolder
    temperature_range: flags.FlagHolder
    top_p: flags.FlagHolder
    top_k: flags.FlagHolder
    max_new_tokens: flags.FlagHolder
    seed: flags.FlagHolder
    template: flags.FlagHolder
    max_prompt_length: flags.FlagHolder
    batch_size: flags.FlagHolder
    dtype: flags.FlagHolder
    step: flags.FlagHolder
    distinct: flags.FlagHolder

    def kwargs(self) -> dict:
        """Keyword arguments of `generation.candidates.sample` (all but the model and prompt file)."""
        return dict(
            n=self.n.value,
            temperature=self.temperature.value,
            temperature_range=parse_range(self.temperature_range.value),
            top_p=self.top_p.value,
            top_k=self.top_k.value,
            max_new_tokens=self.max_new_tokens.value,
            seed=self.seed.value,
            template=self.template.value,
            max_prompt_length=self.max_prompt_length.value,
            batch_size=self.batch_size.value,
            dtype=self.dtype.value,
            step=self.step.value,
            distinct=self.distinct.value,
        )


def define_sampling_flags(*, n_default: int | None = 4, distinct_default: bool = False) -> SamplingFlags:
    """Defines the sampling flags (defaults: the paper's Best-of-N sampler, N = 4, top_p 0.85,
    T ~ U(0.5, 1.2)); `bon` defaults --n from its reward model's config and --distinct on."""
    from haf_jax.generation.candidates import PAPER_TEMPERATURE_RANGE, PAPER_TOP_P

    f = flags
    return SamplingFlags(
        prompts=f.DEFINE_string("prompts", None, "JSON-lines file with a string field `prompt` per line."),
        n=f.DEFINE_integer(
            "n", n_default, "Candidates per prompt." + ("" if n_default else " Default: the reward model's bon.n.")
        ),
        temperature=f.DEFINE_float(
            "temperature", None, "Fixed temperature for every candidate (0 = greedy); overrides --temperature_range."
        ),
        temperature_range=f.DEFINE_string(
            "temperature_range",
            ",".join(map(str, PAPER_TEMPERATURE_RANGE)),
            "LOW,HIGH: each candidate's temperature is drawn from U(LOW, HIGH).",
        ),
        top_p=f.DEFINE_float("top_p", PAPER_TOP_P, "Nucleus sampling mass (1.0 = off)."),
        top_k=f.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0 = off)."),
        max_new_tokens=f.DEFINE_integer("max_new_tokens", 256, "Most tokens generated per candidate."),
        seed=f.DEFINE_integer("seed", 0, "Sampling seed (keys and temperatures per prompt and candidate)."),
        template=f.DEFINE_string("template", "none", "Prompt template: none | phi2 | mistral (as in training)."),
        max_prompt_length=f.DEFINE_integer("max_prompt_length", 128, "Prompt tokens kept (the end)."),
        batch_size=f.DEFINE_integer("batch_size", 8, "Prompts per batch (each with N candidate rows)."),
        dtype=f.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype of the sampler."),
        step=define_step_flag(),
        distinct=f.DEFINE_bool(
            "distinct",
            distinct_default,
            "Draw until N candidates with distinct texts, at most 2N draws (the paper's Best-of-N rule).",
        ),
    )


def parse_range(text: str) -> tuple[float, float]:
    """(low, high) of --temperature_range's 'LOW,HIGH'."""
    try:
        low, high = (float(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--temperature_range must be LOW,HIGH, got {text!r}") from None
    return low, high
