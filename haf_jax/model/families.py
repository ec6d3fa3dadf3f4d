"""Dispatch on Hugging Face `model_type`: one plain dict from model_type to the family module that
reads and writes that family's `config.json` and holds its presets.

A family module has `from_hf(hf) -> ModelConfig`, `to_hf(config, architecture) -> dict` and
`PRESETS`. A checkpoint whose `model_type` is not listed here is refused by name, so a Llama
checkpoint can never be read as a Gemma (whose norms compute x * (1 + w)).
"""

from __future__ import annotations

from typing import Any

from haf_jax.model import gemma, llama, mistral, phi, qwen2
from haf_jax.model.config import ModelConfig

FAMILIES = {
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3": gemma,
    "gemma3_text": gemma,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "phi": phi,
}
_BY_FAMILY = {
    "gemma": gemma,
    "gemma2": gemma,
    "gemma3": gemma,
    "llama": llama,
    "mistral": mistral,
    "qwen2": qwen2,
    "phi": phi,
}

PRESETS: dict[str, ModelConfig] = {
    name: cfg for module in (gemma, llama, mistral, qwen2, phi) for name, cfg in module.PRESETS.items()
}


def from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in FAMILIES:
        raise ValueError(
            f"unsupported architecture model_type={model_type!r} "
            f"(architectures={hf.get('architectures')}); haf_jax reads model_type in {sorted(FAMILIES)}"
        )
    return FAMILIES[model_type].from_hf(hf)


def to_hf(config: ModelConfig, architecture: str = "ForCausalLM", **extra) -> dict[str, Any]:
    hf = _BY_FAMILY[config.family].to_hf(config, architecture)
    hf.update(extra)
    return hf


def preset(name: str) -> ModelConfig:
    """The named architecture; raises with the list of names when unknown."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]
