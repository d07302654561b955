"""``python run_client.py bench``: a load generator in the spirit of redis-benchmark.

Each test (``-t put,get,...``) runs ``-n`` requests over ``-c`` connections, ``-P`` requests
per write. A connection sends a batch, then reads its replies: one line per GET or PING; a
batch of PUT/UPDATE/DELETE (which have no reply) ends with a PING, whose PONG proves the batch
was applied. Latency is per batch (per request when ``-P 1``), from the write to the last
reply line. GET and UPDATE run against ``--keys`` keys that hold one value each.

Python costs about as much CPU per request as the server does: at ``-P 1`` one bench process
saturates before a fast server does. ``--processes N`` splits the connections over N
processes; the summary shows the bench's own CPU use so you can tell which side is the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import multiprocessing
import os
import random
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from kvgevent.args import Parser, check_env, positive_int, program_name
from kvgevent.client.cli import add_connection_options, check_tls_ca, client_for, local_failure, tls_choice
from kvgevent.client.client import SELF_CONNECTED, Client, self_connected, to_bytes
from kvgevent.client.commands import escape_line
from kvgevent.protocol import ReplyKind, classify_reply

TESTS = ("put", "get", "update", "delete", "ping")
PROGRESS_EVERY = 0.25
"""Seconds between two progress lines on a terminal."""


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=program_name("run_client.py", "kvgevent-cli") + " bench",
        allow_abbrev=False,  # "--proc" is a usage error, not a guess at --processes
        description="Load a kvgevent server and report ops/s and latency percentiles.",
    )
    add_connection_options(parser)  # those of every mode: run_client.py --help
    parser.add_argument("-c", dest="clients", type=positive_int, default=50, help="connections (default 50)")
    parser.add_argument(
        "-P", dest="pipeline", type=positive_int, default=1, help="requests per write (default 1)"
    )
    parser.add_argument("-n", dest="requests", type=positive_int, default=100_000, help="requests per test")
    parser.add_argument(
        "-d", dest="size", type=positive_int, default=16, help="value size in bytes (default 16)"
    )
    parser.add_argument("-t", dest="tests", default="put,get", help=f"tests to run, of {','.join(TESTS)}")
    parser.add_argument("--keys", type=positive_int, default=10_000, help="keys used (default 10000)")
    parser.add_argument("--processes", type=positive_int, default=1, help="bench processes (default 1)")
    parser.add_argument("--json", action="store_true", help="one JSON object per test on stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    return parser


def _requests(test: str, key: bytes, value: bytes) -> bytes:
    if test == "get":
        return b"GET:" + key + b"\n"
    if test == "put":
        return b"PUT:" + key + b":" + value + b"\n"
    if test == "update":
        return b"UPDATE:" + key + b":" + value + b":" + value + b"\n"
    if test == "delete":
        return b"DELETE:" + key + b"\n"
    return b"PING\n"


def count_errors(replies: bytes) -> int:
    """The ``ERR`` status lines among complete reply lines (as :func:`classify_reply` tells:
    a value line that starts with ``ERR `` is not one)."""
    if b"ERR " not in replies:  # the usual case, without splitting
        return 0
    return sum(1 for line in replies.split(b"\n")[:-1] if classify_reply(line) is ReplyKind.ERROR)


def _worker(
    args: dict[str, Any], clients: int, quota: int, seed: int, progress: Any, slot: int, results: Any
) -> None:
    """One bench process: ``clients`` greenlets, ``quota`` requests in all."""
    import gevent
    from gevent import socket

    rng = random.Random(seed)
    test, pipeline = args["test"], args["pipeline"]
    value = (b"v" * args["size"])[: args["size"]]
    # GET and UPDATE use the preloaded keys (one value each, and UPDATE keeps it so); PUT and
    # DELETE use keys of their own, so they never change what a GET returns.
    space = args["prefix"] + (b"w" if test in ("put", "delete") else b"k")
    barrier = b"" if test in ("get", "ping") else b"PING\n"
    latencies: list[float] = []
    state = {"done": 0, "errors": 0}
    failed: list[str] = []

    def connection(share: int) -> None:
        """One connection's share of the requests; a failure is counted, not raised (a
        greenlet's exception would print a traceback per connection)."""
        try:
            requests(share)
        except OSError as exc:
            failed.append(f"{type(exc).__name__}: {exc.strerror or exc}")

    def requests(share: int) -> None:
        sock = socket.create_connection((args["host"], args["port"]), timeout=args["timeout"])
        try:
            if self_connected(sock):  # (its own echo would pass for replies: a dead local port)
                raise ConnectionRefusedError(errno.ECONNREFUSED, SELF_CONNECTED)
            stream = _connected(sock, args)
            while share > 0:
                count = min(pipeline, share)
                keys = [space + b"%d" % rng.randrange(args["keys"]) for _ in range(count)]
                payload = b"".join(_requests(test, k, value) for k in keys) + barrier
                begin = time.perf_counter()
                stream.sendall(payload)
                data = b""
                # A write batch's replies end with its barrier's PONG (ERR lines before it, if
                # any: counting lines took an ERR for the batch and its PONG for the next's).
                while not data.endswith(b"PONG\n") if barrier else data.count(b"\n") < count:
                    chunk = stream.recv(1 << 16)
                    if not chunk:
                        raise ConnectionError("connection closed by the server")
                    data += chunk
                latencies.append(time.perf_counter() - begin)
                state["errors"] += count_errors(data)
                share -= count
                state["done"] += count
        finally:
            sock.close()

    def report() -> None:
        while True:
            progress[slot] = state["done"]
            gevent.sleep(0.1)

    reporter = gevent.spawn(report)
    start_cpu = time.process_time()
    shares = [quota // clients + (1 if i < quota % clients else 0) for i in range(clients)]
    jobs = [gevent.spawn(connection, share) for share in shares if share]
    gevent.joinall(jobs)
    reporter.kill()
    progress[slot] = state["done"]
    failed += [str(job.exception) for job in jobs if job.exception is not None]
    results.put(
        {
            "latencies": latencies,
            "errors": state["errors"],
            "failed": failed,
            "cpu": time.process_time() - start_cpu,
        }
    )


def _connected(sock: Any, args: dict[str, Any]) -> Any:
    """What a worker's connection reads and writes: ``sock`` itself, or a TLS session over it
    when ``args["tls"]`` is ``(cafile, verify)``; authenticated when ``args["password"]`` is
    set. Each wait is bounded by the socket's timeout. OSError (ConnectionError for a refused
    password, ssl.SSLError for a failed handshake) if it cannot be had."""
    import threading

    from kvgevent.tls import TlsStream, client_context

    stream = sock
    if args["tls"] is not None:
        cafile, verify = args["tls"]
        context = client_context(cafile, verify=verify)
        stream = TlsStream(
            sock, context, server_side=False, server_hostname=args["host"], lock_factory=threading.Lock
        )
        stream.handshake()
    if args["password"] is not None:
        stream.sendall(b"AUTH:" + args["password"] + b"\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = stream.recv(1 << 10)
            if not chunk:
                raise ConnectionError("connection closed by the server")
            reply += chunk
        if reply != b"OK\n":
            raise ConnectionError(f"AUTH refused: {reply.strip()[:80]!r}")
    return stream


def _worker_connection(opts: argparse.Namespace) -> dict[str, Any]:
    """The connection options a worker process needs, in a form it can be sent (no context)."""
    password = to_bytes(opts.password, "password") if opts.password is not None else None
    return {
        "host": opts.host,
        "port": opts.port,
        "timeout": opts.timeout or None,
        "password": password,
        "tls": tls_choice(opts),
    }


def _preload(opts: argparse.Namespace, prefix: bytes) -> None:
    """Every key holds exactly one value (GET then replies one line, UPDATE has a match)."""
    keys, size = opts.keys, opts.size
    value = (b"v" * size)[:size]
    with _client(opts) as client:
        for start in range(0, keys, 5000):
            lines = []
            for i in range(start, min(start + 5000, keys)):
                key = prefix + b"k%d" % i
                lines += [b"DELETE:" + key, b"PUT:" + key + b":" + value]
            _refused(client.send_raw(lines))


class PreloadRefused(Exception):
    """The server answered ``ERR`` to the preload's PUTs (a value over its --max-line, a full
    --max-memory): every GET and UPDATE after would fail for a cause the report cannot name."""

    def __init__(self, line: bytes) -> None:
        super().__init__(escape_line(line))


def _refused(results: list[list[bytes]]) -> None:
    """Raise :class:`PreloadRefused` for the first ``ERR`` among ``send_raw``'s results."""
    for lines in results:
        if lines and classify_reply(lines[0]) is ReplyKind.ERROR:
            raise PreloadRefused(lines[0])


def _cleanup(opts: argparse.Namespace, prefix: bytes) -> None:
    """Delete every key the bench used."""
    keys = opts.keys
    with _client(opts) as client:
        for start in range(0, keys, 5000):
            client.send_raw(
                [
                    b"DELETE:" + prefix + space + b"%d" % i
                    for i in range(start, min(start + 5000, keys))
                    for space in (b"k", b"w")
                ]
            )


def run_test(opts: argparse.Namespace, test: str, prefix: bytes, out: Any) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    progress = context.Array("q", opts.processes)
    results = context.Queue()
    args = {
        "test": test,
        "pipeline": opts.pipeline,
        "size": opts.size,
        "prefix": prefix,
        "keys": opts.keys,
        **_worker_connection(opts),
    }
    per_process = [
        opts.clients // opts.processes + (1 if i < opts.clients % opts.processes else 0)
        for i in range(opts.processes)
    ]
    per_process = [c for c in per_process if c]
    quotas = [opts.requests * c // opts.clients for c in per_process]
    quotas[0] += opts.requests - sum(quotas)
    procs = [
        context.Process(target=_worker, args=(args, clients, quota, i, progress, i, results), daemon=True)
        for i, (clients, quota) in enumerate(zip(per_process, quotas, strict=True))
    ]
    begin = time.perf_counter()
    show = out is not None and not opts.quiet and sys.stderr.isatty()
    try:
        with _sigint_ignored():  # Ctrl-C reaches the whole process group: the workers ignore it
            for proc in procs:
                proc.start()
        gathered = _gather(procs, results, progress, show, test, opts.requests, begin)
        seconds = time.perf_counter() - begin
    except BaseException:  # interrupted: no worker goes on writing keys while the cleanup runs
        _stop(procs, wait=0)
        raise
    finally:
        if show:
            sys.stderr.write("\r" + " " * 60 + "\r")
    _stop(procs, wait=10)
    latencies = sorted(x for r in gathered for x in r["latencies"])
    failed = [f for r in gathered for f in r["failed"]]
    done = sum(progress[:])

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1000 if latencies else 0.0

    return {
        "test": test,
        "requests": done,
        "seconds": round(seconds, 3),
        "ops_s": round(done / seconds),
        "clients": opts.clients,
        "pipeline": opts.pipeline,
        "size": opts.size,
        "latency_of": "request" if opts.pipeline == 1 else "batch",
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "p999_ms": round(pct(0.999), 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else 0.0,
        "errors": sum(r["errors"] for r in gathered),
        "failed_connections": len(failed),
        "lost_processes": len(procs) - len(gathered),  # (died without a result: killed, out of memory)
        "bench_cpu_pct": round(100 * sum(r["cpu"] for r in gathered) / seconds),
        "processes": len(procs),
    }


def _gather(
    procs: list[Any], results: Any, progress: Any, show: bool, test: str, requests: int, begin: float
) -> list[dict[str, Any]]:
    """The workers' results as they end (with a progress line on stderr when ``show``)."""
    gathered: list[dict[str, Any]] = []
    while len(gathered) < len(procs):
        try:
            gathered.append(results.get(timeout=PROGRESS_EVERY))
        except Exception:  # queue.Empty: time for a progress line
            pass
        if show:
            done, elapsed = sum(progress[:]), time.perf_counter() - begin
            sys.stderr.write(f"\r{test.upper()}: {done}/{requests} ({done / elapsed:,.0f} ops/s)   ")
            sys.stderr.flush()
        if all(not p.is_alive() for p in procs) and results.empty() and len(gathered) < len(procs):
            break
    return gathered


def _stop(procs: list[Any], wait: float) -> None:
    """Give the started workers ``wait`` seconds to end, then terminate those still running
    (SIGTERM: a worker has no handler, so it ends at once) and wait for them."""
    for proc in procs:
        if proc.pid is None:  # never started
            continue
        proc.join(timeout=wait)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored meanwhile: a process started now inherits that (Python leaves an
    ignored SIGINT ignored), so a Ctrl-C to the group does not print a worker's traceback."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Stopped(KeyboardInterrupt):
    """A SIGTERM, raised where the bench is (as Ctrl-C raises KeyboardInterrupt)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Stopped(signum)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; the exit status: 0, 1 if a test had ERR replies or failed connections,
    2 for bad usage, 3 if the server cannot be reached (one line on stderr), 130 after
    Ctrl-C and 143 after SIGTERM (once the keys are cleaned up: the same after a failure)."""
    parser = build_parser()
    opts = parser.parse_args(argv)
    check_env(parser, opts)
    check_tls_ca(parser, opts)
    tests = [t.strip().lower() for t in opts.tests.split(",") if t.strip()]
    unknown = [t for t in tests if t not in TESTS]
    if unknown:
        parser.error(f"unknown test {', '.join(unknown)} (known: {', '.join(TESTS)})")
    prefix = b"bench%d:" % os.getpid()
    prefix = prefix.replace(b":", b"_")
    from kvgevent.errors import ConnectionLost, ServerError

    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return _bench(opts, tests, prefix)
    except ConnectionLost as exc:
        print(f"run_client.py bench: {exc}", file=sys.stderr)
        return 3
    except ServerError as exc:  # a refused AUTH
        print(f"run_client.py bench: ERR {escape_line(exc.reason.encode())}", file=sys.stderr)
        return 1
    except PreloadRefused as exc:
        print(f"run_client.py bench: the server refused the preload: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # stdout's reader has gone: the caller ends quietly (its keys are deleted)
        raise
    except OSError as exc:  # this machine's (the output), not the server's: ConnectionLost
        return local_failure(exc, "run_client.py bench")
    except KeyboardInterrupt as exc:  # a second one, during the cleanup
        print(
            f"run_client.py bench: stopped before its keys ({prefix.decode()}*) were deleted", file=sys.stderr
        )
        return _interrupted(exc)


def _bench(opts: argparse.Namespace, tests: list[str], prefix: bytes) -> int:
    """Check the server answers, run the tests, and delete the bench's keys whatever happened
    (ending, failing, Ctrl-C, SIGTERM); the exit status."""
    try:  # one line and exit 3, not a failure per connection
        with _client(opts) as client:
            client.ping()
    except KeyboardInterrupt as exc:  # nothing written yet: no keys to speak of
        return _interrupted(exc)
    try:
        status = _run_tests(opts, tests, prefix)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Stopped)
        status = _interrupted(exc)
    except BaseException:
        _cleanup_or_say(opts, prefix)
        raise
    if not _cleanup_or_say(opts, prefix) and status < 128:
        return 3  # (the server could not be reached; an interruption keeps its own status)
    return status


def _cleanup_or_say(opts: argparse.Namespace, prefix: bytes) -> bool:
    """:func:`_cleanup`; False, having said on stderr which keys were left and why, when the
    server could not be reached for it. (Its ConnectionLost replaced the status of a bench
    interrupted while the server was stopped: exit 3, not 130 or 143, and the 10,000 keys
    left unsaid, an attacker's pass.)"""
    from kvgevent.errors import ConnectionLost

    try:
        _cleanup(opts, prefix)
    except ConnectionLost as exc:
        print(f"run_client.py bench: its keys ({prefix.decode()}*) were not deleted: {exc}", file=sys.stderr)
        return False
    return True


def _interrupted(exc: KeyboardInterrupt) -> int:
    """The exit status after an interruption: 128 + the signal's number, as a shell shows."""
    return 128 + (exc.signum if isinstance(exc, Stopped) else signal.SIGINT)


def _client(opts: argparse.Namespace) -> Client:
    """A connected client of the options' server (timeout, password, TLS)."""
    client = client_for(opts)
    client.connect()
    return client


def _run_tests(opts: argparse.Namespace, tests: list[str], prefix: bytes) -> int:
    """Run each test and print its report; 1 if any went wrong (:func:`_failed`), else 0."""
    status = 0
    if any(t in ("get", "update") for t in tests):
        _preload(opts, prefix)
    for test in tests:
        if test == "get":  # a DELETE or PUT test before cannot have touched these, but be sure
            _preload(opts, prefix)
        result = run_test(opts, test, prefix, sys.stdout)
        if _failed(result):
            status = 1
        _report(opts, result)
    return status


def _report(opts: argparse.Namespace, result: dict[str, Any]) -> None:
    """Print one test's result: a JSON line with --json, else the human report."""
    if opts.json:
        print(json.dumps(result), flush=True)
        return
    print(f"====== {result['test'].upper()} ======")
    print(f"  {result['requests']} requests completed in {result['seconds']:.2f} seconds")
    print(
        f"  {opts.clients} parallel clients, pipeline {opts.pipeline}, {opts.size} bytes payload, "
        f"{result['processes']} bench process(es) at {result['bench_cpu_pct']}% CPU"
    )
    print(f"  throughput: {result['ops_s']:,} requests per second")
    print(
        f"  latency per {result['latency_of']} (ms): p50 {result['p50_ms']:.3f}  "
        f"p99 {result['p99_ms']:.3f}  p99.9 {result['p999_ms']:.3f}  max {result['max_ms']:.3f}"
    )
    if _failed(result):
        print(
            f"  ERRORS: {result['errors']} ERR replies, {result['failed_connections']} failed connections"
            + (f", {result['lost_processes']} bench process(es) lost" if result["lost_processes"] else "")
        )
    print(flush=True)


def _failed(result: dict[str, Any]) -> bool:
    """Whether a test went wrong: ERR replies, failed connections, or a bench process that
    ended without a result (its requests are missing from the count)."""
    return bool(result["errors"] or result["failed_connections"] or result["lost_processes"])
