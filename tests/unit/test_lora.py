"""LoRA: the adapted forward, its gradient, what the optimizer holds, and the PEFT layout."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.core import forward, sharding
from haf_jax.core.optim import make_optimizer
from haf_jax.model import heads, lora as lora_lib
from haf_jax.model.families import PRESETS
from haf_jax.training import step as step_lib

CONFIG = dataclasses.replace(PRESETS["tiny"], vocab_size=64)
LORA = lora_lib.LoraConfig(rank=4, alpha=8.0)


def _batch(rng, b=2, length=12):
    tokens = rng.integers(3, CONFIG.vocab_size, (b, 2, length)).astype(np.int32)
    mask = np.zeros((b, 2, length), np.int32)
    mask[:, :, 5:] = 1
    return {"tokens": tokens, "response_mask": mask, "last_index": np.full((b, 2), length - 1, np.int32)}


def test_targets_and_errors():
    assert sorted(lora_lib.targets(CONFIG, LORA)) == [
        f"layers_{i}/mlp/{p}" for i in range(2) for p in ("down_proj", "gate_proj", "up_proj")
    ]
    attn = lora_lib.targets(CONFIG, dataclasses.replace(LORA, targets=r"layers\.1\.self_attn\.(q|o)_proj"))
    assert attn == {"layers_1/self_attn/q_proj": (64, 64), "layers_1/self_attn/o_proj": (64, 64)}
    with pytest.raises(ValueError, match="matches no projection matrix"):
        lora_lib.targets(CONFIG, dataclasses.replace(LORA, targets="nothing_here"))
    with pytest.raises(ValueError, match="not projection matrices.*embed_tokens"):
        lora_lib.targets(CONFIG, dataclasses.replace(LORA, targets="embed_tokens"))
    with pytest.raises(ValueError, match="only 0 is supported"):
        lora_lib.LoraConfig(rank=4, dropout=0.1)
    assert lora_lib.trainable_heads(CONFIG, dataclasses.replace(LORA, train_lm_head=True)) == (
        "reward_head",
        "embed_tokens",
    )  # Gemma's LM head is the embedding


def test_adapted_forward_starts_at_the_base_and_its_gradient_is_right():
    params = heads.init_params(CONFIG, jax.random.key(0))
    trainable, frozen = lora_lib.split(params, CONFIG, LORA, jax.random.key(1))
    merged = lora_lib.merge(trainable, frozen, LORA)
    jax.tree.map(np.testing.assert_array_equal, merged, params)  # B = 0: exactly the base model

    batch = _batch(np.random.default_rng(0))
    # Move B off zero so that both A and B have a non-zero gradient, then compare the gradient of
    # the adapted forward with central finite differences (float32, as the heads compute; the
    # step is large enough that rounding stays far below the tolerance).
    rng = np.random.default_rng(1)
    trainable["lora"] = jax.tree.map(
        lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32), trainable["lora"]
    )
    trainable["reward_head"] = trainable["reward_head"] + 0.1

    def loss(t):
        out = heads.forward_pairs(lora_lib.merge(t, frozen, LORA), CONFIG, batch, chunk=4)
        return jnp.sum(out.logp_Bx2) * 1e-2 + jnp.sum(out.reward_Bx2 * jnp.array([1.0, -2.0]))

    grads, f, eps = jax.jit(jax.grad(loss))(trainable), jax.jit(loss), 1e-2
    for path, index in (
        (("lora", "layers_0", "mlp", "up_proj", "a"), (3, 1)),
        (("lora", "layers_1", "mlp", "down_proj", "b"), (2, 5)),
        (("lora", "layers_0", "mlp", "gate_proj", "b"), (0, 7)),
    ):

        def shifted(d, path=path, index=index):
            t = jax.tree.map(lambda x: x, trainable)
            node = t
            for key in path[:-1]:
                node = node[key]
            node[path[-1]] = node[path[-1]].at[index].add(d)
            return t

        numeric = (f(shifted(eps)) - f(shifted(-eps))) / (2 * eps)
        analytic = grads
        for key in path:
            analytic = analytic[key]
        analytic = float(analytic[index])
        assert abs(analytic) > 1e-3, path
        np.testing.assert_allclose(analytic, float(numeric), rtol=2e-2, err_msg=str(path))
    # frozen weights have no gradient at all: the gradient tree is the trainable tree
    assert jax.tree.structure(grads) == jax.tree.structure(trainable)


def _compiled_step(lora):
    mesh = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = forward.StepConfig(PRESETS["tiny"], forward.LossConfig(), lora=lora)
    opt = make_optimizer(learning_rate=1e-3, total_steps=10)
    from haf_jax.core import params as params_lib

    _, abstract = step_lib.state_layout(cfg.model, opt, mesh, lora)
    psh = params_lib.param_shardings(cfg.model, mesh)
    fn, keys = step_lib.jit_train_step(
        cfg, opt, mesh, jax.tree.map(lambda x: x.sharding, abstract), psh, live_reference=False
    )
    full = params_lib.abstract_params(cfg.model, mesh)
    frozen = (
        None
        if not lora.enabled
        else {k: v for k, v in full.items() if k not in lora_lib.trainable_heads(cfg.model, lora)}
    )
    b, length = 4, 64
    batch = {
        "tokens": jax.ShapeDtypeStruct((b, 2, length), jnp.int32),
        "response_mask": jax.ShapeDtypeStruct((b, 2, length), jnp.int32),
        "last_index": jax.ShapeDtypeStruct((b, 2), jnp.int32),
        "valid": jax.ShapeDtypeStruct((b,), jnp.bool_),
        "ref_logp": jax.ShapeDtypeStruct((b, 2), jnp.float32),
    }
    compiled = fn.lower(abstract, {k: batch[k] for k in keys}, None, frozen).compile()
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract["opt_state"]))
    return opt_bytes, compiled.memory_analysis()


def test_lora_step_holds_optimizer_state_for_adapters_only():
    """Frozen weights get no gradient and no Adam moments: measured on the compiled steps."""
    full_opt, full_mem = _compiled_step(lora_lib.LoraConfig())
    lora_opt, lora_mem = _compiled_step(LORA)
    n_trainable = sum(2 * 4 * (i + o) for i, o in lora_lib.targets(PRESETS["tiny"], LORA).values()) // 2 + 64
    assert lora_opt == 2 * 4 * n_trainable + 8  # mu, nu of adapters + reward head; int32 counts (Adam, schedule)
    assert lora_opt < 0.15 * full_opt, (lora_opt, full_opt)
    # The compiled step's outputs are the new state: for LoRA, adapters + head + their moments.
    assert lora_mem.output_size_in_bytes < 0.2 * full_mem.output_size_in_bytes
    print(
        f"optimizer state: LoRA {lora_opt} B vs full {full_opt} B ({lora_opt / full_opt:.3f}); compiled step "
        f"outputs {lora_mem.output_size_in_bytes} vs {full_mem.output_size_in_bytes} B, temporaries "
        f"{lora_mem.temp_size_in_bytes} vs {full_mem.temp_size_in_bytes} B"
    )
