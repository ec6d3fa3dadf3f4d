"""A Hugging Face causal LM directory as a Tunix model (Tunix 0.1.7's Qwen2 and Llama 3 modules),
the tokenizer adapter Tunix's sampler calls, and a PPO critic made from the policy.

What Tunix 0.1.7 cannot load is refused with the reason: families other than qwen2 and llama
(Gemma's Tunix loader takes Kaggle/Flax checkpoints, not the safetensors haf_jax exports), Llama
with rope scaling (Tunix's Llama applies plain RoPE: a Llama 3.1/3.2 checkpoint would silently
compute other logits) or attention biases, and sliding-window attention.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TUNIX_VERSION = "0.1.7"  # the version pinned by the rlhf extra; its limits are the ones named here


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What the policy directory's config.json says: family and Tunix's ModelConfig."""

    family: str
    tunix_config: object
    tied: bool


def read_policy(directory: str) -> PolicySpec:
    """The Tunix ModelConfig of the causal LM in `directory` (config.json), or ValueError naming
    what Tunix cannot run."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face causal LM directory is needed)")
    c = json.loads(path.read_text())
    family = c.get("model_type")
    heads = c["num_attention_heads"]
    common = dict(
        num_layers=c["num_hidden_layers"],
        vocab_size=c["vocab_size"],
        embed_dim=c["hidden_size"],
        hidden_dim=c["intermediate_size"],
        num_heads=heads,
        head_dim=c.get("head_dim") or c["hidden_size"] // heads,
        num_kv_heads=c.get("num_key_value_heads") or heads,
        rope_theta=int(c.get("rope_theta", 10_000)),
        norm_eps=c.get("rms_norm_eps", 1e-6),
    )
    tied = bool(c.get("tie_word_embeddings", False))
    rope = c.get("rope_scaling") or (c.get("rope_parameters") or {})
    if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(
            f"{directory}: rope scaling {rope.get('rope_type', rope.get('type'))!r}; Tunix {TUNIX_VERSION}'s "
            "Qwen2 and Llama apply plain RoPE only"
        )
    if c.get("use_sliding_window"):
        raise ValueError(f"{directory}: sliding-window attention is not in Tunix {TUNIX_VERSION}'s Qwen2")
    if family == "qwen2":
        from tunix.models.qwen2 import model

        return PolicySpec(family, model.ModelConfig(**common, use_tied_embedding=tied), tied)
    if family == "llama":
        if c.get("attention_bias") or c.get("mlp_bias"):
            raise ValueError(f"{directory}: Llama with biases is not in Tunix {TUNIX_VERSION}'s Llama")
        from tunix.models.llama3 import model

        return PolicySpec(family, model.ModelConfig(**common, weight_tying=tied), tied)
    raise ValueError(
        f"{directory}: model_type {family!r}; the RLHF policy must be qwen2 or llama (Tunix {TUNIX_VERSION} "
        "loads those from safetensors; train the reward model on any family, the policy on one of these)"
    )


def load_policy(directory: str, mesh):
    """(Tunix model, PolicySpec) of the causal LM in `directory`, float32, on `mesh` (axes fsdp, tp)."""
    spec = read_policy(directory)
    if spec.family == "qwen2":
        from tunix.models.qwen2 import params
    else:
        from tunix.models.llama3 import params
    with mesh:
        return params.create_model_from_safe_tensors(str(directory), spec.tunix_config, mesh), spec


def make_critic(actor, spec: PolicySpec, seed: int = 0, scale: float = 1.0):
    """A PPO value model initialised from the policy: a copy of its trunk with a random [embed_dim, 1]
    head in place of the LM head (Tunix's create_critic_model; a tied-embedding policy has no lm_head
    to replace, so its copy is switched to an untied head first), its output times `scale` (values in
    the scaled reward's unit, run.PPO_REWARD_SCALE, while its weights learn at the unscaled one's
    pace). Tunix 0.1.7 cannot start the critic from the reward model: that is a haf_jax model, not
    one of Tunix's modules."""
    from tunix.rl import utils

    if not spec.tied:
        critic = utils.create_critic_model(actor, seed=seed)
    else:
        graph, state = nnx.split(actor)
        critic = nnx.merge(graph, jax.tree.map(jnp.copy, state))
        untie = {"use_tied_embedding": False} if spec.family == "qwen2" else {"weight_tying": False}
        critic.config = dataclasses.replace(critic.config, **untie)
        critic.lm_head = nnx.Linear(spec.tunix_config.embed_dim, 1, use_bias=False, rngs=nnx.Rngs(seed))
    if scale != 1.0:
        critic.lm_head = ScaledHead(critic.lm_head, scale)
    return critic


class ScaledHead(nnx.Module):
    """`head`'s output times a constant (a float attribute, not a parameter)."""

    def __init__(self, head, scale: float):
        self.head, self.scale = head, scale

    def __call__(self, x):
        return self.scale * self.head(x)


class TunixTokenizer:
    """The methods Tunix's sampler calls (encode, decode, bos_id, eos_id, pad_id) over a transformers
    tokenizer. Text is encoded without special tokens: the sampler adds BOS itself, as haf_jax's data
    layer does; decode drops special tokens so the reward sees the text only."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text, **kwargs) -> list[int]:
        return self.tokenizer.encode(str(text), add_special_tokens=False)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(np.asarray(ids).tolist(), skip_special_tokens=True)

    def bos_id(self) -> int:
        return self.tokenizer.bos_token_id

    def eos_id(self) -> int:
        return self.tokenizer.eos_token_id

    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.tokenizer.eos_token_id if pad is None else pad
