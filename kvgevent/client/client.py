"""A client library for kvgevent: plain sockets (no gevent), cooperative under gevent's
monkey-patching, and the same :mod:`kvgevent.protocol` module as the server.

Every call returns only once the server has applied it: each command is followed on the
wire by ``PING``, and its reply is the lines before the matching ``PONG``. That also tells
which command an ``ERR`` belongs to, even in a pipeline.

    with Client(port=9999) as kv:
        kv.put("fruit", b"apple")
        kv.get("fruit")            # [b'apple']
        with kv.pipeline() as p:   # one write, one barrier per command, results in order
            p.put("k", b"1")
            p.get("k")
        p.results                  # [None, [b'1']]

Requests are written while replies are read (:meth:`Client.exchange`): the server stops
reading a client whose replies pile up unread, so a client that wrote a whole big pipeline
before reading would wait on a server waiting on it. The socket is non-blocking and every
wait goes through :mod:`selectors` (gevent's, once monkey-patched); ``timeout`` bounds a wait
in which nothing is sent and nothing received, however long the whole exchange takes.
Reply lines are told apart by :func:`kvgevent.protocol.classify_reply` alone.
"""

from __future__ import annotations

import selectors
import socket
import ssl
import threading
import time
from typing import Any, NoReturn, Protocol

from kvgevent.config import DEFAULT_CLIENT_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT
from kvgevent.errors import ConnectionLost, InvalidArgument, NotSent, ProtocolError, ServerError
from kvgevent.protocol import (
    ERR_LINE_TOO_LONG,
    PING,
    STATS,
    Auth,
    Command,
    Delete,
    Get,
    LineBuffer,
    Ping,
    Put,
    ReplyKind,
    Stats,
    Update,
    classify_reply,
    encode,
    parse,
    parse_stats,
    parse_value,
)
from kvgevent.tls import SEND_SLICE, TlsStream, client_context

MAX_REPLY_LINE = 1 << 26
"""Longest reply line the client accepts (64 MiB), well above any value the server stores."""

RECV_SIZE = 1 << 16
"""Bytes asked of one ``recv``."""

READS_PER_TURN = 16
"""Full reads in a row (16 x 64 KiB) before the exchange turns to sending again: a server
answering as fast as the client reads cannot keep the client's own requests from leaving."""

ERR_PREFIX = b"ERR "
"""What an ``ERR`` status line starts with; the reason follows."""

_VALUE, _PONG, _OK, _ERROR, _OTHER = ReplyKind


MAX_SECONDS = 1_000_000.0
"""The longest timeout (``--timeout``, ``--interval``): about 11.5 days. The OS's waits take at
most 2^31 milliseconds (about 24.8 days), and a longer one was a traceback."""


SELF_CONNECTED = "connected to itself (nothing listens there)"
"""What a connection the kernel connected to itself is said to be (:func:`self_connected`)."""


def to_bytes(data: bytes | str, what: str = "value") -> bytes:
    """Keys and values may be given as ``str`` (sent as UTF-8) or ``bytes``. A ``str`` from
    the command line or the environment holds bytes that are not UTF-8 as surrogate escapes
    (as Python decodes them): sent as those bytes, as ``os.fsencode`` gives them back."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    raise InvalidArgument(f"a {what} must be bytes or str, not {type(data).__name__}")


def server_error(line: bytes) -> ServerError:
    """The :class:`ServerError` of an ``ERR <reason>`` line (one ``classify_reply`` calls
    ``ERROR``)."""
    return ServerError(line[len(ERR_PREFIX) :].decode(errors="replace"))


class Source(Protocol):
    """What :meth:`Client.exchange` sends, pulled as the connection takes it.

    ``fd``: None if :meth:`read` never waits; otherwise :meth:`read` is called only once this
    file descriptor is readable (a pipe or a terminal), so replies keep being read meanwhile.
    """

    fd: int | None

    def read(self) -> bytes | None:
        """The next bytes to send (``b""``: none yet), or None once there is nothing more."""


class Replies(Protocol):
    """What :meth:`Client.exchange` hands reply lines to."""

    def feed(self, lines: list[bytes]) -> None:
        """Complete reply lines (without newlines), in order. May raise ConnectionLost for a
        reply that makes no sense (the connection is then closed)."""

    def complete(self) -> bool:
        """True once every reply to what the source gave so far has arrived."""


class Client:
    """One connection to a kvgevent server.

    Raises :class:`ConnectionLost` if the server cannot be reached, closes the connection,
    sends a reply that cannot be (a status line in a GET's reply, a value for a PUT), or
    neither takes a byte nor sends one for ``timeout`` seconds while a reply is due; after
    that the client is closed and every call raises ConnectionLost until :meth:`connect`.
    An ``ERR`` reply raises :class:`ServerError` (the connection stays usable). Keys and
    values that cannot be sent raise :class:`InvalidArgument` before anything is sent.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        timeout: float | None = DEFAULT_CLIENT_TIMEOUT,
        connect: bool = True,
        *,
        password: str | bytes | None = None,
        tls: bool | ssl.SSLContext = False,
        tls_ca: str | None = None,
    ) -> None:
        """``tls=True`` checks the server's certificate against ``tls_ca`` (or the system's
        CAs); an ``ssl.SSLContext`` is used as given. ``password`` is sent as ``AUTH`` on
        every (re)connect. ``timeout`` None waits for ever; otherwise a number of seconds above
        0 and at most MAX_SECONDS (InvalidArgument: a socket takes 0 for "never wait", which
        no call could live with, and an infinite one raised OverflowError at the connect)."""
        if timeout is not None and not (
            isinstance(timeout, int | float) and not isinstance(timeout, bool) and 0 < timeout <= MAX_SECONDS
        ):  # (NaN fails the comparison too)
            raise InvalidArgument(
                f"timeout must be a number of seconds above 0 and at most {MAX_SECONDS:g}, or None, "
                f"not {timeout!r}"
            )
        self.host = host
        self.port = port
        self.timeout = timeout
        self.password = to_bytes(password, "password") if password is not None else None
        if tls is True:
            tls = client_context(tls_ca)
        self.tls: ssl.SSLContext | None = tls or None
        self._sock: socket.socket | None = None
        self._wire: _Wire | None = None
        self._selector: selectors.BaseSelector | None = None
        self._buffer = LineBuffer(MAX_REPLY_LINE)
        if connect:
            self.connect()

    def connect(self) -> None:
        """(Re)connect, handshake and authenticate; a fresh connection forgets anything
        unread on the old one. Raises ConnectionLost ("cannot connect to ...", also for a
        socket the kernel connected to itself: a local port nobody listens on can be handed
        out as the connection's own source port), or ServerError for a refused password."""
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        except UnicodeError as exc:  # a host name the resolver's IDNA encoding refuses
            raise ConnectionLost(f"cannot connect to {self.host!r}: not a host name ({exc})") from exc
        if self_connected(sock):
            sock.close()
            raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {SELF_CONNECTED}")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        tls = self._handshake(sock) if self.tls is not None else None
        sock.setblocking(False)  # from now on every wait is the selector's, bounded by timeout
        self._wire = _TlsWire(sock, tls) if tls is not None else _Wire(sock)
        # Looked up now, not at import: monkey-patching replaces it with gevent's selector.
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ)
        self._buffer = LineBuffer(MAX_REPLY_LINE)
        if self.password is not None:
            try:
                self.execute([Auth(self.password)])
            except ServerError:
                self.close()
                raise

    def _handshake(self, sock: socket.socket) -> TlsStream:
        """The TLS handshake, blocking on ``sock`` (each wait bounded by its timeout)."""
        assert self.tls is not None
        tls = TlsStream(
            sock, self.tls, server_side=False, server_hostname=self.host, lock_factory=threading.Lock
        )
        try:
            tls.handshake()
        except (OSError, ssl.SSLError) as exc:
            self.close()
            why = getattr(exc, "reason", None) or exc
            raise ConnectionLost(f"TLS handshake with {self.host}:{self.port} failed: {why}") from exc
        return tls

    def close(self) -> None:
        """Close the connection (idempotent)."""
        sock, selector = self._sock, self._selector
        self._sock, self._wire, self._selector = None, None, None
        if selector is not None:
            selector.close()
        if sock is not None:
            sock.close()

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # --- commands ---------------------------------------------------------------------------

    def put(self, key: bytes | str, value: bytes | str) -> None:
        """Append ``value`` to the list of ``key``."""
        self.execute([Put(to_bytes(key, "key"), to_bytes(value))])

    def get(self, key: bytes | str) -> list[bytes]:
        """The values of ``key`` in stored order (``[]`` if none)."""
        return self.execute([Get(to_bytes(key, "key"))])[0]

    def update(self, key: bytes | str, old: bytes | str, new: bytes | str) -> None:
        """p0 UPDATE: replace the first ``old`` by ``new`` appended at the end."""
        self.execute([Update(to_bytes(key, "key"), to_bytes(old), to_bytes(new))])

    def delete(self, key: bytes | str) -> None:
        """Remove ``key`` and all its values."""
        self.execute([Delete(to_bytes(key, "key"))])

    def ping(self) -> bool:
        """Round trip to the server; True once every earlier command was applied."""
        return self.execute([PING])[0]

    def stats(self) -> dict[str, int]:
        """The server's counters (``active``, ``dropped``, ``keys``, ...)."""
        return self.execute([STATS])[0]

    def pipeline(self) -> Pipeline:
        """Collect commands and send them together when the ``with`` block ends (or on
        :meth:`Pipeline.execute`)."""
        return Pipeline(self)

    def execute(self, commands: list[Command], raise_on_error: bool = True) -> list[Any]:
        """Send ``commands`` (any number: replies are read while they are written) and return
        one result per command, in order: ``None`` for PUT/UPDATE/DELETE, a list of values
        for GET, True for PING and AUTH, a dict for STATS. An ``ERR`` raises the first
        :class:`ServerError` after all replies were read, or takes the command's place in the
        results when ``raise_on_error`` is False."""
        payload = b"".join(encode(c) if c.__class__ is Ping else encode(c) + b"PING\n" for c in commands)
        replies = _Results(commands)
        self.exchange(_Payload(payload), replies)
        self._nothing_after(replies.extra())
        if raise_on_error:
            for result in replies.results:
                if isinstance(result, ServerError):
                    raise result
        return replies.results

    def send_raw(self, lines: list[bytes]) -> list[list[bytes]]:
        """Send protocol lines as typed and return each one's reply lines. For tools that
        relay what a user typed: nothing is checked but that a line holds no newline
        (InvalidArgument: it would be two requests). A line the server reads as ``PING``
        gets ``[b"PONG"]``; any other line is followed by a barrier ``PING`` on the wire."""
        if any(b"\n" in line for line in lines):
            raise InvalidArgument("a protocol line may not contain a newline")
        commands = [parse(line[:-1] if line.endswith(b"\r") else line) for line in lines]
        payload = b"".join(
            line + b"\n" if command is PING else line + b"\nPING\n"
            for line, command in zip(lines, commands, strict=True)
        )
        replies = _RawReplies(commands)
        self.exchange(_Payload(payload), replies)
        self._nothing_after(replies.extra())
        return replies.results

    def exchange(self, source: Source, replies: Replies) -> None:
        """Send everything ``source`` gives while handing every reply line to ``replies``;
        return once the source is exhausted, every byte has left and ``replies.complete()``.

        Raises ConnectionLost (and closes the client) if the connection fails or closes, a
        reply line is longer than MAX_REPLY_LINE, ``replies`` refuses a line, anything arrived
        since the last exchange (a stray reply, or the end of the stream), or ``timeout``
        seconds pass with nothing sent and nothing received while something is due. Waiting
        on the source's ``fd`` with nothing due has no time limit. Any other exception from
        the source or ``replies`` also closes the client (the connection is mid-exchange)."""
        if self._wire is None or self._selector is None:
            raise ConnectionLost("not connected")
        try:
            self._check_quiet(self._wire)
            _Exchange(self._wire, self._selector, self._buffer, self.timeout, source, replies).run()
        except OSError as exc:
            self.close()
            raise ConnectionLost(_describe(exc)) from exc
        except BaseException:
            self.close()
            raise

    def _check_quiet(self, wire: _Wire) -> None:
        """Between two exchanges the server owes nothing, so nothing may have arrived: raise
        NotSent (a ConnectionLost: nothing of this call was sent) for any byte there (a stray
        reply, such as a PONG nothing asked for, would otherwise be taken as the next call's
        reply) or for the end of the stream. One non-blocking read, which finds nothing in
        the usual case; nothing waits."""
        if self._buffer.pending:  # part of a line after the last exchange's final reply
            raise NotSent("unexpected reply from the server: bytes after the last reply")
        data = wire.receive()
        if data is None:
            return
        if not data:
            raise NotSent(closed_by_server(wire.first))
        if data == REFUSAL:
            raise NotSent(REFUSED)
        raise NotSent(str(_stray(data.split(b"\n", 1)[0])))

    def _nothing_after(self, line: bytes | None) -> None:
        """``line``: the first reply line that came after the last reply due, in the same read
        (None: there was none). Such a line is a stray reply: close the client and raise
        ConnectionLost, as :meth:`_check_quiet` does for one that arrives later."""
        if line is not None:
            self.close()
            raise _stray(line)


def self_connected(sock: socket.socket) -> bool:
    """True if ``sock`` is connected to itself (TCP's simultaneous open: its own address is
    its peer's), which talks to nothing but its own echo."""
    try:
        return bool(sock.getsockname() == sock.getpeername())
    except OSError:  # already reset: the first call will say so
        return False


REFUSAL = b"ERR max clients reached\n"
"""All a kvgevent server sends a client it refuses over its --max-clients, before it closes."""

REFUSED = "refused by the server: ERR max clients reached"


def closed_by_server(first: bytes | None) -> str:
    """Why the server closed the connection, as far as the client can tell: refused over its
    --max-clients if that refusal is all it ever sent (``first``: what the connection's first
    read found). Its ERR came before any request: taken as a reply, it made the close look
    like a failure mid-command ("connection closed by the server", an attacker's pass)."""
    return REFUSED if first == REFUSAL else "connection closed by the server"


def _stray(line: bytes) -> ConnectionLost:
    """The error for a reply ``line`` that nothing asked for."""
    return ConnectionLost(f"unexpected reply from the server: {line[:80]!r} when nothing was asked for")


class _Wire:
    """A connected socket in non-blocking mode and the bytes waiting to go out on it. Nothing
    here waits: :class:`_Exchange` decides when to, and for how long."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.outgoing = bytearray()  # deleting its head is O(1): no copy per partial send
        # The start of what the first read found: enough to tell a refusal (closed_by_server),
        # not the whole first read kept for the connection's life.
        self.first: bytes | None = None

    @property
    def pending(self) -> bool:
        """True while some bytes have not been handed to the kernel yet."""
        return bool(self.outgoing)

    @property
    def failure_held(self) -> bool:
        """A failure waits for the next :meth:`receive`, with nothing to wait for."""
        return False

    def queue(self, data: bytes) -> None:
        self.outgoing += data

    def send_some(self) -> int:
        """Send what the socket takes now; the number of bytes it took (0 if it is full)."""
        try:
            sent = self.sock.send(self.outgoing)
        except BlockingIOError:
            return 0
        del self.outgoing[:sent]
        return sent

    def receive(self) -> bytes | None:
        """Up to RECV_SIZE bytes that have arrived (``b""`` at the end of the stream), or None
        if there are none now. Fewer than RECV_SIZE means nothing more is readable before the
        socket is readable again."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return None
        if self.first is None:
            self.first = data[: len(REFUSAL) + 1]
        return data


class _TlsWire(_Wire):
    """TLS over a :class:`_Wire`, through :class:`kvgevent.tls.TlsStream` once its handshake is
    done: the stream is given this object as its socket, so the stream's ``sendall`` only queues
    ciphertext and its ``recv`` never waits (BlockingIOError when nothing has arrived).
    Plaintext waits in ``plain`` and is encrypted SEND_SLICE bytes at a time once the
    ciphertext before it has left, so the ciphertext held stays one slice big."""

    def __init__(self, sock: socket.socket, tls: TlsStream) -> None:
        super().__init__(sock)
        self.plain = bytearray()
        self.tls = tls
        tls.sock = self  # type: ignore[assignment]  # (this wire has what TlsStream uses of a socket: recv, sendall)

    @property
    def pending(self) -> bool:
        # (A session that failed sends nothing more: its alert is not worth a wait, and would
        # keep an exchange whose replies are all in from ending before it reads the failure.)
        return bool(self.outgoing or self.plain) and not self.tls.failure_held

    @property
    def failure_held(self) -> bool:
        return self.tls.failure_held

    def queue(self, data: bytes) -> None:
        self.plain += data

    def send_some(self) -> int:
        if not self.outgoing and self.plain:
            piece = bytes(self.plain[:SEND_SLICE])
            del self.plain[:SEND_SLICE]
            self.tls.sendall(piece)  # into self.outgoing, through sendall() below
        return super().send_some()

    def receive(self) -> bytes | None:
        """Plaintext, as :meth:`_Wire.receive`: a full RECV_SIZE may leave more decrypted-able
        data in the TLS engine, so read again; less means the engine holds no whole record."""
        try:
            return self.tls.recv(RECV_SIZE)
        except BlockingIOError:
            return None

    # The socket interface TlsStream uses.

    def sendall(self, data: bytes) -> None:
        self.outgoing += data

    def recv(self, size: int) -> bytes:
        return self.sock.recv(size)


class _Exchange:
    """One run of :meth:`Client.exchange`: write what the source gives while reading replies,
    waiting only in the selector, and only for the time left before the no-progress deadline.
    The source's fd is watched only while every byte it gave has left: what it gives next
    waits in the source (the pipe, the terminal), not in memory here."""

    def __init__(
        self,
        wire: _Wire,
        selector: selectors.BaseSelector,
        buffer: LineBuffer,
        timeout: float | None,
        source: Source,
        replies: Replies,
    ) -> None:
        self.wire, self.selector, self.buffer, self.timeout = wire, selector, buffer, timeout
        self.source, self.replies = source, replies
        self.source_open = True
        self.source_fd = source.fd
        self.source_watched = False
        # The last reads were full, or a TLS failure came after them: read again without
        # waiting (the failure is raised then, the replies before it kept).
        self.more_to_read = wire.failure_held
        self.last_progress = time.monotonic()
        # Since when a reply has been owed with every byte sent and nothing received (None:
        # not so): sending more (a stdin that trickles lines) is no answer from the server.
        self.owed_since: float | None = None
        self.events = selectors.EVENT_READ  # what the socket is registered for

    def run(self) -> None:
        try:
            while True:
                if self.source_open and self.source_fd is None and not self.wire.pending:
                    self._pull()
                    if self.source_open and not self.wire.pending:
                        continue  # it gave nothing (yet) without waiting: ask again, not the selector
                if self.wire.pending:
                    self._send()  # most often the socket takes it at once: no wait
                if not (self.source_open or self._due()):
                    return
                self._wait_and_serve()
        finally:
            self._watch_source(False)
            self._watch(selectors.EVENT_READ)

    def _pull(self) -> None:
        # (asked before the read, which counts the replies of what it gives as due already)
        owed = self._due()
        data = self.source.read()
        if data is None:
            self.source_open = False
        elif data:
            if not owed:  # the deadline counts from now, not from the last reply: the wait
                self.last_progress = time.monotonic()  # for the source was nobody's fault
            self.wire.queue(data)

    def _send(self) -> None:
        if self.wire.send_some():
            self.last_progress = time.monotonic()
        self._note_owed()

    def _note_owed(self) -> None:
        """Start the owed clock when all is sent and a reply is owed; stop it when none is."""
        if self.replies.complete():
            self.owed_since = None
        elif self.owed_since is None and not self.wire.pending:
            self.owed_since = time.monotonic()

    def _due(self) -> bool:
        """Something the server owes progress on: bytes it has not taken, or replies."""
        return self.wire.pending or not self.replies.complete()

    def _wait_and_serve(self) -> None:
        pending = self.wire.pending
        self._watch(selectors.EVENT_READ | selectors.EVENT_WRITE if pending else selectors.EVENT_READ)
        self._watch_source(self.source_open and self.source_fd is not None and not pending)
        ready = self.selector.select(self._wait_time())
        readable = writable = source_ready = False
        for key, mask in ready:
            if key.fileobj is self.wire.sock:
                readable, writable = bool(mask & selectors.EVENT_READ), bool(mask & selectors.EVENT_WRITE)
            else:
                source_ready = True
        if source_ready:
            self._pull()
        if writable:
            self._send()
        if readable or self.more_to_read:
            self._read()
        self._check_deadline()

    def _wait_time(self) -> float | None:
        if self.more_to_read:
            return 0
        if self.timeout is None or not self._due():
            return None
        return max(0.0, self._deadline() - time.monotonic())

    def _deadline(self) -> float:
        """When the server will have made no progress for --timeout: nothing sent or received
        since ``last_progress``, or no reply since a reply was owed with all sent."""
        assert self.timeout is not None
        last = self.last_progress if self.owed_since is None else min(self.last_progress, self.owed_since)
        return last + self.timeout

    def _check_deadline(self) -> None:
        if self.timeout is None:
            return
        self._note_owed()
        if self._due() and time.monotonic() >= self._deadline():
            raise ConnectionLost(f"timed out: nothing sent or received for {self.timeout:g} s")

    def _watch(self, events: int) -> None:
        if events != self.events:
            self.selector.modify(self.wire.sock, events)
            self.events = events

    def _watch_source(self, watch: bool) -> None:
        if watch != self.source_watched and self.source_fd is not None:
            if watch:
                self.selector.register(self.source_fd, selectors.EVENT_READ)
            else:
                self.selector.unregister(self.source_fd)
            self.source_watched = watch

    def _read(self) -> None:
        """Read what has arrived, up to READS_PER_TURN full reads, into ``replies``."""
        self.more_to_read = False
        for _ in range(READS_PER_TURN):
            data = self.wire.receive()
            if data is None:
                return
            if not data:
                raise ConnectionLost(closed_by_server(self.wire.first))
            self.last_progress = time.monotonic()
            self.owed_since = None
            lines = self.buffer.feed(data)
            if lines:
                if ERR_LINE_TOO_LONG in lines:
                    raise ConnectionLost("reply line too long")
                self.replies.feed(lines)  # type: ignore[arg-type]  # (no markers: a too-long line raised just above)
            if len(data) < RECV_SIZE:
                self.more_to_read = self.wire.failure_held
                return
        self.more_to_read = True


class _Payload:
    """A :class:`Source` of bytes known in advance."""

    def __init__(self, data: bytes) -> None:
        self.fd: int | None = None  # read() never waits
        self.data: bytes | None = data

    def read(self) -> bytes | None:
        data, self.data = self.data, None
        return data


class _Results:
    """The :class:`Replies` of :meth:`Client.execute`: one result per command, each built
    from the lines before its PONG."""

    def __init__(self, commands: list[Command]) -> None:
        self.commands = commands
        self.results: list[Any] = []
        self.values: list[bytes] = []  # of the command being answered
        self.status: list[tuple[ReplyKind, bytes]] = []  # its other lines

    def feed(self, lines: list[bytes]) -> None:
        values, status = self.values, self.status
        for line in lines:
            kind = classify_reply(line)
            if kind is _VALUE:
                values.append(line)
            elif kind is _PONG:
                command = self.commands[len(self.results)] if len(self.results) < len(self.commands) else None
                self.results.append(_result(command, values, status))
                values, status = self.values, self.status = [], []
            else:
                status.append((kind, line))

    def complete(self) -> bool:
        return len(self.results) == len(self.commands)

    def extra(self) -> bytes | None:
        """Once complete: the first line read after the last PONG (None if there was none)."""
        if self.values:
            return self.values[0]
        return self.status[0][1] if self.status else None


def _result(command: Command | None, values: list[bytes], status: list[tuple[ReplyKind, bytes]]) -> Any:
    """A command's result from its reply lines; an ``ERR`` among them is returned as a
    ServerError; lines the command cannot have raise ConnectionLost."""
    if command is None:  # (before an ERR is returned: else the results outgrow the commands)
        raise ConnectionLost("unexpected reply from the server: a PONG nothing asked for")
    for kind, line in status:
        if kind is _ERROR:
            return server_error(line)
    verb = command.__class__
    if verb is Get:
        return _values(command, values, status)
    if values:
        _unexpected(command, values[0])
    expected = _STATUS_REPLY.get(verb)
    if [k for k, _ in status] != ([] if expected is None else [expected]):
        _unexpected(command, status[0][1] if status else None)
    if verb is Stats:
        return _stats(command, status[0][1])
    return True if verb is Ping or verb is Auth else None


def _values(command: Command, values: list[bytes], status: list[tuple[ReplyKind, bytes]]) -> list[bytes]:
    """A GET's values from its reply lines: each a value of its key, and nothing else."""
    if status:
        _unexpected(command, status[0][1])
    head = command.key + b":"  # type: ignore[union-attr]  # (a Get)
    found = []
    for line in values:  # (one pass: a pipelined million GETs go through here)
        if not line.startswith(head):  # (a value of another key)
            _unexpected(command, line)
        found.append(parse_value(line))
    return found


_STATUS_REPLY: dict[type, ReplyKind] = {Stats: _OTHER, Auth: _OK}
"""The one status line a command's reply holds before its PONG (the others hold none)."""


def _unexpected(command: Command, line: bytes | None) -> NoReturn:
    what = "nothing before the PONG" if line is None else repr(line[:80])
    raise ConnectionLost(f"unexpected reply from the server to {command.__class__.__name__.upper()}: {what}")


def _stats(command: Command, line: bytes) -> dict[str, int]:
    try:
        return parse_stats(line)
    except ValueError:  # UnicodeDecodeError included
        _unexpected(command, line)


class _RawReplies:
    """The :class:`Replies` of :meth:`Client.send_raw`: each line's reply lines, up to a PONG,
    checked against what the line asks for (``commands``: each line as parsed) as
    :meth:`Client.execute` checks its own; a line the client cannot parse may be answered with
    anything (a server newer than this client may know more)."""

    def __init__(self, commands: list[Command | ProtocolError]) -> None:
        self.commands = commands
        self.results: list[list[bytes]] = []
        self.current: list[bytes] = []

    def feed(self, lines: list[bytes]) -> None:
        for line in lines:
            if classify_reply(line) is not _PONG:
                self.current.append(line)
                continue
            if len(self.results) == len(self.commands):
                raise ConnectionLost("unexpected reply from the server: a PONG nothing asked for")
            command = self.commands[len(self.results)]
            _check_raw(command, self.current)
            self.results.append([b"PONG"] if command is PING else self.current)
            self.current = []

    def complete(self) -> bool:
        return len(self.results) == len(self.commands)

    def extra(self) -> bytes | None:
        """Once complete: the first line read after the last PONG (None if there was none)."""
        return self.current[0] if self.current else None


def _check_raw(command: Command | ProtocolError, lines: list[bytes]) -> None:
    """Raise ConnectionLost if ``lines`` (before its PONG) cannot be the reply to ``command``."""
    if isinstance(command, ProtocolError):
        return
    if command is PING:
        if lines:  # (its PONG is its whole reply)
            _unexpected(command, lines[0])
        return
    values: list[bytes] = []
    status: list[tuple[ReplyKind, bytes]] = []
    for line in lines:
        kind = classify_reply(line)
        if kind is _VALUE:
            values.append(line)
        else:
            status.append((kind, line))
    _result(command, values, status)


class Pipeline:
    """Commands queued on a :class:`Client`, sent together: ``with client.pipeline() as p``.

    The methods take the same arguments as the client's and return the pipeline, so calls can
    be chained. :attr:`results` holds one result per command after :meth:`execute`. A
    pipeline may be of any size: its replies are read while it is written."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.commands: list[Command] = []
        self.results: list[Any] = []

    def put(self, key: bytes | str, value: bytes | str) -> Pipeline:
        return self._add(Put(to_bytes(key, "key"), to_bytes(value)))

    def get(self, key: bytes | str) -> Pipeline:
        return self._add(Get(to_bytes(key, "key")))

    def update(self, key: bytes | str, old: bytes | str, new: bytes | str) -> Pipeline:
        return self._add(Update(to_bytes(key, "key"), to_bytes(old), to_bytes(new)))

    def delete(self, key: bytes | str) -> Pipeline:
        return self._add(Delete(to_bytes(key, "key")))

    def ping(self) -> Pipeline:
        return self._add(PING)

    def stats(self) -> Pipeline:
        return self._add(STATS)

    def _add(self, command: Command) -> Pipeline:
        encode(command)  # refuse what cannot be sent now, not at execute()
        self.commands.append(command)
        return self

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        """Send the queued commands and return their results (:meth:`Client.execute`). When
        an ``ERR`` raises its :class:`ServerError`, :attr:`results` still holds every
        command's result, the error in its command's place: the others were applied and
        their replies read."""
        commands, self.commands = self.commands, []
        self.results = self.client.execute(commands, raise_on_error=False) if commands else []
        if raise_on_error:
            for result in self.results:
                if isinstance(result, ServerError):
                    raise result
        return self.results

    def __len__(self) -> int:
        return len(self.commands)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is None:
            self.execute()


def _describe(exc: OSError) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out waiting for the server"
    return f"connection failed: {exc.strerror or exc}"
