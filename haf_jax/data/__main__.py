"""Check a data spec and print its report: ``python -m haf_jax.data SPEC [--flags]``.

SPEC: a file, 'sample', recipe:NAME[:SOURCE], hf:NAME|DIR[:CONFIG|:data_dir=D]:SPLIT or
tfds:NAME[:data_dir=D]:SPLIT. Exit 0 and print the report (and write ``--out`` JSON) when the data
loads; on bad data print the one `DataError` message (file, line/row, field) on stderr, no
traceback, and exit 2.
"""

import json

from absl import app, flags

from haf_jax import cli
from haf_jax.data import PairOptions, format_report, load_pairs, load_tokenizer, sample_paths

_TOKENIZER = flags.DEFINE_string("tokenizer", str(sample_paths()["tokenizer"]), "Tokenizer directory or hub id.")
_SPLIT = flags.DEFINE_enum("split", "all", ["train", "eval", "all"], "Which split of the spec to load.")
_MAX_LENGTH = flags.DEFINE_integer("max_length", 512, "Maximum tokens of prompt + response.")
_MAX_PROMPT = flags.DEFINE_integer("max_prompt_length", 128, "Maximum prompt tokens.")
_TEMPLATE = flags.DEFINE_string("template", "none", "Prompt template: none | phi2 | mistral.")
_EVAL_FRACTION = flags.DEFINE_float("eval_fraction", 0.05, "Share of the pairs carved out as the eval split.")
_MAX_SKIP = flags.DEFINE_float("max_skip_fraction", 0.1, "Most pairs that may be skipped before it is an error.")
_OUT = flags.DEFINE_string("out", None, "Also write the report as JSON here.")


@cli.command(prefix="data error")
def main(argv) -> None:
    if len(argv) != 2:
        raise app.UsageError(f"expected one SPEC, got {argv[1:]}")
    tok = load_tokenizer(_TOKENIZER.value)
    options = PairOptions(
        max_length=_MAX_LENGTH.value,
        max_prompt_length=_MAX_PROMPT.value,
        template=_TEMPLATE.value,
        eval_fraction=_EVAL_FRACTION.value,
        max_skip_fraction=_MAX_SKIP.value,
    )
    ds = load_pairs(argv[1], tok, options, split=_SPLIT.value)
    print(format_report(ds.report))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(ds.report, f, indent=2)


if __name__ == "__main__":
    main.run()
