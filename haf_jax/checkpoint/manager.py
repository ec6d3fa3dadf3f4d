"""The checkpoint manager: every orbax call of haf_jax lives here (`Checkpointer`).

`DIR/<step>/` (orbax layout) holds four items: `state` (params, opt_state, step, rng; orbax
StandardSave, restorable onto any mesh), `data` (iterator position), `config` (the run config)
and `meta` (eval metrics, per-leaf layout and checksums); the last three are JSON.

Policies (each tested in tests/unit/test_checkpoint.py):
- When: every `every_steps` steps, after `every_minutes` (process 0 decides, all hosts follow),
  or `save(force=True)` (preemption, end of run).  Saves are async:
  `save` returns after the device-to-host copy; `wait_until_finished()`/`close()` before exit.
- Keep: the last `keep` steps AND the best by `best_metric` (ties: the earliest step; orbax
  `AnyPreservationPolicy([LatestN(keep), BestN(n=1)])`; orbax's `max_to_keep` + `best_fn` alone
  would keep the best `keep` by metric and could drop the newest).  orbax's `metrics` item holds
  only {best_metric: value, "step": step} (empty when the step has none) for that policy; all eval metrics are
  kept in `meta`.  Steps without that item (written before it was used) are kept, never deleted
  unranked.
- NaN/Inf: `save` raises FloatingPointError naming the step instead of writing such a state.
- Integrity: a step is usable when orbax committed it (orbax hides a half-written step, by a
  rename on local disks and a commit marker on object stores, and a writer removes such leftovers
  when it opens the directory: `cleanup_tmp_directories`), its JSON items read back as objects
  and its array tree's metadata reads (`latest_step`), its arrays read back without error and
  their per-leaf checksums (haf_jax.checkpoint.integrity: position-weighted uint32 sums of the
  bits, exact and sharding-independent) match (`restore`, `restore_params`); checksums catch
  garbled chunk bytes that tensorstore reads back silently.  Everything goes through orbax's
  public CheckpointManager API and epath, so the same code serves local disks and gs://
  (haf_jax.core.paths).  A bad step is reported with `logging.warning` naming it and why;
  `restore(None, ...)` walks back to the newest good step.  Nothing is deleted: the first `save`
  after a restore moves the steps newer than the restored one to `DIR/set_aside/<step>.<unix
  time>`, so retention and step numbers follow the live run.
- Several processes: every method that reads or writes arrays is a collective (all processes
  call it together); their agreements (process 0's timer, "every process read this step") go
  through haf_jax.core.distributed.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from haf_jax.checkpoint import integrity
from haf_jax.checkpoint.drain import loops_that_drain
from haf_jax.core import distributed, paths

log = logging.getLogger(__name__)

_ITEMS = ("state", "data", "config", "meta")


class CorruptCheckpointError(RuntimeError):
    """A step exists but cannot be read back intact."""


def _jsonable(tree):
    """`tree` as plain JSON values (array scalars become Python numbers; tuples become lists)."""
    tree = jax.tree.map(lambda v: v.item() if hasattr(v, "item") else v, tree)
    return json.loads(json.dumps(tree))


def _first_line(e: BaseException) -> str:
    """One line of an orbax/tensorstore error (they append multi-line tensorstore specs)."""
    text = str(e).split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
    return (text.splitlines() or [""])[0][:300]


class Checkpointer:
    """Saves and restores training state in `directory`; see the module docstring for policies."""

    def __init__(
        self,
        directory,
        *,
        every_steps: int,
        every_minutes: float = 0.0,
        keep: int = 3,
        best_metric: str | None = "reward_accuracy",
        best_mode: str = "max",
        async_save: bool = True,
        read_only: bool = False,
    ):
        if best_mode not in ("max", "min") or keep < 1:
            raise ValueError(f"need best_mode in ('max', 'min') and keep >= 1: {best_mode!r}, {keep}")
        self.directory = paths.path(directory)  # local ones absolute (orbax needs that), or gs://...
        self.every_steps, self.every_minutes = every_steps, every_minutes
        self.best_metric, self.best_mode = best_metric, best_mode
        self._scores: dict[int, float | None] = {}
        self._bad: dict[int, str] = {}  # step -> why it is unusable
        self._stale: list[int] = []  # steps newer than the one restore() returned
        self._decision: tuple[int, bool] | None = None
        self._last_save = time.monotonic()
        self.restored_step: int | None = None  # set by restore(): the step actually used
        policies = [ocp.checkpoint_managers.LatestN(n=keep)]
        if best_metric:
            # Every step this class saves has a metrics item ({} without an eval); steps without
            # one were written before it had them: kept rather than deleted unranked.
            policies.append(
                ocp.checkpoint_managers.BestN(
                    get_metric_fn=self._rank, reverse=(best_mode == "min"), n=1, keep_checkpoints_without_metrics=True
                )
            )
        options = ocp.CheckpointManagerOptions(
            best_fn=self._rank if best_metric else None,
            best_mode=best_mode,
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            cleanup_tmp_directories=not read_only,  # a reader never touches a live run's saves
            save_interval_steps=0 if read_only else 1,  # when to save is decided here, not by orbax
            enable_async_checkpointing=async_save,
            read_only=read_only,
            create=not read_only,
        )
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            **{item: ocp.JsonCheckpointHandler() for item in _ITEMS[1:]},
        }
        self._mngr = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def _rank(self, metrics: dict) -> tuple[float, int]:
        """orbax's sort key of a step's metrics item: (its best_metric value, the step's tie-break);
        the worst when absent. orbax keeps the LAST after sorting, so among equal values the earliest
        step (the first to reach the value, as the training loop's summary and TRL pick) ranks last:
        -step for max, +step for min (sorted in reverse). Items written before the step was recorded
        in them tie-break as step 0."""
        value = metrics.get(self.best_metric)
        step = metrics.get("step", 0)
        step = int(step) if isinstance(step, int) else 0
        if isinstance(value, (int, float)):
            return float(value), -step if self.best_mode == "max" else step
        return (-np.inf, 0) if self.best_mode == "max" else (np.inf, 0)

    def should_save(self, step: int) -> bool:
        """every_steps or the every_minutes timer (same on all hosts); preemption is the caller's (loop.Preemption)."""
        if self._decision is not None and self._decision[0] == step:
            return self._decision[1]
        due = self.every_steps > 0 and step % self.every_steps == 0
        if not due and self.every_minutes > 0:
            due = time.monotonic() - self._last_save >= 60.0 * self.every_minutes
            due = distributed.decided_by_process_0(due)  # clocks differ: process 0 decides for everyone
        self._decision = (step, due)
        return due

    def save(
        self, step: int, state, *, data_state: dict, config: dict, metrics: dict | None = None, force: bool = False
    ) -> bool:
        """Starts an async save of `state` at `step`; True when a save was started.

        `state` is the {"params", "opt_state", "step", "rng"} pytree (sharded jax arrays are
        fine); `data_state` and `config` are JSON dicts; `metrics` are the eval metrics of this
        state (None when no eval ran at this step).  Raises FloatingPointError when any float
        leaf is NaN/Inf.  A step that already exists is not overwritten (returns False).
        """
        if not force and not self.should_save(step):
            return False
        if step in self._bad:
            self._stale.append(step)
        self._set_aside_stale()
        if step in self._mngr.all_steps():
            log.info("checkpoint step %d already exists in %s; not saving it again", step, self.directory)
            return False
        finite, checksums = integrity.digest(state)
        if not finite:
            raise FloatingPointError(f"step {step}: the state holds NaN/Inf values; refusing to checkpoint it")
        metrics = None if metrics is None else _jsonable(metrics)
        self._scores[step] = self._score(metrics)
        if metrics and self.best_metric and self._scores[step] is None:
            log.warning(
                "step %d: metrics have no finite %r (keys: %s); this step cannot be the best checkpoint",
                step,
                self.best_metric,
                sorted(metrics),
            )
        meta = {
            "format": 1,
            "step": int(step),
            "metrics": metrics,
            "checksums": checksums,
            "layout": integrity.layout(state),
        }
        ranked = {} if self._scores[step] is None else {self.best_metric: self._scores[step], "step": int(step)}
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(_jsonable(data_state)),
                config=ocp.args.JsonSave(_jsonable(config)),
                meta=ocp.args.JsonSave(meta),
            ),
            metrics=ranked if self.best_metric else None,
            force=True,
        )
        self._last_save = time.monotonic()
        return True

    def _set_aside_stale(self):
        """Moves steps newer than the restored one to DIR/set_aside/ (never deletes them)."""
        if not self._stale:
            return
        if jax.process_index() == 0:
            (self.directory / "set_aside").mkdir(parents=True, exist_ok=True)
            for s in sorted(set(self._stale)):
                src = self.directory / str(s)
                if src.exists():
                    dst = self.directory / "set_aside" / f"{s}.{int(time.time())}"
                    log.warning(
                        "moving checkpoint step %d aside to %s (%s)",
                        s,
                        dst,
                        self._bad.get(s, "newer than the step training resumed from"),
                    )
                    src.rename(dst)
        distributed.barrier("haf_jax_checkpoint_set_aside")
        self._stale = []
        self._mngr.reload()

    def _score(self, metrics: dict | None) -> float | None:
        value = (metrics or {}).get(self.best_metric) if self.best_metric else None
        if isinstance(value, (int, float)) and np.isfinite(value):
            return float(value)
        return None

    def _read_json(self, step: int, item: str):
        with loops_that_drain():
            return self._mngr.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]

    def _score_of(self, step: int) -> float | None:
        if step not in self._scores:
            try:
                self._scores[step] = self._score(self._read_json(step, "meta").get("metrics"))
            except Exception:  # unreadable: no score (it still counts for "last K")
                self._scores[step] = None
        return self._scores[step]

    def _problem(self, step: int) -> str | None:
        """Cheap structural check of a committed step; None when it looks complete."""
        if step in self._bad:
            return self._bad[step]
        for item in _ITEMS[1:]:
            try:
                value = self._read_json(step, item)
            except Exception as e:
                return f"item {item!r} is missing or unreadable ({type(e).__name__}: {_first_line(e)})"
            if not isinstance(value, dict):
                return f"item {item!r} is not a JSON object"
            if item == "meta":  # what restore checks against: written with every step since the first
                lacking = [k for k in ("layout", "checksums") if not isinstance(value.get(k), dict)]
                if lacking:
                    return f"item 'meta' holds no {' or '.join(map(repr, lacking))} object"
        try:
            with loops_that_drain():  # a failed read must not leave sibling reads behind either
                tree = self._mngr.item_metadata(step)["state"]
        except Exception as e:
            return f"item 'state' has unreadable metadata ({type(e).__name__}: {_first_line(e)})"
        if tree is None:
            return "item 'state' is missing"
        return None

    def _mark_bad(self, step: int, why: str):
        if step not in self._bad:
            log.warning("checkpoint step %d in %s is unusable, skipping it: %s", step, self.directory, why)
            self._bad[step] = why

    def unusable_steps(self) -> dict[int, str]:
        """{step: why} of the committed steps found unusable so far (by latest_step/restore)."""
        return dict(self._bad)

    def all_steps(self) -> list[int]:
        """Committed steps that are not known to be bad, oldest first."""
        return [s for s in self._mngr.all_steps() if s not in self._bad]

    def latest_step(self) -> int | None:
        """Newest committed step that passes the structural check (bad ones are reported)."""
        for step in sorted(self._mngr.all_steps(), reverse=True):
            problem = self._problem(step)
            if problem is None:
                return step
            self._mark_bad(step, problem)
        return None

    def best_step(self) -> int | None:
        """Step with the best `best_metric` (ties: the earliest, the step the training loop's summary
        names, and the one the keep policy keeps); None when no step has one."""
        scored = [(self._score_of(s), s) for s in self.all_steps()]
        scored = [(v if self.best_mode == "max" else -v, -s) for v, s in scored if v is not None]
        return -max(scored)[1] if scored else None

    def read_config(self, step: int | None = None) -> dict:
        """The config saved with `step` (default: the latest good step); reads only JSON."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        return dict(self._read_json(step, "config"))

    def restore(self, step: int | None, abstract_state) -> tuple[Any, dict, dict]:
        """Returns (state, data_state, config) of `step`, laid out as `abstract_state` says.

        `abstract_state` is a pytree of jax.ShapeDtypeStruct with `.sharding` set; the arrays
        come back with exactly those shardings, whatever mesh wrote them.  With step=None the
        newest good step is used, walking back past unusable ones (each reported); an explicit
        step that is unusable raises CorruptCheckpointError.  FileNotFoundError when empty.
        """
        steps = sorted(self._mngr.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}")
            out = self._read_state(step, abstract_state)
            self._stale, self.restored_step = [t for t in steps if t > step], step
            return out
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        for s in steps:
            try:
                out, why = self._read_state(s, abstract_state), None
            except CorruptCheckpointError as e:
                out, why = None, str(e)
            if distributed.everyone(why is None):
                self._stale, self.restored_step = [t for t in steps if t > s], s
                return out
            self._mark_bad(s, why or "another process could not read it")
        self._stale = steps
        raise CorruptCheckpointError(
            f"no usable checkpoint in {self.directory}: " + "; ".join(f"step {s}: {self._bad.get(s)}" for s in steps)
        )

    def _read_state(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data_state, config) of `step`, the whole state read and verified (`_read_verified`)."""

        def read():
            r = self._mngr.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore(),
                ),
            )
            return r["state"], (dict(r["data"]), dict(r["config"]))

        state, (data_state, config) = self._read_verified(step, abstract_state, read, part=None, what="a state")
        return state, data_state, config

    def _read_verified(self, step: int, wanted, read, *, part: str | None, what: str):
        """Reads `step` with `read()` and checks what came back: the one path of every array read.

        `wanted` is the abstract tree (ShapeDtypeStructs) that `read()` restores: the whole saved
        state (part=None) or {part: subtree} for one top-level part of it. `read()` returns (that
        tree as arrays, anything else it read). In order: the structural check (`_problem`), the
        saved layout of those leaves against `wanted`'s (ValueError naming the leaves that differ,
        with `what` in the message: a different model is the caller's error, not a damaged step),
        the read, the checksums of the leaves read. A step failing the first, third or fourth is
        marked bad (reported once) and CorruptCheckpointError raised.
        """
        problem = self._problem(step)
        if problem is None:
            meta = self._read_json(step, "meta")
            saved = meta["layout"]  # _problem checked that meta holds it
            if part is not None:
                prefix = jax.tree_util.keystr((jax.tree_util.DictKey(part),))  # "['params']"
                saved = {k: v for k, v in saved.items() if k.startswith(prefix)}
            diff = integrity.layout_diff(saved, integrity.layout(wanted))
            if diff:
                raise ValueError(
                    f"checkpoint step {step} in {self.directory} holds {what} of another shape "
                    f"({len(diff)} leaves differ): " + "; ".join(diff[:5])
                )
            try:
                with loops_that_drain():  # a failed read must not leave sibling reads behind
                    tree, rest = read()
            except Exception as e:  # tensorstore/orbax raise many types for damaged files
                problem = f"reading it failed ({type(e).__name__}: {_first_line(e)})"
        if problem is None:
            problem = integrity.checksum_problem(tree, meta["checksums"])
        if problem is not None:
            self._mark_bad(step, problem)
            raise CorruptCheckpointError(f"checkpoint step {step} in {self.directory}: {problem}")
        return tree, rest

    def wait_until_finished(self):
        """Blocks until async saves are committed; call before the process exits."""
        self._mngr.wait_until_finished()

    def close(self):
        self._mngr.wait_until_finished()
        self._mngr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):  # waits for pending saves, also when the body raised
        self.close()

    # ------------------------------------------------------------------ inference: parameters only
    def restore_params(self, step: int, abstract_params) -> Any:
        """The `params` subtree of `step`'s state, laid out as `abstract_params` says; nothing else.

        For inference (score, evaluate, export): orbax's partial restore reads only the parameter
        leaves, so the optimizer state (Adam's two moments, about twice the parameters) is never
        read nor allocated. The leaves read are verified against the checksums saved with the
        step, as `restore` verifies the whole state. Raises FileNotFoundError for a step that does
        not exist, CorruptCheckpointError for one that cannot be read back intact, ValueError for
        parameters of another shape than `abstract_params`.
        """
        if step not in self._mngr.all_steps():
            raise FileNotFoundError(f"no committed checkpoint for step {step} in {self.directory}")
        wanted = {"params": abstract_params}

        def read():
            handler = ocp.PyTreeCheckpointHandler()  # reads the leaves of `wanted` only
            try:
                return handler.restore(
                    self.directory / str(step) / "state",
                    args=ocp.args.PyTreeRestore(
                        item=wanted,
                        partial_restore=True,
                        restore_args=ocp.checkpoint_utils.construct_restore_args(wanted),
                    ),
                ), None
            finally:
                handler.close()

        restored, _ = self._read_verified(step, wanted, read, part="params", what="parameters")
        self.restored_step = step
        return restored["params"]
