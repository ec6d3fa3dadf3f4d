"""Peak temporary memory of the policy log-prob head: chunked (heads.response_logprobs) vs naive.

Gemma-2b shapes: 2 pairs x 1024 tokens (N = 4 sequences), D = 2048, V = 256000. Only the head is
compiled: bf16 hidden states + float32 tied embedding + tokens + response mask -> summed log-prob
loss, under jax.value_and_grad (w.r.t. hidden and embedding), since the backward pass is where
full [N, L, V] float32 logits (4 GiB here, plus their softmax and gradient) hurt. Nothing is
allocated: the programs are lowered from jax.ShapeDtypeStruct and compiled ahead of time, and
XLA's memory_analysis() reports their buffers.

On the CPU backend XLA upcasts the bf16 embedding to float32 for the dots (a hoisted ~2 GiB copy
next to the 1 GiB bf16 one), so CPU "chunked" numbers carry ~3 GiB that GPU/TPU do not; with
float32 inputs the chunked head needs ~0.55 GiB temp (hidden-only gradient, chunk 64) on CPU.
Gradients w.r.t. the embedding also need a [V, D] accumulator (2 GiB float32) however it is chunked.

    python benchmarks/logprob_memory.py [--chunks 64,128,512]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from haf_jax.model.heads import response_logprobs

N, L, D, V = 4, 1024, 2048, 256_000


def naive_loss(hidden_NxLxD, embedding_VxD, tokens_NxL, mask_NxL):
    logits_NxLxV = jnp.einsum(
        "nld,vd->nlv",
        hidden_NxLxD[:, :-1],
        embedding_VxD.astype(hidden_NxLxD.dtype),
        preferred_element_type=jnp.float32,
    )
    logp = jax.nn.log_softmax(logits_NxLxV, axis=-1)
    target = jnp.take_along_axis(logp, tokens_NxL[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(target * mask_NxL[:, 1:])


def chunked_loss(hidden_NxLxD, embedding_VxD, tokens_NxL, mask_NxL, chunk):
    logp_Nx1, _, _ = response_logprobs(
        embedding_VxD.astype(hidden_NxLxD.dtype),
        hidden_NxLxD,
        tokens_NxL,
        mask_NxL,
        jnp.ones(tokens_NxL.shape, bool),
        1,
        chunk=chunk,
    )
    return -jnp.sum(logp_Nx1)


def memory(loss_fn, argnums=(0, 1)):
    args = (
        jax.ShapeDtypeStruct((N, L, D), jnp.bfloat16),
        jax.ShapeDtypeStruct((V, D), jnp.float32),
        jax.ShapeDtypeStruct((N, L), jnp.int32),
        jax.ShapeDtypeStruct((N, L), jnp.float32),
    )
    compiled = jax.jit(jax.value_and_grad(loss_fn, argnums=argnums)).lower(*args).compile()
    return compiled.memory_analysis()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="64,128,512", help="comma-separated chunk lengths to measure")
    chunks = [int(c) for c in parser.parse_args().chunks.split(",")]
    for argnums, what in (((0, 1), "hidden and embedding"), ((0,), "hidden only")):
        report(chunks, argnums, what)


def report(chunks, argnums, what):
    gib = 2.0**30
    print(f"--- gradients w.r.t. {what}")
    print(f"backend={jax.default_backend()}  N={N} (2 pairs) L={L} D={D} V={V}; value_and_grad of the head")
    print(f"full float32 logits [N, L, V] alone: {N * (L - 1) * V * 4 / gib:.2f} GiB")
    naive = memory(naive_loss, argnums)
    print(
        f"naive          temp {naive.temp_size_in_bytes / gib:8.3f} GiB  "
        f"(arguments {naive.argument_size_in_bytes / gib:.3f} GiB, outputs {naive.output_size_in_bytes / gib:.3f} GiB)"
    )
    for chunk in chunks:
        stats = memory(lambda h, e, t, m, c=chunk: chunked_loss(h, e, t, m, c), argnums)
        print(
            f"chunked c={chunk:<4d} temp {stats.temp_size_in_bytes / gib:8.3f} GiB  "
            f"ratio naive/chunked {naive.temp_size_in_bytes / max(stats.temp_size_in_bytes, 1):6.1f}x"
        )


if __name__ == "__main__":
    main()
