"""The gevent I/O of kvgevent: accepting clients, reading requests, writing replies.

Shape: a ``gevent.server.StreamServer`` spawns one reader greenlet per client through a
``gevent.pool.Pool`` (so :meth:`KeyValueServer.close` can stop them). Each client has a
bounded ``gevent.queue.Queue`` of reply lines feeding one writer greenlet, started on the
first reply (an idle or write-only client costs no writer). The protocol is parsed by the
pure :mod:`kvgevent.protocol`; values live in a :class:`~kvgevent.store.KVStore`.

Ownership: the reader greenlet owns its client's socket and is the only one that closes it;
the writer never closes it, it records a failure and shuts the socket down so that a reader
blocked in ``recv`` wakes up.

Full queues: a reply that finds its client's queue full first waits up to
:data:`~kvgevent.config.DROP_GRACE` for room (yielding lets the writer drain; gevent's
``recv`` does not yield while data is ready, so without this a fast pipelining client that
reads promptly would lose replies). If the queue is still full the client is not reading:
that reply and every further one that finds the queue full is dropped and counted, without
waiting, until the queue has room again (one ``messages_dropping`` log event per episode).
"""

from __future__ import annotations

import itertools
import socket
import time
from typing import Any

import gevent
import gevent.event
from gevent.greenlet import Greenlet
from gevent.pool import Group, Pool
from gevent.queue import Full, Queue
from gevent.server import StreamServer

from .config import (
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_MAX_LINE,
    DEFAULT_PORT,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SHUTDOWN_FLUSH,
    DROP_GRACE,
    EOF_FLUSH_STALL,
    MAX_SEND_BATCH,
    RECV_SIZE,
)
from .errors import KVError, ProtocolError
from .logs import get_logger
from .protocol import PONG, Delete, Get, LineBuffer, Ping, Put, Stats, Update, parse, stats_line, value_line
from .store import KVStore, MemoryStore

_EOF = object()
"""Queue sentinel: the writer sends everything queued before it, then exits."""


class _Closing(Exception):
    """Thrown into reader greenlets by :meth:`KeyValueServer.close`."""


class Connection:
    """One client: its socket, its reply queue and writer, its counters. No logic of its own
    beyond queueing a reply; the server drives it."""

    __slots__ = (
        "client_id",
        "peer",
        "sock",
        "queue",
        "buffer",
        "writer",
        "reader",
        "log",
        "reading",
        "dropping",
        "messages_dropped",
        "bytes_sent",
        "failed",
    )

    def __init__(
        self, client_id: int, peer: str, sock: Any, queue_size: int, max_line: int, log: Any
    ) -> None:
        self.client_id = client_id
        self.peer = peer
        self.sock = sock
        self.queue: Queue = Queue(queue_size)
        self.buffer = LineBuffer(max_line)
        self.writer: Greenlet | None = None
        self.reader: Greenlet = gevent.getcurrent()  # type: ignore[assignment]
        self.log = log
        self.reading = True  # False once the reader stopped reading and is flushing
        self.dropping = False  # inside an episode of dropped replies
        self.messages_dropped = 0
        self.bytes_sent = 0
        self.failed: str | None = None  # why writing failed, once it has


class KeyValueServer:
    """The p0 key-value server on gevent.

    >>> server = KeyValueServer(MemoryStore())
    >>> server.start(0)            # returns once listening; OSError if the port is taken
    >>> server.port, server.count_active(), server.count_dropped()
    >>> server.close()             # idempotent; returns when every client is closed

    Everything runs in the caller's gevent hub: the server serves while the caller's greenlet
    waits (``gevent.sleep``, a gevent socket, ``Event.wait``...).
    """

    def __init__(
        self,
        store: KVStore | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_line: int = DEFAULT_MAX_LINE,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_line < 1:
            raise ValueError("max_line must be at least 1")
        self.store = store if store is not None else MemoryStore()
        self.queue_size = queue_size
        self.max_line = max_line
        self.backlog = backlog
        self.log = get_logger()
        self._server: StreamServer | None = None
        self._pool = Pool()
        self._writers = Group()
        self._conns: dict[int, Connection] = {}
        self._ids = itertools.count(1)
        self._started_at = time.monotonic()
        self._closing = False
        self._closed = gevent.event.Event()
        self._flush_deadline = 0.0
        # counters for STATS
        self._dropped = 0
        self._accepted = 0
        self._messages_dropped = 0
        self._commands = 0
        self._errors = 0

    # --- public API -------------------------------------------------------------------------

    def start(self, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> None:
        """Bind and listen on ``host:port`` (0 = any free port) and start accepting clients.

        Returns once the socket listens. Raises OSError if the address cannot be bound, and
        RuntimeError if the server was started before."""
        if self._server is not None:
            raise RuntimeError("a KeyValueServer can be started only once")
        server = StreamServer((host, port), self._handle, backlog=self.backlog, spawn=self._pool)
        server.start()
        self._server = server
        self._started_at = time.monotonic()
        self.log.info(
            "server_started", host=host, port=self.port, queue_size=self.queue_size, max_line=self.max_line
        )

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        return self._server.server_port

    def count_active(self) -> int:
        """Clients connected now."""
        return len(self._conns)

    def count_dropped(self) -> int:
        """Clients that have disconnected (for any reason) since the server started."""
        return self._dropped

    def stats(self) -> dict[str, int]:
        """The counters of ``STATS``. May raise StoreError (``keys`` asks the store)."""
        return {
            "active": len(self._conns),
            "dropped": self._dropped,
            "messages_dropped": self._messages_dropped,
            "keys": self.store.count_keys(),
            "commands": self._commands,
            "errors": self._errors,
            "connections": self._accepted,
            "uptime_s": int(time.monotonic() - self._started_at),
        }

    def close(self, flush_timeout: float = DEFAULT_SHUTDOWN_FLUSH) -> None:
        """Stop accepting, close every client, and return when all are closed.

        Replies already queued get up to ``flush_timeout`` seconds to be sent; then every
        remaining reader and writer is killed. Idempotent: a second call (also a concurrent
        one) returns once the first has finished."""
        if self._closing:
            self._closed.wait()
            return
        self._closing = True
        self._flush_deadline = time.monotonic() + flush_timeout
        if self._server is not None:
            self._server.close()  # stops accepting and closes the listening socket
        for conn in list(self._conns.values()):
            if conn.reading:
                conn.reader.kill(_Closing, block=False)
        self._pool.join(timeout=flush_timeout + 1.0)
        self._pool.kill(block=True, timeout=1.0)
        self._writers.kill(block=True, timeout=1.0)
        self.store.close()
        self.log.info(
            "server_stopped",
            dropped=self._dropped,
            connections=self._accepted,
            commands=self._commands,
            messages_dropped=self._messages_dropped,
        )
        self._closed.set()

    # --- one client -------------------------------------------------------------------------

    def _handle(self, sock: Any, address: Any) -> None:
        """Serve one client until it disconnects; the socket is closed when this returns."""
        peer = f"{address[0]}:{address[1]}"
        client_id = next(self._ids)
        conn = Connection(
            client_id,
            peer,
            sock,
            self.queue_size,
            self.max_line,
            self.log.bind(client_id=client_id, peer=peer),
        )
        self._conns[conn.client_id] = conn
        self._accepted += 1
        conn.log.info("client_connected", active=len(self._conns))
        reason = "closed"
        error: str | None = None
        try:
            # Replies are small and sent once per batch: Nagle would only delay them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._closing:
                raise _Closing
            reason = self._read_loop(conn)
        except _Closing:
            reason = "server_shutdown"
        except ConnectionResetError:
            reason = "reset"
        except OSError as exc:
            reason = "socket_error"
            error = exc.strerror or type(exc).__name__
        except gevent.GreenletExit:  # close() gave up waiting and killed the reader
            reason = "server_shutdown"
            raise
        except Exception:
            reason = "internal_error"
            conn.log.exception("client_error")
        finally:
            conn.reading = False
            try:
                if conn.failed is None:
                    self._flush(conn)
            except _Closing:
                pass
            finally:
                self._drop(conn, conn.failed or reason, error)

    def _read_loop(self, conn: Connection) -> str:
        """Read, parse and execute requests until end of stream; return the drop reason."""
        recv = conn.sock.recv
        feed = conn.buffer.feed
        execute = self._execute
        while True:
            data = recv(RECV_SIZE)
            if not data:
                return "closed"
            items = feed(data)
            if items:
                execute(conn, items)
            if len(data) == RECV_SIZE:
                # More is probably waiting, and gevent's recv would return it without
                # yielding: give the writer and the other clients their turn first.
                gevent.sleep(0)

    def _execute(self, conn: Connection, items: list[bytes | ProtocolError]) -> None:
        """Apply parsed requests in order; the one place where errors become ``ERR`` lines."""
        store = self.store
        send = self._send
        errors = 0
        self._commands += len(items)  # counted up front, so a STATS in this batch sees them
        for item in items:
            cmd = parse(item) if item.__class__ is bytes else item
            kind = cmd.__class__
            try:
                if kind is Get:
                    key = cmd.key  # type: ignore[union-attr]
                    for value in store.get(key):
                        send(conn, value_line(key, value))
                elif kind is Put:
                    store.put(cmd.key, cmd.value)  # type: ignore[union-attr]
                elif kind is Update:
                    store.update(cmd.key, cmd.old, cmd.new)  # type: ignore[union-attr]
                elif kind is Delete:
                    store.delete(cmd.key)  # type: ignore[union-attr]
                elif kind is Ping:
                    send(conn, PONG)
                elif kind is Stats:
                    send(conn, stats_line(self.stats()))
                else:  # a ProtocolError, returned by the parser (or the line buffer)
                    errors += 1
                    send(conn, cmd.reply)  # type: ignore[union-attr]
            except KVError as exc:  # raised by the store
                errors += 1
                send(conn, exc.reply)
        self._errors += errors

    def _send(self, conn: Connection, line: bytes) -> None:
        """Queue one reply line for ``conn`` (see the module docstring for a full queue)."""
        if conn.failed is not None:
            return  # the client is gone: nothing can reach it
        queue = conn.queue
        if not queue.full():
            queue.put_nowait(line)
            if conn.writer is None:
                conn.writer = self._writers.spawn(self._write_loop, conn)
            conn.dropping = False
            return
        if not conn.dropping:
            try:
                queue.put(line, timeout=DROP_GRACE)
                return
            except Full:
                conn.dropping = True
                conn.log.warning(
                    "messages_dropping", queue_size=self.queue_size, messages_dropped=conn.messages_dropped
                )
        conn.messages_dropped += 1
        self._messages_dropped += 1

    def _write_loop(self, conn: Connection) -> None:
        """The writer greenlet: send queued lines in batches of up to MAX_SEND_BATCH bytes,
        one ``sendall`` per batch, until the _EOF sentinel or a socket error."""
        queue = conn.queue
        sendall = conn.sock.sendall
        try:
            while True:
                line = queue.get()
                if line is _EOF:
                    return
                waiting = queue.qsize()
                if not waiting:
                    sendall(line)
                    conn.bytes_sent += len(line)
                    continue
                batch = [line]
                size = len(line)
                eof = False
                for _ in range(waiting):
                    line = queue.get_nowait()
                    if line is _EOF:
                        eof = True
                        break
                    batch.append(line)
                    size += len(line)
                    if size >= MAX_SEND_BATCH:
                        break
                sendall(b"".join(batch))
                conn.bytes_sent += size
                if eof:
                    return
        except OSError as exc:
            conn.failed = (
                "reset" if isinstance(exc, (ConnectionResetError, BrokenPipeError)) else "write_error"
            )
            while not queue.empty():  # free a reader waiting for room
                queue.get_nowait()
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader if it is in recv
            except OSError:
                pass

    def _flush(self, conn: Connection) -> None:
        """Let the writer send what is queued, then stop it.

        Gives up when the client accepts no bytes for EOF_FLUSH_STALL seconds, or, during
        shutdown, at the close() deadline."""
        writer = conn.writer
        if writer is None or writer.dead:
            return
        queued_eof = False
        while not writer.dead:
            wait = EOF_FLUSH_STALL
            if self._closing:
                wait = min(wait, self._flush_deadline - time.monotonic())
                if wait <= 0:
                    break
            sent = conn.bytes_sent
            if not queued_eof:
                try:
                    conn.queue.put(_EOF, timeout=wait)
                    queued_eof = True
                    continue
                except Full:
                    pass
            else:
                writer.join(wait)
            if not writer.dead and conn.bytes_sent == sent:
                break  # no progress: the client is not reading
        writer.kill(block=True)

    def _drop(self, conn: Connection, reason: str, error: str | None = None) -> None:
        """Close the client's socket, count it as dropped and log it; exactly once."""
        if self._conns.pop(conn.client_id, None) is None:
            return
        self._dropped += 1
        try:
            conn.sock.close()
        except OSError:
            pass
        extra = {"error": error} if error else {}
        conn.log.info(
            "client_dropped",
            reason=reason,
            active=len(self._conns),
            dropped=self._dropped,
            messages_dropped=conn.messages_dropped,
            **extra,
        )
