"""llama2.c -> Hugging Face Llama conversion (haf_jax.model.llama2c) on the real aidreams260K model.

Reference values come from ../shared/data/README.md section (c): greedy decoding from BOS gives ids
starting README_IDS and text starting ' "Echoes of vectors unfold'; mean greedy max-prob 0.566.
The README lists only the first 20 ids; the full 60 (GREEDY_60, both in tests/helpers/aidreams.py) are
pinned from this conversion and cross-checked in test (b) by an independent NumPy float64 forward on
the raw llama2.c arrays.
"""

import shutil
import struct

import numpy as np
import pytest
from helpers.aidreams import GREEDY_60, README_IDS

from haf_jax.model import llama2c

README_TEXT = ' "Echoes of vectors unfold, a gentle hum of precision, as I sense the nodes,'


@pytest.fixture(scope="module")
def files(shared_data):
    d = shared_data / "aidreams260K"
    if not (d / "aidreams260K.bin").is_file() or not (d / "tok512.bin").is_file():
        pytest.skip(f"aidreams260K model/tokenizer not found in {d}")
    return d / "aidreams260K.bin", d / "tok512.bin"


@pytest.fixture(scope="module")
def converted(files, tmp_path_factory):
    out = tmp_path_factory.mktemp("llama2c") / "hf"
    llama2c.main([str(files[0]), str(files[1]), str(out)])  # the CLI entry point, in-process
    return out


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def hf_model(converted):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(
        converted, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    return model


def _hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


# ---------------------------------------------------------------- independent NumPy reference


def _rmsnorm(x, w):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-5) * w


def _rope_interleaved(x, head_dim):
    """llama2.c's RoPE: rotate pairs (2i, 2i+1) of each head by pos * 10000^(-2i/hd). x [T, heads*hd]."""
    t = x.shape[0]
    xh = x.reshape(t, -1, head_dim // 2, 2)
    ang = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = xh[..., 0], xh[..., 1]
    return np.stack([a * cos - b * sin, a * sin + b * cos], axis=-1).reshape(x.shape)


def _rope_half(x, head_dim):
    """HF's rotate_half RoPE (pairs (i, i + hd/2)); only used to show the permutation matters."""
    t = x.shape[0]
    xh = x.reshape(t, -1, head_dim)
    ang = np.arange(t)[:, None] * 10000.0 ** (-np.arange(0, head_dim, 2) / head_dim)[None, :]
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = xh[..., : head_dim // 2], xh[..., head_dim // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1).reshape(x.shape)


def _np_forward(h, w, ids, rope=_rope_interleaved):
    """float64 llama2.c forward of the whole sequence (causal). ids [T] -> logits [T, V]."""
    w = {k: np.asarray(v, np.float64) for k, v in w.items()}
    hd, nh, nkv = h["head_dim"], h["n_heads"], h["n_kv_heads"]
    t = len(ids)
    x = w["tok_emb"][ids]
    mask = np.triu(np.full((t, t), -np.inf), 1)
    for layer in range(h["n_layers"]):
        xb = _rmsnorm(x, w["rms_att"][layer])
        q = rope(xb @ w["wq"][layer].T, hd).reshape(t, nh, hd)
        k = rope(xb @ w["wk"][layer].T, hd).reshape(t, nkv, hd)
        v = (xb @ w["wv"][layer].T).reshape(t, nkv, hd)
        k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        att = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + mask
        att = np.exp(att - att.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        x = x + np.einsum("hqk,khd->qhd", att, v).reshape(t, nh * hd) @ w["wo"][layer].T
        xb = _rmsnorm(x, w["rms_ffn"][layer])
        g = xb @ w["w1"][layer].T
        x = x + ((g / (1 + np.exp(-g))) * (xb @ w["w3"][layer].T)) @ w["w2"][layer].T
    x = _rmsnorm(x, w["rms_final"])
    return x @ (w["tok_emb"] if h["shared_classifier"] else w["wcls"]).T


def _llama2c_encode(text, pieces, scores):
    """llama2.c's encode(): dummy-prefix space, one symbol per code point (bytes + 3 when unknown),
    then merge the best-scoring adjacent pair (leftmost on ties) until none is a piece. No BOS."""
    index = {p: i for i, p in enumerate(pieces)}
    ids = []
    for ch in " " + text if text else "":
        if ch in index:
            ids.append(index[ch])
        else:
            ids.extend(b + 3 for b in ch.encode("utf-8"))
    while True:
        best = None
        for i in range(len(ids) - 1):
            j = index.get(pieces[ids[i]] + pieces[ids[i + 1]])
            if j is not None and (best is None or scores[j] > scores[best[1]]):
                best = (i, j)
        if best is None:
            return ids
        ids[best[0] : best[0] + 2] = [best[1]]


# ---------------------------------------------------------------- tests


def test_config_and_tensors(converted, files):
    import json

    from safetensors.numpy import load_file

    cfg = json.loads((converted / "config.json").read_text())
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"]
    assert (
        cfg["hidden_size"],
        cfg["intermediate_size"],
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["vocab_size"],
        cfg["max_position_embeddings"],
        cfg["head_dim"],
    ) == (64, 172, 4, 4, 4, 512, 128, 16)
    assert cfg["tie_word_embeddings"] is True and cfg["rope_theta"] == 10000.0 and cfg["rms_norm_eps"] == 1e-5
    sd = load_file(converted / "model.safetensors")
    assert "lm_head.weight" not in sd and len(sd) == 2 + 4 * 9
    h, w = llama2c.read_checkpoint(files[0])
    assert h["shared_classifier"] and h["head_dim"] == 16
    np.testing.assert_array_equal(sd["model.layers.2.mlp.up_proj.weight"], w["w3"][2])
    # per head, HF row i is llama2.c row 2i and HF row 8 + i is llama2.c row 2i + 1
    q = sd["model.layers.1.self_attn.q_proj.weight"].reshape(4, 16, 64)
    np.testing.assert_array_equal(q[3, 5], w["wq"][1].reshape(4, 16, 64)[3, 10])
    np.testing.assert_array_equal(q[3, 8 + 5], w["wq"][1].reshape(4, 16, 64)[3, 11])


def test_transformers_greedy_matches_readme(hf_model):
    """(a) transformers float32 eager from [BOS], 60 ids in all: a manual argmax loop over the whole
    prefix (no KV cache) and generate(do_sample=False), which uses the cache."""
    import torch

    ids = [1]
    with torch.no_grad():
        for _ in range(59):
            ids.append(int(hf_model(torch.tensor([ids])).logits[0, -1].argmax()))
        generated = hf_model.generate(torch.tensor([[1]]), do_sample=False, max_new_tokens=59)[0].tolist()
    assert ids[:20] == README_IDS
    assert ids == GREEDY_60
    assert generated == GREEDY_60


def test_numpy_llama2c_forward_matches_transformers(files, hf_model):
    """(b) a float64 forward on the raw llama2.c arrays (interleaved RoPE, no permutation)."""
    h, w = llama2c.read_checkpoint(files[0])
    ref = _np_forward(h, w, GREEDY_60)  # [60, V]
    # Row t of a causal forward equals the last row of a forward of the prefix ids[:t+1], so
    # "every row's argmax is the next id" is exactly "greedy decoding from BOS yields GREEDY_60".
    assert ref[:-1].argmax(-1).tolist() == GREEDY_60[1:]
    hf = _hf_logits(hf_model, GREEDY_60)
    np.testing.assert_allclose(hf, ref, rtol=0, atol=1e-4)
    p = np.exp(ref - ref.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    assert abs(p[:-1].max(-1).mean() - 0.566) < 5e-4  # README: mean greedy max-prob 0.566
    # The test can see a wrong layout: HF's rotate_half on the *unpermuted* llama2.c weights differs.
    assert np.abs(_np_forward(h, w, GREEDY_60[:20], rope=_rope_half) - ref[:20]).max() > 1e-1


def test_tokenizer_decode_and_round_trip(converted, files):
    """(c) AutoTokenizer decodes the greedy ids to the README text and encodes it back exactly."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(converted)
    assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    # Like Llama 2's tokenizer the decoder drops the one space the encoder prepends, so the text is
    # the README's minus its leading space (llama2.c's own decode keeps it).
    text = tok.decode(GREEDY_60[1:])
    assert text.startswith(README_TEXT[1:])
    assert tok.decode(GREEDY_60, skip_special_tokens=True) == text
    assert tok(text)["input_ids"] == GREEDY_60  # BOS added by the post-processor, then the exact ids
    # Encoding agrees with llama2.c's encode() (reference above) beyond the model's own output:
    # byte fallback (é, emoji, newline, tab), repeated spaces, digits, punctuation.
    pieces, scores, _ = llama2c.read_tokenizer(files[1])
    for s in [
        text,
        "Hello world, this is a test.",
        "  double  spaces\nand a newline\tTab",
        "café ☕ 2025: 87% of λμ",
        "whispers unfolding through weights' thresholds",
        "a",
        "",
    ]:
        assert tok(s, add_special_tokens=False)["input_ids"] == _llama2c_encode(s, pieces, scores), s
        assert tok.decode(tok(s)["input_ids"], skip_special_tokens=True) == s


def test_bad_files_give_clear_errors(files, tmp_path):
    """(d) truncated / trailing bytes / bad header / tokenizer of the wrong size."""
    data = files[0].read_bytes()
    bad = tmp_path / "model.bin"
    bad.write_bytes(data[:-4])
    with pytest.raises(ValueError, match=r"model\.bin: truncated: 932120 bytes.*implies 932124"):
        llama2c.read_checkpoint(bad)
    with pytest.raises(SystemExit, match="truncated"):  # the CLI reports it as an error line
        llama2c.main([str(bad), str(files[1]), str(tmp_path / "out")])
    assert not (tmp_path / "out" / "model.safetensors").exists()
    bad.write_bytes(data + b"\0" * 8)
    with pytest.raises(ValueError, match=r"model\.bin: has trailing bytes"):
        llama2c.read_checkpoint(bad)
    bad.write_bytes(struct.pack("<7i", 64, 172, 4, 0, 4, 512, 128) + data[28:])
    with pytest.raises(ValueError, match=r"model\.bin: bad llama2.c header.*n_heads"):
        llama2c.read_checkpoint(bad)
    bad.write_bytes(struct.pack("<Ii", 0x616B3432, 1) + data[8:])
    with pytest.raises(ValueError, match=r"model\.bin: a llama2.c version-1 export"):
        llama2c.read_checkpoint(bad)
    bad.write_bytes(data[:10])
    with pytest.raises(ValueError, match=r"model\.bin: 10 bytes, too short"):
        llama2c.read_checkpoint(bad)
    shutil.copy(files[0], bad)
    tok = tmp_path / "tok.bin"
    tok.write_bytes(files[1].read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"tok\.bin: truncated"):
        llama2c.to_hf_llama(bad, tok, tmp_path / "out")


def test_untied_gqa_synthetic(files, tmp_path):
    """(e) the paths the real model does not take: a separate classifier (negative vocab_size,
    lm_head.weight written) and grouped-query attention (k rows permuted per kv head)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    d, f, n_layers, nh, nkv, v, s = 32, 48, 2, 4, 2, 512, 16
    hd = d // nh
    h = dict(
        dim=d,
        hidden_dim=f,
        n_layers=n_layers,
        n_heads=nh,
        n_kv_heads=nkv,
        vocab_size=v,
        seq_len=s,
        head_dim=hd,
        shared_classifier=False,
    )
    rng = np.random.default_rng(0)
    ang = np.arange(s)[:, None] * 10000.0 ** (-np.arange(0, hd, 2) / hd)[None, :]
    w = {}
    for name, shape in llama2c._array_shapes(h):
        w[name] = (
            1 + 0.1 * rng.standard_normal(shape) if name.startswith("rms") else 0.3 * rng.standard_normal(shape)
        ).astype(np.float32)
    w["freq_cis_real"], w["freq_cis_imag"] = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
    path = tmp_path / "untied.bin"
    with open(path, "wb") as fh:
        fh.write(struct.pack("<7i", d, f, n_layers, nh, nkv, -v, s))
        for name, _ in llama2c._array_shapes(h):
            fh.write(w[name].tobytes())
    h2, w2 = llama2c.read_checkpoint(path)
    assert not h2["shared_classifier"] and h2["vocab_size"] == v
    np.testing.assert_array_equal(w2["wcls"], w["wcls"])
    out = llama2c.to_hf_llama(path, files[1], tmp_path / "hf")
    model = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
    assert model.config.tie_word_embeddings is False and model.config.num_key_value_heads == nkv
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), w["wcls"])
    ids = [1] + rng.integers(3, v, s - 1).tolist()
    np.testing.assert_allclose(_hf_logits(model, ids), _np_forward(h2, w2, ids), rtol=0, atol=1e-4)
