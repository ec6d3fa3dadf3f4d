"""A run as Hugging Face checkpoints: what `python -m haf_jax.export` writes.

OUT/reward_model: a *ForSequenceClassification checkpoint (num_labels=1, safetensors, tokenizer
with a pad token distinct from EOS); OUT/policy: a *ForCausalLM checkpoint (the trained LM head);
for a LoRA run also OUT/adapter, its adapters in the PEFT layout (merged into the other two).

Both tokenizers render conversations in the run's training format (data.chat_format: BOS, the
run's data.template, the response, EOS): a PyTorch trainer that scores [user prompt, assistant
completion] through the reward tokenizer's chat template (TRL's GRPOTrainer, ...) reads the reward
where `score` reads it, and the policy is prompted as `sample` prompts it. A chat template the
tokenizer had stays available by the name "tokenizer". A tokenizer that splits prompt | response
elsewhere than the data layer (Llama 2 / Mistral SentencePiece) gets a warning naming the tokens.
"""

from __future__ import annotations

import pathlib

import jax

from haf_jax import data
from haf_jax.core import distributed, paths
from haf_jax.core.logs import log
from haf_jax.evaluation.loading import default_mesh, is_run_dir, load_model
from haf_jax.model import hf


def export(workdir: str, out: str, *, which: str = "best") -> dict:
    """Writes the checkpoint `which` of the run `workdir` (float32, as trained) under `out`; returns
    {"step", "reward_model", "policy", "adapter" (LoRA runs)}: the step and the directories written.
    Every process gathers the parameters; process 0 writes."""
    if not is_run_dir(workdir):
        raise FileNotFoundError(f"{workdir} is not a haf_jax run directory (needs checkpoints/ and model_config.json)")
    m = load_model(workdir, default_mesh(), which=which, float32=True)
    params = distributed.to_host(m.params)
    adapters = distributed.to_host(m.lora.adapters) if m.lora is not None else None
    target = paths.path(out)
    result = {"step": m.step, "reward_model": str(target / "reward_model"), "policy": str(target / "policy")}
    if adapters is not None:
        result["adapter"] = str(target / "adapter")
    if jax.process_index() != 0:
        return result
    tokenizer = data.with_training_format(m.tokenizer, m.run_config.data.template)
    problem = data.format_mismatch(m.tokenizer, m.run_config.data.template)
    if problem:  # the export is still right for transformers and `score`; only chat-template readers differ
        log(f"warning: {problem}")
    with paths.writable_dir(target) as local:
        local = pathlib.Path(local)
        for kind in ("reward_model", "policy"):
            hf.save_hf(params, m.model_cfg, local / kind, kind=kind, tokenizer=tokenizer)
        if adapters is not None:
            trained = {
                k: params[k]
                for k in ("reward_head", "embed_tokens")
                if k == "reward_head" or m.lora.config.train_embeddings
            }
            hf.save_peft_adapter(
                adapters, m.model_cfg, m.lora.config, local / "adapter", heads=trained, base=m.lora.base
            )
    return result
