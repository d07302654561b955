"""Service readiness for systemd (``Type=notify``): a datagram to the Unix socket named by
``NOTIFY_SOCKET`` (``@name``: the abstract namespace). Nothing happens without that variable.

``run_server.py`` sends ``READY=1`` once it listens (after the append-only file was replayed)
and ``STOPPING=1`` when a SIGINT/SIGTERM starts its shutdown. With ``--workers`` the supervisor
gives its workers a socket of its own (:class:`ReadyCollector`) and sends ``READY=1`` once every
worker has sent it. With systemd's watchdog on (``WatchdogSec=``: ``WATCHDOG_USEC``), the
process it watches sends ``WATCHDOG=1`` from its event loop (:func:`feed_watchdog`), so that
systemd restarts a server whose loop stopped running.
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile

import gevent
import gevent.socket


def notify(message: str) -> bool:
    """Send ``message`` (``READY=1``, ``STOPPING=1``, ``STATUS=...``) to systemd, if it asked
    (``NOTIFY_SOCKET``); True if sent. Never raises and never waits: readiness is advice, not
    a condition, and a receiver that does not read (its queue of datagrams full) must not hold
    up a server's start or its shutdown: the message is dropped (False)."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = "\0" + path[1:] if path.startswith("@") else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full queue: BlockingIOError, not a wait
            sock.connect(address)
            sock.send(message.encode())
    except OSError:
        return False
    return True


USEC_INFINITY = 2**64 - 1
"""systemd's "no limit" for a time in microseconds: a ``WATCHDOG_USEC`` of it (or more) is no
watchdog."""


WATCHDOG_MIN_INTERVAL = 0.05
"""Fewest seconds between two ``WATCHDOG=1``, whatever ``WatchdogSec=`` says: a watchdog of a
few microseconds (a typo in a unit file) would otherwise make the loop feed it without end."""


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1``, half of systemd's ``WatchdogSec=`` (as
    ``sd_watchdog_enabled`` reads it: ``WATCHDOG_USEC``, for this process unless
    ``WATCHDOG_PID`` names another); None when systemd asked for none, or when
    ``WATCHDOG_USEC`` is not a number of microseconds above 0 and below USEC_INFINITY (ASCII
    digits only: never an error, whatever the environment holds)."""
    usec, pid = os.environ.get("WATCHDOG_USEC", ""), os.environ.get("WATCHDOG_PID")
    if not os.environ.get("NOTIFY_SOCKET") or not (usec.isascii() and usec.isdigit()):
        return None
    if not 0 < int(usec) < USEC_INFINITY:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return max(int(usec) / 1e6 / 2, WATCHDOG_MIN_INTERVAL)


def feed_watchdog() -> None:
    """Send ``WATCHDOG=1`` now and every :func:`watchdog_interval` from a greenlet, for as
    long as this process's event loop runs (nothing if systemd asked for none)."""
    interval = watchdog_interval()
    if interval is not None:
        notify("WATCHDOG=1")
        gevent.spawn(_feed_every, interval)


def _feed_every(interval: float) -> None:
    while True:
        gevent.sleep(interval)
        notify("WATCHDOG=1")


class ReadyCollector:
    """A notification socket for the supervisor's workers: they send READY=1 to it (their
    ``NOTIFY_SOCKET``: :attr:`path`) as they would to systemd; :meth:`wait` counts them,
    :meth:`drain` reads the rest. Whoever reads it is stopped before :meth:`close`.

    The socket is ``notify`` in a private directory of the temporary directory; when that path
    cannot be bound (a TMPDIR too long for a Unix socket's 108 bytes, a TMPDIR that does not
    exist), a name in Linux's abstract namespace (``@kvgevent-notify-<pid>-<random>``). OSError
    if neither can be bound: the supervisor then runs without (logged)."""

    def __init__(self) -> None:
        self._sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self.path, self._directory = _bind_notify_socket(self._sock)
        except OSError:
            self._sock.close()
            raise
        self.ready = 0

    def wait(self, count: int, timeout: float) -> bool:
        """Wait until ``count`` READY=1 have come (True), or ``timeout`` seconds (False)."""
        try:
            with gevent.Timeout(timeout):
                while self.ready < count:
                    message = self._sock.recv(4096)
                    if b"READY=1" in message.split(b"\n"):
                        self.ready += 1
        except gevent.Timeout:
            pass
        return self.ready >= count

    def drain(self) -> None:
        """Read and drop whatever comes, until the socket is closed: the workers' later
        messages (a restarted worker's READY=1, STOPPING=1 at shutdown) must not fill its
        queue, or their next ``notify`` would find it full."""
        while True:
            self._sock.recv(4096)

    def close(self) -> None:
        self._sock.close()
        if self._directory is None:  # (an abstract name: nothing on disk)
            return
        for path in (self.path, self._directory):
            try:
                os.rmdir(path) if path == self._directory else os.unlink(path)
            except OSError:
                pass


def _bind_notify_socket(sock: socket.socket) -> tuple[str, str | None]:
    """Bind ``sock`` to a new private path, else to a new abstract name; return its
    ``NOTIFY_SOCKET`` form and the directory to remove at close (None for an abstract name).
    OSError if neither can be bound."""
    try:
        directory = tempfile.mkdtemp(prefix="kvgevent-notify-")
    except OSError:  # (TMPDIR missing or read-only)
        directory = None
    if directory is not None:
        path = os.path.join(directory, "notify")
        try:
            sock.bind(path)
            return path, directory
        except OSError:  # ("AF_UNIX path too long": a long TMPDIR)
            os.rmdir(directory)
    name = f"kvgevent-notify-{os.getpid()}-{secrets.token_hex(8)}"
    sock.bind("\0" + name)
    return "@" + name, None
