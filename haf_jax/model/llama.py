"""Llama 2 and 3.x: config.json in and out, and presets.

Pre-norm RMSNorm (x * w), SwiGLU, rotary with default / linear / llama3 frequency scaling,
optional biases on q, k, v and o (`attention_bias`) and on the MLP (`mlp_bias`), a head_dim
that may differ from hidden / heads, tied or untied LM head.
"""

from __future__ import annotations

from typing import Any

from haf_jax.model import hf_config
from haf_jax.model.config import ModelConfig

LLAMA = dict(norm="rms", norm_offset=False, block="pre", mlp="gated", embed_scale=False)


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        family="llama",
        **LLAMA,
        **hf_config.common(hf),
        **hf_config.rope(hf),
        activation=hf_config.activation(hf, "silu"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_hf(c: ModelConfig, architecture: str) -> dict[str, Any]:
    return {
        **hf_config.hf_common(c, "Llama" + architecture, "llama"),
        **hf_config.hf_rope(c),
        "rms_norm_eps": c.norm_eps,
        "attention_bias": c.qkv_bias,
        "mlp_bias": c.mlp_bias,
    }


def _llama(vocab, d, f, layers, heads, kv, **kw) -> ModelConfig:
    return ModelConfig(
        family="llama",
        **LLAMA,
        activation="silu",
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d // heads,
        norm_eps=1e-5,
        **{"scan_layers": True, **kw},
    )


_LLAMA3 = dict(rope_theta=500_000.0, bos_token_id=128_000, eos_token_id=128_001, pad_token_id=None)
_LLAMA32 = dict(
    _LLAMA3,
    rope_type="llama3",
    rope_factor=32.0,
    rope_low_freq_factor=1.0,
    rope_high_freq_factor=4.0,
    rope_original_max_positions=8192,
    max_position_embeddings=131_072,
    tie_word_embeddings=True,
)

PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: Llama 3.2 features (GQA, llama3 rope scaling) at toy size with an
    # untied LM head, the vocabulary and token ids of the bundled byte-level tokenizer.
    "tiny-llama": _llama(
        2048,
        64,
        256,
        2,
        4,
        2,
        **{
            **_LLAMA32,
            "tie_word_embeddings": False,
            "bos_token_id": 2,
            "eos_token_id": 1,
            "pad_token_id": 0,
            "scan_layers": False,
        },
    ),
    "llama2-7b": _llama(
        32_000,
        4096,
        11_008,
        32,
        32,
        32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    ),
    "llama3-8b": _llama(
        128_256, 4096, 14_336, 32, 32, 8, max_position_embeddings=8192, tie_word_embeddings=False, **_LLAMA3
    ),
    "llama3.2-1b": _llama(128_256, 2048, 8192, 16, 32, 8, **_LLAMA32),
    "llama3.2-3b": _llama(128_256, 3072, 8192, 28, 24, 8, **_LLAMA32),
}
