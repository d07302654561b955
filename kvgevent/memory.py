"""Giving freed memory back to the operating system.

CPython hands objects over 512 bytes (reply lines, values) to the C allocator. After a burst
(say, a thousand clients that never read, each holding 500 queued replies) glibc keeps the
freed memory for reuse, and RSS stays at its peak: measured with bench/stuck_clients.py, 453 MB
after 500 stuck clients had left; ``malloc_trim(0)`` brought it back to 51 MB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

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
