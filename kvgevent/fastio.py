"""Socket I/O cheaper than gevent's on the hot path: for a client connection of the server
(:class:`FastSocket`, which also reports how sending is going) and for a connection this
process makes with a timeout (:class:`TimedSocket`: the Redis store's).

gevent's ``socket.recv`` tries the read and, when nothing is there, catches the
``BlockingIOError`` and waits; ``socket.sendall`` is Python code that also asks the kernel for
SO_SNDBUF (a ``getsockopt`` syscall) on every call. At one request per round trip both costs
are paid per request (bench/OPTIMISATIONS.md, "gevent's recv and sendall").

:class:`FastSocket` waits on the socket's own read/write watchers (no new watcher per call)
with a bare greenlet switch (:func:`park`), waits for readability *before* reading when the
last read drained the socket, so no exception is raised, and sends on the underlying
non-blocking socket. It relies on attributes gevent has kept since 1.x (``_sock``,
``_read_event``, ``_write_event``); without them :class:`PlainSocket` does the same through
gevent's public ``recv``/``send``.

Both count the bytes the kernel accepted (``sent``) and, while a send waits for the kernel,
since when no byte left (``stalled_since``); :meth:`PlainSocket.acked` says how many of them
the client's side has acknowledged. The connection tells a client that does not read (no
progress for a while) from one that reads slowly, and a flush that makes progress from one
that does not. ``sent`` alone misleads there: the kernel wakes a blocked sender only once a
third of its send buffer is free, which takes seconds for a client reading a few hundred kB a
second, while the acknowledged count grows with every read the client makes.

:class:`TimedSocket` waits the same way with a deadline: a loop timer made once per socket is
started beside the io watcher (:func:`park_for`), where gevent's own timed wait makes a
``Timeout`` object, a ``Waiter`` and a ``getsockopt`` per ``sendall``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import socket
import struct
import termios
import time
from typing import Any

from gevent import get_hub, getcurrent

_OUTQ = getattr(termios, "TIOCOUTQ", None)
"""SIOCOUTQ on Linux: a TCP socket's bytes not yet acknowledged by the peer."""


def unread(sock: Any) -> int:
    """Bytes waiting in ``sock``'s receive queue (FIONREAD); 0 where unknown."""
    return _queued(sock, termios.FIONREAD) or 0


def unacknowledged(sock: Any) -> int | None:
    """Bytes ``sock`` has sent that the peer has not acknowledged, or None where unknown."""
    return None if _OUTQ is None else _queued(sock, _OUTQ)


def _queued(sock: Any, request: int) -> int | None:
    """The int an ioctl ``request`` on ``sock`` gives (a queue's length), None if it fails."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0"))[0])
    except (OSError, ValueError):
        return None


class PlainSocket:
    """recv/sendall over gevent's public socket API, with the progress counters."""

    __slots__ = ("sock", "sent", "stalled_since")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.sent = 0  # bytes the kernel accepted
        self.stalled_since = 0.0  # while a send waits: when the last byte left; 0.0 otherwise

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)

    def has_input(self) -> bool:
        """Whether a read would not wait (see :meth:`FastSocket.has_input`): not known here,
        so True."""
        return True

    def forget_reader(self) -> None:
        """Before the socket is closed (see :meth:`FastSocket.forget_reader`): nothing here."""

    def acked(self) -> int:
        """Bytes the client has acknowledged (``sent`` where the OS does not say): grows
        whenever the client reads, even while a blocked send is not woken yet."""
        pending = unacknowledged(self.sock)
        return self.sent - pending if pending is not None else self.sent

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        send = self.sock.send  # gevent's: waits until it can send some
        try:
            while view:
                self.stalled_since = time.monotonic()
                sent = send(view)
                self.sent += sent
                view = view[sent:]
        finally:
            self.stalled_since = 0.0


def park(watcher: Any, hub: Any) -> None:
    """Wait until ``watcher`` (a socket's own io watcher) fires, with a bare greenlet switch:
    the watcher calls the waiting greenlet's ``switch`` and the hub resumes it. gevent's own
    wait makes a ``Waiter`` and goes through ``Hub.wait`` for every wait, which cost more than
    the rest of a small request (bench/OPTIMISATIONS.md, "lean waits"). An exception thrown
    into the greenlet meanwhile (a kill, a timeout, gevent's ``cancel_wait`` when the socket
    is closed elsewhere: it throws into ``callback.__self__``) comes out of here, the watcher
    stopped either way: nothing is left started."""
    watcher.start(getcurrent().switch)
    try:
        hub.switch()
    finally:
        watcher.stop()


class Dormant(Exception):
    """Raised by :meth:`FastSocket.recv` in a reader retired while parked there
    (:meth:`FastSocket.retire_reader`)."""


_DORMANT = object()
"""What :meth:`FastSocket.retire_reader` passes to the parked reader's ``switch``."""

_EXPIRED = object()
"""What a timer started by :func:`park_for` passes to the parked greenlet's ``switch``."""


def park_for(watcher: Any, timer: Any, hub: Any) -> bool:
    """:func:`park` with a deadline: ``timer`` (a loop timer made once with the timeout as both
    ``after`` and ``repeat``) is armed beside ``watcher``; returns True if the watcher fired,
    False if the timer did first. Both are stopped either way, an exception thrown in
    meanwhile included. Armed with ``again``, which counts the full ``repeat`` each time:
    libev's ``start`` counts what was left of the last wait (nothing, once it fired)."""
    switch = getcurrent().switch
    watcher.start(switch)
    timer.again(switch, _EXPIRED, update=True)  # (the loop's time now, not its last turn's)
    try:
        return hub.switch() is not _EXPIRED
    finally:
        watcher.stop()
        timer.stop()


class FastSocket(PlainSocket):
    """recv/sendall for one gevent socket, used by one reader and one writer greenlet.

    It relies on these gevent interfaces (pinned by requirements.txt's gevent range, checked by
    tests/test_lean_waits.py::test_the_gevent_interfaces_the_lean_waits_use): a gevent socket's
    ``_sock`` (the non-blocking socket under it), ``_read_event`` and ``_write_event`` (its io
    watchers, with ``start(callback)``, ``stop()`` (which clears the callback), ``active`` and a
    ``callback`` that can be set while started), ``gevent.get_hub()``,
    ``Hub.switch`` and ``loop.run_callback`` (:meth:`retire_reader`).
    """

    __slots__ = ("_raw", "_hub", "_read_event", "_write_event", "_away", "_drained", "quiet")

    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        self._raw = sock._sock  # the non-blocking _socket.socket under gevent's wrapper
        self._hub = get_hub()
        self._read_event = sock._read_event
        self._write_event = sock._write_event
        # The read watcher's callback while no reader is parked in recv (see there): it only
        # stops the watcher. A partial, with no ``__self__``: gevent's ``cancel_wait`` (the
        # socket closed) throws into its callback's ``__self__``, a parked reader.
        self._away = functools.partial(self._read_event.stop)
        self._drained = True  # the last read returned less than asked: the socket is empty
        self.quiet = 0  # counted up by whoever watches for idle readers; 0 at each wake-up

    def parked_reading(self) -> bool:
        """Whether a greenlet is parked in :meth:`recv` now (its watcher started for it)."""
        watcher = self._read_event
        return bool(watcher.active) and watcher.callback is not self._away

    def forget_reader(self) -> None:
        """Before the socket is closed: stop the read watcher if no reader is parked on it
        (left started by :meth:`recv`), so that gevent closes the socket at once rather than
        after the loop's next turn. A parked reader's watcher stays: the close wakes it."""
        if self._read_event.callback is self._away:
            self._read_event.stop()

    def retire_reader(self, reader: Any) -> None:
        """Make ``reader``, parked in :meth:`recv` (:meth:`parked_reading`), raise
        :class:`Dormant` from it once this greenlet yields: its watcher is stopped at once, so
        that nothing but that wake-up can resume it first."""
        self._read_event.stop()
        self._hub.loop.run_callback(reader.switch, _DORMANT)

    def has_input(self) -> bool:
        """Whether a read would not wait: bytes are there or the client closed its side (a
        one-byte ``MSG_PEEK``: no byte is consumed). The socket's pending error (a reset)
        is raised, OSError, as a read would: the kernel reports it once, so it is the
        caller's to treat as that read's."""
        try:
            self._raw.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True

    def wake_on_readable(self, callback: Any) -> None:
        """Call ``callback()`` (in the hub) once the socket is readable, or shut down."""
        self._read_event.start(callback)

    def stop_waking(self) -> None:
        """Stop what :meth:`wake_on_readable` started. The socket is taken to be readable
        now (its callback ran, or it is closing): the next :meth:`recv` reads at once rather
        than waiting a loop iteration for the watcher to say so again; so a quiet spell ends
        here too (:attr:`quiet` back to 0), as at a wake-up in :meth:`recv`."""
        self._read_event.stop()
        self._drained = False
        self.quiet = 0

    def recv(self, size: int) -> bytes:
        """Like gevent's ``recv``: waits cooperatively for at least one byte (or EOF).

        After a wake-up the read watcher is left started, its callback :attr:`_away` (which
        only stops it, should the client send while the reader waits elsewhere), and the next
        wait here only sets its callback back. Stopped, then started again around a wait
        elsewhere (a Redis round trip, a write waiting for the disk), libev had the kernel
        re-add the socket to its epoll set: an ``epoll_ctl`` per request
        (bench/OPTIMISATIONS.md, "a watcher left started"). It is stopped on EOF, on an error,
        on an exception thrown into the wait, and by :meth:`forget_reader`."""
        while True:
            if self._drained:
                # Outside any except block: a wait inside one would keep the exception and
                # its traceback alive for as long as the client stays idle. (park() inline:
                # a call less per request, bench/OPTIMISATIONS.md, "calls per request".)
                watcher = self._read_event
                switch = getcurrent().switch
                if watcher.active:  # (left started: see above)
                    watcher.callback = switch
                else:
                    watcher.start(switch)
                try:
                    woken = self._hub.switch()
                except BaseException:
                    watcher.stop()
                    raise
                if woken is _DORMANT:  # (retire_reader stopped the watcher)
                    raise Dormant
                watcher.callback = self._away
                self.quiet = 0
            try:
                data = self._raw.recv(size)
            except BlockingIOError:
                self._drained = True
                continue
            except OSError:
                self._read_event.stop()
                raise
            if not data:  # (EOF: nothing more to wait for)
                self._read_event.stop()
            self._drained = len(data) < size
            return data

    def sendall(self, data: bytes) -> None:
        """Send everything: at once when the kernel takes it (the usual case), else piece by
        piece as the socket becomes writable."""
        raw = self._raw
        try:
            sent = raw.send(data)
        except BlockingIOError:
            sent = 0
        self.sent += sent
        if sent == len(data):
            return
        view = memoryview(data)[sent:]
        try:
            self.stalled_since = time.monotonic()
            while view:
                park(self._write_event, self._hub)
                try:
                    sent = raw.send(view)
                except BlockingIOError:
                    continue
                self.sent += sent
                view = view[sent:]
                self.stalled_since = time.monotonic()
        finally:
            self.stalled_since = 0.0


def wrap(sock: Any) -> PlainSocket:
    """A FastSocket for ``sock``, or a PlainSocket if gevent lacks the expected internals."""
    if all(hasattr(sock, name) for name in ("_sock", "_read_event", "_write_event")):
        return FastSocket(sock)
    return PlainSocket(sock)


class TimedSocket:
    """recv/sendall with a timeout on one connected gevent socket, used by one greenlet at a
    time (the Redis store's connections: a sender greenlet each), with gevent's socket's
    deadlines: a ``recv`` gives up after ``timeout`` seconds without a byte, a ``sendall``
    after ``timeout`` seconds in all, however slowly the peer reads; both with TimeoutError.
    It relies on FastSocket's gevent interfaces and on the loop's ``timer(after, repeat)``
    watchers (``again(callback, *args, update=True)``, ``stop()``, ``close()``). :meth:`close`
    closes the socket and the timer; a greenlet parked in a wait meanwhile gets gevent's
    ``cancel_wait`` error, and a call made after it raises OSError (EBADF), as a gevent
    socket's would."""

    __slots__ = ("sock", "timeout", "_raw", "_hub", "_read_event", "_write_event", "_timer", "_drained")

    def __init__(self, sock: Any, timeout: float) -> None:
        self.sock = sock
        self.timeout = timeout
        self._raw = sock._sock  # the non-blocking _socket.socket under gevent's wrapper
        self._hub = get_hub()
        self._read_event = sock._read_event
        self._write_event = sock._write_event
        self._timer: Any = self._hub.loop.timer(timeout, timeout)  # (see park_for); None once closed
        self._drained = True  # as FastSocket's: a request's reply is not there yet when sent

    def recv(self, size: int) -> bytes:
        """At least one byte (b"" at end of stream); TimeoutError after ``timeout`` without."""
        if self._drained:  # (the usual case: a request was just sent, its reply is on its way)
            self._wait(self._read_event, self._timer)
        while True:
            try:
                data = self._raw.recv(size)
                break
            except BlockingIOError:  # (rare: woken with nothing to read)
                self._wait(self._read_event, self._timer)
        self._drained = len(data) < size
        return data

    def _wait(self, watcher: Any, timer: Any) -> None:
        """Park until ``watcher`` fires; TimeoutError if ``timer`` does first, OSError (EBADF)
        once closed (a watcher started on a closed fd aborts libev)."""
        if self._timer is None:
            raise OSError(errno.EBADF, "the socket is closed")
        if not park_for(watcher, timer, self._hub):
            raise TimeoutError("timed out")

    def sendall(self, data: bytes) -> None:
        """Send everything; TimeoutError if it is not all sent within ``timeout``."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):  # (the usual request goes at once)
            self._send_rest(memoryview(data)[sent:], time.monotonic() + self.timeout)

    def _send_rest(self, view: memoryview, deadline: float) -> None:
        """Send ``view`` as the socket becomes writable, until ``deadline`` (monotonic)."""
        while view:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("timed out")
            timer = self._hub.loop.timer(remaining, remaining)  # (rare: a round trip of megabytes)
            try:
                self._wait(self._write_event, timer)
            finally:
                timer.close()
            try:
                view = view[self._raw.send(view) :]
            except BlockingIOError:
                continue

    def closed_by_peer(self) -> bool:
        """Whether the peer closed (or reset) the connection while it was idle: a look at the
        receive queue (MSG_PEEK, never a wait) finds its end. Unread bytes, or nothing yet:
        False."""
        try:
            return self._raw.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            return False
        except OSError:  # (reset)
            return True

    def close(self) -> None:
        if self._timer is not None:
            self._timer.close()
            self._timer = None
        self.sock.close()
