"""`train.profile_steps = "A-B"`: a JAX profiler trace of train steps A..B in WORKDIR/profile.

The trace (`plugins/profile/<time>/<host>.xplane.pb` and `.trace.json.gz`) opens in TensorBoard's
profile plugin (`tensorboard --logdir WORKDIR/profile`) or in Perfetto (ui.perfetto.dev, the
`.trace.json.gz`). Pick steps after the first, which compiles.
"""

from __future__ import annotations

import re

import jax


def parse_steps(spec: str) -> tuple[int, int] | None:
    """ "A-B" -> (A, B); "" -> None; anything else is a ValueError naming the key."""
    if not spec:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", str(spec))
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ValueError(f"train.profile_steps={spec!r}: expected 'A-B' with 1 <= A <= B (e.g. '10-12'), or ''")
    return int(m.group(1)), int(m.group(2))


class StepProfiler:
    """Starts the trace before step A is dispatched and stops it once step B has finished."""

    def __init__(self, spec: str, directory):
        self.window, self.directory, self.active = parse_steps(spec), str(directory), False

    def before(self, step: int):
        if self.window and step == self.window[0]:
            jax.profiler.start_trace(self.directory)
            self.active = True

    def after(self, step: int, outputs):
        if self.active and step == self.window[1]:
            jax.block_until_ready(outputs)
            self.close()

    def close(self):
        if self.active:
            jax.profiler.stop_trace()
            self.active = False
