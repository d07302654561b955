"""Addresses and listening sockets."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import Any

from gevent.server import StreamServer

ACCEPT_LACKS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""Errors of accept() that say the process or the system lacks files or memory for now: the
pending connection stays in the backlog, to be accepted once some are freed."""


def worker_name() -> str:
    """This process, as named in a shared store's worker table."""
    return f"{socket.gethostname()}:{os.getpid()}"


def reuse_port_listener(host: str, port: int, backlog: int) -> Any:
    """A listening socket that other processes may bind too (the kernel spreads connects)."""
    from gevent import socket as gsocket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class PausingListener(StreamServer):
    """gevent's StreamServer (or a subclass, as pywsgi's, after this one in the bases), for
    which an accept() failing for want of files or memory (ACCEPT_LACKS) is not an error of
    the server's: it is reported to ``failing`` (with the OSError), and accepting pauses as
    gevent's own loop does after an error (min_delay, doubled after each failure up to
    max_delay, back to min_delay once an accept() works: the listening socket stays readable,
    so retrying at once would spin). gevent's loop reported each one as an unhandled error."""

    def __init__(self, *args: Any, failing: Callable[[OSError], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._failing = failing
        self._retry: Any = None  # the loop timer that resumes accepting after a pause
        self._pause_for = self.min_delay

    def do_read(self) -> Any:
        try:
            accepted = super().do_read()
        except OSError as exc:
            if exc.errno not in ACCEPT_LACKS:
                raise
            self._pause()
            self._failing(exc)
            return None  # (to gevent's loop: nothing accepted this time)
        if accepted is not None:
            self._pause_for = self.min_delay
        return accepted

    def _pause(self) -> None:
        """Stop accepting for a while, twice as long as last time (up to max_delay)."""
        self.stop_accepting()
        self._retry = self.loop.timer(self._pause_for)
        self._retry.start(self._resume)
        self._pause_for = min(self.max_delay, self._pause_for * 2)

    def _resume(self) -> None:
        if self.started:  # (not closed meanwhile)
            self.start_accepting()

    def stop_accepting(self) -> None:
        super().stop_accepting()
        if self._retry is not None:
            self._retry.stop()
            self._retry.close()
            self._retry = None
