"""Will RLHF fit? Bytes per device of what the learner holds, from the models' configs, before any
weight is loaded: the actor (float32 weights, gradients, Adam's two moments), the reference
(float32 weights), the reward model (its parameters as loaded), the critic for PPO (as the actor)
and the rollout's KV cache. Activations are not counted: the verdict keeps a quarter of the memory
for them."""

from __future__ import annotations

import json
import pathlib

import jax

HEADROOM = 0.75  # the share of device memory the counted parts may take


def causal_lm_params(config: dict) -> int:
    """Parameter count of a decoder LM from its config.json (embeddings, attention, MLP, norms)."""
    d, f, layers, v = (
        config["hidden_size"],
        config["intermediate_size"],
        config["num_hidden_layers"],
        config["vocab_size"],
    )
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or d // heads
    kv = config.get("num_key_value_heads") or heads
    attn = d * heads * hd * 2 + d * kv * hd * 2
    per_layer = attn + 3 * d * f + 2 * d
    head = 0 if config.get("tie_word_embeddings", False) else v * d
    return v * d + layers * per_layer + d + head


def estimate(
    policy_dir: str, reward_params: int, reward_bytes: int, *, ppo: bool, sequences: int, cache_size: int
) -> dict:
    """{"parts": {name: bytes}, "total", "capacity" (None where the device reports no limit),
    "fits" (None then)} per device, everything on one device (the demo's and the tests' layout)."""
    config = json.loads((pathlib.Path(policy_dir) / "config.json").read_text())
    p = causal_lm_params(config)
    heads = config["num_attention_heads"]
    hd = config.get("head_dim") or config["hidden_size"] // heads
    kv = config.get("num_key_value_heads") or heads
    parts = {
        "actor (weights, grads, Adam)": 16 * p,
        "reference": 4 * p,
        "reward model": reward_bytes,
        "kv cache": 2 * config["num_hidden_layers"] * kv * hd * cache_size * sequences * 4,
    }
    if ppo:
        parts["critic (weights, grads, Adam)"] = 16 * p
    total = sum(parts.values())
    stats = jax.devices()[0].memory_stats() or {}
    capacity = stats.get("bytes_limit")
    return {
        "parts": parts,
        "policy_params": p,
        "reward_params": reward_params,
        "total": total,
        "capacity": capacity,
        "fits": None if capacity is None else total <= HEADROOM * capacity,
    }


def describe(fit: dict) -> str:
    lines = [f"  {name}: {b / 2**20:.1f} MiB" for name, b in fit["parts"].items()]
    cap = "no limit reported" if fit["capacity"] is None else f"{fit['capacity'] / 2**30:.1f} GiB"
    verdict = {None: "unknown", True: "fits", False: "does NOT fit"}[fit["fits"]]
    return "\n".join(
        ["RLHF memory per device (activations not counted):", *lines]
        + [f"  total {fit['total'] / 2**20:.1f} MiB of {cap} (headroom {HEADROOM:.0%}): {verdict}"]
    )
