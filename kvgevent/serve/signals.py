"""SIGINT and SIGTERM for ``run_server.py`` and its ``--workers`` supervisor."""

from __future__ import annotations

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


def reopen_on_hangup(log_file: LogFile | None, then: Callable[[], None] | None = None) -> None:
    """On SIGHUP, reopen ``log_file`` at its path (logrotate's ``postrotate kill -HUP``), then
    call ``then`` (the supervisor passes the signal on to its workers); without either,
    SIGHUP is ignored (it does not stop the server)."""

    def on_hangup() -> None:
        if log_file is not None:
            failed = log_file.reopen()
            if failed is not None:  # (the old file stays the log: the service goes on)
                error = failed.strerror or str(failed)
                get_logger().error("log_reopen_failed", path=log_file.path, error=error)
        if then is not None:
            then()

    gevent.signal_handler(signal.SIGHUP, on_hangup)
