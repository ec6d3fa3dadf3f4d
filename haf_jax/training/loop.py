"""The training run, orchestrated: build (haf_jax.training.setup), resume or start, loop, evaluate, checkpoint.

`train(config, workdir)` is what `python -m haf_jax.train` calls; it returns the run summary.
Metrics are fetched one step late so the device never waits on Python. Elsewhere: the resume
policy (run_config), reference log-probs (reference.for_run), metrics files (metrics).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal

import jax
import jax.numpy as jnp
import numpy as np

from haf_jax import data
from haf_jax.checkpoint.manager import Checkpointer, CorruptCheckpointError
from haf_jax.config.base import with_added_defaults
from haf_jax.core import distributed, forward, params as params_lib, paths
from haf_jax.core.logs import log
from haf_jax.core.model_setup import base_fingerprint, initial_params, layout_options
from haf_jax.evaluation import evaluator as evaluation, plots
from haf_jax.training import fit, flops, reference, step as step_lib
from haf_jax.training.metrics import MetricsLog, Throughput, is_new_best, past_metrics, summary_table
from haf_jax.training.profile import StepProfiler
from haf_jax.training.resume import RunError, check_resumable, config_dict, keep_old_split_seed
from haf_jax.training.setup import Setup, build, split_trainable, train_loader

EVAL_KEYS = ("reward_accuracy", "dpo_accuracy", "reward_margin", "implicit_margin", "pairs")


def evaluate(s: Setup, evaluator, params, ref_params, ref_eval, frozen=None):
    """(eval row, evaluation.Result) over the whole eval split: the one evaluation path, shared with
    score/evaluate. The row holds every finite aggregate (accuracies, margins, calibration)."""
    result = evaluator(
        params,
        s.eval_ds,
        batch_size=s.config.train.eval_batch_size,
        ref_logp_Nx2=ref_eval,
        ref_params=ref_params,
        frozen=frozen,
        desc="eval",
    )
    row = {k: v for k, v in result.summary.items() if isinstance(v, int) or np.isfinite(v)}
    return row, result


class Preemption:
    """SIGTERM -> every process saves the same step at the next step boundary, then exits 0.

    One process: a SIGTERM handler raises a flag. Several: JAX's preemption service (started by
    jax.distributed.initialize) catches SIGTERM on whichever host gets it and agrees with all hosts
    on one step to stop at (`distributed.preemption_step_reached`, to be asked at every step); a
    Python handler would take SIGTERM away from it, so none is installed. Without that service the
    flag is shared at every step (`distributed.anyone`).
    """

    def __init__(self):
        self.requested = False
        self._service = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
        self._previous = None if self._service else signal.signal(signal.SIGTERM, self._handler)

    def close(self):
        """Puts back the SIGTERM handler that was there before (train() may run inside a bigger program)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handler(self, signum, frame):
        self.requested = True

    def reached(self, step: int) -> bool:
        if self._service:
            return distributed.preemption_step_reached(step)
        return distributed.anyone(self.requested)


def resume(s: Setup, ckpt, loader, config, workdir, base: dict):
    """(state, step) restored from the newest usable checkpoint, or (None, 0) for a fresh run.

    Refuses a config that differs from the checkpoint's in a way that matters (run_config), and a
    workdir whose checkpoints are all unusable (starting afresh there would overwrite its history).
    """

    def none_usable():
        return RunError(
            f"{s.checkpoint_dir} holds checkpoints but none is usable ("
            + "; ".join(f"step {k}: {v}" for k, v in sorted(ckpt.unusable_steps().items()))
            + "); move them away to start afresh, or use a new --workdir"
        )

    start = ckpt.latest_step()
    if start is None and ckpt.unusable_steps():
        raise none_usable()
    if start is None:
        return None, 0
    saved = ckpt.read_config(start)
    for line in check_resumable(saved, config, base, workdir, scan_layers=s.model_config.scan_layers):
        log(f"config changed since the checkpoint (harmless): {line}")
    # The checkpoint's parameter layout (per layer or scanned) is the one its config records.
    saved_cfg = dataclasses.replace(s.model_config, **layout_options(with_added_defaults(saved)))
    _, abstract_saved = step_lib.state_layout(saved_cfg, s.optimizer, s.mesh, s.step_cfg.lora)
    try:
        state, data_state, _ = ckpt.restore(None, abstract_saved)  # walks back past a corrupt latest
    except CorruptCheckpointError:
        raise none_usable() from None
    if saved_cfg.scan_layers != s.model_config.scan_layers:
        log(f"checkpoint parameters converted to model.scan_layers={s.model_config.scan_layers}")
        state = params_lib.relayout(state, s.model_config, s.abstract_state)
    loader.restore(data_state["train"])
    log(f"resumed from {s.checkpoint_dir} at step {ckpt.restored_step}")
    return state, ckpt.restored_step


def train(config, workdir) -> dict:
    """Trains `config` in `workdir` (a local path or a URL such as gs://bucket/run); returns the summary."""
    from tqdm import tqdm

    workdir = paths.path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    profiler = StepProfiler(config.train.profile_steps, workdir / "profile")  # checks the key first
    keep_old_split_seed(config, workdir)
    s = build(config, workdir)
    c, lc = config, s.step_cfg.loss
    best_metric = "dpo_accuracy" if lc.objective == "dpo" else "reward_accuracy"
    ckpt = Checkpointer(
        s.checkpoint_dir,
        every_steps=c.checkpoint.every_steps,
        every_minutes=c.checkpoint.every_minutes,
        keep=c.checkpoint.keep,
        best_metric=best_metric,
    )
    loader = train_loader(s)
    padding = loader.padding()
    log(
        f"train batches: {padding['shape']}, padding {padding['padding_fraction']:.1%} of the tokens, "
        f"{padding['pairs_per_step']:g} pairs a step, {padding['tokens_vs_plain']:.2f}x the tokens of plain "
        f"[B, 2, L] batches (data.packing and data.share_prompt change that)"
    )
    if jax.process_index() == 0:  # the train data report states the padding of its batches
        paths.write_text(
            workdir / "data_report_train.json",
            json.dumps({**s.train_ds.report, "batches": padding}, indent=1, default=str),
        )
    live = lc.needs_reference and c.loss.reference == "live"
    if c.loss.reference not in ("precompute", "live"):
        raise RunError(f"loss.reference={c.loss.reference!r}; allowed: precompute, live")
    state_sh = jax.tree.map(lambda x: x.sharding, s.abstract_state)
    train_fn, train_keys = step_lib.jit_train_step(
        s.step_cfg, s.optimizer, s.mesh, state_sh, s.param_shardings, live_reference=live
    )
    train_fn = flops.CountedStep(train_fn)  # compiled once per batch shape; its FLOPs give the MFU
    # Before any weight is loaded: a step that cannot fit stops here with the planner's verdict and advice.
    fit.check_train_step(
        c,
        s.step_cfg,
        s.model_config,
        s.mesh,
        train_fn,
        train_keys,
        s.abstract_state,
        live=live,
        pack_shape=getattr(loader, "shape", None) if s.step_cfg.packed else None,
    )
    load_params0 = lambda: initial_params(c, s.model_config, s.model_path, s.mesh)
    lora = s.step_cfg.lora.enabled  # LoRA always needs the base: it is frozen, not checkpointed
    params0 = load_params0() if lora or live or ckpt.latest_step() is None else None
    trainable0, frozen = split_trainable(s, params0) if params0 is not None else (None, None)
    base = base_fingerprint(frozen)
    state, start = resume(s, ckpt, loader, config, workdir, base)
    refs = {}
    if lc.needs_reference and not live:  # only the pairs steps start+1..train.steps visit (deterministic order)
        visited = loader.pairs_of_steps(start + 1, c.train.steps)
        steps = (start + 1, c.train.steps)
        refs = reference.for_run(s, params0, workdir, load_params0, train_pairs=visited, steps=steps)
    ref_params = params0 if live else None
    if start == 0:  # the state is donated: copy what the live reference or the frozen base shares with it
        state = s.init_state(jax.tree.map(jnp.copy, trainable0) if (live or lora) else trainable0)
    params0 = trainable0 = None  # drop the initial weights unless the live reference or LoRA needs them

    evaluator = evaluation.Evaluator(
        s.step_cfg, s.mesh, reward=lc.needs_reward, policy=lc.needs_policy, live_reference=live
    )
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

    def flush(item):
        nonlocal last_train
        step, metrics, work = item
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        pairs, tokens, compiles, counted = work
        meter.arrived(pairs, tokens, compiles, flops.flops_of(counted, m))
        if m.pop("finite") < 1.0:
            raise RunError(
                f"non-finite loss or gradient at step {step} (loss={m['loss']}, grad_norm="
                f"{m['grad_norm']}); the run stopped and no checkpoint of that state was written"
            )
        if step == 1 or step % c.train.log_every == 0 or step == c.train.steps:
            m.update(meter.rates())  # over the steps since the last logged row, compilation excluded
            metrics_log.write(step, m)
        last_train = m
        bar.set_postfix(
            loss=f"{m['loss']:.4f}",
            acc=f"{m[best_metric]:.3f}",
            refresh=False,
            **({"pairs_s": f"{m['pairs_per_s']:.1f}"} if "pairs_per_s" in m else {}),
        )

    try:
        for step in range(start + 1, c.train.steps + 1):
            batch = next(loader)
            if "ref_logp" in train_keys:
                batch = {**batch, "ref_logp": reference.lookup(refs["train"], batch["index"])}
            profiler.before(step)
            state, metrics = train_fn(state, forward.put_batch(batch, train_keys, s.mesh), ref_params, frozen)
            compiles = meter.dispatched(batch["tokens"].shape, metrics)
            profiler.after(step, metrics)
            valid = batch["valid"].astype(bool)
            work = (
                float(valid.sum()) * jax.process_count(),  # pairs and real tokens of this step, all hosts
                float(data.real_tokens(batch)) * jax.process_count(),
                compiles,
                train_fn.last_flops,
            )
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
                metrics_log.write_figures(step, functools.partial(plots.eval_figures, result.scores), split="eval")
                # "best" is one step everywhere: summary.json's, and the checkpoint --step=best loads,
                # so a new best is saved now and the checkpoint policy keeps it. Process 0 decides
                # (only it read the resumed history; a save is a collective).
                if distributed.decided_by_process_0(is_new_best(best, last_eval, best_metric)):
                    best, save = (step, last_eval), True
                log(
                    f"\neval @ step {step}: "
                    + ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last_eval.items())
                )
            if save:
                ckpt.save(
                    step,
                    state,
                    data_state={"train": loader.state},
                    config={**config_dict(config), **base},
                    metrics=last_eval if is_eval else None,
                    force=True,
                )
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
        meter.close()
        preempt.close()
        bar.close()
        ckpt.wait_until_finished()
        metrics_log.close()
        loader.close()

    summary = {
        "workdir": str(workdir),
        "steps": c.train.steps,
        "objective": lc.objective,
        "last": {"step": c.train.steps, **(last_eval or {})},
        "train": last_train,
    }
    if best is not None:
        summary["best"] = {"step": best[0], **best[1]}
    if jax.process_index() == 0:
        rows = {"best": summary.get("best", {}), "last": summary["last"]}
        print(summary_table(rows, ("step",) + tuple(k for k in EVAL_KEYS if k in summary["last"])))
        acc = summary["last"].get(best_metric)
        if acc is not None:
            print(f"eval {best_metric} of the trained model: {acc:.4f} ({summary['last'].get('pairs')} pairs)")
        paths.write_text(workdir / "summary.json", json.dumps(summary, indent=1))
    return summary
