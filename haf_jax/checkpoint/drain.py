"""Restores that leave no array read behind: an asyncio event-loop policy for orbax's reads.

orbax runs each restore (and each metadata read) on a fresh event loop and closes it as soon as
the first array read fails (`asyncio_utils._run_sync_via_new_loop`: run_until_complete, then
close, no task teardown). The sibling reads, still waiting on tensorstore, are abandoned: when
tensorstore finishes one it calls `call_soon_threadsafe` on the closed loop (a traceback from a
tensorstore thread), and the suspended coroutines are finalised at some later garbage collection,
usually at interpreter exit, where orbax turns the GeneratorExit into "Exception ignored in:
<coroutine ... _read_array_index_and_device_put>". `loops_that_drain()` makes orbax's loops finish
those reads (their errors collected, never raised) before they close.
"""

from __future__ import annotations

import asyncio
import contextlib


class DrainingLoop(asyncio.SelectorEventLoop):
    """An event loop that lets its unfinished tasks run to completion before it closes."""

    def close(self):
        if not self.is_closed() and not self.is_running():
            pending = [t for t in asyncio.all_tasks(self) if not t.done()]
            if pending:
                self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        super().close()


class DrainingPolicy(asyncio.DefaultEventLoopPolicy):
    """The default policy, except that its new loops are `DrainingLoop`s."""

    def new_event_loop(self):
        return DrainingLoop()


@contextlib.contextmanager
def loops_that_drain():
    """While active, `asyncio.new_event_loop()` (orbax's restore and metadata reads) makes `DrainingLoop`s.

    The policy is process-wide, so it is installed for the duration of one orbax call only and the
    previous policy is put back even when the call raises.
    """
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(DrainingPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(previous)
