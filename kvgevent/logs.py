"""Logging configuration: the one place that decides what a log line looks like.

Every event is a structlog event with ``timestamp`` (ISO-8601, UTC), ``level`` and ``event``.
``json`` writes one JSON object per line to stderr (for ``jq``/``grep``); ``console`` writes
aligned human-readable lines; ``auto`` picks ``console`` when stderr is a terminal.

gevent prints exceptions that escape a greenlet, and errors in its accept loop, as raw
tracebacks on stderr, which would break a JSON log stream. :func:`configure_logging` routes
them through structlog as ``unhandled_error`` events instead.
"""

from __future__ import annotations

import logging
import sys
import traceback
from typing import IO, Any

import gevent
import structlog

LOG_FORMATS = ("auto", "json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_LOG_FORMAT = "auto"
DEFAULT_LOG_LEVEL = "info"


def configure_logging(
    fmt: str = DEFAULT_LOG_FORMAT,
    level: str = DEFAULT_LOG_LEVEL,
    stream: IO[str] | None = None,
    worker: int | None = None,
) -> None:
    """Configure structlog for the whole process; may be called again to reconfigure.
    ``worker`` (a worker process's pid) is added to every event when given."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}")
    if level not in LOG_LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LOG_LEVELS)}")
    # structlog's default factories write to stdout; logs belong on stderr.
    stream = stream if stream is not None else sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    processors: list[Any] = [
        structlog.processors.add_log_level,
        *([_add_worker(worker)] if worker is not None else []),
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if fmt == "json":
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer(colors=stream.isatty())]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        # One write() per event, newline included: with --workers several processes share
        # stderr, and print() writes the newline separately (lines interleaved in a test).
        logger_factory=structlog.WriteLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    _route_hub_errors()


def _add_worker(worker: int) -> Any:
    def add(logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
        event.setdefault("worker", worker)
        return event

    return add


def get_logger(**bound: Any) -> Any:
    """A structlog logger with ``bound`` key-values (pass it on to new greenlets explicitly:
    a new greenlet starts with an empty contextvars context)."""
    return structlog.get_logger("kvgevent").bind(**bound)


def _route_hub_errors() -> None:
    hub = gevent.get_hub()
    hub.print_exception = _log_hub_exception  # type: ignore[method-assign]


def _log_hub_exception(context: Any, etype: Any, value: Any, tb: Any) -> None:
    """Stand-in for ``Hub.print_exception``: one structured event instead of a traceback."""
    try:
        where = repr(context)[:200] if context is not None else None
        text = "".join(traceback.format_exception(etype, value, tb)) if etype else repr(value)
        get_logger().error(
            "unhandled_error", context=where, error_type=getattr(etype, "__name__", "?"), traceback=text
        )
    except Exception:  # never let error reporting itself raise inside the hub
        pass
