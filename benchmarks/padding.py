"""Padding before / after packing (data.packing) over one epoch of the train loader.

    python benchmarks/padding.py [--data=sample] [--tokenizer=DIR] [--batch_size=16]
        [--max_length=256] [--max_prompt_length=128] [--pack_lengths=512,1024,2048]

Prints, per loader: the padding fraction (pad tokens / all tokens of the batches), pairs a step,
steps an epoch and the batch shapes (each distinct shape is one compilation): unpacked with and
without length grouping, then packed at each row length. No assertions: numbers only.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from haf_jax.data import PackedLoader, PairLoader, PairOptions, load_pairs, load_tokenizer, sample_paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample")
    ap.add_argument("--tokenizer", default=str(sample_paths()["tokenizer"]))
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--max_prompt_length", type=int, default=128)
    ap.add_argument("--pack_lengths", default="512,1024,2048")
    a = ap.parse_args()
    ds = load_pairs(
        a.data,
        load_tokenizer(a.tokenizer),
        PairOptions(max_length=a.max_length, max_prompt_length=a.max_prompt_length),
        split="all",
    )
    print(f"{len(ds)} pairs, max_length {a.max_length}, batch_size {a.batch_size}")
    loaders = [
        ("unpacked, length-grouped", PairLoader(ds, a.batch_size, length_grouping=True, prefetch=0)),
        ("unpacked, random", PairLoader(ds, a.batch_size, length_grouping=False, prefetch=0)),
    ]
    loaders += [
        (f"packed, rows of {t}", PackedLoader(ds, a.batch_size, length=int(t), prefetch=0))
        for t in a.pack_lengths.split(",")
    ]
    print(f"{'loader':28s} {'padding':>8s} {'pairs/step':>10s} {'steps':>6s}  shapes")
    for name, loader in loaders:
        r = loader.padding()
        print(f"{name:28s} {r['padding_fraction']:8.1%} {r['pairs_per_step']:10.2f} {r['steps']:6d}  {r['shape']}")


if __name__ == "__main__":
    main()
