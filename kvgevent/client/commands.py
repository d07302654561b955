"""What the command-line client understands and how it shows results; no I/O.

A request is typed either as a protocol line (``PUT:fruit:apple``, ``GET:fruit``), sent as is,
or as words (``put fruit apple``, ``get fruit``), checked and encoded by the client library.
The rule: a request whose first word contains ':' is a protocol line; anything else is words.
Words follow shell quoting (``put greeting "hello world"``).

Results are shown for people on a terminal (``1) "apple"``, ``(empty)``, ``(error) ...``)
and raw otherwise: one value per line and nothing else, so the output composes with shell
tools.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from kvgevent.client.client import server_error
from kvgevent.errors import InvalidArgument, ServerError
from kvgevent.protocol import (
    PING,
    STATS,
    Auth,
    Command,
    Delete,
    Get,
    Put,
    ReplyKind,
    Stats,
    Update,
    classify_reply,
    encode,
)

USAGE = {
    "get": ("get KEY", "the values of KEY, in stored order"),
    "put": ("put KEY VALUE", "append VALUE to KEY"),
    "update": ("update KEY OLD NEW", "replace the first OLD by NEW, appended at the end"),
    "delete": ("delete KEY", "remove KEY and all its values"),
    "ping": ("ping", "round trip to the server"),
    "stats": ("stats", "the server's counters"),
    "auth": ("auth PASSWORD", "authenticate, when the server has a password"),
}

HELP = "\n".join(
    [
        "Commands, as words (shell quoting) or as protocol lines:",
        *(f"  {usage:<22} {text}" for usage, text in USAGE.values()),
        "  PUT:key:value, GET:key, UPDATE:key:old:new, DELETE:key, PING, STATS, AUTH:password",
        "                         sent as typed; the replies are shown as the server sent them",
        "  help                   this text",
        "  quit, exit, Ctrl-D     leave",
    ]
)


@dataclass(frozen=True)
class Request:
    """One request typed by a user: a checked command, or a protocol line sent as typed."""

    command: Command | None = None
    raw: bytes | None = None


def without_line_ending(text: str) -> str:
    """``text`` without one trailing ``\\r\\n`` or ``\\n``: the only thing taken off a typed line."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def parse_request(text: str) -> Request:
    """Turn what a user typed into a :class:`Request`; raises InvalidArgument with a usage
    message for words that do not make a command, or for a blank line. A protocol line is
    sent exactly as typed: only its line ending (``\\r\\n`` or ``\\n``) is removed, spaces
    and tabs anywhere are kept."""
    text = without_line_ending(text)
    if not text.strip():
        raise InvalidArgument("empty request")
    first = text.split(None, 1)[0]
    if ":" in first:
        return Request(raw=text.encode("utf-8", "surrogateescape"))
    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise InvalidArgument(f"cannot parse the request: {exc}") from None
    return Request(command=command_from_words(words))


def command_from_words(words: list[str]) -> Command:
    """``["put", "k", "v"]`` → ``Put(b"k", b"v")``; raises InvalidArgument on bad usage."""
    name, args = words[0].lower(), [w.encode("utf-8", "surrogateescape") for w in words[1:]]
    if name not in USAGE:
        # (escaped: a word piped in from elsewhere may hold control bytes or not be UTF-8)
        word = escape_line(words[0].encode("utf-8", "surrogateescape"))
        raise InvalidArgument(f"unknown command '{word}' (try: help)")
    if len(args) != len(USAGE[name][0].split()) - 1:  # the usage line names every argument
        raise InvalidArgument(f"usage: {USAGE[name][0]}")
    command: Command
    if name == "get":
        command = Get(args[0])
    elif name == "put":
        command = Put(args[0], args[1])
    elif name == "update":
        command = Update(args[0], args[1], args[2])
    elif name == "delete":
        command = Delete(args[0])
    elif name == "ping":
        command = PING
    elif name == "auth":
        command = Auth(args[0])
    else:
        command = STATS
    encode(command)  # refuse now what could not be sent (':' in a key, a newline, ...)
    return command


def escape(value: bytes) -> str:
    """A value as a double-quoted string: printable UTF-8 as is; quotes, backslashes,
    control characters and bytes that are not UTF-8 as escapes (``"a\\x00b"``)."""
    return '"' + _escaped(value, '"\\') + '"'


def escape_line(line: bytes) -> str:
    """A reply line for a terminal, unquoted, escaped as :func:`escape` does (backslashes,
    control characters, bytes that are not UTF-8): whatever a stored value holds (ESC, OSC
    sequences, a bell), the terminal shows it and obeys none of it."""
    return _escaped(line, "\\")


def _escaped(value: bytes, specials: str) -> str:
    out = []
    for char in value.decode("utf-8", "surrogateescape"):
        if char in specials:
            out.append("\\" + char)
        elif char.isprintable():
            out.append(char)
        elif "\udc80" <= char <= "\udcff":  # a byte that is not UTF-8
            out.append(f"\\x{ord(char) - 0xDC00:02x}")
        else:
            out.append(char.encode("unicode_escape").decode("ascii"))
    return "".join(out)


def show_result(command: Command, result: object, tty: bool) -> list[bytes]:
    """The output lines for a word command's result (errors are shown by the caller)."""
    if isinstance(command, Get):
        values: list[bytes] = result  # type: ignore[assignment]  # (a GET's result)
        if not tty:
            return values
        if not values:
            return [b"(empty)"]
        width = len(str(len(values)))
        return [f"{i:>{width}}) {escape(v)}".encode() for i, v in enumerate(values, 1)]
    if isinstance(command, Stats):
        counters: dict[str, int] = result  # type: ignore[assignment]  # (a STATS result)
        if tty:
            width = max(map(len, counters), default=0)
            return [
                f"{escape_line(name.encode()):<{width}}  {value}".encode() for name, value in counters.items()
            ]
        return [f"{name}={value}".encode() for name, value in counters.items()]
    if command is PING:
        return [b"PONG"]
    if isinstance(command, Auth):
        return [b"OK"]
    return [b"OK"] if tty else []


def show_raw_reply(lines: list[bytes], tty: bool) -> list[bytes]:
    """The output for a protocol line: the server's reply lines, as sent when piped; on a
    terminal escaped by :func:`escape_line` (``(no reply)`` when there were none)."""
    if not tty:
        return lines
    if not lines:
        return [b"(no reply)"]
    return [escape_line(line).encode() for line in lines]


def reply_error(lines: list[bytes]) -> ServerError | None:
    """The first ``ERR`` status line among reply lines, as an exception, if any. A line with
    a ':' is a value, even one that starts with ``ERR `` (:func:`classify_reply`)."""
    for line in lines:
        if classify_reply(line) is ReplyKind.ERROR:
            return server_error(line)
    return None


def error_message(error: ServerError) -> str:
    """How an ``ERR`` reply is shown: ``(error) ERR <reason>``, the reason escaped (it came
    from the server)."""
    return "(error) ERR " + escape_line(error.reason.encode())
