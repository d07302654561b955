"""The gevent I/O of kvgevent: accepting clients, reading requests, applying them.

Shape: a ``gevent.server.StreamServer`` spawns one reader greenlet per client through a
``gevent.pool.Pool`` (so :meth:`KeyValueServer.close` can stop them). A plain TCP client that
is quiet (it has sent nothing yet, or nothing for a while) is left without one: its read
watcher makes the next when it sends (*dormant*: :meth:`KeyValueServer._wake`). Each client is a
:class:`~kvgevent.server.connection.Connection`: a bounded queue of reply lines feeding one
writer greenlet (see there for what happens when it is full), and a
:class:`~kvgevent.server.session.Session` that applies its requests (sans I/O). Requests are
parsed by the pure :mod:`kvgevent.protocol`; values live in a
:class:`~kvgevent.stores.base.KVStore`. The read loop here is the one place where the
session's replies meet the queue and where its waits happen.

Fairness: a read of up to TURN_BYTES (a request or a few) is applied as soon as it arrives,
unless the client's last turn held the loop for HEAVY_TURN; a bigger read (a backlog), and
the next read of such a heavy client, is applied a turn at a time, each turn queued behind the
other clients' (:mod:`kvgevent.server.turns`); a turn also ends after TURN_WORK of work. So a
client sending faster than the server can apply, or sending expensive commands, cannot starve
the others.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import os
import socket
import ssl
import time
from collections.abc import Callable
from time import perf_counter
from typing import Any

import gevent
import gevent.event
from gevent.lock import Semaphore
from gevent.pool import Group, Pool
from gevent.server import StreamServer

from kvgevent.config import (
    ACCEPT_FAILED_QUIET,
    AUTH_MAX_LINE,
    AUTH_SWEEP_INTERVAL,
    CONNECTION_COST,
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_PORT,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_SHUTDOWN_FLUSH,
    EOF_FLUSH_STALL,
    FINAL_REPORT_TIMEOUT,
    HEAVY_HOST_MEMORY,
    HEAVY_HOSTS_MAX,
    HEAVY_TURN,
    MAX_SEND_BATCH,
    PRE_AUTH_LINE_COST,
    READER_IDLE,
    READER_PATIENCE_MAX,
    RECV_SIZE,
    REFUSED_LINGER,
    REFUSED_LINGER_MAX,
    REJECTED_QUIET,
    REPLY_CHUNK,
    REPORT_INTERVAL,
    TLS_CONNECTION_COST,
    TLS_HANDSHAKE_TIMEOUT,
    TLS_RECORDS_PER_TURN,
    TURN_BYTES,
    WRITER_IDLE,
    WRITER_TRIM_MIN,
)
from kvgevent.errors import KVError, ProtocolError
from kvgevent.fastio import Dormant
from kvgevent.logs import get_logger
from kvgevent.protocol import NEWLINE
from kvgevent.server.auth_throttle import AuthThrottle
from kvgevent.server.connection import (
    DISCARD_READ,
    DISCARD_READS,
    INPUT_ENDED,
    INPUT_FAILED,
    Connection,
    discard_input,
)
from kvgevent.server.counters import Counters
from kvgevent.server.episodes import Episode
from kvgevent.server.memory import MemoryGuard, release_free_memory, release_memory_loop
from kvgevent.server.net import PausingListener, is_loopback, reuse_port_listener, worker_name
from kvgevent.server.session import (
    NEXT_TURN,
    Chunk,
    Close,
    Dropped,
    Durable,
    Holding,
    Room,
    Session,
    Shared,
    Sleep,
)
from kvgevent.server.turns import Turns
from kvgevent.stores.base import STORE_WAIT, KVStore
from kvgevent.stores.memory import MemoryStore
from kvgevent.timings import Timings
from kvgevent.tls import TlsStream

ERR_MAX_CLIENTS = ProtocolError("max clients reached")


def store_name(store: KVStore) -> str:
    """The ``store`` label of the metrics: memory, aof or redis (or the class's name)."""
    return {"MemoryStore": "memory", "DurableStore": "aof", "RedisStore": "redis"}.get(
        type(store).__name__, type(store).__name__
    )


class _Closing(Exception):
    """Thrown into reader greenlets by :meth:`KeyValueServer.close`."""


def _drained(sock: Any) -> bool:
    """Read and throw away what a refused client has sent so far (at most DISCARD_READS
    reads: this runs in the accept loop), without waiting: True while its connection stays
    open, False once its input ended or failed (closing it is then no reset)."""
    try:
        for _ in range(DISCARD_READS):
            if not os.read(sock.fileno(), DISCARD_READ):
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    return True  # (more coming: read by the linger, or reset by the close)


class _Idle(Exception):
    """Thrown into the reader of a client idle for longer than ``idle_timeout``."""


class _Closed(Exception):
    """The session closed the client (its :class:`~kvgevent.server.session.Close`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_REASONS: dict[type[BaseException], str] = {
    _Closing: "server_shutdown",
    _Idle: "idle",
}


def drop_reason(exc: BaseException, handshaking: bool) -> tuple[str, str | None]:
    """Why a client's reader ended, from the exception that ended it (and whether the TLS
    handshake was still under way): the reason of its ``client_dropped`` event and the error
    to log with it. The one place reasons are decided; a failure the writer recorded
    (``Connection.failed``: reset, write_error, memory_limit) is decided where it happens and
    wins over this one."""
    if isinstance(exc, _Closed):
        return exc.reason, None
    reason = _REASONS.get(type(exc))
    if reason is not None:
        return reason, None
    if type(exc) is gevent.Timeout:  # (the handshake's: the only one around a reader's work)
        return "tls_handshake_timeout", f"no TLS handshake within {TLS_HANDSHAKE_TIMEOUT:g} s"
    if isinstance(exc, ssl.SSLError):
        return "tls_handshake_failed" if handshaking else "tls_error", getattr(exc, "reason", None) or str(
            exc
        )
    if not isinstance(exc, OSError):
        return "internal_error", None
    # The OS's text for the errno: gevent raises some with a phrase of its own ("File
    # descriptor was closed in another greenlet", its socket closed under a waiting reader).
    error = None if isinstance(exc, ConnectionResetError) else os_text(exc)
    if handshaking:
        return "tls_handshake_failed", error
    return ("reset", None) if error is None else ("socket_error", error)


def os_text(exc: OSError) -> str:
    """What the OS says of ``exc``'s errno (its own text, not the raiser's), else its message."""
    if exc.errno:
        try:
            return os.strerror(exc.errno)
        except ValueError:
            pass
    return exc.strerror or type(exc).__name__


def _throw_if_waiting(reader: Any, exc: type[Exception]) -> None:
    """Raise ``exc`` in ``reader`` if it is suspended (started, not finished)."""
    if reader.gr_frame is not None:
        reader.throw(exc)


def _close_if_waiting(conn: Connection) -> None:
    """At shutdown: raise :class:`_Closing` in ``conn``'s reader if it waits for the client's
    input. One in the middle of a batch (a Redis round trip, the disk's fsync for a PING, a
    turn, room for its replies) is left to finish it, until the flush's deadline: those
    replies are owed (they were thrown away, uncounted, and the PUT waiting on Redis never
    made, in an auditor's runs; a client reading a 40 MB reply at 10 to 30 MB/s got 20 to
    28 of its 40 lines, cut at the signal with --shutdown-flush 10, an attacker's pass), and
    it sees the shutdown at the batch's end (:meth:`KeyValueServer._execute`)."""
    reader = conn.reader
    if reader.gr_frame is not None and not conn.executing:
        reader.throw(_Closing)


class _Listener(PausingListener):
    """gevent's StreamServer, spawning the handler itself (in the pool) rather than through
    gevent's wrapper that calls it with ``*args`` and closes the socket after it: that call
    runs one more interpreter loop on the C stack, and an idle client's greenlet keeps a copy
    of its C stack (bench/OPTIMISATIONS.md, "a connection's cost"). The socket is closed here
    as gevent's wrapper would, whatever the handler did, unless the handler returned True
    (its client went dormant: the reader made for it later closes it). An accept() failing
    for want of files or memory pauses accepting (:class:`PausingListener`).

    ``full(pending)`` says whether a client accepted now would be one too many, counting the
    ``pending`` ones accepted but not yet handled; such a one is refused at once, in the
    accept loop (``reject(sock, address, pending)``, then closed), not in a greenlet of its own: in a
    burst of connects gevent accepts up to ``max_accept`` before any handler runs, and the
    sockets kept open only to be refused took the files the margin under the open files
    limit keeps for others (FD_RESERVE: accept_failed, EMFILE, in an attacker's pass)."""

    def __init__(
        self, *args: Any, full: Callable[[int], bool], reject: Callable[[Any, Any, int], bool], **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._full, self._reject = full, reject
        self._pending = 0  # accepted, their handler not started yet

    def do_handle(self, *args: Any) -> None:
        if self._full(self._pending):
            kept = False  # (the refusal keeps the socket a moment, closing it itself)
            try:
                kept = self._reject(args[0], args[1], self._pending)  # (the socket, its address)
            finally:
                if not kept:
                    self.do_close(*args)
            return
        self._pending += 1
        # (the handler as it is now: a close() before the greenlet starts takes _handle away)
        handle = self._handle  # type: ignore[attr-defined]  # (gevent's BaseServer: the handler given)
        try:
            self._spawn(self._serve_socket, handle, *args)  # type: ignore[attr-defined]  # (gevent's BaseServer: the pool's spawn)
        except BaseException:
            self._pending -= 1
            self.do_close(*args)
            raise

    def _serve_socket(self, handle: Callable[[Any, Any], bool], sock: Any, address: Any) -> None:
        self._pending -= 1
        dormant = False
        try:
            dormant = handle(sock, address)
        finally:
            if not dormant:  # (a dormant client's socket stays open: its next reader closes it)
                sock.close()


class KeyValueServer:
    """The p0 key-value server on gevent.

    >>> server = KeyValueServer(MemoryStore())
    >>> server.start(0)            # returns once listening; OSError if the port is taken
    >>> server.port, server.count_active(), server.count_dropped()
    >>> server.close()             # idempotent; returns when every client is closed

    Everything runs in the caller's gevent hub: the server serves while the caller's greenlet
    waits (``gevent.sleep``, a gevent socket, ``Event.wait``...). Options are the limits of
    :mod:`kvgevent.config`; ``password`` requires ``AUTH:<password>`` first; ``tls`` (a server
    ``ssl.SSLContext``, see :func:`kvgevent.tls.server_context`) makes every client speak TLS.
    """

    def __init__(
        self,
        store: KVStore | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_line: int = DEFAULT_MAX_LINE,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        password: str | bytes | None = None,
        tls: ssl.SSLContext | None = None,
        backlog: int = DEFAULT_BACKLOG,
        reuse_port: bool = False,
        max_memory: int = DEFAULT_MAX_MEMORY,
    ) -> None:
        for name, value in (
            ("queue_size", queue_size),
            ("queue_bytes", queue_bytes),
            ("max_line", max_line),
            ("max_clients", max_clients),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")
        if max_memory < 0:
            raise ValueError("max_memory must be 0 (no limit) or positive")
        self.store = store if store is not None else MemoryStore()
        self._store_waits = self.store.waits_elsewhere  # (STORE_WAIT read around each batch)
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.max_line = max_line
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self.backlog = backlog
        self.reuse_port = reuse_port  # several processes on one port (SO_REUSEPORT)
        # (os.fsencode: a password from argv or the environment may hold bytes not UTF-8)
        self._password = os.fsencode(password) if isinstance(password, str) else password
        self._tls = tls
        self.log = get_logger()
        self.counters = Counters()
        self._server: StreamServer | None = None
        self._pool = Pool()
        self._writers = Group()
        self._sweeper: gevent.Greenlet | None = None
        self._turns = Turns()
        self._conns: dict[int, Connection] = {}
        self._heavy_hosts: dict[str, float] = {}  # address -> until when it starts heavy
        cost = CONNECTION_COST + (TLS_CONNECTION_COST if tls is not None else 0)
        self.memory = MemoryGuard(max_memory, self.store, self._conns.__len__, self.log, cost)
        self.auth_throttle = AuthThrottle()
        self._shared = Shared(
            self.store, self.counters, self._password, self.stats, self.memory, self.auth_throttle, self.log
        )
        self._chunk = (min(REPLY_CHUNK, queue_size), min(MAX_SEND_BATCH, queue_bytes))
        # Before AUTH a line may hold a password's AUTH line (and a telnet \r), not much more.
        auth_line = len(b"AUTH:") + len(self._password or b"") + 1
        self._auth_max_line = min(max(AUTH_MAX_LINE, auth_line), max_line)
        self._auth_sweeper: gevent.Greenlet | None = None
        self._guard: gevent.Greenlet | None = None
        self._janitor: gevent.Greenlet | None = None
        self._writer_sweeper: gevent.Greenlet | None = None
        self._reader_sweeper: gevent.Greenlet | None = None
        self._reporter: gevent.Greenlet | None = None
        self._rejecting = Episode()  # clients refused over --max-clients
        # Refused clients kept open a moment for their ERR (_refuse): their greenlets, killed
        # by close (each closes its socket).
        self._refused = Group()
        self._rejecting_watch: gevent.Greenlet | None = None  # ends that episode once quiet
        self._accept_failing = Episode()  # accept() failing for want of files or memory
        self._accept_watch: gevent.Greenlet | None = None  # ends that episode once quiet
        self._worker = worker_name()
        self._reported = 0  # dropped clients already published to a shared store
        self._ids = itertools.count(1)
        self._dormant = 0  # clients with no reader greenlet now (Connection.retire_reader)
        self._started_at = time.monotonic()
        self.started_at = time.time()  # (Unix time, for the metrics)
        self.batch_seconds = Timings()  # time to apply a batch, by its first request's class
        self.barrier_seconds = Timings()  # a PING's wait for durability
        self.store_name = store_name(self.store)
        self._monitor: Any = None  # the HTTP listener of serve_metrics()
        self._closing = False
        self._closed = gevent.event.Event()
        self._flush_deadline = 0.0

    # --- public API -------------------------------------------------------------------------

    def start(self, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST) -> None:
        """Bind and listen on ``host:port`` (0 = any free port) and start accepting clients.

        Returns once the socket listens. Raises OSError if the address cannot be bound, and
        RuntimeError if the server was started before."""
        if self._server is not None:
            raise RuntimeError("a KeyValueServer can be started only once")
        listener: Any = (host, port)
        if self.reuse_port:
            listener = reuse_port_listener(host, port, self.backlog)
        server = _Listener(
            listener,
            self._handle,
            backlog=None if self.reuse_port else self.backlog,
            spawn=self._pool,
            failing=self.accept_failed,
            full=lambda pending: len(self._conns) + pending >= self.max_clients,
            reject=lambda sock, address, pending: self._reject(sock, f"{address[0]}:{address[1]}", pending),
        )
        server.start()
        self._server = server
        self._started_at = time.monotonic()
        if self.idle_timeout > 0:
            self._sweeper = gevent.spawn(self._sweep_idle)
        if self._password is not None:
            self._auth_sweeper = gevent.spawn(self._sweep_auth_throttle)
        self._janitor = gevent.spawn(release_memory_loop, lambda: self.counters.dropped, self.log)
        self._writer_sweeper = gevent.spawn(self._release_idle, WRITER_IDLE, Connection.retire_writer)
        # Not on a TLS server: a client yet to finish its handshake reads through the bare
        # socket too, and a reader made again would skip the handshake (plain text served).
        if self._tls is None:
            self._reader_sweeper = gevent.spawn(self._release_idle, READER_IDLE, Connection.retire_reader)
        if self.store.shared:
            self._reporter = gevent.spawn(self._report_clients)
        self.memory.calibrate()
        if self.memory.limit:
            self._guard = gevent.spawn(self.memory.run, self._evict)
            if self.memory.used() + CONNECTION_COST > self.memory.limit:  # (a first client's writes: refused)
                self.log.warning(
                    "max_memory_below_start",
                    maxmemory=self.memory.limit,
                    used_memory=self.memory.used(),
                    hint="the process uses this much once started (with --workers, each "
                    "worker; over Redis the data is not counted): every PUT and UPDATE is "
                    "refused; raise --max-memory",
                )
        bound = server.address[0]
        self.log.info(
            "server_started",
            host=bound,
            port=self.port,
            tls=self._tls is not None,
            auth=self._password is not None,
            queue_size=self.queue_size,
            queue_bytes=self.queue_bytes,
            max_line=self.max_line,
            max_clients=self.max_clients,
            idle_timeout=self.idle_timeout,
            max_memory=self.memory.limit,
        )
        if not is_loopback(bound) and self._password is None:
            self.log.warning(
                "unprotected_bind",
                host=bound,
                port=self.port,
                hint="anyone who can reach this address can read and write every key; "
                "set --password (and --tls-cert/--tls-key)",
            )

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when started with port 0)."""
        if self._server is None:
            raise RuntimeError("the server is not started")
        port = self._server.server_port
        assert port is not None  # (bound: start() returned)
        return port

    def count_active(self) -> int:
        """Clients connected now."""
        return len(self._conns)

    def count_dormant(self) -> int:
        """Clients connected now with no reader greenlet: quiet since they connected, or since
        their reader was released."""
        return self._dormant

    def count_dropped(self) -> int:
        """Clients that have disconnected (for any reason) since the server started."""
        return self.counters.dropped

    def serve_metrics(self, port: int, host: str = DEFAULT_HOST) -> int:
        """Serve Prometheus metrics, /healthz and /readyz over HTTP on ``host:port`` (0: any
        free port; see :mod:`kvgevent.server.monitor`), in this hub; returns the port.
        Raises OSError if it cannot bind. Stopped by :meth:`close`."""
        from kvgevent.server.monitor import Monitor  # (prometheus_client: only when asked for)

        monitor = Monitor(self, self.log)
        monitor.start(port, host)
        self._monitor = monitor
        self.log.info("metrics_listening", host=host, port=monitor.port)
        return monitor.port

    def not_ready(self) -> str | None:
        """Why the server cannot serve now (one line, for /readyz), or None: the listener is
        not up, it is stopping, or the store says why."""
        if self._server is None or not self._server.started:
            return "not listening"
        if self._closing:
            return "shutting down"
        return self.store.not_ready()

    def stats(self) -> dict[str, int]:
        """The counters of ``STATS``. Those only the store can give (``keys``; with a shared
        store the cluster-wide ones) are left out while it cannot answer (a Redis outage), as
        the metrics leave ``kvgevent_keys`` out: the rest, ``store_nodes_down`` among them, is
        what an operator needs then."""
        c = self.counters
        return {
            "active": len(self._conns),
            "dormant": self._dormant,
            "dropped": c.dropped,
            "messages_dropped": c.messages_dropped,
            **_from_store(lambda: {"keys": self.store.count_keys()}),
            "commands": c.commands,
            "errors": c.errors,
            "connections": c.accepted,
            "rejected": c.rejected,
            "accept_failures": c.accept_failures,
            "auth_failures": c.auth_failures,
            "auth_throttled": c.auth_throttled,
            "idle_closed": c.idle_closed,
            "lines_too_long": c.lines_too_long,
            "uptime_s": int(time.monotonic() - self._started_at),
            **self.memory.stats(),
            **self.store.stats(),
            **(
                _from_store(lambda: self.store.cluster_stats(self._worker, len(self._conns)))
                if self.store.shared
                else {}
            ),
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
        try:
            self._flush_deadline = time.monotonic() + flush_timeout
            if self._server is not None:
                self._server.close()  # stops accepting and closes the listening socket
            helpers = (
                self._sweeper,
                self._janitor,
                self._reporter,
                self._guard,
                self._auth_sweeper,
                self._writer_sweeper,
                self._rejecting_watch,
                self._accept_watch,
                self._reader_sweeper,
            )
            for helper in helpers:
                if helper is not None:
                    helper.kill()
            self._refused.kill()
            self._close_clients(flush_timeout)
            if self.store.shared:
                self._publish_final_counts()
            self.store.close()
            self._turns.close()
            if self._monitor is not None:
                self._monitor.close()
            self._end_rejecting()
            self._end_accept_failures()
            c = self.counters
            self.log.info(
                "server_stopped",
                dropped=c.dropped,
                connections=c.accepted,
                commands=c.commands,
                messages_dropped=c.messages_dropped,
                rejected=c.rejected,
            )
        finally:
            self._closed.set()  # even if something above failed: a later close() must not hang

    def _close_clients(self, flush_timeout: float) -> None:
        """Close every client: those waiting for input at once, those in the middle of a
        batch once it is done (:func:`_close_if_waiting`), each flushed until the deadline;
        then a batch still under way (waiting on the store, or for room for its replies) is
        interrupted, and after one more second whatever is left is killed."""
        for conn in list(self._conns.values()):
            if conn.reading:
                gevent.get_hub().loop.run_callback(_close_if_waiting, conn)
            elif conn.dormant:
                self._wake(conn, _Closing())
        self._pool.join(timeout=flush_timeout)
        for conn in list(self._conns.values()):
            if conn.reading:
                self._interrupt(conn, _Closing)
        self._pool.join(timeout=1.0)
        self._pool.kill(block=True, timeout=1.0)
        self._writers.kill(block=True, timeout=1.0)

    # --- one client -------------------------------------------------------------------------

    def _handle(self, sock: Any, address: Any) -> bool:
        """Serve one client until it disconnects or goes dormant (returns True: its socket
        stays open); otherwise the socket is closed when this returns. (One over
        --max-clients never comes here: the listener refused it in its accept loop, counting
        the clients accepted before it.)"""
        peer = f"{address[0]}:{address[1]}"
        conn = self._connect(sock, address, peer)
        first: Exception | None = None
        try:
            # Replies are small and sent once per batch: Nagle would only delay them.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Nothing sent yet: no reader greenlet until it is, as for a client gone quiet (a
            # parked reader is most of what an idle client costs; bench/OPTIMISATIONS.md,
            # "dormant from the start"). Not over TLS: a reader made later skips the handshake.
            quiet = self._tls is None and not conn.io.has_input()
        except OSError as exc:  # (a client gone already: dropped as its first read would)
            first, quiet = exc, False
        if quiet and self._go_dormant(conn):  # (False: the server closes; served as usual)
            # Its first request earns no patience (see _wake): its reader has the patience of
            # one made at accept (one released after a quiet spell and woken had twice that).
            conn.patience = 0
            return True
        return self._run_reader(conn, first, handshaking=self._tls is not None)

    def _wake(self, conn: Connection, first: Exception | None = None) -> None:
        """A dormant client sent something (called by its read watcher, in the hub), or must
        go (``first``: the exception its new reader starts by raising): make its reader."""
        conn.io.stop_waking()  # type: ignore[attr-defined]  # (dormant: a FastSocket)
        conn.dormant = False
        self._dormant -= 1
        conn.reading = True
        if first is None:  # woken by its client: wait longer before releasing it again
            # (0: dormant since it connected, its first request: the patience it starts with)
            conn.patience = min(conn.patience * 2, READER_PATIENCE_MAX) or 1
        conn.reader = self._pool.spawn(self._run_reader, conn, first, False)

    def _interrupt(self, conn: Connection, exc: type[Exception]) -> None:
        """Make the client's reader raise ``exc`` where it waits (close, idle timeout), once
        this greenlet yields: only if it still waits then. A reader ending meanwhile (it was
        being retired, or its client went) is left alone, where gevent's ``kill`` would throw
        into the dead greenlet, an error in the hub; a reader made by :meth:`_wake` that has
        not started yet sees ``_closing`` or its data when it does."""
        gevent.get_hub().loop.run_callback(_throw_if_waiting, conn.reader, exc)

    def _run_reader(self, conn: Connection, first: Exception | None, handshaking: bool) -> bool:
        """The reader greenlet's life: serve the client until it disconnects, then drop it;
        or, when it went quiet and was retired (:class:`~kvgevent.fastio.Dormant`), leave
        its read watcher to make a new reader (:meth:`_wake`) and return True."""
        reason, error = "closed", None
        dormant = False
        try:
            try:
                self._read(conn, first, handshaking)
            except Dormant:
                dormant = self._go_dormant(conn)
                if dormant:
                    return True
                # Why it must go instead (a failure meanwhile, recorded in conn.failed, wins).
                raise (_Closing if self._closing or conn.reading else _Idle) from None
        except gevent.GreenletExit:  # close() gave up waiting and killed the reader
            reason = "server_shutdown"
            raise
        except (Exception, gevent.Timeout) as exc:  # (a gevent Timeout is a BaseException)
            reason, error = drop_reason(exc, handshaking and conn.stream is conn.io)  # (not yet TLS)
            if reason == "internal_error":
                conn.log.exception("client_error")
            elif reason == "idle":
                self.counters.idle_closed += 1
        finally:
            if not dormant:
                self._end_reader(conn, reason, error)
        return False

    def _read(self, conn: Connection, first: Exception | None, handshaking: bool) -> None:
        if self._closing:
            raise _Closing
        if first is not None:
            raise first
        if handshaking:
            self._start_tls(conn)
        self._read_loop(conn)

    def _go_dormant(self, conn: Connection) -> bool:
        """The reader was retired: leave the client's read watcher to make the next one, or
        return False if the client must go instead: it failed, the server closes, or the
        idle timeout's sweep took it in the same pass (``reading`` is False then: the
        exception it queued finds this reader ended)."""
        if conn.failed is not None or self._closing or not conn.reading:
            return False
        conn.dormant = True
        self._dormant += 1
        conn.reading = False
        conn.io.wake_on_readable(functools.partial(self._wake, conn))  # type: ignore[attr-defined]  # (retired: a FastSocket)
        return True

    def _end_reader(self, conn: Connection, reason: str, error: str | None) -> None:
        """Flush what is queued (unless writing failed) and drop the client; the lines of a
        big reply it will never get, left unbuilt, count as dropped."""
        conn.reading = False
        if conn.session.abandoned:
            conn.count_lost(conn.session.abandoned)
            conn.session.abandoned = 0
        try:
            if conn.failed is None:
                # (no lingering close for a password guesser: nothing it is owed is worth 2 s
                # of a file and a place under --max-clients)
                deadline = self._flush_deadline if self._closing else None
                conn.flush(EOF_FLUSH_STALL, deadline, linger=reason != "auth_failures")
        except (_Closing, _Idle):  # delivered late, while flushing: the client goes anyway
            pass
        finally:
            self._drop(conn, conn.failed or reason, error)

    def _connect(self, sock: Any, address: Any, peer: str) -> Connection:
        """A new client's Connection and Session, counted and logged (``client_connected``)."""
        client_id = next(self._ids)
        conn = Connection(
            client_id,
            peer,
            sock,
            host=address[0],
            queue_size=self.queue_size,
            queue_bytes=self.queue_bytes,
            max_line=self.max_line,
            log=self.log,
            counters=self.counters,
            writers=self._writers,
            guard=self.memory,
        )
        conn.session = Session(self._shared, client_id, peer, address[0], self.max_line, self._chunk)
        if self._heavy_hosts and self._heavy_hosts.get(address[0], 0.0) > time.monotonic():
            conn.heavy = True  # (its address's last connection ended heavy: HEAVY_HOST_MEMORY)
        if not conn.session.authenticated:
            conn.buffer.max_line = conn.session.max_line = self._auth_max_line
        self._conns[client_id] = conn
        self.counters.accepted += 1
        conn.log.info("client_connected", active=len(self._conns))
        return conn

    def _reject(self, sock: Any, peer: str, pending: int = 0) -> bool:
        """Over --max-clients: say why (plain TCP only) and close (:meth:`_refuse`); True
        if the socket is kept a moment and closed by this server, else the caller closes it
        now. Every refusal is counted; the first of an episode is logged
        (``client_rejected``; ``active`` counts the ``pending`` clients, accepted but not yet
        handled), the episode's end too, REJECTED_QUIET after the last refusal or at shutdown
        (``client_rejected_ended``)."""
        self.counters.rejected += 1
        kept = False
        if self._tls is None:
            try:
                sock.send(ERR_MAX_CLIENTS.reply)  # a few bytes into an empty buffer: never blocks
            except OSError:
                pass
            else:  # (an ERR reply as any other: STATS errors, kvgevent_errors_total{reason})
                self.counters.count_error(ERR_MAX_CLIENTS.reason)
                kept = self._refuse(sock)
        if self._rejecting.note():
            self._log_rejecting(peer, pending)
        return kept

    def _refuse(self, sock: Any) -> bool:
        """After the ERR of a refused client: its input read and thrown away, then closed by
        the caller (False), or, with fewer than REFUSED_LINGER_MAX kept, its write side shut
        and the socket kept for REFUSED_LINGER until its client closes (True): closed with
        input unread or coming, it is reset, which throws the ERR away before the client
        reads it."""
        if not _drained(sock) or len(self._refused) >= REFUSED_LINGER_MAX:
            return False
        try:
            sock.shutdown(socket.SHUT_WR)  # (the ERR, then its end)
        except OSError:
            return False
        self._refused.spawn(self._close_refused, sock)
        return True

    def _close_refused(self, sock: Any) -> None:
        """Keep a refused client's socket until its client closes it or REFUSED_LINGER has
        passed, throwing away what it sends; then close it."""
        fd, deadline = sock.fileno(), time.monotonic() + REFUSED_LINGER
        try:
            # (a wait before each DISCARD_READS reads: a client sending without pause held
            # the loop for the whole linger, a reviewer's flood: PING p50 0.4 -> 13.8 ms)
            while (left := deadline - time.monotonic()) > 0:
                if discard_input(fd, left, False) in (INPUT_ENDED, INPUT_FAILED):
                    break
        finally:
            with contextlib.suppress(OSError):
                sock.close()

    def _log_rejecting(self, peer: str, pending: int) -> None:
        self.log.warning(
            "client_rejected",
            peer=peer,
            reason="max_clients",
            active=len(self._conns) + pending,
            rejected=self.counters.rejected,
        )
        self._rejecting_watch = gevent.spawn(
            self._end_when_quiet, self._rejecting, REJECTED_QUIET, self._end_rejecting
        )

    @staticmethod
    def _end_when_quiet(episode: Episode, quiet: float, end: Callable[[], None]) -> None:
        """Wait until ``episode`` had no occurrence for ``quiet`` seconds, then ``end()`` it."""
        while (left := quiet - episode.quiet()) > 0:
            gevent.sleep(left)
        end()

    def _end_rejecting(self) -> None:
        """Log the end of an episode of refusals, if one is open (``client_rejected_ended``)."""
        ended = self._rejecting.end()
        if ended is not None:
            self.log.info(
                "client_rejected_ended",
                refused=ended.occurrences,
                seconds=ended.seconds,
                active=len(self._conns),
                rejected=self.counters.rejected,
            )

    def accept_failed(self, exc: OSError) -> None:
        """accept() failed for want of files or memory (the listener pauses, then retries;
        the metrics listener's too: one process lacks the files):
        counted, and logged once per episode (``accept_failed``), whose end is logged
        ACCEPT_FAILED_QUIET after the last failure."""
        self.counters.accept_failures += 1
        if not self._accept_failing.note():
            return
        self.log.warning(
            "accept_failed",
            errno=exc.errno,
            errno_name=errno.errorcode.get(exc.errno or 0, "?"),
            error=exc.strerror,
            active=len(self._conns),
            accept_failures=self.counters.accept_failures,
            hint="clients wait in the listen backlog until files are freed: "
            "raise the open files limit (LimitNOFILE=) or lower --max-clients",
        )
        self._accept_watch = gevent.spawn(
            self._end_when_quiet, self._accept_failing, ACCEPT_FAILED_QUIET, self._end_accept_failures
        )

    def _end_accept_failures(self) -> None:
        """accept() has not failed for ACCEPT_FAILED_QUIET (or the server stops): log the
        episode's end, if one is open (``accept_failed_ended``)."""
        ended = self._accept_failing.end()
        if ended is not None:
            self.log.info(
                "accept_failed_ended",
                failures=ended.occurrences,
                seconds=ended.seconds,
                active=len(self._conns),
                accept_failures=self.counters.accept_failures,
            )

    def _start_tls(self, conn: Connection) -> None:
        # Over the connection's own socket I/O, so that progress is counted for TLS too.
        stream = TlsStream(conn.io, self._tls, server_side=True, lock_factory=Semaphore)  # type: ignore[arg-type]  # (conn.io has what TlsStream uses of a socket: recv, sendall)
        with gevent.Timeout(TLS_HANDSHAKE_TIMEOUT):
            stream.handshake()
        conn.last_seen = time.monotonic()  # (it sent its handshake: the idle timeout starts now)
        conn.stream = stream

    def _read_loop(self, conn: Connection) -> None:
        """Read, parse and apply requests until end of stream, or until the connection fails
        (its writer could not send, or it was disconnected for memory). A read of up to
        TURN_BYTES is applied at once, unless the client's last turn was heavy; a bigger one
        (a backlog) a turn at a time."""
        if not conn.session.authenticated:
            rest = self._read_until_authenticated(conn)
            if rest is None:
                return
            if rest:
                self._apply_rest(conn, rest)
        self._serve(conn)

    def _apply_rest(self, conn: Connection, rest: bytes) -> None:
        """What a client sent after its AUTH line in the same read: applied at once when it
        is a small read's worth (TURN_BYTES), as :meth:`_serve` applies a small read; a
        backlog otherwise. (Queued for a turn, it waited behind every client with a backlog:
        a client pipelining AUTH with its first commands, as ``nc`` and p0's clients do,
        waited 0.45 s beside 300 flooding clients, 3 s beside 1,000, an attacker's pass.)"""
        if len(rest) > TURN_BYTES or conn.heavy:
            self._apply_backlog(conn, rest)
            return
        if conn.failed is not None:  # (its AUTH's reply could not be sent)
            return
        items = conn.buffer.feed(rest)
        conn.note_input()
        if items:
            conn.session.work = 0  # a new turn's work, as in _serve
            self._execute(conn, items)

    def _serve(self, conn: Connection) -> None:
        """The read loop of an authenticated client (see :meth:`_read_loop`)."""
        recv = conn.stream.recv if conn.stream is conn.io else self._tls_reads(conn)
        feed = conn.buffer.feed
        execute = self._execute
        session = conn.session
        track_idle = self.idle_timeout > 0
        while conn.failed is None:
            data = recv(RECV_SIZE)
            if not data:
                return
            if track_idle:
                conn.last_seen = time.monotonic()
            if len(data) > TURN_BYTES:
                self._apply_backlog(conn, data)
            else:
                items = feed(data)
                if conn.input_held or data[-1] != NEWLINE:  # (else nothing is held, nor was)
                    conn.note_input()
                if items:
                    if conn.heavy and not self._wait_turn(conn):  # its last turn held the loop
                        return
                    session.work = 0  # a new turn
                    execute(conn, items)
                del items
            # Hold nothing while waiting for the next read: what a client that went quiet
            # pins is its incomplete line alone, counted (--max-memory), not its last read.
            data = b""

    def _wait_turn(self, conn: Connection) -> bool:
        """Queue for the client's next turn, as a backlog does; False if it failed meanwhile."""
        self._turns.wait()
        return conn.failed is None

    def _apply_backlog(self, conn: Connection, data: bytes) -> None:
        """Apply a big read (a client with a backlog) a turn at a time, each turn queued
        behind the other clients' (gevent's recv never yields while data is ready, so
        without this one flooding client would hold the loop)."""
        feed = conn.buffer.feed
        worked = True
        for start in range(0, len(data), TURN_BYTES):
            if worked:
                self._turns.wait()
                conn.session.work = 0
                if conn.failed is not None:
                    return
            items = feed(data[start : start + TURN_BYTES])
            conn.note_input()
            worked = bool(items)
            if worked:
                self._execute(conn, items)

    def _read_until_authenticated(self, conn: Connection) -> bytes | None:
        """Serve a client that has not authenticated yet, one line at a time, with the small
        line bound; once a line authenticates it, restore --max-line and return what was
        read after that line (b"" if nothing), or None at end of stream or failure. Line by
        line, so that requests pipelined behind the AUTH are split with the full bound."""
        session = conn.session
        recv = conn.stream.recv if conn.stream is conn.io else self._tls_reads(conn)
        while conn.failed is None:
            data = recv(RECV_SIZE)
            if not data:
                return None
            if self.idle_timeout > 0:
                conn.last_seen = time.monotonic()
            rest = self._apply_lines(conn, data)
            if session.authenticated:
                conn.buffer.max_line = session.max_line = self.max_line
                return rest
        return None

    def _tls_reads(self, conn: Connection) -> Callable[[int], bytes]:
        """The ``recv`` of ``conn``'s TLS stream, which queues for a turn, as a backlog does,
        after a read that decrypted more than TLS_RECORDS_PER_TURN records (whatever they
        held: each cost a call into the TLS engine). A read of more than TURN_BYTES is left
        to the backlog's own turns. The plain path's loop is untouched."""
        stream = conn.stream
        turns = self._turns

        def recv(size: int) -> bytes:
            data = stream.recv(size)
            if stream.records > TLS_RECORDS_PER_TURN and len(data) <= TURN_BYTES:
                turns.wait()
            return data

        return recv

    def _apply_lines(self, conn: Connection, data: bytes) -> bytes:
        """Apply ``data`` a line at a time until the session is authenticated (taking turns
        every TURN_BYTES, a line costing at least PRE_AUTH_LINE_COST); returns what comes
        after the authenticating line (b"" if it is the last, or none did)."""
        start, size, done = 0, len(data), 0
        while start < size and conn.failed is None:
            if done >= TURN_BYTES:
                self._turns.wait()
                done = 0
            end = data.find(b"\n", start) + 1 or size  # (offsets: no copy of the rest per line)
            items = conn.buffer.feed(data[start:end] if start or end < size else data)
            done += max(end - start, PRE_AUTH_LINE_COST)
            start = end
            conn.note_input()
            if items:
                conn.session.work = 0
                self._execute(conn, items)
                if conn.session.authenticated:
                    return data[start:]
        return b""

    def _execute(self, conn: Connection, items: list[Any]) -> None:
        """Apply ``items`` through the client's session, carrying out each action it yields
        (:mod:`kvgevent.server.session`): this and the read loop are where replies meet the
        connection's queue and where a session's waits happen. Timed: a batch that held the
        loop for HEAVY_TURN makes its client heavy; with metrics, every batch goes into the
        histogram."""
        waits = self._store_waits
        waited = STORE_WAIT.get() if waits else 0.0
        began = perf_counter()
        conn.executing = True
        try:
            actions = conn.session.handle(items)
            if actions.__class__ is list:  # the usual case: reply lines, and nothing to wait for
                if actions:
                    conn.send_lines(actions)
            else:
                self._drive(conn, actions)
        finally:
            conn.executing = False
        if self._closing:  # (close() let this batch finish: see _close_if_waiting)
            raise _Closing
        elapsed = perf_counter() - began
        # This client's waits on the store (Redis round trips) did not hold the loop.
        conn.heavy = (elapsed - (STORE_WAIT.get() - waited) if waits else elapsed) >= HEAVY_TURN
        if self._monitor is not None:  # (kept only for a scrape: not paid without one)
            self.batch_seconds.observe(elapsed, conn.session.verb)

    def _drive(self, conn: Connection, actions: Any) -> None:
        """Carry out a session's actions until it is done."""
        try:
            action = next(actions)
            while True:
                if action.__class__ is list:  # reply lines: by far the most frequent
                    conn.send_lines(action)
                    action = next(actions)
                else:
                    action = actions.send(self._carry_out(conn, action))
        except StopIteration:
            return
        except BaseException:  # the client goes mid-actions (shutdown, eviction, a reset)
            actions.close()  # (now, so that a big reply's unbuilt lines are counted: see _end_reader)
            raise

    def _carry_out(self, conn: Connection, action: Any) -> Any:
        """One action other than reply lines; returns what the session is sent back."""
        kind = action.__class__
        if kind is Room:
            return conn.reserve(action.lines, action.size)
        if kind is Chunk:
            conn.put_reserved(action.data, action.lines)
        elif kind is Holding:
            conn.hold(action.size)
        elif action is NEXT_TURN:
            self._turns.wait()
        elif kind is Durable:
            began = perf_counter()
            try:
                self.store.barrier(action.position)
            except KVError as exc:
                return exc
            finally:
                self.barrier_seconds.observe(perf_counter() - began)
        elif kind is Dropped:
            conn.drop_unbuilt(action.lines)
        elif kind is Sleep:  # (an AUTH held back: a shutdown interrupts it, as a read)
            conn.executing = False
            try:
                gevent.sleep(action.seconds)
            finally:
                conn.executing = True
        elif kind is Close:
            raise _Closed(action.reason)
        else:
            raise TypeError(f"not a session action: {action!r}")
        return None

    def _evict(self, excess: int, floor: int) -> int:
        """Disconnect the clients holding the most buffered bytes (at least ``floor`` each),
        as ``Connection.holding`` counts them (a prompt reader's queue, no more than the
        pressed queue: what it holds beyond drains by itself, and is taken off ``excess``),
        until they held ``excess`` bytes (reason ``memory_limit``); returns how many."""
        now = time.monotonic()
        held = [(conn.holding(now), conn) for conn in self._conns.values() if conn.failed is None]
        excess -= sum(conn.buffered() - holding for holding, conn in held)  # (given back by themselves)
        held.sort(key=lambda pair: pair[0], reverse=True)
        evicted = 0
        for size, conn in held:
            if excess <= 0 or size < floor:
                break
            conn.abort("memory_limit")
            excess -= size
            evicted += 1
        return evicted

    def _sweep_idle(self) -> None:
        """Close clients that sent nothing for ``idle_timeout`` seconds, unless they are taking
        replies (:meth:`Connection.receiving`: a long reply read at the client's pace); checked
        twice per timeout, at most once a second."""
        period = min(1.0, self.idle_timeout / 2)
        while True:
            gevent.sleep(period)
            now = time.monotonic()
            limit = now - self.idle_timeout
            tls = self._tls is not None
            for conn in list(self._conns.values()):
                if tls and conn.stream is conn.io:  # (handshaking: its own timeout holds)
                    continue
                if conn.last_seen < limit and (taking := conn.receiving()) is not False:
                    if taking:  # (None: it is looked at again at the next sweep)
                        conn.last_seen = now
                    continue
                if conn.reading and conn.last_seen < limit:
                    if not conn.awaiting_input():  # (its requests wait for the server)
                        conn.last_seen = now
                        continue
                    conn.reading = False
                    self._interrupt(conn, _Idle)
                elif conn.dormant and conn.last_seen < limit:
                    self._wake(conn, _Idle())

    def _release_idle(self, period: float, release: Callable[[Connection], bool]) -> None:
        """Every ``period``, ``release(conn)`` for every client (``Connection.retire_writer``,
        ``Connection.retire_reader``: each says whether it released a greenlet); after many
        in one pass, give the freed memory back to the OS. Runs until killed."""
        while True:
            gevent.sleep(period)
            released = 0
            for conn in self._conns.values():  # (nothing here yields: the dict cannot change)
                released += release(conn)
            if released >= WRITER_TRIM_MIN:
                gevent.sleep(0)  # (the released greenlets end first)
                release_free_memory()

    def _sweep_auth_throttle(self) -> None:
        """Every AUTH_SWEEP_INTERVAL, forget addresses that stopped sending wrong passwords,
        logging the end of each throttling episode (``auth_throttle_ended``)."""
        while True:
            gevent.sleep(AUTH_SWEEP_INTERVAL)
            for address in self.auth_throttle.sweep():
                self.log.info(
                    "auth_throttle_ended",
                    host=address.host,
                    seconds=round(address.ended_at - (address.throttled_since or 0.0), 3),
                    auth_failures=address.failures,
                    auth_delayed=address.delayed,
                    auth_refused=address.refused,
                )

    def _report_clients(self) -> None:
        """Every REPORT_INTERVAL, publish this worker's counts to the shared store (so that
        STATS on any worker can give cluster-wide totals)."""
        while True:
            self._publish_counts()
            gevent.sleep(REPORT_INTERVAL)

    def _publish_final_counts(self) -> None:
        """The last report at close (the last drops, and this worker leaves the table), given
        at most FINAL_REPORT_TIMEOUT: a stalled Redis must not hold the shutdown for the whole
        ``--redis-timeout`` (a worker under ``--workers`` would be killed first)."""
        timeout = gevent.Timeout(FINAL_REPORT_TIMEOUT)
        try:
            with timeout:
                self._publish_counts(final=True)
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            self.log.warning(
                "final_report_abandoned",
                timeout=FINAL_REPORT_TIMEOUT,
                hint="Redis did not answer; this worker stops counting in cluster_active by itself",
            )

    def _publish_counts(self, final: bool = False) -> None:
        dropped = self.counters.dropped
        try:
            self.store.report_clients(self._worker, len(self._conns), dropped - self._reported, final)
            self._reported = dropped
        except KVError:
            pass  # the store logged its outage; the delta goes out with the next report

    def _drop(self, conn: Connection, reason: str, error: str | None = None) -> None:
        """Close the client's socket, count it as dropped and log it; exactly once."""
        if self._conns.pop(conn.client_id, None) is None:
            return
        if conn.heavy:
            self._remember_heavy(conn.host)
        self.counters.dropped += 1
        self.counters.dropped_by[reason] = self.counters.dropped_by.get(reason, 0) + 1
        conn.release()
        conn.close()
        extra = {"error": error} if error else {}
        conn.log.info(
            "client_dropped",
            reason=reason,
            active=len(self._conns),
            dropped=self.counters.dropped,
            messages_dropped=conn.messages_dropped,
            **extra,
        )

    def _remember_heavy(self, host: str) -> None:
        """New connections from ``host`` start heavy for HEAVY_HOST_MEMORY (bounded by
        HEAVY_HOSTS_MAX addresses)."""
        hosts, now = self._heavy_hosts, time.monotonic()
        if len(hosts) >= HEAVY_HOSTS_MAX:
            for name in [name for name, until in hosts.items() if until <= now]:
                del hosts[name]
            if len(hosts) >= HEAVY_HOSTS_MAX:
                hosts.clear()
        hosts[host] = now + HEAVY_HOST_MEMORY


def _from_store(figures: Callable[[], dict[str, int]]) -> dict[str, int]:
    """``figures()``, the STATS figures only the store can give; none if it cannot answer now."""
    try:
        return figures()
    except KVError:
        return {}
