"""Low-rank adapters (LoRA) on the decoder's projection matrices.

A target matrix W, viewed as [in, out] (HF's [out, in] transposed), becomes
    W + (alpha / rank) * A @ B,   A [in, rank] random, B [rank, out] zero,
so the adapted model equals the base model exactly until B moves. Targets are chosen by a
regular expression searched in the Hugging Face parameter names (`model.layers.3.mlp.up_proj.weight`);
only projection matrices (q/k/v/o, gate/up/down, fc1/fc2, dense) can be adapted.

The trainable tree of a LoRA run is
    {"lora": {<same nesting as the params>: {"a": A, "b": B}}, "reward_head": F, [heads the flags unfreeze]}
and everything else is the frozen base (`split`). `merge` rebuilds full parameters inside the jitted
step, so gradients reach only A, B and the unfrozen heads, and the optimizer holds state for those alone.
Dropout on the adapter input is not offered: adapters are merged into W, where input dropout has no
equivalent (the paper's runs, like PEFT's default, use none).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from haf_jax.model import hf, scan
from haf_jax.model.config import ModelConfig
from haf_jax.model.heads import abstract_params


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """`model.lora.*` of the run config; rank 0 means full fine-tuning."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str = r"mlp\.(gate_proj|up_proj|down_proj|fc1|fc2)\.weight$"
    train_lm_head: bool = False
    train_embeddings: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0, got {self.rank}")
        if self.dropout:
            raise ValueError(
                f"model.lora.dropout={self.dropout}: only 0 is supported (adapters are merged into "
                f"the weights inside the step, where input dropout has no equivalent)"
            )
        try:
            re.compile(self.targets)
        except re.error as e:
            raise ValueError(f"model.lora.targets={self.targets!r} is not a regular expression: {e}") from None

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, lora_cfg) -> LoraConfig:
        return cls(
            int(lora_cfg.rank),
            float(lora_cfg.alpha),
            float(lora_cfg.dropout),
            str(lora_cfg.targets),
            bool(lora_cfg.train_lm_head),
            bool(lora_cfg.train_embeddings),
        )


def _per_layer(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, scan_layers=False)


def _matrix_dims(path: str, shape) -> tuple[int, int]:
    """(in, out) of our tensor at `path` viewed as a matrix."""
    layout = hf._layout(path)
    if layout == "in_first":
        return shape[0], math.prod(shape[1:])
    if layout == "out_last":
        return math.prod(shape[:-1]), shape[-1]
    raise ValueError(f"{path} is not a projection matrix")


def targets(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    """{our flat path ('layers_0/mlp/up_proj'): (in, out)} of the adapted matrices.

    With scanned layers a stacked matrix ('layers/block_0/mlp/up_proj', [R, ...]) is one target
    (its adapters then carry the same leading axis); the regular expression, matched against the
    per-layer HF names, must select all of its layers or none."""
    flat = _per_layer_targets(_per_layer(config), lora)
    if not config.scan_layers:
        return flat
    out, layers = {}, {}
    for path, dims in flat.items():
        new, k = scan.stacked_path(path, config)
        out[new] = dims
        layers.setdefault(new, set()).add(k)
    partial = [p for p, ks in layers.items() if None not in ks and len(ks) != len(scan.layer_paths(p, config))]
    if partial:
        raise ValueError(
            f"model.lora.targets={lora.targets!r} selects only some of the scanned layers of "
            f"{partial[:3]}; adapt every layer of a period position, or set model.scan_layers=False"
        )
    return out


def _per_layer_targets(config: ModelConfig, lora: LoraConfig) -> dict[str, tuple[int, int]]:
    shapes = traverse_util.flatten_dict(abstract_params(config)[0], sep="/")
    out, refused = {}, []
    for path, s in shapes.items():
        name = hf._hf_name(path, "model.")
        if not re.search(lora.targets, name):
            continue
        if path == "reward_head" or hf._layout(path) not in ("in_first", "out_last"):
            refused.append(name)
            continue
        out[path] = _matrix_dims(path, s.shape)
    if refused:
        raise ValueError(
            f"model.lora.targets={lora.targets!r} matches tensors that are not projection matrices: "
            f"{refused[:5]} (use model.lora.train_lm_head / train_embeddings to train heads)"
        )
    if not out:
        raise ValueError(
            f"model.lora.targets={lora.targets!r} matches no projection matrix of this {config.family} "
            f"model (names look like 'model.layers.0.mlp.up_proj.weight')"
        )
    return out


def trainable_heads(config: ModelConfig, lora: LoraConfig) -> tuple[str, ...]:
    """Top-level parameters trained in full next to the adapters (the reward head always)."""
    keys = ["reward_head"]
    if lora.train_lm_head:
        keys += ["embed_tokens"] if config.tie_word_embeddings else ["lm_head"]
        keys += ["lm_head_bias"] if config.lm_head_bias else []
    if lora.train_embeddings and "embed_tokens" not in keys:
        keys.append("embed_tokens")
    return tuple(keys)


def init_adapters(config: ModelConfig, lora: LoraConfig, rng):
    """{"a", "b"} per target, nested like the params: A ~ U(+-1/sqrt(in)) (as PEFT), B = 0. float32.
    Scanned layers get the per-layer adapters stacked: the same numbers in either layout."""
    targets(config, lora)  # a scanned model refuses a partial selection of its stacked layers
    flat = {}
    for i, (path, (d_in, d_out)) in enumerate(sorted(_per_layer_targets(_per_layer(config), lora).items())):
        bound = 1.0 / math.sqrt(d_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), (d_in, lora.rank), jnp.float32, -bound, bound)
        flat[path + "/a"], flat[path + "/b"] = a, jnp.zeros((lora.rank, d_out), jnp.float32)
    return scan.stack(traverse_util.unflatten_dict(flat, sep="/"), config)


def split(params, config: ModelConfig, lora: LoraConfig, rng):
    """(trainable, frozen) from full (base) params: fresh adapters + the trainable heads, and the rest."""
    heads = trainable_heads(config, lora)
    trainable = {"lora": init_adapters(config, lora, rng), **{k: params[k] for k in heads}}
    frozen = {k: v for k, v in params.items() if k not in heads}
    return trainable, frozen


def delta(path: str, a, b, shape, scale: float):
    """scale * A @ B reshaped to our layout of the target at `path` ([in, *out] or [*in, out]);
    stacked adapters ([R, in, rank] @ [R, rank, out]) give the stacked [R, ...] deltas."""
    return (scale * (a @ b)).reshape(shape)


def merge(trainable, frozen, lora: LoraConfig):
    """Full parameters: the frozen base with W + scale * A @ B at every target, and the trained heads."""
    params = {**frozen, **{k: v for k, v in trainable.items() if k != "lora"}}
    flat = traverse_util.flatten_dict(params, sep="/")
    for path, ab in traverse_util.flatten_dict(trainable["lora"], sep="/", is_leaf=lambda p, x: "a" in x).items():
        w = flat[path]
        flat[path] = w + delta(path, ab["a"], ab["b"], w.shape, lora.scale).astype(w.dtype)
    return traverse_util.unflatten_dict(flat, sep="/")


def abstract_trainable(config: ModelConfig, lora: LoraConfig):
    """(float32 ShapeDtypeStructs, logical axis names) of the trainable tree: an adapter's `a` keeps
    its matrix's input axis name and `b` its output axis name (rank axes are never split); stacked
    adapters keep the leading "layers" axis."""
    from jax.sharding import PartitionSpec as P

    shapes, names = abstract_params(config)
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    flat_names = traverse_util.flatten_dict(names, sep="/", is_leaf=lambda p, x: isinstance(x, P))
    out_shapes, out_names = {}, {}
    for path, (d_in, d_out) in targets(config, lora).items():
        axes = tuple(flat_names[path])
        lead = (len(scan.layer_paths(path, config)),) if axes[0] == scan.STACK else ()
        axes, ndim = axes[len(lead) :], len(flat_shapes[path].shape) - len(lead)
        in_first = hf._layout(path) == "in_first"
        a_axis = axes[0] if (in_first or ndim == 2) else None
        b_axis = axes[-1] if (not in_first or ndim == 2) else None
        lead_name = (scan.STACK,) * len(lead)
        out_shapes[f"lora/{path}/a"] = jax.ShapeDtypeStruct((*lead, d_in, lora.rank), jnp.float32)
        out_shapes[f"lora/{path}/b"] = jax.ShapeDtypeStruct((*lead, lora.rank, d_out), jnp.float32)
        out_names[f"lora/{path}/a"] = P(*lead_name, a_axis, None)
        out_names[f"lora/{path}/b"] = P(*lead_name, None, b_axis)
    for key in trainable_heads(config, lora):
        out_shapes[key], out_names[key] = shapes[key], names[key]
    return traverse_util.unflatten_dict(out_shapes, sep="/"), traverse_util.unflatten_dict(out_names, sep="/")
