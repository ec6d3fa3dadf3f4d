"""Architecture of one decoder-only transformer, for every supported family.

`ModelConfig` is a frozen dataclass of plain Python values, so it can be a static argument of
jitted functions. Each field that changes the math is explicit here; the family modules
(`gemma.py`, `llama.py`, `mistral.py`, `qwen2.py`, `phi.py`) read and write Hugging Face
`config.json` files into and out of it, and `families.py` dispatches on HF `model_type`
(`families.from_hf(config_json)`, `families.to_hf(config, "ForCausalLM")`).
The defaults describe no particular family: every family module sets what it needs.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

FULL = "full_attention"
SLIDING = "sliding_attention"

NORMS = ("rms", "layer")  # RMSNorm (no bias) | LayerNorm (with bias)
BLOCKS = ("pre", "sandwich", "parallel")
MLPS = ("gated", "plain")  # down(act(gate(x)) * up(x)) | fc2(act(fc1(x)))
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
ROPE_TYPES = ("default", "linear", "llama3")
ATTENTIONS = ("auto", "xla", "cudnn", "splash")  # attention kernels (model/attention.py)
# What a rematerialised block keeps for the backward pass (names of jax.checkpoint_policies):
# nothing (recompute the whole block), dots (keep matmul outputs), dots_no_batch (keep matmul
# outputs without batch dimensions: the weight-like ones).
REMAT_POLICIES = {
    "nothing": "nothing_saveable",
    "dots": "dots_saveable",
    "dots_no_batch": "dots_with_no_batch_dims_saveable",
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """One decoder: trunk shape, layer kinds, attention options, rotary settings and heads."""

    family: str  # key of families.FAMILIES: gemma, gemma2, gemma3, llama, mistral, qwen2, phi
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # Q query heads
    num_kv_heads: int  # K key/value heads (K divides Q; K == 1 is MQA)
    head_dim: int  # H
    # --- layers
    norm: str = "rms"
    norm_eps: float = 1e-6
    norm_offset: bool = False  # Gemma: x_hat * (1 + w) with w zero-initialised
    block: str = "pre"  # pre-norm | sandwich (Gemma 2/3) | parallel attention + MLP (Phi)
    mlp: str = "gated"
    activation: str = "silu"
    embed_scale: bool = False  # Gemma multiplies embeddings by sqrt(D)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # a norm (of the family's kind) over each query/key head
    # --- attention
    query_pre_attn_scalar: float | None = None  # scale = this ** -0.5 (None: head_dim)
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    layer_types: tuple[str, ...] = ()  # per layer FULL or SLIDING; empty = all FULL
    sliding_window: int | None = None  # a key is masked when q - k >= window (SLIDING layers)
    # --- rotary
    rope_theta: float = 10_000.0
    rope_type: str = "default"  # default | linear (positions / factor) | llama3 (frequency bands)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_positions: int = 8192  # llama3 only
    partial_rotary_factor: float = 1.0  # rotary on the first round(H * factor) dims (Phi: 0.4)
    local_rope_theta: float | None = None  # Gemma 3: SLIDING layers use this base, unscaled
    # --- heads and tokens
    tie_word_embeddings: bool = True  # LM head = embedding matrix; else its own [V, D] matrix
    lm_head_bias: bool = False
    max_position_embeddings: int = 8192
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    remat: bool = False  # rematerialise each block in the backward pass
    attention: str = "auto"  # attention kernel: auto | xla | cudnn | splash (model/attention.py)
    remat_policy: str = "nothing"  # what a rematerialised block keeps: a key of REMAT_POLICIES
    # One compiled block per period of the layer pattern, scanned (jax.lax.scan) over the periods;
    # parameters stacked with a leading "layers" axis (layout: model/scan.py). Same numbers.
    scan_layers: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for field, allowed in (
            ("norm", NORMS),
            ("block", BLOCKS),
            ("mlp", MLPS),
            ("activation", ACTIVATIONS),
            ("rope_type", ROPE_TYPES),
            ("attention", ATTENTIONS),
            ("remat_policy", tuple(REMAT_POLICIES)),
        ):
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field}={getattr(self, field)!r}; allowed: {', '.join(allowed)}")
        types = self.layer_types or (FULL,) * self.num_layers
        if len(types) != self.num_layers or set(types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {self.num_layers} entries of {FULL!r}/{SLIDING!r}, got {types}")
        if SLIDING in types and not self.sliding_window:
            raise ValueError("sliding_attention layers need a sliding_window")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(
                f"partial_rotary_factor={self.partial_rotary_factor} gives rotary dim "
                f"{self.rotary_dim} for head_dim {self.head_dim}; need an even number in (0, H]"
            )
        object.__setattr__(self, "layer_types", tuple(types))

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def layer_period(self) -> int:
        """The smallest P with layer_types[i] == layer_types[i % P] for every layer: 1 when all
        layers are alike, 2 for Gemma 2 (sliding, full), 6 for Gemma 3 (5 sliding, 1 full). The
        last period may be incomplete (Gemma 3 27B: 62 = 10 x 6 + 2)."""
        types, n = self.layer_types, self.num_layers
        return next(p for p in range(1, n + 1) if all(types[i] == types[i % p] for i in range(n)))

    @property
    def embed_multiplier(self) -> float:
        return math.sqrt(self.hidden_size) if self.embed_scale else 1.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `dataclasses.asdict`, also for the Gemma-only layout of earlier runs.

        Runs written before scanned layers have no `scan_layers` (False: their parameters are
        per layer) nor `remat_policy`; the dataclass defaults fill them.
        Runs written before the family-agnostic decoder stored `rms_norm_eps`, `sandwich_norm`,
        `rope_scaling` (a linear factor) and `rope_local_theta` and no `norm_offset`; those are
        translated here so their `model_config.json` still loads (their parameters are unchanged).
        """
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        if "sandwich_norm" in d:  # the Gemma-only layout
            family = d["family"]
            sandwich = d.pop("sandwich_norm")
            d["norm_eps"] = d.pop("rms_norm_eps", 1e-6)
            factor = float(d.pop("rope_scaling", 1.0))
            local = d.pop("rope_local_theta", 10_000.0)
            d.update(
                norm_offset=True,
                embed_scale=True,
                activation="gelu_tanh",
                block="sandwich" if sandwich else "pre",
                rope_type="linear" if factor != 1.0 else "default",
                rope_factor=factor,
                local_rope_theta=local if family == "gemma3" else None,
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}")
        return cls(**d)
