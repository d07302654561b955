"""A client library for kvgevent: plain blocking sockets, cooperative under gevent's
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
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections import deque
from typing import Any

from .config import DEFAULT_CLIENT_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT
from .errors import ConnectionLost, InvalidArgument, ServerError
from .protocol import (
    PING,
    STATS,
    Auth,
    Command,
    Delete,
    Get,
    LineBuffer,
    Ping,
    Put,
    Stats,
    Update,
    encode,
    parse,
    parse_stats,
    parse_value,
)
from .tls import TlsStream, client_context

MAX_REPLY_LINE = 1 << 26
"""Longest reply line the client accepts (64 MiB), well above any value the server stores."""

RECV_SIZE = 1 << 16
"""Bytes asked of one ``recv``."""


def to_bytes(data: bytes | str, what: str = "value") -> bytes:
    """Keys and values may be given as ``str`` (sent as UTF-8) or ``bytes``."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    raise InvalidArgument(f"a {what} must be bytes or str, not {type(data).__name__}")


class Client:
    """One connection to a kvgevent server.

    Raises :class:`ConnectionLost` if the server cannot be reached, closes the connection,
    or does not answer within ``timeout`` seconds; after that the client is closed and every
    call raises ConnectionLost. An ``ERR`` reply raises :class:`ServerError` (the connection
    stays usable). Keys and values that cannot be sent raise :class:`InvalidArgument` before
    anything is sent.
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
        every (re)connect."""
        self.host = host
        self.port = port
        self.timeout = timeout
        self.password = to_bytes(password, "password") if password is not None else None
        if tls is True:
            tls = client_context(tls_ca)
        self.tls: ssl.SSLContext | None = tls or None
        self._sock: socket.socket | None = None
        self.stream: Any = None  # the socket, or a TlsStream over it: recv() and sendall()
        self._buffer = LineBuffer(MAX_REPLY_LINE)
        self._lines: deque[bytes] = deque()
        if connect:
            self.connect()

    def connect(self) -> None:
        """(Re)connect, handshake and authenticate; a fresh connection forgets anything
        unread on the old one. Raises ConnectionLost, or ServerError for a refused password."""
        self.close()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.timeout)
        except OSError as exc:
            raise ConnectionLost(f"cannot connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock, self.stream = sock, sock
        self._buffer = LineBuffer(MAX_REPLY_LINE)
        self._lines.clear()
        if self.tls is not None:
            tls = TlsStream(
                sock, self.tls, server_side=False, server_hostname=self.host, lock_factory=threading.Lock
            )
            try:
                tls.handshake()
            except (OSError, ssl.SSLError) as exc:
                self.close()
                why = getattr(exc, "reason", None) or exc
                raise ConnectionLost(f"TLS handshake with {self.host}:{self.port} failed: {why}") from exc
            self.stream = tls
        if self.password is not None:
            try:
                self.execute([Auth(self.password)])
            except ServerError:
                self.close()
                raise

    def close(self) -> None:
        """Close the connection (idempotent)."""
        sock, self._sock, self.stream = self._sock, None, None
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
        return self.execute([Get(to_bytes(key, "key"))])[0]  # type: ignore[no-any-return]

    def update(self, key: bytes | str, old: bytes | str, new: bytes | str) -> None:
        """p0 UPDATE: replace the first ``old`` by ``new`` appended at the end."""
        self.execute([Update(to_bytes(key, "key"), to_bytes(old), to_bytes(new))])

    def delete(self, key: bytes | str) -> None:
        """Remove ``key`` and all its values."""
        self.execute([Delete(to_bytes(key, "key"))])

    def ping(self) -> bool:
        """Round trip to the server; True once every earlier command was applied."""
        return self.execute([PING])[0]  # type: ignore[no-any-return]

    def stats(self) -> dict[str, int]:
        """The server's counters (``active``, ``dropped``, ``keys``, ...)."""
        return self.execute([STATS])[0]  # type: ignore[no-any-return]

    def pipeline(self) -> Pipeline:
        """Collect commands and send them in one write when the ``with`` block ends (or on
        :meth:`Pipeline.execute`)."""
        return Pipeline(self)

    def execute(self, commands: list[Command], raise_on_error: bool = True) -> list[Any]:
        """Send ``commands`` in one write and return one result per command, in order:
        ``None`` for PUT/UPDATE/DELETE, a list of values for GET, True for PING, a dict for
        STATS. An ``ERR`` raises the first :class:`ServerError` after all replies were read,
        or takes the command's place in the results when ``raise_on_error`` is False."""
        payload = b"".join(encode(c) if c.__class__ is Ping else encode(c) + b"PING\n" for c in commands)
        sock = self._require()
        try:
            sock.sendall(payload)
            results = [self._read_result(c) for c in commands]
        except (OSError, ConnectionLost) as exc:
            self.close()
            if isinstance(exc, ConnectionLost):
                raise
            raise ConnectionLost(_describe(exc)) from exc
        if raise_on_error:
            for result in results:
                if isinstance(result, ServerError):
                    raise result
        return results

    def send_raw(self, lines: list[bytes]) -> list[list[bytes]]:
        """Send protocol lines as typed (no validation, one write) and return each one's reply
        lines. For tools that relay what a user typed: a ``PING`` line's reply is its
        ``[b"PONG"]``; any other line is followed by a barrier ``PING`` on the wire."""
        sock = self._require()
        pings = [parse(line) is PING for line in lines]
        payload = b"".join(
            line + b"\n" if ping else line + b"\nPING\n" for line, ping in zip(lines, pings, strict=True)
        )
        try:
            sock.sendall(payload)
            return [[b"PONG"] if ping else self._read_until_pong() for ping in pings]
        except OSError as exc:
            self.close()
            raise ConnectionLost(_describe(exc)) from exc
        except ConnectionLost:
            self.close()
            raise

    # --- replies ----------------------------------------------------------------------------

    def _require(self) -> Any:
        if self.stream is None:
            raise ConnectionLost("not connected")
        return self.stream

    def _read_line(self) -> bytes:
        while not self._lines:
            data = self._require().recv(RECV_SIZE)
            if not data:
                raise ConnectionLost("connection closed by the server")
            for line in self._buffer.feed(data):
                if not isinstance(line, bytes):
                    raise ConnectionLost("reply line too long")
                self._lines.append(line)
        return self._lines.popleft()

    def _read_until_pong(self) -> list[bytes]:
        lines = []
        while (line := self._read_line()) != b"PONG":
            lines.append(line)
        return lines

    def _read_result(self, command: Command) -> Any:
        lines = self._read_until_pong()
        for line in lines:
            if line.startswith(b"ERR "):
                return ServerError(line[4:].decode(errors="replace"))
        kind = command.__class__
        if kind is Get:
            return [parse_value(line) for line in lines]
        if kind is Ping or kind is Auth:
            return True
        if kind is Stats:
            if len(lines) != 1:
                raise ConnectionLost("malformed STATS reply")
            return parse_stats(lines[0])
        return None


class Pipeline:
    """Commands queued on a :class:`Client`, sent together: ``with client.pipeline() as p``.

    The methods take the same arguments as the client's and return the pipeline, so calls can
    be chained. :attr:`results` holds one result per command after :meth:`execute`."""

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
        commands, self.commands = self.commands, []
        self.results = self.client.execute(commands, raise_on_error) if commands else []
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
