"""Batches, buckets, the resumable loader, and host sharding (simulated and 2 real processes)."""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from haf_jax.data import PairLoader, PairOptions, length_buckets, load_pairs, sample_paths

N_PAIRS = 96


def write_data(path, n=N_PAIRS):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        w = lambda k: " ".join(f"w{j}" for j in rng.integers(0, 50, size=k))
        rows.append(
            {
                "prompt": f"Question {i}: " + w(rng.integers(1, 40)),
                "chosen": " " + w(rng.integers(1, 150)),
                "rejected": " " + w(rng.integers(1, 80)),
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("d") / "pairs.jsonl")


@pytest.fixture(scope="module")
def ds(data, tok):
    return load_pairs(data, tok, PairOptions(max_length=256, max_prompt_length=64), split="all")


def check_batch(batch, ds, b):
    toks, mask, last = batch["tokens"], batch["response_mask"], batch["last_index"]
    assert toks.dtype == np.int32 and mask.dtype == np.int32 and last.dtype == np.int32
    assert batch["valid"].dtype == bool and batch["index"].dtype == np.int64
    assert toks.shape[:2] == (b, 2) and toks.shape == mask.shape and toks.shape[2] in ds.buckets
    for r in range(b):
        if not batch["valid"][r]:
            continue
        for s in range(2):
            n = last[r, s] + 1
            assert toks[r, s, last[r, s]] == 1 and (toks[r, s, n:] == 0).all()
            assert mask[r, s, last[r, s]] == 1 and mask[r, s, n:].sum() == 0 and toks[r, s, 0] == 2
        pr = np.flatnonzero(mask[r, 0])[0]
        assert (toks[r, 0, :pr] == toks[r, 1, :pr]).all()  # same prompt tokens


def test_buckets():
    assert length_buckets(512) == [64, 96, 128, 192, 256, 384, 512]
    assert length_buckets(300) == [64, 96, 128, 192, 256, 300]
    assert length_buckets(40) == [40]


def test_in_order_batches_with_filler(ds):
    batches = list(ds.batches(10))
    assert len(batches) == 10  # 96 pairs -> 9 full + 1 partial
    idx = np.concatenate([b["index"] for b in batches])
    valid = np.concatenate([b["valid"] for b in batches])
    assert idx[valid].tolist() == list(range(N_PAIRS)) and (~valid).sum() == 4
    assert (idx[~valid] == -1).all()
    for b in batches:
        check_batch(b, ds, 10)
        longest = ds.all_lengths[b["index"][b["valid"]]].max()
        assert b["tokens"].shape[2] == min(x for x in ds.buckets if x >= longest)


def epoch(loader, steps):
    return [next(loader) for _ in range(steps)]


def test_loader_deterministic_reshuffled_and_complete(ds):
    with PairLoader(ds, 8, seed=1) as a, PairLoader(ds, 8, seed=1) as b:
        ea, eb = epoch(a, 24), epoch(b, 24)
    for x, y in zip(ea, eb):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    e0 = np.concatenate([x["index"] for x in ea[:12]])
    e1 = np.concatenate([x["index"] for x in ea[12:]])
    assert sorted(e0.tolist()) == sorted(e1.tolist()) == list(range(N_PAIRS))
    assert e0.tolist() != e1.tolist()
    for x in ea:
        check_batch(x, ds, 8)
        assert x["valid"].all()
    with PairLoader(ds, 8, seed=2) as c:
        assert np.concatenate([x["index"] for x in epoch(c, 12)]).tolist() != e0.tolist()


def test_stop_and_restore_equals_not_stopping(ds):
    with PairLoader(ds, 8, seed=5) as ref:
        want = epoch(ref, 30)
    with PairLoader(ds, 8, seed=5) as a:
        epoch(a, 17)
        state = json.loads(json.dumps(a.state))
    assert state == {"epoch": 1, "position": 5, "seed": 5, "num_pairs": N_PAIRS}
    with PairLoader(ds, 8, seed=0, prefetch=0) as b:  # seed comes from the state
        b.restore(state)
        got = epoch(b, 13)
    for x, y in zip(want[17:], got):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_length_grouping_reduces_padding(ds):
    def pad_frac(**kw):
        with PairLoader(ds, 8, seed=0, **kw) as ld:
            bs = epoch(ld, 12 * 4)
        real = sum(int((b["last_index"] + 1).sum()) for b in bs)
        return 1 - real / sum(b["tokens"].size for b in bs)

    assert pad_frac(length_grouping=True) < pad_frac(length_grouping=False)


def test_simulated_processes_disjoint_union(data, tok):
    parts = [
        load_pairs(
            data, tok, PairOptions(max_length=256, max_prompt_length=64, process_index=p, process_count=2), split="all"
        )
        for p in range(2)
    ]
    assert parts[0].fingerprint == parts[1].fingerprint and parts[0].report == parts[1].report
    loaders = [PairLoader(d, 16, seed=3) for d in parts]
    seen = [set(), set()]
    for _ in range(N_PAIRS // 16):
        bs = [next(ld) for ld in loaders]
        assert bs[0]["tokens"].shape == bs[1]["tokens"].shape and bs[0]["tokens"].shape[0] == 8
        for p in range(2):
            assert all(i % 2 == p for i in bs[p]["index"])
            seen[p] |= set(bs[p]["index"].tolist())
    assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(N_PAIRS))
    for ld in loaders:
        ld.close()


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    port, pid, data, tokdir, out = sys.argv[1:]
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                               process_id=int(pid), initialization_timeout=120)
    from haf_jax.data import PairLoader, PairOptions, load_pairs, load_tokenizer
    tok = load_tokenizer(tokdir)
    ds = load_pairs(data, tok, PairOptions(max_length=256, max_prompt_length=64, process_index=jax.process_index(),
                                           process_count=jax.process_count()), split="all")
    assert len(ds.tokens.prompt) == len(ds.local_indices)          # only its slice tokenised
    ld = PairLoader(ds, 16, seed=3)
    train = [next(ld) for _ in range(8)]
    state = ld.state
    ld2 = PairLoader(ds, 16, seed=3)
    ld2.restore(state)
    nxt, nxt2 = next(ld), next(ld2)
    ev = list(ds.batches(20))
    enc = lambda b: {k: v.tolist() for k, v in b.items()}
    json.dump({"report": ds.report, "train": [enc(b) for b in train], "eval": [enc(b) for b in ev],
               "restored_equal": all(np.array_equal(nxt[k], nxt2[k]) for k in nxt)}, open(out, "w"))
    ld.close(); ld2.close()
""")


def test_two_real_processes(tmp_path, data, tok, ds):
    (tmp_path / "worker.py").write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(tmp_path / "worker.py"),
                port,
                str(p),
                data,
                str(sample_paths()["tokenizer"]),
                str(tmp_path / f"out{p}.json"),
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for p in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=240)
        assert p.returncode == 0, out.decode()[-3000:]
    res = [json.load(open(tmp_path / f"out{p}.json")) for p in range(2)]
    # global report equals the single-process one (counts were all-gathered)
    for r in res:
        assert {k: v for k, v in r["report"].items() if k != "process_count"} == {
            k: v for k, v in ds.report.items() if k != "process_count"
        }
    single = {int(i): None for i in range(N_PAIRS)}
    for b in ds.batches(N_PAIRS):
        for r, i in enumerate(b["index"]):
            single[int(i)] = (b["tokens"][r], b["last_index"][r])
    # training epoch (6 batches of 16): disjoint slices whose union is the epoch, same shapes
    seen = [[], []]
    for k in range(6):
        b0, b1 = (np.asarray(res[p]["train"][k]["tokens"]) for p in range(2))
        assert b0.shape == b1.shape and b0.shape[0] == 8
        for p in range(2):
            bp = res[p]["train"][k]
            seen[p] += bp["index"]
            for r, i in enumerate(bp["index"]):  # same tokens as the single-process data
                t, last = single[i]
                n = last[0] + 1
                assert bp["tokens"][r][0][:n] == t[0][:n].tolist()
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N_PAIRS))
    assert res[0]["restored_equal"] and res[1]["restored_equal"]
    # in-order pass: union of the processes' parts of global batch k == single-process batch k
    single_eval = list(ds.batches(20))
    for k, sb in enumerate(single_eval):
        union = sorted(i for p in range(2) for i in res[p]["eval"][k]["index"] if i >= 0)
        assert union == sorted(int(i) for i in sb["index"] if i >= 0)
        assert len(res[0]["eval"][k]["tokens"][0][0]) == sb["tokens"].shape[2]


def test_token_cache_reused(tmp_path, data, tok, ds, monkeypatch):
    options = PairOptions(max_length=256, max_prompt_length=64, cache_dir=str(tmp_path))
    first = load_pairs(data, tok, options, split="all")
    files = list(tmp_path.glob("pairs-*.npz"))
    assert len(files) == 1 and first.fingerprint in files[0].name
    monkeypatch.setattr("haf_jax.data.tokenize.encode_pairs", lambda *a, **k: 1 / 0)
    again = load_pairs(data, tok, options, split="all")  # no tokenisation this time
    assert again.report == ds.report
    for x, y in zip(ds.batches(32), again.batches(32)):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
