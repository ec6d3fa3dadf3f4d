"""Checkpoint layer: round trip, mesh changes, retention, corruption, NaN guard; the resume config policy."""

import asyncio
import glob
import logging
import os
import time

import jax
import jax.numpy as jnp
import pytest
from helpers.checkpoint_states import CONFIG, abstract, assert_same, make_state, mesh_of, save
from jax.sharding import NamedSharding, PartitionSpec as P

from haf_jax.checkpoint import drain, integrity
from haf_jax.checkpoint.manager import Checkpointer, CorruptCheckpointError
from haf_jax.training import resume as run_config


@pytest.mark.parametrize("src,dst", [(8, 8), (8, 1), (1, 8)])
def test_round_trip_across_meshes(tmp_path, src, dst):
    state = make_state(mesh_of(src))
    with Checkpointer(tmp_path, every_steps=1) as c:
        assert save(c, 7, state)
        c.wait_until_finished()
    c = Checkpointer(tmp_path, every_steps=1)  # a fresh process would do this
    assert c.latest_step() == 7 and c.read_config() == CONFIG
    want = abstract(mesh_of(dst), state)
    restored, data_state, config = c.restore(None, want)
    assert data_state == {"epoch": 0, "position": 28} and config == CONFIG
    assert_same(restored, state)
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for r, w in zip(jax.tree.leaves(restored), jax.tree.leaves(want)):
        assert r.sharding == w.sharding, (r.sharding, w.sharding)
    assert jax.dtypes.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
    c.close()


def test_keep_last_k_plus_best(tmp_path):
    state = make_state(mesh_of(8))
    accs = {1: 0.5, 2: 0.9, 3: 0.1, 4: None, 5: 0.6, 6: None}
    with Checkpointer(tmp_path, every_steps=1, keep=2) as c:
        for step, acc in accs.items():
            assert save(c, step, state, None if acc is None else {"reward_accuracy": acc, "loss": 1.0})
        c.wait_until_finished()
        assert c.all_steps() == [2, 5, 6] and c.best_step() == 2 and c.latest_step() == 6
    assert sorted(os.listdir(tmp_path)) == ["2", "5", "6"]
    # The best moves on: once a better step arrives the old best is only kept while in the last K.
    with Checkpointer(tmp_path, every_steps=1, keep=2) as c:
        assert save(c, 7, state, {"reward_accuracy": 0.95})
        assert save(c, 8, state, {"reward_accuracy": 0.2})
        c.wait_until_finished()
        assert c.all_steps() == [7, 8] and c.best_step() == 7
    with Checkpointer(tmp_path, every_steps=1, keep=1, best_metric="loss", best_mode="min") as c:
        assert save(c, 9, state, {"loss": 0.1})
        assert save(c, 10, state, {"loss": 0.3})
        c.wait_until_finished()
        assert c.all_steps() == [9, 10] and c.best_step() == 9


def test_steps_without_orbax_metrics_are_kept(tmp_path):
    """A step written without orbax's metrics item (before retention used it) is never deleted
    unranked; steps written now follow last-K + best."""
    state = make_state(mesh_of(1))
    with Checkpointer(tmp_path, every_steps=1, best_metric=None) as c:
        assert save(c, 1, state, {"reward_accuracy": 0.9})
    with Checkpointer(tmp_path, every_steps=1, keep=1) as c:
        for step in (2, 3, 4):
            assert save(c, step, state, {"reward_accuracy": 0.1 * step} if step == 3 else None)
        c.wait_until_finished()
        assert c.all_steps() == [1, 3, 4] and c.best_step() == 1  # best by meta, as before


def test_should_save_steps_and_timer(tmp_path):
    c = Checkpointer(tmp_path, every_steps=10, every_minutes=0.0)
    assert [s for s in range(1, 31) if c.should_save(s)] == [10, 20, 30]
    assert not save(c, 11, make_state(mesh_of(1)))  # not due: nothing written
    assert c.latest_step() is None
    c = Checkpointer(tmp_path, every_steps=1000, every_minutes=0.5 / 60)
    assert not c.should_save(1)
    time.sleep(0.6)
    assert c.should_save(2) and save(c, 2, make_state(mesh_of(1)))
    assert not c.should_save(3)  # timer restarts at each save
    assert not save(c, 2, make_state(mesh_of(1)), force=True)  # an existing step is kept
    c.close()
    assert c.latest_step() == 2


def test_nan_state_is_never_written(tmp_path):
    state = make_state(mesh_of(8))
    assert integrity.all_finite(state)
    bad = jax.tree.map(lambda x: x, state)
    bad["params"]["mlp"]["b"] = bad["params"]["mlp"]["b"].at[3].set(jnp.nan)
    assert not integrity.all_finite(bad)
    assert not integrity.all_finite({"x": jnp.array([1.0, jnp.inf])})
    with Checkpointer(tmp_path, every_steps=1) as c:
        assert save(c, 1, state)
        with pytest.raises(FloatingPointError, match="step 2"):
            save(c, 2, bad)
        c.wait_until_finished()
        assert c.all_steps() == [1] and c.latest_step() == 1


def _biggest_data_file(step_dir):
    return max(glob.glob(f"{step_dir}/state/**/d/*", recursive=True), key=os.path.getsize)


def _truncate(step_dir):
    f = _biggest_data_file(step_dir)
    os.truncate(f, os.path.getsize(f) // 2)


def _garble(step_dir):  # same size, bytes flipped inside a raw chunk: tensorstore reads it fine
    f = _biggest_data_file(step_dir)
    assert os.path.getsize(f) > 60_000  # the (64, 256) float32 chunk, not a b-tree node
    b = bytearray(open(f, "rb").read())
    b[len(b) // 2 : len(b) // 2 + 8] = bytes(x ^ 0xFF for x in b[len(b) // 2 : len(b) // 2 + 8])
    open(f, "wb").write(bytes(b))


def _garble_metadata(step_dir):
    open(f"{step_dir}/state/_METADATA", "w").write('{"tree_metadata": ')


def _garble_data_state(step_dir):
    open(f"{step_dir}/data/metadata", "w").write("{garbage")


def _drop_item(step_dir):
    import shutil

    shutil.rmtree(f"{step_dir}/config")


def _drop_checksums(step_dir):  # meta still a JSON object, but without what restore verifies against
    import json

    path = f"{step_dir}/meta/metadata"
    meta = json.loads(open(path).read())
    del meta["checksums"]
    open(path, "w").write(json.dumps(meta))


@pytest.mark.parametrize(
    "damage,why",
    [
        (_truncate, "reading it failed"),
        (_garble, "checksum mismatch"),
        (_garble_metadata, "'state' has unreadable metadata"),
        (_garble_data_state, "'data' is missing or unreadable"),
        (_drop_item, "'config' is missing"),
        (_drop_checksums, "'meta' holds no 'checksums'"),
    ],
)
def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog, damage, why):
    states = {s: make_state(mesh_of(8), seed=s) for s in (1, 2, 3)}
    with Checkpointer(tmp_path, every_steps=1) as c:
        for s, st in states.items():
            save(c, s, st, {"reward_accuracy": 0.1 * s})
    damage(str(tmp_path / "3"))
    # A half-written save (killed before orbax's commit rename) must be invisible.
    tmp = tmp_path / "4.orbax-checkpoint-tmp-1234567"
    (tmp / "state").mkdir(parents=True)
    (tmp / "state" / "_METADATA").write_text("{")

    c = Checkpointer(tmp_path, every_steps=1, read_only=True)
    with caplog.at_level(logging.WARNING, logger="haf_jax.checkpoint.manager"):
        restored, data_state, _ = c.restore(None, abstract(mesh_of(8), states[3]))
        with pytest.raises(CorruptCheckpointError, match="step 3"):
            c.restore(3, abstract(mesh_of(8), states[3]))
    assert_same(restored, states[2])
    assert data_state["position"] == 8
    assert c.latest_step() == 2 and c.best_step() == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("step 3" in w and why in w for w in warnings), warnings
    assert tmp.exists() and (tmp_path / "3").exists()  # a reader never touches the directory
    c.close()

    # Resuming writer: orbax's unfinished save is removed when it opens the directory; the skipped
    # step is moved aside (not deleted) and step 3 can be re-saved.
    w = Checkpointer(tmp_path, every_steps=1)
    w.restore(None, abstract(mesh_of(1), states[3]))
    assert w.restored_step == 2 and not tmp.exists() and (tmp_path / "3").exists()
    assert save(w, 3, restored)
    w.close()
    assert [p.name.split(".")[0] for p in (tmp_path / "set_aside").iterdir()] == ["3"]
    r = Checkpointer(tmp_path, every_steps=1)
    assert r.latest_step() == 3
    assert_same(r.restore(None, abstract(mesh_of(8), states[3]))[0], states[2])
    r.close()


def test_restore_empty_and_all_corrupt(tmp_path):
    c = Checkpointer(tmp_path, every_steps=1)
    assert c.latest_step() is None and c.best_step() is None
    state = make_state(mesh_of(1))
    with pytest.raises(FileNotFoundError):
        c.restore(None, abstract(mesh_of(1), state))
    with pytest.raises(FileNotFoundError):
        c.restore(5, abstract(mesh_of(1), state))
    save(c, 1, state)
    c.close()
    _truncate(str(tmp_path / "1"))
    with pytest.raises(CorruptCheckpointError, match="no usable checkpoint"):
        Checkpointer(tmp_path, every_steps=1).restore(None, abstract(mesh_of(1), state))


def _many_leaves(seed):
    """96 leaves of 8 x 512 floats, sharded over 8 devices: hundreds of concurrent shard reads."""
    base = jnp.sin(jnp.arange(8 * 512, dtype=jnp.float32) * (seed + 0.3)).reshape(8, 512)
    return {f"w{i:02d}": base + i for i in range(96)}


def test_failed_restore_leaves_no_read_behind(tmp_path, monkeypatch):
    """orbax closes its event loop at the first failed read; the other reads must still finish.

    Every loop orbax creates during restore is recorded; after the walk-back none may hold an
    unfinished task (an abandoned read later prints "Exception ignored in: <coroutine
    _read_array_index_and_device_put>" and a call_soon_threadsafe traceback, or not, depending on
    timing: that made the end-to-end test flaky).
    """
    loops = []
    monkeypatch.setattr(
        drain.DrainingPolicy, "new_event_loop", lambda self: loops.append(drain.DrainingLoop()) or loops[-1]
    )
    mesh = mesh_of(8)
    sharding = NamedSharding(mesh, P(None, ("data", "fsdp", "tensor")))
    make = jax.jit(_many_leaves, static_argnums=0, out_shardings=sharding)
    states = {s: make(s) for s in (1, 2)}
    with Checkpointer(tmp_path, every_steps=1) as c:
        for s, st in states.items():
            save(c, s, st)
    _truncate(str(tmp_path / "2"))
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), states[2])
    r = Checkpointer(tmp_path, every_steps=1, read_only=True)
    restored, _, _ = r.restore(None, target)
    assert r.restored_step == 1 and 2 in r.unusable_steps()
    assert_same(restored, states[1])
    assert loops and all(loop.is_closed() for loop in loops)
    left = [t for loop in loops for t in asyncio.all_tasks(loop) if not t.done()]
    assert not left, f"{len(left)} reads abandoned by the failed restore"
    r.close()


def test_compare_configs():
    saved = {
        "model": {"preset": "tiny", "layers": 2},
        "loss": {"objective": "haf", "alpha": 1.0},
        "train": {"eval_every": 100, "seed": 0, "shape": (2, 3)},
        "checkpoint": {"every_steps": 50},
        "data": {"eval": "a.jsonl"},
    }
    current = {
        "model": {"preset": "tiny", "layers": 4},
        "loss": {"objective": "dpo", "alpha": 1.0},
        "train": {"eval_every": 10, "seed": 0, "shape": [2, 3], "new_key": 1},
        "checkpoint": {"every_steps": 20},
        "data": {"eval": "b.jsonl"},
    }
    breaking, harmless = run_config.compare_configs(saved, current)
    assert breaking == [
        "loss.objective: saved='haf' current='dpo'",
        "model.layers: saved=2 current=4",
        "train.new_key: saved='<missing>' current=1",
    ]
    assert harmless == [
        "checkpoint.every_steps: saved=50 current=20",
        "data.eval: saved='a.jsonl' current='b.jsonl'",
        "train.eval_every: saved=100 current=10",
    ]
    assert run_config.compare_configs(saved, saved) == ([], [])
    # "train.eval_every" must not cover a hypothetical "train.eval_everything".
    assert run_config.compare_configs({"train": {"eval_everything": 1}}, {"train": {"eval_everything": 2}})[0]
    assert (
        run_config.compare_configs(
            saved, current, harmless_prefixes=("model.", "loss.objective", "train.", "checkpoint.", "data.eval")
        )[0]
        == []
    )


def test_harmless_prefixes_name_existing_config_keys(load_config):
    """Every harmless prefix names a key of the real config (a renamed key would silently turn breaking)."""
    keys = run_config._flatten(run_config.config_dict(load_config("configs/gemma.py")))
    for prefix in run_config.HARMLESS_PREFIXES:
        assert any(run_config._matches(k, prefix) for k in keys), prefix


# What runs written before each ADDED_LATER key existed did: the base config's default for such a
# key must stay this value, or those runs would resume, score and export as something they were not.
OLDER_RUNS = {
    "model": {
        "lora": {
            "rank": 0,
            "alpha": 16.0,
            "dropout": 0.0,
            "targets": r"mlp\.(gate_proj|up_proj|down_proj|fc1|fc2)\.weight$",
            "train_lm_head": False,
            "train_embeddings": False,
        },
        "attention": "auto",
        "scan_layers": False,
        "remat_policy": "nothing",
    },
    "data": {
        "truncation": "always",
        "degenerate": "skip",
        "batching": "length_grouped",
        "eval_subsample": 0,
        "eval_subsample_seed": 0,
        "packing": False,
        "pack_length": 0,
        "pack_rows": 0,
        "share_prompt": False,
        "split_seed": 0,  # ADDED_LATER_FROM: the run's train.seed (0 in this config)
    },
    "loss": {"dpo_scale_by_alpha": False},
    "train": {"profile_steps": ""},
    "optim": {"moment_dtype": "float32"},
    "bon": {"n": 4},  # Best-of-N's N: the paper's N for Phi-2 (before the key, bon drew 4)
}


def test_keys_added_later_take_what_older_runs_did(load_config):
    """A checkpoint's config from before the ADDED_LATER keys gets exactly the values those runs ran
    with (a full-size preset's scan_layers=True included: older runs had per-layer parameters),
    filled from haf_jax.config.base; any other missing key stays missing, so resume still refuses it."""
    import dataclasses

    from haf_jax.config import base
    from haf_jax.model.lora import LoraConfig

    assert OLDER_RUNS["model"]["lora"] == dataclasses.asdict(LoraConfig())
    assert {f"{section}.{key}" for section, keys in OLDER_RUNS.items() for key in keys} == set(base.ADDED_LATER)
    current = run_config.config_dict(load_config("configs/gemma.py:gemma-2b"))
    saved = {
        section: {k: v for k, v in values.items() if k not in OLDER_RUNS.get(section, {})}
        for section, values in current.items()
    }
    del saved["data"]["max_length"]  # not a key added later: no default
    filled = base.with_added_defaults(saved)
    for section, values in OLDER_RUNS.items():
        assert {k: filled[section][k] for k in values} == values, section
    assert "max_length" not in filled["data"]
    breaking, _ = run_config.compare_configs(filled, current)
    assert "data.max_length: saved='<missing>' current=512" in breaking
    assert "model.scan_layers: saved=False current=True" not in breaking  # a harmless layout change
    # a section present in part is completed key by key; a value the run recorded is kept
    partial = base.with_added_defaults({"model": {"lora": {"rank": 8}, "scan_layers": True}})
    assert partial["model"]["lora"] == {**OLDER_RUNS["model"]["lora"], "rank": 8}
    assert partial["model"]["scan_layers"] is True and partial["optim"] == {"moment_dtype": "float32"}


def test_other_model_shape_is_an_error_not_corruption(tmp_path):
    state = make_state(mesh_of(1))
    with Checkpointer(tmp_path, every_steps=1) as c:
        save(c, 1, state)
    want = abstract(mesh_of(1), state)
    want["params"]["mlp"]["b"] = jax.ShapeDtypeStruct((64,), jnp.float32, sharding=want["params"]["mlp"]["b"].sharding)
    c = Checkpointer(tmp_path, every_steps=1)
    with pytest.raises(ValueError, match=r"\['params'\]\['mlp'\]\['b'\]: saved=\[\[32\], 'float32'\] wanted=\[\[64\]"):
        c.restore(None, want)
    assert c.latest_step() == 1  # still a good checkpoint
    c.close()
