"""Attention implementations (haf_jax/model/attention.py) against the XLA path: splash in Pallas
interpret mode (values and gradients, also split over a mesh), cuDNN's argument mapping through
jax.nn.dot_product_attention's XLA implementation (no GPU here) and its fallback rules, and the
splash train step compiled ahead of time for TPU v5e."""

import dataclasses
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax.core import forward, sharding
from haf_jax.model import attention as A

N, L, Q, K, H = 2, 256, 4, 2, 16


@pytest.fixture(scope="module")
def qkv():
    """Two rows: one packed with three sequences and trailing padding, one a single sequence."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(N, L, heads, H)), jnp.float32) for heads in (Q, K, K))
    seg, pos = np.zeros((N, L), np.int32), np.zeros((N, L), np.int32)
    for r, cuts in enumerate(([0, 100, 170, 250], [0, L])):
        for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            seg[r, a:b], pos[r, a:b] = s + 1, np.arange(b - a)
    return q, k, v, jnp.asarray(seg), jnp.asarray(pos)


def _xla(qkv, **kw):
    q, k, v, seg, pos = qkv
    return A.xla_attention(q, k, v, q_pos_NxL=pos, k_pos_NxS=pos, q_seg_NxL=seg, k_seg_NxS=seg, **kw)


def _real(qkv):
    return np.asarray(qkv[3]) > 0  # padding rows may differ: nothing reads them


def test_xla_path_masks_segments_positions_and_window(qkv):
    """The reference itself against a NumPy loop over (query, key) pairs."""
    q, k, v, seg, pos = (np.asarray(x, np.float64) for x in qkv)
    out = np.asarray(_xla(qkv, scale=0.25, softcap=5.0, window=40))
    for r, i in [(0, 5), (0, 120), (0, 169), (0, 249), (1, 200)]:
        for head in (0, 3):
            ok = (seg[r] == seg[r, i]) & (pos[r] <= pos[r, i]) & (pos[r] > pos[r, i] - 40)
            logits = 5.0 * np.tanh(0.25 * k[r, :, head // 2] @ q[r, i, head] / 5.0)
            p = np.exp(np.where(ok, logits, -np.inf) - logits[ok].max())
            np.testing.assert_allclose(out[r, i, head], p @ v[r, :, head // 2] / p.sum(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("softcap, window", [(None, None), (5.0, 40)])
def test_splash_equals_xla(qkv, softcap, window):
    q, k, v, seg, _ = qkv
    kw = dict(scale=0.25, softcap=softcap, window=window)
    got = jax.jit(lambda a, b, c: A.splash_attention(a, b, c, q_seg_NxL=seg, k_seg_NxS=seg, interpret=True, **kw))(
        q, k, v
    )
    want = _xla(qkv, **kw)
    real = _real(qkv)
    np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def test_splash_gradients_equal_xla_under_a_mesh(qkv):
    """Rows split over 2 devices with shard_map (the Pallas call is not partitioned by GSPMD)."""
    q, k, v, seg, pos = qkv
    kw = dict(scale=0.25, softcap=5.0, window=40)
    weight = jnp.asarray(_real(qkv), jnp.float32)[:, :, None, None]
    mesh = sharding.make_mesh((1, 2, 1), devices=jax.devices()[:2])

    def loss(impl):
        def f(a, b, c):
            if impl == "splash":
                out = A.splash_attention(a, b, c, q_seg_NxL=seg, k_seg_NxS=seg, interpret=True, **kw)
            else:
                out = A.xla_attention(a, b, c, q_pos_NxL=pos, k_pos_NxS=pos, q_seg_NxL=seg, k_seg_NxS=seg, **kw)
            return jnp.sum(jnp.sin(out) * weight)

        return jax.jit(sharding.under_mesh(jax.grad(f, argnums=(0, 1, 2)), mesh))

    q, k, v = (jax.device_put(x, sharding.batch_sharding(mesh, 4)) for x in (q, k, v))
    for got, want in zip(loss("splash")(q, k, v), loss("xla")(q, k, v)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_cudnn_arguments_mean_the_xla_mask(qkv):
    """cudnn_attention's call (segment mask, causal, left window) run by dot_product_attention's XLA
    implementation equals the reference: the same arguments go to cuDNN on a GPU."""
    for data in (qkv, _shared_prompt_row()):
        q, k, v, seg, pos = data
        real = _real(data)
        for window in (None, 40):
            got = A.cudnn_attention(
                q,
                k,
                v,
                q_pos_NxL=pos,
                k_pos_NxS=pos,
                q_seg_NxL=seg,
                k_seg_NxS=seg,
                scale=0.25,
                window=window,
                implementation="xla",
            )
            want = _xla(data, scale=0.25, window=window)
            np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-5)


def _shared_prompt_row(prompt=30, chosen=50, rejected=20, pad=12):
    """One row [shared prompt but its last token | last + chosen | last + rejected | padding] in the
    data.share_prompt layout (segments -1, 1, 2, 0; both sequences restart at the prompt's last
    position), the two plain rows [prompt, chosen] and [prompt, rejected] it stands for, and where
    each plain row's tokens sit in the shared one."""
    rng = np.random.default_rng(1)
    p, c, r = (rng.normal(size=(n, Q + 2 * K, H)) for n in (prompt, chosen, rejected))
    parts = [p[:-1], np.concatenate([p[-1:], c]), np.concatenate([p[-1:], r]), np.zeros((pad, Q + 2 * K, H))]
    row = np.concatenate(parts)[None]
    seg = np.concatenate(
        [np.full(prompt - 1, -1), np.full(chosen + 1, 1), np.full(rejected + 1, 2), np.zeros(pad)]
    ).astype(np.int32)[None]
    pos = np.concatenate(
        [
            np.arange(prompt - 1),
            np.arange(prompt - 1, prompt + chosen),
            np.arange(prompt - 1, prompt + rejected),
            np.zeros(pad),
        ]
    ).astype(np.int32)[None]
    split = lambda x: tuple(
        jnp.asarray(a, jnp.float32) for a in (x[..., :Q, :], x[..., Q : Q + K, :], x[..., Q + K :, :])
    )
    return (*split(row), jnp.asarray(seg), jnp.asarray(pos))


def test_shared_prompt_row_attends_as_two_plain_rows():
    """Each response of a shared-prompt row sees its prompt and itself (at its own positions) and
    never the other response: its attention outputs equal those of its plain row."""
    q, k, v, seg, pos = _shared_prompt_row()
    shared = np.asarray(
        A.xla_attention(
            q, k, v, q_pos_NxL=pos, k_pos_NxS=pos, q_seg_NxL=seg, k_seg_NxS=seg, scale=0.25, softcap=5.0, window=40
        )
    )[0]
    s = np.asarray(seg)[0]
    prefix = np.flatnonzero(s == -1)
    for side in (1, 2):
        idx = np.concatenate([prefix, np.flatnonzero(s == side)])  # the plain row's tokens, in order
        plain = [x[:, idx] for x in (q, k, v)]
        ones, p = jnp.ones((1, len(idx)), jnp.int32), jnp.arange(len(idx), dtype=jnp.int32)[None]
        want = np.asarray(
            A.xla_attention(
                *plain, q_pos_NxL=p, k_pos_NxS=p, q_seg_NxL=ones, k_seg_NxS=ones, scale=0.25, softcap=5.0, window=40
            )
        )[0]
        np.testing.assert_allclose(shared[idx], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rows", ["packed", "shared_prompt", "odd_length"])
def test_causal_blocks_equal_the_dense_kernel(qkv, rows):
    """xla_attention(causal=True) (query blocks, each against the keys up to its end) gives the
    dense kernel's outputs and gradients on every real query: packed rows with padding, a shared-
    prompt row (responses see keys before them in the row, never after), a length no block divides."""
    data = {"packed": qkv, "shared_prompt": _shared_prompt_row()}.get(rows) or _shared_prompt_row(10, 31, 20, pad=3)
    q, k, v, seg, pos = data
    assert len(A.query_blocks(q.shape[1])) == {"packed": 8, "shared_prompt": 3, "odd_length": 2}[rows]
    weight = jnp.asarray(_real(data), jnp.float32)[:, :, None, None]
    kw = dict(q_pos_NxL=pos, k_pos_NxS=pos, q_seg_NxL=seg, k_seg_NxS=seg, scale=0.25, softcap=5.0, window=40)

    def run(causal):
        f = lambda a, b, c: A.xla_attention(a, b, c, causal=causal, **kw)
        loss = lambda a, b, c: jnp.sum(jnp.sin(f(a, b, c)) * weight)
        return jax.jit(f)(q, k, v), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    (out, grads), (want, want_grads) = run(True), run(False)
    real = _real(data)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(want)[real], rtol=1e-5, atol=1e-6)
    for got, ref in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-4, atol=1e-6)


def test_query_blocks_cover_the_row_once():
    for length in (1, 31, 63, 64, 100, 256, 1000, 4096):
        blocks = A.query_blocks(length)
        assert blocks[0][0] == 0 and blocks[-1][1] == length
        assert all(b == c for (_, b), (c, _) in zip(blocks, blocks[1:]))
        assert len(blocks) == max(1, min(A.QUERY_BLOCKS, length // A.MIN_QUERY_BLOCK))
        assert min(b - a for a, b in blocks) >= min(length, A.MIN_QUERY_BLOCK)


def test_choose_falls_back_with_a_reason():
    base = dict(platform="gpu", dtype=jnp.bfloat16, head_dim=128, length=512, softcap=None, cached=False)
    assert A.choose("auto", **base) == ("cudnn", None)
    assert A.choose("auto", **{**base, "platform": "tpu"}) == ("splash", None)
    assert A.choose("auto", **{**base, "platform": "cpu"}) == ("xla", None)
    assert A.choose("xla", **base) == ("xla", None)
    for change, reason in [
        ({"softcap": 50.0}, "soft-cap"),
        ({"dtype": jnp.float32}, "float32"),
        ({"head_dim": 256}, "up to 128"),
        ({"head_dim": 60}, "multiple of 8"),
        ({"cached": True}, "KV-cache"),
        ({"platform": "cpu"}, "needs a GPU"),
        ({"length": 511}, "even length"),
    ]:
        impl, why = A.choose("cudnn", **{**base, **change})
        assert impl == "xla" and reason in why, (change, why)
    assert A.choose("cudnn", **{**base, "head_dim": 256}, gpu_capability="9.0") == ("cudnn", None)
    assert A.choose("auto", **{**base, "cached": True}) == ("xla", None)  # decoding: silently XLA
    tpu = {**base, "platform": "tpu", "softcap": 50.0, "dtype": jnp.float32}
    assert A.choose("splash", **tpu) == ("splash", None)  # splash has soft-caps and float32
    impl, why = A.choose("splash", **{**tpu, "length": 96})
    assert impl == "xla" and "multiple of 128" in why
    with pytest.raises(ValueError, match="model.attention='flash'"):
        A.choose("flash", **base)


def test_fallback_is_logged_once(qkv, caplog):
    q, k, v, seg, pos = qkv
    call = lambda: A.attend(
        q,
        k,
        v,
        q_pos_NxL=pos,
        k_pos_NxS=pos,
        q_seg_NxL=seg,
        k_seg_NxS=seg,
        scale=0.25,
        softcap=5.0,
        implementation="cudnn",
    )
    A._logged.clear()
    with caplog.at_level(logging.WARNING, logger="haf_jax"):
        out = call()
        call()
    assert [r.getMessage() for r in caplog.records] == [
        "model.attention=cudnn: using xla attention instead (cudnn needs a GPU (platform cpu))"
    ]
    np.testing.assert_allclose(np.asarray(out), np.asarray(_xla(qkv, scale=0.25, softcap=5.0, causal=True)), rtol=1e-6)


def test_splash_packed_train_step_compiles_for_tpu_v5e():
    """A tiny Gemma 2 (soft-caps, sliding window, GQA), HaF, bf16, packed rows of 256 tokens, FSDP
    over v5e:2x4's 8 chips: the step compiles with the Mosaic splash kernel."""
    pytest.importorskip("libtpu", reason="libtpu (pip install -e '.[tpu]') compiles for TPU topologies")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # other test processes may hold libtpu's lock
    from jax.experimental import topologies

    from haf_jax.core import params as params_lib
    from haf_jax.core.optim import make_optimizer
    from haf_jax.model.families import preset
    from haf_jax.training import step as step_lib

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x4").devices
    mesh = sharding.make_mesh((1, -1, 1), devices=devices)
    model = dataclasses.replace(preset("tiny"), head_dim=128, query_pre_attn_scalar=128, attention="splash")
    cfg = forward.StepConfig(model, forward.LossConfig(objective="haf"), compute_dtype=jnp.bfloat16, packed=True)
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
    rows, length, slots = 8, 256, 32
    dims = {
        "tokens": (rows, length),
        "response_mask": (rows, length),
        "positions": (rows, length),
        "segment_ids": (rows, length),
        "last_index": (slots, 2),
        "valid": (slots,),
        "ref_logp": (slots, 2),
    }
    dtypes = {"valid": jnp.bool_, "ref_logp": jnp.float32}
    shardings = forward.batch_shardings(mesh, keys, packed=True)
    batch = {k: jax.ShapeDtypeStruct(dims[k], dtypes.get(k, jnp.int32), sharding=shardings[k]) for k in keys}
    lowered = fn.lower(abstract, batch, None, None)
    assert "splash" in lowered.as_text()  # the Pallas kernel, not the XLA fallback
    assert lowered.compile().memory_analysis().temp_size_in_bytes > 0


def test_shared_prompt_rows_leave_splash(monkeypatch, caplog):
    """Splash's segment ids are equality only: rows with shared prompts run XLA attention on TPU
    (with the reason logged); cuDNN takes the rule as its mask and stays."""
    from haf_jax.model.families import preset

    config = dataclasses.replace(preset("tiny"), attention="auto")
    monkeypatch.setattr(A, "_target", lambda: ("tpu", None))
    with caplog.at_level(logging.WARNING, logger="haf_jax"):
        assert A.for_shared_prompt(config).attention == "xla"
        assert A.for_shared_prompt(dataclasses.replace(config, attention="splash")).attention == "xla"
    assert "shared prompts" in caplog.text
    assert A.for_shared_prompt(dataclasses.replace(config, attention="xla")).attention == "xla"
    monkeypatch.setattr(A, "_target", lambda: ("gpu", "9.0"))
    assert A.for_shared_prompt(config) is config
    assert A.for_shared_prompt(dataclasses.replace(config, attention="cudnn")).attention == "cudnn"
