"""The training run: build model, data and state from a config, then loop, evaluate, checkpoint.

`train(config, workdir)` is what `python -m haf_jax.train` calls; it returns the run summary.
Metrics are fetched one step late so the device never waits on Python.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from haf_jax import checkpoint, data, evaluation, fit, flops, params as params_lib, plots, reference, sharding, step as step_lib
from haf_jax.metrics import MetricsLog, Throughput, read_rows, summary_table
from haf_jax.profile import StepProfiler
from haf_jax.model import hf, lora as lora_lib
from haf_jax.model.lora import LoraConfig
from haf_jax.model.families import preset
from haf_jax.optim import make_optimizer

EVAL_KEYS = ("reward_accuracy", "dpo_accuracy", "reward_margin", "implicit_margin", "pairs")


class RunError(RuntimeError):
    """A run that must stop with a clear message (no traceback)."""


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


@dataclasses.dataclass
class Setup:
    """Everything built from the config before the first step."""

    config: object
    model_config: object
    tokenizer: object
    train_ds: object
    eval_ds: object
    mesh: object
    step_cfg: step_lib.StepConfig
    optimizer: object
    param_shardings: object  # of the full model (reference, frozen base)
    trained_shardings: object  # of what the optimizer trains (all params, or LoRA adapters + heads)
    init_state: object  # jitted trainable params -> state
    abstract_state: object
    checkpoint_dir: pathlib.Path | None
    model_path: pathlib.Path | None  # HF directory the initial weights come from (None: random init)


def model_source(config):
    """(ModelConfig, HF dir or None) for the config's checkpoint or preset."""
    if config.model.checkpoint:
        path = hf.resolve_checkpoint(config.model.checkpoint)
        model_cfg, _ = hf.load_hf_config(path)
    else:
        path, model_cfg = None, preset(config.model.preset)
    return dataclasses.replace(model_cfg, remat=bool(config.model.remat), attention=config.model.get("attention", "auto"),
                               **layout_options(config)), path


def layout_options(config) -> dict:
    """The run config's model.scan_layers and model.remat_policy (absent in configs of older runs:
    per-layer parameters)."""
    return {"scan_layers": bool(config.model.get("scan_layers", False)),
            "remat_policy": str(config.model.get("remat_policy", "nothing"))}


def initial_params(config, model_cfg, path, mesh):
    """The initial weights: the HF checkpoint at `path`, or a random init of `model_cfg` (seeded)."""
    if path is not None:
        params, info = hf.load_params(path, model_cfg, shardings=params_lib.param_shardings(model_cfg, mesh))
        log(f"loaded {path} ({info})")
        return params
    return params_lib.init_params(model_cfg, jax.random.key(config.train.seed), mesh)


def build(config, workdir: pathlib.Path | None) -> Setup:
    model_cfg, path = model_source(config)
    tok_source = config.model.tokenizer or (str(path) if path is not None else data.sample_paths()["tokenizer"])
    tokenizer = data.load_tokenizer(tok_source)
    if len(tokenizer) > model_cfg.vocab_size:
        raise RunError(f"tokenizer {tok_source} has {len(tokenizer)} tokens but the model's vocab_size is "
                       f"{model_cfg.vocab_size}")
    d = config.data
    train_spec = d.train or data.sample_paths()["data"]
    common = dict(max_length=d.max_length, max_prompt_length=d.max_prompt_length, template=d.template,
                  eval_fraction=d.eval_fraction, seed=config.train.seed, max_skip_fraction=d.max_skip_fraction,
                  process_index=jax.process_index(), process_count=jax.process_count(), **data.config_options(d))
    eval_only = data.eval_options(d)  # data.eval_subsample[_seed]
    if d.eval:  # separate files: each is used whole
        train_ds = data.load_pairs(train_spec, tokenizer, split="all", **common)
        eval_ds = data.load_pairs(d.eval, tokenizer, split="all", **common, **eval_only)
    else:  # one source: a deterministic eval carve (eval_fraction, or the recipe's own rule)
        train_ds = data.load_pairs(train_spec, tokenizer, split="train", **common)
        eval_ds = data.load_pairs(train_spec, tokenizer, split="eval", **common, **eval_only)
    for name, ds in (("train", train_ds), ("eval", eval_ds)):
        log(f"data report ({name}):\n{data.format_report(ds.report)}")
        if workdir is not None and jax.process_index() == 0:
            (workdir / f"data_report_{name}.json").write_text(json.dumps(ds.report, indent=1, default=str))

    if workdir is not None and jax.process_index() == 0:  # a run directory is self-describing
        (workdir / "model_config.json").write_text(json.dumps(dataclasses.asdict(model_cfg), indent=1))
        tokenizer.save_pretrained(str(workdir / "tokenizer"))
    mesh = sharding.make_mesh(tuple(config.mesh.shape))
    n_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    for key in ("batch_size", "eval_batch_size"):
        if config.train[key] % (n_shards * config.optim.grad_accum if key == "batch_size" else n_shards):
            raise RunError(f"train.{key}={config.train[key]} must be a multiple of the data-parallel size "
                           f"{n_shards} (mesh {dict(mesh.shape)})"
                           + (f" times optim.grad_accum={config.optim.grad_accum}" if key == "batch_size" else ""))
    step_cfg = step_config(config, model_cfg)
    optimizer = optimizer_for(config)
    param_sh = params_lib.param_shardings(model_cfg, mesh)
    trained_sh = params_lib.trainable_shardings(model_cfg, step_cfg.lora, mesh)
    init_state, abstract_state = step_lib.state_layout(model_cfg, optimizer, mesh, step_cfg.lora)
    return Setup(config, model_cfg, tokenizer, train_ds, eval_ds, mesh, step_cfg, optimizer, param_sh, trained_sh,
                 init_state, abstract_state, workdir / "checkpoints" if workdir is not None else None, path)


def lora_config(config) -> LoraConfig:
    return LoraConfig.from_config(config.model.lora) if "lora" in config.model else LoraConfig()


def step_config(config, model_cfg) -> step_lib.StepConfig:
    return step_lib.StepConfig(
        model=model_cfg, loss=step_lib.LossConfig.from_config(config.loss),
        compute_dtype=jnp.dtype(config.model.compute_dtype), logprob_chunk=config.model.logprob_chunk,
        grad_accum=config.optim.grad_accum, lora=lora_config(config), packed=bool(config.data.get("packing", False)))


def split_trainable(s: Setup, params0):
    """(trainable params, frozen base or None): LoRA's fresh adapters + heads, or everything."""
    lora = s.step_cfg.lora
    if not lora.enabled:
        return params0, None
    trainable, frozen = lora_lib.split(params0, s.model_config, lora, jax.random.key(s.config.train.seed + 1))
    trainable = {**trainable, "lora": jax.device_put(trainable["lora"], s.trained_shardings["lora"])}
    return trainable, frozen


def base_fingerprint(frozen) -> dict:
    """What a LoRA run's checkpoints record of the base weights they adapt ({} without LoRA)."""
    return {} if frozen is None else {"base_weights": reference.params_fingerprint(frozen)}


def optimizer_for(config):
    o = config.optim
    return make_optimizer(learning_rate=o.learning_rate, total_steps=config.train.steps,
                          warmup_steps=o.warmup_steps, schedule=o.schedule, eps=o.eps,
                          weight_decay=o.weight_decay, clip_norm=o.clip_norm,
                          moment_dtype=o.get("moment_dtype", "float32"))


def _local_reference(local: pathlib.Path | None, ds) -> np.ndarray | None:
    """The workdir's reference array for `ds`, or None when absent, damaged or made for other data
    (data.eval may change on resume; a run killed while writing leaves a partial file)."""
    if local is None or not local.exists() or not local.with_suffix(".json").exists():
        return None
    try:
        meta = json.loads(local.with_suffix(".json").read_text())
        array = np.load(local, allow_pickle=False)
    except (ValueError, OSError):
        return None
    if not isinstance(meta, dict) or meta.get("data") != ds.fingerprint or array.shape != (len(ds), 2):
        return None
    return array


def reference_arrays(s: Setup, params0, workdir: pathlib.Path | None, load_params0=None) -> dict[str, np.ndarray]:
    """Precomputed reference log-probs per split: from the workdir, the global cache, or one pass.

    `params0` are the initial weights, or None with `load_params0()` to get them only when needed."""
    ref_fn, keys = step_lib.jit_reference(s.step_cfg, s.mesh, s.param_shardings)
    out = {}
    for name, ds in (("train", s.train_ds), ("eval", s.eval_ds)):
        local = workdir / f"reference_{name}.npy" if workdir is not None else None
        array = _local_reference(local, ds)
        if array is not None:
            out[name] = array
            continue
        if params0 is None and load_params0 is not None:
            params0 = load_params0()
        if params0 is None:
            raise RunError(f"{local} is missing and the initial weights are not available to recompute it")
        key = {"weights": reference.params_fingerprint(params0), "data": ds.fingerprint,
               "model": dataclasses.asdict(s.model_config), "dtype": str(s.step_cfg.compute_dtype),
               "chunk": s.step_cfg.logprob_chunk, "mesh": dict(s.mesh.shape)}
        put = lambda b: step_lib.put_batch(b, keys, s.mesh)
        bs = s.config.train.eval_batch_size
        array, hit = reference.cached(key, lambda: reference.compute(ds, params0, ref_fn, put, batch_size=bs,
                                                                     desc=f"reference log-probs ({name})"))
        log(f"reference log-probs ({name}, {len(ds)} pairs): {'cache hit' if hit else 'computed'}")
        if local is not None and jax.process_index() == 0:  # atomic: a kill never leaves half a file
            tmp = local.with_name(local.name + ".tmp")
            with open(tmp, "wb") as f:
                np.save(f, array, allow_pickle=False)
            os.replace(tmp, local)
            local.with_suffix(".json").write_text(json.dumps({"data": ds.fingerprint, "pairs": len(ds)}))
        out[name] = array
    return out


def evaluate(s: Setup, evaluator, params, ref_params, ref_eval, frozen=None):
    """(eval row, evaluation.Result) over the whole eval split: the one evaluation path, shared with
    score/evaluate. The row holds every finite aggregate (accuracies, margins, calibration)."""
    result = evaluator(params, s.eval_ds, batch_size=s.config.train.eval_batch_size, ref_logp_Nx2=ref_eval,
                       ref_params=ref_params, frozen=frozen, desc="eval")
    row = {k: v for k, v in result.summary.items() if isinstance(v, int) or np.isfinite(v)}
    return row, result


class Preemption:
    """SIGTERM (and JAX's multi-host preemption sync point) -> save at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handler)

    def close(self):
        """Puts back the SIGTERM handler that was there before (train() may run inside a bigger program)."""
        signal.signal(signal.SIGTERM, self._previous)

    def _handler(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if jax.process_count() > 1:
            try:
                return multihost_utils.reached_preemption_sync_point(step) or self.requested
            except Exception:  # preemption service not enabled on this platform
                pass
        return self.requested


def past_metrics(workdir: pathlib.Path, upto: int, best_metric: str):
    """(best, last_eval, last_train) as metrics.jsonl records them up to step `upto`, so that a resumed
    run's summary covers the evaluations made before the restart: (None, None, {}) on a fresh run."""
    best, last_eval, last_train = None, None, {}
    path = workdir / "metrics.jsonl"
    if upto <= 0 or jax.process_index() != 0 or not path.exists():
        return best, last_eval, last_train
    for row in read_rows(path):
        if row.get("step", upto + 1) > upto:
            continue
        step, values = row["step"], {k: v for k, v in row.items() if k not in ("step", "split")}
        if row.get("split") == "eval":
            last_eval = values
            if isinstance(values.get(best_metric), (int, float)) and (
                    best is None or values[best_metric] > best[1][best_metric]):
                best = (step, values)
        elif "split" not in row and step == upto:
            last_train = values
    return best, last_eval, last_train


def config_dict(config) -> dict:
    return json.loads(config.to_json_best_effort())


# Config keys added after runs were already written, with the value that reproduces those runs: a
# checkpoint without them is compared as if it had them (so adding a key never breaks a resume).
ADDED_KEYS = {"model": {"lora": dataclasses.asdict(LoraConfig()), "attention": "auto", "scan_layers": False,
                        "remat_policy": "nothing"},
              "data": {"truncation": "always", "degenerate": "skip", "batching": "length_grouped",
                       "eval_subsample": 0, "eval_subsample_seed": 0, "packing": False, "pack_length": 0,
                       "pack_rows": 0},
              "loss": {"dpo_scale_by_alpha": False}, "train": {"profile_steps": ""},
              "optim": {"moment_dtype": "float32"}}


def with_added_defaults(saved: dict, added: dict = ADDED_KEYS) -> dict:
    out = dict(saved)
    for key, value in added.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = with_added_defaults(out[key], value)
        elif key not in out:
            out[key] = value
    return out


def resume(s: Setup, ckpt, loader, config, workdir: pathlib.Path, base: dict):
    """(state, step) restored from the newest usable checkpoint, or (None, 0) for a fresh run.

    Refuses a config that differs from the checkpoint's in a way that matters, and a workdir
    whose checkpoints are all unusable (starting afresh there would overwrite its history).
    """
    start = ckpt.latest_step()
    if start is None and ckpt.unusable_steps():
        raise RunError(f"{s.checkpoint_dir} holds checkpoints but none is usable ("
                       + "; ".join(f"step {k}: {v}" for k, v in sorted(ckpt.unusable_steps().items()))
                       + "); move them away to start afresh, or use a new --workdir")
    if start is None:
        return None, 0
    saved = ckpt.read_config(start)
    saved_scan = bool(with_added_defaults(saved)["model"]["scan_layers"])
    if saved.get("base_weights") != base.get("base_weights") and saved_scan != s.model_config.scan_layers:
        # the base's fingerprint covers its layout: adapters are converted, the frozen base is not
        raise RunError(f"{workdir} holds LoRA adapters of a run with model.scan_layers={saved_scan}: resume "
                       f"it with --config.model.scan_layers={saved_scan}")
    if saved.get("base_weights") != base.get("base_weights"):
        raise RunError(f"{workdir} holds LoRA adapters trained on other base weights (fingerprint "
                       f"{saved.get('base_weights')}; model.checkpoint={config.model.checkpoint!r} gives "
                       f"{base.get('base_weights')}): resume with the base they were trained on, or use a new --workdir")
    breaking, harmless = checkpoint.compare_configs(
        with_added_defaults(saved), {**config_dict(config), **base},
        harmless_prefixes=checkpoint.HARMLESS_PREFIXES + ("model.scan_layers", "model.remat_policy"))
    was_eval = (saved.get("data") or {}).get("eval") or ""
    if bool(was_eval) != bool(config.data.eval):  # "" carves the eval split out of data.train
        harmless = [line for line in harmless if not line.startswith("data.eval:")]
        breaking.append(f"data.eval: saved={was_eval!r} current={config.data.eval!r} (an empty data.eval takes "
                        f"the eval split out of data.train, so this changes the training data)")
    if breaking:
        raise RunError(f"{workdir} holds a checkpoint from a different run configuration:\n  "
                       + "\n  ".join(breaking) + "\nuse a new --workdir or restore the old settings")
    for line in harmless:
        log(f"config changed since the checkpoint (harmless): {line}")
    # The checkpoint's parameter layout (per layer or scanned) is the one its config records.
    saved_cfg = dataclasses.replace(s.model_config, scan_layers=saved_scan)
    _, abstract_saved = step_lib.state_layout(saved_cfg, s.optimizer, s.mesh, s.step_cfg.lora)
    try:
        state, data_state, _ = ckpt.restore(None, abstract_saved)  # walks back past a corrupt latest
    except checkpoint.CorruptCheckpointError as e:
        raise RunError(f"{e}; move them away to start afresh, or use a new --workdir") from None
    if saved_cfg != s.model_config:
        log(f"checkpoint parameters converted to model.scan_layers={s.model_config.scan_layers}")
        state = params_lib.relayout(state, s.model_config, s.abstract_state)
    loader.restore(data_state["train"])
    log(f"resumed from {s.checkpoint_dir} at step {ckpt.restored_step}")
    return state, ckpt.restored_step


def train(config, workdir: str | pathlib.Path) -> dict:
    from tqdm import tqdm

    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    profiler = StepProfiler(config.train.get("profile_steps", ""), workdir / "profile")  # checks the key first
    s = build(config, workdir)
    c, lc = config, s.step_cfg.loss
    best_metric = "dpo_accuracy" if lc.objective == "dpo" else "reward_accuracy"
    ckpt = checkpoint.Checkpointer(s.checkpoint_dir, every_steps=c.checkpoint.every_steps,
                                   every_minutes=c.checkpoint.every_minutes, keep=c.checkpoint.keep,
                                   best_metric=best_metric)
    loader = data.train_loader(s.train_ds, c, data_parallel=s.mesh.shape["data"] * s.mesh.shape["fsdp"])
    padding = loader.padding()
    log(f"train batches: {padding['shape']}, padding {padding['padding_fraction']:.1%} of the tokens, "
        f"{padding['pairs_per_step']:g} pairs a step" + (f" (unpacked: {padding['unpacked_padding_fraction']:.1%})"
                                                          if s.step_cfg.packed else " (data.packing=True packs)"))
    if jax.process_index() == 0:  # the train data report states the padding of its batches
        (workdir / "data_report_train.json").write_text(
            json.dumps({**s.train_ds.report, "batches": padding}, indent=1, default=str))
    live = lc.needs_reference and c.loss.reference == "live"
    if c.loss.reference not in ("precompute", "live"):
        raise RunError(f"loss.reference={c.loss.reference!r}; allowed: precompute, live")
    state_sh = jax.tree.map(lambda x: x.sharding, s.abstract_state)
    train_fn, train_keys = step_lib.jit_train_step(s.step_cfg, s.optimizer, s.mesh, state_sh, s.param_shardings,
                                                   live_reference=live)
    train_fn = flops.CountedStep(train_fn)  # compiled once per batch shape; its FLOPs give the MFU
    # Before any weight is loaded: a step that cannot fit stops here with the planner's verdict and advice.
    fit.check_train_step(c, s.step_cfg, s.model_config, s.mesh, train_fn, train_keys, s.abstract_state, live=live)
    load_params0 = lambda: initial_params(c, s.model_config, s.model_path, s.mesh)
    lora = s.step_cfg.lora.enabled  # LoRA always needs the base: it is frozen, not checkpointed
    params0 = load_params0() if lora or live or ckpt.latest_step() is None else None
    trainable0, frozen = split_trainable(s, params0) if params0 is not None else (None, None)
    base = base_fingerprint(frozen)
    state, start = resume(s, ckpt, loader, config, workdir, base)
    refs = reference_arrays(s, params0, workdir, load_params0) if lc.needs_reference and not live else {}
    ref_params = params0 if live else None
    if start == 0:  # the state is donated: copy what the live reference or the frozen base shares with it
        state = s.init_state(jax.tree.map(jnp.copy, trainable0) if (live or lora) else trainable0)
    params0 = trainable0 = None  # drop the initial weights unless the live reference or LoRA needs them

    evaluator = evaluation.Evaluator(s.step_cfg, s.mesh, reward=lc.needs_reward, policy=lc.needs_policy,
                                     live_reference=live)
    metrics_log = MetricsLog(workdir, resume_step=start)
    preempt = Preemption()
    pending = None
    best, last_eval, last_train = past_metrics(workdir, start, best_metric)  # a resumed run's history
    if start >= c.train.steps:
        log(f"the run in {workdir} is already complete (step {start} of {c.train.steps}); nothing to train")
    bar = tqdm(total=c.train.steps, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    peak, peak_source = flops.peak_flops(s.mesh.devices.flat)
    log(f"MFU peak: {peak_source}")
    meter = Throughput(peak_flops=peak)
    nan_fault_step = int(os.environ.get("HAF_JAX_FAULT_NAN_STEP", "0"))

    def flush(item):
        nonlocal last_train
        step, metrics, work = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        meter.arrived(*work)
        if m.pop("finite") < 1.0:
            raise RunError(f"non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm="
                           f"{m['grad_norm']}); the run stopped and no checkpoint of that state was written")
        if step == 1 or step % c.train.log_every == 0 or step == c.train.steps:
            m.update(meter.rates())  # over the steps since the last logged row, compilation excluded
            metrics_log.write(step, m)
        last_train = m
        bar.set_postfix(loss=f"{m['loss']:.4f}", acc=f"{m[best_metric]:.3f}", refresh=False,
                        **({"pairs_s": f"{m['pairs_per_s']:.1f}"} if "pairs_per_s" in m else {}))

    try:
        for step in range(start + 1, c.train.steps + 1):
            batch = next(loader)
            if "ref_logp" in train_keys:
                batch = {**batch, "ref_logp": refs["train"][batch["index"]]}
            if step == nan_fault_step:  # fault injection for tests: poison the weights
                state = {**state, "params": jax.tree.map(lambda p: p * jnp.nan, state["params"])}
            compiles = meter.dispatched(batch["tokens"].shape)
            profiler.before(step)
            state, metrics = train_fn(state, step_lib.put_batch(batch, train_keys, s.mesh), ref_params, frozen)
            profiler.after(step, metrics)
            valid = batch["valid"].astype(bool)
            work = (float(valid.sum()) * jax.process_count(),  # pairs and real tokens of this step, all hosts
                    float(data.real_tokens(batch)) * jax.process_count(), compiles, train_fn.last_flops)
            if pending is not None:
                flush(pending)
            pending = (step, metrics, work)
            bar.update(1)
            is_eval = step % c.train.eval_every == 0 or step == c.train.steps
            stop = preempt.reached(step)
            save = stop or ckpt.should_save(step) or step == c.train.steps
            if is_eval or save:
                flush(pending)  # never evaluate or save a state whose step was not finite
                pending = None
            if is_eval:
                last_eval, result = evaluate(s, evaluator, state["params"], ref_params, refs.get("eval"), frozen)
                metrics_log.write(step, last_eval, split="eval")
                metrics_log.write_figures(step, lambda: plots.eval_figures(result.scores), split="eval")
                if best is None or last_eval[best_metric] > best[1][best_metric]:
                    best = (step, last_eval)
                log(f"\neval @ step {step}: " + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                                          for k, v in last_eval.items()))
            if save:
                ckpt.save(step, state, data_state={"train": loader.state}, config={**config_dict(config), **base},
                          metrics=last_eval if is_eval else None, force=True)
            if is_eval or save:
                meter.pause()  # eval and saving are not step time
            if stop:
                ckpt.wait_until_finished()
                log(f"preemption requested: checkpoint at step {step} written; exiting")
                return {"preempted_at": step}
        if pending is not None:
            flush(pending)
    finally:
        profiler.close()
        preempt.close()
        bar.close()
        ckpt.wait_until_finished()
        metrics_log.close()
        loader.close()

    summary = {"workdir": str(workdir), "steps": c.train.steps, "objective": lc.objective,
               "last": {"step": c.train.steps, **(last_eval or {})}, "train": last_train}
    if best is not None:
        summary["best"] = {"step": best[0], **best[1]}
    if jax.process_index() == 0:
        rows = {"best": summary.get("best", {}), "last": summary["last"]}
        print(summary_table(rows, ("step",) + tuple(k for k in EVAL_KEYS if k in summary["last"])))
        acc = summary["last"].get(best_metric)
        if acc is not None:
            print(f"eval {best_metric} of the trained model: {acc:.4f} ({summary['last'].get('pairs')} pairs)")
        (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary
