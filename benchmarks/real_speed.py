"""Speed on a real model, side by side in one run: SmolLM2-135M-Instruct, haf_jax vs the PyTorch ways.

  pip install -e '.[bench,gguf]'     # torch (CPU build is enough), trl, peft; gguf for the conversion
  python benchmarks/real_speed.py [--sections=haf,baseline,dpo,sample] [--modes=lora,full]
      [--variants=plain,shared,packing,precomputed,all] [--steps=10] [--skip=4] [--pairs=4] [--length=256]
      [--lora_rank=16] [--prompts=8] [--new_tokens=64] [--n=4] [--model=DIR|FILE.gguf] [--out=real_speed.json]

Rows (pairs/s after --skip warm-up steps, compilation excluded; ratio = haf_jax / the other side):
  haf       haf_jax HaF vs the authors' way in PyTorch (vs_pytorch.TorchHaF: transformers trunk, reward
            head at the last real token, a live frozen reference model, full-vocabulary log_softmax at
            every position, right padding; AdamW, clip 1.0), LoRA and full
  baseline  haf_jax Baseline vs TRL's RewardTrainer (AutoModelForSequenceClassification)
  dpo       haf_jax DPO vs TRL's DPOTrainer (live reference; and its precompute_ref_log_probs)
  sample    tokens/s of haf_jax's sampler vs transformers `generate` on the same prompts: greedy,
            and the paper's Best-of-N sampling (N candidates, top_p 0.85, T ~ U(0.5, 1.2) per candidate;
            transformers takes one temperature, 0.85, the range's mean)
haf_jax variants (each its own `haf_jax.training.loop.train` run, in this process): plain = the other
side's semantics (live reference, padded [B, 2, L] batches); shared = data.share_prompt; packing =
data.packing; precomputed = loss.reference=precompute (its one pass before step 1 not timed; haf and
dpo only); all = the three together, what a user after speed turns on (Baseline: shared + packing).
The same --steps x --pairs HH-RLHF pairs for every side (the first bundled pairs whose texts fit
--length tokens: TRL drops longer pairs where haf_jax cuts them), float32, lr 1e-5, scanned layers.

MFU next to each: FLOPs / (time x peak), the peak one float32 matmul measured in this run
(haf_jax.training.flops.measured_cpu_flops; on an accelerator its table); haf_jax's FLOPs are its own
compiled step's (the trainer's `mfu`), the PyTorch sides' counted analytically (step.model_flops:
LM head at every position, a live reference forward, LoRA's backward without weight gradients).
The machine may be shared: the two sides of a row run one after the other, so read ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import smollm2  # benchmarks/: the model and the fitting HH pairs
import vs_pytorch  # the authors' step in PyTorch
import vs_trl  # TRL trainers, haf_jax's steady-state rate

REPO = pathlib.Path(__file__).resolve().parents[1]
SECTIONS = ("haf", "baseline", "dpo", "sample")
VARIANTS = ("plain", "shared", "packing", "precomputed", "all")
PRECOMPUTED = ("precomputed", "all")  # the variants whose reference is precomputed
LR = vs_pytorch.LR


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="HF directory or .gguf (default: the cached SmolLM2 conversion)")
    p.add_argument("--sections", default=",".join(SECTIONS))
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=10, help="train steps per run (the first --skip not timed)")
    p.add_argument("--skip", type=int, default=4)
    p.add_argument("--pairs", type=int, default=4, help="pairs per step")
    p.add_argument("--length", type=int, default=256, help="max tokens of prompt + response")
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=8, help="sampler: prompts")
    p.add_argument("--new_tokens", type=int, default=64, help="sampler: most new tokens per row")
    p.add_argument("--n", type=int, default=4, help="sampler: Best-of-N candidates per prompt")
    p.add_argument("--workdir", default="")
    p.add_argument("--out", default="real_speed.json")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def write_data(tokenizer, args, root: pathlib.Path) -> dict:
    """pairs.jsonl ({"chosen", "rejected"}), dpo.jsonl ({"prompt", "chosen", "rejected"}) and
    eval.jsonl (one pair: the trainer always evaluates at its last step) of the same fitting pairs."""
    from haf_jax.data.formats import split_hh

    rows = smollm2.hh_pairs(tokenizer, args.steps * args.pairs, fit=args.length - 4)
    dpo = []
    for r in rows:
        (prompt, chosen), (_, rejected) = split_hh(r["chosen"]), split_hh(r["rejected"])
        dpo.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    files = {"pairs": rows, "dpo": dpo, "eval": rows[:1]}
    for name, items in files.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    return {name: root / f"{name}.jsonl" for name in files} | {"count": len(rows)}


# ----------------------------------------------------------------------------- haf_jax side


def haf_jax_rate(args, model_dir, files, root, objective: str, mode: str, variant: str) -> tuple[float, float]:
    """(pairs/s, MFU) of a `loop.train` run of `objective` in `mode` with `variant` (see the docstring)."""
    import contextlib

    from haf_jax.training import loop

    spec = importlib.util.spec_from_file_location("real_speed_llama", REPO / "configs" / "llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.checkpoint = str(model_dir)
    c.model.scan_layers = True
    c.model.lora.rank = args.lora_rank if mode == "lora" else 0
    c.data.train, c.data.eval = str(files["pairs"]), str(files["eval"])
    c.data.max_length, c.data.max_prompt_length = args.length, args.length // 2
    c.data.share_prompt = variant in ("shared", "all")
    c.data.packing = variant in ("packing", "all")
    c.loss.objective = objective
    c.loss.reference = "precompute" if variant in PRECOMPUTED else "live"
    c.optim.learning_rate, c.optim.warmup_steps = LR, 0
    c.train.steps, c.train.batch_size, c.train.log_every = args.steps, args.pairs, 1
    c.train.eval_every, c.train.eval_batch_size = args.steps, 1
    c.checkpoint.every_steps, c.checkpoint.keep = args.steps, 1
    workdir = root / f"haf_jax-{objective}-{mode}-{variant}"
    with contextlib.redirect_stdout(sys.stderr):
        loop.train(c, workdir)
    return vs_trl.steady_rate(workdir / "metrics.jsonl", args.skip)


# ----------------------------------------------------------------------------- PyTorch sides


def torch_flops(cfg, batch, *, lm_head: bool, live: bool, lora: bool) -> float:
    """Matmul FLOPs of one PyTorch step on `batch` (haf_jax layout): forward 2, backward 4 per
    weight and token (2 with LoRA: no weight gradients), the LM head at all L - 1 positions when
    `lm_head`, and a reference forward when `live`."""
    import step as jax_bench

    b, _, length = batch["tokens"].shape
    fwd_bwd = jax_bench.model_flops(cfg, 2 * b, length, lm_head, length - 1)
    forward = fwd_bwd / 3
    return forward * (2 if lora else 3) + (forward if live else 0.0)


def authors_rate(args, model_dir, files, tokenizer, cfg, mode: str, peak: float) -> tuple[float, float]:
    """(pairs/s, MFU) of the authors' HaF step in PyTorch on the haf_jax batches of pairs.jsonl."""
    import torch
    from transformers import AutoModelForCausalLM

    from haf_jax import data

    options = data.PairOptions(max_length=args.length, max_prompt_length=args.length // 2, eval_fraction=0.0)
    ds = data.load_pairs(str(files["pairs"]), tokenizer, options, split="all")
    batches = list(ds.batches(args.pairs))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = args.lora_rank if mode == "lora" else 0
    runner = vs_pytorch.TorchHaF(model, "haf", live_reference=True, lora_rank=lora)
    times, flops = [], []
    for i in range(args.steps):
        batch = batches[i % len(batches)]
        t = time.perf_counter()
        runner.step(batch)
        if i >= args.skip:
            times.append(time.perf_counter() - t)
            flops.append(torch_flops(cfg, batch, lm_head=True, live=True, lora=bool(lora)))
    return args.pairs * len(times) / sum(times), sum(flops) / sum(times) / peak


def trl_flops(cfg, args, *, lm_head: bool, live: bool, lora: bool) -> float:
    """Analytic FLOPs of one TRL step on full-length [2B, L] batches (an upper bound: TRL pads to the
    batch's longest)."""
    import numpy as np

    shape = {"tokens": np.zeros((args.pairs, 2, args.length), np.int32)}
    return torch_flops(cfg, shape, lm_head=lm_head, live=live, lora=lora)


# ----------------------------------------------------------------------------- sampler


def sampler_rows(args, model_dir, mesh) -> list[dict]:
    """tokens/s of haf_jax's sampler vs transformers `generate`, greedy and Best-of-N sampling."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from haf_jax.data.formats import split_hh
    from haf_jax.evaluation.loading import load_model
    from haf_jax.generation import candidates, decode

    model = load_model(str(model_dir), mesh)
    tok = model.tokenizer
    prompts = []
    for row in smollm2.hh_pairs(tok, args.prompts, fit=128):
        prompts.append(split_hh(row["chosen"])[0])
    ids = candidates.encode_prompts(tok, prompts, template="none", max_prompt_length=128)
    eos = candidates.eos_ids(tok, model.model_cfg, str(model_dir))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    settings = decode.DecodeSettings(max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=pad)
    nucleus = decode.DecodeSettings(
        max_new_tokens=args.new_tokens, eos_ids=eos, pad_id=pad, top_p=candidates.PAPER_TOP_P
    )
    t_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    t_tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if t_tok.pad_token is None:
        t_tok.pad_token = t_tok.eos_token
    enc = t_tok.pad(
        {"input_ids": [list(map(int, p)) for p in ids]}, return_tensors="pt", padding=True
    )  # the same token ids, left-padded as generate needs
    rows = []
    for label, n, temps, dec in (
        ("greedy", 1, np.zeros((len(ids), 1), np.float32), settings),
        (
            f"Best-of-{args.n} sampling",
            args.n,
            candidates.candidate_temperatures(
                len(ids), args.n, seed=0, temperature=None, temperature_range=candidates.PAPER_TEMPERATURE_RANGE
            ),
            nucleus,
        ),
    ):

        def jax_run(temps=temps, dec=dec):
            out = candidates.generate_candidates(
                model.params, model.model_cfg, ids, temps, settings=dec, batch_size=len(ids), progress=False
            )
            return sum(len(c[0]) for cands in out for c in cands)

        sampling = n > 1
        kwargs = dict(max_new_tokens=args.new_tokens, do_sample=sampling, num_return_sequences=n, pad_token_id=pad)
        if sampling:
            kwargs.update(top_p=candidates.PAPER_TOP_P, temperature=float(np.mean(candidates.PAPER_TEMPERATURE_RANGE)))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)

        def torch_run(kwargs=kwargs):
            with torch.no_grad():
                out = t_model.generate(**enc, **kwargs)[:, enc["input_ids"].shape[1] :]
            # tokens up to and including the first EOS (what generate produced for the row)
            stop = torch.isin(out, torch.tensor(list(eos)))
            first = torch.where(
                stop.any(1), stop.int().argmax(1) + 1, torch.full_like(stop[:, 0], out.shape[1], dtype=torch.long)
            )
            return int(first.sum())

        jax_run()  # compile
        rates = []
        for run in (torch_run, jax_run):
            t = time.perf_counter()
            tokens = run()
            rates.append(tokens / (time.perf_counter() - t))
        rows.append({"row": f"sampler, {label}", "other": rates[0], "haf_jax": rates[1], "unit": "tokens/s"})
    return rows


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    sections = [x for x in args.sections.split(",") if x]
    modes = [x for x in args.modes.split(",") if x]
    variants = [x for x in args.variants.split(",") if x]
    bad = (
        [x for x in sections if x not in SECTIONS]
        + [x for x in modes if x not in ("lora", "full")]
        + [x for x in variants if x not in VARIANTS]
    )
    if bad or args.skip < 0 or args.steps < args.skip + 2 or min(args.pairs, args.length, args.n) < 1:
        print(f"error: bad --sections/--modes/--variants ({bad}) or --steps < --skip + 2", file=sys.stderr)
        return 2
    root = pathlib.Path(args.workdir or tempfile.mkdtemp(prefix="real_speed_")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

    import jax
    import torch
    from absl import logging

    from haf_jax import data
    from haf_jax.core import sharding
    from haf_jax.model.families import from_hf
    from haf_jax.training import flops as flops_lib

    logging.set_verbosity(logging.WARNING)
    torch.set_num_threads(os.cpu_count())
    t_start = time.time()
    model_dir = smollm2.model_dir(args.model)
    cfg = from_hf(json.loads((model_dir / "config.json").read_text()))
    tokenizer = data.load_tokenizer(str(model_dir))
    files = write_data(tokenizer, args, root)
    peak, peak_source = flops_lib.peak_flops(jax.devices())
    print(
        f"real_speed: {smollm2.ARCH}; {files['count']} HH pairs fitting {args.length} tokens, {args.pairs} pairs a "
        f"step, {args.steps} steps ({args.skip} warm-up not timed), float32, LoRA rank {args.lora_rank}; "
        f"{jax.default_backend()} x{jax.device_count()}, torch {torch.__version__} {torch.get_num_threads()} threads; "
        f"peak {peak_source}",
        flush=True,
    )
    rows = []

    def add(row, other, jax_rate, other_mfu=float("nan"), jax_mfu=float("nan"), unit="pairs/s"):
        r = {"row": row, "other": other, "haf_jax": jax_rate, "ratio": jax_rate / other, "unit": unit}
        r |= {"other_mfu": other_mfu, "haf_jax_mfu": jax_mfu}
        rows.append(r)
        print(
            f"{row:58s} other {other:8.3f}  haf_jax {jax_rate:8.3f} {unit}  ratio {r['ratio']:5.2f}x  "
            f"MFU {other_mfu:6.1%} / {jax_mfu:6.1%}",
            flush=True,
        )

    for mode in modes:
        lora = mode == "lora"
        trl_kw = dict(pairs=args.pairs, max_length=args.length, lora_rank=args.lora_rank if lora else 0)
        if "haf" in sections:
            other, other_mfu = authors_rate(args, model_dir, files, tokenizer, cfg, mode, peak)
            for v in variants:
                rate, mfu = haf_jax_rate(args, model_dir, files, root, "haf", mode, v)
                add(f"HaF {mode}, {v} vs the authors' PyTorch step", other, rate, other_mfu, mfu)
        if "baseline" in sections:
            other = vs_trl.run_trl(model_dir, files["pairs"], root / f"trl-rm-{mode}", args.steps, args.skip, **trl_kw)
            other_mfu = other / args.pairs * trl_flops(cfg, args, lm_head=False, live=False, lora=lora) / peak
            for v in (v for v in variants if v != "precomputed"):  # "all": shared + packing
                rate, mfu = haf_jax_rate(args, model_dir, files, root, "baseline", mode, v)
                add(f"Baseline {mode}, {v} vs TRL RewardTrainer", other, rate, other_mfu, mfu)
        if "dpo" in sections:
            for precompute in (False, True) if set(PRECOMPUTED) & set(variants) else (False,):
                dpo_kw = dict(trl_kw, precompute=precompute)  # TRL 1.x cuts at max_length only; these pairs fit
                out = root / f"trl-dpo-{mode}-{precompute}"
                other = vs_trl.run_trl_dpo(model_dir, files["dpo"], out, args.steps, args.skip, **dpo_kw)
                work = trl_flops(cfg, args, lm_head=True, live=not precompute, lora=lora)
                other_mfu = other / args.pairs * work / peak
                label = "DPOTrainer precompute_ref_log_probs" if precompute else "DPOTrainer"
                for v in variants:
                    if precompute == (v in PRECOMPUTED):
                        rate, mfu = haf_jax_rate(args, model_dir, files, root, "dpo", mode, v)
                        add(f"DPO {mode}, {v} vs TRL {label}", other, rate, other_mfu, mfu)
    if "sample" in sections:
        for r in sampler_rows(args, model_dir, sharding.make_mesh((1, -1, 1))):
            add(r["row"] + " vs transformers generate", r["other"], r["haf_jax"], unit="tokens/s")

    wall = time.time() - t_start
    print("| row | other side | haf_jax | ratio | MFU other / haf_jax |\n|---|---|---|---|---|")
    for r in rows:
        mfu = f"{r['other_mfu']:.1%} / {r['haf_jax_mfu']:.1%}" if r["unit"] == "pairs/s" else "-"
        print(f"| {r['row']} | {r['other']:.3f} {r['unit']} | {r['haf_jax']:.3f} | {r['ratio']:.2f}x | {mfu} |")
    print(f"wall time {wall:.0f}s; median ratio {statistics.median(r['ratio'] for r in rows):.2f}x" if rows else "")
    settings = {**vars(args), "model": str(model_dir), "pairs_used": files["count"], "peak": peak_source}
    summary = {"settings": settings, "rows": rows, "wall_seconds": round(wall, 1)}
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
