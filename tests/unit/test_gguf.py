"""haf_jax.model.gguf: GGUF files -> Hugging Face directories, on small GGUFs written the way
llama.cpp writes them (tests/helpers/gguf_files.py).

* every architecture: the converted directory's logits (transformers, float32) equal the transformers
  model the file was written from (so llama.cpp's Q/K interleave, Gemma's 1 + w norms and Phi-2's fused
  qkv are undone), and equal transformers' own GGUF load where transformers reads that architecture;
* every tensor type the real SmolLM2 file lacks: transformers' own GGUF load of the same file;
  Q8_0 / Q4_0 / Q4_1 also against a NumPy dequantisation written here from the block layouts;
* the tokenizer against the tokenizer the vocabulary was trained as (byte-level BPE) and against
  SentencePiece itself (Llama 2's tokenizer.model as a GGUF vocabulary), and the chat template;
* a .gguf as a checkpoint (converted once into a cache keyed by the file's hash) through load_model;
* bad input: not a GGUF, an unsupported architecture, an unsupported tensor type, a non-empty output
  directory, each a clear message (the CLI: one `error:` line, exit status 2 from argparse's
  SystemExit with the message).
The real SmolLM2-135M file is tested in tests/e2e/test_e2e_smollm2.py.
"""

import json

import numpy as np
import pytest
import torch
import transformers as T
from helpers import gguf_files as G

from haf_jax.model import gguf as gguf_lib

T.logging.set_verbosity_error()
TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "  Two spaces, digits 1234567 and tabs\t\there.\n\nNew paragraph: it's über-cool.",
    "def f(x):\n    return x ** 2  # squares",
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def bpe():
    return G.byte_level_tokenizer(TEXTS * 20 + ["the and of to in is it that for on with as was he"] * 10)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _ids(bpe):
    return [bpe.encode(TEXTS[0]).ids[:20], bpe.encode(TEXTS[1]).ids[:20]]


def _load(directory):
    model = T.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager")
    return model.eval()


def _transformers_gguf(path):
    return T.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()


@pytest.mark.parametrize("arch", sorted(G.ARCHS))
def test_architectures_equal_the_model_written(arch, tmp_path, bpe):
    source = G.random_model(arch, seed=3)
    path = G.write_gguf(tmp_path / f"{arch}.gguf", source, arch, bpe)
    out = gguf_lib.to_hf(path, tmp_path / "hf")
    ids = _ids(bpe)
    want = _logits(source, ids)
    got = _logits(_load(out), ids)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)
    # transformers' GGUF loader reads llama and qwen2 faithfully; its gemma2 config leaves
    # query_pre_attn_scalar at the 256 default (llama.cpp: the head size), phi2 and gemma 1 it refuses
    if arch in ("llama", "qwen2"):
        np.testing.assert_allclose(_logits(_transformers_gguf(path), ids), got, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]
)
def test_tensor_types_equal_transformers_gguf_load(qtype, tmp_path, bpe):
    wide = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    source = G.random_model("llama", seed=5, **wide)
    path = G.write_gguf(tmp_path / f"{qtype}.gguf", source, "llama", bpe, qtype=qtype, seed=5)
    got = _logits(_load(gguf_lib.to_hf(path, tmp_path / "hf")), _ids(bpe))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, _logits(_transformers_gguf(path), _ids(bpe)), atol=1e-4, rtol=1e-4)
    if qtype in ("F16", "BF16", "Q8_0"):  # near the float model (a garbled tensor is off by ~100%)
        want = _logits(source, _ids(bpe))
        assert np.mean(np.abs(got - want)) < 0.05 * np.mean(np.abs(want))


def _numpy_blocks(raw: np.ndarray, qtype: str) -> np.ndarray:
    """Q8_0: f16 d, 32 int8 (x = d q); Q4_0: f16 d, 16 bytes of nibbles, low nibbles the first 16
    values (x = d (q - 8)); Q4_1: f16 d, f16 m, 16 bytes (x = d q + m). raw: [rows, bytes]."""
    rows = raw.shape[0]
    size = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[qtype]
    b = raw.reshape(rows, -1, size)
    d = b[..., :2].copy().view(np.float16).astype(np.float32)
    if qtype == "Q8_0":
        return (d * b[..., 2:].copy().view(np.int8)).reshape(rows, -1)
    start = 2 if qtype == "Q4_0" else 4
    q = np.concatenate([b[..., start:] & 0x0F, b[..., start:] >> 4], axis=-1).astype(np.float32)
    if qtype == "Q4_0":
        return (d * (q - 8)).reshape(rows, -1)
    m = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    return (d * q + m).reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
def test_block_dequantisation_against_numpy(qtype, tmp_path, bpe):
    source = G.random_model("llama", seed=7)
    path = G.write_gguf(tmp_path / "m.gguf", source, "llama", bpe, qtype=qtype)
    reader = gguf_lib._reader(path)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_down.weight")
    assert t.tensor_type.name == qtype
    want = _numpy_blocks(np.asarray(t.data), qtype)
    np.testing.assert_array_equal(gguf_lib.dequantize(t, "test"), want)
    x = source.model.layers[0].mlp.down_proj.weight.detach().numpy()
    assert want.shape == x.shape and np.max(np.abs(want - x)) < 0.2 * np.max(np.abs(x))


def test_tokenizer_and_chat_template(tmp_path, bpe):
    template = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    # a llama file: transformers 5 loads a qwen2 directory's tokenizer as its own Qwen2Tokenizer, whose
    # pre-tokenizer replaces the one in tokenizer.json
    path = G.write_gguf(tmp_path / "m.gguf", G.random_model("llama"), "llama", bpe, chat_template=template)
    out = gguf_lib.to_hf(path, tmp_path / "hf")
    tok = T.AutoTokenizer.from_pretrained(out)
    for text in TEXTS + ["<s>user: hi</s>"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == bpe.encode(text).ids, text
        assert tok.decode(bpe.encode(text).ids) == text
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert rendered == "<s>user: hi</s>"
    assert tok(rendered, add_special_tokens=False)["input_ids"][0] == 0  # control token kept whole
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["tie_word_embeddings"]) == (0, 1, False)


def test_sentencepiece_vocabulary_against_sentencepiece(tmp_path, shared_data):
    """Llama 2's tokenizer.model written as a GGUF `llama` vocabulary (pieces, scores, types): our
    rebuilt tokenizer encodes and decodes as SentencePiece does."""
    import sentencepiece as spm
    from gguf import GGUFWriter

    sp = spm.SentencePieceProcessor(model_file=str(shared_data / "llama2-tokenizer" / "tokenizer.model"))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    w = GGUFWriter(str(tmp_path / "v.gguf"), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list([sp.id_to_piece(i) for i in range(n)])
    w.add_token_scores([sp.get_score(i) for i in range(n)])
    w.add_token_types(types)
    w.add_bos_token_id(sp.bos_id())
    w.add_eos_token_id(sp.eos_id())
    w.add_unk_token_id(sp.unk_id())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    meta = gguf_lib.read_metadata(gguf_lib._reader(tmp_path / "v.gguf"))
    tok = gguf_lib.gguf_tokenizer.build_tokenizer(meta)
    for text in TEXTS + ["ünïcödé 日本語 🤖", " leading space"]:
        assert tok(text)["input_ids"] == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text))


def test_gguf_checkpoint_is_converted_once_into_a_hash_keyed_cache(tmp_path, bpe, monkeypatch, one_device):
    from haf_jax.core import sharding
    from haf_jax.evaluation.loading import load_model
    from haf_jax.model import hf

    path = G.write_gguf(tmp_path / "m.gguf", G.random_model("llama", seed=1), "llama", bpe)
    monkeypatch.setenv("HAF_JAX_CACHE", str(tmp_path / "cache"))
    first = hf.resolve_checkpoint(str(path))
    assert first.parent == tmp_path / "cache" / "gguf" and (first / "config.json").is_file()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    model = load_model(str(path), sharding.make_mesh((1, 1, 1), devices=[one_device]))
    assert model.source == str(first) and model.model_cfg.family == "llama"
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not redone
    G.write_gguf(path, G.random_model("llama", seed=2), "llama", bpe)  # new content, same name
    assert hf.resolve_checkpoint(str(path)) != first


def _bad(path, message, tmp_path):
    with pytest.raises(SystemExit) as e:
        gguf_lib.main([str(path), str(tmp_path / "out")])
    assert str(e.value).startswith("error: ") and message in str(e.value), str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_files(tmp_path, bpe):
    (tmp_path / "junk.gguf").write_bytes(b"GGUF" + b"\x00" * 7)
    _bad(tmp_path / "junk.gguf", "not a readable GGUF file", tmp_path)
    _bad(tmp_path / "missing.gguf", "no such GGUF file", tmp_path)
    source = G.random_model("llama")
    path = G.write_gguf(tmp_path / "m.gguf", source, "llama", bpe)
    data = path.read_bytes().replace(b"llama", b"mamba")  # the architecture name and its key prefix
    (tmp_path / "mamba.gguf").write_bytes(data)
    _bad(tmp_path / "mamba.gguf", "general.architecture='mamba' is not supported", tmp_path)


def test_unsupported_tensor_type(tmp_path, bpe, monkeypatch):
    from gguf import GGUFWriter

    real = G.tokenizer_metadata

    def with_int8_tensor(w: GGUFWriter, *a, **k):
        real(w, *a, **k)
        w.add_tensor("blk.0.extra_i8.weight", np.ones((4, 32), np.int8))

    monkeypatch.setattr(G, "tokenizer_metadata", with_int8_tensor)
    path = G.write_gguf(tmp_path / "i8.gguf", G.random_model("llama"), "llama", bpe)
    _bad(path, "tensor 'blk.0.extra_i8.weight' has type I8", tmp_path)


def test_output_directory_must_be_new(tmp_path, bpe):
    path = G.write_gguf(tmp_path / "m.gguf", G.random_model("llama"), "llama", bpe)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(SystemExit, match="error: .*exists and is not an empty directory"):
        gguf_lib.main([str(path), str(tmp_path / "out")])
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
