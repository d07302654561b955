"""Giving freed memory back to the operating system.

CPython hands objects over 512 bytes (reply lines, values) to the C allocator. After a burst
(say, a thousand clients that never read, each holding 500 queued replies) glibc keeps the
freed memory for reuse, and RSS stays at its peak: measured with bench/stuck_clients.py, 453 MB
after 500 stuck clients had left; ``malloc_trim(0)`` brought it back to 51 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable
from typing import Any

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
    return trim  # type: ignore[no-any-return]


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


def release_memory_loop(dropped: Callable[[], int], log: Any) -> None:
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
