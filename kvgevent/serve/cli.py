"""``python run_server.py``: the server's command line.

Every flag can also come from a ``KVGEVENT_*`` environment variable (the flag wins), and
``--help`` shows the defaults of :mod:`kvgevent.config`.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import ssl
import sys
from collections.abc import Callable, Sequence

import gevent

from kvgevent.args import (
    Parser,
    add_env_option,
    byte_size,
    check_env,
    growth_ratio,
    non_negative_float,
    port_number,
    positive_byte_size,
    positive_float,
    positive_int,
    program_name,
)
from kvgevent.config import (
    AUTH_DELAY_MAX,
    AUTH_DELAY_MIN,
    AUTH_MAX_LINE,
    AUTH_THROTTLE_AFTER,
    DEFAULT_BACKLOG,
    DEFAULT_HOST,
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_MEMORY,
    DEFAULT_PORT,
    DEFAULT_PREFIX,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    DEFAULT_REDIS_TIMEOUT,
    DEFAULT_SHUTDOWN_FLUSH,
    DEFAULT_WORKER_TIMEOUT,
    FD_RESERVE,
    GC_YOUNG_THRESHOLD,
    MIN_WORKER_TIMEOUT,
)
from kvgevent.logs import (
    DEFAULT_LOG_FORMAT,
    DEFAULT_LOG_LEVEL,
    LOG_FORMATS,
    LOG_LEVELS,
    LogFile,
    Logger,
    configure_logging,
    get_logger,
    redacted_url,
)
from kvgevent.serve.signals import reopen_on_hangup, stop_requested
from kvgevent.serve.systemd import feed_watchdog, notify
from kvgevent.serve.workers import beat_for_supervisor, die_with_supervisor, supervise
from kvgevent.server.server import KeyValueServer
from kvgevent.stores.aof import AofCorrupt
from kvgevent.stores.aof_log import DEFAULT_FSYNC, FSYNC_POLICIES
from kvgevent.stores.base import KVStore
from kvgevent.stores.durable import DEFAULT_REWRITE_GROWTH, DEFAULT_REWRITE_MIN_SIZE, DurableStore
from kvgevent.stores.memory import MemoryStore
from kvgevent.tls import server_context


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=program_name("run_server.py", "kvgevent-server"),
        allow_abbrev=False,  # --worker 2 must be an error, not --workers 2
        description="kvgevent: a key-value server speaking the p0 line protocol "
        "(PUT:key:value, GET:key, UPDATE:key:old:new, DELETE:key, PING, STATS).",
        epilog="Stops cleanly on SIGINT or SIGTERM (exit status 0); exits with status 1 if "
        "the address cannot be bound, the --aof file cannot be loaded, or (at shutdown) "
        "writes it holds could not be made durable.",
    )
    add_env_option(parser, "host", DEFAULT_HOST, "address to listen on; loopback by default")
    add_env_option(parser, "port", DEFAULT_PORT, "TCP port; 0 picks a free one", type=port_number)
    add_env_option(
        parser,
        "queue-size",
        DEFAULT_QUEUE_SIZE,
        "reply lines queued per client before replies to it are dropped",
        type=positive_int,
    )
    add_env_option(
        parser,
        "queue-bytes",
        DEFAULT_QUEUE_BYTES,
        "reply bytes queued per client before replies to it are dropped",
        type=positive_byte_size,
    )
    add_env_option(
        parser,
        "max-clients",
        DEFAULT_MAX_CLIENTS,
        "clients served at once; more get 'ERR max clients reached' and are closed",
        type=positive_int,
    )
    add_env_option(
        parser,
        "max-memory",
        DEFAULT_MAX_MEMORY,
        "memory the server may use, in bytes (K, M, G suffixes: powers of 1024); above it "
        "PUT and UPDATE get 'ERR out of memory' and the clients holding the biggest buffers "
        "are disconnected; 0 = no limit",
        type=byte_size,
    )
    add_env_option(
        parser,
        "idle-timeout",
        DEFAULT_IDLE_TIMEOUT,
        "close a client that sends nothing for this many seconds; 0 = never",
        type=non_negative_float,
    )
    add_env_option(parser, "backlog", DEFAULT_BACKLOG, "listen backlog (pending connects)", type=positive_int)
    add_env_option(
        parser,
        "password",
        None,
        "require 'AUTH:<password>' before any command but PING (prefer the environment "
        f"variable: a flag is visible to other users in ps); before AUTH a line may hold "
        f"{AUTH_MAX_LINE} bytes, and after {AUTH_THROTTLE_AFTER} wrong passwords from one address "
        f"its AUTHs are checked one at a time, {AUTH_DELAY_MIN:g} s doubling to {AUTH_DELAY_MAX:g} s "
        "apart",
    )
    add_env_option(parser, "tls-cert", None, "serve TLS with this certificate chain (PEM)")
    add_env_option(parser, "tls-key", None, "private key of --tls-cert (PEM), if not in that file")
    add_env_option(
        parser,
        "store",
        "memory",
        "where values live: memory (this process), redis://host:port/db, "
        "rediss://host:port/db?ssl_ca_certs=CA.pem (over TLS), or "
        "redis+cluster://host:port (any node of a Redis Cluster)",
    )
    add_env_option(parser, "redis-prefix", DEFAULT_PREFIX, "with a Redis store: prefix of every key")
    add_env_option(
        parser,
        "redis-timeout",
        DEFAULT_REDIS_TIMEOUT,
        "with a Redis store: seconds before a call fails with 'ERR store unavailable'",
        type=positive_float,
    )
    add_env_option(
        parser,
        "workers",
        1,
        "processes serving the port (SO_REUSEPORT), supervised by this one; above 1 needs a "
        "shared store (--store redis...)",
        type=positive_int,
    )
    add_env_option(
        parser,
        "worker-timeout",
        DEFAULT_WORKER_TIMEOUT,
        "with --workers: kill (SIGKILL) and restart a worker whose event loop has not run for "
        "this many seconds (stopped or stuck: the kernel would keep giving it new clients); "
        f"0 = never, else at least {MIN_WORKER_TIMEOUT:g}",
        type=non_negative_float,
    )
    parser.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)  # set for workers
    add_env_option(parser, "aof", None, "append every write to this file and replay it at start")
    add_env_option(
        parser,
        "fsync",
        DEFAULT_FSYNC,
        "with --aof: always (PONG once earlier writes are on disk), everysec (lose at most "
        "about a second), no (the OS decides)",
        choices=FSYNC_POLICIES,
    )
    parser.add_argument(
        "--aof-repair",
        action="store_true",
        help="with --aof: truncate a corrupt file at the last good record instead of refusing to start",
    )
    add_env_option(
        parser,
        "aof-rewrite-min-size",
        DEFAULT_REWRITE_MIN_SIZE,
        "with --aof: compact the file once it is at least this many bytes...",
        type=positive_byte_size,
    )
    add_env_option(
        parser,
        "aof-rewrite-growth",
        DEFAULT_REWRITE_GROWTH,
        "...and this many times its size after the last compaction",
        type=growth_ratio,
    )
    add_env_option(
        parser,
        "max-line",
        DEFAULT_MAX_LINE,
        "longest request line in bytes; longer ones get 'ERR line too long'",
        type=positive_byte_size,
    )
    add_env_option(
        parser,
        "shutdown-flush",
        DEFAULT_SHUTDOWN_FLUSH,
        "seconds allowed on shutdown for sending queued replies",
        type=non_negative_float,
    )
    add_env_option(
        parser,
        "metrics-port",
        None,
        "serve Prometheus metrics (/metrics), /healthz and /readyz over HTTP on this port "
        "(0 picks a free one; with --workers N, worker i uses this port + i); off by default",
        type=port_number,
    )
    add_env_option(parser, "metrics-host", DEFAULT_HOST, "address the metrics port listens on")
    add_env_option(
        parser,
        "log-file",
        None,
        "write the log (JSON lines) to this file instead of stderr; SIGHUP reopens it (logrotate)",
    )
    add_env_option(
        parser,
        "log-format",
        DEFAULT_LOG_FORMAT,
        "json: one JSON object per line on stderr; console: for people; "
        "auto: console on a terminal, else json",
        choices=LOG_FORMATS,
    )
    add_env_option(parser, "log-level", DEFAULT_LOG_LEVEL, "least severe level logged", choices=LOG_LEVELS)
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    redis = args.store.startswith(("redis://", "rediss://", "redis+cluster://"))
    if args.store != "memory" and not redis:
        parser.error("--store must be memory, redis://host:port/db or redis+cluster://host:port")
    problem = _redis_url_problem(args.store) if redis else None
    if problem is not None:
        parser.error(f"--store {redacted_url(args.store)}: {problem}")
    if args.workers > 1 and not redis:
        parser.error(
            "--workers above 1 needs a shared store (--store redis://...): with the memory store "
            "each worker would hold its own data and clients would see them diverge"
        )
    if args.aof and redis:
        parser.error("--aof is for the memory store; Redis has its own persistence (appendonly)")
    given = _aof_options(args)
    if given and not args.aof:  # (a server asked for --fsync always must not run without a file)
        verb = "needs" if len(given) == 1 else "need"
        parser.error(f"{', '.join(given)} {verb} --aof (a file to write to): without it nothing is kept")
    if args.tls_key and not args.tls_cert:
        parser.error("--tls-key needs --tls-cert")
    if args.password == "":
        parser.error("--password may not be empty")
    if args.password is not None:
        _check_password(parser, args.password, args.max_line)
    if 0 < args.worker_timeout < MIN_WORKER_TIMEOUT:
        parser.error(f"--worker-timeout must be 0 (never) or at least {MIN_WORKER_TIMEOUT:g} seconds")


def _redis_url_problem(url: str) -> str | None:
    """Why redis-py's ``parse_url``, which reads the URL for both of the Redis store's
    clients, refuses ``url`` (a port that is not a number, or out of range; a query value of
    the wrong type), or None. Checked with the flags: found in the store's constructor, it was
    a ValueError traceback (exit 1), and with --workers one per worker and restart. None
    without redis-py (the start then fails saying that it is missing)."""
    try:
        from redis.connection import parse_url
    except ImportError:
        return None
    try:
        # (a cluster's URL is read as redis:// by RedisCluster.from_url too)
        parse_url(("redis://" + url.removeprefix("redis+cluster://")) if url.startswith("redis+") else url)
    except ValueError as exc:
        return str(exc)
    return None


def _check_password(parser: argparse.ArgumentParser, password: str, max_line: int) -> None:
    """Refuse a password no AUTH line can carry (it could never authenticate)."""
    if "\n" in password or password.endswith("\r"):
        parser.error("--password may not hold a newline nor end in a carriage return: no AUTH line can")
    if len(b"AUTH:" + os.fsencode(password)) > max_line:
        parser.error("--password is too long for --max-line: its AUTH line would get ERR line too long")


def _aof_options(args: argparse.Namespace) -> list[str]:
    """The options given that only mean something with --aof (a default is not given)."""
    given = {
        "--fsync": args.fsync != DEFAULT_FSYNC,
        "--aof-repair": args.aof_repair,
        "--aof-rewrite-min-size": args.aof_rewrite_min_size != DEFAULT_REWRITE_MIN_SIZE,
        "--aof-rewrite-growth": args.aof_rewrite_growth != DEFAULT_REWRITE_GROWTH,
    }
    return [option for option, set_ in given.items() if set_]


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit (as Redis does): every client is
    a file descriptor, and the usual soft limit of 1024 would refuse the 1021st client.
    Returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def clients_within(fd_limit: int, max_clients: int, log: Logger) -> int:
    """``max_clients``, lowered to what ``fd_limit`` open files allow with FD_RESERVE kept:
    past it, accepting a client fails with EMFILE, and the client waits in the kernel's
    backlog with no answer instead of getting ``ERR max clients reached``. A value asked
    for (not the default, which adapts quietly: ``server_started`` shows it) that cannot be
    kept is logged (``max_clients_lowered``)."""
    allowed = max(1, fd_limit - FD_RESERVE)
    if max_clients <= allowed:
        return max_clients
    if max_clients == DEFAULT_MAX_CLIENTS:
        return allowed
    log.warning(
        "max_clients_lowered",
        max_clients=allowed,
        asked=max_clients,
        max_open_files=fd_limit,
        hint="raise the limit on open files (ulimit -n, systemd's LimitNOFILE=) to serve more",
    )
    return allowed


def open_store(args: argparse.Namespace, log: Logger) -> KVStore | None:
    """The store the flags ask for, loaded; None (after logging why) if it cannot be."""
    if args.store != "memory":
        return _redis_store(args, log)
    if not args.aof:
        return MemoryStore()
    store = DurableStore(args.aof, args.fsync, args.aof_rewrite_min_size, args.aof_rewrite_growth, log)
    try:
        report = store.open(repair=args.aof_repair)
    except AofCorrupt as exc:
        log.error(
            "aof_corrupt",
            path=exc.path,
            offset=exc.offset,
            bytes_after=exc.bytes_after,
            records_after=exc.records_after,
            hint="start with --aof-repair to truncate it there",
        )
        return None
    except (OSError, ValueError) as exc:
        log.error("aof_unreadable", path=store.aof.path, error=str(exc))
        return None
    if "truncated_at" in report:
        log.warning(
            "aof_torn_tail_truncated",
            path=store.aof.path,  # (resolved, as the log's own events say it)
            offset=report["truncated_at"],
            dropped_bytes=report["dropped_bytes"],
        )
    if "repaired_at" in report:
        log.warning(
            "aof_repaired",
            path=store.aof.path,
            offset=report["repaired_at"],
            dropped_records=report["dropped_records"],
            dropped_bytes=report["dropped_bytes"],
        )
    log.info(
        "aof_replayed",
        path=store.aof.path,
        records=report["records"],
        seconds=report["replay_s"],
        keys=store.count_keys(),
        fsync=args.fsync,
    )
    return store


def _redis_store(args: argparse.Namespace, log: Logger) -> KVStore | None:
    """The Redis store of --store; None, after one ``server_start_failed``, if it cannot be
    made: its libraries are missing, or (a Redis Cluster asks a node for its slots as it is
    made) no node answered. A plain ``redis://`` store connects on its first command: a Redis
    down at start is an outage (``store_unavailable``), as later."""
    try:
        import redis.exceptions

        from kvgevent.stores.redis_store import RedisStore  # (redis and hiredis: only when asked for)
    except ImportError as exc:
        log.error("server_start_failed", error=f"the Redis store needs {exc.name}", hint=EXTRA_HINT % "redis")
        return None
    try:
        return RedisStore(args.store, prefix=args.redis_prefix, timeout=args.redis_timeout, log=log)
    except (redis.exceptions.RedisError, redis.exceptions.RedisClusterException, OSError, ValueError) as exc:
        log.error(
            "server_start_failed",
            store=redacted_url(args.store),
            error=str(exc) or type(exc).__name__,
            hint="check --store: a node of the Redis Cluster must answer at start, in cluster mode",
        )
        return None


def load_store(args: argparse.Namespace, log: Logger) -> KVStore | None:
    """:func:`open_store`, with the cyclic garbage collector paused meanwhile and what it
    loaded moved out of its reach (``gc.freeze``): a replay makes millions of value lists,
    which cannot form cycles, and a full collection walking them stalls every client
    (bench/OPTIMISATIONS.md, "replay and the GC"). The youngest generation is then collected
    less often than Python's default (GC_YOUNG_THRESHOLD)."""
    gc.disable()
    try:
        return open_store(args, log)
    finally:
        gc.freeze()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
        gc.enable()


EXTRA_HINT = "pip install -r requirements.txt, or pip install 'kvgevent[%s]'"
"""What to do when an optional library is missing."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server until SIGINT/SIGTERM; return the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    check_env(parser, args)
    _check_args(parser, args)
    try:
        log_file = LogFile(args.log_file) if args.log_file else None
    except OSError as exc:
        parser.error(f"cannot open --log-file {args.log_file}: {exc.strerror or exc}")
    configure_logging(
        args.log_format, args.log_level, stream=log_file, worker=os.getpid() if args.reuse_port else None
    )
    log = get_logger()
    if args.workers > 1:
        # (checked here too: each worker failing on its own would be logged once per worker
        # and per restart before the supervisor gave up)
        if args.tls_cert and (not _tls_files_for_workers(args, log) or _tls_context(args, log) is None):
            return 1
        return supervise(args, parser, log, log_file)
    reopen_on_hangup(log_file)
    fd_limit = raise_fd_limit()
    log.debug("fd_limit", max_open_files=fd_limit)
    args.max_clients = clients_within(fd_limit, args.max_clients, log)
    server = _make_server(args, log)
    if server is None:
        return 1
    # Caught from before the port listens: a SIGTERM sent as soon as READY=1 (or the port)
    # is seen must start the shutdown, not kill the process. (Not during the store's load: a
    # long AOF replay still ends at once on SIGTERM, nothing served yet.)
    stop = stop_requested(log)
    if not die_with_supervisor():  # a worker whose supervisor died as it was started
        log.error("server_start_failed", error="the supervisor of this worker is gone")
        return 1
    beat_for_supervisor(args.worker_timeout)  # (its first beat now: before server_started)
    feed_watchdog()
    if not _start(server, args, log):
        return 1
    notify(f"READY=1\nSTATUS=serving on {args.host}:{server.port}")
    stop.wait()
    notify("STOPPING=1")
    server.close(flush_timeout=args.shutdown_flush)
    store = server.store
    if isinstance(store, DurableStore) and store.unsaved_records:
        return 1  # aof_unwritten was logged: some applied writes may not be on disk
    return 0


def _tls_files_for_workers(args: argparse.Namespace, log: Logger) -> bool:
    """Whether --tls-cert and --tls-key are files each worker can read again (not a pipe such
    as a shell's ``<(...)``, which only the supervisor could read, once); logged if not."""
    for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
        if path is not None and os.path.exists(path) and not os.path.isfile(path):
            _tls_failed(args, log, f"{flag} {path} is not a file: with --workers each worker reads it itself")
            return False
    return True


def _tls_failed(args: argparse.Namespace, log: Logger, error: str) -> None:
    log.error("server_start_failed", error=error, tls_cert=args.tls_cert, tls_key=args.tls_key)


def _tls_context(args: argparse.Namespace, log: Logger) -> ssl.SSLContext | None:
    """The server's TLS context from --tls-cert and --tls-key; None if they cannot be loaded
    (logged: ``server_start_failed``)."""
    try:
        return server_context(args.tls_cert, args.tls_key)
    except (OSError, ssl.SSLError) as exc:
        _tls_failed(args, log, f"cannot load the TLS certificate or key: {exc}")
        return None


def _make_server(args: argparse.Namespace, log: Logger) -> KeyValueServer | None:
    """The server the flags ask for, its store loaded (None if the TLS files or the store
    cannot be loaded: logged)."""
    tls = _tls_context(args, log) if args.tls_cert else None
    if args.tls_cert and tls is None:
        return None
    store = load_store(args, log)
    if store is None:
        return None
    # gevent records every greenlet's spawning stack and spawn tree, about 1.3 kB a client
    # (bench/OPTIMISATIONS.md, "an idle writer"); nothing in this process reads them.
    gevent.config.track_greenlet_tree = False
    return KeyValueServer(
        store,
        queue_size=args.queue_size,
        queue_bytes=args.queue_bytes,
        max_line=args.max_line,
        max_clients=args.max_clients,
        idle_timeout=args.idle_timeout,
        password=args.password,
        tls=tls,
        backlog=args.backlog,
        reuse_port=args.reuse_port,
        max_memory=args.max_memory,
    )


def _start(server: KeyValueServer, args: argparse.Namespace, log: Logger) -> bool:
    """Listen on the key-value port and, with --metrics-port, the metrics one; False (logged
    as server_start_failed) if either cannot be bound."""
    listeners: list[tuple[str, Callable[[int, str], object], int, str]] = [
        ("port", server.start, args.port, args.host)
    ]
    if args.metrics_port is not None:
        listeners.append(("metrics_port", server.serve_metrics, args.metrics_port, args.metrics_host))
    for name, start, port, host in listeners:
        try:
            start(port, host)
        except ImportError as exc:  # prometheus_client, for the metrics
            log.error(
                "server_start_failed", error=f"the metrics need {exc.name}", hint=EXTRA_HINT % "metrics"
            )
            server.close(flush_timeout=0)
            return False
        except OSError as exc:
            log.error(
                "server_start_failed",
                host=host,
                port=port,
                listener=name,
                error=_reason(exc),
                errno=exc.errno,
            )
            if name != "port":  # the key-value listener is up: stop it
                server.close(flush_timeout=0)
            return False
    return True


def _reason(exc: OSError) -> str:
    """Why a bind failed, in words. (gevent appends the address to strerror; the event carries
    it in its own fields.)"""
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return (exc.strerror or str(exc)).split(": (")[0]  # a resolver error (negative errno)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
