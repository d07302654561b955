"""Memory: what the server uses (the ``--max-memory`` rule) and giving freed memory back.

:class:`MemoryGuard` accounts for the memory in use and enforces ``--max-memory``: writes are
refused while the server is over it (Redis's ``noeviction``), and clients holding the biggest
buffers are disconnected when their buffers are what fills it (Redis's client eviction).

Giving freed memory back to the operating system:

CPython hands objects over 512 bytes (reply lines, values) to the C allocator. After a burst
(say, a thousand clients that never read, each holding 500 queued replies) glibc keeps the
freed memory for reuse, and RSS stays at its peak; ``malloc_trim(0)`` gives most of it back
(bench/OPTIMISATIONS.md, "malloc_trim"): every MEMORY_TRIM_INTERVAL once clients left, and
with ``--max-memory`` as soon as a burst of evictions is over.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

from kvgevent.config import (
    CLIENT_ALLOWANCE,
    CONNECTION_COST,
    EVICT_MIN_BYTES,
    MEMORY_CHECK_INTERVAL,
    MEMORY_CHECK_STEP,
    MEMORY_OK_QUIET,
    PRESSED_QUEUE_BYTES,
)
from kvgevent.errors import StoreError
from kvgevent.logs import Logger

ERR_OUT_OF_MEMORY = StoreError("out of memory")
"""The reply to a PUT or UPDATE while the server is over ``--max-memory``."""

_NO_LIMIT = 1 << 62  # a buffer level never reached: no check is ever due

MEMORY_TRIM_INTERVAL = 10.0
"""Seconds between two attempts to return freed memory to the OS (only after clients left)."""


def _load_malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def release_free_memory() -> bool:
    """Return the allocator's free pages to the OS; False where that is not supported."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True


def rss_kb() -> int | None:
    """This process's resident memory in kB (Linux), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def release_memory_loop(dropped: Callable[[], int], log: Logger) -> None:
    """Every MEMORY_TRIM_INTERVAL, if clients left meanwhile (``dropped()`` changed: their
    queues were freed), give the allocator's free pages back to the OS. Runs until killed."""
    import gevent

    seen = dropped()
    while True:
        gevent.sleep(MEMORY_TRIM_INTERVAL)
        if dropped() == seen:
            continue
        seen = dropped()
        before, began = rss_kb(), time.perf_counter()
        if not release_free_memory():
            return
        log.debug(
            "memory_released",
            rss_before_kb=before,
            rss_after_kb=rss_kb(),
            ms=round((time.perf_counter() - began) * 1000, 2),
        )


class MemoryGuard:
    """The memory in use, by accounting, and the ``--max-memory`` rule (``limit``; 0 = none).

    ``used()`` is ``base`` (the process apart from what is accounted: the interpreter, its
    libraries; measured by :meth:`calibrate` as the RSS minus the store's bytes) plus what the
    store reports holding (:meth:`~kvgevent.stores.base.KVStore.memory_used`), plus ``buffered`` (the
    bytes every client holds: an incomplete request line, queued and in-flight replies, kept
    up to date by the connections), plus ``connection_cost`` per connection (CONNECTION_COST,
    and TLS_CONNECTION_COST more over TLS).

    Connections add to ``buffered`` and, when it passes ``mark``, call :meth:`check`, which
    wakes :meth:`run` when the server is over the limit; :meth:`run` then asks the server to
    disconnect clients (``evict(excess)``, biggest buffers first). Writes are refused by the
    executor while :meth:`over` (it calls :meth:`refused`). Each episode over the limit logs
    one ``max_memory_reached`` and one ``max_memory_ok``.
    """

    def __init__(
        self,
        limit: int,
        store: Any,
        connections: Callable[[], int],
        log: Logger,
        connection_cost: int = CONNECTION_COST,
    ) -> None:
        self.limit = limit
        self.store = store
        self.connections = connections
        self.connection_cost = connection_cost  # (more over TLS: TLS_CONNECTION_COST)
        self.log = log
        self.base = 0
        self.buffered = 0
        self.mark = MEMORY_CHECK_STEP if limit else _NO_LIMIT
        self.queue_cap = _NO_LIMIT
        """Bytes a client's queue may hold for a big reply being built: PRESSED_QUEUE_BYTES
        while over the limit (a prompt reader of a big value then holds about that, not
        --queue-bytes, and is not what gets disconnected), else no bound beyond its own."""
        self.holders: set[Any] = set()
        """The connections whose big replies under way hold lists of values (with a limit):
        :meth:`run` has them count again what those hold (``Connection.rehold``)."""
        self.oom_rejected = 0
        self.evicted = 0
        self._wake: Any = None  # a gevent Event, made by run()
        self._episode: dict[str, Any] | None = None
        self._last_bite = 0.0

    def calibrate(self) -> None:
        """Measure ``base`` (call once the store is loaded, before clients connect)."""
        rss = rss_kb()
        if rss is not None:
            self.base = rss * 1024 - self.store.memory_used()

    def used(self) -> int:
        connections = self.connection_cost * self.connections()
        return self.base + self.store.memory_used() + self.buffered + connections

    def over(self) -> bool:
        """True while a limit is set and the memory in use is above it (sets ``queue_cap``)."""
        over = bool(self.limit) and self.used() > self.limit
        self.queue_cap = PRESSED_QUEUE_BYTES if over else _NO_LIMIT
        return over

    def refused(self, count: int) -> None:
        """``count`` writes were refused for memory: count them (and start an episode)."""
        self._begin()  # first: the episode's count starts before these refusals
        self.oom_rejected += count
        self._last_bite = time.monotonic()

    def check(self) -> None:
        """Client buffers grew past ``mark``: wake :meth:`run` if that put the server over."""
        self.mark = self.buffered + MEMORY_CHECK_STEP
        if self._wake is not None and self.over():
            self._wake.set()

    def stats(self) -> dict[str, int]:
        return {
            "maxmemory": self.limit,
            "used_memory": max(self.used(), 0),
            "used_memory_clients": self.buffered,
            "oom_rejected": self.oom_rejected,
            "evicted_clients": self.evicted,
        }

    def run(self, evict: Callable[[int, int], int]) -> None:
        """The guard's greenlet (with a limit only): every MEMORY_CHECK_INTERVAL, or at once
        when woken by :meth:`check`, disconnect clients if their buffers put the server over
        the limit, and end an episode once under it. Runs until killed.

        ``evict(excess, floor)`` disconnects clients holding at least ``floor`` bytes, the
        biggest first, until they held ``excess`` bytes; it returns how many it disconnected."""
        import gevent.event

        self._wake = gevent.event.Event()
        trim_due = False
        while True:
            self._wake.wait(MEMORY_CHECK_INTERVAL)
            self._wake.clear()
            if self.holders:  # (before the look: what they hold may have grown)
                self._recount(list(self.holders))
            self.mark = self.buffered + MEMORY_CHECK_STEP
            self.over()  # (sets queue_cap)
            excess = self.used() - self.limit
            evicted = self._evict(excess, evict) if excess > 0 else 0
            if trim_due and not evicted:
                # A burst of evictions is over: their buffers were freed at the last check,
                # and the allocator keeps the pages; with a limit set, RSS is watched.
                release_free_memory()
            trim_due = evicted > 0
            quiet = time.monotonic() - self._last_bite >= MEMORY_OK_QUIET
            if excess <= 0 and self._episode is not None and quiet:
                self._end()

    @staticmethod
    def _recount(holders: list[Any]) -> None:
        """Have each connection holding big replies count again what they hold
        (``Connection.rehold``), the values of a list dropped by the store once in all."""
        seen: set[int] = set()
        for holder in holders:
            holder.counted(seen)
        for holder in holders:
            holder.rehold(seen)

    def _evict(self, excess: int, evict: Callable[[int, int], int]) -> int:
        """Disconnect clients for ``excess`` bytes over the limit, if client buffers are the
        reason; returns how many were disconnected."""
        # Client buffers up to the allowance are never the reason: with the store full,
        # refusing writes is enough, and a client can still read values out.
        excess = min(excess, self.buffered - self.limit // CLIENT_ALLOWANCE)
        if excess <= 0:
            return 0
        evicted = evict(excess, EVICT_MIN_BYTES)
        if evicted:
            self.evicted += evicted
            self._last_bite = time.monotonic()
            self._begin()
            self._episode["evicted_clients"] += evicted  # type: ignore[index]  # (_begin made the episode)
        return evicted

    def _begin(self) -> None:
        if self._episode is not None:
            return
        self._episode = {"since": time.monotonic(), "rejected": self.oom_rejected, "evicted_clients": 0}
        self.log.warning(
            "max_memory_reached",
            maxmemory=self.limit,
            used_memory=self.used(),
            used_memory_clients=self.buffered,
        )

    def _end(self) -> None:
        episode, self._episode = self._episode, None
        assert episode is not None
        self.log.info(
            "max_memory_ok",
            maxmemory=self.limit,
            used_memory=self.used(),
            seconds=round(time.monotonic() - episode["since"], 3),
            oom_rejected=self.oom_rejected - episode["rejected"],
            evicted_clients=episode["evicted_clients"],
        )
