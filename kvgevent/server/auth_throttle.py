"""Throttling password guesses per client address, across connections. Pure: no I/O, no
gevent; the clock is a parameter.

Closing a connection after MAX_AUTH_FAILURES wrong passwords does not slow a guesser who
reconnects (about 18,000 guesses a second on loopback). :class:`AuthThrottle` remembers wrong
passwords per address instead. Once an address has sent AUTH_THROTTLE_AFTER of them, with no
pause of AUTH_FAILURE_WINDOW between two, its AUTHs are checked one at a time, each in its own
turn: the first turn comes AUTH_DELAY_MIN after the last failure, and each AUTH checked
doubles the time to the next turn, up to AUTH_DELAY_MAX. An AUTH whose turn would be more than
AUTH_MAX_WAIT away (guesses sent in parallel) is refused unchecked. A correct password waits
its turn like any other (if it did not, parallel guesses would all be checked at once and
only the wrong answers delayed); other addresses are never delayed.

The server asks :meth:`AuthThrottle.admit` before it checks a password, reports a wrong one
with :meth:`AuthThrottle.failed`, and calls :meth:`AuthThrottle.sweep` now and then to forget
quiet addresses and learn which throttling episodes ended.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kvgevent.config import (
    AUTH_DELAY_MAX,
    AUTH_DELAY_MIN,
    AUTH_FAILURE_WINDOW,
    AUTH_MAX_WAIT,
    AUTH_THROTTLE_AFTER,
    AUTH_TRACKED_ADDRESSES,
)


@dataclass(slots=True)
class Address:
    """What is remembered of one client address."""

    host: str
    failures: int = 0  # wrong passwords, none more than AUTH_FAILURE_WINDOW after the last
    last_failure: float = 0.0
    throttled_since: float | None = None  # when its episode began (None: not throttled)
    delay: float = AUTH_DELAY_MIN  # seconds from its next turn to the one after
    next_turn: float = 0.0  # the earliest time the next AUTH may be checked
    delayed: int = 0  # AUTHs of this episode that waited for their turn
    refused: int = 0  # AUTHs of this episode refused unchecked
    ended_at: float = 0.0  # when its episode ended (for the report)


class AuthThrottle:
    """Wrong passwords by client address, and when each address's next AUTH may be checked."""

    def __init__(
        self,
        *,
        after: int = AUTH_THROTTLE_AFTER,
        window: float = AUTH_FAILURE_WINDOW,
        first_delay: float = AUTH_DELAY_MIN,
        max_delay: float = AUTH_DELAY_MAX,
        max_wait: float = AUTH_MAX_WAIT,
        capacity: int = AUTH_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after = after
        self.window = window
        self.first_delay = first_delay
        self.max_delay = max_delay
        self.max_wait = max_wait
        self.capacity = capacity
        self.clock = clock
        # By last failure, oldest first: sweep() and the capacity bound pop from the front.
        self._addresses: OrderedDict[str, Address] = OrderedDict()
        self._ended: list[Address] = []  # episodes ended outside sweep(), for its next report

    def admit(self, host: str) -> float | None:
        """An AUTH arrived from ``host``: the seconds it must wait before its password is
        checked (0.0: at once), or None to refuse it unchecked (its turn is too far off).
        Waiting reserves the turn: the next AUTH from ``host`` comes after it."""
        address = self._addresses.get(host)
        if address is None or address.throttled_since is None:
            return 0.0
        now = self.clock()
        turn = max(now, address.next_turn)
        if turn - now > self.max_wait:
            address.refused += 1
            return None
        # Every checked AUTH doubles the spacing (as if it were wrong, which it nearly always
        # is): guesses sent in parallel get turns 0.25, 0.75, 1.75... s away, not 0.25 apart.
        address.delay = min(address.delay * 2, self.max_delay)
        address.next_turn = turn + address.delay
        if turn > now:
            address.delayed += 1
        return turn - now

    def failed(self, host: str) -> Address | None:
        """A wrong password came from ``host``: remember it. Returns the address when this
        failure began a throttling episode (the caller logs it once), else None."""
        now = self.clock()
        address = self._addresses.get(host)
        if address is None or now - address.last_failure > self.window:
            address = self._forget_and_make(host, address)
        else:
            self._addresses.move_to_end(host)
        address.failures += 1
        address.last_failure = now
        if address.throttled_since is not None:
            return None
        if address.failures >= self.after:
            address.throttled_since = now
            address.delay = self.first_delay
            address.next_turn = now + self.first_delay
            return address
        return None

    def throttled(self) -> int:
        """Addresses whose AUTHs wait for their turn now."""
        return sum(1 for address in self._addresses.values() if address.throttled_since is not None)

    def sweep(self) -> list[Address]:
        """Forget the addresses with no wrong password for ``window`` seconds; returns those
        that were throttled (their episode is over)."""
        now = self.clock()
        ended, self._ended = self._ended, []
        addresses = self._addresses
        while addresses:
            address = next(iter(addresses.values()))
            if now - address.last_failure <= self.window:
                break
            del addresses[address.host]
            self._note_end(address, now, ended)
        return ended

    @staticmethod
    def _note_end(address: Address, now: float, ended: list[Address]) -> None:
        if address.throttled_since is not None:
            address.ended_at = now
            ended.append(address)

    def _forget_and_make(self, host: str, stale: Address | None) -> Address:
        """A fresh entry for ``host`` at the end of the table (its stale one dropped; the
        oldest one dropped if the table is full)."""
        addresses = self._addresses
        now = self.clock()
        if stale is not None:
            del addresses[host]
            self._note_end(stale, now, self._ended)
        elif len(addresses) >= self.capacity:
            self._note_end(addresses.popitem(last=False)[1], now, self._ended)
        address = addresses[host] = Address(host)
        return address
