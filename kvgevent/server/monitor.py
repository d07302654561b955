"""Monitoring over HTTP, from the server's own process and gevent hub: Prometheus metrics and
health endpoints (``--metrics-port``).

- ``GET /metrics``: the Prometheus text format, produced by ``prometheus_client`` from a
  registry of this server's own (so several servers in one process do not mix): what STATS
  has, under ``kvgevent_`` names, read from the server's counters at scrape time (the hot
  path pays nothing for a counter), histograms of batch times, PING barrier waits, the
  append-only file's fsyncs and compactions (:class:`~kvgevent.timings.Timings`, cheap to
  observe), and ``prometheus_client``'s process metrics (RSS, CPU, open fds).
- ``GET /healthz``: 200 while the process serves; ``GET /readyz``: 200 when the listener is
  up, the store reachable and the append-only file writable, else 503 with a one-line reason.
- Anything else: 404. This listener never speaks the key-value protocol.

HTTP is served by ``gevent.pywsgi``: each request is a greenlet of the hub; a scrape costs the
event loop about as much as a STATS.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from gevent import GreenletExit, get_hub, getcurrent, sleep
from gevent.pool import Pool
from gevent.pywsgi import WSGIHandler, WSGIServer
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kvgevent.config import (
    METRICS_BACKLOG,
    METRICS_CONNECTIONS,
    METRICS_GRACE,
    METRICS_REQUESTS,
    METRICS_STOP,
    METRICS_TIMEOUT,
)
from kvgevent.errors import KVError
from kvgevent.logs import Logger
from kvgevent.protocol import Auth, Delete, Get, Ping, Put, Stats, Update
from kvgevent.server.net import PausingListener
from kvgevent.timings import Timings

if TYPE_CHECKING:
    from kvgevent.server.server import KeyValueServer

VERB_NAMES: dict[Any, str] = {
    Put: "put",
    Get: "get",
    Update: "update",
    Delete: "delete",
    Ping: "ping",
    Stats: "stats",
    Auth: "auth",
}
"""The ``verb`` label of a request class (anything else, an error line: ``other``)."""

# STATS names -> (metric name, counter or gauge, help). Counters get ``_total`` from
# prometheus_client.
_SERVER = (
    ("accepted", "kvgevent_connections", "counter", "Clients accepted."),
    ("rejected", "kvgevent_clients_rejected", "counter", "Clients refused over --max-clients."),
    (
        "accept_failures",
        "kvgevent_accept_failures",
        "counter",
        "accept() calls failed for want of files or memory.",
    ),
    (
        "messages_dropped",
        "kvgevent_messages_dropped",
        "counter",
        "Replies dropped for clients that do not read.",
    ),
    ("commands", "kvgevent_requests", "counter", "Request lines received (ERR ones too)."),
    ("lines_too_long", "kvgevent_lines_too_long", "counter", "Request lines over the line bound."),
    ("auth_failures", "kvgevent_auth_failures", "counter", "Wrong passwords."),
    ("auth_throttled", "kvgevent_auth_throttled", "counter", "AUTHs delayed or refused by the throttle."),
)
_MEMORY = (
    ("maxmemory", "kvgevent_memory_limit_bytes", "gauge", "--max-memory (0: no limit)."),
    ("used_memory", "kvgevent_memory_used_bytes", "gauge", "Memory in use, by kvgevent's accounting."),
    ("used_memory_clients", "kvgevent_memory_clients_bytes", "gauge", "Bytes client buffers hold."),
    ("oom_rejected", "kvgevent_oom_rejected", "counter", "Writes refused over --max-memory."),
    ("evicted_clients", "kvgevent_clients_evicted", "counter", "Clients disconnected for memory."),
)
STORE_METRICS = {
    "aof_bytes": ("kvgevent_aof_bytes", "gauge", "Size of the append-only file."),
    "aof_records": ("kvgevent_aof_records", "gauge", "Records in the file since the last compaction."),
    "aof_rewrites": ("kvgevent_aof_rewrites", "counter", "Compactions done."),
    "aof_rewriting": ("kvgevent_aof_rewriting", "gauge", "1 while a compaction runs."),
    "aof_rewrite_failures": ("kvgevent_aof_rewrite_failures", "counter", "Compactions that failed."),
    "aof_fsync_errors": ("kvgevent_aof_fsync_errors", "counter", "fsyncs of the file that failed."),
    "aof_write_errors": ("kvgevent_aof_write_errors", "counter", "Writes to the file that failed."),
    "aof_writes_refused": ("kvgevent_aof_writes_refused", "counter", "Writes refused while the log failed."),
    "aof_ok": ("kvgevent_aof_ok", "gauge", "1 while the log takes writes, 0 during a failure episode."),
    "store_unavailable": ("kvgevent_store_unavailable", "counter", "Commands failed: Redis unreachable."),
    "store_errors": ("kvgevent_store_errors", "counter", "Commands Redis answered with an error."),
    "store_nodes_down": ("kvgevent_store_nodes_down", "gauge", "Redis nodes in an outage now."),
}
"""The store's STATS figures as metrics; ``aof_last_fsync_ms`` becomes an age in seconds."""

_FAMILIES: dict[str, Callable[..., Metric]] = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}


class ServerCollector(Collector):
    """Reads one server's figures at each scrape."""

    def __init__(self, server: KeyValueServer) -> None:
        self.server = server

    def collect(self) -> Iterator[Metric]:
        server = self.server
        counters = server.counters
        for attribute, name, kind, doc in _SERVER:
            yield _FAMILIES[kind](name, doc, value=getattr(counters, attribute))
        yield GaugeMetricFamily(
            "kvgevent_clients_active", "Clients connected now.", value=server.count_active()
        )
        yield GaugeMetricFamily(
            "kvgevent_clients_dormant",
            "Clients connected now with no reader greenlet: quiet since they connected, or since"
            " their reader was released.",
            value=server.count_dormant(),
        )
        yield _labelled(
            CounterMetricFamily,
            "kvgevent_clients_dropped",
            "Clients gone, by reason.",
            "reason",
            counters.dropped_by,
        )
        yield _labelled(
            CounterMetricFamily, "kvgevent_errors", "ERR replies, by phrase.", "reason", counters.errors_by
        )
        yield _labelled(
            CounterMetricFamily,
            "kvgevent_commands",
            "Commands carried out, by verb (data commands as the store carried them out).",
            "verb",
            {**counters.verbs, **server.store.applied},
        )
        memory = server.memory.stats()
        for key, name, kind, doc in _MEMORY:
            yield _FAMILIES[kind](name, doc, value=memory[key])
        yield from self._store()
        yield GaugeMetricFamily(
            "kvgevent_start_time_seconds", "When the server started (Unix time).", value=server.started_at
        )
        yield _histogram(
            "kvgevent_batch_seconds",
            "Time to apply a batch of requests, by its first request's verb.",
            server.batch_seconds,
            {"store": server.store_name},
        )
        yield _histogram(
            "kvgevent_ping_barrier_seconds",
            "A PING's wait for its writes to be durable (--fsync always).",
            server.barrier_seconds,
            {},
        )
        for name, timings in server.store.timings().items():
            yield _histogram(
                f"kvgevent_{name}_seconds", f"Durations of {name.replace('_', ' ')}.", timings, {}
            )

    def _store(self) -> Iterator[Metric]:
        store = self.server.store
        try:
            yield GaugeMetricFamily(
                "kvgevent_keys", "Keys holding at least one value.", value=store.count_keys()
            )
        except KVError:
            pass  # a store that cannot count now: the metric is absent, /readyz says why
        if not store.shared:
            yield GaugeMetricFamily(
                "kvgevent_data_bytes", "Bytes the data takes, by the cost model.", value=store.memory_used()
            )
        for key, value in store.stats().items():
            if key == "aof_last_fsync_ms":
                yield GaugeMetricFamily(
                    "kvgevent_aof_last_fsync_age_seconds",
                    "Seconds since the file was last synced.",
                    value=value / 1000,
                )
            elif key in STORE_METRICS:
                name, kind, doc = STORE_METRICS[key]
                yield _FAMILIES[kind](name, doc, value=value)


def _labelled(
    family: Callable[..., Metric], name: str, doc: str, label: str, values: dict[str, int]
) -> Metric:
    metric = family(name, doc, labels=[label])
    for value, count in sorted(values.items()):
        metric.add_metric([value], count)  # type: ignore[attr-defined]  # (each family has add_metric)
    return metric


def _histogram(name: str, doc: str, timings: Timings, fixed: dict[str, str]) -> Metric:
    """A Prometheus histogram of ``timings``; its series' label values are request classes
    (named by VERB_NAMES) or strings; ``fixed``: labels every series has."""
    labelled = any(key != "" for key in timings.series)
    labels = [*fixed, *(["verb"] if labelled else [])]
    metric = HistogramMetricFamily(name, doc, labels=labels)
    for key in sorted(timings.series, key=str):
        buckets, total = timings.cumulative(key)
        verb = VERB_NAMES.get(key, key if isinstance(key, str) else "other")
        metric.add_metric([*fixed.values(), *([verb] if labelled else [])], buckets=buckets, sum_value=total)
    return metric


class Monitor:
    """The HTTP listener of one server: ``start()`` binds ``host:port`` (OSError if it
    cannot); ``close()`` stops it. Requests are logged only when they fail."""

    def __init__(self, server: KeyValueServer, log: Logger) -> None:
        self.server = server
        self.log = log
        self.registry = CollectorRegistry()
        self.registry.register(ServerCollector(server))
        ProcessCollector(registry=self.registry)
        self._metrics = make_wsgi_app(self.registry)
        self._http: _MetricsHTTP | None = None

    def start(self, port: int, host: str) -> None:
        self._http = _MetricsHTTP(
            (host, port),
            self.app,
            log=None,
            error_log=_ErrorLog(self.log),  # (it has what pywsgi uses: write, flush)
            spawn=Pool(METRICS_CONNECTIONS),
            backlog=METRICS_BACKLOG,
            failing=self.server.accept_failed,
        )
        self._http.start()

    @property
    def port(self) -> int:
        assert self._http is not None, "not started"
        port = self._http.server_port
        assert port is not None  # (started: bound)
        return port

    def close(self) -> None:
        """Stop listening, close at once the connections waiting for a request or its headers
        (new, kept alive, sending slowly: they would hold the shutdown for METRICS_STOP), and
        give answers on their way up to METRICS_STOP seconds to finish."""
        if self._http is not None:
            self._http.close()  # (stops accepting; the handlers run on)
            for handler in [*self._http.waiting, *self._http.kept]:  # (their request not in)
                handler.kill(GreenletExit, block=False)
            self._http.stop(timeout=METRICS_STOP)

    def app(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        """The WSGI application: /metrics, /healthz, /readyz; 404 for anything else. A HEAD
        gets a GET's status and headers, and no body (pywsgi sends what the application
        returns, and a client kept alive would take a HEAD's body for the next answer)."""
        if environ.get("REQUEST_METHOD") == "HEAD":
            for _ in self._answer({**environ, "REQUEST_METHOD": "GET"}, start_response):
                pass
            return []
        return self._answer(environ, start_response)

    def _answer(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if environ.get("REQUEST_METHOD") != "GET":
            path = ""  # anything but a GET (or HEAD) of these three: 404
        if path == "/metrics":
            return self._metrics(environ, start_response)
        if path == "/healthz":
            return _reply(start_response, "200 OK", b"ok\n")
        if path == "/readyz":
            reason = self.server.not_ready()
            if reason is None:
                return _reply(start_response, "200 OK", b"ready\n")
            return _reply(start_response, "503 Service Unavailable", reason.encode() + b"\n")
        return _reply(start_response, "404 Not Found", b"not found: /metrics, /healthz, /readyz\n")


def _reply(start_response: Callable[..., Any], status: str, body: bytes) -> list[bytes]:
    start_response(
        status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    )
    return [body]


class _MetricsHandler(WSGIHandler):
    """pywsgi's handler with deadlines around the application's call, METRICS_TIMEOUT each:
    on a request's arrival, from when it waits for a request line (on a new connection, or
    on one kept alive) to the end of the request's headers; and on its answer's way out,
    from when the application returned to when the answer is written and the rest of the
    request's body read (a client that declared a body and does not send it, or does not
    read its answers). Past one the handler's greenlet is killed where it waits, again
    every METRICS_TIMEOUT until it ends (pywsgi catches the first in its error handling, which
    may try to write a 500 to the same socket): GreenletExit, which pywsgi does not log and
    gevent does not report, and the connection is closed. (A ``shutdown()`` instead made
    pywsgi take the part read for a request, answer 400 on the dead socket and print a
    traceback.) The application's call has no deadline: a scrape may wait on Redis (a
    deadline raised there made a 500 and a traceback)."""

    _deadline: Any = None  # the loop timer armed, if any
    _requests = 0  # requests read on this connection

    def read_requestline(self) -> Any:
        if self._requests:
            # Let the others run before the next request: one kept alive and pipelining
            # requests is read from pywsgi's buffer and answered without a wait, and held
            # the loop for as long as it sent (the key-value clients, signals, everything).
            sleep(0)
        self._arm()
        listener = self._listener
        handler: Any = getcurrent()  # (until its headers are in: read_request, handle)
        pending = listener.kept if self._requests else listener.waiting
        pending[handler] = (time.monotonic(), functools.partial(handler.kill, GreenletExit, False))
        listener.watch_backlog()  # (a connection there now may take this place)
        return super().read_requestline()

    def _handle_client_error(self, ex: BaseException) -> Any:
        """pywsgi's answer to a request it cannot read (400), without the traceback it
        prints on stderr for anything but a ValueError (more than 100 headers: an
        HTTPException): a raw traceback in a JSON log, and a blocking write to a stderr
        nobody reads. The error goes to the error log (one ``metrics_http_error`` a second)."""
        pywsgi: Any = super()  # (its hook for subclasses, not in its type stubs)
        return pywsgi._handle_client_error(ValueError(str(ex) or type(ex).__name__))

    def read_request(self, requestline: Any) -> Any:
        try:
            request = super().read_request(requestline)
        finally:
            self._end_deadline()
            self._not_waiting()
        self._requests += 1
        if self._requests >= METRICS_REQUESTS:  # (closed after its answer)
            self.close_connection = True
        return request

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        """pywsgi's, with ``Connection: close`` on the last answer of a connection (its
        METRICS_REQUESTS-th): pywsgi closes it without a word under HTTP/1.1, and a client
        keeping it alive sent its next request to a closed connection."""
        if self.close_connection and not any(name.lower() == "connection" for name, _ in headers):
            headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def process_result(self) -> None:
        self._arm()  # (pywsgi reads what is left of the body after this: under it too)
        shut = functools.partial(_shut, self.socket)
        self._listener.answered[getcurrent()] = (time.monotonic(), shut)  # (to handle_one_response's end)
        self._listener.watch_backlog()
        super().process_result()

    def handle_one_response(self) -> None:
        try:
            super().handle_one_response()
        finally:
            self._listener.answered.pop(getcurrent(), None)

    def handle(self) -> None:
        try:
            # pywsgi writes an answer's headers and body in two sends: with Nagle's algorithm
            # the body waited for the client's delayed ACK, about 40 ms a request kept alive.
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # (gone already: its first read finds out)
            pass
        try:
            super().handle()
        finally:
            self._end_deadline()
            self._not_waiting()

    def _not_waiting(self) -> None:
        handler = getcurrent()
        self._listener.waiting.pop(handler, None)
        self._listener.kept.pop(handler, None)

    @property
    def _listener(self) -> _MetricsHTTP:
        return self.server  # type: ignore[return-value]  # (pywsgi's stubs say Any)

    def _arm(self) -> None:
        """Kill this handler's greenlet METRICS_TIMEOUT from now, and every METRICS_TIMEOUT
        after, until :meth:`_end_deadline`."""
        self._end_deadline()
        self._deadline = get_hub().loop.timer(METRICS_TIMEOUT, METRICS_TIMEOUT)
        handler: Any = getcurrent()  # (a Greenlet of the server's pool)
        self._deadline.start(handler.kill, GreenletExit, False)  # (from the hub: no block)

    def _end_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.close()
            self._deadline = None


class _MetricsHTTP(PausingListener, WSGIServer):
    """pywsgi's server within the metrics port's bounds: METRICS_CONNECTIONS at once (its
    pool: when full, it stops accepting), each closed when a request does not come whole,
    or its answer is not taken, within METRICS_TIMEOUT (:class:`_MetricsHandler`: idle, kept
    alive, sending a byte now and then, not reading); an accept() failing for want of files
    is the server's ``accept_failed`` episode (PausingListener), not an unhandled error.
    Before, idle connections were kept for ever, without limit, and could take every file of
    the process.

    When every place is taken and a connection waits in the listen backlog, one that has
    waited on its client METRICS_GRACE is closed to make room (:meth:`watch_backlog`): the one
    that has waited longest for its first request (line and headers: idle, or sending
    slowly), else the one that has waited longest for its client to take its answer, else
    the one kept alive longest since its last answer. A scraper sends its request as it
    connects and reads its answer, so it is not among them; without this, connections that
    came back as soon as they were closed queued in the backlog ahead of a scraper, which
    waited METRICS_TIMEOUT for each METRICS_CONNECTIONS of them (40 idle ones: about 10 s)."""

    handler_class = _MetricsHandler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.waiting: dict[Any, tuple[float, Callable[[], object]]] = {}
        """The handlers' greenlets waiting for the first request line of their connection or
        its headers, longest first, with when they began and how to close them (kill the
        greenlet): nothing in hand, the first to give way to a connection in the backlog, and
        closed at once at shutdown."""
        self.kept: dict[Any, tuple[float, Callable[[], object]]] = {}
        """The same for connections kept alive after an answer: the last to give way (HTTP
        lets a server close an idle connection kept alive, and clients such as urllib3 and
        Go's, Prometheus's, look before they reuse one, but Python's http.client does not: a
        request it sends as the connection closes fails)."""
        self.answered: dict[Any, tuple[float, Callable[[], object]]] = {}
        """The handlers' greenlets whose answer is ready, longest first, until their client
        has taken the answer and sent the rest of the body it declared, with when and how to
        close them: the next to give way (a shutdown of the socket ends the write with EPIPE,
        which pywsgi takes for a client gone, and the body's read with its end)."""
        self._backlog: Any = None  # the loop's io watcher on the listening socket while full
        self._later: Any = None  # the loop's timer for the next look, none past its grace yet
        # gevent's BaseServer sets ``full`` to its pool's and calls it before each accept
        # (gevent 26's _do_read); the backlog tests in test_monitoring fail if that changes.
        self._places_full = self.full
        self.full = self._full  # type: ignore[method-assign]

    def _full(self) -> bool:
        if not self._places_full():
            return False
        self.watch_backlog()
        return True

    def watch_backlog(self) -> None:
        """While every place is taken, watch the listening socket: a connection there makes a
        handler waiting on its client give way (:meth:`_give_way`). Called when the places
        fill (gevent stops accepting then) and when a handler begins to wait for a request or
        for its answer to be taken (the last look may have found none to give way)."""
        if self._backlog is None and self.started and self._places_full():
            self._backlog = self.loop.io(self.socket.fileno(), 1)
            self._backlog.start(self._give_way)

    def _give_way(self) -> None:
        """(From the hub, the backlog readable.) Close the connection waiting longest for its
        first request; if none waits for one, the one waiting longest for its answer to be
        taken; if none, the one kept alive longest since its last answer: once it has waited
        METRICS_GRACE (before then, look again when it has: a connection kept alive keeps its
        place while a new one waits for its request). The pool then frees its place and
        gevent accepts again. If none waits on its client (every place is making an answer),
        the next to wait calls :meth:`watch_backlog`."""
        self._stop_watching()
        if not self._places_full():
            return
        pending = self.waiting or self.answered or self.kept
        if not pending:
            return
        handler = next(iter(pending))
        since, close = pending[handler]
        wait = since + METRICS_GRACE - time.monotonic()
        if wait <= 0:
            del pending[handler]
            close()
        else:
            self._later = self.loop.timer(wait)
            self._later.start(self._look_again)

    def _look_again(self) -> None:
        self._stop_watching()  # (the timer fired: closed)
        self.watch_backlog()

    def _stop_watching(self) -> None:
        for watcher in (self._backlog, self._later):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self._backlog = self._later = None

    def close(self) -> None:
        self._stop_watching()
        super().close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # (gone already)
        sock.shutdown(socket.SHUT_RDWR)


class _ErrorLog:
    """pywsgi's error log (a file-like object) as one structured event per error."""

    def __init__(self, log: Logger) -> None:
        self.log = log
        self._last = 0.0

    def write(self, text: str) -> None:
        line = text.strip().splitlines()[-1] if text.strip() else ""
        now = time.monotonic()
        if line and now - self._last >= 1.0:  # at most one a second: a scanner cannot flood the log
            self._last = now
            self.log.warning("metrics_http_error", error=line[:200])

    def flush(self) -> None:
        pass
