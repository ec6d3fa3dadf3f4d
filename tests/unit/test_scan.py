"""Scanned layers (model.scan_layers): the stacked layout, and the same numbers as the per-layer model.

The test model repeats (sliding, sliding, full) over 8 layers: two scanned periods and two layers
of an incomplete last period, with Gemma 3's q/k norms and separate sliding-layer rope base.
"""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.parity import assert_params_equal, logits as full_logits
from jax.sharding import PartitionSpec as P

from haf_jax.core import forward, params as params_lib, sharding
from haf_jax.core.optim import make_optimizer
from haf_jax.model import heads, hf, layers, lora as lora_lib, scan
from haf_jax.model.config import FULL, SLIDING, ModelConfig
from haf_jax.model.families import PRESETS, preset
from haf_jax.training import step as step_lib

decode = jax.jit(heads.decode, static_argnums=1)

S, F = SLIDING, FULL
BASE = dataclasses.replace(
    preset("tiny"),
    family="gemma3",
    vocab_size=128,
    num_layers=8,
    qk_norm=True,
    layer_types=(S, S, F, S, S, F, S, S),
    sliding_window=4,
    rope_theta=10_000.0,
    local_rope_theta=100.0,
    attn_logit_softcap=None,
)  # Gemma 3 has no attention soft-cap
SCANNED = dataclasses.replace(BASE, scan_layers=True)
TOL = dict(rtol=1e-5, atol=1e-5)


def _close(got, want, **tol):
    jax.tree.map(lambda g, w: np.testing.assert_allclose(np.asarray(g), np.asarray(w), **(tol or TOL)), got, want)


@pytest.fixture(scope="module")
def params():
    """(per-layer params, the same stacked), with every weight perturbed (zero-initialised norms and
    reward head would hide a misplaced layer)."""
    p = jax.jit(heads.init_params, static_argnums=0)(BASE, jax.random.key(0))
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    p = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return p, scan.stack(p, SCANNED)


def test_layer_patterns_and_old_configs():
    assert (BASE.layer_period, scan.periods(SCANNED), scan.scanned_layers(SCANNED)) == (3, (3, 2), 6)
    assert scan.scanned_layers(BASE) == 0
    g3, g2 = PRESETS["gemma3-27b"], PRESETS["gemma2-27b"]
    assert (g3.layer_period, scan.scanned_layers(g3)) == (6, 60)  # 62 = 10 x (5 sliding + 1 full) + 2
    assert (g2.layer_period, scan.scanned_layers(g2)) == (2, 46)
    assert PRESETS["gemma-2b"].layer_period == 1
    assert all(c.scan_layers != name.startswith("tiny") for name, c in PRESETS.items())
    old = dataclasses.asdict(BASE)  # a model_config.json written before scanned layers
    del old["scan_layers"], old["remat_policy"]
    assert ModelConfig.from_dict(json.loads(json.dumps(old))) == dataclasses.replace(BASE, remat_policy="nothing")
    with pytest.raises(ValueError, match="remat_policy='all'; allowed: nothing, dots, dots_no_batch"):
        dataclasses.replace(BASE, remat_policy="all")


def test_stacked_layout_names_and_conversions(params):
    per_layer, stacked = params
    shapes, names = heads.abstract_params(SCANNED)
    assert sorted(shapes) == ["embed_tokens", "layers", "layers_6", "layers_7", "norm", "reward_head"]
    assert sorted(shapes["layers"]) == ["block_0", "block_1", "block_2"]
    assert shapes["layers"]["block_1"]["self_attn"]["q_proj"].shape == (2, 64, 4, 16)
    assert names["layers"]["block_1"]["self_attn"]["q_proj"] == P("layers", "embed", "heads", "head_dim")
    assert jax.tree.structure(shapes) == jax.tree.structure(stacked)
    # layer 4 = block_1 of the second period; layer 6 keeps its own name
    np.testing.assert_array_equal(
        stacked["layers"]["block_1"]["mlp"]["up_proj"][1], per_layer["layers_4"]["mlp"]["up_proj"]
    )
    assert_params_equal(scan.unstack(stacked, SCANNED), per_layer)
    assert_params_equal(scan.stack(stacked, SCANNED), stacked)  # already stacked: unchanged
    assert params_lib.param_count(stacked) == params_lib.param_count(per_layer)
    mesh = sharding.make_mesh((1, -1, 1))
    q_sharding = params_lib.param_shardings(SCANNED, mesh)["layers"]["block_1"]["self_attn"]["q_proj"]
    assert q_sharding.spec == P(None, "fsdp", None, None)  # the layers axis is never split
    partial = {k: v for k, v in per_layer.items() if k != "layers_3"}
    with pytest.raises(ValueError, match=r"layers/block_0.*\['layers_3.*absent"):
        scan.stack(partial, SCANNED)


def test_scanned_logits_and_kv_cache_decode_equal_the_per_layer_model(params):
    per_layer, stacked = params
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, BASE.vocab_size, (2, 12)).astype(np.int32)
    last = np.array([11, 6])
    want = full_logits(per_layer, BASE, tokens, last)
    _close(full_logits(stacked, SCANNED, tokens, last), want)
    assert np.abs(np.asarray(want)).max() > 0.1  # not a degenerate all-zero comparison

    def generate(p, config):
        cache = layers.init_cache(config, 2, 12)
        positions = np.broadcast_to(np.arange(10, dtype=np.int32), (2, 10))
        first, cache = decode(p, config, tokens[:, :10], positions, cache)
        nxt, cache = decode(p, config, tokens[:, 10:11], np.full((2, 1), 10, np.int32), cache)
        return first, nxt, cache

    got, ref = generate(stacked, SCANNED), generate(per_layer, BASE)
    assert isinstance(got[2], layers.StackCache) and got[2].stacked[0].key.shape == (2, 2, 12, 2, 16)
    _close(got[:2], ref[:2])
    _close(got[1][0, 0], want[0, 10])  # the cached step equals the full forward (row 0: no padding)
    # the scanned cache holds the per-layer caches: layer 4 at block_1's second slot, layer 7 in rest
    _close(got[2].stacked[1].key[1], ref[2][4].key)
    _close(got[2].rest[1].value, ref[2][7].value)


def _batch(rng, b=2, length=16):
    tokens = rng.integers(3, BASE.vocab_size, (b, 2, length)).astype(np.int32)
    mask = np.zeros((b, 2, length), np.int32)
    mask[:, :, 6:] = 1
    last = rng.integers(10, length, (b, 2)).astype(np.int32)
    return {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": last,
        "valid": np.ones((b,), bool),
        "ref_logp": rng.normal(-30, 2, (b, 2)).astype(np.float32),
    }


def test_three_train_steps_equal_and_a_per_layer_state_resumes_scanned(params):
    per_layer, stacked = params
    mesh = sharding.make_mesh((1, -1, 1), devices=jax.devices()[:2])
    optimizer = make_optimizer(learning_rate=1e-2, total_steps=3)
    rng = np.random.default_rng(1)
    batches = [_batch(rng) for _ in range(3)]

    def setup(config):
        cfg = forward.StepConfig(model=config, loss=forward.LossConfig())
        init, abstract = step_lib.state_layout(config, optimizer, mesh)
        state_sh = jax.tree.map(lambda x: x.sharding, abstract)
        fn, keys = step_lib.jit_train_step(
            cfg, optimizer, mesh, state_sh, params_lib.param_shardings(config, mesh), live_reference=False
        )
        return init, abstract, lambda state, batch: fn(state, forward.put_batch(batch, keys, mesh), None, None)

    def run(step_fn, state, todo):
        losses = []
        for batch in todo:
            state, metrics = step_fn(state, batch)
            losses.append(float(metrics["loss"]))
        return state, losses

    remat = dict(remat=True, remat_policy="dots")  # the scanned step rematerialises with a policy
    init_u, _, step_u = setup(BASE)
    init_s, abstract_s, step_s = setup(dataclasses.replace(SCANNED, **remat))
    state_u, want = run(step_u, init_u(jax.tree.map(jnp.copy, per_layer)), batches)
    state_s, got = run(step_s, init_s(jax.tree.map(jnp.copy, stacked)), batches)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert len(set(want)) == 3  # the weights moved between steps
    # Adam divides by sqrt(v): float noise in a tiny gradient moves a weight by up to ~1e-4 of lr 1e-2
    _close(scan.to_layout(state_s, BASE)["params"], state_u["params"], rtol=0, atol=2e-4)

    # A checkpoint written per layer (runs from before scanned layers) continues scanned.
    state_1, _ = run(step_u, init_u(jax.tree.map(jnp.copy, per_layer)), batches[:1])
    moved = params_lib.relayout(state_1, SCANNED, abstract_s)
    assert moved["opt_state"][1][0].mu["layers"]["block_2"]["mlp"]["up_proj"].shape == (2, 64, 256)
    _, resumed = run(step_s, moved, batches[1:])
    np.testing.assert_allclose(resumed, want[1:], rtol=1e-5)


def test_hf_export_and_import_with_scanned_layers(params, tmp_path):
    import torch
    import transformers as T

    _, stacked = params
    hf.save_hf(stacked, SCANNED, tmp_path / "policy", kind="policy")
    config, _ = hf.load_hf_config(tmp_path / "policy")
    assert config == dataclasses.replace(BASE, pad_token_id=0)  # HF names each layer; layout is ours to pick
    back, _ = hf.load_params(tmp_path / "policy", SCANNED)
    assert_params_equal(back, stacked, zero_reward_head=True)
    per_layer, _ = hf.load_params(tmp_path / "policy", BASE)
    assert_params_equal(per_layer, scan.unstack(stacked, SCANNED), zero_reward_head=True)
    # an independent reference: transformers runs the exported layers in their HF order
    model = T.AutoModelForCausalLM.from_pretrained(tmp_path / "policy", attn_implementation="eager")
    tokens = np.random.default_rng(3).integers(3, BASE.vocab_size, (1, 12)).astype(np.int32)
    with torch.no_grad():
        want = model(input_ids=torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    _close(full_logits(stacked, SCANNED, tokens, np.array([11])), want, rtol=0, atol=1e-4)


def test_lora_on_scanned_layers(params, tmp_path):
    per_layer, stacked = params
    lora = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=r"(mlp\.up_proj|self_attn\.q_proj)\.weight$")
    targets = lora_lib.targets(SCANNED, lora)
    assert targets["layers/block_2/self_attn/q_proj"] == (64, 64) and "layers_7/mlp/up_proj" in targets
    assert len(targets) == 2 * 3 + 2 * 2  # 3 stacked block positions and 2 trailing layers, 2 matrices each
    rng = jax.random.key(5)
    adapters = lora_lib.init_adapters(SCANNED, lora, rng)
    assert_params_equal(adapters, scan.stack(lora_lib.init_adapters(BASE, lora, rng), SCANNED))
    shapes, names = lora_lib.abstract_trainable(SCANNED, lora)
    assert jax.tree.map(lambda s: s.shape, shapes["lora"]) == jax.tree.map(lambda a: a.shape, adapters)
    assert names["lora"]["layers"]["block_0"]["self_attn"]["q_proj"]["a"] == P("layers", "embed", None)
    # trained adapters (B no longer zero): the merged weights equal the per-layer merge
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    merged = lora_lib.merge({"lora": adapters}, stacked, lora)
    merged_per_layer = lora_lib.merge({"lora": scan.unstack(adapters, SCANNED)}, per_layer, lora)
    _close(scan.unstack(merged, SCANNED), merged_per_layer, rtol=1e-6, atol=1e-6)
    assert not np.allclose(
        merged["layers"]["block_0"]["mlp"]["up_proj"], stacked["layers"]["block_0"]["mlp"]["up_proj"]
    )
    # the PEFT export names every layer, as the per-layer model's does
    hf.save_peft_adapter(adapters, SCANNED, lora, tmp_path / "scanned")
    hf.save_peft_adapter(scan.unstack(adapters, SCANNED), BASE, lora, tmp_path / "per_layer")
    from safetensors.numpy import load_file

    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("scanned", "per_layer"))
    assert sorted(a) == sorted(b) and "base_model.model.model.layers.4.mlp.up_proj.lora_A.weight" in a
    jax.tree.map(np.testing.assert_array_equal, a, b)
    with pytest.raises(ValueError, match="only some of the scanned layers"):
        lora_lib.targets(SCANNED, dataclasses.replace(lora, targets=r"layers\.1\.mlp\.up_proj"))
