"""Hugging Face checkpoints <-> haf_jax parameters (safetensors only; no torch, no pickle, no remote code).

Import: `load_params(dir, config)` reads `model.safetensors` or a sharded `model.safetensors.index.json`
one tensor at a time and renames it onto the Flax tree (parameter names mirror HF, see layers.py).
Accepted tensor prefixes: whatever precedes `embed_tokens.weight` ("model.", "model.language_model.",
"language_model.model.", ...). A `*ForSequenceClassification` checkpoint with num_labels=1 fills the
reward head from `score.weight`; a causal LM gets a zero reward head. A tied model's `lm_head.weight`,
when present, must equal the embedding; an untied one's is the model's own LM head. Vision-tower /
projector tensors of a multimodal Gemma 3 checkpoint are skipped and listed in info["ignored"]; any
OTHER unexpected tensor is an error (a silently dropped weight would be a silently different model).

Export: `save_hf(params, config, dir, kind=...)` writes config.json + model.safetensors (+ tokenizer)
that `transformers` Auto* classes load.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from haf_jax.model import families, heads, scan
from haf_jax.model.config import ModelConfig

_SKIPPED_PARTS = ("vision_tower.", "multi_modal_projector.", "vision_model.")
_OFFLINE_VALUES = ("1", "true", "yes", "on")


def resolve_checkpoint(path_or_hub_id) -> pathlib.Path:
    """A local checkpoint directory, a .gguf file (its cached conversion, see model/gguf.py), or a hub
    snapshot (config, safetensors, tokenizer) when online."""
    path = pathlib.Path(os.path.expanduser(str(path_or_hub_id)))
    if path.is_dir():
        return path
    if path.suffix.lower() == ".gguf" and path.is_file():
        from haf_jax.model import gguf  # the gguf package is an optional extra

        return gguf.cached_conversion(path)
    name = str(path_or_hub_id)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"checkpoint {name!r} is not a directory (nor a hub id of the form 'org/name')")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in _OFFLINE_VALUES:
        raise FileNotFoundError(
            f"checkpoint {name!r} is not a local directory and HF_HUB_OFFLINE is set, so it cannot be "
            f"downloaded from the Hugging Face hub; download it first or pass a local directory"
        )
    from huggingface_hub import snapshot_download

    try:
        return pathlib.Path(
            snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model"])
        )
    except Exception as e:  # network, auth (gated models) or a missing repo: one clear line
        raise FileNotFoundError(
            f"checkpoint {name!r} could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def load_hf_config(directory) -> tuple[ModelConfig, dict]:
    """(ModelConfig, parsed config.json) of a checkpoint directory."""
    path = pathlib.Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {directory}")
    hf = json.loads(path.read_text())
    return families.from_hf(hf), hf


_HEAD_NAMES = {"reward_head": "score.weight", "lm_head": "lm_head.weight", "lm_head_bias": "lm_head.bias"}
_IN_FIRST = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "fc1", "reward_head")
_OUT_LAST = ("o_proj", "dense", "down_proj", "fc2")


def _hf_name(path: str, prefix: str = "") -> str:
    """'layers_3/self_attn/q_proj_bias' -> prefix + 'layers.3.self_attn.q_proj.bias'; heads keep HF's names."""
    if path in _HEAD_NAMES:
        return _HEAD_NAMES[path]
    path = re.sub(r"layers_(\d+)", r"layers.\1", path)
    if path.endswith("/scale"):
        path = path.removesuffix("/scale") + "/weight"
    elif path.endswith("_bias"):
        path = path.removesuffix("_bias") + "/bias"
    elif not path.endswith("/bias"):
        path += "/weight"
    return prefix + path.replace("/", ".")


def _layout(path: str) -> str:
    """How an HF tensor maps to ours: 'in_first' (HF [out, in] -> [in, *out]), 'out_last'
    (HF [out, in] -> [*in, out]), 'flat' (HF [a*b] -> [a, b]: q/k/v biases) or 'same'."""
    leaf = path.rsplit("/", 1)[-1]
    if leaf in _IN_FIRST:
        return "in_first"
    if leaf in _OUT_LAST:
        return "out_last"
    if leaf in ("q_proj_bias", "k_proj_bias", "v_proj_bias"):
        return "flat"
    return "same"


def _hf_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    if layout == "in_first":
        return (math.prod(shape[1:]), shape[0])
    if layout == "out_last":
        return (shape[-1], math.prod(shape[:-1]))
    if layout == "flat":
        return (math.prod(shape),)
    return tuple(shape)


def _to_ours(w: np.ndarray, shape, layout: str) -> np.ndarray:
    return w.reshape(shape) if layout in ("same", "flat") else w.T.reshape(shape)


def _to_hf(w: np.ndarray, layout: str) -> np.ndarray:
    if layout == "in_first":
        return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)
    if layout == "out_last":
        return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)
    if layout == "flat":
        return np.ascontiguousarray(w.reshape(-1))
    return np.ascontiguousarray(w)


def _tensor_files(directory: pathlib.Path) -> dict[str, pathlib.Path]:
    """tensor name -> safetensors file holding it (single file or sharded index)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / file for name, file in weight_map.items()}
    single = directory / "model.safetensors"
    if not single.is_file():
        found = sorted(p.name for p in directory.iterdir())
        raise FileNotFoundError(
            f"no model.safetensors or model.safetensors.index.json in {directory} (found {found}); "
            f"only safetensors weights are read (never pickle/.bin)"
        )
    with safe_open(single, framework="numpy") as f:
        return dict.fromkeys(f.keys(), single)


def _num_labels(hf: dict) -> int:
    if hf.get("id2label"):
        return len(hf["id2label"])
    return int(hf.get("num_labels", 2))  # transformers' default for classification heads is 2


def load_params(directory, config: ModelConfig, *, dtype=jnp.float32, shardings=None):
    """Parameters of the checkpoint in `directory` as `dtype` arrays, laid out like heads.abstract_params.

    Returns (params, info) with info = {"architecture", "reward_head": "loaded" | "zero-initialised",
    "prefix", "ignored": [skipped tensor names]}. With `shardings` (a tree like the params, e.g.
    haf_jax.core.params.param_shardings), each array is placed as soon as it is read, so the host holds
    one tensor at a time.
    """
    directory = pathlib.Path(directory)
    hf_cfg, hf = load_hf_config(directory)  # validates model_type
    if hf_cfg.family != config.family:
        raise ValueError(f"{directory} holds a {hf_cfg.family} checkpoint but the model config is {config.family}")
    arch = (hf.get("architectures") or ["?"])[0]
    is_classifier = arch.endswith("ForSequenceClassification")
    if is_classifier and _num_labels(hf) != 1:
        raise ValueError(
            f"{arch} in {directory} has num_labels={_num_labels(hf)}; a reward model needs "
            f"num_labels=1 (score.weight of shape [1, hidden_size])"
        )
    files = _tensor_files(directory)
    embeds = [n for n in files if n.endswith("embed_tokens.weight") and not any(p in n for p in _SKIPPED_PARTS)]
    if len(embeds) != 1:
        raise ValueError(f"expected exactly one '*embed_tokens.weight' tensor in {directory}, found {embeds}")
    prefix = embeds[0][: -len("embed_tokens.weight")]

    # Tensors are read in the per-layer layout; a scanned model's layers are stacked per parameter
    # (the host then holds one parameter of every layer of a period position at a time).
    shapes, _ = heads.abstract_params(dataclasses.replace(config, scan_layers=False))
    flat_shapes = traverse_util.flatten_dict(shapes, sep="/")
    flat_shardings = traverse_util.flatten_dict(shardings, sep="/") if shardings is not None else {}
    wanted = {_hf_name(path, prefix): path for path in flat_shapes}  # hf name -> our path
    tied_head = config.tie_word_embeddings and "lm_head.weight" in files
    ignored, unexpected = [], []
    for name in files:
        if name in wanted or (tied_head and name == "lm_head.weight"):
            continue
        (ignored if any(p in name for p in _SKIPPED_PARTS) else unexpected).append(name)
    if unexpected:
        raise ValueError(
            f"unexpected tensors in {directory} (not part of a {config.family} model with "
            f"{config.num_layers} layers): {sorted(unexpected)[:10]}"
            + (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else "")
        )

    np_dtype = jnp.dtype(dtype)
    handles: dict[pathlib.Path, object] = {}

    def read(name):
        file = files[name]
        if file not in handles:
            handles[file] = safe_open(file, framework="numpy")
        return handles[file].get_tensor(name)

    info = {"architecture": arch, "prefix": prefix, "ignored": sorted(ignored)}

    def tensor(name, path):
        shape = tuple(flat_shapes[path].shape)
        layout = _layout(path)
        if name not in files:
            if path == "reward_head" and not is_classifier:
                array = np.zeros(shape, np_dtype)
                info["reward_head"] = "zero-initialised"
            elif path.startswith("lm_head") and is_classifier:
                raise ValueError(
                    f"{arch} in {directory} has no {name!r}: this {config.family} model's LM head is "
                    f"not the embedding, and haf_jax needs it for log-probs; use the matching "
                    f"*ForCausalLM checkpoint or a haf_jax export (which keeps the LM head)"
                )
            else:
                raise ValueError(
                    f"tensor {name!r} is missing from {directory} (expected shape "
                    f"{list(_hf_shape(shape, layout))} for {path})"
                )
        else:
            w = read(name)
            expected = _hf_shape(shape, layout)
            if tuple(w.shape) != expected:
                raise ValueError(
                    f"tensor {name!r} has shape {list(w.shape)} but the config needs "
                    f"{list(expected)} (for {path} {list(shape)})"
                )
            if path == "embed_tokens" and tied_head:
                head = read("lm_head.weight")
                if head.shape != w.shape or not np.array_equal(head, w):
                    raise ValueError(
                        f"lm_head.weight differs from embed_tokens.weight in {directory}, but its "
                        f"config.json says tie_word_embeddings=true"
                    )
                del head
            array = _to_ours(w, shape, layout).astype(np_dtype)
            if path == "reward_head":
                info["reward_head"] = "loaded"
        return array

    names_of = {path: name for name, path in wanted.items()}
    flat = {}
    for target in traverse_util.flatten_dict(heads.abstract_params(config)[0], sep="/"):
        sources = scan.layer_paths(target, config)
        if len(sources) == 1:
            array = tensor(names_of[target], target)
        else:  # filled in place: no second copy of the stack
            array = np.empty((len(sources), *flat_shapes[sources[0]].shape), np_dtype)
            for k, source in enumerate(sources):
                array[k] = tensor(names_of[source], source)
        flat[target] = jax.device_put(array, flat_shardings[target]) if target in flat_shardings else jnp.asarray(array)
        del array
    return traverse_util.unflatten_dict(flat, sep="/"), info


def export_pad_token(config: ModelConfig, tokenizer=None):
    """(pad id, tokenizer) for a reward-model export whose pad token differs from EOS.

    transformers' *ForSequenceClassification reads the reward at the rightmost token that is not
    `pad_token_id`; haf_jax reads it at the EOS ending every sequence. So the pad id must not be
    the EOS id (Llama, Mistral and Phi ship no pad token; Qwen2 base pads with its EOS). In order:
    the tokenizer's own pad token when it is not EOS; its unknown token; a new `<|pad|>` token at
    the first embedding row no tokenizer id uses (vocab_size > len(tokenizer)); a reserved special
    token (Llama 3). The returned tokenizer is a copy carrying that pad token.
    """
    eos = config.eos_token_id
    if tokenizer is None:
        if config.pad_token_id is None or config.pad_token_id == eos:
            raise ValueError(
                f"reward model export needs a pad token distinct from EOS (pad_token_id="
                f"{config.pad_token_id}, eos_token_id={eos}) and no tokenizer was given to choose one"
            )
        return config.pad_token_id, None
    tokenizer = copy.deepcopy(tokenizer)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else eos
    avoid = {eos, tokenizer.bos_token_id}
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id not in avoid:
        return tokenizer.pad_token_id, tokenizer
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id not in avoid:
        tokenizer.pad_token = tokenizer.unk_token
        return tokenizer.pad_token_id, tokenizer
    if len(tokenizer) < config.vocab_size:
        tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
        if tokenizer.pad_token_id < config.vocab_size:
            return tokenizer.pad_token_id, tokenizer
    reserved = [t for t in tokenizer.all_special_tokens if "reserved" in t]
    reserved_ids = [i for i in tokenizer.convert_tokens_to_ids(reserved) if i not in avoid and i < config.vocab_size]
    if reserved_ids:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(reserved_ids[0])
        return tokenizer.pad_token_id, tokenizer
    raise ValueError(
        f"cannot choose a pad token distinct from EOS ({eos}) for the reward model export: the "
        f"tokenizer has no pad/unk token, no free embedding row and no reserved special token"
    )


def save_hf(
    params, config: ModelConfig, out_dir, *, kind: str = "reward_model", tokenizer=None, dtype=np.float32
) -> None:
    """Writes a Hugging Face checkpoint: `kind="reward_model"` -> <Family>ForSequenceClassification
    (num_labels=1, score.weight = reward head), `kind="policy"` -> <Family>ForCausalLM.

    An untied LM head (`lm_head.weight`, `lm_head.bias`) is written to both, so haf_jax can score
    log-probs from the reward model too (transformers loads the classifier and reports those
    tensors as unused). The reward model's pad token differs from EOS (`export_pad_token`).
    Parameters are gathered to the host (single-process only); scanned layers are written per layer.
    """
    if kind not in ("reward_model", "policy"):
        raise ValueError(f"kind must be 'reward_model' or 'policy', got {kind!r}")
    out = pathlib.Path(out_dir)
    if kind == "reward_model":
        pad, tokenizer = export_pad_token(config, tokenizer)
    else:
        pad = tokenizer.pad_token_id if tokenizer is not None else config.pad_token_id
    eos = (
        tokenizer.eos_token_id if tokenizer is not None and tokenizer.eos_token_id is not None else config.eos_token_id
    )
    extra = {"pad_token_id": pad, "eos_token_id": eos, "dtype": np.dtype(dtype).name}
    if kind == "reward_model":
        hf = families.to_hf(
            config, "ForSequenceClassification", id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0}, **extra
        )
    else:
        hf = families.to_hf(config, "ForCausalLM", **extra)
    tensors = {}
    params = scan.unstack(jax.device_get(params), config)  # HF names every layer
    for path, value in traverse_util.flatten_dict(params, sep="/").items():
        if path == "reward_head" and kind == "policy":
            continue
        tensors[_hf_name(path, "model.")] = _to_hf(np.asarray(jax.device_get(value)).astype(dtype), _layout(path))
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_peft_adapter(
    adapters, config: ModelConfig, lora, out_dir, *, heads: dict | None = None, base: str = ""
) -> None:
    """Writes LoRA adapters in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`)
    for a *ForSequenceClassification base: `peft.PeftModel.from_pretrained(base_classifier, out_dir)`
    rebuilds the reward model. `adapters` is the trained {"lora": ...} subtree (model/lora.py);
    `heads` the fully trained top-level parameters saved whole (PEFT `modules_to_save`): the reward
    head as `score`, and the embedding when it was trained."""
    out = pathlib.Path(out_dir)
    names = {"reward_head": "score", "embed_tokens": "model.embed_tokens"}
    tensors, modules = {}, []
    adapters = scan.unstack(jax.device_get(adapters), config)  # PEFT names every layer
    for path, ab in traverse_util.flatten_dict(adapters, sep="/", is_leaf=lambda p, x: "a" in x).items():
        module = _hf_name(path, "model.").removesuffix(".weight")
        modules.append(module)
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"], np.float32).T)
        tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"], np.float32).T)
    saved = []
    for key, value in (heads or {}).items():
        if key in names:
            saved.append(names[key].rsplit(".", 1)[-1])
            tensors[f"base_model.model.{names[key]}.weight"] = _to_hf(np.asarray(value, np.float32), _layout(key))
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "SEQ_CLS",
        "r": lora.rank,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(modules),
        "modules_to_save": saved,
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "base_model_name_or_path": base or None,
    }
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
