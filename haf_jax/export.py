"""Export a run as Hugging Face checkpoints.

  python -m haf_jax.export --workdir=RUN --out=DIR [--step=best|last|N]

Writes DIR/reward_model (a *ForSequenceClassification checkpoint, num_labels=1, safetensors,
tokenizer with a pad token distinct from EOS) and DIR/policy (a *ForCausalLM checkpoint, the
trained LM head), both loadable with transformers' Auto* classes. A LoRA run's adapters are merged
into both; DIR/adapter also holds them in the PEFT layout, to load onto the base model's
*ForSequenceClassification with `peft.PeftModel.from_pretrained`.

RUN and DIR may be gs://... URLs. Multi-host: run the same command on every host (as training);
the parameters are gathered across processes and process 0 writes.
"""
from __future__ import annotations

import json
import pathlib
import sys

from absl import app, flags, logging

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory written by haf_jax.train.")
_OUT = flags.DEFINE_string("out", None, "Output directory.")
_STEP = flags.DEFINE_string("step", "best", "best | last | a step number.")


def export(workdir: str, out: str, *, which: str = "best") -> dict:
    import jax

    from haf_jax.core import distributed, paths, sharding
    from haf_jax.evaluation import loading as runs
    from haf_jax.model import hf

    if not runs.is_run_dir(workdir):
        raise FileNotFoundError(f"{workdir} is not a haf_jax run directory (needs checkpoints/ and model_config.json)")
    mesh = sharding.make_mesh((1, -1, 1))
    params, model_cfg, tokenizer, info = runs.load_run(workdir, mesh, which=which)
    params = distributed.to_host(params)  # whole arrays on every process
    adapters = distributed.to_host(info["lora"]["adapters"]) if "lora" in info else None
    target = paths.path(out)
    result = {"step": info["step"], "reward_model": str(target / "reward_model"), "policy": str(target / "policy")}
    if adapters is not None:
        result["adapter"] = str(target / "adapter")
    if jax.process_index() != 0:
        return result
    with paths.writable_dir(target) as local:
        local = pathlib.Path(local)
        for kind in ("reward_model", "policy"):
            hf.save_hf(params, model_cfg, local / kind, kind=kind, tokenizer=tokenizer)
        if adapters is not None:
            lora = info["lora"]
            trained = {k: params[k] for k in ("reward_head", "embed_tokens")
                       if k == "reward_head" or lora["config"].train_embeddings}
            hf.save_peft_adapter(adapters, model_cfg, lora["config"], local / "adapter", heads=trained,
                                 base=lora["base"])
    return result


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    if not _WORKDIR.value or not _OUT.value:
        raise app.UsageError("--workdir and --out are required")
    import jax

    from haf_jax.core.distributed import maybe_initialize

    maybe_initialize()
    try:
        result = export(_WORKDIR.value, _OUT.value, which=_STEP.value)
        if jax.process_index() == 0:
            print(json.dumps(result))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
