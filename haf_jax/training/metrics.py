"""Run metrics: `metrics.jsonl` (the contract in DESIGN.md s3), TensorBoard events (scalars, and the
eval figures of haf_jax.evaluation.plots as images), summary table.

Only process 0 writes (and prints: `log`). Rows are plain JSON objects: train rows carry `step`
and the loss metrics; eval rows carry `split: "eval"`. On resume, rows after the restored step
are dropped so the file reads as if the run had never stopped. A remote workdir (gs://) gets the
same files: objects cannot be appended to, so metrics.jsonl is rewritten whole at most every
`REMOTE_FLUSH_S` seconds, at each eval row and at close.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import math
import time

import jax

from haf_jax.core import paths
from haf_jax.core.logs import log  # noqa: F401  (the loop's log lines)

REMOTE_FLUSH_S = 30.0


class Throughput:
    """Honest training rates: per logged interval, from the moments the steps finish on the devices.

    A step whose batch shape is new to this process carries its compilation: its time goes to
    `compile_s` (cumulative) and is never averaged into the rates. Time spent outside steps (eval,
    checkpoints) is excluded by `pause()`. `rates()` gives, over the steps since the last call:
    `pairs_per_s`, `tokens_per_s` (real tokens, padding excluded), `step_s`, and `compile_s`;
    with `peak_flops` (FLOP/s of all devices, haf_jax.training.flops.peak_flops) and each step's FLOPs,
    also `mfu` = FLOPs / (time x peak).

    A step's time runs from the previous step's finish (or the last pause) to its own. The finish
    is stamped by a watcher thread that waits on the step's outputs as soon as it is launched: the
    loop only reads a step's metrics after launching the next one, so a host delay before that read
    would otherwise move time from one step into its neighbour (one-step rows then showed MFU > 1).
    """

    def __init__(self, clock=time.monotonic, peak_flops: float | None = None):
        self._clock, self._shapes, self._peak = clock, set(), peak_flops
        self._last = clock()
        self._finishes: collections.deque[concurrent.futures.Future] = collections.deque()
        self._watcher = None
        self.compile_s = 0.0
        self._reset()

    def _reset(self):
        self._time = self._pairs = self._tokens = self._steps = self._flops = 0.0

    def dispatched(self, shape, outputs=None) -> bool:
        """Call right after launching a step on a batch of `shape`; True when it needs compiling.
        `outputs` (the step's device arrays) are watched so its finish is stamped when it happens."""
        new = tuple(shape) not in self._shapes
        self._shapes.add(tuple(shape))
        if outputs is not None:
            if self._watcher is None:
                self._watcher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="step-finish")
            self._finishes.append(self._watcher.submit(self._finish, outputs))
        return new

    def _finish(self, outputs) -> float:
        jax.block_until_ready(outputs)
        return self._clock()

    def arrived(self, pairs: float, tokens: float, compiles: bool, flops: float = 0.0):
        """Call, in launch order, when a step's metrics are on the host; `flops`: the step's."""
        now = self._finishes.popleft().result() if self._finishes else self._clock()
        elapsed, self._last = max(now - self._last, 0.0), max(now, self._last)
        if compiles:
            self.compile_s += elapsed
            return
        self._time += elapsed
        self._pairs, self._tokens, self._steps = self._pairs + pairs, self._tokens + tokens, self._steps + 1
        self._flops += flops

    def pause(self):
        """Restart the clock after work that is not a train step (eval, saving)."""
        self._last = self._clock()

    def rates(self) -> dict:
        out = {"compile_s": self.compile_s}
        if self._steps:
            out.update(
                pairs_per_s=self._pairs / max(self._time, 1e-9),
                tokens_per_s=self._tokens / max(self._time, 1e-9),
                step_s=self._time / self._steps,
            )
            if self._peak and self._flops:
                out["mfu"] = self._flops / (max(self._time, 1e-9) * self._peak)
        self._reset()
        return out

    def close(self):
        if self._watcher is not None:
            self._watcher.shutdown(wait=False)


class MetricsLog:
    def __init__(self, workdir, *, resume_step: int = 0):
        self.path = paths.path(workdir) / "metrics.jsonl"
        self.enabled = jax.process_index() == 0
        self._tb = None
        self._remote = paths.is_remote(self.path)
        self._lines: list[str] = []  # a remote file's content, rewritten whole
        self._flushed = time.monotonic()
        if not self.enabled:
            return
        if self.path.exists():  # keep only what the restored state had already produced
            kept = [r for r in read_rows(self.path) if r.get("step", 0) <= resume_step]
            self._lines = [json.dumps(r) + "\n" for r in kept]
            paths.write_text(self.path, "".join(self._lines))
        from tensorboardX import SummaryWriter  # writes gs:// itself (google-cloud-storage)

        self._tb = SummaryWriter(str(paths.path(workdir) / "tensorboard"))

    def write(self, step: int, metrics: dict, *, split: str = "train") -> dict:
        row = {"step": int(step)}
        if split != "train":
            row["split"] = split
        row.update({k: _plain(v) for k, v in metrics.items()})
        if self.enabled:
            if self._remote:
                self._lines.append(json.dumps(row) + "\n")
                if split != "train" or time.monotonic() - self._flushed >= REMOTE_FLUSH_S:
                    self._flush()
            else:
                with open(self.path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            for k, v in row.items():
                if isinstance(v, (int, float)) and k != "step":
                    self._tb.add_scalar(f"{split}/{k}", v, step)
        return row

    def write_figures(self, step: int, make_figures, *, split: str = "eval") -> list[str]:
        """TensorBoard images `<split>/<name>` of the matplotlib Figures `make_figures()` returns
        ({name: Figure}; built only on the writing process); returns the tags written."""
        if not self.enabled:
            return []
        from haf_jax.evaluation.plots import to_rgb

        tags = []
        for name, fig in make_figures().items():
            self._tb.add_image(f"{split}/{name}", to_rgb(fig), step, dataformats="HWC")
            tags.append(f"{split}/{name}")
        return tags

    def _flush(self):
        paths.write_text(self.path, "".join(self._lines))
        self._flushed = time.monotonic()

    def close(self):
        if self._remote and self.enabled:
            self._flush()
        if self._tb is not None:
            self._tb.close()


def read_rows(path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (a kill mid-write) is dropped."""
    rows = []
    for line in paths.path(path).read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _plain(v):
    v = float(v) if not isinstance(v, (str, bool, int)) else v
    return v if not isinstance(v, float) or math.isfinite(v) else str(v)


def summary_table(rows: dict[str, dict], keys: tuple[str, ...]) -> str:
    """A small fixed-width table: one line per named row (e.g. best, last), one column per key."""
    width = max(12, *(len(k) for k in keys))
    head = "".ljust(8) + "".join(k.rjust(width + 2) for k in keys)
    lines = [head]
    for name, row in rows.items():
        cells = []
        for k in keys:
            v = row.get(k, "")
            cells.append((f"{v:.4f}" if isinstance(v, float) else str(v)).rjust(width + 2))
        lines.append(name.ljust(8) + "".join(cells))
    return "\n".join(lines)


def is_new_best(best: tuple[int, dict] | None, metrics: dict, metric: str) -> bool:
    """True when eval `metrics` beat `best` = (step, metrics) strictly: a tie keeps the earlier step, as
    TRL's load_best_model_at_end does (checkpoint.Checkpointer.best_step breaks ties the same way)."""
    return best is None or metrics[metric] > best[1][metric]


def past_metrics(workdir, upto: int, best_metric: str):
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
            if isinstance(values.get(best_metric), (int, float)) and is_new_best(best, values, best_metric):
                best = (step, values)
        elif "split" not in row and step == upto:
            last_train = values
    return best, last_eval, last_train
