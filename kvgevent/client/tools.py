"""The client's long-running modes: ``--pipe`` (mass insertion), ``--stat`` (live counters)
and ``--latency`` (PING round trips), over the client library (run_client.py is not
monkey-patched). ``--pipe`` writes stdin while it reads replies (:meth:`Client.exchange`), so
it gives up after ``--timeout`` seconds in which the server neither took nor sent a byte."""

from __future__ import annotations

import os
import re
import selectors
import stat
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import BinaryIO, TextIO

from kvgevent.client.client import Client
from kvgevent.errors import ConnectionLost
from kvgevent.protocol import ReplyKind, classify_reply

PIPE_CHUNK = 1 << 20
"""Bytes of input read and sent at a time in --pipe mode; each chunk is followed by one PING."""

PIPE_FIRST_ERRORS = 5
"""ERR lines --pipe shows (on stderr) besides counting them all."""

PROGRESS_EVERY = 0.25
"""Seconds between two updates of the --pipe progress line on a terminal."""

LATENCY_GAP = 0.01
"""Seconds between two PINGs in --latency mode (as redis-cli: a probe, not a load)."""

STATS_OWN_COMMANDS = 2
"""Commands that one sample of --stat adds to the server's count (STATS and its PING)."""

_PING = re.compile(rb"^ping\r?$", re.IGNORECASE | re.MULTILINE)
_STATS = re.compile(rb"^stats\r?$", re.IGNORECASE | re.MULTILINE)
_AUTH = re.compile(rb"^auth:", re.IGNORECASE | re.MULTILINE)
_GET_KEY = re.compile(rb"^get:([^:\n]*?)\r?$", re.IGNORECASE | re.MULTILINE)
"""The lines of a chunk that are answered by something else than ERR (as the server reads
them, in any case): a PING by PONG, a STATS by its line, an AUTH by OK, a GET by its values."""


@dataclass
class PipeSummary:
    commands: int = 0
    errors: int = 0
    replies: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    first_errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        rate = self.commands / self.seconds if self.seconds > 0 else 0.0
        return (
            f"sent {self.commands} commands ({self.bytes_sent / 1e6:.1f} MB) in {self.seconds:.2f} s "
            f"({rate:,.0f}/s): {self.errors} errors, {self.replies} reply lines"
        )


class _PipeInput:
    """The :class:`~kvgevent.client.Source` of --pipe: stdin in chunks of whole lines, each
    chunk followed by a PING; an unterminated last line is sent with a newline. Counts what it
    gives in ``summary``, the PONGs that must come back in ``pongs_due``, and what each chunk
    not yet answered in full may be answered with in ``chunks``."""

    def __init__(self, source: BinaryIO, summary: PipeSummary, progress: TextIO | None) -> None:
        self.source = source
        self.summary = summary
        self.progress = progress
        self.pongs_due = 0
        self.chunks: deque[_ChunkReplies] = deque()  # those whose last PONG has not come
        self.pending = b""  # an incomplete last line, until its newline is read
        self.ended = False
        self.started = self.last_progress = time.monotonic()
        self.read_fd = _fileno(source)
        # A regular file is always readable: read it without waiting, as a file the OS cannot
        # watch (/dev/null, stdin under cron or systemd). A pipe or a terminal is read only
        # once it has something, so replies keep being read meanwhile.
        regular = self.read_fd is not None and stat.S_ISREG(os.fstat(self.read_fd).st_mode)
        self.fd = None if regular or not _watchable(self.read_fd) else self.read_fd

    def read(self) -> bytes | None:
        if self.ended:
            return None
        chunk = (
            os.read(self.read_fd, PIPE_CHUNK) if self.read_fd is not None else self.source.read(PIPE_CHUNK)
        )
        if chunk:
            data = self.pending + chunk
            cut = data.rfind(b"\n") + 1
            data, self.pending = data[:cut], data[cut:]
        else:
            data, self.pending, self.ended = (self.pending + b"\n" if self.pending else b""), b"", True
        self._show_progress()
        if not data:
            return None if self.ended else b""
        self.summary.commands += data.count(b"\n")
        self.summary.bytes_sent += len(data)
        chunk_replies = _ChunkReplies(data)
        self.chunks.append(chunk_replies)
        self.pongs_due += chunk_replies.pongs
        return data + b"PING\n"

    def _show_progress(self) -> None:
        now = time.monotonic()
        if self.progress is None or now - self.last_progress < PROGRESS_EVERY:
            return
        self.last_progress = now
        rate = self.summary.commands / (now - self.started)
        self.progress.write(
            f"\r{self.summary.commands:,} commands sent ({self.summary.bytes_sent / 1e6:.1f} MB), "
            f"{rate:,.0f}/s, {self.summary.errors} errors "
        )
        self.progress.flush()


def _watchable(fd: int | None) -> bool:
    """Whether the OS can tell when ``fd`` is readable (epoll refuses /dev/null: EPERM)."""
    if fd is None:
        return False
    with selectors.DefaultSelector() as selector:
        try:
            selector.register(fd, selectors.EVENT_READ)
        except (OSError, ValueError):
            return False
    return True


def _fileno(source: BinaryIO) -> int | None:
    try:
        return source.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last
        return None


class _ChunkReplies:
    """What the lines of one chunk (with its PING) may be answered with besides ERR lines:
    ``pongs`` PONGs, values of the keys it reads, its STATS lines and its AUTHs' OKs. Only
    the PINGs are counted at once (a scan of the chunk costs about as much as sending it):
    the rest when such a reply comes, so a chunk of writes answered with nothing costs nothing
    more. The chunk is kept until its last PONG came (a few MiB at most: what the sockets
    hold)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        # (a substring test in C, far cheaper than a multi-line scan with no PING to find)
        self.pongs = 1 + (len(_PING.findall(data)) if b"ping" in data.lower() else 0)
        self._keys: set[bytes] | None = None
        self._left = {_STATS: -1, _AUTH: -1}  # of each, those not answered yet (-1: not counted)

    def reads(self, key: bytes) -> bool:
        """Whether a line of this chunk is a GET of ``key``."""
        if self._keys is None:
            self._keys = set(_GET_KEY.findall(self.data))
        return key in self._keys

    def answered(self, kind: re.Pattern[bytes]) -> bool:
        """Count one reply to a ``kind`` line (_STATS or _AUTH); False if none was left."""
        left = self._left[kind]
        if left < 0:
            left = len(kind.findall(self.data))
        self._left[kind] = left - 1
        return left > 0


class _PipeReplies:
    """The :class:`~kvgevent.client.Replies` of --pipe: counts PONGs, ERR lines (keeping the
    first few) and every other line, each told apart by :func:`classify_reply`, and checks
    each against the chunk it answers (the oldest whose last PONG has not come): a line none
    of that chunk's commands can be answered with (a value of a key it does not read, a PONG,
    STATS line or OK more than it asked for) raises ConnectionLost, as the library does, since
    the replies can no longer be matched to the commands. An ERR line may answer any line."""

    def __init__(self, source: _PipeInput) -> None:
        self.source = source
        self.summary = source.summary
        self.pongs = 0

    def feed(self, lines: list[bytes]) -> None:
        chunks = self.source.chunks
        for line in lines:
            kind = classify_reply(line)
            if kind is ReplyKind.ERROR:
                self._error(line)
                continue
            if not chunks:
                raise _unexpected(line)
            chunk = chunks[0]
            if kind is ReplyKind.PONG:
                self.pongs += 1
                chunk.pongs -= 1
                if not chunk.pongs:
                    chunks.popleft()
                continue
            self.summary.replies += 1
            if kind is ReplyKind.VALUE:
                expected = chunk.reads(line.partition(b":")[0])
            else:
                expected = chunk.answered(_AUTH if kind is ReplyKind.OK else _STATS)
            if not expected:
                raise _unexpected(line)

    def _error(self, line: bytes) -> None:
        self.summary.errors += 1
        if len(self.summary.first_errors) < PIPE_FIRST_ERRORS:
            self.summary.first_errors.append(line.decode(errors="replace"))

    def complete(self) -> bool:
        return self.pongs >= self.source.pongs_due


def _unexpected(line: bytes) -> ConnectionLost:
    return ConnectionLost(f"unexpected reply from the server to --pipe: {line[:80]!r}")


def run_pipe(client: Client, source: BinaryIO, progress: TextIO | None) -> PipeSummary:
    """Send every line of ``source`` on ``client``'s connection as fast as the server takes
    it, reading replies meanwhile; count them. ``progress``, when given (a terminal), gets a
    progress line while the input lasts. Raises ConnectionLost if the connection fails or the
    server neither takes nor sends a byte for the client's timeout while something is due
    (waiting for input has no limit). The client's connection is closed at the end."""
    summary = PipeSummary()
    pipe_input = _PipeInput(source, summary, progress)
    try:
        client.exchange(pipe_input, _PipeReplies(pipe_input))
    finally:
        if progress is not None and time.monotonic() - pipe_input.started >= PROGRESS_EVERY:
            progress.write("\n")
        client.close()
    summary.seconds = time.monotonic() - pipe_input.started
    return summary


STAT_COLUMNS = ("time", "active", "dropped", "connections", "cmds/s", "msgs_dropped", "keys", "errors")
STAT_HEADER_EVERY = 20
"""Lines between two repetitions of the --stat header on a terminal."""


def run_stat(client: Client, interval: float, count: int | None, out: TextIO, tty: bool) -> None:
    """Print the server's counters every ``interval`` seconds, ``count`` times (None: forever)."""
    previous, previous_at = client.stats(), time.monotonic()
    printed = 0
    while count is None or printed < count:
        time.sleep(interval)
        stats, now = client.stats(), time.monotonic()
        if printed % STAT_HEADER_EVERY == 0 and (tty or printed == 0):
            out.write(_stat_row(STAT_COLUMNS))
        # (a figure the server did not send shows as "-": keys while the store cannot count
        # them, in a Redis outage; any of them from a server older or newer than this client)
        row = [
            time.strftime("%H:%M:%S"),
            stats.get("active", "-"),
            stats.get("dropped", "-"),
            stats.get("connections", "-"),
            _rate(previous, stats, now - previous_at),
            stats.get("messages_dropped", "-"),
            stats.get("keys", "-"),
            stats.get("errors", "-"),
        ]
        out.write(_stat_row(row))
        out.flush()
        previous, previous_at = stats, now
        printed += 1


def _rate(previous: dict[str, int], stats: dict[str, int], seconds: float) -> str:
    """Commands a second between two samples, without --stat's own ("-" if not both have it)."""
    if "commands" not in stats or "commands" not in previous:
        return "-"
    done = stats["commands"] - previous["commands"] - STATS_OWN_COMMANDS
    return f"{max(done, 0) / seconds:.0f}"


def _stat_row(values: Sequence[object]) -> str:
    first, *rest = values
    return f"{first!s:<8}" + "".join(f"{value!s:>13}" for value in rest) + "\n"


def run_latency(client: Client, interval: float, count: int | None, out: TextIO) -> None:
    """Measure PING round trips; print min/avg/p50/p99/max once per ``interval`` seconds."""
    printed = 0
    while count is None or printed < count:
        samples: list[float] = []
        end = time.monotonic() + interval
        while not samples or time.monotonic() < end:  # at least one sample per line
            begin = time.perf_counter()
            client.ping()
            samples.append((time.perf_counter() - begin) * 1000)
            time.sleep(LATENCY_GAP)
        samples.sort()
        n = len(samples)
        out.write(
            f"latency ms: min {samples[0]:.3f} avg {sum(samples) / n:.3f} "
            f"p50 {samples[n // 2]:.3f} p99 {samples[min(n - 1, n * 99 // 100)]:.3f} "
            f"max {samples[-1]:.3f} ({n} samples)\n"
        )
        out.flush()
        printed += 1
