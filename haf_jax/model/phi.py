"""Phi (phi-1, phi-1.5, phi-2): LayerNorm with bias, attention and MLP in parallel on one normed
input, partial rotary (`partial_rotary_factor`), biases on every projection, gelu_new, optional
LayerNorm on query/key heads (`qk_layernorm`), untied LM head with a bias."""

from __future__ import annotations

from typing import Any

from haf_jax.model import hf_config
from haf_jax.model.config import ModelConfig

PHI = dict(
    norm="layer",
    norm_offset=False,
    block="parallel",
    mlp="plain",
    embed_scale=False,
    qkv_bias=True,
    o_bias=True,
    mlp_bias=True,
    lm_head_bias=True,
)


def _partial_rotary_factor(hf: dict[str, Any]) -> float:
    """transformers >= 5 writes it inside `rope_parameters` (which wins, as in transformers); older
    config.json files (phi-2 on the hub) have it at the top level; transformers' default is 0.5."""
    params = hf.get("rope_parameters") or {}
    return float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5)))


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    if hf.get("tie_word_embeddings"):
        raise ValueError("a Phi config with tie_word_embeddings=true is not supported (Phi's LM head has a bias)")
    return ModelConfig(
        family="phi",
        **PHI,
        **hf_config.common(hf),
        **hf_config.rope(hf),
        activation=hf_config.activation(hf, "gelu_new"),
        norm_eps=hf.get("layer_norm_eps", 1e-5),
        qk_norm=bool(hf.get("qk_layernorm", False)),
        partial_rotary_factor=_partial_rotary_factor(hf),
        tie_word_embeddings=False,
    )


def to_hf(c: ModelConfig, architecture: str) -> dict[str, Any]:
    return {
        **hf_config.hf_common(c, "Phi" + architecture, "phi"),
        **hf_config.hf_rope(c),
        "layer_norm_eps": c.norm_eps,
        "partial_rotary_factor": c.partial_rotary_factor,
        "qk_layernorm": c.qk_norm,
    }


PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: LayerNorm, parallel block, partial rotary 0.4 (6 of 16 dims),
    # biases everywhere, untied LM head with a bias, at toy size; vocabulary and token ids of
    # the bundled tokenizer.
    "tiny-phi": ModelConfig(
        family="phi",
        **PHI,
        activation="gelu_tanh",
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        norm_eps=1e-5,
        partial_rotary_factor=0.4,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
    ),
    "phi-2": ModelConfig(
        family="phi",
        **PHI,
        activation="gelu_tanh",
        vocab_size=51_200,
        hidden_size=2560,
        intermediate_size=10_240,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=80,
        norm_eps=1e-5,
        partial_rotary_factor=0.4,
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        bos_token_id=50_256,
        eos_token_id=50_256,
        pad_token_id=None,
        scan_layers=True,
    ),
}
