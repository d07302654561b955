"""Episodes: a trouble that repeats, logged once when it begins and once when it ends.

Some troubles come once per connection or per call and can be repeated at will by a client
(a connection refused over --max-clients) or by the system (accept failing for want of file
descriptors). Logging each occurrence lets an attacker flood the log (a client reconnecting
in a loop got 18.7k lines in 10 s). Instead, the first occurrence of an episode is logged
with its details, the next ones are only counted, and the end is logged once with how many
there were and how long it lasted. Pure: no I/O, no gevent; the clock is a parameter. The
caller logs (each event name a literal, as the README's table of events requires).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import NamedTuple


class Ended(NamedTuple):
    """An episode that ended: how many occurrences it had, and its seconds from first to end."""

    occurrences: int
    seconds: float


class Episode:
    """Occurrences of one trouble, grouped into episodes."""

    __slots__ = ("clock", "since", "count", "last")

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.since: float | None = None  # when the open episode began (None: none is open)
        self.count = 0  # occurrences of the open episode
        self.last = -math.inf  # when the last occurrence came (of any episode)

    @property
    def open(self) -> bool:
        return self.since is not None

    def note(self) -> bool:
        """One occurrence; True if it began an episode (the caller logs that one)."""
        self.last = self.clock()
        self.count += 1
        if self.since is not None:
            return False
        self.since, self.count = self.last, 1
        return True

    def quiet(self) -> float:
        """Seconds since the last occurrence (infinite if there was none)."""
        return self.clock() - self.last

    def end(self) -> Ended | None:
        """Close the open episode and return it; None if none was open."""
        if self.since is None:
            return None
        ended = Ended(self.count, round(self.clock() - self.since, 3))
        self.since, self.count = None, 0
        return ended
