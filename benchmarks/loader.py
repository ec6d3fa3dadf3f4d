"""Data-loader benchmark: padding with/without length grouping, throughput, share of step time.

    python benchmarks/loader.py [--data=sample] [--tokenizer=DIR] [--batch_size=16]
        [--max_length=512] [--max_prompt_length=128] [--steps=300] [--step_ms=50]

Prints:
- padding fraction (pad tokens / all tokens of the [B, 2, L] batches) over one epoch, with and
  without length grouping, and their ratio; the distinct L values (compiled shapes);
- build throughput (pairs/s) of batches built in the calling thread (no prefetch);
- with prefetch, the time `next()` blocks while a train step runs, as a share of step time
  (target < 5%): the real jitted HaF step of the tiny preset (--step=real, default; on this CPU
  it competes with the loader thread for the same cores) or a stand-in sleep of --step_ms
  (--step=sleep: the accelerator works while the host thread is free).
No assertions: numbers only.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


from haf_jax.core import forward
from haf_jax.data import PairLoader, PairOptions, format_report, load_pairs, load_tokenizer, sample_paths


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
    ap.add_argument("--step", choices=("real", "sleep"), default="real")
    a = ap.parse_args()

    t0 = time.perf_counter()
    tok = load_tokenizer(a.tokenizer)
    t1 = time.perf_counter()
    ds = load_pairs(
        a.data, tok, PairOptions(max_length=a.max_length, max_prompt_length=a.max_prompt_length), split="all"
    )
    t2 = time.perf_counter()
    print(format_report(ds.report))
    print(
        f"load_tokenizer {t1 - t0:.2f}s; load_pairs {t2 - t1:.2f}s "
        f"({len(ds) / (t2 - t1):,.0f} pairs/s read+convert+tokenise)"
    )

    pad_g, shapes_g = padding(ds, a.batch_size, True)
    pad_u, shapes_u = padding(ds, a.batch_size, False)
    print(
        f"padding fraction: grouped {pad_g:.3f} (L in {shapes_g}), ungrouped {pad_u:.3f} "
        f"(L in {shapes_u}); grouped/ungrouped = {pad_g / pad_u:.2f}; "
        f"tokens computed per real token: {1 / (1 - pad_g):.2f} vs {1 / (1 - pad_u):.2f}"
    )

    with PairLoader(ds, a.batch_size, seed=0, prefetch=0) as ld:
        next(ld)
        t = time.perf_counter()
        for _ in range(a.steps):
            next(ld)
        dt = time.perf_counter() - t
    print(
        f"build throughput (no prefetch): {a.steps * a.batch_size / dt:,.0f} pairs/s, {1e3 * dt / a.steps:.2f} ms/batch"
    )

    run_step = real_step(ds, a.batch_size) if a.step == "real" else (lambda b: time.sleep(a.step_ms / 1e3))
    n = min(a.steps, 60) if a.step == "real" else a.steps
    with PairLoader(ds, a.batch_size, seed=0, prefetch=4) as ld:
        run_step(next(ld))  # compiles the first shape
        time.sleep(0.2)
        wait = 0.0
        t = time.perf_counter()
        for _ in range(n):
            w = time.perf_counter()
            batch = next(ld)
            wait += time.perf_counter() - w
            run_step(batch)
        total = time.perf_counter() - t
    print(
        f"with prefetch and the {a.step} step ({1e3 * (total - wait) / n:.1f} ms/step incl. compiles of new "
        f"shapes): next() blocked {1e3 * wait / n:.3f} ms/step = {100 * wait / total:.2f}% of step time "
        f"(target < 5%)"
    )


def real_step(ds, batch_size):
    """The tiny preset's jitted HaF train step (precomputed reference zeros), blocking per call."""
    import jax
    import numpy as np

    from haf_jax.core import params as params_lib, sharding
    from haf_jax.core.optim import make_optimizer
    from haf_jax.model.families import preset
    from haf_jax.training import step as step_lib

    cfg = preset("tiny")
    mesh = sharding.make_mesh((1, -1, 1))
    scfg = forward.StepConfig(cfg, forward.LossConfig())
    opt = make_optimizer(learning_rate=1e-3, total_steps=1000)
    init_state, abstract = step_lib.state_layout(cfg, opt, mesh)
    fn, keys = step_lib.jit_train_step(
        scfg,
        opt,
        mesh,
        jax.tree.map(lambda x: x.sharding, abstract),
        params_lib.param_shardings(cfg, mesh),
        live_reference=False,
    )
    state = [init_state(params_lib.init_params(cfg, jax.random.key(0), mesh))]

    def run(batch):
        batch = {**batch, "ref_logp": np.zeros(batch["last_index"].shape, np.float32)}
        state[0], m = fn(state[0], {k: batch[k] for k in keys}, None, None)
        jax.block_until_ready(m)

    return run


if __name__ == "__main__":
    main()
