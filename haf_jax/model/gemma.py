"""Gemma 1 / 2 / 3 (text): config.json in and out, and presets.

What sets Gemma apart: RMSNorm x * (1 + w), embeddings scaled by sqrt(D), GeGLU (tanh GeLU), tied
LM head; Gemma 2/3 add sandwich norms, soft-caps (2), query_pre_attn_scalar and alternating sliding
windows; Gemma 3 adds q/k norms and a separate rope base for its sliding layers.
"""

from __future__ import annotations

from typing import Any

from haf_jax.model.config import FULL, SLIDING, ModelConfig
from haf_jax.model.hf_config import first_id

_FAMILY = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_ARCH = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3"}
_GEMMA = dict(
    norm="rms", norm_offset=True, embed_scale=True, activation="gelu_tanh", mlp="gated", tie_word_embeddings=True
)


def _rope(hf: dict[str, Any], family: str) -> dict[str, Any]:
    """Global theta, linear factor on full layers, local theta (Gemma 3) from old or new fields."""
    default_global = 1_000_000.0 if family == "gemma3" else 10_000.0
    params = hf.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:  # transformers >= 5: per layer type
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
    else:
        full, local = dict(params or hf.get("rope_scaling") or {}), {}
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear")
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope scaling on sliding layers: {local}")
    out = {
        "rope_theta": float(full.get("rope_theta", hf.get("rope_theta", default_global))),
        "rope_type": kind,
        "rope_factor": float(full.get("factor", 1.0)) if kind == "linear" else 1.0,
    }
    if family == "gemma3":
        out["local_rope_theta"] = float(local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0)))
    return out


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: its text tower
        hf = {**hf["text_config"], "model_type": "gemma3_text"}
        model_type = "gemma3_text"
    family = _FAMILY[model_type]
    n_layers = hf["num_hidden_layers"]
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh", "gelu_new"):
        raise ValueError(f"unsupported hidden activation {act!r}: Gemma uses the tanh-approximated GeLU")
    if family == "gemma":
        layer_types: tuple[str, ...] = (FULL,) * n_layers
    elif hf.get("layer_types"):
        layer_types = tuple(hf["layer_types"])
    elif family == "gemma2":  # even layers slide, odd layers are global
        layer_types = tuple(SLIDING if (i + 1) % 2 else FULL for i in range(n_layers))
    else:
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n_layers))
    if hf.get("use_bidirectional_attention"):
        raise ValueError("use_bidirectional_attention=True (embedding models) is not supported")
    if hf.get("tie_word_embeddings") is False:
        raise ValueError("a Gemma config with tie_word_embeddings=false is not a Gemma checkpoint haf_jax knows")
    heads = hf["num_attention_heads"]
    return ModelConfig(
        family=family,
        **_GEMMA,
        block="pre" if family == "gemma" else "sandwich",
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads", heads),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=bool(hf.get("attention_bias")),
        o_bias=bool(hf.get("attention_bias")),
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family != "gemma" else None,
        attn_logit_softcap=hf.get("attn_logit_softcapping"),
        final_logit_softcap=hf.get("final_logit_softcapping"),
        layer_types=layer_types,
        sliding_window=hf.get("sliding_window") if SLIDING in layer_types else None,
        qk_norm=family == "gemma3",
        **_rope(hf, family),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
        bos_token_id=first_id(hf.get("bos_token_id"), 2),
        eos_token_id=first_id(hf.get("eos_token_id"), 1),
    )


def to_hf(c: ModelConfig, architecture: str) -> dict[str, Any]:
    prefix = "Gemma3Text" if (c.family == "gemma3" and architecture == "ForSequenceClassification") else _ARCH[c.family]
    hf: dict[str, Any] = {
        "architectures": [prefix + architecture],
        "model_type": _MODEL_TYPE[c.family],
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_position_embeddings,
        "pad_token_id": c.pad_token_id,
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": True,
        "attention_bias": c.qkv_bias,
    }
    if c.family == "gemma":
        hf.update(hidden_act="gelu_pytorch_tanh", rope_theta=c.rope_theta)
        return hf
    hf.update(
        query_pre_attn_scalar=c.query_pre_attn_scalar or c.head_dim,
        attn_logit_softcapping=c.attn_logit_softcap,
        final_logit_softcapping=c.final_logit_softcap,
        layer_types=list(c.layer_types),
        sliding_window=c.sliding_window or 4096,
    )
    if c.family == "gemma2":
        hf["rope_theta"] = c.rope_theta
    else:
        full = {"rope_type": "default", "rope_theta": c.rope_theta}
        if c.rope_type == "linear":
            full = {"rope_type": "linear", "factor": c.rope_factor, "rope_theta": c.rope_theta}
        hf["rope_parameters"] = {FULL: full, SLIDING: {"rope_type": "default", "rope_theta": c.local_rope_theta}}
    return hf


def _gemma(family, layers, scan_layers=True, **kw) -> ModelConfig:
    block = "pre" if family == "gemma" else "sandwich"
    return ModelConfig(
        family=family,
        num_layers=layers,
        block=block,
        bos_token_id=2,
        eos_token_id=1,
        pad_token_id=0,
        scan_layers=scan_layers,
        **_GEMMA,
        **kw,
    )


def _gemma2(layers, **kw) -> ModelConfig:
    return _gemma(
        "gemma2",
        layers,
        vocab_size=256_000,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=4096,
        layer_types=tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers)),
        **kw,
    )


def _gemma3(layers, window=1024, scaling=8.0, vocab=262_208, **kw) -> ModelConfig:
    return _gemma(
        "gemma3",
        layers,
        vocab_size=vocab,
        sliding_window=window,
        rope_theta=1_000_000.0,
        local_rope_theta=10_000.0,
        rope_type="linear" if scaling != 1.0 else "default",
        rope_factor=scaling,
        qk_norm=True,
        max_position_embeddings=131_072,
        layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(layers)),
        **kw,
    )


PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: Gemma 2 features (GQA, soft-caps, sliding window) at toy size,
    # with the vocabulary of the bundled byte-level tokenizer. Real presets scan their layers.
    "tiny": _gemma(
        "gemma2",
        2,
        scan_layers=False,
        vocab_size=2048,
        hidden_size=64,
        intermediate_size=256,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        attn_logit_softcap=50.0,
        final_logit_softcap=30.0,
        sliding_window=128,
        layer_types=(SLIDING, FULL),
        max_position_embeddings=2048,
    ),
    "gemma-2b": _gemma(
        "gemma",
        18,
        vocab_size=256_000,
        hidden_size=2048,
        intermediate_size=16_384,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
    ),
    "gemma-7b": _gemma(
        "gemma",
        28,
        vocab_size=256_000,
        hidden_size=3072,
        intermediate_size=24_576,
        num_heads=16,
        num_kv_heads=16,
        head_dim=256,
    ),
    "gemma2-2b": _gemma2(
        26,
        hidden_size=2304,
        intermediate_size=9216,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2-9b": _gemma2(
        42,
        hidden_size=3584,
        intermediate_size=14_336,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma2-27b": _gemma2(
        46,
        hidden_size=4608,
        intermediate_size=36_864,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
    "gemma3-1b": _gemma3(
        26,
        window=512,
        scaling=1.0,
        vocab=262_144,
        hidden_size=1152,
        intermediate_size=6912,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma3-4b": _gemma3(
        34,
        hidden_size=2560,
        intermediate_size=10_240,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma3-12b": _gemma3(
        48,
        hidden_size=3840,
        intermediate_size=15_360,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "gemma3-27b": _gemma3(
        62,
        hidden_size=5376,
        intermediate_size=21_504,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
    ),
}
