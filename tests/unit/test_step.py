"""The jitted train/eval steps: initial-step values, sharding equivalence, reference modes, learning."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.core import forward, params as params_lib, sharding
from haf_jax.core.optim import make_optimizer
from haf_jax.evaluation import evaluator as evaluation
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib

MODEL = dataclasses.replace(preset("tiny"), vocab_size=64, sliding_window=8)
BOS, EOS, PAD = 2, 1, 0


def synthetic_pairs(rng: np.random.Generator, n: int, length: int = 24):
    """A preference rule a tiny model can learn: chosen responses use tokens 10..36, rejected 37..63.

    Prompts are shared random tokens; responses have random lengths; rows are right-padded.
    """
    tokens = np.full((n, 2, length), PAD, np.int32)
    mask = np.zeros((n, 2, length), np.int32)
    last = np.zeros((n, 2), np.int32)
    for i in range(n):
        prompt = rng.integers(4, 64, rng.integers(3, 8))
        for side, (lo, hi) in enumerate(((10, 37), (37, 64))):
            resp = rng.integers(lo, hi, rng.integers(2, 8))
            ids = np.concatenate([[BOS], prompt, resp, [EOS]])
            tokens[i, side, : len(ids)] = ids
            mask[i, side, 1 + len(prompt) : len(ids)] = 1
            last[i, side] = len(ids) - 1
    return {
        "tokens": tokens,
        "response_mask": mask,
        "last_index": last,
        "valid": np.ones((n,), bool),
        "index": np.arange(n),
    }


@functools.cache  # each distinct set-up compiles once for the whole module
def make(objective="haf", mesh_shape=(1, 1, 1), live=False, grad_accum=1, lr=3e-3, steps=100, bf16_remat=False):
    mesh = sharding.make_mesh(mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    model = dataclasses.replace(MODEL, remat=bf16_remat)
    cfg = forward.StepConfig(
        model,
        forward.LossConfig(objective=objective),
        logprob_chunk=8,
        grad_accum=grad_accum,
        compute_dtype=jnp.bfloat16 if bf16_remat else jnp.float32,
    )
    opt = make_optimizer(learning_rate=lr, total_steps=steps)
    init_state, abstract = step_lib.state_layout(MODEL, opt, mesh)
    psh = params_lib.param_shardings(MODEL, mesh)
    train_fn, keys = step_lib.jit_train_step(
        cfg, opt, mesh, jax.tree.map(lambda x: x.sharding, abstract), psh, live_reference=live
    )
    eval_fn = jax.jit(
        sharding.under_mesh(
            functools.partial(
                evaluation.pair_scores, cfg=cfg, reward=objective != "dpo", policy=objective != "baseline"
            ),
            mesh,
        )
    )
    ref_fn, ref_keys = forward.jit_reference(cfg, mesh, psh)
    params0 = params_lib.init_params(MODEL, jax.random.key(0), mesh)
    return dict(
        mesh=mesh,
        cfg=cfg,
        init_state=init_state,
        train=train_fn,
        keys=keys,
        eval=eval_fn,
        ref=ref_fn,
        ref_keys=ref_keys,
        params0=params0,
        psh=psh,
    )


def put(batch, keys, mesh):
    shs = forward.batch_shardings(mesh, keys)
    return {k: jax.device_put(np.asarray(batch[k]), shs[k]) for k in keys}


def fresh_state(r):
    """A new train state from a copy of the shared initial weights (the state gets donated)."""
    return r["init_state"](jax.tree.map(jnp.copy, r["params0"]))


def with_ref(r, batch):
    ref = np.asarray(r["ref"](r["params0"], put(batch, r["ref_keys"], r["mesh"])))
    return {**batch, "ref_logp": ref}


def test_first_step_is_ln2_and_zero_accuracy():
    r = make("haf")
    batch = with_ref(r, synthetic_pairs(np.random.default_rng(0), 8))
    state = fresh_state(r)
    _, m = r["train"](state, put(batch, r["keys"], r["mesh"]), None, None)
    m = jax.device_get(m)
    assert m["reward_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["policy_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["loss"] == pytest.approx(1.2 * math.log(2), abs=1e-6)
    assert m["reward_accuracy"] == 0.0 and m["dpo_accuracy"] == 0.0
    assert m["finite"] == 1.0


def test_train_step_8_devices_equals_1_device():
    batch = synthetic_pairs(np.random.default_rng(1), 8)
    results = []
    for shape in ((2, 2, 2), (1, 1, 1)):
        r = make("haf", shape)
        b = with_ref(r, batch)
        state = fresh_state(r)
        for _ in range(2):
            state, m = r["train"](state, put(b, r["keys"], r["mesh"]), None, None)
        results.append((jax.device_get(state["params"]), jax.device_get(m)))
    (p8, m8), (p1, m1) = results
    for k in ("loss", "reward_loss", "policy_loss", "grad_norm"):
        assert m8[k] == pytest.approx(m1[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)


def test_precomputed_and_live_reference_give_same_losses():
    batch = synthetic_pairs(np.random.default_rng(2), 8)
    out = []
    for live in (False, True):
        r = make("haf", live=live)
        b = batch if live else with_ref(r, batch)
        state = fresh_state(r)
        ms = []
        for _ in range(3):  # after the first update, policy != reference
            state, m = r["train"](state, put(b, r["keys"], r["mesh"]), r["params0"] if live else None, None)
            ms.append(jax.device_get(m))
        out.append(ms)
    for a, b in zip(*out):
        for k in ("loss", "policy_loss", "dpo_accuracy"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), k
    assert out[0][-1]["policy_loss"] != pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("objective", ["baseline", "haf", "dpo"])
@pytest.mark.parametrize("invalid", [(), (1, 2, 6)], ids=["all-valid", "invalid-rows"])
def test_gradient_accumulation_matches_full_batch(objective, invalid):
    """4 micro-batches give the full batch's update and metrics, for each objective, also when filler
    rows (valid=False, as in a packed batch) leave the micro-batches unequal: micro-batch j takes rows
    j, j + 4, so rows 1, 2, 6 leave 1, 1, 0 and 2 real pairs in micro-batches 1, 2, 3 and 0."""
    batch = synthetic_pairs(np.random.default_rng(3), 8)
    batch["valid"][list(invalid)] = False
    batch = with_ref(make(objective), batch)
    params, metrics = [], []
    for accum in (1, 4):
        r = make(objective, grad_accum=accum)
        state = fresh_state(r)
        for _ in range(2):
            state, m = r["train"](state, put(batch, r["keys"], r["mesh"]), None, None)
        params.append(jax.device_get(state["params"]))
        metrics.append(jax.device_get(m))
    for k in ("loss", "reward_loss", "policy_loss", "reward_accuracy", "dpo_accuracy", "grad_norm", "num_pairs"):
        assert metrics[1][k] == pytest.approx(metrics[0][k], rel=1e-5, abs=1e-6), k
    assert metrics[0]["num_pairs"] == 8 - len(invalid)
    for a, b in zip(*map(jax.tree.leaves, params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_non_finite_loss_keeps_state_and_reports():
    """Finite weights and one NaN reference log-prob: the loss and every gradient are NaN, so an update
    would turn every trained weight NaN; the step keeps the weights and moments it was given."""
    r = make("haf")
    batch = with_ref(r, synthetic_pairs(np.random.default_rng(4), 8))
    batch["ref_logp"] = np.where(np.arange(8)[:, None] == 3, np.nan, batch["ref_logp"])
    state = fresh_state(r)
    before = jax.device_get(state["params"])
    moments = jax.device_get(state["opt_state"])
    step = int(state["step"])  # the state is donated to the step
    new, m = r["train"](state, put(batch, r["keys"], r["mesh"]), None, None)
    m = jax.device_get(m)
    assert m["finite"] == 0.0 and not np.isfinite(m["loss"])
    for got, want in zip(jax.tree.leaves(jax.device_get(new["params"])), jax.tree.leaves(before)):
        np.testing.assert_array_equal(got, want)  # every weight kept, none NaN
    for got, want in zip(jax.tree.leaves(jax.device_get(new["opt_state"])), jax.tree.leaves(moments)):
        np.testing.assert_array_equal(got, want)  # moments and update count kept too
    assert int(new["step"]) == step + 1


@pytest.mark.parametrize("objective", ["haf", "baseline", "dpo"])
def test_tiny_model_learns_synthetic_rule(objective):
    rng = np.random.default_rng(10)
    r = make(objective)
    eval_batch = synthetic_pairs(rng, 64)
    train_pool = synthetic_pairs(rng, 16 * 80)
    if objective != "baseline":
        eval_batch = with_ref(r, eval_batch)
        train_pool = with_ref(r, train_pool)
    state = fresh_state(r)
    for i in range(80):
        b = {k: v[i * 16 : (i + 1) * 16] for k, v in train_pool.items()}
        state, m = r["train"](state, put(b, r["keys"], r["mesh"]), None, None)
    scores = jax.device_get(r["eval"](state["params"], put(eval_batch, r["keys"], r["mesh"]), None, None))
    if objective == "dpo":  # the implicit reward against the precomputed reference
        margin = (scores["logp"] - eval_batch["ref_logp"]) @ np.array([1.0, -1.0])
    else:
        margin = scores["reward"] @ np.array([1.0, -1.0])
    accuracy = np.mean(margin > 0)
    assert accuracy >= 0.9, (objective, accuracy)


def test_bf16_compute_with_remat_tracks_float32():
    """bf16 compute + rematerialised blocks: float32 master weights, losses close to float32."""
    batch = synthetic_pairs(np.random.default_rng(5), 8)
    losses = {}
    for bf16 in (False, True):
        r = make("haf", bf16_remat=bf16)
        b = with_ref(r, batch)
        state = fresh_state(r)
        ms = []
        for _ in range(3):
            state, m = r["train"](state, put(b, r["keys"], r["mesh"]), None, None)
            ms.append(jax.device_get(m))
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
        losses[bf16] = ms
    assert losses[True][0]["reward_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert losses[True][0]["policy_loss"] == pytest.approx(math.log(2), abs=1e-3)
    for f32, b16 in zip(losses[False], losses[True]):
        assert np.isfinite(b16["loss"]) and np.isfinite(b16["grad_norm"])
        assert b16["loss"] == pytest.approx(f32["loss"], abs=2e-2)


def test_optimizer_state_is_sharded_like_the_parameters():
    """Adam's moments follow their parameter's sharding on an FSDP mesh; scalars are replicated;
    so each device holds about 1/8 of the state (no replicated copy of the moments)."""
    from flax import traverse_util

    mesh = sharding.make_mesh((1, 8, 1))
    opt = make_optimizer(learning_rate=1e-3, total_steps=10)
    _, abstract = step_lib.state_layout(MODEL, opt, mesh)
    params = traverse_util.flatten_dict(abstract["params"], sep="/")
    adam = abstract["opt_state"][1][0]  # chain(clip, adamw(...)) -> ScaleByAdamState
    for moments in (adam.mu, adam.nu):
        for path, leaf in traverse_util.flatten_dict(moments, sep="/").items():
            assert leaf.sharding == params[path].sharding, path
    assert adam.count.sharding.is_fully_replicated
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    per_device = sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(abstract))
    assert per_device < 0.2 * total, (per_device, total)  # 1/8 plus the few unsplittable leaves
