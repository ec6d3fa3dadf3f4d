"""Data-loader benchmark: padding with/without length grouping, throughput, share of step time.

    python benchmarks/loader.py [--data=sample] [--tokenizer=DIR] [--batch_size=16]
        [--max_length=512] [--max_prompt_length=128] [--steps=300] [--step_ms=50]

Prints:
- padding fraction (pad tokens / all tokens of the [B, 2, L] batches) over one epoch, with and
  without length grouping, and their ratio; the distinct L values (compiled shapes);
- build throughput (pairs/s) of batches built in the calling thread (no prefetch);
- with prefetch, the time `next()` blocks while a stand-in train step of --step_ms runs
  (a sleep: the accelerator works while the host thread is free), as a share of step time
  (target < 5%).
No assertions: numbers only.
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from haf_jax.data import PairLoader, format_report, load_pairs, load_tokenizer, sample_paths  # noqa: E402


def padding(ds, batch_size, grouping, seed=0):
    with PairLoader(ds, batch_size, seed=seed, length_grouping=grouping, prefetch=0) as ld:
        bs = [next(ld) for _ in range(ld.steps_per_epoch)]
    real = sum(int((b["last_index"] + 1).sum()) for b in bs)
    total = sum(b["tokens"].size for b in bs)
    return 1 - real / total, sorted({b["tokens"].shape[2] for b in bs})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample")
    ap.add_argument("--tokenizer", default=str(sample_paths()["tokenizer"]))
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=512)
    ap.add_argument("--max_prompt_length", type=int, default=128)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--step_ms", type=float, default=50.0)
    a = ap.parse_args()

    t0 = time.perf_counter()
    tok = load_tokenizer(a.tokenizer)
    t1 = time.perf_counter()
    ds = load_pairs(a.data, tok, split="all", max_length=a.max_length,
                    max_prompt_length=a.max_prompt_length)
    t2 = time.perf_counter()
    print(format_report(ds.report))
    print(f"load_tokenizer {t1 - t0:.2f}s; load_pairs {t2 - t1:.2f}s "
          f"({len(ds) / (t2 - t1):,.0f} pairs/s read+convert+tokenise)")

    pad_g, shapes_g = padding(ds, a.batch_size, True)
    pad_u, shapes_u = padding(ds, a.batch_size, False)
    print(f"padding fraction: grouped {pad_g:.3f} (L in {shapes_g}), ungrouped {pad_u:.3f} "
          f"(L in {shapes_u}); grouped/ungrouped = {pad_g / pad_u:.2f}; "
          f"tokens computed per real token: {1 / (1 - pad_g):.2f} vs {1 / (1 - pad_u):.2f}")

    with PairLoader(ds, a.batch_size, seed=0, prefetch=0) as ld:
        next(ld)
        t = time.perf_counter()
        for _ in range(a.steps):
            next(ld)
        dt = time.perf_counter() - t
    print(f"build throughput (no prefetch): {a.steps * a.batch_size / dt:,.0f} pairs/s, "
          f"{1e3 * dt / a.steps:.2f} ms/batch")

    step = a.step_ms / 1e3
    with PairLoader(ds, a.batch_size, seed=0, prefetch=4) as ld:
        next(ld)
        time.sleep(0.2)
        wait = 0.0
        t = time.perf_counter()
        for _ in range(a.steps):
            w = time.perf_counter()
            next(ld)
            wait += time.perf_counter() - w
            time.sleep(step)
        total = time.perf_counter() - t
    print(f"with prefetch and a {a.step_ms:.0f} ms step: next() blocked {1e3 * wait / a.steps:.3f} ms/step "
          f"= {100 * wait / total:.2f}% of step time (target < 5%)")
    ratio = (1e3 * dt / a.steps) / a.step_ms
    print(f"batch build time / step time = {ratio:.3f} (prefetch hides it while < 1)")


if __name__ == "__main__":
    main()
