"""Ahead-of-time compilation for a real TPU topology, without a TPU: libtpu (the `tpu` extra)
compiles for `v5e:2x4`'s 8 abstract chips, and the compiled step's memory analysis says what each
chip would hold."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU topologies")


def _v5e_8():
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server outside Google Cloud
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices


def test_haf_step_state_is_sharded_like_the_parameters_on_v5e_8():
    """gemma-2b's widths (256k vocabulary, 8 heads of 256, MLP 16384) on 2 layers, HaF, bf16,
    remat, 16 pairs x 2 x 128 tokens, FSDP over 8 chips: each chip's arguments are ~1/8 of the
    state (Adam's moments are not replicated), and the step fits a v5e chip's 16 GiB."""
    from haf_jax.core import forward, params as params_lib, sharding
    from haf_jax.core.optim import make_optimizer
    from haf_jax.model.families import preset
    from haf_jax.training import step as step_lib

    devices = _v5e_8()
    assert len(devices) == 8 and "v5" in devices[0].device_kind.lower()
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    model = dataclasses.replace(preset("gemma-2b"), num_layers=2, layer_types=(), remat=True)
    cfg = forward.StepConfig(model, forward.LossConfig(objective="haf"), compute_dtype=jnp.bfloat16)
    opt = make_optimizer(learning_rate=1e-5, total_steps=100)
    _, abstract = step_lib.state_layout(model, opt, mesh)
    fn, keys = step_lib.jit_train_step(
        cfg,
        opt,
        mesh,
        jax.tree.map(lambda x: x.sharding, abstract),
        params_lib.param_shardings(model, mesh),
        live_reference=False,
    )
    b, length = 16, 128
    dims = {
        "tokens": (b, 2, length),
        "response_mask": (b, 2, length),
        "last_index": (b, 2),
        "valid": (b,),
        "ref_logp": (b, 2),
    }
    dtypes = {"valid": jnp.bool_, "ref_logp": jnp.float32}
    shardings = forward.batch_shardings(mesh, keys)
    batch = {k: jax.ShapeDtypeStruct(dims[k], dtypes.get(k, jnp.int32), sharding=shardings[k]) for k in keys}
    memory = fn.lower(abstract, batch, None, None).compile().memory_analysis()

    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    per_chip = memory.argument_size_in_bytes
    print(
        f"v5e:2x4 HaF step: state {state_bytes / 2**30:.2f} GiB in total; per chip arguments "
        f"{per_chip / 2**30:.3f} GiB, temporaries {memory.temp_size_in_bytes / 2**30:.3f} GiB"
    )
    assert state_bytes / 8 <= per_chip < 1.1 * state_bytes / 8
    assert per_chip + memory.temp_size_in_bytes < 15.75 * 2**30
    # The LM head's log-probs run split by vocabulary: no chip holds the whole head's float32
    # gradient (2 GiB here, the bound), nor the whole head gathered (1 GiB bf16), as both did before.
    assert memory.temp_size_in_bytes < model.vocab_size * model.hidden_size * 4
