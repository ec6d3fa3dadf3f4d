"""MFU: the FLOPs one train step executes, and the peak FLOP/s of the devices it runs on.

FLOPs per step are counted on the step's jaxpr (the trace the compiled program is lowered from):
every `dot_general` (the matmuls: projections, attention scores and values, MLP, LM head, and
their gradients) counts 2 x output elements x contracted size, a `scan` body counts `length`
times, a `cond` its costliest branch, and the LM head's chunk loops (while loops) as many times
as they ran: their trip count depends on the batch's response positions (`step_flops`). The
rematerialised forward passes are part of the traced backward, so they count: this is the
hardware-FLOPs flavour of MFU. Elementwise work is left out, as in the usual 6 x parameters x
tokens rule. XLA's own `compiled.cost_analysis()["flops"]` is not used because it counts a loop
body once, whatever its trip count: scanned layers would be undercounted by their number
(tests/unit/test_mfu.py shows it), and the chunk loops cannot be known before the step runs.

Peaks are dense bfloat16 FLOP/s per device from the vendors' data sheets; on CPU the peak is
measured once (a float32 matmul on this host), and the log says which.
"""

from __future__ import annotations

import math
import os
import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per JAX device, matched against `device.device_kind` (first match wins,
# so longer names come first). Sources: Cloud TPU system-architecture pages (v4 275 T, v5e 197 T,
# v5p 459 T, v6e 918 T per chip; JAX shows one device per chip) and NVIDIA data sheets (A100 312 T,
# H100 SXM 989 T, H100 PCIe 756 T, H200 989 T; dense, without sparsity).
PEAK_BF16_FLOPS = (
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("A100", 312e12),
)


def jaxpr_flops(jaxpr) -> float:
    """Matmul FLOPs of a (Closed)Jaxpr, scans counted by their length, a while loop's body once."""
    return sum(step_flops(jaxpr))


def step_flops(jaxpr) -> tuple[float, float]:
    """(fixed, per_chunk): a step's matmul FLOPs are `fixed + per_chunk x chunks`, `chunks` being
    how many log-prob chunks it ran (metrics["logprob_chunks"], a mean over micro-batches).

    The LM head runs over the response positions only, as many chunks as the batch needs
    (`model/lm_logprobs.py`: a `while_loop` forward and another in its backward), so what a step
    executes depends on its batch. Every while loop of the step is such a chunk loop: its body
    counts per chunk run (the forward, the backward and a live reference's pass run the same
    chunks). Everything else is fixed: scan bodies times their length, a cond's costliest branch.
    """
    return _count(getattr(jaxpr, "jaxpr", jaxpr))


def _count(jaxpr) -> tuple[float, float]:
    """(FLOPs outside while loops, FLOPs of one trip of every while loop)."""
    fixed = per_chunk = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            fixed += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs_shape[d] for d in contract_lhs)
        elif name == "cond":  # one branch runs
            f, c = max((_count(b.jaxpr) for b in eqn.params["branches"]), key=sum)
            fixed, per_chunk = fixed + f, per_chunk + c
        elif name == "while":
            per_chunk += sum(_count(eqn.params["body_jaxpr"].jaxpr))
        else:  # scan (times its length), jit, remat, custom_vjp, ...
            times = eqn.params["length"] if name == "scan" else 1
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        f, c = _count(sub)
                        fixed, per_chunk = fixed + times * f, per_chunk + times * c
    return fixed, per_chunk


def peak_flops(devices) -> tuple[float | None, str]:
    """(peak FLOP/s of all `devices` together, where the number comes from) — None when unknown."""
    devices = list(devices)
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # Fake CPU devices (--xla_force_host_platform_device_count) share one host's cores.
        hosts = len({d.process_index for d in devices})
        per_host = measured_cpu_flops()
        return (
            per_host * hosts,
            f"measured on this CPU host: {per_host / 1e9:.1f} GFLOP/s float32 matmul x {hosts} host(s)",
        )
    for name, peak in PEAK_BF16_FLOPS:
        if name.lower() in kind.lower():
            return peak * len(devices), f"{kind}: {peak / 1e12:.0f} TFLOP/s bf16 dense x {len(devices)} devices"
    return None, f"unknown peak for device kind {kind!r} (no MFU)"


def measured_cpu_flops(n: int = 1024, repeats: int = 25) -> float:
    """FLOP/s of this host's CPU cores on a float32 [n, n] x [n, n] matmul, the median of `repeats`.

    Each matmul is timed in this process's CPU time (all its threads), not wall time, and the rate per
    core is multiplied by the cores this process may run on. On a quiet host the two agree (two busy
    threads for t seconds are 2t of CPU time on 2 cores; measured here: wall best-of-25 389-415
    GFLOP/s, CPU-time median 373-442). On a busy host, wall time also counts the moments the matmul's
    threads wait for a core: a wall-clock probe taken while two pytest-xdist workers and a benchmark
    shared 2 cores came out 26x too slow, and the run's MFU read 26. CPU time counts only the work, so
    load lowers MFU as it should. The median, not the best: the shortest CPU-time samples are the ones
    where a thread sat idle waiting for a core (best-of-25 read up to 1.6x the wall peak)."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    samples = []
    for _ in range(repeats):
        t0 = time.process_time()
        matmul(a).block_until_ready()
        samples.append(time.process_time() - t0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2.0 * n**3 / max(statistics.median(samples), 1e-9) * cores


class CountedStep:
    """A jitted step compiled once per argument signature, through trace -> lower -> compile, so
    that its FLOPs come from the same trace (no second compilation).

    `step(*args)` runs it; afterwards `step.last_flops` is the (fixed, per_chunk) FLOP count of the
    program that ran (`step_flops`; `flops_of(step.last_flops, metrics)` applies it to the step's chunk count).
    `step.lower(*abstract_args).compile()` (jax.jit's interface: the fit check before step 1
    compiles the largest batch that way) keeps the executable for the calls of that signature.
    """

    def __init__(self, jitted):
        self._jitted, self._compiled = jitted, {}
        self.last_flops = (0.0, 0.0)

    @staticmethod
    def _key(args):
        leaves, treedef = jax.tree.flatten(args)
        return treedef, tuple((tuple(x.shape), str(x.dtype)) for x in leaves)

    def lower(self, *args):
        """The lowering for `args` (arrays or jax.ShapeDtypeStructs); its .compile() is kept."""
        traced = self._jitted.trace(*args)
        return _Lowered(self._compiled, self._key(args), traced.lower(), step_flops(traced.jaxpr))

    def __call__(self, *args):
        key = self._key(args)
        if key not in self._compiled:
            self.lower(*args).compile()
        compiled, self.last_flops = self._compiled[key]
        return compiled(*args)


class _Lowered:
    """A lowered step whose compile() stores the executable (and its FLOPs) under its signature."""

    def __init__(self, cache: dict, key, lowered, flops: tuple[float, float]):
        self._cache, self._key, self._lowered, self._flops = cache, key, lowered, flops

    def compile(self):
        compiled = self._lowered.compile()
        self._cache[self._key] = (compiled, self._flops)
        return compiled


def flops_of(counted: tuple[float, float], metrics) -> float:
    """A step's FLOPs from its (fixed, per_chunk) count and its metrics' `logprob_chunks`."""
    fixed, per_chunk = counted
    return fixed + per_chunk * float(metrics.get("logprob_chunks", 0.0))
