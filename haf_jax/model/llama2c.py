"""llama2.c checkpoints -> Hugging Face Llama checkpoint directories (safetensors + tokenizer.json).

Usage: `python -m haf_jax.model.llama2c MODEL.bin TOKENIZER.bin OUT_DIR`, or `to_hf_llama(...)`.
The result loads with `transformers.LlamaForCausalLM.from_pretrained(OUT_DIR)` and
`transformers.AutoTokenizer.from_pretrained(OUT_DIR)`, offline.

Model file ("legacy v0", the format llama2.c's `run.c` reads), all little-endian:

* a header of 7 int32: dim D, hidden_dim H (the MLP width), n_layers L, n_heads, n_kv_heads,
  vocab_size V, seq_len S. A positive vocab_size means the output classifier is the token
  embedding itself; a negative one means a separate classifier of |V| rows is stored at the end.
* then float32 arrays, back to back, no padding, every matrix stored [out, in] (row-major, so a
  matrix times a column vector): tok_emb [V, D]; rms_att [L, D]; wq [L, D, D]; wk [L, KV, D];
  wv [L, KV, D]; wo [L, D, D]; rms_ffn [L, D]; w1 [L, H, D]; w2 [L, D, H]; w3 [L, H, D];
  rms_final [D]; freq_cis_real [S, hd/2]; freq_cis_imag [S, hd/2]; and, only when the header's
  vocab_size is negative, wcls [V, D]. Here hd = D / n_heads is the head size and
  KV = n_kv_heads * hd.
* The block is the Llama one: x += wo(attn(rope(wq rms(x)), rope(wk rms(x)), wv rms(x))), then
  x += w2(silu(w1 rms(x)) * w3 rms(x)); logits = wcls rms_final(x). RMSNorm eps is 1e-5 with a
  plain (not 1 + w) scale. RoPE rotates *interleaved pairs* of each head, (q[2i], q[2i+1]) by the
  angle pos * 10000^(-2i/hd). The freq_cis tables hold cos/sin of those angles; run.c ignores
  them and recomputes with theta 10000, and so do we (the tables are only checked against it).

Hugging Face Llama rotates the pair (q[i], q[i + hd/2]) instead ("rotate_half"). Attention scores
only see q.k, which does not change when the same permutation is applied to the coordinates of
every head's q and k. Putting llama2.c's coordinate 2i at position i and 2i+1 at position
hd/2 + i turns each interleaved pair into a rotate_half pair with the same frequency, so the
per-head rows of wq and wk are reordered [0, 2, 4, ..., hd-2, 1, 3, ..., hd-1]; wv, wo and
everything else are copied as they are (w1 -> gate_proj, w3 -> up_proj, w2 -> down_proj).

Tokenizer file (llama2.c's `tokenizer.bin`): int32 max_token_len (the longest piece in bytes),
then for every id in order: float32 score, int32 byte length n, n bytes of UTF-8 (no terminator).
The pieces are SentencePiece BPE pieces with "▁" already turned into " ". Ids 0, 1, 2 are
<unk>, BOS and EOS (llama2.c's tokenizer export writes the latter two as "\\n<s>\\n" and "\\n</s>\\n" so they print on
their own line; we name them "<s>" and "</s>"), ids 3..258 the byte tokens "<0x00>".."<0xFF>"
used for characters that have no piece (byte fallback), then (typically) the merged pieces with
score -(merge rank), then single characters. Encoding (SentencePiece BPE, as llama2.c's `encode`
does it): prepend a space, replace spaces by "▁", start from one symbol per character (bytes for
unknown characters) and repeatedly merge the adjacent pair whose concatenation is a piece with the
highest score, leftmost first. Our `tokenizers` BPE reproduces that with a merge list holding,
for every piece that splits into two pieces, each such split, ranked by the merged piece's score,
and, like Llama 2's tokenizer.json, a normalizer that prepends "▁" and replaces spaces (no word
splitting), BOS added by the post-processor, and a decoder that drops the prepended space.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import struct

import numpy as np

HEADER_FIELDS = ("dim", "hidden_dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "seq_len")
_HEADER_BYTES = 4 * len(HEADER_FIELDS)
ROPE_THETA = 10000.0
RMS_NORM_EPS = 1e-5
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
_SPECIAL_NAMES = ("<unk>", "<s>", "</s>")
_FIRST_BYTE_ID = 3
_V1_MAGIC = struct.pack("<I", 0x616B3432)  # llama2.c's newer export versions start with this


def _array_shapes(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array of the file, in file order."""
    d, f, n_layers, v, s = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"], h["seq_len"]
    kv = h["n_kv_heads"] * h["head_dim"]
    shapes = [
        ("tok_emb", (v, d)),
        ("rms_att", (n_layers, d)),
        ("wq", (n_layers, d, d)),
        ("wk", (n_layers, kv, d)),
        ("wv", (n_layers, kv, d)),
        ("wo", (n_layers, d, d)),
        ("rms_ffn", (n_layers, d)),
        ("w1", (n_layers, f, d)),
        ("w2", (n_layers, d, f)),
        ("w3", (n_layers, f, d)),
        ("rms_final", (d,)),
        ("freq_cis_real", (s, h["head_dim"] // 2)),
        ("freq_cis_imag", (s, h["head_dim"] // 2)),
    ]
    if not h["shared_classifier"]:
        shapes.append(("wcls", (v, d)))
    return shapes


def read_header(path) -> dict:
    """The validated header of a legacy-v0 llama2.c .bin.

    Returns the 7 header fields (vocab_size made positive) plus `shared_classifier` (bool),
    `head_dim` (dim // n_heads) and `expected_bytes` (the exact file size the header implies).
    Raises ValueError naming the file when the header is short or inconsistent.
    """
    path = pathlib.Path(path)
    with open(path, "rb") as fh:
        raw = fh.read(_HEADER_BYTES)
    if len(raw) < _HEADER_BYTES:
        raise ValueError(f"{path}: {len(raw)} bytes, too short for the 28-byte llama2.c header")
    values = struct.unpack("<7i", raw)
    if raw[:4] == _V1_MAGIC:
        raise ValueError(
            f"{path}: a llama2.c version-{values[1]} export (magic 0x616b3432); only the legacy v0 "
            "format (export.py --version 0, the run.c default) is supported"
        )
    h = dict(zip(HEADER_FIELDS, values))
    h["shared_classifier"] = h["vocab_size"] > 0
    h["vocab_size"] = abs(h["vocab_size"])
    bad = [k for k in HEADER_FIELDS if h[k] <= 0]
    if bad:
        raise ValueError(
            f"{path}: bad llama2.c header {dict(zip(HEADER_FIELDS, values))}: "
            f"{', '.join(bad)} must be non-zero (positive)"
        )
    if h["dim"] % h["n_heads"] or (h["dim"] // h["n_heads"]) % 2:
        raise ValueError(
            f"{path}: bad llama2.c header: dim {h['dim']} is not n_heads {h['n_heads']} x an even head size"
        )
    if h["n_heads"] % h["n_kv_heads"]:
        raise ValueError(
            f"{path}: bad llama2.c header: n_heads {h['n_heads']} is not a multiple of n_kv_heads {h['n_kv_heads']}"
        )
    h["head_dim"] = h["dim"] // h["n_heads"]
    n_floats = sum(int(np.prod(shape)) for _, shape in _array_shapes(h))
    h["expected_bytes"] = _HEADER_BYTES + 4 * n_floats
    return h


def read_checkpoint(path) -> tuple[dict, dict[str, np.ndarray]]:
    """Read a legacy-v0 llama2.c model file.

    Returns (header, arrays): header as `read_header`; arrays maps the llama2.c names to read-only
    float32 arrays (views of a memory map of the file) of the shapes in the module docstring
    (tok_emb [V, D], wq [L, D, D], wk/wv [L, KV, D], w1/w3 [L, H, D], w2 [L, D, H], ..., wcls [V, D]
    only when not shared).
    Raises ValueError naming the file when it is shorter than the header implies (truncated) or
    longer (trailing bytes: usually a different llama2.c format version or wrong dimensions).
    """
    path = pathlib.Path(path)
    h = read_header(path)
    size = path.stat().st_size
    if size != h["expected_bytes"]:
        what = "truncated" if size < h["expected_bytes"] else "has trailing bytes"
        raise ValueError(
            f"{path}: {what}: {size} bytes, but the llama2.c legacy-v0 header "
            f"{ {k: h[k] for k in HEADER_FIELDS} } (shared classifier: {h['shared_classifier']}) "
            f"implies {h['expected_bytes']} bytes"
        )
    # Read-only memory map: the arrays are views of the file, nothing is copied until used.
    flat = np.memmap(path, dtype="<f4", mode="r", offset=_HEADER_BYTES)
    arrays, at = {}, 0
    for name, shape in _array_shapes(h):
        n = int(np.prod(shape))
        arrays[name] = flat[at : at + n].reshape(shape)
        at += n
    return h, arrays


def read_tokenizer(path, vocab_size: int | None = None) -> tuple[list[str], np.ndarray, int]:
    """Read a llama2.c tokenizer .bin: (pieces [V] as text, scores float32 [V], max_token_len).

    The pieces are returned as stored (spaces, not "▁"). When `vocab_size` is given the file must
    hold exactly that many pieces. Raises ValueError naming the file when it is malformed.
    """
    path = pathlib.Path(path)
    data = path.read_bytes()
    if len(data) < 4:
        raise ValueError(f"{path}: too short for a llama2.c tokenizer")
    (max_len,) = struct.unpack_from("<i", data, 0)
    pieces, scores, at = [], [], 4
    while at < len(data) and (vocab_size is None or len(pieces) < vocab_size):
        if at + 8 > len(data):
            raise ValueError(f"{path}: truncated entry for id {len(pieces)} at byte {at}")
        score, n = struct.unpack_from("<fi", data, at)
        at += 8
        if n < 0 or at + n > len(data):
            raise ValueError(f"{path}: truncated or bad piece length {n} for id {len(pieces)} at byte {at - 4}")
        try:
            pieces.append(data[at : at + n].decode("utf-8"))
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: piece {len(pieces)} is not UTF-8: {e}") from None
        scores.append(score)
        at += n
    if vocab_size is not None and (len(pieces) != vocab_size or at != len(data)):
        raise ValueError(
            f"{path}: {len(pieces)} pieces{' and trailing bytes' if at != len(data) else ''}; "
            f"the model's vocab_size is {vocab_size}"
        )
    if not pieces:
        raise ValueError(f"{path}: no pieces")
    if max(len(p.encode("utf-8")) for p in pieces) > max_len:
        raise ValueError(f"{path}: a piece is longer than the header's max_token_len {max_len}")
    return pieces, np.asarray(scores, np.float32), max_len


def rope_permutation(head_dim: int) -> np.ndarray:
    """Row order [0, 2, ..., hd-2, 1, 3, ..., hd-1] [hd] taking one head's interleaved-pair rows
    (llama2.c) to rotate_half rows (HF): new row i = old row 2i, new row hd/2 + i = old row 2i+1."""
    return np.concatenate([np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)])


def permute_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder the rows of a q or k projection [n_heads * hd, D] head by head (see rope_permutation)."""
    out_dim, d = w.shape
    hd = out_dim // n_heads
    return w.reshape(n_heads, hd, d)[:, rope_permutation(hd), :].reshape(out_dim, d)


def check_rope_tables(header: dict, arrays: dict, theta: float = ROPE_THETA, atol: float = 1e-4) -> None:
    """Raise ValueError when freq_cis_real/imag [S, hd/2] are not cos/sin(pos * theta^(-2i/hd)).

    A mismatch means the arrays were read at the wrong offsets (wrong header) or the model was
    not trained with the standard llama2.c RoPE."""
    hd = header["head_dim"]
    inv = theta ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(header["seq_len"], dtype=np.float64)[:, None] * inv[None, :]
    err = max(
        np.max(np.abs(arrays["freq_cis_real"] - np.cos(ang))), np.max(np.abs(arrays["freq_cis_imag"] - np.sin(ang)))
    )
    if not err <= atol:
        raise ValueError(
            f"the RoPE tables differ from theta={theta} by {err:.3g}: not a standard "
            "llama2.c legacy-v0 model (or misread)"
        )


def hf_state_dict(header: dict, arrays: dict) -> dict[str, np.ndarray]:
    """HF Llama tensor names -> float32 arrays [out, in] (q/k rows permuted; no lm_head when tied)."""
    nh, nkv = header["n_heads"], header["n_kv_heads"]
    sd = {"model.embed_tokens.weight": arrays["tok_emb"], "model.norm.weight": arrays["rms_final"]}
    for i in range(header["n_layers"]):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = permute_rotary(arrays["wq"][i], nh)
        sd[p + "self_attn.k_proj.weight"] = permute_rotary(arrays["wk"][i], nkv)
        sd[p + "self_attn.v_proj.weight"] = arrays["wv"][i]
        sd[p + "self_attn.o_proj.weight"] = arrays["wo"][i]
        sd[p + "mlp.gate_proj.weight"] = arrays["w1"][i]
        sd[p + "mlp.up_proj.weight"] = arrays["w3"][i]
        sd[p + "mlp.down_proj.weight"] = arrays["w2"][i]
        sd[p + "input_layernorm.weight"] = arrays["rms_att"][i]
        sd[p + "post_attention_layernorm.weight"] = arrays["rms_ffn"][i]
    if not header["shared_classifier"]:
        sd["lm_head.weight"] = arrays["wcls"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sd.items()}


def hf_config(header: dict) -> dict:
    """config.json contents of the equivalent `LlamaForCausalLM`."""
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": header["dim"],
        "intermediate_size": header["hidden_dim"],
        "num_hidden_layers": header["n_layers"],
        "num_attention_heads": header["n_heads"],
        "num_key_value_heads": header["n_kv_heads"],
        "head_dim": header["head_dim"],
        "vocab_size": header["vocab_size"],
        "max_position_embeddings": header["seq_len"],
        "rms_norm_eps": RMS_NORM_EPS,
        "rope_theta": ROPE_THETA,
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": bool(header["shared_classifier"]),
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "use_cache": True,
        "dtype": "float32",
    }


def _hf_pieces(pieces: list[str], path="tokenizer") -> list[str]:
    """llama2.c pieces [V] -> HF vocabulary strings [V]: specials renamed, " " -> "▁"."""
    if len(pieces) < _FIRST_BYTE_ID + 256:
        raise ValueError(f"{path}: {len(pieces)} pieces; expected <unk>, <s>, </s> and 256 byte tokens first")
    out = []
    for i, p in enumerate(pieces):
        if i < _FIRST_BYTE_ID:
            if p.strip() != _SPECIAL_NAMES[i]:
                raise ValueError(f"{path}: id {i} is {p!r}, expected {_SPECIAL_NAMES[i]!r}")
            out.append(_SPECIAL_NAMES[i])
        elif i < _FIRST_BYTE_ID + 256:
            if p != f"<0x{i - _FIRST_BYTE_ID:02X}>":
                raise ValueError(f"{path}: id {i} is {p!r}, expected byte token <0x{i - _FIRST_BYTE_ID:02X}>")
            out.append(p)
        else:
            out.append(p.replace(" ", "▁"))
    if len(set(out)) != len(out):
        raise ValueError(f"{path}: duplicate pieces")
    return out


def bpe_merges(hf_pieces: list[str], scores) -> list[tuple[str, str]]:
    """Merges for `tokenizers`' BPE: every split of a normal piece (not a special or byte token) into
    two normal pieces, ranked by the merged piece's score (gguf_tokenizer.sentencepiece_merges)."""
    from haf_jax.model.gguf_tokenizer import sentencepiece_merges

    return sentencepiece_merges(hf_pieces, scores, [i >= _FIRST_BYTE_ID + 256 for i in range(len(hf_pieces))])


def build_tokenizer(pieces: list[str], scores, path="tokenizer"):
    """A `tokenizers.Tokenizer` equivalent to llama2.c's encode/decode, set up like Llama 2's:
    SentencePiece BPE with byte fallback, normalizer prepending "▁" and turning spaces into "▁"
    (no word splitting), BOS added by the post-processor, decoder dropping the prepended space."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    hf = _hf_pieces(pieces, path)
    tok = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(hf)},
            merges=bpe_merges(hf, scores),
            unk_token=hf[UNK_ID],
            fuse_unk=True,
            byte_fallback=True,
        )
    )
    tok.add_special_tokens([AddedToken(hf[i], special=True, normalized=False) for i in range(_FIRST_BYTE_ID)])
    # Llama 2's own tokenizer.json does this with a normalizer, not a Metaspace pre-tokenizer: "▁" is
    # prepended to every text (Metaspace skips it when the text already starts with a space, which
    # llama2.c and SentencePiece do not), and the text is not split into words.
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1, right=0),
        ]
    )
    bos = hf[BOS_ID]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, BOS_ID)]
    )
    return tok


def to_hf_llama(bin_path, tok_path, out_dir) -> pathlib.Path:
    """Convert llama2.c MODEL.bin + TOKENIZER.bin into a HF Llama directory; returns its path.

    Writes config.json, model.safetensors (float32) and the tokenizer (tokenizer.json,
    tokenizer_config.json, special_tokens_map.json where transformers writes it).
    """
    header, arrays = read_checkpoint(bin_path)
    check_rope_tables(header, arrays)
    pieces, scores, _ = read_tokenizer(tok_path, header["vocab_size"])
    tok = build_tokenizer(pieces, scores, tok_path)

    from safetensors.numpy import save_file
    from transformers import PreTrainedTokenizerFast

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(hf_state_dict(header, arrays), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(header), indent=2) + "\n")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=_SPECIAL_NAMES[BOS_ID],
        eos_token=_SPECIAL_NAMES[EOS_ID],
        unk_token=_SPECIAL_NAMES[UNK_ID],
        model_max_length=header["seq_len"],
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m haf_jax.model.llama2c",
        description="Convert a llama2.c legacy-v0 model + tokenizer .bin to a Hugging Face Llama directory.",
    )
    parser.add_argument("model", help="llama2.c model .bin (legacy v0 format)")
    parser.add_argument("tokenizer", help="llama2.c tokenizer .bin")
    parser.add_argument("out_dir", help="output directory (created)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = to_hf_llama(args.model, args.tokenizer, args.out_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    header = read_header(args.model)
    print(
        f"wrote {out}: llama, {header['n_layers']} layers, dim {header['dim']}, "
        f"vocab {header['vocab_size']}, tied embeddings: {header['shared_classifier']}"
    )


if __name__ == "__main__":
    main()
