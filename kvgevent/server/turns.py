"""Taking turns: clients with more requests waiting share the event loop without starving it.

A reader that has applied a turn's worth of requests (TURN_BYTES) and has more calls
:meth:`Turns.wait`. Waiting readers are resumed in FIFO order by one timer callback that runs
once per event-loop iteration, *after* I/O was polled, and resumes readers for at most
TURN_BUDGET seconds. So every iteration serves, first, everything that is ready (clients with a
request or two, writers with replies to send, new connections) and then a bounded slice of the
backlog.

Why not ``gevent.sleep(0)``: it appends the reader to gevent's callback queue, behind every
other greedy reader. A polite client's writer is woken through that same queue, so with 1,000
clients flooding requests its reply waited for all 1,000 turns (bench/OPTIMISATIONS.md,
"sleep(0) is not a turn"; the README has the figure with this scheme).
"""

from __future__ import annotations

import time
from collections import deque

from gevent import get_hub
from gevent.hub import Waiter

from kvgevent.config import TURN_BUDGET


class Turns:
    """The queue of readers waiting for their next turn (one per server)."""

    def __init__(self, budget: float = TURN_BUDGET) -> None:
        self.budget = budget
        self._waiting: deque[Waiter[None]] = deque()
        self._timer = get_hub().loop.timer(0.0)
        self._running = False

    def wait(self) -> None:
        """Block the calling greenlet until its next turn (FIFO among the waiting ones)."""
        waiter: Waiter[None] = Waiter()
        self._waiting.append(waiter)
        if not self._running and not self._timer.active:  # type: ignore[attr-defined]  # (libev's timer has it; the stub does not)
            self._timer.start(self._resume)
        waiter.get()

    def _resume(self) -> None:
        """Timer callback, in the hub: resume waiting readers for at most ``budget`` seconds."""
        self._running = True
        try:
            end = time.perf_counter() + self.budget
            waiting = self._waiting
            while waiting:
                # A waiter whose greenlet was killed meanwhile just keeps the value: harmless.
                waiting.popleft().switch(None)
                if time.perf_counter() >= end:
                    break
        finally:
            self._running = False
        if self._waiting:
            self._timer.start(self._resume)  # the next slice, after the next I/O poll

    def close(self) -> None:
        self._timer.close()
