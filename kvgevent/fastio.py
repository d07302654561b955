"""Cheaper socket I/O for the hot path of plain-TCP clients, over gevent's socket internals.

gevent's ``socket.recv`` tries the read and, when nothing is there, catches the
``BlockingIOError`` and waits; ``socket.sendall`` is Python code that also asks the kernel for
SO_SNDBUF (a ``getsockopt`` syscall) on every call. At one request per round trip both costs
are paid per request: strace showed a failed ``recvfrom`` and a ``getsockopt`` per request,
and py-spy put the exception path and the wrappers at about a tenth of the server's time.

:class:`FastSocket` keeps gevent's waiting (the socket's own read/write watchers, so no new
watcher per call) but: waits for readability *before* reading when the last read drained the
socket, so no exception is raised; and sends on the underlying non-blocking socket, falling
back to gevent's ``sendall`` only for what the kernel did not take at once.

It relies on attributes gevent has kept since 1.x (``_sock``, ``_read_event``, ``_wait``);
:func:`wrap` returns None when they are missing, and the caller then uses the socket as is.
"""

from __future__ import annotations

from typing import Any


class FastSocket:
    """recv/sendall for one gevent socket, used by one reader and one writer greenlet."""

    __slots__ = ("sock", "_raw", "_wait", "_read_event", "_drained")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._raw = sock._sock  # the non-blocking _socket.socket under gevent's wrapper
        self._wait = sock._wait
        self._read_event = sock._read_event
        self._drained = True  # the last read returned less than asked: the socket is empty

    def recv(self, size: int) -> bytes:
        """Like gevent's ``recv``: waits cooperatively for at least one byte (or EOF)."""
        while True:
            if self._drained:
                # Outside any except block: a wait inside one would keep the exception and
                # its traceback alive for as long as the client stays idle.
                self._wait(self._read_event)
            try:
                data = self._raw.recv(size)
            except BlockingIOError:
                self._drained = True
                continue
            self._drained = len(data) < size
            return data

    def sendall(self, data: bytes) -> None:
        """Send everything: at once when the kernel takes it, else waiting through gevent."""
        try:
            sent = self._raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            self.sock.sendall(memoryview(data)[sent:])


def wrap(sock: Any) -> FastSocket | None:
    """A FastSocket for ``sock``, or None if this gevent does not have the expected internals."""
    if not all(hasattr(sock, name) for name in ("_sock", "_wait", "_read_event")):
        return None
    return FastSocket(sock)
