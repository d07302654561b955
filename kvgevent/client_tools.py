"""The client's long-running modes: ``--pipe`` (mass insertion), ``--stat`` (live counters)
and ``--latency`` (PING round trips). Plain blocking sockets and threads: run_client.py is
not monkey-patched."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TextIO

from .client import Client
from .errors import ConnectionLost
from .protocol import LineBuffer

PIPE_CHUNK = 1 << 20
"""Bytes of input sent per write in --pipe mode; each write is followed by one PING."""

PROGRESS_EVERY = 0.25
"""Seconds between two updates of the --pipe progress line on a terminal."""

LATENCY_GAP = 0.01
"""Seconds between two PINGs in --latency mode (as redis-cli: a probe, not a load)."""

STATS_OWN_COMMANDS = 2
"""Commands that one sample of --stat adds to the server's count (STATS and its PING)."""

_USER_PING = re.compile(rb"^ping\r?$", re.IGNORECASE | re.MULTILINE)


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


class _ReplyCounter(threading.Thread):
    """Reads every reply of a --pipe connection, counting PONGs, ERR lines and the rest."""

    def __init__(self, stream: Any) -> None:
        super().__init__(daemon=True)
        self.stream = stream
        self.pongs = 0
        self.errors = 0
        self.replies = 0
        self.first_errors: list[str] = []
        self.failure: str | None = None
        self.last_reply = time.monotonic()
        self.changed = threading.Condition()

    def run(self) -> None:
        buffer = LineBuffer(1 << 26)
        try:
            while data := self.stream.recv(1 << 16):
                pongs = errors = other = 0
                for line in buffer.feed(data):
                    if line == b"PONG":
                        pongs += 1
                    elif isinstance(line, bytes) and line.startswith(b"ERR "):
                        errors += 1
                        if len(self.first_errors) < 5:
                            self.first_errors.append(line.decode(errors="replace"))
                    else:
                        other += 1
                with self.changed:
                    self.pongs += pongs
                    self.errors += errors
                    self.replies += other
                    self.last_reply = time.monotonic()
                    self.changed.notify_all()
            self.failure = "the server closed the connection"
        except OSError as exc:
            self.failure = f"connection failed: {exc.strerror or exc}"
        with self.changed:
            self.changed.notify_all()

    def wait_for(self, pongs: int, stall: float) -> None:
        """Block until ``pongs`` PONGs arrived; raise ConnectionLost if the connection fails or
        nothing arrives for ``stall`` seconds."""
        with self.changed:
            while self.pongs < pongs:
                if self.failure:
                    raise ConnectionLost(self.failure)
                if time.monotonic() - self.last_reply > stall:
                    raise ConnectionLost(f"no reply for {stall:.0f} s (replies may have been dropped)")
                self.changed.wait(0.1)


def run_pipe(client: Client, source: BinaryIO, progress: TextIO | None) -> PipeSummary:
    """Send every line of ``source`` on ``client``'s connection as fast as the server takes
    it; count replies and errors. ``progress``, when given (a terminal), gets a progress line
    while the input lasts. The client's connection is used up: it is closed at the end."""
    stream = client.stream
    if stream is None:
        raise ConnectionLost("not connected")
    stall = max(client.timeout or 60.0, 1.0)
    client._sock.settimeout(None)  # type: ignore[union-attr]  # the reader blocks; stalls are detected by wait_for
    counter = _ReplyCounter(stream)
    counter.start()
    summary = PipeSummary()
    start = last_progress = time.monotonic()
    expected_pongs = 0
    pending = b""
    try:
        while True:
            chunk = source.read(PIPE_CHUNK)
            if chunk:
                data = pending + chunk
                cut = data.rfind(b"\n") + 1
                data, pending = data[:cut], data[cut:]
            else:
                data, pending = (pending + b"\n" if pending else b""), b""
            if data:
                summary.commands += data.count(b"\n")
                expected_pongs += 1 + len(_USER_PING.findall(data))
                stream.sendall(data + b"PING\n")
                summary.bytes_sent += len(data)
            now = time.monotonic()
            if progress is not None and now - last_progress >= PROGRESS_EVERY:
                last_progress = now
                rate = summary.commands / (now - start)
                progress.write(
                    f"\r{summary.commands:,} commands sent ({summary.bytes_sent / 1e6:.1f} MB), "
                    f"{rate:,.0f}/s, {counter.errors} errors "
                )
                progress.flush()
            if not chunk:
                break
        counter.wait_for(expected_pongs, stall=stall)
    except OSError as exc:
        raise ConnectionLost(f"connection failed: {exc.strerror or exc}") from exc
    finally:
        if progress is not None and time.monotonic() - start >= PROGRESS_EVERY:
            progress.write("\n")
        client.close()
    summary.seconds = time.monotonic() - start
    summary.errors = counter.errors
    summary.replies = counter.replies
    summary.first_errors = counter.first_errors
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
        done = stats["commands"] - previous["commands"] - STATS_OWN_COMMANDS
        rate = max(done, 0) / (now - previous_at)
        if printed % STAT_HEADER_EVERY == 0 and (tty or printed == 0):
            out.write(_stat_row(STAT_COLUMNS))
        row = [
            time.strftime("%H:%M:%S"),
            stats["active"],
            stats["dropped"],
            stats.get("connections", 0),
            f"{rate:.0f}",
            stats["messages_dropped"],
            stats["keys"],
            stats.get("errors", 0),
        ]
        out.write(_stat_row(row))
        out.flush()
        previous, previous_at = stats, now
        printed += 1


def _stat_row(values: Sequence[object]) -> str:
    first, *rest = values
    return f"{first!s:<8}" + "".join(f"{value!s:>13}" for value in rest) + "\n"


def run_latency(client: Client, interval: float, count: int | None, out: TextIO) -> None:
    """Measure PING round trips; print min/avg/p50/p99/max once per ``interval`` seconds."""
    printed = 0
    while count is None or printed < count:
        samples: list[float] = []
        end = time.monotonic() + interval
        while time.monotonic() < end:
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
