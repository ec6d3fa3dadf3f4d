"""Throughput and model-FLOP utilisation of the jitted train step, HaF vs Baseline.

  python benchmarks/step.py [--preset=small] [--batch=8] [--length=256] [--iters=5]
      [--dtype=float32|bfloat16] [--remat] [--objectives=haf,baseline,dpo]

GPU (the issue's case: gemma-2b, bf16, 1024 tokens):
  python benchmarks/step.py --preset=gemma-2b --batch=8 --length=1024 --dtype=bfloat16 --remat

Everything is measured in this one run (the machine is shared and noisy, so absolute numbers
drift; the ratios are what to compare): peak FLOP/s of this device from a large float32
matmul in the compute dtype, then the HaF, Baseline and DPO steps (warm, median of --iters). Model FLOPs per step are
counted analytically (matmuls only: 6 x params-touched per token for forward+backward, plus
attention scores, plus the LM head at the response positions where the objective computes it)
and shown next to XLA's own cost analysis of the compiled step (which counts a loop body once).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from haf_jax.core import forward, params as params_lib, sharding
from haf_jax.core.optim import make_optimizer
from haf_jax.model import heads
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib

SMALL = dataclasses.replace(
    preset("tiny"),
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=1024,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=128,
    layer_types=("sliding_attention", "full_attention") * 2,
)


def peak_flops(n: int = 2048, iters: int = 5, dtype=jnp.float32) -> float:
    if jax.default_backend() != "cpu":
        n = 8192  # a GPU/TPU needs a large product to reach its peak
    a = jnp.asarray(np.random.default_rng(0).standard_normal((n, n)), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        f(a).block_until_ready()
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times)


def model_flops(cfg, n_seq: int, length: int, lm_head: bool, response_positions: int = 0) -> float:
    """Forward+backward matmul FLOPs of one step over n_seq sequences of `length` tokens; the LM
    head runs at the `response_positions` of each sequence only (heads.response_logprobs)."""
    d, f, q, k, h = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    per_token = cfg.num_layers * (d * (q + 2 * k) * h + q * h * d + 3 * d * f)  # weights touched
    attn = cfg.num_layers * 2 * q * h * length  # scores + weighted sum, per token (full causal upper bound)
    trunk = n_seq * length * (per_token + attn + d)  # + the reward head
    head = n_seq * response_positions * cfg.vocab_size * d if lm_head else 0
    return 3 * 2 * (trunk + head)  # forward 2x, backward 4x


def batch(cfg, b: int, length: int):
    rng = np.random.default_rng(0)
    tokens = rng.integers(4, cfg.vocab_size, (b, 2, length)).astype(np.int32)
    mask = np.zeros((b, 2, length), np.int32)
    mask[:, :, length // 4 :] = 1
    return {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": np.full((b, 2), length - 1, np.int32),
        "valid": np.ones((b,), bool),
        "ref_logp": np.zeros((b, 2), np.float32),
    }


def warm_step(cfg, objective: str, b: int, length: int, dtype=jnp.float32, *, live_reference=False, data=None):
    """(run: one more warm step, blocking; XLA's FLOPs): the jitted train step compiled and run once.
    `data`: a batch (default: `batch(cfg, b, length)`)."""
    mesh = sharding.make_mesh((1, -1, 1))
    scfg = forward.StepConfig(cfg, forward.LossConfig(objective=objective), compute_dtype=jnp.dtype(dtype))
    opt = make_optimizer(learning_rate=1e-4, total_steps=1000)
    init_state, abstract = step_lib.state_layout(cfg, opt, mesh)
    fn, keys = step_lib.jit_train_step(
        scfg,
        opt,
        mesh,
        jax.tree.map(lambda x: x.sharding, abstract),
        params_lib.param_shardings(cfg, mesh),
        live_reference=live_reference,
    )
    data = {k: v for k, v in (batch(cfg, b, length) if data is None else data).items() if k in keys}
    params0 = params_lib.init_params(cfg, jax.random.key(0), mesh)
    ref = jax.tree.map(jnp.copy, params0) if live_reference else None  # the frozen reference (state is donated)
    state = init_state(params0)
    compiled = fn.lower(state, data, ref, None).compile()  # compiled once: timed and cost-analysed
    xla_flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))

    def run():
        nonlocal state
        state, m = compiled(state, data, ref, None)
        jax.block_until_ready(m)

    run()
    return run, xla_flops


def time_step(
    cfg, objective: str, b: int, length: int, iters: int, dtype=jnp.float32, *, live_reference=False, data=None
):
    """(median seconds of a warm step, XLA's FLOPs); `data`: a batch (default: `batch(cfg, b, length)`)."""
    run, xla_flops = warm_step(cfg, objective, b, length, dtype, live_reference=live_reference, data=data)
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), xla_flops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="small", help="'small' (defined here) or a haf_jax preset name")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--length", type=int, default=256)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    ap.add_argument("--remat", action="store_true", help="rematerialise each block in the backward pass")
    ap.add_argument("--objectives", default="haf,baseline,dpo")
    args = ap.parse_args()
    cfg = SMALL if args.preset == "small" else preset(args.preset)
    cfg = dataclasses.replace(cfg, remat=args.remat)
    dtype = jnp.dtype(args.dtype)
    peak = peak_flops(dtype=dtype)
    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  peak ({args.dtype} matmul): "
        f"{peak / 1e9:.1f} GFLOP/s; remat={args.remat}"
    )
    print(
        f"model: {args.preset} ({params_lib.param_count(heads.abstract_params(cfg)[0]) / 1e6:.1f}M params), "
        f"{args.batch} pairs x 2 x {args.length} tokens"
    )
    rows = {}
    for objective in args.objectives.split(","):
        seconds, xla = time_step(cfg, objective, args.batch, args.length, args.iters, dtype)
        flops = model_flops(
            cfg,
            2 * args.batch,
            args.length,
            lm_head=objective != "baseline",
            response_positions=args.length - args.length // 4,
        )  # batch(): the last 3/4
        rows[objective] = (seconds, flops, xla)
        print(
            f"{objective:9s} step {seconds * 1e3:8.1f} ms  {args.batch / seconds:7.2f} pairs/s  "
            f"{2 * args.batch * args.length / seconds:9.0f} tokens/s  model {flops / 1e9:7.2f} GFLOP  "
            f"(XLA {xla / 1e9:7.2f})  MFU {flops / seconds / peak:6.1%}"
        )
    if "haf" not in rows or "baseline" not in rows:
        return
    (th, fh, xh), (tb, fb, xb) = rows["haf"], rows["baseline"]
    print(f"HaF/Baseline: step time ratio {th / tb:.2f}, model FLOP ratio {fh / fb:.2f}, XLA FLOP ratio {xh / xb:.2f}")


if __name__ == "__main__":
    main()
