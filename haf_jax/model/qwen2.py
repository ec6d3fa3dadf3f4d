"""Qwen2: Llama's layers with biases on q, k and v only; sliding windows on the layers from
`max_window_layers` on when `use_sliding_window` is set (or as `layer_types` says)."""

from __future__ import annotations

from typing import Any

from haf_jax.model import hf_config
from haf_jax.model.config import FULL, SLIDING, ModelConfig
from haf_jax.model.llama import LLAMA


def _layer_types(hf: dict[str, Any]) -> tuple[str, ...]:
    if hf.get("layer_types"):
        return tuple(hf["layer_types"])
    n, start = hf["num_hidden_layers"], hf.get("max_window_layers", hf["num_hidden_layers"])
    sliding = bool(hf.get("use_sliding_window")) and hf.get("sliding_window")
    return tuple(SLIDING if sliding and i >= start else FULL for i in range(n))


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    types = _layer_types(hf)
    return ModelConfig(
        family="qwen2",
        **LLAMA,
        **hf_config.common(hf),
        **hf_config.rope(hf),
        activation=hf_config.activation(hf, "silu"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=True,
        layer_types=types,
        sliding_window=hf.get("sliding_window") if SLIDING in types else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_hf(c: ModelConfig, architecture: str) -> dict[str, Any]:
    sliding = SLIDING in c.layer_types
    return {
        **hf_config.hf_common(c, "Qwen2" + architecture, "qwen2"),
        **hf_config.hf_rope(c),
        "rms_norm_eps": c.norm_eps,
        "layer_types": list(c.layer_types),
        "use_sliding_window": sliding,
        "sliding_window": c.sliding_window if sliding else None,
        "max_window_layers": c.layer_types.index(SLIDING) if sliding else c.num_layers,
    }


def _qwen2(vocab, d, f, layers, heads, kv, tied) -> ModelConfig:
    return ModelConfig(
        family="qwen2",
        **LLAMA,
        activation="silu",
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=f,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=d // heads,
        norm_eps=1e-6,
        qkv_bias=True,
        rope_theta=1_000_000.0,
        tie_word_embeddings=tied,
        max_position_embeddings=131_072,
        bos_token_id=151_643,
        eos_token_id=151_643,
        pad_token_id=None,
        scan_layers=True,
    )


PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: q/k/v biases, GQA, rope base 1e6 and a tied LM head (as
    # qwen2-0.5b) at toy size; vocabulary and token ids of the bundled tokenizer.
    "tiny-qwen2": ModelConfig(
        family="qwen2",
        **LLAMA,
        activation="silu",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        norm_eps=1e-6,
        qkv_bias=True,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "qwen2-0.5b": _qwen2(151_936, 896, 4864, 24, 14, 2, True),
    "qwen2-1.5b": _qwen2(151_936, 1536, 8960, 28, 12, 2, True),
    "qwen2-7b": _qwen2(152_064, 3584, 18_944, 28, 28, 4, False),
}
