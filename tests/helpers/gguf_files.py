"""Small GGUF files written with the `gguf` package the way llama.cpp's convert_hf_to_gguf.py writes
them (tests/unit/test_gguf.py): from a random transformers model, with llama.cpp's tensor names, its
Q/K row interleave for Llama, its 1 + w Gemma norms and its fused Phi-2 qkv, so that converting back
must undo each of them. Written here from llama.cpp's conventions, independently of haf_jax.model.gguf.
"""

from __future__ import annotations

import numpy as np
import torch
import transformers as T
from gguf import GGMLQuantizationType, GGUFWriter, quants

from helpers.parity import perturb

# HF per-layer name -> llama.cpp name, per architecture
_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}
_LAYER_GEMMA2 = {**_LAYER, "post_attention_layernorm": "post_attention_norm"}
_LAYER_GEMMA2.update(pre_feedforward_layernorm="ffn_norm", post_feedforward_layernorm="post_ffw_norm")
_LAYER_PHI2 = {
    "input_layernorm": "attn_norm",
    "self_attn.dense": "attn_output",
    "mlp.fc1": "ffn_up",
    "mlp.fc2": "ffn_down",
}

V = 300
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
# arch -> (transformers config class, extra config)
ARCHS = {
    "llama": (T.LlamaConfig, dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=50_000.0)),
    "qwen2": (T.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gemma": (T.GemmaConfig, dict(num_key_value_heads=1, head_dim=16)),
    "gemma2": (
        T.Gemma2Config,
        dict(
            num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0
        ),
    ),
    "phi2": (T.PhiConfig, dict(num_key_value_heads=4, partial_rotary_factor=0.5, tie_word_embeddings=False)),
}


def byte_level_tokenizer(texts, vocab_size=V):
    """A byte-level BPE with GPT-2's pre-tokenizer trained on `texts`: `<s>` 0, `</s>` 1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def tokenizer_metadata(w: GGUFWriter, tok, pre="gpt-2", chat_template=None) -> None:
    """tokenizer.ggml.* of a byte-level BPE `tokenizers.Tokenizer` (as llama.cpp writes a gpt2 vocab)."""
    import json

    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list([t for t, _ in vocab])
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t, _ in vocab])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in model["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_add_bos_token(False)
    if chat_template:
        w.add_chat_template(chat_template)


def random_model(arch: str, seed: int = 0, **overrides):
    cls, extra = ARCHS[arch]
    config = cls(**{**SMALL, **extra, **overrides}, bos_token_id=0, eos_token_id=1, max_position_embeddings=128)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    return perturb(T.AutoModelForCausalLM.from_config(config), seed=seed).eval()


def _interleave(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: each head's rotate_half halves -> interleaved pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(model, arch: str) -> dict[str, np.ndarray]:
    """llama.cpp name -> float32 array of a transformers model, llama.cpp's transformations applied."""
    c = model.config
    table = {"phi2": _LAYER_PHI2, "gemma2": _LAYER_GEMMA2}.get(arch, _LAYER)
    out, fused = {}, {}
    for name, p in model.state_dict().items():
        w = p.detach().float().numpy().copy()
        stem, suffix = name.rsplit(".", 1)
        if arch.startswith("gemma") and stem.endswith("norm"):
            w = w + 1.0
        if stem == "model.embed_tokens":
            out[f"token_embd.{suffix}"] = w
        elif stem in ("model.norm", "model.final_layernorm"):
            out[f"output_norm.{suffix}"] = w
        elif stem == "lm_head":
            if not c.tie_word_embeddings:
                out[f"output.{suffix}"] = w
        else:
            _, _, layer, part = stem.split(".", 3)
            if arch == "phi2" and part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                fused.setdefault((layer, suffix), {})[part] = w
                continue
            if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
                w = _interleave(w, c.num_attention_heads if "q_proj" in part else c.num_key_value_heads)
            out[f"blk.{layer}.{table[part]}.{suffix}"] = w
    for (layer, suffix), parts in fused.items():
        qkv = [parts[f"self_attn.{x}_proj"] for x in "qkv"]
        out[f"blk.{layer}.attn_qkv.{suffix}"] = np.concatenate(qkv, axis=0)
    return out


def k_quant_bytes(rows: int, cols: int, qtype: GGMLQuantizationType, rng) -> np.ndarray:
    """Random blocks of a K-quant (which `gguf` cannot quantise to): every byte below 0x3C, so each
    float16 scale inside a block is finite and below 1."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    return rng.integers(0, 0x3C, (rows, cols // block * size), dtype=np.uint8)


def write_gguf(path, model, arch: str, tok, qtype: str = "F32", seed: int = 0, pre="gpt-2", chat_template=None):
    """Writes `model` as a GGUF of architecture `arch`; 2-D weights (but the embedding) stored as `qtype`."""
    c = model.config
    rng = np.random.default_rng(seed)
    w = GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    if arch == "phi2":
        w.add_layer_norm_eps(c.layer_norm_eps)
        w.add_rope_dimension_count(int(c.rope_parameters["partial_rotary_factor"] * head_dim))
    else:
        w.add_layer_norm_rms_eps(c.rms_norm_eps)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(c.attn_logit_softcapping)
        w.add_final_logit_softcapping(c.final_logit_softcapping)
        w.add_sliding_window(c.sliding_window)
    tokenizer_metadata(w, tok, pre, chat_template)
    kind = GGMLQuantizationType[qtype]
    for name, x in gguf_tensors(model, arch).items():
        if x.ndim == 1 or name == "token_embd.weight" or kind == GGMLQuantizationType.F32:
            w.add_tensor(name, x)
        elif kind == GGMLQuantizationType.F16:
            w.add_tensor(name, x.astype(np.float16))
        elif qtype.endswith("_K"):
            w.add_tensor(name, k_quant_bytes(*x.shape, kind, rng), raw_dtype=kind)
        else:
            w.add_tensor(name, quants.quantize(x, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
