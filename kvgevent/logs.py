"""Logging configuration: the one place that decides what a log line looks like.

Every event is a structlog event with ``timestamp`` (ISO-8601, UTC), ``level`` and ``event``.
``json`` writes one JSON object per line to stderr (for ``jq``/``grep``); ``console`` writes
aligned human-readable lines; ``auto`` picks ``console`` when stderr is a terminal.

gevent prints exceptions that escape a greenlet, and errors in its accept loop, as raw
tracebacks on stderr, which would break a JSON log stream. :func:`configure_logging` routes
them through structlog as ``unhandled_error`` events instead.

No log line holds what a client sent beyond a verb and a key: an exception is logged as its
type and where it was raised (:func:`describe_exception`), never with its frames' local
variables (they hold request lines, an ``AUTH:<password>`` among them), its source lines or,
unless it comes from the OS or is one of kvgevent's fixed phrases, its message.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import stat
import sys
import traceback
from typing import IO, Any
from urllib.parse import urlparse

import gevent
import gevent.monkey
import structlog
from structlog.typing import FilteringBoundLogger

from kvgevent.errors import KVError

Logger = FilteringBoundLogger
"""The type of kvgevent's loggers (structlog's filtering bound logger)."""

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_FORMAT = "auto"
DEFAULT_LOG_LEVEL = "info"


def configure_logging(
    fmt: str = DEFAULT_LOG_FORMAT,
    level: str = DEFAULT_LOG_LEVEL,
    stream: IO[str] | LogFile | None = None,
    worker: int | None = None,
) -> None:
    """Configure structlog for the whole process; may be called again to reconfigure.
    ``worker`` (a worker process's pid) is added to every event when given."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    # structlog's default factories write to stdout; logs belong on stderr.
    output = LogOutput(stream if stream is not None else sys.stderr)
    if fmt == "auto":
        fmt = "console" if output.isatty() else "json"
    processors: list[Any] = [
        _exception_fields(as_text=fmt != "json"),
        structlog.processors.add_log_level,
        *([_add_worker(worker)] if worker is not None else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=output.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write() per event, newline included: with --workers several processes share
        # stderr, and print() writes the newline separately (lines interleaved in a test).
        logger_factory=structlog.WriteLoggerFactory(output),  # type: ignore[arg-type]  # (any text stream will do)
        cache_logger_on_first_use=False,
    )
    _route_hub_errors()


MAX_LOGGED_FRAMES = 20
"""Frames of an exception's traceback logged (the innermost ones): where a bug is, in a line."""


def describe_exception(exc: BaseException) -> dict[str, Any]:
    """An exception as a log field that holds nothing a client sent: ``type``, ``frames``
    (``file:line function``, outermost first) and, only for an OSError (the OS's words, a
    path) or a KVError (a fixed phrase), ``message``. Other messages may quote a request."""
    frames = [
        f"{frame.f_code.co_filename}:{lineno} {frame.f_code.co_name}"
        for frame, lineno in traceback.walk_tb(exc.__traceback__)
    ]
    described: dict[str, Any] = {"type": type(exc).__name__, "frames": frames[-MAX_LOGGED_FRAMES:]}
    if isinstance(exc, OSError | KVError):
        described["message"] = str(exc)[:200]
    return described


def _exception_fields(as_text: bool) -> Any:
    """A processor turning ``exc_info`` (``log.exception(...)``) into a safe ``exception``
    field: the dict of :func:`describe_exception`, or (``as_text``, for the console
    renderer, which prints that field below the event) the same as lines of text."""

    def process(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        exc_info = event.pop("exc_info", None)
        if exc_info:
            if isinstance(exc_info, BaseException):
                exc: BaseException | None = exc_info
            else:
                exc = (sys.exc_info() if exc_info is True else exc_info)[1]
            if exc is not None:
                described = describe_exception(exc)
                event["exception"] = _as_text(described) if as_text else described
        return event

    return process


def _as_text(described: dict[str, Any]) -> str:
    head = described["type"] + (f": {described['message']}" if "message" in described else "")
    return "\n".join([head, *("  at " + frame for frame in described["frames"])])


def _add_worker(worker: int) -> Any:
    def add(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", worker)
        return event

    return add


def get_logger(**bound: Any) -> Logger:
    """A structlog logger with ``bound`` key-values (pass it on to new greenlets explicitly:
    a new greenlet starts with an empty contextvars context)."""
    return structlog.get_logger("kvgevent").bind(**bound)


def _route_hub_errors() -> None:
    hub = gevent.get_hub()
    hub.print_exception = _log_hub_exception  # type: ignore[method-assign,assignment]  # (gevent calls it without self)


def _describe_context(context: Any) -> str | None:
    """Where an error escaped: the context's type and, for a greenlet, the function it ran
    (not its repr: that shows the greenlet's arguments, which may be request bytes)."""
    if context is None:
        return None
    run = getattr(context, "_run", None)
    name = getattr(run, "__qualname__", None)
    return f"{type(context).__name__}({name})" if name else type(context).__name__


def _log_hub_exception(context: Any, etype: Any, value: Any, tb: Any) -> None:
    """Stand-in for ``Hub.print_exception``: one structured event instead of a traceback
    (see :func:`describe_exception` for what it holds)."""
    try:
        exception: dict[str, Any] = {}
        if isinstance(value, BaseException):
            if tb is not None and value.__traceback__ is None:
                value = value.with_traceback(tb)
            exception["exc_info"] = value  # rendered by _exception_fields
        get_logger().error(
            "unhandled_error",
            context=_describe_context(context),
            error_type=getattr(etype, "__name__", "?"),
            **exception,
        )
    except Exception:  # never let error reporting itself raise inside the hub
        pass


def redacted_url(url: str) -> str:
    """``url`` without its password (``:***@``), for logs and events."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


class LogFile:
    """A log file appended to (``--log-file``), reopened at its path on :meth:`reopen`: after
    logrotate renamed it, the next events go to a new file at the path (SIGHUP, as logrotate's
    ``postrotate`` sends). Each event is one ``write(2)`` of a whole line, unbuffered: a write
    that fails (a full disk) leaves nothing half-written behind to be sent later.
    :meth:`write` raises OSError as the system call does (:class:`LogOutput` copes).

    The path may be a pipe (a named pipe a log shipper reads, ``/dev/stderr`` in a
    container): it is opened and written without blocking, so a reader that stops reading
    makes lines dropped (LogBlocked), never a stopped event loop, and a pipe no process reads
    cannot be opened (ENXIO: at start a usage error, on SIGHUP the old file stays). A line a
    full pipe took only part of (longer than the pipe's atomic 4 KiB) is finished before the
    next one, which is dropped until it is: lines stay whole."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._rest = b""  # the part of a line a pipe has not taken yet
        self._fd, self._regular = self._open()

    def _open(self) -> tuple[int, bool]:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise OSError(exc.errno, "a pipe that no process reads") from exc
            raise
        return fd, stat.S_ISREG(os.fstat(fd).st_mode)

    def write(self, text: str) -> int:
        if self._regular:
            _write_all(self._fd, text)
            return len(text)
        if self._rest:  # (BlockingIOError: still full, this line dropped)
            try:
                self._rest = self._rest[os.write(self._fd, self._rest) :]
            except BrokenPipeError:  # (its reader is gone: a new one must not start with it)
                self._rest = b""
                raise
            if self._rest:
                raise LogBlocked(errno.EAGAIN, _PIPE_FULL)
        data = text.encode("utf-8", "backslashreplace")
        try:
            written = os.write(self._fd, data)
        except BlockingIOError:
            raise LogBlocked(errno.EAGAIN, _PIPE_FULL) from None
        self._rest = data[written:]
        return len(text)

    def fileno(self) -> int:
        return self._fd

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def reopen(self) -> OSError | None:
        """Open the path anew and switch to it (what was written before went to the old
        file, whatever its name now); the old file is closed after the switch. If the path
        cannot be opened (its directory gone, a directory in its place), the old file stays
        the log, and the error is returned: never raised (it comes from a signal handler)."""
        try:
            new, regular = self._open()
        except OSError as exc:
            return exc
        old, self._fd, self._regular, self._rest = self._fd, new, regular, b""
        os.close(old)
        return None

    def close(self) -> None:
        os.close(self._fd)


class LogOutput:
    """Where log lines go (stderr, or a :class:`LogFile`): a line that cannot be written (a
    full disk, a pipe whose reader is gone) is dropped, never raised into the code that
    logged (a client's handler: each such error reset that client, every client once the
    log's disk was full). The first failure of an episode says so once on stderr, when the
    log is a file (systemd's journal keeps it); once a line is written again (for a file,
    once its filesystem has LOG_ROOM free), a ``log_lines_lost`` event follows it, with how
    many were dropped and why."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.lost = 0  # lines dropped in the current episode
        self.error = ""  # why the first of them was

    def write(self, text: str) -> int:
        if self.lost and _short_of_room(self.stream):  # (the episode goes on: see LOG_ROOM)
            self.lost += 1
            return len(text)
        try:
            if self.stream is sys.stderr:
                _write_or_drop(self.stream, text)
            else:
                self.stream.write(text)
        except (OSError, ValueError) as exc:  # (ValueError: a closed stream)
            self._dropped(exc)
            return len(text)
        if self.lost:
            self._recovered()
        return len(text)

    def _dropped(self, exc: Exception) -> None:
        self.lost += 1
        if self.lost > 1:
            return
        self.error = str(exc)[:200]
        if isinstance(self.stream, LogFile) and not _is_stderr(self.stream.fileno()):
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.write(
                    f"kvgevent: cannot write the log file {self.stream.path}: {self.error}; "
                    "dropping log lines until it can\n"
                )
                sys.stderr.flush()

    def _recovered(self) -> None:
        lost, error = self.lost, self.error
        self.lost, self.error = 0, ""
        # (after this line, not inside its write: the logger writes through here)
        gevent.get_hub().loop.run_callback(_report_lost, lost, error)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def isatty(self) -> bool:
        try:
            return bool(self.stream.isatty())
        except (OSError, ValueError):
            return False


LOG_ROOM = 64 << 10
"""Bytes free a log file's filesystem must have again before lines that could not be written
(a full disk) are written again: with less, a short line fits where a longer one failed,
and the log would begin and end an episode of lost lines at almost every line."""

_poll = gevent.monkey.get_original("select", "poll")  # (the OS's: a look that never yields)


class LogBlocked(OSError):
    """stderr cannot take a line now (a pipe or terminal whose reader stopped reading)."""


_PIPE_FULL = "the log's pipe is full (its reader is not reading)"


def _write_or_drop(stream: Any, text: str) -> None:
    """Write ``text`` to ``stream`` (stderr) now, or raise LogBlocked if it would block the
    event loop: a pipe whose reader is alive but not reading (a stuck log shipper) filled
    up and blocked every client. Looked at with poll(2), no wait; a line longer than a
    pipe's page may still block once it does not fit."""
    stream.flush()
    try:
        fd = stream.fileno()
    except (OSError, ValueError, AttributeError):  # (not a file: write as it is)
        stream.write(text)
        return
    watch = _poll()
    watch.register(fd, select.POLLOUT)
    if not watch.poll(0):
        raise LogBlocked(errno.EAGAIN, "stderr is not being read (its pipe is full)")
    _write_all(fd, text)


def _write_all(fd: int, text: str) -> None:
    """Write ``text`` to ``fd`` whole (the usual line in one ``write(2)``); OSError as it comes,
    after taking back the part of the line written before it (:func:`_take_back`)."""
    data = text.encode("utf-8", "backslashreplace")
    written = 0
    try:
        while written < len(data):
            written += os.write(fd, data[written:])
    except OSError:
        if written:
            _take_back(fd, written)
        raise


def _take_back(fd: int, count: int) -> None:
    """Cut the ``count`` bytes of a line that a failed write left at the end of a regular
    file: on a nearly full disk the first ``write(2)`` fills the last block and returns
    short, the next fails, and the next line written would be glued to that fragment (a
    line that is not JSON, and the event after it lost to a parser). Left as it is when
    another writer appended after it (another process on the file) or ``fd`` is not a
    regular file (a pipe)."""
    with contextlib.suppress(OSError):
        end = os.lseek(fd, 0, os.SEEK_CUR)
        status = os.fstat(fd)
        if stat.S_ISREG(status.st_mode) and status.st_size == end and end >= count:
            os.ftruncate(fd, end - count)
            os.lseek(fd, end - count, os.SEEK_SET)  # (a file not opened to append: no hole)


def _short_of_room(stream: Any) -> bool:
    """Whether ``stream`` is a regular file on a filesystem with less than LOG_ROOM free (for
    root, the blocks reserved for it count: it writes into them)."""
    try:
        fd = stream.fileno()
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        disk = os.fstatvfs(fd)
    except (OSError, ValueError, AttributeError):
        return False
    free = disk.f_bfree if os.geteuid() == 0 else disk.f_bavail
    return free * disk.f_frsize < LOG_ROOM


def _is_stderr(fd: int) -> bool:
    """Whether ``fd`` is the file stderr is (``--log-file /dev/stderr``): no notice about it
    goes to stderr, where it would be a line that is not JSON in the log it is about."""
    try:
        ours, theirs = os.fstat(fd), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)


def _report_lost(lines: int, error: str) -> None:
    get_logger().warning("log_lines_lost", lines=lines, error=error)
