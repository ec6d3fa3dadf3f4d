"""Check a data spec and print its report: ``python -m haf_jax.data SPEC [options]``.

Exit 0 and print the report (and ``--out`` JSON) when the data loads; on bad data print the one
`DataError` message (file, line/row, field) on stderr, no traceback, and exit 1.
"""
import argparse
import json
import sys

from haf_jax.data import DataError, PairOptions, format_report, load_pairs, load_tokenizer, sample_paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m haf_jax.data", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="file, 'sample', recipe:NAME[:SOURCE], hf:NAME|DIR[:CONFIG|:data_dir=D]:SPLIT, "
                    "tfds:NAME[:data_dir=D]:SPLIT")
    ap.add_argument("--tokenizer", default=str(sample_paths()["tokenizer"]))
    ap.add_argument("--split", default="all", choices=("train", "eval", "all"))
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--max_prompt_length", type=int, default=128)
    ap.add_argument("--template", default="none")
    ap.add_argument("--eval_fraction", type=float, default=0.05)
    ap.add_argument("--max_skip_fraction", type=float, default=0.1)
    ap.add_argument("--out", help="also write the report as JSON here")
    a = ap.parse_args(argv)
    try:
        tok = load_tokenizer(a.tokenizer)
        options = PairOptions(max_length=a.max_length, max_prompt_length=a.max_prompt_length, template=a.template,
                              eval_fraction=a.eval_fraction, max_skip_fraction=a.max_skip_fraction)
        ds = load_pairs(a.spec, tok, options, split=a.split)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        return 1
    print(format_report(ds.report))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(ds.report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
