"""Pieces of `config.json` reading and writing that several families share (rope, activations,
token ids, the common fields)."""

from __future__ import annotations

from typing import Any

from haf_jax.model.config import FULL, ModelConfig

ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
}
_TO_HF_ACT = {"silu": "silu", "gelu_tanh": "gelu_new", "gelu": "gelu"}


def activation(hf: dict[str, Any], default: str) -> str:
    name = hf.get("hidden_act") or default
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def hf_activation(config: ModelConfig) -> str:
    return _TO_HF_ACT[config.activation]


def rope(hf: dict[str, Any], default_theta: float = 10_000.0) -> dict[str, Any]:
    """ModelConfig rope fields from `rope_parameters` (transformers >= 5) or the legacy
    `rope_theta` + `rope_scaling` ({"type" | "rope_type": ...}) spellings."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if FULL in params:  # per layer type (Gemma 3 style): the full-attention entry
        params = dict(params[FULL])
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    out: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", default_theta)))}
    if kind == "default":
        return {**out, "rope_type": "default"}
    if kind == "linear":
        return {**out, "rope_type": "linear", "rope_factor": float(params["factor"])}
    if kind == "llama3":
        return {
            **out,
            "rope_type": "llama3",
            "rope_factor": float(params["factor"]),
            "rope_low_freq_factor": float(params["low_freq_factor"]),
            "rope_high_freq_factor": float(params["high_freq_factor"]),
            "rope_original_max_positions": int(params["original_max_position_embeddings"]),
        }
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, llama3")


def hf_rope(config: ModelConfig) -> dict[str, Any]:
    """Both spellings: `rope_parameters` for transformers >= 5, `rope_theta`/`rope_scaling` before."""
    params: dict[str, Any] = {"rope_type": config.rope_type, "rope_theta": config.rope_theta}
    if config.rope_type in ("linear", "llama3"):
        params["factor"] = config.rope_factor
    if config.rope_type == "llama3":
        params.update(
            low_freq_factor=config.rope_low_freq_factor,
            high_freq_factor=config.rope_high_freq_factor,
            original_max_position_embeddings=config.rope_original_max_positions,
        )
    legacy = {k: v for k, v in params.items() if k != "rope_theta"} if config.rope_type != "default" else None
    return {"rope_parameters": params, "rope_theta": config.rope_theta, "rope_scaling": legacy}


def first_id(value, default=None):
    """A token id from a config field that may be an int, a list of ints or absent."""
    if isinstance(value, list):
        return value[0] if value else default
    return default if value is None else value


def common(hf: dict[str, Any]) -> dict[str, Any]:
    """Fields every family reads the same way."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        pad_token_id=hf.get("pad_token_id"),
        bos_token_id=first_id(hf.get("bos_token_id")),
        eos_token_id=first_id(hf.get("eos_token_id"), 2),
    )


def hf_common(config: ModelConfig, arch: str, model_type: str) -> dict[str, Any]:
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "pad_token_id": config.pad_token_id,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_id,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": hf_activation(config),
    }
