"""Baseline reward-model training: `haf_jax.train` vs TRL's `RewardTrainer`, steady-state pairs/s, one run.

    pip install -e '.[bench]'     # torch (CPU build is enough) and trl
    python benchmarks/vs_trl.py [--steps 60] [--skip 10] [--data PATH] [--tokenizer DIR]

The same model, data and machine: a randomly initialised Gemma-architecture model (6 layers,
width 512, 8 query / 1 key-value heads of 64, MLP 2048, vocabulary = the tokenizer's) written
once as a transformers checkpoint that both start from; the bundled HH-RLHF harmless-base pairs
with the GPT-2 BPE tokenizer; 4 pairs per step, max length 256, float32, AdamW lr 1e-5, clip 1.0.
TRL drops pairs longer than max_length where haf_jax cuts them, so both get only the pairs whose
chosen and rejected texts fit in 250 tokens (counted here), in the same file.

haf_jax runs twice: as is, and with `data.share_prompt=True` (each pair's prompt run once for
both responses, one pair a row). Steady state: haf_jax's own logged rates (metrics.jsonl `pairs_per_s` and `step_s` per
interval, compilation excluded) after step --skip; TRL's from step-end times after step --skip.
The machine is shared and noisy: read the ratio.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PAIRS, MAX_LENGTH, FIT = 4, 256, 250


def write_model(directory: pathlib.Path, tokenizer_dir: str):
    """A random Gemma-architecture transformers checkpoint (safetensors) with the tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, GemmaConfig, GemmaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 has none; TRL's collator needs one
    config = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=1024,
        pad_token_id=pad,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(0)
    GemmaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tok.save_pretrained(directory)
    return tok


def write_pairs(source: pathlib.Path, target: pathlib.Path, tok) -> int:
    kept = 0
    with gzip.open(source, "rt") as f, target.open("w") as out:
        for line in f:
            row = json.loads(line)
            if all(len(tok(row[k])["input_ids"]) <= FIT for k in ("chosen", "rejected")):
                out.write(json.dumps({"chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
                kept += 1
    return kept


def run_haf_jax(model_dir, data_file, workdir, steps, skip, *extra) -> tuple[float, float]:
    """(steady-state pairs/s, MFU) of a haf_jax.train run, from its metrics.jsonl."""
    cmd = [
        sys.executable,
        "-m",
        "haf_jax.train",
        "--config=configs/gemma.py",
        f"--workdir={workdir}",
        f"--config.model.checkpoint={model_dir}",
        f"--config.data.train={data_file}",
        f"--config.train.batch_size={PAIRS}",
        f"--config.data.max_length={MAX_LENGTH}",
        "--config.model.compute_dtype=float32",
        "--config.model.remat=False",
        f"--config.train.steps={steps}",
        "--config.train.log_every=5",
        f"--config.train.eval_every={10 * steps}",
        "--config.optim.learning_rate=1e-5",
        "--config.optim.warmup_steps=0",
        "--config.data.eval_fraction=0.02",
        "--config.data.truncation=trl",
        *extra,
    ]
    if not any(x.startswith("--config.loss.objective=") for x in extra):
        cmd.append("--config.loss.objective=baseline")
    done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SystemExit(f"haf_jax.train failed:\n{done.stderr[-4000:]}")
    return steady_rate(pathlib.Path(workdir) / "metrics.jsonl", skip)


def steady_rate(metrics_file, skip: int) -> tuple[float, float]:
    """(pairs/s, MFU) of a haf_jax run after step `skip`, from its metrics.jsonl: each train row
    covers the non-compiling steps of its log interval (pairs = rate x time)."""
    rows = [json.loads(line) for line in pathlib.Path(metrics_file).read_text().splitlines()]
    rows = [r for r in rows if "pairs_per_s" in r and r.get("split") is None and r["step"] > skip]
    if not rows:
        raise SystemExit(f"{metrics_file}: no timed step after step {skip} (more --steps than --skip needed)")
    time = sum(r["step_s"] for r in rows)
    return (
        sum(r["pairs_per_s"] * r["step_s"] for r in rows) / time,
        sum(r.get("mfu", float("nan")) * r["step_s"] for r in rows) / time,
    )


def run_trl(model_dir, data_file, outdir, steps, skip, *, pairs=PAIRS, max_length=MAX_LENGTH, lora_rank=0) -> float:
    """Steady-state pairs/s of TRL's RewardTrainer (AutoModelForSequenceClassification) after step `skip`."""
    import torch
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    config = dict(per_device_train_batch_size=pairs, max_length=max_length)
    lora = (lora_rank, "SEQ_CLS")
    return _run_trl_trainer(RewardTrainer, RewardConfig, model, model_dir, data_file, outdir, steps, skip, config, lora)


def run_trl_dpo(
    model_dir, data_file, outdir, steps, skip, *, pairs, max_length, lora_rank=0, precompute=False
) -> float:
    """Steady-state pairs/s of TRL's DPOTrainer (live reference: a frozen copy, or the adapters
    switched off with LoRA; `precompute`: precompute_ref_log_probs, its pass not timed) after step `skip`.
    `data_file`: {"prompt", "chosen", "rejected"} rows (explicit prompts)."""
    import torch
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = dict(
        per_device_train_batch_size=pairs,
        max_length=max_length,
        beta=0.1,
        loss_type="sigmoid",
        precompute_ref_log_probs=precompute,
    )
    lora = (lora_rank, "CAUSAL_LM")
    return _run_trl_trainer(DPOTrainer, DPOConfig, model, model_dir, data_file, outdir, steps, skip, config, lora)


def _run_trl_trainer(trainer_cls, config_cls, model, model_dir, data_file, outdir, steps, skip, config, lora):
    """Trains `model` with a TRL trainer on the JSON-lines `data_file`; pairs/s from step-end times after
    `skip`. lora: (rank, peft task type); rank 0 = full fine-tuning."""
    import datasets
    from transformers import AutoTokenizer, TrainerCallback

    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # GPT-2 has none; TRL's collators need one
    model.config.pad_token_id = tok.pad_token_id
    ends: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    peft_config = None
    if lora[0]:
        from peft import LoraConfig

        targets = ["gate_proj", "up_proj", "down_proj"]  # haf_jax's model.lora default targets
        peft_config = LoraConfig(r=lora[0], lora_alpha=16, target_modules=targets, task_type=lora[1])
    args = config_cls(
        output_dir=str(outdir),
        **config,
        max_steps=steps,
        learning_rate=1e-5,
        warmup_steps=0,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        adam_epsilon=1e-5,
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        bf16=False,
        fp16=False,
    )
    train = datasets.load_dataset("json", data_files=str(data_file), split="train")
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=train,
        processing_class=tok,
        callbacks=[StepTimes()],
        peft_config=peft_config,
    )
    trainer.train()
    if len(ends) < skip + 2:
        raise SystemExit(f"{trainer_cls.__name__}: {len(ends)} steps, need more than --skip + 1 = {skip + 1}")
    return config["per_device_train_batch_size"] * (len(ends) - 1 - skip) / (ends[-1] - ends[skip])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--skip", type=int, default=10, help="warm-up steps left out of the steady-state rate")
    ap.add_argument("--data", default=str(SHARED / "hh-rlhf-harmless-base" / "test.jsonl.gz"))
    ap.add_argument("--tokenizer", default=str(SHARED / "gpt2-tokenizer"))
    ap.add_argument(
        "--haf",
        action="store_true",
        help="also run haf_jax's HaF step (precomputed reference), "
        "with and without shared prompts (TRL has no HaF: read it against the Baseline rates)",
    )
    args = ap.parse_args()
    import torch

    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        tok = write_model(tmp / "model", args.tokenizer)
        kept = write_pairs(pathlib.Path(args.data), tmp / "pairs.jsonl", tok)
        print(
            f"{kept} pairs fit {FIT} tokens ({args.data}); {PAIRS} pairs/step, max length {MAX_LENGTH}, "
            f"{args.steps} steps, rate after step {args.skip}; torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads",
            flush=True,
        )
        trl_rate = run_trl(tmp / "model", tmp / "pairs.jsonl", tmp / "trl", args.steps, args.skip)
        print(f"TRL RewardTrainer   {trl_rate:6.2f} pairs/s", flush=True)
        jax_rate, mfu = run_haf_jax(tmp / "model", tmp / "pairs.jsonl", tmp / "haf_jax", args.steps, args.skip)
        print(f"haf_jax.train       {jax_rate:6.2f} pairs/s (MFU {mfu:.1%})", flush=True)
        shared_rate, mfu = run_haf_jax(
            tmp / "model",
            tmp / "pairs.jsonl",
            tmp / "haf_jax_shared",
            args.steps,
            args.skip,
            "--config.data.share_prompt=True",
        )
        print(f"haf_jax.train, data.share_prompt=True {shared_rate:6.2f} pairs/s (MFU {mfu:.1%})", flush=True)
        if args.haf:
            for label, extra in (("", ()), (", data.share_prompt=True", ("--config.data.share_prompt=True",))):
                rate, mfu = run_haf_jax(
                    tmp / "model",
                    tmp / "pairs.jsonl",
                    tmp / f"haf{len(extra)}",
                    args.steps,
                    args.skip,
                    "--config.loss.objective=haf",
                    *extra,
                )
                print(
                    f"haf_jax.train HaF{label} {rate:6.2f} pairs/s ({rate / trl_rate:.2f}x TRL's Baseline; "
                    f"MFU {mfu:.1%}: HaF is within its FLOP ratio of Baseline where its MFU is as high)",
                    flush=True,
                )
    print(
        f"Baseline, haf_jax / TRL steady-state pairs/s: {jax_rate / trl_rate:.2f}x; "
        f"with shared prompts {shared_rate / trl_rate:.2f}x"
    )


if __name__ == "__main__":
    main()
