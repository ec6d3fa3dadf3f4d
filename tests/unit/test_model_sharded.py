"""The model on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices equals the 1-device result."""

import jax
import numpy as np
from flax import traverse_util

from haf_jax.core import params as params_lib, sharding
from haf_jax.model import heads, hf
from haf_jax.model.families import PRESETS
from haf_jax.model.heads import forward_pairs

CONFIG = PRESETS["tiny"]  # Gemma 2 features: GQA, soft-caps, sliding window


def _random_params(seed=0):
    """Host params with every leaf random (norms and reward head too, so nothing is trivially 0)."""
    shapes, _ = heads.abstract_params(CONFIG)
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: (rng.standard_normal(s.shape) * (0.3 if len(s.shape) == 1 else 0.1)).astype(np.float32), shapes
    )


def _batch(b=4, length=32, seed=1):
    rng = np.random.default_rng(seed)
    last = rng.integers(8, length, (b, 2)).astype(np.int32)
    last[0] = (5, 7)  # a short pair next to long ones
    pos = np.arange(length)
    tokens = rng.integers(3, CONFIG.vocab_size, (b, 2, length)).astype(np.int32)
    tokens = np.where(pos <= last[..., None], tokens, 0).astype(np.int32)
    mask = ((pos >= 4) & (pos <= last[..., None])).astype(np.int32)
    return {"tokens": tokens, "response_mask": mask, "last_index": last}


def _run(params_host, mesh, batch):
    p_shard = params_lib.param_shardings(CONFIG, mesh)
    b_shard = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    params = jax.device_put(params_host, p_shard)
    fn = jax.jit(lambda p, x: forward_pairs(p, CONFIG, x, chunk=8), in_shardings=(p_shard, b_shard))
    return jax.tree.map(np.asarray, fn(params, jax.device_put(batch, b_shard))), params


def test_sharded_equals_single_device():
    mesh8 = sharding.make_mesh((2, 2, 2))
    mesh1 = sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    assert dict(mesh8.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    params_host, batch = _random_params(), _batch()
    out8, params8 = _run(params_host, mesh8, batch)
    out1, _ = _run(params_host, mesh1, batch)
    # parameters really are split over fsdp and tensor
    emb = params8["embed_tokens"].sharding
    assert len(emb.device_set) == 8 and emb.shard_shape(params8["embed_tokens"].shape) == (1024, 32)
    for key in ("reward", "logp", "n_tokens"):
        np.testing.assert_allclose(out8.scores()[key], out1.scores()[key], atol=1e-5, rtol=1e-5, err_msg=key)
    assert np.abs(out1.reward_Bx2).max() > 0.1


def test_init_and_load_params_on_mesh(tmp_path):
    mesh8 = sharding.make_mesh((2, 2, 2))
    expected = traverse_util.flatten_dict(params_lib.param_shardings(CONFIG, mesh8), sep="/")
    init = traverse_util.flatten_dict(params_lib.init_params(CONFIG, jax.random.key(0), mesh8), sep="/")
    assert all(init[k].sharding == expected[k] for k in expected)
    # export from sharded arrays, re-import straight onto the mesh (one tensor at a time)
    params_host = _random_params(2)
    hf.save_hf(
        jax.device_put(params_host, params_lib.param_shardings(CONFIG, mesh8)),
        CONFIG,
        tmp_path / "rm",
        kind="reward_model",
    )
    loaded, info = hf.load_params(tmp_path / "rm", CONFIG, shardings=params_lib.param_shardings(CONFIG, mesh8))
    assert info["reward_head"] == "loaded"
    flat = traverse_util.flatten_dict(loaded, sep="/")
    for k, v in traverse_util.flatten_dict(params_host, sep="/").items():
        assert flat[k].sharding == expected[k], k
        np.testing.assert_array_equal(np.asarray(flat[k]), v, err_msg=k)
