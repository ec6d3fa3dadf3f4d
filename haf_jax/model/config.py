"""Model configuration for the Gemma 1 / 2 / 3 (text) family.

`ModelConfig` is a frozen dataclass, so it can be a static argument of jitted functions.
It is built from a Hugging Face `config.json` (`ModelConfig.from_hf`) or from a named preset
(`preset("gemma2-2b")`), and can be written back as a Hugging Face config (`to_hf`).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"

# Hugging Face `model_type` -> our family name.
_FAMILIES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
_HF_MODEL_TYPE = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_HF_ARCH_PREFIX = {"gemma": "Gemma", "gemma2": "Gemma2", "gemma3": "Gemma3"}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Gemma-family decoder (all fields are plain Python values)."""

    family: str  # "gemma" | "gemma2" | "gemma3"
    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F (GeGLU width)
    num_layers: int
    num_heads: int  # N query heads
    num_kv_heads: int  # K key/value heads (K divides N; K == 1 is MQA)
    head_dim: int  # H
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (None: head_dim)
    attn_logit_softcap: float | None = None  # Gemma 2: 50.0
    final_logit_softcap: float | None = None  # Gemma 2: 30.0
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; empty = all FULL
    sliding_window: int | None = None  # keys with q - k >= window are masked on SLIDING layers
    rope_theta: float = 10_000.0  # base of FULL layers
    rope_local_theta: float = 10_000.0  # base of SLIDING layers (Gemma 3: 10k vs 1M global)
    rope_scaling: float = 1.0  # linear position scaling factor on FULL layers (Gemma 3 4b+: 8)
    qk_norm: bool = False  # Gemma 3: RMSNorm on queries and keys per head
    sandwich_norm: bool = False  # Gemma 2/3: post-attention and pre/post feed-forward norms
    max_position_embeddings: int = 8192
    pad_token_id: int = 0
    bos_token_id: int | None = 2
    eos_token_id: int = 1
    remat: bool = False  # rematerialise each block in the backward pass

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.family not in _HF_ARCH_PREFIX:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {sorted(_HF_ARCH_PREFIX)}")
        types = self.layer_types or (FULL,) * self.num_layers
        if len(types) != self.num_layers or set(types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {self.num_layers} entries of {FULL!r}/{SLIDING!r}, got {types}")
        if SLIDING in types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        object.__setattr__(self, "layer_types", tuple(types))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a parsed Hugging Face `config.json` (Gemma, Gemma 2, Gemma 3 text)."""
        model_type = hf.get("model_type")
        if model_type == "gemma3" and "text_config" in hf:  # multimodal wrapper: use its text tower
            hf = {**hf["text_config"], "model_type": "gemma3_text"}
            model_type = "gemma3_text"
        if model_type not in _FAMILIES:
            archs = hf.get("architectures")
            raise ValueError(
                f"unsupported architecture model_type={model_type!r} (architectures={archs}); "
                f"haf_jax supports model_type in {sorted(_FAMILIES)}"
            )
        family = _FAMILIES[model_type]
        n_layers = hf["num_hidden_layers"]
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        if act not in ("gelu_pytorch_tanh", "gelu", "gelu_tanh", "gelu_new"):
            raise ValueError(f"unsupported hidden activation {act!r}: Gemma uses the tanh-approximated GeLU")
        rope_theta, local_theta, scaling = _rope_from_hf(hf, family)
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
        eos = hf.get("eos_token_id", 1)
        if isinstance(eos, list):
            eos = eos[0]
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=n_layers,
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads", hf["num_attention_heads"]),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar") if family != "gemma" else None,
            attn_logit_softcap=hf.get("attn_logit_softcapping"),
            final_logit_softcap=hf.get("final_logit_softcapping"),
            layer_types=layer_types,
            sliding_window=hf.get("sliding_window") if SLIDING in layer_types else None,
            rope_theta=rope_theta,
            rope_local_theta=local_theta,
            rope_scaling=scaling,
            qk_norm=family == "gemma3",
            sandwich_norm=family in ("gemma2", "gemma3"),
            max_position_embeddings=hf.get("max_position_embeddings", 8192),
            pad_token_id=hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0,
            bos_token_id=hf.get("bos_token_id", 2),
            eos_token_id=eos,
        )

    def to_hf(self, architecture: str = "ForCausalLM", **extra) -> dict[str, Any]:
        """A Hugging Face `config.json` dict for `<Family><architecture>` (e.g. ForSequenceClassification)."""
        arch_prefix = _HF_ARCH_PREFIX[self.family]
        if self.family == "gemma3" and architecture == "ForSequenceClassification":
            arch_prefix = "Gemma3Text"
        hf: dict[str, Any] = {
            "architectures": [arch_prefix + architecture],
            "model_type": _HF_MODEL_TYPE[self.family],
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_activation": "gelu_pytorch_tanh",
            "rms_norm_eps": self.rms_norm_eps,
            "max_position_embeddings": self.max_position_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "tie_word_embeddings": True,
            "attention_bias": False,
        }
        if self.family == "gemma":
            hf["hidden_act"] = "gelu_pytorch_tanh"
            hf["rope_theta"] = self.rope_theta
        else:
            hf.update(
                query_pre_attn_scalar=self.query_pre_attn_scalar or self.head_dim,
                attn_logit_softcapping=self.attn_logit_softcap,
                final_logit_softcapping=self.final_logit_softcap,
                layer_types=list(self.layer_types),
                sliding_window=self.sliding_window or 4096,
            )
        if self.family == "gemma2":
            hf["rope_theta"] = self.rope_theta
        if self.family == "gemma3":
            full = {"rope_type": "default", "rope_theta": self.rope_theta}
            if self.rope_scaling != 1.0:
                full = {"rope_type": "linear", "factor": self.rope_scaling, "rope_theta": self.rope_theta}
            hf["rope_parameters"] = {
                FULL: full,
                SLIDING: {"rope_type": "default", "rope_theta": self.rope_local_theta},
            }
        hf.update(extra)
        return hf


def _rope_from_hf(hf: dict[str, Any], family: str) -> tuple[float, float, float]:
    """(global theta, local theta, linear scaling) from either the old or the new HF rope fields."""
    default_global = 1_000_000.0 if family == "gemma3" else 10_000.0
    params = hf.get("rope_parameters") or {}
    if FULL in params or SLIDING in params:  # transformers >= 5: per layer type
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
    else:
        full = dict(params or hf.get("rope_scaling") or {})
        local = {}
    theta = full.get("rope_theta", hf.get("rope_theta", default_global))
    local_theta = local.get("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    kind = full.get("rope_type", full.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear")
    scaling = float(full.get("factor", 1.0)) if kind == "linear" else 1.0
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"unsupported rope scaling on sliding layers: {local}")
    return float(theta), float(local_theta), scaling


def _gemma2(layers, **kw) -> ModelConfig:
    return ModelConfig(
        family="gemma2", vocab_size=256_000, num_layers=layers, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, sliding_window=4096, sandwich_norm=True,
        layer_types=tuple(SLIDING if (i + 1) % 2 else FULL for i in range(layers)), **kw,
    )


def _gemma3(layers, window=1024, scaling=8.0, vocab=262_208, **kw) -> ModelConfig:
    return ModelConfig(
        family="gemma3", vocab_size=vocab, num_layers=layers, sliding_window=window,
        rope_theta=1_000_000.0, rope_local_theta=10_000.0, rope_scaling=scaling, qk_norm=True,
        sandwich_norm=True, max_position_embeddings=131_072,
        layer_types=tuple(SLIDING if (i + 1) % 6 else FULL for i in range(layers)), **kw,
    )


PRESETS: dict[str, ModelConfig] = {
    # Tests and the offline demo: Gemma 2 features (GQA, soft-caps, sliding window) at toy size,
    # with the vocabulary of the bundled byte-level tokenizer.
    "tiny": ModelConfig(
        family="gemma2", vocab_size=2048, hidden_size=64, intermediate_size=256, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, query_pre_attn_scalar=16, attn_logit_softcap=50.0,
        final_logit_softcap=30.0, sliding_window=128, sandwich_norm=True,
        layer_types=(SLIDING, FULL), max_position_embeddings=2048,
    ),
    "gemma-2b": ModelConfig(
        family="gemma", vocab_size=256_000, hidden_size=2048, intermediate_size=16_384, num_layers=18,
        num_heads=8, num_kv_heads=1, head_dim=256,
    ),
    "gemma-7b": ModelConfig(
        family="gemma", vocab_size=256_000, hidden_size=3072, intermediate_size=24_576, num_layers=28,
        num_heads=16, num_kv_heads=16, head_dim=256,
    ),
    "gemma2-2b": _gemma2(26, hidden_size=2304, intermediate_size=9216, num_heads=8, num_kv_heads=4,
                         head_dim=256, query_pre_attn_scalar=256),
    "gemma2-9b": _gemma2(42, hidden_size=3584, intermediate_size=14_336, num_heads=16, num_kv_heads=8,
                         head_dim=256, query_pre_attn_scalar=256),
    "gemma2-27b": _gemma2(46, hidden_size=4608, intermediate_size=36_864, num_heads=32, num_kv_heads=16,
                          head_dim=128, query_pre_attn_scalar=144),
    "gemma3-1b": _gemma3(26, window=512, scaling=1.0, vocab=262_144, hidden_size=1152,
                         intermediate_size=6912, num_heads=4, num_kv_heads=1, head_dim=256,
                         query_pre_attn_scalar=256),
    "gemma3-4b": _gemma3(34, hidden_size=2560, intermediate_size=10_240, num_heads=8, num_kv_heads=4,
                         head_dim=256, query_pre_attn_scalar=256),
    "gemma3-12b": _gemma3(48, hidden_size=3840, intermediate_size=15_360, num_heads=16, num_kv_heads=8,
                          head_dim=256, query_pre_attn_scalar=256),
    "gemma3-27b": _gemma3(62, hidden_size=5376, intermediate_size=21_504, num_heads=32, num_kv_heads=16,
                          head_dim=128, query_pre_attn_scalar=168),
}


def preset(name: str) -> ModelConfig:
    """The named architecture; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
