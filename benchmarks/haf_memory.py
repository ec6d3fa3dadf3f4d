"""HaF's extra memory over Baseline, before and after the vocabulary-split LM head (issue 12 item 3).

Compiles the real train step ahead of time (haf_jax.plan: no TPU, no weights) for
  Baseline (no LM head) | HaF with the log-prob head as it was | HaF as it is now
and prints XLA's per-chip temporaries and the HaF / Baseline ratios, all in one run.

    python benchmarks/haf_memory.py                       # gemma-2b, v5litepod-8, 16 pairs x 2 x 512
    python benchmarks/haf_memory.py --layers 2            # same widths and 256k vocabulary, 2 layers (quick)

"As it was": the log-prob head before the change (kept below verbatim), where GSPMD
follows the FSDP layout of the tied embedding (embed split over chips) into the chunk loop: the
whole head is all-gathered in bf16 (1 GiB for 256k x 2048) and its gradient accumulated whole in
float32 (2 GiB) on every chip. Now the head is split by vocabulary over all chips for the
log-prob computation (sharding.RULES["logit_vocab"]) and each hidden chunk is gathered instead.
Each compile of gemma-2b for v5e takes 1.5-8 minutes on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import sys

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
ROOT = pathlib.Path(__file__).resolve().parents[1]
GiB = 2**30


def sequence_logprobs_before(
    head_VxD, hidden_NxLxD, tokens_NxL, response_mask_NxL, *, bias_V=None, final_logit_softcap=None, chunk=128
):
    """heads.sequence_logprobs as of commit 0b85b5c (no sharding constraints, gather of the target)."""
    import jax
    import jax.numpy as jnp

    from haf_jax.model.lm_logprobs import head_logits

    n, length, d = hidden_NxLxD.shape
    hidden = hidden_NxLxD[:, :-1]
    targets = tokens_NxL[:, 1:]
    mask = response_mask_NxL[:, 1:].astype(jnp.float32)
    chunk = max(1, min(chunk, length - 1))
    n_chunks = -(-(length - 1) // chunk)
    pad = n_chunks * chunk - (length - 1)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        mask = jnp.pad(mask, ((0, 0), (0, pad)))
    split = lambda x: jnp.moveaxis(x.reshape(n, n_chunks, chunk, *x.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_logprob(h_NxCxD, t_NxC, m_NxC):
        logits = head_logits(h_NxCxD, head_VxD, bias_V, final_logit_softcap)
        target_logit = jnp.take_along_axis(logits, t_NxC[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return jnp.sum(logp * m_NxC, axis=-1)

    def body(total_N, xs):
        return total_N + chunk_logprob(*xs), None

    total_N, _ = jax.lax.scan(body, jnp.zeros((n,), jnp.float32), (split(hidden), split(targets), split(mask)))
    return total_N, jnp.sum(mask, axis=-1)


def gemma_config(preset: str):
    spec = importlib.util.spec_from_file_location("haf_jax_configs_gemma", ROOT / "configs" / "gemma.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(preset)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gemma-2b")
    parser.add_argument("--topology", default="v5litepod-8")
    parser.add_argument("--layers", type=int, default=0, help="keep only the first N layers (0: all)")
    parser.add_argument("--chunk", type=int, default=0, help="model.logprob_chunk (0: the config's)")
    args = parser.parse_args()

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_platforms", "cpu")  # nothing runs: the TPU programs are only compiled
    from haf_jax.model import families, heads
    from haf_jax.training import planning as plan_lib

    config = gemma_config(args.preset)
    if args.layers:
        base = families.PRESETS[args.preset]
        name = f"{args.preset}-first{args.layers}"
        families.PRESETS[name] = dataclasses.replace(
            base, num_layers=args.layers, layer_types=base.layer_types[: args.layers]
        )
        config.model.preset = name
    if args.chunk:
        config.model.logprob_chunk = args.chunk
    now = heads.response_logprobs

    def before(head, hidden, tokens, mask, segments, num_segments, **kw):
        """The old head in response_logprobs' place (unpacked rows: one sequence each)."""
        logp, count = sequence_logprobs_before(head, hidden, tokens, mask, **kw)
        return logp[:, None], count[:, None], jnp.float32(0.0)

    runs = {}
    for label, objective, head_fn in (
        ("baseline", "baseline", now),
        ("haf_before", "haf", before),
        ("haf_after", "haf", now),
    ):
        config.loss.objective = objective
        heads.response_logprobs = head_fn  # forward_pairs looks it up at trace time
        try:
            report = plan_lib.plan(config, args.topology)
        finally:
            heads.response_logprobs = now
        runs[label] = report["bytes_per_chip"] | {"compile_s": report["compile_s"], "fits": report["fits"]}
        b = runs[label]
        print(
            f"{label:11s} temporaries {b['temporaries'] / GiB:6.3f} GiB  arguments {b['arguments'] / GiB:6.3f} GiB  "
            f"total {b['total'] / GiB:6.3f} GiB  (compile {report['compile_s']} s)",
            flush=True,
        )
    base = runs["baseline"]["temporaries"]
    ratios = {k: runs[k]["temporaries"] / base for k in ("haf_before", "haf_after")}
    print(
        f"{config.model.preset} on {args.topology}, {config.train.batch_size} pairs x 2 x {config.data.max_length}, "
        f"{config.model.compute_dtype}, remat={config.model.remat}, mesh {tuple(config.mesh.shape)}, "
        f"logprob_chunk {config.model.logprob_chunk}"
    )
    print(
        f"HaF / Baseline temporaries per chip: before {ratios['haf_before']:.2f}x, after {ratios['haf_after']:.2f}x "
        f"(goal <= 1.15x)"
    )
    print(
        json.dumps(
            {
                "preset": config.model.preset,
                "topology": args.topology,
                "runs": runs,
                "ratio_before": ratios["haf_before"],
                "ratio_after": ratios["haf_after"],
            }
        )
    )


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
