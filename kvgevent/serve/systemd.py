"""Service readiness for systemd (``Type=notify``): a datagram to the Unix socket named by
``NOTIFY_SOCKET`` (``@name``: the abstract namespace). Nothing happens without that variable.

``run_server.py`` sends ``READY=1`` once it listens (after the append-only file was replayed)
and ``STOPPING=1`` when a SIGINT/SIGTERM starts its shutdown. With ``--workers`` the supervisor
gives its workers a socket of its own (:class:`ReadyCollector`, with systemd or not: it tells
it which workers listened) and sends ``READY=1`` once every worker has sent it. With
systemd's watchdog on (``WatchdogSec=``: ``WATCHDOG_USEC``), the process it watches sends
``WATCHDOG=1`` from its event loop (:func:`feed_watchdog`), so that systemd restarts a server
whose loop stopped running.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import socket
import struct
import tempfile
import time
from collections.abc import Callable, Collection

import gevent
import gevent.event
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


UCRED = struct.Struct("iII")
"""Linux's ``struct ucred`` (pid, uid, gid): the credentials the kernel attaches to each
datagram for a socket with SO_PASSCRED, as systemd reads its services' notifications."""


class ReadyCollector:
    """A notification socket for the supervisor's workers: they send READY=1 to it (their
    ``NOTIFY_SOCKET``: :attr:`path`) as they would to systemd. :meth:`read` reads every
    message for as long as the workers run (their queue must not fill, or their next
    ``notify`` would find it full) and keeps the pid of each READY=1's sender, as the kernel
    gives it (SO_PASSCRED), not as a message says; :meth:`wait` waits for the workers running
    now. Whoever reads it is stopped before :meth:`close`.

    The socket is ``notify`` in a private directory (mode 0700) of the temporary directory,
    ``kvgevent-notify-<pid>-<random>``: only its user can send to it. A supervisor killed by
    SIGKILL leaves its directory behind; the next one started removes those of its user
    whose supervisor is gone (:func:`_remove_leftovers`). When that path cannot be bound (a
    TMPDIR too long for a Unix socket's 108 bytes, a TMPDIR that does not exist), a name in
    Linux's abstract namespace (``@kvgevent-notify-<pid>-<random>``), which any local process
    may send to: only the workers' pids count, but any user can keep its queue full (ten
    datagrams) and so drop a worker's one READY=1 (an attacker's pass, when the abstract
    name came first: systemd never heard READY=1, 5 of 5 runs). OSError if neither can be
    bound, or without SO_PASSCRED (not Linux): the supervisor then runs without (logged)."""

    def __init__(self) -> None:
        self._sock = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, _passcred(), 1)
            self.path, self._directory = _bind_notify_socket(self._sock)
        except OSError:
            self._sock.close()
            raise
        self.ready: set[int] = set()  # the pids that sent READY=1 (see forget)
        self._heard = gevent.event.Event()  # set at each READY=1

    def read(self) -> None:
        """Read every message until the socket is closed; note each READY=1's sender."""
        while True:
            message, ancillary, _, _ = self._sock.recvmsg(4096, socket.CMSG_SPACE(UCRED.size))
            pid = _sender(ancillary)
            if pid is not None and b"READY=1" in message.split(b"\n"):
                self.ready.add(pid)
                self._heard.set()

    def forget(self, pid: int) -> bool:
        """``pid`` exited: its READY=1 no longer stands for its slot (its replacement's must
        come); whether it had sent one. Before, READY=1 messages were counted: a worker
        restarted after it listened counted twice, and systemd heard READY=1 with another
        worker not listening yet."""
        ready = pid in self.ready
        self.ready.discard(pid)
        return ready

    def wait(self, pids: Callable[[], Collection[int]], timeout: float) -> bool:
        """Wait until every pid of ``pids()`` (the workers running now: asked again at each
        READY=1, restarts replace them) has sent READY=1 (True), or ``timeout`` seconds
        (False). :meth:`read` must be running."""
        deadline = time.monotonic() + timeout
        while not set(pids()) <= self.ready:
            self._heard.clear()
            if not self._heard.wait(deadline - time.monotonic()):
                return False
        return True

    def close(self) -> None:
        self._sock.close()
        if self._directory is None:  # (an abstract name: nothing on disk)
            return
        for path in (self.path, self._directory):
            try:
                os.rmdir(path) if path == self._directory else os.unlink(path)
            except OSError:
                pass


def _passcred() -> int:
    """SO_PASSCRED; OSError where the system has none."""
    option = getattr(socket, "SO_PASSCRED", None)
    if option is None:
        raise OSError(errno.ENOTSUP, "no SO_PASSCRED: the senders of notifications cannot be told apart")
    return int(option)


def _sender(ancillary: list[tuple[int, int, bytes]]) -> int | None:
    """The pid in a datagram's SCM_CREDENTIALS, if any."""
    for level, kind, data in ancillary:
        credentials = level == socket.SOL_SOCKET and kind == getattr(socket, "SCM_CREDENTIALS", None)
        if credentials and len(data) >= UCRED.size:
            return int(UCRED.unpack_from(data)[0])
    return None


def _bind_notify_socket(sock: socket.socket) -> tuple[str, str | None]:
    """Bind ``sock`` to a new private path, else to a new abstract name; return its
    ``NOTIFY_SOCKET`` form and the directory to remove at close (None for an abstract name).
    OSError if neither can be bound."""
    prefix = f"{NOTIFY_DIRECTORY}{os.getpid()}-"
    with contextlib.suppress(OSError):  # (a TMPDIR that cannot be listed: none removed)
        _remove_leftovers(tempfile.gettempdir())
    try:
        directory: str | None = tempfile.mkdtemp(prefix=prefix)
    except OSError:  # (TMPDIR missing or read-only)
        directory = None
    if directory is not None:
        path = os.path.join(directory, "notify")
        try:
            sock.bind(path)
            return path, directory
        except OSError:  # ("AF_UNIX path too long": a long TMPDIR)
            os.rmdir(directory)
    name = f"{prefix}{secrets.token_hex(8)}"
    sock.bind("\0" + name)
    return "@" + name, None


NOTIFY_DIRECTORY = "kvgevent-notify-"
"""The start of a supervisor's private directory's name; its pid follows, then a dash."""


def _remove_leftovers(parent: str) -> None:
    """Remove the notification directories in ``parent`` that supervisors of this user killed
    by SIGKILL left (their pid runs no process now), with their socket. Another user's, or
    one whose pid runs a process (its supervisor, or a process given the same pid since),
    is left alone; so is anything in it but the socket. (The pids are this pid namespace's:
    a TMPDIR shared with a container's supervisors of the same user could lose a running
    one's directory, and its workers' READY=1 with it.)"""
    for name in os.listdir(parent):
        if not name.startswith(NOTIFY_DIRECTORY):
            continue
        pid = name[len(NOTIFY_DIRECTORY) :].split("-", 1)[0]
        if not pid.isdigit() or _runs(int(pid)):
            continue
        directory = os.path.join(parent, name)
        try:
            if os.lstat(directory).st_uid != os.getuid():
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, "notify"))
            os.rmdir(directory)
        except OSError:  # (not a directory, not empty, gone meanwhile: left as it is)
            continue


def _runs(pid: int) -> bool:
    """Whether a process has pid ``pid`` (of any user)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (another user's)
        return True
    return True
