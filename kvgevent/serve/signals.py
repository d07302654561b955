"""SIGINT and SIGTERM for ``run_server.py`` and its ``--workers`` supervisor."""

from __future__ import annotations

import errno
import signal
from collections.abc import Callable

import gevent
import gevent.event

from kvgevent.logs import LogFile, Logger, get_logger


def stop_requested(log: Logger) -> gevent.event.Event:
    """An event set by the first SIGINT or SIGTERM (later ones are logged and ignored)."""
    stop = gevent.event.Event()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():  # shutdown is already under way, and bounded in time
            log.info("shutdown_in_progress", signal=name)
            return
        log.info("shutdown_requested", signal=name)
        stop.set()

    # gevent.signal_handler runs the callback in a new greenlet, outside the hub; the handlers
    # stay installed until the process exits, so a second signal cannot interrupt shutdown.
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, on_signal, sig)
    return stop


REOPEN_RETRY = 1.0
"""Seconds between two attempts to reopen the log file after SIGHUP met a shortage that
passes (no file descriptor or memory free)."""

PASSING = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOSPC, errno.EDQUOT})
"""Errors of a reopen that pass by themselves (no file, memory, room or quota to spare):
tried again, where a directory gone stays."""


def reopen_on_hangup(log_file: LogFile | None, then: Callable[[], None] | None = None) -> None:
    """On SIGHUP, reopen ``log_file`` at its path (logrotate's ``postrotate kill -HUP``), then
    call ``then`` (the supervisor passes the signal on to its workers); without either,
    SIGHUP is ignored (it does not stop the server). A reopen that fails for want of files
    or memory is tried again every REOPEN_RETRY until it works (``log_reopened``) or the
    next SIGHUP: logrotate's next run would otherwise compress the file the server still
    writes into (an attacker's pass: the whole day into the rotated file)."""
    retry: list[gevent.Greenlet] = []

    def on_hangup() -> None:
        gevent.killall(retry)
        retry.clear()
        if log_file is not None:
            failed = log_file.reopen()
            if failed is not None:  # (the old file stays the log: the service goes on)
                error = failed.strerror or str(failed)
                get_logger().error("log_reopen_failed", path=log_file.path, error=error)
                if failed.errno in PASSING:
                    retry.append(gevent.spawn(_reopen_later, log_file))
        if then is not None:
            then()

    gevent.signal_handler(signal.SIGHUP, on_hangup)


def _reopen_later(log_file: LogFile) -> None:
    attempts = 1
    while True:
        gevent.sleep(REOPEN_RETRY)
        attempts += 1
        failed = log_file.reopen()
        if failed is None:
            get_logger().info("log_reopened", path=log_file.path, attempts=attempts)
            return
        if failed.errno not in PASSING:  # (another error now: said, and the old file stays)
            get_logger().error("log_reopen_failed", path=log_file.path, error=failed.strerror or str(failed))
            return
