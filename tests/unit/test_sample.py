"""haf_jax.generation.candidates (haf_jax.sample) / haf_jax.generation.decode: greedy decoding against
transformers' generate and the llama2.c model's known greedy ids, top-p / top-k / temperature sampling
against a NumPy nucleus computed from the model's own logits, seeds, EOS stops, and prompt-file errors.

The tiny models are random transformers models with every weight perturbed (tests/helpers/word_models.py),
saved as safetensors with a word-level tokenizer and loaded through haf_jax.evaluation.loading.load_model, the
path the CLI takes. Each decode shape compiles once per module (the settings are shared).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers as T
from helpers.aidreams import GREEDY_60, readme_greedy_ids
from helpers.commands import command
from helpers.word_models import BOS, EOS, FAMILIES, V, build_causal_lm

from haf_jax.core import sharding
from haf_jax.data import DataError
from haf_jax.evaluation.loading import load_model
from haf_jax.generation import candidates as sample_lib, decode as sampling
from haf_jax.model import heads, llama2c

T.logging.set_verbosity_error()

MAX_NEW = 12
# word counts of the prompts, decoded together in one batch (ids: BOS + words, lengths 2 to 14)
PROMPT_WORDS = (1, 4, 9, 13)


def prompt_texts(rng, counts=PROMPT_WORDS):
    return [" ".join(f"w{i}" for i in rng.integers(3, V, c)) for c in counts]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def one_device_mesh():
    return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_device_mesh):
    """family -> (directory, torch model, params, ModelConfig, tokenizer)."""
    out = {}
    for seed, family in enumerate(FAMILIES):
        directory = tmp_path_factory.mktemp(family)
        model = build_causal_lm(family, directory, seed)
        m = load_model(str(directory), one_device_mesh, float32=True)
        out[family] = (directory, model, m.params, m.model_cfg, m.tokenizer)
    return out


def _settings(**kw):
    return sampling.DecodeSettings(**{"max_new_tokens": MAX_NEW, "eos_ids": (EOS,), **kw})


def _hf_greedy(model, ids, eos=EOS):
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _greedy(params, config, ids, **settings):
    temps = np.zeros((len(ids), 1), np.float32)
    out = sample_lib.generate_candidates(
        params,
        config,
        ids,
        temps,
        settings=_settings(**settings),
        batch_size=len(ids),
        max_prompt_length=64,
        progress=False,
    )
    return [(c[0][0].tolist(), c[0][1]) for c in out]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_equals_transformers_generate(tiny, family):
    """Prompts of 2 to 14 tokens decoded in one right-padded batch with temperature 0 give, token for
    token, what transformers' generate(do_sample=False) gives each prompt alone."""
    _, model, params, config, tok = tiny[family]
    ids = sample_lib.encode_prompts(tok, prompt_texts(np.random.default_rng(1)), template="none", max_prompt_length=64)
    assert [len(x) for x in ids] == [c + 1 for c in PROMPT_WORDS] and all(x[0] == BOS for x in ids)
    ours = _greedy(params, config, ids)
    for x, (got, eos) in zip(ids, ours):
        want = _hf_greedy(model, x.tolist())
        assert got == want, (family, x.tolist())
        assert eos == (EOS in want)
    if family == "mistral":  # the window really cuts: positions reach past it
        assert config.sliding_window < max(len(x) for x in ids) + MAX_NEW


def test_eos_stops_the_candidate(tiny):
    """A token the greedy run produces at step >= 2 of the first prompt, made a second EOS id: that
    row ends right after it (EOS included, flagged), as transformers' generate ends; the other rows
    end at their own first stop id or at max_new_tokens."""
    _, model, params, config, tok = tiny["llama"]
    ids = sample_lib.encode_prompts(tok, prompt_texts(np.random.default_rng(1)), template="none", max_prompt_length=64)
    free = _greedy(params, config, ids)
    first = free[0][0]
    assert not free[0][1] and len(first) == MAX_NEW
    stop = next(t for k, t in enumerate(first) if k >= 2 and t not in first[:k])
    stopped = _greedy(params, config, ids, eos_ids=(EOS, stop))
    for x, (full, _), (got, eos) in zip(ids, free, stopped):
        cut = full[: full.index(stop) + 1] if stop in full else full
        assert got == cut and eos == (cut[-1] in (EOS, stop))
        assert got == _hf_greedy(model, x.tolist(), eos=[EOS, stop])
    assert len(stopped[0][0]) < MAX_NEW and stopped[0][1]


def test_llama2c_greedy_ids(shared_data, tmp_path, one_device_mesh):
    """The real tiny llama2.c model (aidreams260K), converted to a HF Llama and loaded like any
    checkpoint, decodes greedily from BOS to the documented ids (../shared/data/README.md lists
    the first 20; tests/helpers/aidreams.py pins 60, cross-checked there by a NumPy forward)."""
    src = shared_data / "aidreams260K"
    if not (src / "aidreams260K.bin").is_file():
        pytest.skip(f"aidreams260K not found in {src}")
    assert readme_greedy_ids(shared_data) == GREEDY_60[:20]
    ckpt = llama2c.to_hf_llama(src / "aidreams260K.bin", src / "tok512.bin", tmp_path / "aidreams")
    m = load_model(str(ckpt), one_device_mesh, float32=True)
    params, config, tok = m.params, m.model_cfg, m.tokenizer
    assert tok.bos_token_id == GREEDY_60[0] and tok.eos_token_id not in GREEDY_60
    settings = sampling.DecodeSettings(max_new_tokens=len(GREEDY_60) - 1, eos_ids=(tok.eos_token_id,))
    out = sample_lib.generate_candidates(
        params,
        config,
        [np.array([tok.bos_token_id], np.int32)],
        np.zeros((1, 1), np.float32),
        settings=settings,
        progress=False,
    )
    assert [GREEDY_60[0]] + out[0][0][0].tolist() == GREEDY_60


# ----------------------------------------------------------------------------- sampling maths


def numpy_allowed(logits_V, temperature, top_k=0, top_p=1.0, slack=0.0):
    """bool [V]: the tokens inside the top-k and then top-p nucleus of softmax(logits / T), float64.
    The nucleus: most likely first, a token is in while the mass of the tokens before it is
    < top_p (+ slack for float32 rounding at the boundary)."""
    z = np.asarray(logits_V, np.float64) / temperature
    keep = np.ones(z.shape, bool)
    if top_k:
        keep = z >= np.sort(z)[::-1][top_k - 1]
        z = np.where(keep, z, -np.inf)
    if top_p < 1.0:
        order = np.argsort(-z, kind="stable")
        p = np.exp(z[order] - z[order][0])
        p /= p.sum()
        before = np.cumsum(p) - p
        inside = np.zeros(z.shape, bool)
        inside[order] = before < top_p + slack
        keep &= inside
    return keep


def test_allowed_tokens_equal_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 50)).astype(np.float32)
    temps = np.array([0.5, 0.7, 1.0, 1.2, 2.0, 1.0], np.float32)
    allowed = jax.jit(sampling.allowed_tokens)  # top_k, top_p traced: one compile
    for top_k, top_p in [(0, 0.85), (5, 1.0), (8, 0.6), (1, 0.9), (0, 1.0)]:
        got = np.asarray(allowed(jnp.asarray(logits), jnp.asarray(temps), top_k, top_p))
        want = np.stack([numpy_allowed(row, t, top_k, top_p) for row, t in zip(logits, temps)])
        np.testing.assert_array_equal(got, want, err_msg=str((top_k, top_p)))
        if (top_k, top_p) != (0, 1.0):
            assert 1 <= got.sum(-1).min() and got.sum(-1).max() < logits.shape[1]  # the filters cut


@pytest.mark.parametrize("spread", [8.0, 0.3])
def test_allowed_tokens_past_the_nucleus_candidates_equal_numpy(spread):
    """A 2,000-token vocabulary: peaked rows (spread 8) whose top-k sets and nuclei end inside the
    NUCLEUS_CANDIDATES largest logits (read from lax.top_k), and flat rows (spread 0.3) whose do not
    (their thresholds bisected for): both equal NumPy."""
    rng = np.random.default_rng(1)
    logits = rng.normal(0, spread, (4, 2000)).astype(np.float32)
    temps = np.array([0.5, 1.0, 1.2, 0.8], np.float32)
    allowed = jax.jit(sampling.allowed_tokens)
    c = sampling.NUCLEUS_CANDIDATES
    for top_k, top_p in [(0, 0.85), (8, 1.0), (0, 0.6), (200, 1.0), (200, 0.9), (1000, 1.0)]:
        got = np.asarray(allowed(jnp.asarray(logits), jnp.asarray(temps), top_k, top_p))
        want = np.stack([numpy_allowed(row, t, top_k, top_p) for row, t in zip(logits, temps)])
        np.testing.assert_array_equal(got, want, err_msg=str((top_k, top_p)))
        if top_k == 0 and top_p < 1.0:  # which way the rows went: all nuclei inside the candidates or not
            assert (want.sum(-1).max() < c) == (spread > 1), want.sum(-1)


def test_allowed_tokens_bisected_past_the_candidates_equal_numpy():
    """A 6,000-token vocabulary: flat rows whose nuclei and top-k sets (600, 3,000) reach far past
    the NUCLEUS_CANDIDATES largest logits, so their thresholds are bisected for over order keys,
    one with masked (-inf) tokens, beside a peaked row the candidates decide (with top_k off):
    equal to NumPy, with top_k off and on and several top_p. A row of equal logits keeps every
    token (ties at the threshold go together; NumPy's stable order would cut them). The compiled
    function sorts no row (XLA's CPU TopK, not a full sort behind lax.top_k).

    The k-th largest is found exactly, and the nucleus's boundary is where the mass of the more
    likely tokens crosses top_p in both; the bisection only sums that mass in another order than
    NumPy's float64 running sum, so a token could flip only if its mass sat within float32 rounding
    of top_p: with this seed none does, and the comparison is exact."""
    rng = np.random.default_rng(3)
    vocab, c = 6000, sampling.NUCLEUS_CANDIDATES
    logits = rng.normal(0, [[0.3], [0.5], [1.0], [8.0], [0.4]], (5, vocab)).astype(np.float32)
    logits[4, rng.choice(vocab, 500, replace=False)] = -np.inf
    temps = np.array([1.2, 0.5, 1.0, 0.7, 0.9], np.float32)
    tied_and_logits = np.r_[np.full((1, vocab), 0.25, np.float32), logits]
    allowed = jax.jit(sampling.allowed_tokens)
    args = (jnp.asarray(tied_and_logits), jnp.asarray(np.r_[np.float32(1.0), temps]))
    hlo = allowed.lower(*args, 0, 0.85).compile().as_text()
    assert "sort(" not in hlo
    for top_k, top_p in [(0, 0.85), (0, 0.6), (0, 0.97), (600, 1.0), (3000, 1.0), (600, 0.9), (3000, 0.5)]:
        got = np.asarray(allowed(*args, top_k, top_p))
        want = np.stack([numpy_allowed(row, t, top_k, top_p) for row, t in zip(logits, temps)])
        np.testing.assert_array_equal(got[1:], want, err_msg=str((top_k, top_p)))
        assert got[0].all()
        sizes = want.sum(-1)
        # the flat rows' nuclei (or top-k sets) past the candidates, the peaked row's inside; every row cut
        assert c < (top_k or sizes[[0, 1, 2, 4]].min()) and (top_k > 0 or sizes[3] < c), sizes
        assert (sizes < np.isfinite(logits).sum(-1)).all(), sizes


# Upper 1e-6 quantiles of the chi-square distribution with 1..7 degrees of freedom
# (scipy.stats.chi2.isf(1e-6, df)): a correct sampler fails a check about once in a million runs.
CHI2_1E6 = {1: 23.93, 2: 27.63, 3: 30.66, 4: 33.38, 5: 35.89, 6: 38.26, 7: 40.52}


@pytest.mark.parametrize("top_p", [1.0, 0.85])
def test_draws_follow_the_tempered_and_renormalised_distribution(top_p):
    """40,000 draws per temperature from one row of 8 logits: each token's count against
    softmax(z / T), restricted to the top-p nucleus and renormalised there (numpy_allowed, float64),
    by a chi-square test; a token outside the nucleus is never drawn. At top_p 0.85 the nucleus holds
    2, 3, 4 and 6 tokens at T = 0.5, 0.7, 1.0, 2.0; a sampler that ignored T or did not renormalise
    would be off by thousands of draws."""
    z = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0], np.float32)
    temps, n = (0.5, 0.7, 1.0, 2.0), 40_000
    temperature_N = np.repeat(np.asarray(temps, np.float32), n)
    keys = jax.random.split(jax.random.key(7), len(temperature_N))
    draw = jax.jit(sampling.next_tokens)  # top_k, top_p traced: one compile for both cases
    tokens = np.asarray(draw(keys, jnp.broadcast_to(z, (len(temperature_N), len(z))), temperature_N, 0, top_p))
    for i, t in enumerate(temps):
        counts = np.bincount(tokens[i * n : (i + 1) * n], minlength=len(z))
        inside = numpy_allowed(z, t, 0, top_p)
        p = np.exp(z.astype(np.float64) / t) * inside
        expected = n * p / p.sum()
        assert counts[~inside].sum() == 0, (t, counts)
        chi2 = float(np.sum((counts[inside] - expected[inside]) ** 2 / expected[inside]))
        assert chi2 < CHI2_1E6[int(inside.sum()) - 1], (t, chi2, counts, expected.round(1))
    if top_p < 1.0:
        assert [int(numpy_allowed(z, t, 0, top_p).sum()) for t in temps] == [2, 3, 4, 6]


@pytest.fixture(scope="module")
def sampled(tiny):
    """Candidates of three prompts (n = 4, the paper's temperatures) under several settings."""
    _, _, params, config, tok = tiny["llama"]
    ids = sample_lib.encode_prompts(
        tok, prompt_texts(np.random.default_rng(2), (3, 8, 5)), template="none", max_prompt_length=64
    )
    temps = sample_lib.candidate_temperatures(
        len(ids), 4, seed=0, temperature=None, temperature_range=sample_lib.PAPER_TEMPERATURE_RANGE
    )

    def run(seed, **kw):
        # one prompt x 4 candidates per batch: the rows and width of the greedy tests (no new compile)
        return sample_lib.generate_candidates(
            params,
            config,
            ids,
            temps,
            settings=_settings(**kw),
            seed=seed,
            batch_size=1,
            max_prompt_length=64,
            progress=False,
        )

    return ids, temps, run


def _as_lists(out):
    return [[(c.tolist(), e) for c, e in cands] for cands in out]


def test_sampling_is_reproducible_per_seed(sampled):
    _, temps, run = sampled
    assert ((temps >= 0.5) & (temps <= 1.2)).all() and len(np.unique(temps)) == temps.size
    a, b, c = (_as_lists(run(seed, top_p=0.85)) for seed in (0, 0, 1))
    assert a == b
    assert a != c
    assert len({tuple(ids) for cands in a for ids, _ in cands}) > 6  # the candidates differ


@pytest.mark.parametrize("top_k,top_p", [(0, 0.85), (4, 0.9)])
def test_sampled_tokens_are_inside_the_nucleus(tiny, sampled, top_k, top_p):
    """Every sampled token lies in the NumPy top-k/top-p set of the model's logits at its step
    (recomputed by a full forward over prompt + candidate, at the candidate's temperature); the
    same draws without filters leave that set, so the check can fail."""
    _, _, params, config, _ = tiny["llama"]
    ids, temps, run = sampled
    width = 32  # every prompt + candidate, right-padded: one compile of the full forward

    @jax.jit
    def full_logits(tokens, last):
        return heads.full_logits(params, config, tokens, last)

    def outside(out):
        seqs = [np.concatenate([ids[i], new]) for i, cands in enumerate(out) for new, _ in cands]
        tokens = np.zeros((len(seqs), width), np.int32)
        for r, seq in enumerate(seqs):
            tokens[r, : len(seq)] = seq
        logits = np.asarray(full_logits(tokens, np.array([len(s) - 1 for s in seqs], np.int32)))
        count, total, r = 0, 0, 0
        for i, cands in enumerate(out):
            for j, (new, _) in enumerate(cands):
                for k, token in enumerate(new):
                    allowed = numpy_allowed(logits[r, len(ids[i]) + k - 1], temps[i, j], top_k, top_p, slack=1e-5)
                    count += not allowed[token]
                    total += 1
                r += 1
        return count, total

    bad, total = outside(run(0, top_k=top_k, top_p=top_p))
    assert bad == 0 and total >= 3 * 4 * 3
    unfiltered, _ = outside(run(0))
    assert unfiltered > 0


# ----------------------------------------------------------------------------- prompt files


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"prompt": "a"}', '{"text": "b"}'], r"p\.jsonl line 2, field 'prompt': missing"),
        (['{"prompt": 3}'], r"p\.jsonl line 1, field 'prompt': expected a string, got number"),
        (['{"prompt": "a"}', "", '{"prompt": "b"'], r"p\.jsonl line 3: malformed JSON"),
        (['["a"]'], r"p\.jsonl line 1: found a JSON array where JSON lines"),
        (['{"prompt": "  "}'], r"p\.jsonl line 1, field 'prompt': empty prompt"),
        ([""], r"p\.jsonl: no prompts \(empty file\)"),
    ],
)
def test_bad_prompt_file_names_file_line_and_field(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message):
        sample_lib.read_prompts(str(path))


def test_prompt_file_rows_and_template(tmp_path, tiny):
    """ids are carried over; the phi2 template formats the prompt as in training pairs."""
    from haf_jax.data import tokenize

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "w5 w6", "id": "x"}) + "\n" + json.dumps({"prompt": "w7", "other": 1}) + "\n")
    assert sample_lib.read_prompts(str(path)) == [{"prompt": "w5 w6", "id": "x"}, {"prompt": "w7"}]
    tok = tiny["llama"][4]
    got = sample_lib.encode_prompts(tok, ["w5 w6 w7 w8"], template="mistral", max_prompt_length=4)
    pair = tokenize.encode_pairs(
        tok,
        [{"prompt": "[INST] w5 w6 w7 w8 [/INST]", "chosen": "w9", "rejected": "w10"}],
        max_length=16,
        max_prompt_length=4,
    )
    # "[INST]" and "[/INST]" are unknown words (id 0); the prompt keeps BOS and its last 3 tokens
    assert got[0].tolist() == pair.prompt[0].tolist() == [BOS, 7, 8, 0]
    with pytest.raises(DataError, match="unknown template"):
        sample_lib.encode_prompts(tok, ["w5"], template="chatml", max_prompt_length=4)


@pytest.mark.slow
def test_sample_cli(tiny, one_device, tmp_path, capsys):
    """The command end to end (in this process, on one device: the 8 fake ones only slow a tiny
    compile): one row per prompt in input order, the documented fields, the summary as the last
    stdout line; a bad file is one error line and exit status 2."""
    directory = tiny["llama"][0]
    texts = prompt_texts(np.random.default_rng(3), (6, 2, 9))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": t, "id": k}) + "\n" for k, t in enumerate(texts)))
    out = tmp_path / "out.jsonl"
    argv = [
        "haf_jax.sample",
        f"--model={directory}",
        f"--prompts={prompts}",
        f"--out={out}",
        "--n=3",
        "--max_new_tokens=6",
        "--batch_size=2",
        "--seed=5",
    ]
    command("haf_jax.sample").invoke(argv)  # exit 0: no SystemExit
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["prompts"] == 3 and summary["top_p"] == 0.85 and summary["temperature_range"] == [0.5, 1.2]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == list(enumerate(texts))
    tok = tiny["llama"][4]
    for r in rows:
        assert len(r["candidates"]) == len(r["candidate_ids"]) == len(r["temperatures"]) == len(r["stopped"]) == 3
        for text, new, stopped in zip(r["candidates"], r["candidate_ids"], r["stopped"]):
            assert 1 <= len(new) <= 6 and (stopped == "eos") == (new[-1] == EOS)
            assert text == tok.decode(new[:-1] if stopped == "eos" else new)
        assert all(0.5 <= t <= 1.2 for t in r["temperatures"])

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "w5"}\n{"prompt": null}\n')
    with pytest.raises(SystemExit) as exited:
        command("haf_jax.sample").invoke(argv[:2] + [f"--prompts={bad}", f"--out={out}"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert f"error: {bad} line 2, field 'prompt': expected a string, got null" in err


def test_distinct_candidates_are_the_first_n_distinct_of_2n_draws(tiny, tmp_path, one_device_mesh):
    """The paper's rule (--distinct): each row holds the first n distinct texts (stripped) of its
    2n-draw stream, which is what n = 2n plain draws give with the same seed (keys and temperatures
    per prompt and candidate index); `draws` counts what a one-at-a-time loop makes, and a prompt
    without n distinct texts in 2n draws is `short_of_n`. One-token candidates from the top 5
    tokens repeat often: with this seed draws are [7, 7, 8, 8, 5, 4], one prompt short (both rounds,
    both outcomes); greedy draws repeat always."""
    prompts = tmp_path / "p.jsonl"
    texts = prompt_texts(np.random.default_rng(11), (1, 3, 5, 2, 4, 6))
    prompts.write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    common = dict(max_new_tokens=1, top_k=5, top_p=1.0, seed=0, mesh=one_device_mesh, progress=False)
    model = str(tiny["llama"][0])
    # 2 prompts x 4 candidates and 1 prompt x 8: one batch shape, one compile for the three calls
    rows, summary = sample_lib.sample(model, str(prompts), n=4, distinct=True, batch_size=2, **common)
    stream, _ = sample_lib.sample(model, str(prompts), n=8, batch_size=1, **common)
    shorts = 0
    for row, full in zip(rows, stream):
        keep = sample_lib.distinct_indices(full["candidates"], 4)
        assert row["candidates"] == [full["candidates"][j] for j in keep]
        assert row["candidate_ids"] == [full["candidate_ids"][j] for j in keep]
        assert row["temperatures"] == [full["temperatures"][j] for j in keep]
        assert len({c.strip() for c in row["candidates"]}) == len(row["candidates"])
        assert row["draws"] == sample_lib.draws_needed(full["candidates"], 4)
        assert row.get("short_of_n", False) == (len(keep) < 4)
        shorts += len(keep) < 4
    draws = [r["draws"] for r in rows]
    assert min(draws) == 4 < max(draws) and 0 < shorts < len(rows), (draws, shorts)  # both rounds, both outcomes
    assert summary["short_of_n"] == shorts and summary["draws"] == sum(draws) and summary["distinct"] is True

    greedy, summary = sample_lib.sample(
        model, str(prompts), n=4, distinct=True, batch_size=2, **{**common, "temperature": 0.0}
    )
    assert all(len(r["candidates"]) == 1 and r["draws"] == 8 and r["short_of_n"] for r in greedy)
    assert summary["short_of_n"] == len(texts)
    assert sample_lib.distinct_indices(["a", " a", "b", "a ", "c"], 3) == [0, 2, 4]
    assert sample_lib.draws_needed(["a", " a", "b", "a ", "c", "d"], 3) == 5
    assert sample_lib.draws_needed(["a", "a"], 2) == 2
