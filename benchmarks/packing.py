"""Packed vs unpacked train steps on real pairs: real tokens/s and pairs/s of the jitted step.

    python benchmarks/packing.py [--data=sample] [--tokenizer=DIR] [--shape=issue|tiny]
        [--objective=baseline] [--batch_size=16] [--max_length=256] [--steps=6]
        [--pack_lengths=512,1024]

For each loader (unpacked length-grouped, unpacked random, packed at each row length) the same
model and state run `--steps` consecutive batches after one warm-up batch per distinct shape
(compilation excluded), on one device. Prints real (non-padding) tokens/s, pairs/s, padding and
the ratio to the length-grouped unpacked loader. With the XLA attention (the only one on a CPU),
a token attends over its row up to itself (causal query blocks) whatever the segments, so packing
long rows pays only when attention is a small share of the step (wide models) or a kernel skips
masked blocks.
`--shape=issue`: Gemma architecture, 6 layers, width 512, 8 query / 1 key-value heads of 64, MLP
2048 (issue 12's table); `tiny`: the tiny preset. No assertions: numbers only.
"""

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from haf_jax import data
from haf_jax.core import forward, params as params_lib, sharding
from haf_jax.core.optim import make_optimizer
from haf_jax.data import PackedLoader, PairLoader
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib


def model_for(shape: str, vocab: int):
    if shape == "tiny":
        return dataclasses.replace(preset("tiny"), vocab_size=max(vocab, 2048), attention="xla")
    return dataclasses.replace(
        preset("gemma-2b"),
        num_layers=6,
        layer_types=(),
        hidden_size=512,
        intermediate_size=2048,
        num_heads=8,
        num_kv_heads=1,
        head_dim=64,
        vocab_size=max(vocab, 32000),
        attention="xla",
    )


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="sample")
    ap.add_argument("--tokenizer", default=str(data.sample_paths()["tokenizer"]))
    ap.add_argument("--shape", default="issue", choices=("issue", "tiny"))
    ap.add_argument("--objective", default="baseline")
    ap.add_argument("--batch_size", type=int, default=16)
    ap.add_argument("--max_length", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--pack_lengths", default="512,1024")
    a = ap.parse_args()
    tok = data.load_tokenizer(a.tokenizer)
    options = data.PairOptions(max_length=a.max_length, max_prompt_length=a.max_length // 2)
    ds = data.load_pairs(a.data, tok, options, split="all")
    model = model_for(a.shape, len(tok))
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    opt = make_optimizer(learning_rate=1e-5, total_steps=1000)
    init_state, abstract = step_lib.state_layout(model, opt, mesh)
    params = params_lib.init_params(model, jax.random.key(0), mesh)
    loaders = [
        ("unpacked, length-grouped", PairLoader(ds, a.batch_size, length_grouping=True, prefetch=0)),
        ("unpacked, random", PairLoader(ds, a.batch_size, length_grouping=False, prefetch=0)),
    ]
    loaders += [
        (f"packed, rows of {t}", PackedLoader(ds, a.batch_size, length=int(t), prefetch=0))
        for t in a.pack_lengths.split(",")
    ]
    print(
        f"{len(ds)} pairs; model {a.shape} ({model.num_layers} layers, width {model.hidden_size}); "
        f"{a.objective}; {jax.devices()[0].device_kind}"
    )
    base = None
    for name, loader in loaders:
        cfg = forward.StepConfig(
            model, forward.LossConfig(objective=a.objective), packed=isinstance(loader, PackedLoader)
        )
        fn, keys = step_lib.jit_train_step(
            cfg,
            opt,
            mesh,
            jax.tree.map(lambda x: x.sharding, abstract),
            params_lib.param_shardings(model, mesh),
            live_reference=False,
        )
        batches = [next(loader) for _ in range(a.steps)]
        for b in batches:
            b["ref_logp"] = np.zeros(b["valid"].shape + (2,), np.float32)
        state = init_state(jax.tree.map(lambda x: x.copy(), params))
        seen = set()
        for b in batches:  # warm-up: one step per distinct shape (compilation excluded below)
            if b["tokens"].shape not in seen:
                seen.add(b["tokens"].shape)
                state, m = fn(state, forward.put_batch(b, keys, mesh), None, None)
                jax.block_until_ready(m)
        t = time.perf_counter()
        for b in batches:
            state, m = fn(state, forward.put_batch(b, keys, mesh), None, None)
        jax.block_until_ready(m)
        dt = time.perf_counter() - t
        tokens = sum(data.real_tokens(b) for b in batches)
        pairs = sum(int(b["valid"].sum()) for b in batches)
        rate = tokens / dt
        base = base or rate
        print(
            f"{name:26s} padding {loader.padding()['padding_fraction']:6.1%}  {rate:8.0f} real tokens/s  "
            f"{pairs / dt:6.2f} pairs/s  x{rate / base:.2f} tokens/s vs length-grouped"
        )


if __name__ == "__main__":
    main()
