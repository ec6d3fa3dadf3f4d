"""GGUF (llama.cpp) files -> Hugging Face checkpoint directories every haf_jax command reads.

Usage: `python -m haf_jax.model.gguf MODEL.gguf OUT_DIR`, or `to_hf(path, out_dir)`; a `.gguf`
file given as `model.checkpoint` / `--model` is converted once into `cached_conversion(path)`
(a directory keyed by the file's SHA-256). Needs the `gguf` package (`pip install -e ".[gguf]"`),
which reads the file and dequantises its tensors with NumPy (no torch).

Output: config.json, model.safetensors (float32: every tensor dequantised), the tokenizer and chat
template rebuilt from the metadata (haf_jax.model.gguf_tokenizer), generation_config.json with the
special ids. Architectures (`general.architecture`) and what the conversion undoes:

* `llama` (Llama 1-3, Mistral, SmolLM, ...) -> LlamaForCausalLM. llama.cpp's converter reorders
  the rows of each head of attn_q / attn_k [H * hd, D] from rotate_half pairs (q[i], q[i + hd/2])
  to interleaved pairs (q[2i], q[2i + 1]) for its rope kernel; the inverse order is
  llama2c.permute_rotary (the same relation llama2.c checkpoints have to HF).
* `qwen2` -> Qwen2ForCausalLM (q/k/v biases; no reordering).
* `gemma`, `gemma2`, `gemma3` -> Gemma*ForCausalLM. llama.cpp stores every RMSNorm weight w as
  1 + w (its norm multiplies by the weight; HF Gemma multiplies by 1 + w): 1 is subtracted. What
  the metadata does not carry is taken as llama.cpp takes it: Gemma 2's query scale is 1/sqrt(hd),
  except 1/sqrt(D / H) for the 46-layer (27B) model; Gemma 3 alternates 5 sliding-window layers
  with one global one and rotates the local layers with theta 10,000.
* `phi2` (phi-1, phi-1.5, phi-2) -> PhiForCausalLM; a fused attn_qkv [(H + 2 KV) * hd, D] is split.

Tensors: every type `gguf.quants` dequantises that holds weights (F32, F16, BF16, Q4_0, Q4_1,
Q5_0, Q5_1, Q8_0, the K-quants Q2_K..Q6_K, and the IQ/TQ types); any other type is refused naming
the tensor. GGUF stores a matrix with its dimensions reversed (ne = [in, out]); the NumPy array
the reader gives is already [out, in], the HF layout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import numpy as np

from haf_jax.model import gguf_tokenizer
from haf_jax.model.llama2c import permute_rotary

ARCHITECTURES = ("llama", "qwen2", "gemma", "gemma2", "gemma3", "phi2")
_HF_CLASS = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "gemma": ("gemma", "GemmaForCausalLM"),
    "gemma2": ("gemma2", "Gemma2ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "phi2": ("phi", "PhiForCausalLM"),
}
# Per-layer tensors, llama.cpp name -> HF name under model.layers.{i}. (the arch-specific ones below).
_LAYER = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA2_LAYER = {
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI2_LAYER = {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_FLOAT_TYPES = ("F32", "F16", "F64")
GEMMA3_SLIDING_PATTERN, GEMMA3_LOCAL_THETA = 6, 10_000.0


def _reader(path):
    try:
        import gguf
    except ImportError:
        raise ValueError('reading GGUF files needs the gguf package: pip install -e ".[gguf]"') from None
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as e:  # the reader raises ValueError/struct.error/IndexError on a malformed file
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None


def read_metadata(reader) -> dict[str, Any]:
    """Every key of the file as a plain Python value (str, int, float, bool or list of those)."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize(tensor, where: str) -> np.ndarray:
    """A GGUF tensor as float32 [out, in] (or [n] for vectors); ValueError for a non-weight type."""
    from gguf import quants

    kind = tensor.tensor_type.name
    if kind in _FLOAT_TYPES:
        return np.asarray(tensor.data, np.float32)
    try:
        return np.asarray(quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    except NotImplementedError:
        raise ValueError(
            f"{where}: tensor {tensor.name!r} has type {kind}, which haf_jax cannot dequantise "
            "(F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K-Q6_K, IQ*/TQ* are read)"
        ) from None


def _arch_key(meta: dict, arch: str, key: str, default=None, where: str = "GGUF"):
    value = meta.get(f"{arch}.{key}", default)
    if value is None:
        raise ValueError(f"{where}: metadata key {arch}.{key} is missing")
    if isinstance(value, list):
        raise ValueError(f"{where}: {arch}.{key} varies by layer ({value[:4]}...), which haf_jax does not support")
    return value


def hf_config(meta: dict, tensor_names: set[str], where: str = "GGUF") -> dict:
    """config.json of the equivalent Hugging Face model."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(
            f"{where}: general.architecture={arch!r} is not supported; haf_jax converts {list(ARCHITECTURES)}"
        )
    if "rope_freqs.weight" in tensor_names:
        raise ValueError(f"{where}: rope_freqs (Llama 3.1-style rope scaling) is not supported")

    def key(k, default=None):
        return _arch_key(meta, arch, k, default, where)

    model_type, cls = _HF_CLASS[arch]
    d, heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", d // heads))
    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = int(meta.get(f"{arch}.vocab_size") or len(tokens) or 0)
    if not vocab:
        raise ValueError(f"{where}: neither {arch}.vocab_size nor tokenizer.ggml.tokens gives the vocabulary size")
    theta = float(key("rope.freq_base", 10_000.0))
    hf = {
        "model_type": model_type,
        "architectures": [cls],
        "hidden_size": d,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "vocab_size": vocab,
        "max_position_embeddings": int(key("context_length", 4096)),
        "rope_theta": theta,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "dtype": "float32",
    }
    for name in ("bos", "eos", "padding"):
        if meta.get(f"tokenizer.ggml.{name}_token_id") is not None:
            hf[f"{name[:3]}_token_id"] = int(meta[f"tokenizer.ggml.{name}_token_id"])
    if arch == "phi2":
        hf.update(
            layer_norm_eps=float(key("attention.layer_norm_epsilon")),
            partial_rotary_factor=int(key("rope.dimension_count")) / head_dim,
            hidden_act="gelu_new",
            qk_layernorm=False,
        )
        return hf
    hf["rms_norm_eps"] = float(key("attention.layer_norm_rms_epsilon"))
    if arch == "llama":
        hf.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in tensor_names, mlp_bias=False)
    elif arch == "qwen2":
        hf.update(hidden_act="silu", use_sliding_window=False)
    else:
        hf["hidden_activation"] = hf["hidden_act"] = "gelu_pytorch_tanh"
    if arch == "gemma2":
        hf.update(
            attn_logit_softcapping=float(key("attn_logit_softcapping", 50.0)),
            final_logit_softcapping=float(key("final_logit_softcapping", 30.0)),
            sliding_window=int(key("attention.sliding_window", 4096)),
            query_pre_attn_scalar=d // heads if hf["num_hidden_layers"] == 46 else head_dim,
        )
    elif arch == "gemma3":
        n = hf["num_hidden_layers"]
        hf.update(
            sliding_window=int(key("attention.sliding_window", 512)),
            query_pre_attn_scalar=head_dim,
            rope_local_base_freq=GEMMA3_LOCAL_THETA,
            layer_types=[
                "full_attention" if (i + 1) % GEMMA3_SLIDING_PATTERN == 0 else "sliding_attention" for i in range(n)
            ],
        )
        factor = meta.get("gemma3.rope.scaling.factor")
        if factor and meta.get("gemma3.rope.scaling.type", "linear") == "linear" and float(factor) != 1.0:
            hf["rope_scaling"] = {"rope_type": "linear", "factor": float(factor)}
    return hf


def _hf_name(name: str, arch: str) -> str | None:
    """The HF name of a llama.cpp tensor name ("blk.3.attn_q.weight"), None when unknown."""
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        table = {**_LAYER, **(_GEMMA2_LAYER if arch in ("gemma2", "gemma3") else {})}
        table.update(_PHI2_LAYER if arch == "phi2" else {})
        return f"model.layers.{layer}.{table[part]}.{suffix}" if part in table else None
    if stem == "output_norm" and arch == "phi2":
        return f"model.final_layernorm.{suffix}"
    return f"{_GLOBAL[stem]}.{suffix}" if stem in _GLOBAL else None


def hf_state_dict(reader, hf: dict, where: str = "GGUF") -> dict[str, np.ndarray]:
    """HF tensor name -> float32 array, every llama.cpp transformation undone (module docstring)."""
    arch = next(a for a, (t, _) in _HF_CLASS.items() if t == hf["model_type"])
    heads, kv, hd = hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"]
    sd = {}
    for t in reader.tensors:
        w = dequantize(t, where)
        if t.name.startswith("blk.") and ".attn_qkv." in t.name:  # fused q, k, v rows
            layer = t.name.split(".")[1]
            q, k, v = np.split(w, [heads * hd, (heads + kv) * hd], axis=0)
            for part, x in (("q_proj", q), ("k_proj", k), ("v_proj", v)):
                sd[f"model.layers.{layer}.self_attn.{part}.{t.name.rpartition('.')[2]}"] = x
            continue
        name = _hf_name(t.name, arch)
        if name is None:
            raise ValueError(f"{where}: tensor {t.name!r} has no Hugging Face counterpart for {arch}")
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            n = heads if ".attn_q." in t.name else kv
            w = permute_rotary(w.reshape(n * hd, -1), n).reshape(w.shape)
        if arch.startswith("gemma") and t.name.endswith("norm.weight"):
            w = w - 1.0
        sd[name] = w
    return {k: np.ascontiguousarray(v, np.float32) for k, v in sd.items()}


def to_hf(gguf_path, out_dir) -> pathlib.Path:
    """Convert one GGUF file into a new HF checkpoint directory (written to a temporary sibling and
    renamed into place, so an interrupted conversion never leaves a half directory); returns it.
    Refuses an `out_dir` that exists and is not empty."""
    from safetensors.numpy import save_file

    where = str(gguf_path)
    out = pathlib.Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty directory; give a new output directory")
    reader = _reader(gguf_path)
    meta = read_metadata(reader)
    hf = hf_config(meta, {t.name for t in reader.tensors}, where)
    tokenizer = gguf_tokenizer.build_tokenizer(meta, where)
    state = hf_state_dict(reader, hf, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a checkpoint directory is as readable as any other
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    special = {k: hf[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf}
    (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
    tokenizer.model_max_length = hf["max_position_embeddings"]
    tokenizer.save_pretrained(str(tmp))
    if out.is_dir():
        out.rmdir()  # empty (checked above)
    os.rename(tmp, out)
    return out


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> pathlib.Path:
    """$HAF_JAX_CACHE, else $XDG_CACHE_HOME/haf_jax, else ~/.cache/haf_jax."""
    if os.environ.get("HAF_JAX_CACHE"):
        return pathlib.Path(os.environ["HAF_JAX_CACHE"])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "haf_jax"


def cached_conversion(gguf_path) -> pathlib.Path:
    """The HF directory of a GGUF file, converted on first use into cache_root()/gguf/<sha256 prefix>.
    Keyed by content, so a replaced file at the same path converts again."""
    out = cache_root() / "gguf" / file_sha256(gguf_path)[:24]
    if not (out / "config.json").is_file():
        try:
            to_hf(gguf_path, out)
        except (OSError, ValueError):
            if not (out / "config.json").is_file():  # not another process finishing the same conversion first
                raise
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m haf_jax.model.gguf",
        description="Convert a GGUF (llama.cpp) model to a Hugging Face directory (float32 safetensors).",
    )
    parser.add_argument("model", help="the .gguf file")
    parser.add_argument("out_dir", help="output directory (created; must not exist or be empty)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        out = to_hf(args.model, args.out_dir)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    hf = json.loads((out / "config.json").read_text())
    print(
        f"wrote {out}: {hf['model_type']}, {hf['num_hidden_layers']} layers, width {hf['hidden_size']}, "
        f"vocab {hf['vocab_size']}, tied embeddings: {hf['tie_word_embeddings']}"
    )


if __name__ == "__main__":
    main()
