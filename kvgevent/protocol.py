"""The kvgevent wire protocol, as pure code: no sockets, no gevent, no clock.

Requests are lines ending in ``\\n``; a ``\\r`` right before the ``\\n`` is dropped, so telnet
works. Verbs are case-insensitive::

    PUT:key:value        append value to key's list              no reply
    GET:key              one "key:value" line per value           (nothing if none)
    UPDATE:key:old:new   p0 semantics, see MemoryStore.update      no reply
    DELETE:key           remove the key and all its values         no reply
    PING                 "PONG" once every earlier command applied
    STATS                one line of space-separated name=value pairs
    AUTH:password        "OK", or ERR (only when the server has a password)

Anything else gets one ``ERR <reason>`` line. Status lines (``PONG``, ``ERR ...``, the
``STATS`` line) never contain ':', so a reply line with ':' is always a GET value.

Two pieces, both byte-exact and independently testable:

* :class:`LineBuffer` turns a byte stream, in any chunking, into complete lines and enforces
  the line-length bound itself: it never holds more than ``max_line`` bytes of a partial line.
* :func:`parse` turns one line into a command tuple, or *returns* (does not raise) the
  :class:`~kvgevent.errors.ProtocolError` whose ``reply`` is the ``ERR`` line to send.

The encoding helpers at the bottom are what the client library sends and reads, so client
and server share this one module.
"""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from kvgevent.config import DEFAULT_MAX_LINE, INLINE_REPLY_BYTES, INLINE_REPLY_VALUES, REPLY_CHUNK
from kvgevent.errors import InvalidArgument, ProtocolError


class Put(NamedTuple):
    """``PUT:key:value``: append ``value`` to the list of ``key``."""

    key: bytes
    value: bytes


class Get(NamedTuple):
    """``GET:key``: reply one ``key:value`` line per stored value."""

    key: bytes


class Update(NamedTuple):
    """``UPDATE:key:old:new``: replace the first ``old`` by ``new`` (p0 semantics)."""

    key: bytes
    old: bytes
    new: bytes


class Delete(NamedTuple):
    """``DELETE:key``: remove the key and all its values."""

    key: bytes


class Ping(NamedTuple):
    """``PING``: reply ``PONG`` once every earlier command on the connection was applied."""


class Stats(NamedTuple):
    """``STATS``: reply one line of ``name=value`` counters."""


class Auth(NamedTuple):
    """``AUTH:password``: authenticate the connection (when the server has a password)."""

    password: bytes


Command = Put | Get | Update | Delete | Ping | Stats | Auth
PING = Ping()
STATS = Stats()

# The fixed ERR phrases. Each is a shared instance: parsing never allocates an error.
ERR_EMPTY_LINE = ProtocolError("empty command")
ERR_UNKNOWN = ProtocolError("unknown command")
ERR_EMPTY_KEY = ProtocolError("empty key")
ERR_LINE_TOO_LONG = ProtocolError("line too long")
ERR_FIELDS = {
    verb: ProtocolError("wrong number of fields for " + verb)
    for verb in ("PUT", "GET", "UPDATE", "DELETE", "PING", "STATS", "AUTH")
}
ERR_AUTH_REQUIRED = ProtocolError("auth required")
ERR_INVALID_PASSWORD = ProtocolError("invalid password")
ERR_NO_PASSWORD = ProtocolError("no password is set")
ERR_AUTH_THROTTLED = ProtocolError("auth throttled")

# Byte values for membership tests: ``58 in data`` is a memchr, while ``b":" in data`` goes
# through the buffer protocol, several times slower (bench/OPTIMISATIONS.md, "memchr").
COLON = ord(":")
CR = ord("\r")
NEWLINE = ord("\n")

PONG = b"PONG\n"
OK = b"OK\n"


class LineBuffer:
    """Reassembles request lines from a byte stream.

    :meth:`feed` takes the bytes of one ``recv`` and returns the complete lines they finish,
    in order, without their ``\\n`` (and without a ``\\r`` right before it). A line longer
    than ``max_line`` bytes (counted without its ``\\r\\n`` or ``\\n``) is replaced, exactly
    once, by :data:`ERR_LINE_TOO_LONG`; its bytes are dropped as they arrive, never buffered,
    and the line after it is parsed normally. So the buffer never holds more than
    ``max_line`` + 1 bytes (room for the ``\\r`` of a ``\\r\\n``).
    Bytes after the last newline wait for the next :meth:`feed`; at end of stream they are an
    incomplete request and are discarded (a client that vanished mid-line changes nothing).
    """

    __slots__ = ("max_line", "_partial", "_discarding")

    def __init__(self, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError("max_line must be positive")
        self.max_line = max_line
        # The partial line, in one bytearray: appending is amortised O(1), and a client that
        # sends a line a byte at a time costs its bytes, not a 50-byte object per recv.
        self._partial = bytearray()
        self._discarding = False  # inside a too-long line, dropping bytes up to its newline

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held now (always <= ``max_line`` + 1: its ``\\r``)."""
        return len(self._partial)

    @property
    def allocated(self) -> int:
        """Bytes allocated for the incomplete line: what it costs in memory (``pending`` plus
        the bytearray's growth room, up to an eighth more)."""
        return self._partial.__alloc__()

    def feed(self, data: bytes) -> list[bytes | ProtocolError]:
        """Add received bytes; return the lines (or too-long markers) they complete."""
        if self._discarding or self._partial:
            return self._feed_held(data)
        lines = data.split(b"\n")
        tail = lines.pop()
        if lines:
            # (a read shorter than the bound holds no line longer than it: no per-line check)
            if len(data) > self.max_line and max(map(len, lines)) > self.max_line:
                return self._marked(lines, tail)
            if CR in data:
                lines = [x[:-1] if x[-1:] == b"\r" else x for x in lines]
        out: list[bytes | ProtocolError] = lines  # type: ignore[assignment]  # (only bytes so far: _hold may add a marker)
        if tail:
            self._hold(tail, out)
        return out

    def _marked(self, lines: list[bytes], tail: bytes) -> list[bytes | ProtocolError]:
        """:meth:`feed`'s result where a line is longer than ``max_line``: each such line
        replaced by its marker."""
        limit = self.max_line
        out = [ERR_LINE_TOO_LONG if _too_long(x, limit) else x[:-1] if x[-1:] == b"\r" else x for x in lines]
        if tail:
            self._hold(tail, out)
        return out

    def _feed_held(self, data: bytes) -> list[bytes | ProtocolError]:
        """:meth:`feed` while a line is held from earlier reads (or a too-long one is being
        discarded): that line first, then the rest as :meth:`feed` takes it."""
        out: list[bytes | ProtocolError] = []
        rest = self._finish_held(data, out)
        if rest is not None:
            out += self.feed(rest)  # (nothing is held now: the usual path)
        return out

    def _finish_held(self, data: bytes, out: list[bytes | ProtocolError]) -> bytes | None:
        """Complete the line held from earlier reads (or go on discarding a too-long one) with
        ``data``; returns what follows its newline, or None if ``data`` has no newline."""
        newline = data.find(b"\n")
        if newline < 0:
            if not self._discarding:
                self._hold(data, out)
            return None
        head = data[:newline]
        if self._discarding:
            self._discarding = False
        else:
            line = bytes(self._partial) + head
            self._partial = bytearray()
            if _too_long(line, self.max_line):
                out.append(ERR_LINE_TOO_LONG)
            else:
                out.append(line[:-1] if line[-1:] == b"\r" else line)
        return data[newline + 1 :]

    def _hold(self, chunk: bytes, out: list[bytes | ProtocolError]) -> None:
        """Keep ``chunk`` as part of the incomplete line, unless that makes it too long."""
        if len(self._partial) + len(chunk) > self.max_line + 1:  # (+1: its \r, if the \n follows)
            out.append(ERR_LINE_TOO_LONG)
            self._partial = bytearray()
            self._discarding = True
        else:
            self._partial += chunk


def _too_long(line: bytes, limit: int) -> bool:
    """Whether ``line`` (without its ``\\n``) is longer than ``limit`` bytes without the
    ``\\r`` before its ``\\n``, if any."""
    return len(line) > limit and (len(line) > limit + 1 or line[-1:] != b"\r")


# The parse functions build commands with tuple.__new__: a NamedTuple's own constructor is a
# Python-level function, a visible share of the server's time (bench/OPTIMISATIONS.md,
# "NamedTuple constructor"). ``sep`` is the separator after the verb: b":" or b"" (no arguments).
_new = tuple.__new__


def _parse_put(rest: bytes, sep: bytes) -> Command | ProtocolError:
    key, sep2, value = rest.partition(b":")
    if not (sep and sep2):
        return ERR_FIELDS["PUT"]
    if not key:
        return ERR_EMPTY_KEY
    return _new(Put, (key, value))


def _parse_get(rest: bytes, sep: bytes) -> Command | ProtocolError:
    if not sep or COLON in rest:
        return ERR_FIELDS["GET"]
    return _new(Get, (rest,)) if rest else ERR_EMPTY_KEY


def _parse_update(rest: bytes, sep: bytes) -> Command | ProtocolError:
    key, sep2, tail = rest.partition(b":")
    old, sep3, new = tail.partition(b":")
    if not (sep and sep2 and sep3):
        return ERR_FIELDS["UPDATE"]
    if not key:
        return ERR_EMPTY_KEY
    return _new(Update, (key, old, new))


def _parse_delete(rest: bytes, sep: bytes) -> Command | ProtocolError:
    if not sep or COLON in rest:
        return ERR_FIELDS["DELETE"]
    return _new(Delete, (rest,)) if rest else ERR_EMPTY_KEY


def _parse_ping(rest: bytes, sep: bytes) -> Command | ProtocolError:
    return ERR_FIELDS["PING"] if sep else PING


def _parse_stats(rest: bytes, sep: bytes) -> Command | ProtocolError:
    return ERR_FIELDS["STATS"] if sep else STATS


def _parse_auth(rest: bytes, sep: bytes) -> Command | ProtocolError:
    return _new(Auth, (rest,)) if sep else ERR_FIELDS["AUTH"]


_VERBS = {
    b"PUT": _parse_put,
    b"GET": _parse_get,
    b"UPDATE": _parse_update,
    b"DELETE": _parse_delete,
    b"PING": _parse_ping,
    b"STATS": _parse_stats,
    b"AUTH": _parse_auth,
}
# The spellings clients use most, so that they skip the upper() fallback.
_VERBS.update({verb.capitalize(): f for verb, f in list(_VERBS.items())})
_VERBS.update({verb.lower(): f for verb, f in list(_VERBS.items())})
_verb_handler = _VERBS.get
GET_SPELLINGS = frozenset(verb for verb, handler in _VERBS.items() if handler is _parse_get)
"""GET, Get and get: the spellings of a GET verb that need no case folding."""
PUT_SPELLINGS = frozenset(verb for verb, handler in _VERBS.items() if handler is _parse_put)
"""PUT, Put and put (as GET_SPELLINGS)."""
DELETE_SPELLINGS = frozenset(verb for verb, handler in _VERBS.items() if handler is _parse_delete)
"""DELETE, Delete and delete (as GET_SPELLINGS)."""
PING_SPELLINGS = frozenset(verb for verb, handler in _VERBS.items() if handler is _parse_ping)
"""PING, Ping and ping: a whole PING line (as GET_SPELLINGS)."""


def parse(line: bytes) -> Command | ProtocolError:
    """Parse one request line (without its newline) into a command or a protocol error.

    Never raises. Fields are split on ':'; the key is the second field and may not be empty;
    the last field of PUT (value) and UPDATE (new) is the rest of the line, ':' included.
    """
    verb, sep, rest = line.partition(b":")
    handler = _verb_handler(verb)
    if handler is None:
        handler = _verb_handler(verb.upper())
        if handler is None:
            return ERR_UNKNOWN if line else ERR_EMPTY_LINE
    # Well-formed GET and PUT, by far the most frequent, without a second call.
    if handler is _parse_get:
        if sep and rest and COLON not in rest:
            return _new(Get, (rest,))
    elif handler is _parse_put:
        key, sep2, value = rest.partition(b":")
        if sep2 and key and sep:
            return _new(Put, (key, value))
    return handler(rest, sep)


# --- replies -----------------------------------------------------------------------------


def value_line(key: bytes, value: bytes) -> bytes:
    """The reply line for one value of a GET: ``key:value\\n``."""
    return value_lines(key, [value])[0]


def value_lines(key: bytes, values: list[bytes]) -> list[bytes]:
    """The reply lines of a GET, one :func:`value_line` per value, in one call."""
    if len(values) == 1:  # the common case, without a comprehension's frame (OPTIMISATIONS.md)
        return [b"".join((key, b":", values[0], b"\n"))]
    prefix = key + b":"
    return [prefix + value + b"\n" for value in values]


def line_values(key: bytes, lines: bytes) -> list[bytes]:
    """The values of a GET of ``key`` from its reply ``lines`` (:func:`value_lines` joined):
    the inverse of that (a value never holds a newline; ``key`` never a colon)."""
    start = len(key) + 1
    return [line[start:] for line in lines.split(b"\n")[:-1]]


def small_reply(values: list[bytes]) -> bool:
    """True for a GET reply small enough to build at once with the rest of its batch (at most
    INLINE_REPLY_BYTES of values, and INLINE_REPLY_VALUES of them); the server builds and
    queues a bigger one in chunks."""
    count = len(values)
    return (count == 1 and len(values[0]) <= INLINE_REPLY_BYTES) or (
        count <= INLINE_REPLY_VALUES and sum(map(len, values)) <= INLINE_REPLY_BYTES
    )


def add_small_reply(key: bytes, values: list[bytes], out: list[bytes]) -> bool:
    """Add the reply lines of a GET of ``values`` to ``out`` if it is a :func:`small_reply`
    and ``out`` is not a full chunk yet (REPLY_CHUNK lines: the server queues the rest in
    chunks); False, having added nothing, otherwise."""
    if len(out) < REPLY_CHUNK and small_reply(values):
        out += value_lines(key, values)
        return True
    return False


def stats_line(counters: dict[str, int]) -> bytes:
    """The reply line of STATS: ``name=value`` pairs separated by spaces."""
    return " ".join(f"{name}={value}" for name, value in counters.items()).encode() + b"\n"


def parse_stats(line: bytes) -> dict[str, int]:
    """Inverse of :func:`stats_line` (without the newline). Raises ValueError if malformed."""
    counters: dict[str, int] = {}
    for pair in line.decode("ascii").split():
        name, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"not a STATS line: {line!r}")
        counters[name] = int(value)
    return counters


def parse_value(line: bytes) -> bytes:
    """The value of a GET reply line ``key:value`` (keys never contain ':')."""
    return line.partition(b":")[2]


class ReplyKind(Enum):
    """What a reply line is (see :func:`classify_reply`)."""

    VALUE = "value"
    """``key:value``: one value of a GET."""
    PONG = "pong"
    """``PONG``: every earlier command on the connection was applied."""
    OK = "ok"
    """``OK``: an AUTH was accepted."""
    ERROR = "error"
    """``ERR <reason>``: the command was refused; the reason follows ``ERR ``."""
    OTHER = "other"
    """Any other line without ':': the STATS line (or a line no kvgevent server sends)."""


_VALUE, _PONG, _OK, _ERROR, _OTHER = ReplyKind  # bound once: the client classifies every line


def classify_reply(line: bytes) -> ReplyKind:
    """Classify one reply line (without its newline) by the protocol's own rule: a line with
    a ':' is a GET value, whatever it starts with (a key may be ``ERR x``, so ``GET:ERR x``
    answers ``ERR x:...``), because status lines (``PONG``, ``OK``, ``ERR <reason>``, the
    STATS line) never contain ':'. Status lines are matched exactly and case-sensitively:
    ``ERR`` must be followed by a space and a reason. Every client path uses this function."""
    if COLON in line:
        return _VALUE
    if line == b"PONG":
        return _PONG
    if line.startswith(b"ERR "):
        return _ERROR
    if line == b"OK":
        return _OK
    return _OTHER


# --- requests, for clients -----------------------------------------------------------------


def _check_key(key: bytes) -> None:
    if not key:
        raise InvalidArgument("empty key")
    if COLON in key or NEWLINE in key:
        raise InvalidArgument("a key may not contain ':' or a newline")


def _check_tail(field: bytes, what: str) -> None:
    if NEWLINE in field:
        raise InvalidArgument(f"a {what} may not contain a newline")


def request_line(command: Command) -> bytes:
    """The request line (without its newline) of a command known to be valid, such as one
    :func:`parse` returned: ``parse(request_line(c)) == c``. No checks: see :func:`encode`."""
    kind = command.__class__
    if kind is Put:
        return b"".join((b"PUT:", command[0], b":", command[1]))  # type: ignore[misc]  # (the verb narrows command; mypy does not follow __class__)
    if kind is Update:
        return b"".join((b"UPDATE:", command[0], b":", command[1], b":", command[2]))  # type: ignore[misc]  # (the verb narrows command; mypy does not follow __class__)
    if kind is Delete:
        return b"DELETE:" + command[0]  # type: ignore[misc]  # (the verb narrows command; mypy does not follow __class__)
    if kind is Get:
        return b"GET:" + command[0]  # type: ignore[misc]  # (the verb narrows command; mypy does not follow __class__)
    if kind is Auth:
        return b"AUTH:" + command[0]  # type: ignore[misc]  # (the verb narrows command; mypy does not follow __class__)
    if kind is Ping:
        return b"PING"
    if kind is Stats:
        return b"STATS"
    raise TypeError(f"not a command: {command!r}")


def encode(command: Command) -> bytes:
    """The request line for ``command``, checked, with its newline; raises InvalidArgument
    for what cannot be sent.

    Besides the rules on keys, a newline anywhere is refused, and so is a ``\\r`` at the very
    end of the line (the server would take it for a telnet line ending and drop it), and a ':'
    in the old value of an UPDATE (it would end that field).
    """
    if isinstance(command, Auth):
        _check_tail(command.password, "password")
    elif not isinstance(command, Ping | Stats):
        _check_key(command.key)
        for field in command[1:]:
            _check_tail(field, "value")
        if isinstance(command, Update) and COLON in command.old:
            raise InvalidArgument("the old value of an UPDATE may not contain ':'")
    line = request_line(command)
    if line.endswith(b"\r"):
        raise InvalidArgument("a request may not end in '\\r'")
    return line + b"\n"
