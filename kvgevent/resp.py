"""A lean, auto-pipelining Redis connection for the Redis store's hot path.

redis-py costs about 150 µs of CPU per pipeline here: with 50 clients each sending one
request at a time, a worker did 6,500 requests/s over a local Redis whose round trip is about
30 µs (measured with bench/redis_bench.py). So the store hands its batches to a
:class:`Dispatcher`: every batch queued while a round trip is in flight goes out together in
the next one, on one of a few connections, encoded by hand (RESP) and parsed by hiredis.

A request is one client's batch; its replies come back in order. A connection that fails
makes every request of its round trip fail with the error (the store turns that into
``ERR store unavailable``); the next round trip reconnects.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

import gevent
from gevent.event import AsyncResult
from gevent.queue import Queue

MAX_ROUND_TRIP = 2000
"""Commands one round trip may carry (several clients' batches together)."""


def pack(args: Sequence[bytes]) -> bytes:
    """One command in RESP: ``*<n>`` then ``$<len>`` and each argument."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
    return b"".join(parts)


class RespConnection:
    """One socket to Redis (connected on first use); ``round_trip`` sends commands in one
    write and returns their replies (hiredis ReplyError instances for error replies)."""

    def __init__(
        self, host: str, port: int, db: int, password: str | None, username: str | None, timeout: float
    ) -> None:
        self.address = (host, port)
        self.db, self.password, self.username, self.timeout = db, password, username, timeout
        self.sock: Any = None
        self.reader: Any = None

    def round_trip(self, payload: bytes, count: int) -> list[Any]:
        if self.sock is None:
            self._connect()
        try:
            self.sock.sendall(payload)
            return self._replies(count)
        except BaseException:
            self.close()  # a half-read stream cannot be reused
            raise

    def _replies(self, count: int) -> list[Any]:
        replies: list[Any] = []
        reader = self.reader
        while len(replies) < count:
            reply = reader.gets()
            if reply is False:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("Redis closed the connection")
                reader.feed(data)
                continue
            replies.append(reply)
        return replies

    def _connect(self) -> None:
        import hiredis

        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock, self.reader = sock, hiredis.Reader()
        setup: list[list[bytes]] = []
        if self.password is not None:
            auth = (
                [self.password.encode()]
                if self.username is None
                else [self.username.encode(), self.password.encode()]
            )
            setup.append([b"AUTH", *auth])
        if self.db:
            setup.append([b"SELECT", str(self.db).encode()])
        if setup:
            for reply in self.round_trip(b"".join(pack(c) for c in setup), len(setup)):
                if isinstance(reply, Exception):
                    self.close()
                    raise ConnectionError(f"Redis refused the connection setup: {reply}")

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.reader = None


class _Request:
    __slots__ = ("payload", "count", "result")

    def __init__(self, payload: bytes, count: int) -> None:
        self.payload, self.count, self.result = payload, count, AsyncResult()


class Dispatcher:
    """Sends queued requests in shared round trips over ``connections`` connections."""

    def __init__(self, make_connection: Any, connections: int = 4) -> None:
        self._queue: Queue = Queue()
        self._closed = False
        self._connections = [make_connection() for _ in range(connections)]
        self._senders = [gevent.spawn(self._send_loop, c) for c in self._connections]

    def execute(self, commands: Sequence[Sequence[bytes]]) -> list[Any]:
        """Send ``commands`` (in a round trip shared with other callers); wait for their
        replies, in order. Raises what the connection raised if the round trip failed, and
        ConnectionError once the dispatcher is closed."""
        if self._closed:
            raise ConnectionError("the Redis dispatcher is closed")
        request = _Request(b"".join([pack(c) for c in commands]), len(commands))
        self._queue.put(request)
        return request.result.get()  # type: ignore[no-any-return]

    def _send_loop(self, connection: RespConnection) -> None:
        queue = self._queue
        while True:
            batch = [queue.get()]
            count = batch[0].count
            while count < MAX_ROUND_TRIP and not queue.empty():
                request = queue.get_nowait()
                batch.append(request)
                count += request.count
            try:
                replies = connection.round_trip(b"".join(r.payload for r in batch), count)
            except BaseException as exc:  # GreenletExit too (close()): nobody may wait forever
                failure = exc if isinstance(exc, Exception) else ConnectionError("the dispatcher closed")
                for request in batch:
                    request.result.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                continue
            start = 0
            for request in batch:
                request.result.set(replies[start : start + request.count])
                start += request.count

    def close(self) -> None:
        """Stop: requests in flight and queued fail with ConnectionError, later ones too."""
        self._closed = True
        for sender in self._senders:
            sender.kill()
        while not self._queue.empty():
            self._queue.get_nowait().result.set_exception(ConnectionError("the dispatcher closed"))
        for connection in self._connections:
            connection.close()
