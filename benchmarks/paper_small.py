"""A small-scale replication of the paper's comparison (docs/REPRODUCE.md): baseline vs HaF vs DPO.

  python benchmarks/paper_small.py [--steps=120] [--seeds=3] [--out=paper_small.json]
      [--workdir=DIR] [--lr=1e-3] [--batch=16] [--eval_every=40] [--max_length=128]
      [--max_prompt_length=64] [--objectives=baseline,haf,dpo]

About 10 minutes on a 2-core CPU with the defaults (9 runs of 120 steps, plus scoring). Smoke test:
  python benchmarks/paper_small.py --steps=2 --seeds=1 --eval_every=2

What it does, all offline and deterministic:

* Model: the real pretrained llama2.c model aidreams260K (../shared/data/aidreams260K: a Llama of
  dim 64, 4 layers, 512-token vocabulary, trained on 128-token texts), converted once with
  `haf_jax.model.llama2c.to_hf_llama` into a Hugging Face Llama directory; every run starts from
  it (reward head zero-initialised, policy = the LM head, reference = the frozen start). Without
  ../shared/data the benchmark prints why and exits 0 without running anything.
* Data: the bundled HH-RLHF harmless-base sample (`haf_jax.data.sample_paths()["data"]`, 2,312
  raw rows). The split is written out once as two files, so it is the same for every seed and
  objective: eval = rows `numpy.random.default_rng(0).permutation(2312)[:231]` (the rule of the
  default data.eval carve at eval_fraction 0.1 and seed 0; the trainer's own carve is re-drawn with
  train.seed, which would give every seed a different eval split), train = the other 2,081 rows.
  The data layer skips a few rows (empty response, prompt mismatch); the reports are in each run.
* Training: `haf_jax.training.loop.train` in this process (one JAX compilation cache, one reference cache
  for all runs), config `configs/llama.py` with model.checkpoint = the converted model; the SAME
  hyperparameters for every objective: lr 1e-3 (linear decay, no warmup; the tiny model needs a
  large lr to move in 120 steps; nothing was tuned per objective), batch 16 pairs, max_length 128
  (the model's trained context) with max_prompt_length 64, alpha 0.2, beta 0.1, float32; eval and
  a checkpoint every --eval_every steps and at the end. Seeds 0..N-1 (train.seed: here only the
  data order, since the start weights are fixed and there is no dropout).
* In-distribution (ID) accuracy: the trainer's own eval on the held-out split: reward-head accuracy
  r(chosen) > r(rejected) and implicit-reward (DPO) accuracy beta*(dlogp_chosen - dlogp_rejected) > 0,
  both strict (docs/REPRODUCE.md). Objective `baseline` trains no policy and `dpo` no reward head: those
  cells are n/a.
* Out-of-distribution (OOD) set "shuffled": for every held-out eval row (never trained on) whose
  chosen response has at least 4 words: prompt = the HH prompt; chosen = the chosen response with
  its whitespace normalised (words joined by single spaces); rejected = the same words in an order
  drawn by `numpy.random.default_rng(1234)` (rows in eval order, one permutation per row; a row
  is dropped if 10 draws all give the original order). Same words, same length: a preference for
  word order / grammaticality that the base LM knows something about and that HH training does not
  ask for. Scored through `haf_jax.evaluation.loading.load_model` + the jitted `forward_pairs` pass
  `haf_jax.score` uses (same tokenisation, same max_length/max_prompt_length), with the converted
  start model as the reference for the implicit reward.
* best / last (docs/REPRODUCE.md): `last` = the final step; `best` = the eval step the run itself picks
  as best (highest ID reward accuracy, or ID DPO accuracy for dpo; the first such step on ties),
  and every number in a `best` row, OOD included, is that one checkpoint's.
* Also shown: the untrained start model's own sum log-probability as a preference
  (logp(chosen) > logp(rejected)), on the ID eval split and the OOD set: what the base LM knows.

Output: the table on stdout (each cell: mean [min-max] over seeds, in %), a JSON file (--out) with
every per-seed number, the settings, the step times and the wall time. Run logs go to stderr.
Not part of the test suite (CI time).

One run with the defaults (2-core CPU shared with a test run, load average 4-8: 620 s wall):

  objective         ckpt  steps      ID reward         ID DPO            OOD reward        OOD DPO
  baseline          best  40,80,120  57.6 [55.4-60.2]  n/a               57.0 [56.1-58.8]  n/a
  baseline          last  120        54.8 [50.6-60.2]  n/a               55.2 [53.8-56.1]  n/a
  haf               best  40,80,120  56.7 [55.8-57.1]  52.5 [48.9-55.0]  60.9 [60.6-61.1]  38.6 [34.8-41.2]
  haf               last  120        55.0 [53.2-55.8]  54.5 [52.4-57.6]  61.2 [56.6-66.1]  40.3 [39.8-41.2]
  dpo               best  80,120     n/a               55.4 [55.0-55.8]  n/a               41.9 [40.7-43.0]
  dpo               last  120        n/a               53.7 [51.9-55.8]  n/a               41.2 [37.1-43.4]
  start model logp  -     0          50.6                                78.3

At this scale (a 260K-parameter model trained on synthetic "dream" text, 120 steps, 231 eval
pairs: one pair is 0.43 points) every ID accuracy is a few points above chance and the seed ranges
overlap: the table shows the pipeline works end to end, not which objective is better. On the OOD
set the implicit reward of haf and dpo prefers the shuffled response more often than the original
(< 50%): training lowered the policy's log-probs of the fluent text more than of its shuffle,
although the start model itself prefers the fluent text 78% of the time.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
OBJECTIVES = ("baseline", "haf", "dpo")
EVAL_FRACTION, SPLIT_SEED, OOD_SEED, MIN_WORDS = 0.1, 0, 1234, 4


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="See the module docstring for what is measured and how.",
    )
    p.add_argument("--steps", type=int, default=120, help="optimizer steps per run (default 120)")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per objective (default 3)")
    p.add_argument("--objectives", default=",".join(OBJECTIVES), help="comma list of haf|baseline|dpo")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate, same for every objective (default 1e-3)")
    p.add_argument("--batch", type=int, default=16, help="pairs per step (default 16)")
    p.add_argument("--eval_every", type=int, default=40, help="steps between evals/checkpoints (default 40)")
    p.add_argument("--eval_batch", type=int, default=32, help="pairs per eval batch (default 32)")
    p.add_argument("--max_length", type=int, default=128, help="prompt + response tokens (default 128)")
    p.add_argument("--max_prompt_length", type=int, default=64, help="prompt tokens kept, its end (default 64)")
    p.add_argument("--alpha", type=float, default=0.2, help="HaF policy-loss weight (default 0.2)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta (default 0.1)")
    p.add_argument("--shared_data", default=str(SHARED_DATA), help="folder holding aidreams260K/")
    p.add_argument("--workdir", default="", help="keep runs here (default: a temporary folder, deleted)")
    p.add_argument("--out", default="paper_small.json", help="JSON results file (default paper_small.json)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data


def split_rows(sample: pathlib.Path, out: pathlib.Path):
    """Raw HH rows -> out/train.jsonl, out/eval.jsonl (fixed carve); returns (train, eval) paths and eval rows."""
    import numpy as np

    with gzip.open(sample, "rt", encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    n_eval = max(1, int(round(EVAL_FRACTION * len(lines))))
    is_eval = np.zeros(len(lines), bool)
    is_eval[np.random.default_rng(SPLIT_SEED).permutation(len(lines))[:n_eval]] = True
    train, evals = out / "train.jsonl", out / "eval.jsonl"
    train.write_text("".join(line for line, e in zip(lines, is_eval) if not e), encoding="utf-8")
    evals.write_text("".join(line for line, e in zip(lines, is_eval) if e), encoding="utf-8")
    return train, evals, [json.loads(line) for line, e in zip(lines, is_eval) if e]


def build_ood(eval_rows, path: pathlib.Path) -> dict:
    """The word-shuffle OOD set from held-out rows (see the module docstring); returns its stats."""
    import numpy as np

    from haf_jax.data.formats import split_hh

    rng = np.random.default_rng(OOD_SEED)
    out, dropped = [], {"too_short": 0, "unsplittable": 0, "no_shuffle": 0}
    for i, row in enumerate(eval_rows):
        parts = split_hh(row["chosen"])
        if parts is None:
            dropped["unsplittable"] += 1
            continue
        prompt, response = parts
        words = response.split()
        if len(words) < MIN_WORDS:
            dropped["too_short"] += 1
            continue
        for _ in range(10):
            shuffled = [words[j] for j in rng.permutation(len(words))]
            if shuffled != words:
                break
        else:
            dropped["no_shuffle"] += 1
            continue
        out.append(
            {"id": f"eval{i}", "chosen": prompt + " " + " ".join(words), "rejected": prompt + " " + " ".join(shuffled)}
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in out), encoding="utf-8")
    return {"pairs": len(out), "dropped": dropped}


# ----------------------------------------------------------------------------- scoring


class Scorer:
    """haf_jax.score's pass (load_pairs split=all, forward_pairs jitted once per model config) over a
    fixed set of pairs, for many checkpoints in one process."""

    def __init__(self, spec: str, tokenizer, args, mesh):
        from haf_jax import data

        self.mesh, self.args = mesh, args
        options = data.PairOptions(
            max_length=args.max_length,
            max_prompt_length=args.max_prompt_length,
            eval_fraction=0.0,
            max_skip_fraction=1.0,
        )
        self.ds = data.load_pairs(spec, tokenizer, options, split="all")
        print(data.format_report(self.ds.report), file=sys.stderr)
        self._fns = {}

    def __call__(self, params, model_cfg, desc: str):
        import jax

        from haf_jax.core import forward, params as params_lib, sharding
        from haf_jax.evaluation.evaluator import pair_pass
        from haf_jax.model.heads import forward_pairs

        keys = ["tokens", "response_mask", "last_index"]
        if model_cfg not in self._fns:
            self._fns[model_cfg] = jax.jit(
                lambda p, b: forward_pairs(p, model_cfg, b, chunk=128),
                in_shardings=(
                    params_lib.param_shardings(model_cfg, self.mesh),
                    forward.batch_shardings(self.mesh, keys),
                ),
                out_shardings=sharding.replicated(self.mesh),
            )
        fn = self._fns[model_cfg]

        def one(b):
            out = fn(params, b)
            return {"reward": out.reward_Bx2, "logp": out.logp_Bx2}

        return pair_pass(
            self.ds, one, lambda b: forward.put_batch(b, keys, self.mesh), batch_size=self.args.eval_batch, desc=desc
        )


def accuracies(cols, ref_logp, beta: float) -> dict:
    import numpy as np

    reward = cols["reward"][:, 0] > cols["reward"][:, 1]
    implicit = beta * ((cols["logp"][:, 0] - ref_logp[:, 0]) - (cols["logp"][:, 1] - ref_logp[:, 1]))
    return {
        "reward_accuracy": float(np.mean(reward)),
        "dpo_accuracy": float(np.mean(implicit > 0)),
        "pairs": int(len(reward)),
    }


# ----------------------------------------------------------------------------- runs


def load_llama_config():
    """configs/llama.py loaded by path, as haf_jax.train's config_flags does."""
    spec = importlib.util.spec_from_file_location("paper_small_llama_config", REPO / "configs" / "llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def run_config(args, objective: str, seed: int, ckpt_dir, train_path, eval_path):
    c = load_llama_config()
    c.model.checkpoint = str(ckpt_dir)
    c.data.train, c.data.eval = str(train_path), str(eval_path)
    c.data.max_length, c.data.max_prompt_length = args.max_length, args.max_prompt_length
    c.loss.objective, c.loss.alpha, c.loss.beta = objective, args.alpha, args.beta
    c.optim.learning_rate = args.lr
    c.train.steps, c.train.batch_size, c.train.seed = args.steps, args.batch, seed
    c.train.eval_every, c.train.eval_batch_size, c.train.log_every = args.eval_every, args.eval_batch, 10
    c.checkpoint.every_steps = args.eval_every
    c.checkpoint.keep = args.steps // args.eval_every + 2  # keep every evaluated step (best is chosen by us)
    return c


def eval_rows(workdir: pathlib.Path) -> list[dict]:
    from haf_jax.training.metrics import read_rows

    return [r for r in read_rows(workdir / "metrics.jsonl") if r.get("split") == "eval"]


def pick_best(rows, objective: str) -> dict:
    """The loop's rule: highest main metric, first step on ties."""
    metric = "dpo_accuracy" if objective == "dpo" else "reward_accuracy"
    best = None
    for r in rows:
        if best is None or r[metric] > best[metric]:
            best = r
    return best


# ----------------------------------------------------------------------------- table


def cell(values):
    if not values:
        return "n/a"
    m = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * m:.1f}"
    return f"{100 * m:.1f} [{100 * min(values):.1f}-{100 * max(values):.1f}]"


def stats(values):
    if not values:
        return None
    m = sum(values) / len(values)
    std = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return {"mean": m, "min": min(values), "max": max(values), "std": std, "values": values}


COLUMNS = [
    ("id", "reward_accuracy", "ID reward"),
    ("id", "dpo_accuracy", "ID DPO"),
    ("ood", "reward_accuracy", "OOD reward"),
    ("ood", "dpo_accuracy", "OOD DPO"),
]


def applies(objective: str, metric: str) -> bool:
    """baseline trains no policy (no DPO accuracy); dpo trains no reward head (no reward accuracy)."""
    return (objective, metric) not in (("baseline", "dpo_accuracy"), ("dpo", "reward_accuracy"))


def table(results, base, header: str) -> str:
    rows = [["objective", "ckpt", "steps"] + [c[2] for c in COLUMNS]]
    for objective, runs in results.items():
        for which in ("best", "last"):
            steps = sorted({r[which]["step"] for r in runs})
            line = [objective, which, ",".join(map(str, steps))]
            for where, metric, _ in COLUMNS:
                line.append(cell([r[which][where][metric] for r in runs]) if applies(objective, metric) else "n/a")
            rows.append(line)
    rows.append(["start model logp", "-", "0", cell([base["id"]]), "", cell([base["ood"]]), ""])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip()
    return "\n".join([header, fmt(rows[0]), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows[1:]])


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    bad = [o for o in objectives if o not in OBJECTIVES]
    if bad or not objectives or args.seeds < 1 or args.steps < 1 or args.eval_every < 1:
        print(f"error: bad --objectives/--seeds/--steps/--eval_every ({bad or args.objectives})", file=sys.stderr)
        return 2
    src = pathlib.Path(args.shared_data) / "aidreams260K"
    bin_path, tok_path = src / "aidreams260K.bin", src / "tok512.bin"
    if not bin_path.is_file() or not tok_path.is_file():
        print(
            f"skipped: the aidreams260K model ({bin_path}, {tok_path}) is not here; this benchmark needs "
            f"../shared/data (or --shared_data)",
            file=sys.stderr,
        )
        return 0

    tmp = None
    if args.workdir:
        root = pathlib.Path(args.workdir).resolve()
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="paper_small_")
        root = pathlib.Path(tmp)
    # One compilation cache and one reference/data cache for all runs (set before JAX is imported).
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(root / "jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ["HAF_JAX_CACHE"] = str(root / "haf_cache")
    try:
        return _run(args, objectives, root, bin_path, tok_path, t_start)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(args, objectives, root, bin_path, tok_path, t_start) -> int:
    import jax
    from absl import logging

    from haf_jax import data
    from haf_jax.core import sharding
    from haf_jax.evaluation.loading import load_model
    from haf_jax.model import llama2c
    from haf_jax.training import loop

    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    ckpt_dir = root / "aidreams"
    if not (ckpt_dir / "config.json").is_file():
        llama2c.to_hf_llama(bin_path, tok_path, ckpt_dir)
    train_path, eval_path, held_out = split_rows(pathlib.Path(data.sample_paths()["data"]), root)
    ood_path = root / "ood_shuffled.jsonl"
    ood_info = build_ood(held_out, ood_path)
    print(f"split: {len(held_out)} eval rows, the rest train; OOD set: {ood_info}", file=sys.stderr)

    mesh = sharding.make_mesh((1, -1, 1))
    start = load_model(str(ckpt_dir), mesh, float32=True)
    params0, cfg0, tokenizer = start.params, start.model_cfg, start.tokenizer
    scorers = {"id": Scorer(str(eval_path), tokenizer, args, mesh), "ood": Scorer(str(ood_path), tokenizer, args, mesh)}
    ref = {k: s(params0, cfg0, f"start model ({k})")["logp"] for k, s in scorers.items()}
    base = {k: float((v[:, 0] > v[:, 1]).mean()) for k, v in ref.items()}
    del params0, start

    results, timings = {}, {}
    for objective in objectives:
        results[objective] = []
        for seed in range(args.seeds):
            workdir = root / f"{objective}-seed{seed}"
            if workdir.exists():
                shutil.rmtree(workdir)
            config = run_config(args, objective, seed, ckpt_dir, train_path, eval_path)
            t0 = time.time()
            print(f"=== {objective} seed {seed}", file=sys.stderr, flush=True)
            with contextlib.redirect_stdout(sys.stderr):  # the loop prints its own summary table
                loop.train(config, workdir)
            timings[f"{objective}-seed{seed}"] = round(time.time() - t0, 1)
            rows = eval_rows(workdir)
            run = {"seed": seed, "evals": rows}
            for which, row in (("best", pick_best(rows, objective)), ("last", rows[-1])):
                loaded = load_model(str(workdir), mesh, which=row["step"], float32=True)
                params, model_cfg = loaded.params, loaded.model_cfg
                assert loaded.step == row["step"], (loaded.step, row)
                ood = accuracies(
                    scorers["ood"](params, model_cfg, f"ood {objective} s{seed} {which}"), ref["ood"], args.beta
                )
                ood = {k: v for k, v in ood.items() if k == "pairs" or applies(objective, k)}
                ident = {k: row[k] for k in ("reward_accuracy", "dpo_accuracy", "pairs") if k in row}
                run[which] = {"step": row["step"], "id": ident, "ood": ood}
            results[objective].append(run)
            print(
                f"=== {objective} seed {seed}: {timings[f'{objective}-seed{seed}']}s; "
                f"best {run['best']}; last {run['last']}",
                file=sys.stderr,
                flush=True,
            )
            if not args.workdir:  # keep only what the table needs
                shutil.rmtree(workdir / "checkpoints", ignore_errors=True)

    wall = time.time() - t_start
    n_id, n_ood = scorers["id"].ds.report["pairs"], scorers["ood"].ds.report["pairs"]
    header = (
        f"paper_small: aidreams260K (260K-param Llama) on HH-RLHF harmless, {args.steps} steps x "
        f"{args.batch} pairs, lr {args.lr:g}, alpha {args.alpha:g}, beta {args.beta:g}, max_length "
        f"{args.max_length}/{args.max_prompt_length}; seeds 0..{args.seeds - 1}\n"
        f"accuracy % (strict), mean [min-max] over seeds; ID = held-out HH split ({n_id} pairs), "
        f"OOD = word-shuffled held-out responses ({n_ood} pairs); best = the run's best ID eval step\n"
        f"'start model logp': the untrained model's logp(chosen) > logp(rejected)"
    )
    text = table(results, base, header)
    print(text)
    print(f"wall time {wall:.0f}s ({jax.default_backend()}, {jax.device_count()} device(s))")
    summary = {
        "settings": {
            **vars(args),
            "objectives": objectives,
            "split": {"eval_fraction": EVAL_FRACTION, "seed": SPLIT_SEED},
            "ood": {"seed": OOD_SEED, "min_words": MIN_WORDS, **ood_info},
        },
        "start_model_logp_accuracy": base,
        "results": {
            o: {
                "runs": runs,
                **{
                    which: {
                        where: {
                            m: stats([r[which][where][m] for r in runs if m in r[which][where]])
                            for m in ("reward_accuracy", "dpo_accuracy")
                        }
                        for where in ("id", "ood")
                    }
                    for which in ("best", "last")
                },
            }
            for o, runs in results.items()
        },
        "seconds_per_run": timings,
        "wall_seconds": round(wall, 1),
        "table": text,
        "backend": jax.default_backend(),
    }
    pathlib.Path(args.out).write_text(json.dumps(summary, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
