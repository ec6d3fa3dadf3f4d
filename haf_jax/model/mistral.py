"""Mistral: Llama's layers with grouped-query attention and, when `sliding_window` is set, a
sliding window on every layer. Presets: mistral-7b (v0.1, 32k vocabulary, window 4096), mistral-7b-v0.2
(32k vocabulary, rope base 1e6, no window: the HaF-RM authors' backbone) and mistral-7b-v0.3 (32,768
vocabulary, rope base 1e6, no window)."""

from __future__ import annotations

from typing import Any

from haf_jax.model import hf_config
from haf_jax.model.config import FULL, SLIDING, ModelConfig
from haf_jax.model.llama import LLAMA


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    window = hf.get("sliding_window")
    layers = hf["num_hidden_layers"]
    return ModelConfig(
        family="mistral",
        **LLAMA,
        **hf_config.common(hf),
        **hf_config.rope(hf),
        activation=hf_config.activation(hf, "silu"),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        layer_types=(SLIDING if window else FULL,) * layers,
        sliding_window=window or None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def to_hf(c: ModelConfig, architecture: str) -> dict[str, Any]:
    return {
        **hf_config.hf_common(c, "Mistral" + architecture, "mistral"),
        **hf_config.hf_rope(c),
        "rms_norm_eps": c.norm_eps,
        "sliding_window": c.sliding_window,
    }


def _mistral(vocab, theta, window) -> ModelConfig:
    return ModelConfig(
        family="mistral",
        **LLAMA,
        activation="silu",
        vocab_size=vocab,
        hidden_size=4096,
        intermediate_size=14_336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        norm_eps=1e-5,
        rope_theta=theta,
        layer_types=(SLIDING if window else FULL,) * 32,
        sliding_window=window,
        tie_word_embeddings=False,
        max_position_embeddings=32_768,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        scan_layers=True,
    )


PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: GQA and a sliding window (64, shorter than the default
    # max_length) on every layer at toy size; vocabulary and token ids of the bundled tokenizer.
    "tiny-mistral": ModelConfig(
        family="mistral",
        **LLAMA,
        activation="silu",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        norm_eps=1e-5,
        rope_theta=10_000.0,
        layer_types=(SLIDING, SLIDING),
        sliding_window=64,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "mistral-7b": _mistral(32_000, 10_000.0, 4096),
    # v0.2 (base and Instruct share the shapes): v0.1's vocabulary with v0.3's rope base and full attention
    "mistral-7b-v0.2": _mistral(32_000, 1_000_000.0, None),
    "mistral-7b-v0.3": _mistral(32_768, 1_000_000.0, None),
}
