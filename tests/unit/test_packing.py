"""Packed batches (haf_jax/data/packing.py): on real tokenised HH pairs (the bundled sample and
tokenizer), a packed batch gives the per-pair rewards, log-probs, token counts, loss and gradients of
the same pairs unpacked; the packing loader is deterministic, resumable, covers each epoch without
repeats, and pads little."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from haf_jax import data
from haf_jax.core import forward, losses
from haf_jax.data import batching, packing, tokenize
from haf_jax.model import heads
from haf_jax.model.families import preset
from haf_jax.training import step as step_lib

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def hh(tok):
    """The bundled HH-RLHF harmless-base test file (2,312 rows) with the bundled 2,048-token tokenizer."""
    return data.load_pairs(
        data.sample_paths()["data"],
        tok,
        data.PairOptions(max_length=MAX_LENGTH, max_prompt_length=64),
        split="all",
    )


def _packed_and_unpacked(ds, pairs, shape, share_prompt=False):
    """The same pairs as one packed batch of `shape` and one unpacked batch (None when they do not fit)."""
    slots, offsets = packing.pack_order(np.asarray(pairs), packing.pair_tokens(ds, share_prompt), shape)
    assert slots, "the pairs did not fill one packed batch"
    packed = packing.make_packed_batch(ds, slots[0], offsets[0], shape, share_prompt)
    chosen = packed["index"][packed["valid"]]
    unpacked = batching.make_batch(ds, chosen, MAX_LENGTH)
    return packed, unpacked


def test_packed_batch_layout(hh, tok):
    """Segments: both sides of each pair in one row, positions restart, EOS at last_index, mask = response."""
    shape = packing.PackShape(rows=2, length=4 * MAX_LENGTH, per_row=8)
    packed, unpacked = _packed_and_unpacked(hh, np.arange(40), shape)
    assert (packed["segment_ids"] > 0).sum() == packing.real_tokens(packed) == packing.real_tokens(unpacked)
    valid = np.flatnonzero(packed["valid"])
    assert len(valid) >= 4 and packed["tokens"].shape == (2, 4 * MAX_LENGTH)
    for u, b in enumerate(valid):
        row, k = divmod(b, shape.per_row)
        for side in (0, 1):
            seg = packed["segment_ids"][row] == 1 + 2 * k + side
            n = int(unpacked["last_index"][u, side]) + 1
            assert seg.sum() == n and packed["last_index"][b, side] == np.flatnonzero(seg)[-1]
            np.testing.assert_array_equal(packed["tokens"][row][seg], unpacked["tokens"][u, side, :n])
            np.testing.assert_array_equal(packed["positions"][row][seg], np.arange(n))
            np.testing.assert_array_equal(packed["response_mask"][row][seg], unpacked["response_mask"][u, side, :n])
            assert packed["tokens"][row, packed["last_index"][b, side]] == tok.eos_token_id
    assert (packed["index"][~packed["valid"]] == -1).all()


def test_shared_prompt_layout(hh):
    """data.share_prompt: each pair's prompt once (segment -(k + 1)) and its last token again at the
    start of each sequence; prompt + sequence read in row order are the unpacked sequence."""
    shape = packing.PackShape(rows=2, length=4 * MAX_LENGTH, per_row=8)
    packed, unpacked = _packed_and_unpacked(hh, np.arange(40), shape, share_prompt=True)
    valid = np.flatnonzero(packed["valid"])
    assert len(valid) >= 6
    saved = 0
    for u, b in enumerate(valid):
        row, k = divmod(b, shape.per_row)
        seg = packed["segment_ids"][row]
        prompt = np.flatnonzero(seg == -(1 + k))
        assert len(prompt) > 0 and not packed["response_mask"][row, prompt].any()
        for side in (0, 1):
            own = np.flatnonzero(seg == 1 + 2 * k + side)
            idx = np.concatenate([prompt, own])
            n = int(unpacked["last_index"][u, side]) + 1
            assert len(idx) == n and packed["last_index"][b, side] == own[-1]
            np.testing.assert_array_equal(packed["tokens"][row, idx], unpacked["tokens"][u, side, :n])
            np.testing.assert_array_equal(packed["positions"][row, idx], np.arange(n))
            np.testing.assert_array_equal(packed["response_mask"][row, idx], unpacked["response_mask"][u, side, :n])
        saved += len(prompt)  # the prompt once (P - 1 shared + 1 per sequence) instead of twice
    assert packing.real_tokens(packed) == packing.real_tokens(unpacked) - saved


@pytest.mark.parametrize("layout", ["packed", "packed_shared", "row_shared"])
def test_packed_equals_unpacked_on_real_pairs(hh, layout):
    """Tiny Gemma 2 (soft-caps, GQA, a sliding window of 32 that real sequences exceed) with the bundled
    tokenizer's vocabulary: per-pair rewards, summed log-probs, token counts, the HaF loss and its gradients
    agree between unpacked pairs and the same pairs packed, packed with shared prompts, or one
    pair a row with a shared prompt (SharedPromptLoader's batches)."""
    model = dataclasses.replace(preset("tiny"), vocab_size=2048, sliding_window=32, attention="xla")
    params = heads.init_params(model, jax.random.key(0))
    # A non-zero reward head, so rewards differ between pairs.
    params["reward_head"] = jax.random.normal(jax.random.key(1), params["reward_head"].shape) * 0.1
    shape = packing.PackShape(rows=2, length=4 * MAX_LENGTH, per_row=8)
    share = layout != "packed"
    packed, unpacked = _packed_and_unpacked(hh, np.arange(100, 160), shape, share_prompt=share)
    if layout == "row_shared":
        pairs = packed["index"][packed["valid"]]
        loader = packing.SharedPromptLoader(hh, len(pairs), shuffle=False, prefetch=0)
        packed = packing.make_packed_batch(
            hh,
            pairs,
            np.zeros(len(pairs), np.int64),
            packing.PackShape(len(pairs), loader.buckets[-1], 1),
            share_prompt=True,
        )
    n = int(packed["valid"].sum())
    assert n >= 5 and unpacked["tokens"].shape[0] == n
    if layout != "row_shared":
        assert len(set(packed["segment_ids"][0]) - {0}) >= 4  # several sequences share a row
    cfg = forward.StepConfig(model, forward.LossConfig(objective="haf"), logprob_chunk=48, share_prompt=share)
    ref = np.random.default_rng(0).normal(-200, 20, (len(hh), 2)).astype(np.float32)  # any reference

    def loss(p, batch):  # what step._loss computes, keeping the per-pair outputs
        out = step_lib._outputs(p, cfg, batch, None)
        return losses.objective(out.scores(), objective="haf", weight_B=batch["valid"].astype(jnp.float32))[0], out

    run = jax.jit(jax.value_and_grad(loss, has_aux=True))
    with_ref = lambda b: {**{k: v for k, v in b.items() if k != "index"}, "ref_logp": ref[b["index"]]}
    (loss_p, out_p), grad_p = run(params, with_ref(packed))
    (loss_u, out_u), grad_u = run(params, with_ref(unpacked))
    valid = packed["valid"]
    for field in ("reward", "logp", "n_tokens"):
        np.testing.assert_allclose(
            np.asarray(out_p.scores()[field])[valid],
            np.asarray(out_u.scores()[field]),
            rtol=2e-5,
            atol=2e-4,
            err_msg=field,
        )
    assert np.ptp(np.asarray(out_u.reward_Bx2)) > 1e-3 and (np.asarray(out_u.n_tokens_Bx2) > 0).all()
    np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
    for (path, g_p), g_u in zip(jax.tree_util.tree_leaves_with_path(grad_p), jax.tree.leaves(grad_u)):
        np.testing.assert_allclose(
            np.asarray(g_p),
            np.asarray(g_u),
            rtol=1e-3,
            atol=1e-6 * float(jnp.abs(g_u).max()),
            err_msg=jax.tree_util.keystr(path),
        )


def test_pair_rows_read_plain_and_packed_batches_as_rows():
    """heads.pair_rows, the one layout forward_pairs reads: a plain [B, 2, L] batch is 2B rows of one
    sequence (bool segments, reshapes only), a packed one its own rows with S = 2B / R sequences each;
    batches whose shapes disagree are refused by name."""
    b, length = 3, 6
    plain = {
        "tokens": np.arange(b * 2 * length).reshape(b, 2, length),
        "response_mask": np.ones((b, 2, length), int),
        "last_index": np.array([[5, 3], [2, 4], [1, 0]]),
    }
    rows = heads.pair_rows(plain)
    assert rows.tokens_RxT.shape == (2 * b, length) and rows.last_index_RxC.shape == (2 * b, 1)
    np.testing.assert_array_equal(rows.tokens_RxT[3], plain["tokens"][1, 1])  # row 2b + j: pair b, side j
    np.testing.assert_array_equal(rows.segments_RxT[3], np.arange(length) <= 4)
    assert rows.segments_RxT.dtype == bool
    r, k = 2, 3
    packed = {
        "tokens": np.zeros((r, 10), int),
        "positions": np.zeros((r, 10), int),
        "segment_ids": np.ones((r, 10), int),
        "response_mask": np.zeros((r, 10), int),
        "last_index": np.arange(2 * r * k).reshape(r * k, 2),
    }
    rows = heads.pair_rows(packed)
    assert rows.segments_RxT is packed["segment_ids"] and rows.last_index_RxC.shape == (r, 2 * k)
    np.testing.assert_array_equal(rows.last_index_RxC[1], np.arange(6, 12))  # row 1: pairs 3..5, chosen first
    with pytest.raises(ValueError, match="do not fill 2 rows"):
        heads.pair_rows({**packed, "last_index": packed["last_index"][:5]})
    with pytest.raises(ValueError, match=r"is not \[B, 2, L\]"):
        heads.pair_rows({**plain, "last_index": plain["last_index"][:2]})


def test_micro_batches_keep_pairs_with_their_rows():
    """grad_accum splits a packed batch by rows, and each pair goes with its row."""
    r, k = 4, 3
    batch = {
        "tokens": np.arange(r)[:, None] * np.ones((1, 5), int),
        "segment_ids": np.ones((r, 5), int),
        "positions": np.zeros((r, 5), int),
        "response_mask": np.zeros((r, 5), int),
        "last_index": np.repeat(np.arange(r * k) // k, 2).reshape(r * k, 2),
        "valid": np.ones(r * k, bool),
    }
    micro = step_lib.micro_batches(batch, 2)
    assert micro["tokens"].shape == (2, 2, 5) and micro["last_index"].shape == (2, 6, 2)
    for j in range(2):
        rows = np.asarray(micro["tokens"][j, :, 0])
        np.testing.assert_array_equal(np.asarray(micro["last_index"][j, :, 0]), np.repeat(rows, k))


def test_packed_loader_deterministic_covering_and_low_padding(hh):
    make = lambda seed: packing.PackedLoader(hh, 16, seed=seed, prefetch=0)
    a, b = make(0), make(0)
    assert a.shape.length == 4 * MAX_LENGTH
    for _ in range(3):
        x, y = next(a), next(b)
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
        assert x["tokens"].shape == (a.shape.rows, a.shape.length)  # one static shape
    assert not np.array_equal(next(make(1))["index"], next(make(0))["index"])
    slots, _ = a.plan(0)
    seen = slots[slots >= 0]
    assert len(seen) == len(set(seen.tolist())) > 0.95 * len(hh)  # no repeats; only the tail is dropped
    report = a.padding()
    assert report["padding_fraction"] < 0.1 < report["unpacked_padding_fraction"]
    # measured 12.31 with the bundled 2,048-token tokenizer (its longer sequences fill rows sooner than
    # GPT-2's did, which gave >= 13)
    assert 12 <= report["pairs_per_step"] <= 16, report


def test_packed_loader_resumes_across_an_epoch(hh):
    loader = packing.PackedLoader(hh, 64, seed=3, prefetch=2)
    steps = loader.epoch_steps(0)
    for _ in range(steps - 2):
        next(loader)
    state = dict(loader.state)
    expected = [next(loader) for _ in range(4)]  # crosses into epoch 1
    assert loader.epoch == 1 and loader.epoch_steps(1) > 0
    loader.close()
    _assert_resumes(packing.PackedLoader(hh, 64, seed=0, prefetch=2), state, expected)


def _assert_resumes(fresh, state, expected):
    """`fresh` (a new loader with another seed), restored to `state`, yields the `expected` batches."""
    fresh.restore(state)
    with fresh:
        for want in expected:
            got = next(fresh)
            for key in want:
                np.testing.assert_array_equal(got[key], want[key])


def test_shared_prompt_loader_resumes_across_an_epoch(hh):
    """SharedPromptLoader: PairLoader's plan and state; every row holds one pair in the smallest
    bucket of 2 x max_length that fits the batch's longest pair; resume continues exactly."""
    loader = packing.SharedPromptLoader(hh, 32, seed=3, prefetch=2)
    need = packing.pair_tokens(hh, share_prompt=True)
    seen = []
    for _ in range(loader.steps_per_epoch - 2):
        b = next(loader)
        length = b["tokens"].shape[1]
        assert b["tokens"].shape[0] == 32 and length in loader.buckets
        assert need[b["index"]].max() <= length and (
            length == loader.buckets[0] or need[b["index"]].max() > loader.buckets[loader.buckets.index(length) - 1]
        )
        assert ((b["segment_ids"] != 0).sum(axis=1) == need[b["index"]]).all()
        seen.extend(b["index"].tolist())
    assert len(seen) == len(set(seen))
    state = dict(loader.state)
    expected = [next(loader) for _ in range(4)]  # crosses into epoch 1
    assert loader.epoch == 1
    loader.close()
    _assert_resumes(packing.SharedPromptLoader(hh, 32, seed=0, prefetch=2), state, expected)


def test_pack_settings_are_checked(hh):
    with pytest.raises(data.DataError, match="pack_length=200 is shorter than a pair"):
        packing.PackedLoader(hh, 16, length=200)
    with pytest.raises(data.DataError, match="pack_rows=3 must be a multiple of 2"):
        packing.PackedLoader(hh, 16, rows=3, row_multiple=2)


def _as_process(ds, p: int, count: int):
    """`ds` as process p of `count` sees it (its own pairs tokenised; lengths of all pairs)."""
    idx = np.arange(p, len(ds), count)
    t = ds.tokens
    tokens = tokenize.TokenizedPairs(
        *[[getattr(t, f)[i] for i in idx] for f in ("prompt", "chosen", "rejected")],
        t.lengths[idx],
        t.raw_lengths[idx],
        t.flags[idx],
    )
    return dataclasses.replace(ds, tokens=tokens, local_indices=idx, process_index=p, process_count=count)


def test_packed_loader_on_two_processes(hh):
    """Each process packs its own pairs into its share of the rows; both keep the same number of
    batches, so global batch k is the concatenation of the processes' k-th batches."""
    loaders = [packing.PackedLoader(_as_process(hh, p, 2), 16, seed=5, prefetch=0) for p in (0, 1)]
    assert loaders[0].shape == loaders[1].shape and loaders[0].shape.rows % 2 == 0
    assert loaders[0].epoch_steps(0) == loaders[1].epoch_steps(0)
    batches = [next(ld) for ld in loaders]
    for p, b in enumerate(batches):
        assert b["tokens"].shape == (loaders[p].shape.rows // 2, loaders[p].shape.length)
        assert (b["index"][b["valid"]] % 2 == p).all() and b["valid"].sum() >= 4
