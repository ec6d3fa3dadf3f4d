"""metrics.Throughput: rates per logged interval that never include compilation or eval time."""

import threading

from haf_jax.training.metrics import Throughput


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_compilation_and_pauses_are_not_averaged_in():
    clock = Clock()
    meter = Throughput(clock)
    assert meter.dispatched((4, 2, 64)) is True  # first shape: this step compiles
    clock.now += 30.0  # a slow first step by construction (its compilation)
    meter.arrived(4, 400, compiles=True)
    first = meter.rates()
    assert first == {"compile_s": 30.0}  # no rate at all from a window holding only compilation
    for _ in range(3):
        assert meter.dispatched((4, 2, 64)) is False
        clock.now += 0.5
        meter.arrived(4, 400, compiles=False)
    clock.now += 20.0  # an eval
    meter.pause()
    clock.now += 0.5
    meter.arrived(2, 100, compiles=False)  # a step with 2 filler pairs: only real pairs/tokens count
    r = meter.rates()
    assert r["pairs_per_s"] == 14 / 2.0 and r["tokens_per_s"] == 1300 / 2.0 and r["step_s"] == 0.5
    assert r["compile_s"] == 30.0
    assert meter.dispatched((4, 2, 128)) is True  # a new length bucket compiles again
    clock.now += 10.0
    meter.arrived(4, 800, compiles=True)
    clock.now += 1.0
    meter.arrived(4, 800, compiles=False)
    r = meter.rates()
    assert r == {"compile_s": 40.0, "pairs_per_s": 4.0, "tokens_per_s": 800.0, "step_s": 1.0}


class PendingOutput:
    """A step's output that becomes ready when the test says so (jax.block_until_ready waits on it)."""

    def __init__(self):
        self.ready = threading.Event()

    def block_until_ready(self):
        self.ready.wait()
        return self


def test_step_time_is_taken_at_its_finish_not_when_the_host_reads_it():
    """The loop reads step k's metrics only after launching step k + 1; a host delay before that
    read must not move time from one step into the next (one-step rows once showed MFU 1.68)."""
    clock = Clock()
    meter = Throughput(clock, peak_flops=100.0)

    def launch():
        output = PendingOutput()
        meter.dispatched((4, 2, 64), output)
        return output, meter._finishes[-1]

    def finish(launched, at):
        clock.now = at
        launched[0].ready.set()
        launched[1].result()  # the watcher has stamped it

    first, second = launch(), launch()
    finish(first, 101.0)  # the compiling step
    finish(second, 102.0)  # a 1 s step, finished while the host was busy elsewhere
    clock.now = 102.9  # the host reads step 1 late ...
    meter.arrived(4, 400, compiles=True)
    finish(launch(), 103.0)
    # ... and step 2 at 103.0 (step 3 finished): arrival to arrival would say 0.1 s
    meter.arrived(4, 400, compiles=False, flops=50.0)
    assert meter.rates() == {"compile_s": 1.0, "pairs_per_s": 4.0, "tokens_per_s": 400.0, "step_s": 1.0, "mfu": 0.5}
    meter.arrived(4, 400, compiles=False, flops=50.0)
    assert meter.rates()["step_s"] == 1.0
    meter.close()


def test_profile_steps_spec():
    import pytest

    from haf_jax.training.profile import parse_steps

    assert parse_steps("") is None and parse_steps("10-12") == (10, 12) and parse_steps(" 3 - 3 ") == (3, 3)
    for bad in ("12-10", "0-2", "5", "a-b", "1-2-3"):
        with pytest.raises(ValueError, match="train.profile_steps"):
            parse_steps(bad)
