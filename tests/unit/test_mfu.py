"""MFU in the logs: FLOPs per step from the step's trace, peaks per device, rates without compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.model.heads import response_logprobs
from haf_jax.training import flops
from haf_jax.training.metrics import Throughput


def mlp_loss(w1, w2, x):
    return jnp.sum(jnp.tanh(x @ w1) @ w2)


MLP_ARGS = (
    jax.ShapeDtypeStruct((256, 512), jnp.float32),
    jax.ShapeDtypeStruct((512, 128), jnp.float32),
    jax.ShapeDtypeStruct((64, 256), jnp.float32),
)


def test_matmul_flops_match_xla_and_the_formula_without_loops():
    grad = jax.jit(jax.value_and_grad(mlp_loss, argnums=(0, 1)))
    counted = flops.jaxpr_flops(grad.trace(*MLP_ARGS).jaxpr)
    forward = 2 * 64 * 256 * 512 + 2 * 64 * 512 * 128
    # backward: dW1, dW2 and d(hidden) (x needs no gradient) = 1.5 forward's matmuls
    assert counted == forward + 2 * 64 * 256 * 512 + 2 * 64 * 512 * 128 + 2 * 64 * 128 * 512
    xla = grad.lower(*MLP_ARGS).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert counted == pytest.approx(xla["flops"], rel=0.03)  # XLA adds the elementwise work


def test_loops_count_by_trips_where_xla_counts_one():
    """Every position a response: the chunk loop's FLOPs x the chunks it ran are the whole head's,
    whatever the chunking; XLA's cost analysis counts one trip (why the trace is counted)."""
    n, length, d, v = 2, 257, 32, 500
    args = (
        jax.ShapeDtypeStruct((v, d), jnp.float32),
        jax.ShapeDtypeStruct((n, length, d), jnp.float32),
        jax.ShapeDtypeStruct((n, length), jnp.int32),
        jax.ShapeDtypeStruct((n, length), jnp.float32),
    )
    ones = np.ones((n, length), np.float32)
    xla = {}
    for chunk in (256, 64, 16):
        fn = jax.jit(lambda w, h, t, m, c=chunk: response_logprobs(w, h, t, m, jnp.ones_like(t, bool), 1, chunk=c))
        fixed, per_chunk = flops.step_flops(fn.trace(*args).jaxpr)
        chunks = fn(jnp.ones((v, d)), jnp.ones((n, length, d)), jnp.ones((n, length), jnp.int32), ones)[2]
        assert float(chunks) == n * 256 / chunk  # both rows' positions, flattened
        assert fixed + per_chunk * float(chunks) == 2 * n * (length - 1) * d * v  # 2 x 256 positions
        cost = fn.lower(*args).compile().cost_analysis()
        xla[chunk] = (cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"]
    assert xla[16] < xla[256] / 8


def test_chunks_that_did_not_run_are_not_counted():
    """Only response positions reach the LM head; a step's FLOPs count the chunks that ran
    (fixed + per_chunk x chunks), forward and backward."""
    n, length, d, v, chunk = 2, 65, 8, 300, 16  # 2 x 64 predicting positions, chunks of 16
    rng = np.random.default_rng(0)
    head = jnp.asarray(rng.normal(size=(v, d)), jnp.float32)
    hidden = jnp.asarray(rng.normal(size=(n, length, d)), jnp.float32)
    tokens = jnp.asarray(rng.integers(0, v, (n, length)), jnp.int32)

    def loss(w, h, mask):
        logp, _, chunks = response_logprobs(w, h, tokens, mask, jnp.ones_like(tokens, bool), 1, chunk=chunk)
        return jnp.sum(logp), chunks

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    mask = np.zeros((n, length), np.int32)
    mask[0, 40:50], mask[1, 5:9] = 1, 1  # 14 response tokens: one chunk holds them all
    assert float(grad(head, hidden, mask)[0][1]) == 1.0
    mask[0, 10:13] = 1  # 17: two chunks
    assert float(grad(head, hidden, mask)[0][1]) == 2.0
    fixed, per_chunk = flops.step_flops(grad.trace(head, hidden, mask).jaxpr)
    block = chunk
    # forward; backward: recomputed logits, the head's and the hidden states' gradients
    assert fixed == 0.0 and per_chunk == 4 * 2 * block * d * v
    assert flops.flops_of((fixed, per_chunk), {"logprob_chunks": 2.0}) == 2 * 4 * 2 * block * d * v
    assert flops.flops_of((fixed, per_chunk), {}) == 0.0  # no log-probs (Baseline): none counted


def test_counted_step_compiles_once_per_shape_and_reports_its_flops():
    fn = flops.CountedStep(jax.jit(mlp_loss))
    w1, w2 = jnp.ones((256, 512)) / 256, jnp.ones((512, 128)) / 512
    x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 256)), jnp.float32)
    assert float(fn(w1, w2, x)) == float(jax.jit(mlp_loss)(w1, w2, x))  # the same program
    assert fn.last_flops == (2 * 64 * 256 * 512 + 2 * 64 * 512 * 128, 0.0)
    fn(w1, w2, x + 1)
    fn(w1, w2, x[:32])
    assert len(fn._compiled) == 2 and fn.last_flops == (2 * 32 * 256 * 512 + 2 * 32 * 512 * 128, 0.0)


def test_mfu_is_flops_over_time_and_peak_and_leaves_compilation_out():
    now = [0.0]
    meter = Throughput(lambda: now[0], peak_flops=1e12)
    meter.dispatched((4, 2, 64))
    now[0] += 40.0  # the compiling first step: its FLOPs and time stay out of the rate
    meter.arrived(4, 400, compiles=True, flops=3e11)
    assert "mfu" not in meter.rates()
    for step_s in (0.5, 1.5):
        now[0] += step_s
        meter.arrived(4, 400, compiles=False, flops=3e11)
    r = meter.rates()
    assert r["step_s"] == 1.0 and r["mfu"] == pytest.approx(3e11 / (1.0 * 1e12))
    assert "mfu" not in Throughput(lambda: 0.0).rates()  # no peak known: no MFU


def test_peaks_by_device_kind():
    class Dev:
        def __init__(self, kind, platform="tpu"):
            self.device_kind, self.platform, self.process_index = kind, platform, 0

    assert flops.peak_flops([Dev("TPU v5 lite")] * 8)[0] == 8 * 197e12
    assert flops.peak_flops([Dev("TPU v5p")] * 4)[0] == 4 * 459e12
    assert flops.peak_flops([Dev("NVIDIA H100 80GB HBM3", "gpu")])[0] == 989e12
    assert flops.peak_flops([Dev("NVIDIA H100 PCIe", "gpu")])[0] == 756e12
    peak, source = flops.peak_flops([Dev("Some NPU", "npu")])
    assert peak is None and "unknown" in source
    peak, source = flops.peak_flops(jax.devices("cpu"))
    assert peak > 1e8 and "measured" in source  # this host's float32 matmul rate, shared by its fake devices
