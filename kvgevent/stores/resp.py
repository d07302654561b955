"""A lean, auto-pipelining Redis connection for the Redis store's hot path.

redis-py costs far more CPU per pipeline than a local Redis takes to answer it (figures in
bench/OPTIMISATIONS.md, "redis-py's cost"). So the store hands its batches to a
:class:`Dispatcher`: every batch queued while a round trip is in flight goes out together in
the next one, on one of a few connections, encoded by hiredis and parsed by hiredis.

A request is one client's batch; its replies come back in order. A connection that fails
makes every request of its round trip fail with the error (the store turns that into
``ERR store unavailable``); the next round trip reconnects.

What a reply can be trusted for. A connection is used only once it is known to talk to a
Redis: it is closed if it is connected to itself (a local port with nothing listening can be
handed out as the connecting socket's own source port, and TCP then connects the socket to
itself: every command comes back as its "reply"), and its first round trip is a PING that
must be answered ``PONG``. Each reply must then be of the type its command returns (an array
for GET, an integer for APPEND...): a reply of another type fails the whole round trip with
:class:`ReplyMismatch` and closes the connection. Error replies (hiredis ``ReplyError``) are
returned as they are, for the store to map.

Reconnecting. After a failed connect a connection waits RECONNECT_MIN seconds, doubling up to
RECONNECT_MAX (with jitter: connections do not retry in step), before it tries again;
meanwhile its round trips fail at once with :class:`Unreachable`. When one of a dispatcher's
connections fails, its idle siblings are closed as well: after a Redis restart they would each
fail one round trip more (and start a new outage of the store). A connection that cannot
connect while a sibling serves takes no request (it tries again aside); one refused, or not
tried, with requests in hand gives them back to the queue for a sibling that may serve them
(:meth:`Dispatcher._connected_for`).
"""

from __future__ import annotations

import itertools
import random
import socket
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import gevent
import hiredis

from kvgevent.fastio import TimedSocket
from kvgevent.logs import Logger
from kvgevent.stores.redis_health import not_now

MAX_ROUND_TRIP = 128
"""Commands one round trip may carry (several clients' batches together). Small enough that a
burst of batches is split over several connections: Redis answers one round trip while the
worker builds the replies of another (one round trip of everything queued left the worker
idle a fifth of the time: bench/OPTIMISATIONS.md, "smaller round trips")."""

IDLE_CHECK = 0.25
"""Seconds a connection may sit idle before it is checked, when next used, for having been
closed by Redis meanwhile (Redis's ``timeout``, a CLIENT KILL, a restart): one such is
replaced before the round trip, which would otherwise fail (and begin an outage)."""

SUSPECT_AFTER_LOSS = 1.0
"""Seconds after a connection was lost during which its siblings are checked (as if idle,
IDLE_CHECK) before each use: kills come in groups (``CLIENT KILL TYPE normal``, one per
connection in a row, a restart), and a sibling closed while it had just been used would
fail one more round trip."""

RECONNECT_MIN = 0.05
"""Seconds before the first new attempt to connect after a failed one (then doubled)."""

RECONNECT_MAX = 2.0
"""Most seconds between two attempts to connect while Redis is unreachable."""

LOST_SETUPS_UNREACHABLE = 2
"""Attempts in a row lost in their setup, with nothing answered lately, after which Redis is
taken for unreachable (see RespConnection._answered_lately). One is not enough: after an idle
spell, a ``CLIENT KILL`` landing in the first setup made a false outage (an attacker's pass:
2-7 in 25 cycles of kills every 1-2 ms); a proxy whose Redis is gone loses every one."""

FAILING_QUIET = 10.0
"""Seconds after a ``store_connections_failing`` episode ended during which connections lost
in their setup begin no new one (a refusal with Redis's words still does): under a storm of
``CLIENT KILL`` some land in setups, and each burst was an episode of its own."""

SIBLING_POLL = 0.005
"""Seconds between two looks at a sibling's connect, when one lost in its setup waits to
know whether a sibling got in (rare: Redis at its ``maxclients``, all connecting at once)."""

READER_KEEP_READS = 16
"""Reads (of 64 KiB at most) of one round trip after which its connection's hiredis reader is
replaced by a fresh one: hiredis keeps the buffer a reply grew to until its next read, so an
idle connection held the size of the biggest reply it last read (5 connections held 156 MB
after clients of 20 MB replies left, an attacker's pass); a smaller round trip costs no new
reader."""

_NOT_YET = object()
"""What the hiredis reader gives while no whole reply is there (its default, False, equals an
integer reply of 0: ``iter(gets, False)`` would stop at one)."""

Command = Sequence[bytes]
Expected = type | tuple[type, ...]
"""The type a command's reply must have (hiredis: list, int, bytes)."""


class Unreachable(ConnectionError):
    """Redis cannot be reached now (refused, timed out, connected to itself, backing off)."""


class BackingOff(Unreachable):
    """Not tried: the connection's last attempt to connect failed, and the next is not due."""


class Refused(ConnectionError):
    """Redis answered with an error and closed the connection (``ERR max number of clients
    reached``): it is up, so the other connections to it are not stale."""


class SetupRefused(ConnectionError):
    """Redis refused a new connection's setup (AUTH: a wrong password, an ACL): it is up,
    but will not serve this connection."""


class Lost(ConnectionError):
    """A connection that was serving failed in a round trip (Redis closed or reset it): its
    commands may have been applied. Redis may serve on (a ``CLIENT KILL``, a connection's
    buffer limit) or be gone (killed, restarting): the next connect tells which."""


class ReplyMismatch(Exception):
    """A reply of another type than its command returns: the stream cannot be trusted."""


def pack(args: Command) -> bytes:
    """One command in RESP."""
    return hiredis.pack_command(tuple(args))  # type: ignore[arg-type]  # (its stub wants a 1-tuple)


# The data commands of every request in RESP, in pieces: each command's start up to its key,
# with the key's length, made once for lengths under HEADS (hiredis.pack_command takes about
# three times as long per command, and formatting a length costs more than the rest of a
# piece: bench/OPTIMISATIONS.md, "RESP templates"). The Redis store's plain path adds the
# pieces of a whole batch to one list and joins it once; the functions below build one
# command. Each gives exactly what pack() gives (tests/test_resp.py checks it).
HEADS = 256
"""Lengths whose headers are made once (a longer key or value's is formatted each time)."""

GET_HEAD = b"*2\r\n$3\r\nGET\r\n$%d\r\n"
GET_HEADS = [GET_HEAD % n for n in range(HEADS)]
"""``GET key`` = ``GET_HEADS[len(key)] + key + CRLF``."""

APPEND_HEAD = b"*3\r\n$6\r\nAPPEND\r\n$%d\r\n"
APPEND_HEADS = [APPEND_HEAD % n for n in range(HEADS)]
"""``APPEND key line`` = ``APPEND_HEADS[len(key)] + key + VALUE_HEADS[len(line)] + line + CRLF``."""

VALUE_HEAD = b"\r\n$%d\r\n"
VALUE_HEADS = [VALUE_HEAD % n for n in range(HEADS)]
"""What comes between APPEND's key and its argument: the end of the key, the argument's length."""

DEL_HEAD = b"*2\r\n$3\r\nDEL\r\n$%d\r\n"
DEL_HEADS = [DEL_HEAD % n for n in range(HEADS)]
"""``DEL key`` = ``DEL_HEADS[len(key)] + key + CRLF``."""

GETRANGE_HEAD = b"*4\r\n$8\r\nGETRANGE\r\n$%d\r\n"
"""``GETRANGE key 0 end`` = ``GETRANGE_HEAD % len(key) + key + range_tail(end + 1)``."""

CRLF = b"\r\n"


def range_tail(size: int) -> bytes:
    """What follows the key of ``GETRANGE key 0 <size - 1>`` (the first ``size`` bytes)."""
    end = b"%d" % (size - 1)
    return b"\r\n$1\r\n0\r\n$%d\r\n%s\r\n" % (len(end), end)


def get(key: bytes) -> bytes:
    """``GET key`` in RESP."""
    n = len(key)
    return b"".join((GET_HEADS[n] if n < HEADS else GET_HEAD % n, key, CRLF))


def append_line(key: bytes, name: bytes, value: bytes) -> bytes:
    """``APPEND key <name>:<value>\\n`` in RESP: a PUT of ``value`` to the kvgevent key
    ``name`` kept in the Redis string ``key`` (see :mod:`kvgevent.stores.redis_store`)."""
    n, m = len(key), len(name) + len(value) + 2
    head = APPEND_HEADS[n] if n < HEADS else APPEND_HEAD % n
    size = VALUE_HEADS[m] if m < HEADS else VALUE_HEAD % m
    return b"".join((head, key, size, name, b":", value, b"\n", CRLF))


def delete(key: bytes) -> bytes:
    """``DEL key`` in RESP."""
    n = len(key)
    return b"".join((DEL_HEADS[n] if n < HEADS else DEL_HEAD % n, key, CRLF))


class RespConnection:
    """One socket to Redis (connected on first use); ``round_trip`` sends commands in one
    write and returns their replies (hiredis ReplyError instances for error replies)."""

    def __init__(
        self,
        host: str,
        port: int,
        db: int,
        password: str | None,
        username: str | None,
        timeout: float,
        setup: Sequence[Command] = (),
    ) -> None:
        self.address = (host, port)
        self.db, self.password, self.username, self.timeout = db, password, username, timeout
        # Sent after AUTH/SELECT/PING on every new connection; their errors are not fatal (a
        # user whose ACL forbids SCRIPT LOAD can still read and write).
        self.setup = list(setup)
        self.sock: Any = None
        self.reader: Any = None
        # Connected and set up: a connection that can serve (not one in the middle of its
        # AUTH/PING exchange, which a stalled Redis makes last the whole timeout).
        self.ready = False
        self._delay = 0.0  # the current wait between two attempts to connect
        self._retry_at = 0.0  # no attempt before this (monotonic)
        self._failure = ""  # why the last attempt to connect failed
        self._lost_setups = 0  # attempts in a row lost in their setup
        # The other connections to the same Redis (a Dispatcher's): see _close_idle_siblings.
        self.siblings: list[RespConnection] = []
        self.busy = False  # in a round trip
        self.serving = False  # its sender holds requests taken from the queue (see Dispatcher)
        self.connecting = False  # in connect(), for requests or aside
        self.on_connect: Callable[[], None] | None = None  # called after each connect
        self._used_at = 0.0  # when its last exchange ended (monotonic)
        self.answered_at = 0.0  # when an exchange last had all its replies (monotonic)
        self.suspect_until = 0.0  # a sibling was lost: checked before each use until then

    def drop_if_closed(self) -> None:
        """Close this connection if it sat idle for IDLE_CHECK or more and Redis closed it
        meanwhile (Redis's ``timeout``, a ``CLIENT KILL``): not an outage, and not a reason
        to close the siblings; it connects anew (aside, while a sibling serves: see
        :meth:`Dispatcher._send_loop`)."""
        if self.sock is None:
            return
        now = time.monotonic()
        if (now - self._used_at > IDLE_CHECK or now < self.suspect_until) and self.sock.closed_by_peer():
            self.close()

    def round_trip(self, payload: bytes, count: int) -> list[Any]:
        """Send ``payload``, return its ``count`` replies; connects first if closed."""
        if self.sock is None:
            self.connect()
        try:
            return self._exchange(payload, count)
        except BaseException as exc:
            if _lost(exc):
                # Killed alone (a CLIENT KILL: its siblings serve on, authenticated), or with
                # Redis (then Redis closed theirs too, and each shows it already).
                self._close_siblings_closed_by_peer()
                raise Lost(f"lost in a round trip: {getattr(exc, 'strerror', None) or exc}") from None
            if _gone(exc):
                self._close_idle_siblings()
            raise

    def _exchange(self, payload: bytes, count: int) -> list[Any]:
        """Send ``payload``, read ``count`` replies; closed if that fails (a half-read stream
        cannot be reused)."""
        self.busy = True
        try:
            self.sock.sendall(payload)
            replies = self._replies(count)
        except BaseException:
            self.close()
            raise
        finally:
            self.busy = False
            self._used_at = time.monotonic()
        self.answered_at = self._used_at
        return replies

    def _close_siblings_closed_by_peer(self) -> None:
        """Close the sibling connections not in a round trip that Redis closed (seen without
        a wait: MSG_PEEK); the others stay, checked before each use for SUSPECT_AFTER_LOSS."""
        suspect_until = time.monotonic() + SUSPECT_AFTER_LOSS
        for sibling in self.siblings:
            sibling.suspect_until = suspect_until
            if not sibling.busy and sibling.sock is not None and sibling.sock.closed_by_peer():
                sibling.close()

    def _close_idle_siblings(self) -> None:
        """Close the sibling connections not in a round trip: Redis went away, so they are
        most likely broken too, and after a restart each would fail one round trip more; a
        closed one connects anew at its next use."""
        for sibling in self.siblings:
            if not sibling.busy:
                sibling.close()

    def _replies(self, count: int) -> list[Any]:
        replies: list[Any] = []
        gets = self.reader.gets
        reads = 0
        while len(replies) < count:
            data = self.sock.recv(1 << 16)
            reads += 1
            if not data:  # (with the error Redis said why, if it did: max number of clients...)
                said = [str(reply) for reply in replies if isinstance(reply, hiredis.ReplyError)]
                if said:
                    raise Refused(f"Redis closed the connection: {said[0]}")
                raise ConnectionError("Redis closed the connection")
            self.reader.feed(data)
            replies += iter(gets, _NOT_YET)  # every complete reply, read in C (no loop here)
        if len(replies) > count:  # (the stream is out of step with the requests)
            raise ReplyMismatch(f"{len(replies)} replies to {count} commands")
        if reads > READER_KEEP_READS and not self.reader.has_data():
            self.reader = _new_reader()  # (its buffer goes with it: READER_KEEP_READS)
        return replies

    def backing_off(self) -> float:
        """Seconds before the next attempt to connect is due (0: due, or connected)."""
        return max(0.0, self._retry_at - time.monotonic()) if self.sock is None else 0.0

    def connect(self, close_siblings: bool = True) -> None:
        """Connect, check the peer, authenticate; back off after a failure (Unreachable
        until the next attempt is due), closing the idle siblings unless told not to."""
        now = time.monotonic()
        if now < self._retry_at:
            wait = self._retry_at - now
            raise BackingOff(f"Redis unreachable; next attempt in {wait:.2f} s (last: {self._failure})")
        self.connecting = True
        try:
            self._open()
        except Lost as exc:
            self.connecting = False
            self.close()
            self._lost_setups += 1
            if self._lost_setups < LOST_SETUPS_UNREACHABLE or self._answered_lately():
                raise  # (Redis took the connection, then closed it: it is up, most likely)
            # (nothing answered lately: no Redis behind the port)
            unreachable = Unreachable(f"{exc}; nothing answered for {self.timeout:g} s or more")
            self._failed_to_connect(unreachable, close_siblings)
            raise unreachable from None
        except BaseException as exc:
            self.connecting = False
            self.close()
            self._failed_to_connect(exc, close_siblings)
            raise
        self._delay, self.connecting, self._lost_setups = 0.0, False, 0
        if self.on_connect is not None:
            self.on_connect()

    def _failed_to_connect(self, exc: BaseException, close_siblings: bool) -> None:
        """Back off after a failed attempt to connect (``exc``), closing the idle siblings
        if Redis seems gone (and ``close_siblings``)."""
        self._failure = str(exc)[:200]  # (said by the BackingOff of the attempts not made)
        self._delay = min(max(self._delay * 2, RECONNECT_MIN), RECONNECT_MAX)
        self._retry_at = time.monotonic() + self._delay * random.uniform(0.5, 1.0)
        if close_siblings and _gone(exc):
            self._close_idle_siblings()

    def _answered_lately(self) -> bool:
        """Whether this connection or a sibling had a whole answer within the timeout, or a
        sibling is connected or connecting. A connection lost in its setup (and in the one
        before: LOST_SETUPS_UNREACHABLE) is a lost connection then (a ``CLIENT KILL`` in the
        middle of it, Redis serving the others; a refusal read as a reset while a sibling
        gets in); else Redis is taken for unreachable: a TCP proxy whose Redis is gone
        accepts each connection and closes it at once, and each such loss would otherwise
        fail its batch with no outage, no back-off, and a connect per batch."""
        if any(sibling.ready or sibling.connecting for sibling in self.siblings):
            return True
        latest = max(self.answered_at, *(sibling.answered_at for sibling in self.siblings))
        return time.monotonic() - latest < self.timeout

    def reconnect_aside(self) -> Exception | None:
        """While a sibling serves: wait out this connection's back-off, then try to connect,
        taking no request (a failure only backs off further; the siblings are left open).
        After a restart of Redis, or with Redis at its ``maxclients``, a connection that
        cannot connect yet would otherwise fail at once every request it took, and each
        failure would begin an outage that the siblings' next reply ends. Returns why the
        attempt failed (None: connected, or not due yet)."""
        wait = self.backing_off()
        if wait:
            gevent.sleep(wait)
            return None
        try:
            self.connect(close_siblings=False)
        except Exception as exc:
            if isinstance(exc, Lost):  # (connect does not back off after it: aside, it does)
                self._failed_to_connect(exc, close_siblings=False)
            return exc  # (backing off: the next try is due later)
        return None

    def _open(self) -> None:
        try:
            sock = socket.create_connection(self.address, timeout=self.timeout)
        except OSError as exc:
            raise Unreachable(f"cannot connect to Redis: {exc.strerror or exc}") from None
        if sock.getsockname() == sock.getpeername():
            sock.close()
            raise Unreachable("connected to itself: nothing listens on the Redis port")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # Its waits through kvgevent.fastio: gevent's timed recv and sendall made a Timeout,
        # a Waiter and a getsockopt per round trip (bench/OPTIMISATIONS.md, "lean Redis I/O").
        self.sock, self.reader = TimedSocket(sock, self.timeout), _new_reader()
        commands: list[Command] = []
        if self.password is not None:
            user = [] if self.username is None else [self.username.encode()]
            commands.append([b"AUTH", *user, self.password.encode()])
        if self.db:
            commands.append([b"SELECT", str(self.db).encode()])
        commands += [[b"PING"], *self.setup]
        # (connect decides what a failure here means for the siblings)
        try:
            replies = self._exchange(b"".join(pack(c) for c in commands), len(commands))
        except OSError as exc:
            if _lost(exc):  # (a CLIENT KILL in the middle of it: Redis is up)
                raise Lost(f"lost in its setup: {exc.strerror or exc}") from None
            raise
        required = replies[: len(commands) - len(self.setup)]
        errors = [reply for reply in required if isinstance(reply, Exception)]
        if errors and not_now(str(errors[0])):  # (BUSY, LOADING...: as if it did not answer)
            raise Unreachable(f"Redis cannot serve now: {errors[0]}")
        if errors:
            raise SetupRefused(f"Redis refused the connection setup: {errors[0]}")
        if required[-1] != b"PONG":
            raise Unreachable("the peer did not answer PING with PONG: not a Redis")
        self.ready = True

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
        self.sock = self.reader = None
        self.ready = False


def _new_reader() -> Any:
    """A hiredis reader of replies as this module reads them (see _NOT_YET)."""
    return hiredis.Reader(notEnoughData=_NOT_YET)


def _lost(exc: BaseException) -> bool:
    """Whether ``exc``, raised by an exchange on a connection that was open, says the
    connection was closed or reset under it (not a timeout, not Redis's refusal)."""
    return isinstance(exc, OSError) and not isinstance(
        exc, (TimeoutError, Refused, SetupRefused, Unreachable)
    )


def _gone(exc: BaseException) -> bool:
    """Whether ``exc`` says Redis went away (or restarts): a failed connection or connect, not
    a Redis that answered and closed (Refused) or refused a new connection's setup
    (SetupRefused: a changed password, while the connections already in still serve). Then
    the other connections are stale too."""
    return isinstance(exc, OSError) and not isinstance(exc, (Refused, SetupRefused))


class Mixed(list[Any]):
    """The replies of a request whose round trip held an error reply, a nil (a GET of a key
    with no values) or a reply of a subtype of its command's type: a caller whose replies
    are a plain ``list`` knows, without looking at them, that each is of exactly its
    command's type, no error reply among them."""


def check_types(replies: list[Any], expected: Sequence[Expected]) -> bool:
    """Raise ReplyMismatch unless each reply is an error reply or of its command's type (or
    nil, for a GET: a bulk string); True if each is of exactly its command's type (no error
    reply, no nil)."""
    if list(map(type, replies)) == expected:  # (the usual case: checked in C)
        return True
    for reply, kind in zip(replies, expected, strict=True):
        if reply is None and kind is bytes:  # (GET of a key with no values)
            continue
        if reply.__class__ is not kind and not isinstance(reply, (kind, hiredis.ReplyError)):
            raise ReplyMismatch(f"a {type(reply).__name__} reply where a {kind} was due")
    return False


class _Request:
    """One caller's batch: its payload, and where its outcome goes (``done`` set, then
    ``replies`` or ``failure``). ``waiter`` is the greenlet waiting for it, None once that
    greenlet gave up waiting (killed: a late wake-up must not resume it in another wait).
    ``writes``: it may hold a write (see :meth:`Dispatcher._send_loop`)."""

    __slots__ = ("payload", "count", "expected", "waiter", "replies", "failure", "done", "writes", "arrival")

    def __init__(self, payload: bytes, expected: Sequence[Expected], waiter: Any, writes: bool) -> None:
        self.payload, self.count, self.expected = payload, len(expected), expected
        self.waiter, self.writes = waiter, writes
        self.arrival = 0  # (its place in the queue's order: set by _Queue.append)
        self.replies: list[Any] = []
        self.failure: BaseException | None = None
        self.done = False


class _Queue:
    """The requests waiting for a round trip: those of reads only and those with writes
    apart, each in arrival order. A round trip takes the kind whose first has waited longest
    (or reads only, while no more round trips of writes may go out), and looks at no more
    requests than it takes: thousands may wait (a single queue skipped over the other kind,
    10 µs a request at 3,000 clients)."""

    __slots__ = ("reads", "writes", "_arrivals")

    def __init__(self) -> None:
        self.reads: deque[_Request] = deque()
        self.writes: deque[_Request] = deque()
        self._arrivals = itertools.count()

    def __bool__(self) -> bool:
        return bool(self.reads or self.writes)

    def append(self, request: _Request) -> None:
        request.arrival = next(self._arrivals)
        (self.writes if request.writes else self.reads).append(request)

    def take(self, writes_allowed: bool) -> tuple[list[_Request], int, bool]:
        """The requests of the next round trip, how many commands they hold, and whether
        they write: up to MAX_ROUND_TRIP commands (at least one request) of one kind; none
        if only writes wait and ``writes_allowed`` is False."""
        reads, writes = self.reads, self.writes
        kind = writes_allowed and bool(writes) and (not reads or writes[0].arrival < reads[0].arrival)
        queue = writes if kind else reads
        if not queue:
            return [], 0, False
        request = queue.popleft()
        batch, count = [request], request.count
        while count < MAX_ROUND_TRIP and queue:
            request = queue.popleft()
            batch.append(request)
            count += request.count
        return batch, count, kind

    def give_back(self, batch: list[_Request]) -> None:
        """Put ``batch`` (one kind, taken by :meth:`take`) back at the head, in order."""
        (self.writes if batch[0].writes else self.reads).extendleft(reversed(batch))


class Dispatcher:
    """Sends queued requests in shared round trips over ``connections`` connections.

    Waits are lean, as the server's (kvgevent.server.connection, bench/OPTIMISATIONS.md, "lean
    waits"): a caller parks with a bare ``Hub.switch`` until a sender has its outcome and
    schedules its ``switch`` with ``loop.run_callback``; a sender with nothing to send parks the
    same way until a caller schedules it. gevent's AsyncResult and Queue made a Waiter per wait
    and a Timeout context per ``get``. Relies on ``Hub.switch`` and ``loop.run_callback``
    (pinned and tested with the server's).

    Reads keep a way through while Redis holds writes (``CLIENT PAUSE WRITE``, as in a
    failover): Redis stops a connection at its first write, with every command after it, so
    a round trip holds either requests of reads only or requests with writes (of many
    callers: each caller's own commands stay together, in order), round trips with writes
    take at most all connections but one (:meth:`_write_slots`), and the requests of a
    round trip that timed out fail with it, the writes queued behind it too, but while a
    connection answers, not the reads."""

    def __init__(
        self, make_connection: Any, connections: int = 4, log: Logger | None = None, node: str = ""
    ) -> None:
        self._queue = _Queue()
        self._log, self._node = log, node  # (``node``: Redis's name in the log)
        self._failing_since: float | None = None  # a connection failing aside since then
        self._failing_ended = -FAILING_QUIET  # when the last such episode ended
        # Senders parked on an empty queue, longest first, each with its connection.
        self._idle: deque[tuple[Any, RespConnection]] = deque()
        self._writing = 0  # round trips holding a write in flight
        self._hub = gevent.get_hub()
        self._closed = False
        self._connections = [make_connection() for _ in range(connections)]
        for connection in self._connections:
            connection.siblings = [c for c in self._connections if c is not connection]
            connection.on_connect = self._connected
        self._senders = [gevent.spawn(self._send_loop, c) for c in self._connections]

    def execute(
        self, commands: Sequence[Command], expected: Sequence[Expected], writes: bool = True
    ) -> list[Any]:
        """Send ``commands`` (in a round trip shared with other callers); wait for their
        replies, in order, each checked to be of its ``expected`` type or an error reply (a
        :class:`Mixed` list if any may be an error reply, else a plain list).
        Raises what the connection raised if the round trip failed (ReplyMismatch for a
        reply of the wrong type), and ConnectionError once the dispatcher is closed.
        ``writes``: False if none of ``commands`` writes (they may pass paused writes)."""
        return self.execute_encoded(b"".join([pack(c) for c in commands]), expected, writes)

    def execute_encoded(self, payload: bytes, expected: Sequence[Expected], writes: bool = True) -> list[Any]:
        """:meth:`execute` for commands encoded already (``payload``: RESP, one command per
        item of ``expected``)."""
        if self._closed:
            raise ConnectionError("the Redis dispatcher is closed")
        request = _Request(payload, expected, gevent.getcurrent(), writes)
        self._queue.append(request)
        # The longest idle sender (round trips take turns over the connections); none for a
        # write while as many round trips of writes are out as may be: the one idle could
        # take reads only (the busy ones take it next), and waking it for every write cost
        # two switches each (5 % at 1,000 clients writing).
        if self._idle and not (writes and self._writing >= len(self._connections) - 1):
            self._hub.loop.run_callback(self._idle.popleft()[0].switch)
        try:
            while not request.done:
                self._hub.switch()
        except BaseException:
            request.waiter = None  # given up (killed): its outcome goes nowhere
            raise
        if request.failure is not None:
            raise request.failure
        return request.replies

    def _send_loop(self, connection: RespConnection) -> None:
        queue, me = self._queue, gevent.getcurrent()
        while True:
            if not queue:
                self._idle.append((me, connection))
                self._hub.switch()  # (a kill while parked ends the sender: close())
                continue
            connection.drop_if_closed()
            if not connection.ready and any(s.ready or s.serving for s in connection.siblings):
                # (a connection that cannot connect must not fail requests a sibling can serve,
                # or one connecting for requests of its own: see _connected_for)
                self._wake_connected()  # (this sender was woken for the queue: pass it on)
                failed = connection.reconnect_aside()
                if failed is not None:
                    self._failing_aside(failed)
                continue
            writing = self._writing
            batch, count, writes = queue.take(not writing or writing < self._write_slots())
            if not batch:  # (only writes queued, as many round trips of writes as may be out)
                self._idle.append((me, connection))
                self._hub.switch()  # (one that ends takes them; a read wakes this one)
                continue
            connection.serving = True
            self._writing += writes
            try:
                if not connection.ready and not self._connected_for(batch, connection):
                    batch = []  # (given back to the queue)
                else:
                    payload = batch[0].payload if len(batch) == 1 else b"".join([r.payload for r in batch])
                    replies = connection.round_trip(payload, count)
                    exact = check_types(replies, _expected(batch))
            except BaseException as exc:  # GreenletExit too (close()): nobody may wait forever
                self._failed(batch, exc, connection)
                if not isinstance(exc, Exception):
                    raise
                continue
            finally:
                connection.serving = False
                self._writing -= writes
            if not batch:  # (the sibling woken for them takes them: let it run)
                gevent.sleep(connection.backing_off() or RECONNECT_MIN)
                continue
            self._deliver(batch, replies, exact)
            # (Parked, this frame would keep the last round trip's replies alive, one of
            # them a reply fetched whole of many MB, after its client took it and left.)
            del batch, replies, payload

    def _deliver(self, batch: list[_Request], replies: list[Any], exact: bool) -> None:
        """Give each request of ``batch`` its replies (a :class:`Mixed` list unless ``exact``)."""
        start = 0
        for request in batch:
            mine = replies[start : start + request.count]
            self._finish(request, mine if exact else Mixed(mine))
            start += request.count

    def _connected_for(self, batch: list[_Request], connection: RespConnection) -> bool:
        """Connect ``connection`` for ``batch``, just taken from the queue: True once it is
        connected. Refused by a Redis that answered (at its ``maxclients``, a password
        changed), or not tried (backing off after such a refusal), while a sibling may serve
        them (connected, connecting, or free to try now: woken for them), False: the batch
        goes back to the head of the queue (nothing of it was sent), and this connection
        tries again aside (:meth:`_send_loop`). Connections woken together at startup all connect at
        once, and a Redis with room for some refuses the others; a connection killed frees
        its room while its siblings back off: each such batch failed as an outage of the
        store. Lost in its setup (Redis's refusal read as a reset; a ``CLIENT KILL``), the
        batch goes back only if a sibling is connected once those connecting are done: such
        a loss does not back off, and a proxy whose Redis is gone accepts and closes every
        connection at once, so giving its batch back to a sibling free to try would go round
        the connections for ever. Otherwise raises what the connect raised, which fails the
        batch."""
        try:
            connection.connect()
        except (Refused, SetupRefused, BackingOff) as exc:
            if not any(map(_may_serve, connection.siblings)):
                raise
            self._give_back(batch, exc)
            return False
        except Lost as exc:
            if not _sibling_in(connection):
                raise
            self._give_back(batch, exc)
            return False
        return True

    def _give_back(self, batch: list[_Request], exc: Exception) -> None:
        """Put ``batch`` (nothing of it sent) back at the head of the queue for a sibling;
        ``exc``: why this connection could not connect for it."""
        self._queue.give_back(batch)
        self._wake_connected(or_free=True)
        self._failing_aside(exc)

    def answered_since(self, when: float) -> bool:
        """Whether a connection had all the replies of a round trip after ``when`` (monotonic)."""
        return any(connection.answered_at > when for connection in self._connections)

    def _write_slots(self) -> int:
        """How many round trips holding a write may be out at once: all connections that may
        serve (connected, or free to connect: see :func:`_may_serve`) but one, kept for reads
        (at least one: with room in Redis for one connection, it takes writes too)."""
        return max(1, sum(map(_may_serve, self._connections)) - 1)

    def _failed(self, batch: list[_Request], exc: BaseException, connection: RespConnection) -> None:
        """The round trip of ``batch`` on ``connection`` raised ``exc``: its requests fail
        with it; after a timeout (Redis stalled), so do those queued meanwhile, which would
        wait as long again (on a new connection, in its setup), but for the reads while
        another connection answers (Redis holds writes only: CLIENT PAUSE WRITE)."""
        if isinstance(exc, ReplyMismatch):
            connection.close()
        failure = exc if isinstance(exc, Exception) else ConnectionError("the dispatcher closed")
        for request in batch:
            self._finish(request, failure=failure)
        if not isinstance(exc, TimeoutError):
            return
        queue = self._queue
        # (Redis answers, not stalled, if a connection had a whole answer within the last half
        # of the timeout: this one's last was before its round trip, a whole timeout ago)
        stalled = not self.answered_since(time.monotonic() - connection.timeout / 2)
        for waiting in (queue.writes, queue.reads) if stalled else (queue.writes,):
            while waiting:
                self._finish(waiting.popleft(), failure=failure)

    def _failing_aside(self, error: Exception) -> None:
        """A connection failed to connect while a sibling serves (Redis at its ``maxclients``,
        a password changed under open connections): not an outage, the siblings serve every
        request; logged once per episode (``store_connections_failing``), which ends when
        every connection is connected (``store_connections_restored``). Only for a Redis
        that answered and refused (Refused, SetupRefused), or a connection lost in its setup
        (Lost: Redis at its ``maxclients`` closes a new connection with our setup unread, and
        its error reads as a reset), while another connection is in: with none in (Redis
        restarted with another password, say), it is an outage of the store, logged as one;
        one that cannot be reached, times out or cannot serve now fails the siblings too."""
        if self._failing_since is not None or not isinstance(error, (Refused, SetupRefused, Lost)):
            return
        if isinstance(error, Lost) and time.monotonic() - self._failing_ended < FAILING_QUIET:
            return  # (a CLIENT KILL storm loses setups too: one episode, not one per burst)
        if not any(c.ready for c in self._connections):  # (none in: an outage, which says it)
            return
        self._failing_since = time.monotonic()
        if self._log is not None:
            self._log.warning(
                "store_connections_failing",
                node=self._node,
                connected=sum(c.ready for c in self._connections),
                connections=len(self._connections),
                error=_said(error),
            )

    def _connected(self) -> None:
        """After a connection connected: the episode of :meth:`_failing_aside` ends once
        every connection is."""
        if self._failing_since is None or not all(c.ready for c in self._connections):
            return
        self._failing_ended = time.monotonic()
        failing_s = round(self._failing_ended - self._failing_since, 3)
        self._failing_since = None
        if self._log is not None:
            self._log.info("store_connections_restored", node=self._node, failing_s=failing_s)

    def _wake_connected(self, or_free: bool = False) -> None:
        """Wake the longest idle sender whose connection is connected, if one is idle (the
        busy ones take the queue when their round trip ends); if none is and ``or_free``,
        the longest idle one whose connection is free to try to connect now."""
        for index, (sender, connection) in enumerate(self._idle):
            if connection.ready:
                del self._idle[index]
                self._hub.loop.run_callback(sender.switch)
                return
        if not or_free:
            return
        for index, (sender, connection) in enumerate(self._idle):
            if _may_serve(connection):
                del self._idle[index]
                self._hub.loop.run_callback(sender.switch)
                return

    def _finish(
        self, request: _Request, replies: list[Any] | None = None, failure: Exception | None = None
    ) -> None:
        """Give ``request`` its outcome and wake its caller (once this greenlet yields)."""
        request.replies, request.failure, request.done = replies or [], failure, True
        if request.waiter is not None:
            self._hub.loop.run_callback(_wake, request)

    def close(self) -> None:
        """Stop: requests in flight and queued fail with ConnectionError, later ones too."""
        self._closed = True
        for sender in self._senders:
            sender.kill()
        for waiting in (self._queue.reads, self._queue.writes):
            while waiting:
                self._finish(waiting.popleft(), failure=ConnectionError("the dispatcher closed"))
        for connection in self._connections:
            connection.close()


def _may_serve(connection: RespConnection) -> bool:
    """Whether ``connection`` serves, or may soon: connected, connecting (for requests or
    aside), holding requests, or closed and free to try to connect now (not backing off)."""
    if connection.ready or connection.serving or connection.connecting:
        return True
    return connection.sock is None and not connection.backing_off()


def _said(error: Exception) -> str:
    """The ``error`` of a ``store_connections_failing`` event: what the refusal said, or for a
    connection lost in its setup while another is in, what that most likely is."""
    if isinstance(error, Lost):
        return f"{str(error)[:150]} (most likely Redis at its maxclients, which closes the new connection)"
    return str(error)[:200]


def _sibling_in(connection: RespConnection) -> bool:
    """Whether a sibling of ``connection`` is connected, once those connecting have finished
    (at most ``timeout``). After ``connection`` was lost in its setup: Redis at its
    ``maxclients`` accepts a connection and closes it with our setup unread, which reads
    as a reset (its ``max number of clients`` error discarded with it) while a sibling
    that got in serves."""
    deadline = time.monotonic() + connection.timeout
    while any(s.connecting for s in connection.siblings) and time.monotonic() < deadline:
        gevent.sleep(SIBLING_POLL)
    return any(s.ready for s in connection.siblings)


def _expected(batch: list[_Request]) -> Sequence[Expected]:
    """The reply types due in a round trip of ``batch``, in order."""
    if len(batch) == 1:
        return batch[0].expected
    expected: list[Expected] = []
    for request in batch:
        expected += request.expected  # (extended in C: no loop per command here)
    return expected


def _wake(request: _Request) -> None:
    """Resume the caller waiting for ``request``, unless it gave up meanwhile."""
    waiter = request.waiter
    if waiter is not None:
        waiter.switch()
