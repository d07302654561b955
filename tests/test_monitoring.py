"""Running kvgevent as a service (issue 14): Prometheus metrics and health over HTTP, systemd
readiness, a log file that logrotate can rotate. Everything against ``run_server.py`` over
loopback: metrics are scraped over HTTP and parsed with prometheus_client's own parser; systemd
is played by a datagram socket of the test's own; logrotate by a rename and a SIGHUP."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import pytest

from tests.conftest import (
    ROOT,
    Peer,
    RedisProcess,
    Systemd,
    fill_descriptors,
    free_port,
    http_get,
    log_events,
    needs_redis,
    read_stats,
    scrape,
    wait_until,
)


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_stopped_without_errors(proc) -> None:
    """SIGTERM ends ``proc`` with status 0, and it logged no error of the metrics port's nor
    printed a traceback."""
    assert proc.stop() == 0
    assert not [e for e in proc.events() if e["event"] in ("unhandled_error", "metrics_http_error")]
    assert b"Traceback" not in proc.stderr


def serving(server_process, *args: str, **options):
    metrics = free_port()
    proc = server_process("--metrics-port", str(metrics), *args, **options)
    wait_until(lambda: any(e["event"] == "metrics_listening" for e in proc.events()), 10)
    return proc, metrics


# --- metrics -------------------------------------------------------------------------------


def test_the_metrics_move_with_what_clients_do(server_process):
    """5 connections, 40 GETs, one client that never reads a big reply: the scrape shows them
    (connections, commands by verb, dropped clients by reason, dropped messages, keys, data
    bytes, batch times), with the process collector's figures beside them."""
    proc, metrics = serving(server_process, "--queue-bytes", "1M")
    before = scrape(metrics)
    peers = [Peer(proc.port) for _ in range(5)]
    peers[0].request(b"".join(b"PUT:big:%s\n" % (b"x" * 100_000) for _ in range(40)) + b"PUT:k:v\n")
    for peer in peers:
        assert peer.request(b"GET:k\n" * 8) == [b"k:v"] * 8
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", proc.port))
    stuck.sendall(b"GET:big\n" * 5)
    wait_until(lambda: read_stats(peers[0])["messages_dropped"] > 0, 20)
    stuck.close()
    peers[1].close()
    wait_until(lambda: read_stats(peers[0])["dropped"] == 2, 20)
    after = scrape(metrics)
    assert value(after, "kvgevent_connections_total") - value(before, "kvgevent_connections_total") == 6
    assert value(after, "kvgevent_clients_active") == 4
    assert value(after, "kvgevent_commands_total", verb="get") == 40 + 5
    assert value(after, "kvgevent_commands_total", verb="put") == 41
    # (the stuck one closes with unread data: a reset)
    assert value(after, "kvgevent_clients_dropped_total", reason="closed") == 1
    assert value(after, "kvgevent_clients_dropped_total", reason="reset") == 1
    assert value(after, "kvgevent_messages_dropped_total") > 0
    assert value(after, "kvgevent_keys") == 2
    assert value(after, "kvgevent_data_bytes") > 4_000_000
    assert value(after, "kvgevent_batch_seconds_count", store="memory", verb="get") >= 5
    assert value(after, "process_resident_memory_bytes") > 10_000_000
    assert value(after, "process_open_fds") > 5
    for peer in peers:
        peer.close()


def test_errors_are_counted_by_phrase(server_process):
    proc, metrics = serving(server_process)
    peer = Peer(proc.port)
    assert peer.request(b"bogus\nbogus\nPUT:k\n") == [b"ERR unknown command"] * 2 + [
        b"ERR wrong number of fields for PUT"
    ]
    samples = scrape(metrics)
    assert value(samples, "kvgevent_errors_total", reason="unknown command") == 2
    assert value(samples, "kvgevent_errors_total", reason="wrong number of fields for PUT") == 1
    assert value(samples, "kvgevent_commands_total", verb="ping") == 1
    peer.close()


def test_the_append_only_file_shows_its_fsyncs_and_the_ping_barrier(server_process, tmp_path):
    """Under --fsync always, a PUT and a PING: one fsync at least in the fsync histogram, the
    PING's wait in the barrier histogram, the file's size and health."""
    proc, metrics = serving(server_process, "--aof", str(tmp_path / "kv.aof"), "--fsync", "always")
    peer = Peer(proc.port)
    assert peer.request(b"PUT:k:v\n") == []
    samples = scrape(metrics)
    assert value(samples, "kvgevent_aof_fsync_seconds_count") >= 1
    assert value(samples, "kvgevent_ping_barrier_seconds_count") >= 1
    assert value(samples, "kvgevent_aof_ok") == 1
    assert value(samples, "kvgevent_aof_bytes") > 0
    assert value(samples, "kvgevent_batch_seconds_count", store="aof", verb="put") >= 1
    peer.close()


# --- health, and keeping the two protocols apart -------------------------------------------


def test_health_endpoints_and_nothing_else(server_process):
    _, metrics = serving(server_process)
    assert http_get(metrics, "/healthz") == (200, "ok\n")
    assert http_get(metrics, "/readyz") == (200, "ready\n")
    assert http_get(metrics, "/nope")[0] == 404
    assert http_get(metrics, "/")[0] == 404


def test_each_port_speaks_only_its_own_protocol(server_process):
    """The key-value port answers an HTTP request with ERR lines, never an HTTP status line;
    the metrics port answers the key-value protocol with an HTTP error, never a reply."""
    proc, metrics = serving(server_process)
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as kv:
        kv.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nPING\n")
        data = b""
        while not data.endswith(b"PONG\n"):
            data += kv.recv(4096)
        assert not data.startswith(b"HTTP/") and data.endswith(b"PONG\n")
    with socket.create_connection(("127.0.0.1", metrics), timeout=10) as http:
        http.sendall(b"PUT:k:v\nPING\n")
        reply = http.recv(4096)
        assert b"PONG" not in reply and (reply == b"" or reply.startswith(b"HTTP/1.1 4"))


def _listening(pid: int) -> set[tuple[str, int]]:
    """The TCP addresses ``pid`` listens on, as the kernel has them: its socket inodes (in
    /proc/PID/fd) matched against /proc/PID/net/tcp and tcp6."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile)
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError), open(f"/proc/{pid}/net/{table}") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # (0A: LISTEN)
                    address, port = fields[1].split(":")
                    raw = b"".join(bytes.fromhex(address[i : i + 8])[::-1] for i in range(0, len(address), 8))
                    found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_the_metrics_port_is_off_by_default_and_on_loopback_only(server_process):
    """Running it as a service: "``--metrics-port PORT`` (``KVGEVENT_METRICS_PORT``; off by
    default) serves HTTP from the server's own process and event loop, on ``--metrics-host``
    (``127.0.0.1``)", and "Keep the metrics port (``--metrics-host``) where only the scraper
    reaches it". Real processes; their listening sockets read from the kernel (/proc/PID/fd
    and /proc/PID/net/tcp*). Without the flag or the variable the server listens on its
    key-value port alone (no ``metrics_listening``); with ``KVGEVENT_METRICS_PORT=P`` alone it
    serves /healthz on P, bound to 127.0.0.1 and nothing wider (no wildcard address). Nothing
    injected. About 1.5 s."""
    kv_host = "127.0.0.1"  # (the suite stays on this address: see the README's Tests)
    plain = server_process("--host", kv_host)
    assert _listening(plain.proc.pid) == {(kv_host, plain.port)}
    assert plain.stop() == 0
    assert "metrics_listening" not in [e["event"] for e in plain.events()]
    port = free_port()
    proc = server_process("--host", kv_host, env={"KVGEVENT_METRICS_PORT": str(port)})
    wait_until(
        lambda: any(e["event"] == "metrics_listening" for e in proc.events()),
        10,
        "no metrics_listening with KVGEVENT_METRICS_PORT set",
    )
    assert _listening(proc.proc.pid) == {(kv_host, proc.port), ("127.0.0.1", port)}
    assert http_get(port, "/healthz") == (200, "ok\n")
    (listening,) = [e for e in proc.events() if e["event"] == "metrics_listening"]
    assert (listening["host"], listening["port"]) == ("127.0.0.1", port)
    assert_stopped_without_errors(proc)


@needs_redis
def test_readyz_follows_the_redis_store(server_process, tmp_path):
    """/readyz is 503 with the reason while Redis is killed, 200 once it is back."""
    redis = RedisProcess(tmp_path)
    try:
        _, metrics = serving(server_process, "--store", redis.url)
        assert http_get(metrics, "/readyz") == (200, "ready\n")
        redis.kill()
        status, body = http_get(metrics, "/readyz")
        assert status == 503 and "store unavailable" in body
        assert http_get(metrics, "/healthz") == (200, "ok\n")
        redis.start()
        wait_until(lambda: http_get(metrics, "/readyz")[0] == 200, 15, "not ready again")
    finally:
        redis.kill()


@needs_redis
def test_the_store_outage_alert_follows_a_redis_killed_and_restarted(server_process, tmp_path):
    """Running it as a service, the alert ``KvgeventStoreOutage`` ("Redis unreachable:
    commands get ERR store unavailable"; ``kvgevent_store_nodes_down > 0 or
    rate(kvgevent_store_unavailable_total[5m]) > 0``) and the table: "the Redis store's
    commands failed for an unreachable node ... (commands, not episodes), and its nodes in an
    outage". The outage is real: the test's own redis-server killed (SIGKILL, by pid), then
    started again on its port. Scraped: both series present and 0 while Redis serves; while it
    is dead, the failed commands counted and, once a command found Redis refusing its connect,
    1 node down (a connection lost in its round trip is no outage by itself: README's Redis
    table, "Redis killed, when the next connect begins the outage"); 0 nodes down once it is
    back (the counter keeps its count). Nothing injected. About 1 s."""
    redis = RedisProcess(tmp_path)
    try:
        proc, metrics = serving(server_process, "--store", redis.url)
        peer = Peer(proc.port)
        assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
        samples = scrape(metrics)
        for name in ("kvgevent_store_nodes_down", "kvgevent_store_unavailable_total"):
            assert samples.get((name, ())) == 0, (name, samples.get((name, ())))
        redis.kill()
        assert peer.request(b"GET:k\nPUT:k:w\nGET:k\n") == [b"ERR store unavailable"] * 3

        def node_down() -> bool:  # (a command each time: the one that finds Redis refusing)
            assert peer.request(b"GET:k\n") == [b"ERR store unavailable"]
            return value(scrape(metrics), "kvgevent_store_nodes_down") == 1

        wait_until(node_down, 10, "kvgevent_store_nodes_down never said 1")
        assert value(scrape(metrics), "kvgevent_store_unavailable_total") >= 4
        redis.start()
        wait_until(
            lambda: value(scrape(metrics), "kvgevent_store_nodes_down") == 0, 15, "the outage did not end"
        )
        assert peer.request(b"PUT:k:x\nGET:k\n") == [b"k:x"]
        assert value(scrape(metrics), "kvgevent_store_unavailable_total") >= 4
        peer.close()
        assert_stopped_without_errors(proc)
    finally:
        redis.kill()


@needs_redis
def test_every_worker_serves_its_own_metrics_port(server_process, redis_server):
    """--workers 2 --metrics-port P: worker 0 on P, worker 1 on P + 1, each logged."""
    base = free_port()
    while True:  # P and P + 1 both free
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", base + 1))
                break
            except OSError:
                base = free_port()
    proc = server_process(
        "--workers", "2", "--store", redis_server.url, "--metrics-port", str(base), wait=False
    )
    wait_until(lambda: sum(e["event"] == "metrics_listening" for e in proc.events()) == 2, 20)
    ports = sorted(e["port"] for e in proc.events() if e["event"] == "metrics_listening")
    assert ports == [base, base + 1]
    for port in ports:
        assert http_get(port, "/healthz") == (200, "ok\n")
        assert value(scrape(port), "kvgevent_clients_active") == 0
    assert proc.stop() == 0


# --- systemd ------------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_hears_ready_once_listening_and_stopping_at_shutdown(
    server_process, tmp_path, workers, request
):
    """NOTIFY_SOCKET set: READY=1 comes once the port answers (with --workers, once every
    worker does), STOPPING=1 when SIGTERM starts the shutdown."""
    systemd = Systemd(tmp_path)
    args = []
    if workers > 1:
        redis = request.getfixturevalue("redis_server")
        args = ["--workers", str(workers), "--store", redis.url]
    try:
        proc = server_process(*args, env={"NOTIFY_SOCKET": systemd.path}, wait=False)
        ready = systemd.next()
        assert "READY=1" in ready.split("\n")
        Peer(proc.port).close()  # it listens (a connection refused would raise)
        proc.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in systemd.next().split("\n")
        assert proc.stop(sig=None) == 0
    finally:
        systemd.close()


PAUSE_FIRST_WORKER = (
    "import os\n"
    "fifo = os.environ.get('PAUSE_FIRST_WORKER')\n"
    "if fifo and os.environ.get('KVGEVENT_SUPERVISOR_PID'):\n"
    "    try:\n"
    "        os.close(os.open(fifo + '.claimed', os.O_CREAT | os.O_EXCL | os.O_WRONLY))\n"
    "    except FileExistsError:\n"
    "        pass\n"
    "    else:\n"
    "        fd = os.open(fifo, os.O_RDONLY)\n"
    "        os.read(fd, 1)\n"
    "        os.close(fd)\n"
)
"""A sitecustomize for workers: the first to start waits, before it imports anything, until
the test writes a byte to ``$PAUSE_FIRST_WORKER`` (a FIFO); the others go on."""


def _release(fifo: Path) -> None:
    """Let the worker that PAUSE_FIRST_WORKER holds go on (nothing if none is waiting)."""
    with contextlib.suppress(OSError):  # (ENXIO: no reader, BrokenPipeError: it died)
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        try:
            os.write(writer, b"x")
        finally:
            os.close(writer)


def test_systemd_hears_ready_only_once_every_running_worker_listens(server_process, tmp_path, request):
    """--workers 2 with NOTIFY_SOCKET: one worker held before it listens, the other killed
    (SIGKILL) after it listened and sent READY=1, then restarted, listening and sending its own
    READY=1: two READY=1 from one slot are not both workers. systemd hears READY=1 only once
    the held worker listens too. Before, the supervisor counted READY=1 messages and told
    systemd READY=1 with a worker not listening yet. (The hold is a sitecustomize reading a
    FIFO: the worker is a real process that has not listened; the kill is real.)"""
    redis = request.getfixturevalue("redis_server")
    systemd = Systemd(tmp_path)
    (tmp_path / "sitecustomize.py").write_text(PAUSE_FIRST_WORKER)
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    env = {
        "NOTIFY_SOCKET": systemd.path,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "PAUSE_FIRST_WORKER": str(fifo),
    }

    def listening() -> list[int]:
        return [e["worker"] for e in proc.events() if e["event"] == "server_started"]

    try:
        proc = server_process("--workers", "2", "--store", redis.url, env=env)  # (one listens)
        (first,) = listening()
        os.kill(first, signal.SIGKILL)
        wait_until(lambda: len(listening()) == 2, timeout=30, message="the killed worker was not replaced")
        systemd.sock.settimeout(2.0)  # (before, READY=1 came at once: the replacement's was the second)
        with pytest.raises(TimeoutError):
            systemd.next()
        _release(fifo)
        systemd.sock.settimeout(30)
        assert "READY=1" in systemd.next().split("\n")
        assert len(listening()) == 3  # (the held worker's server_started: logged before its READY=1)
        assert proc.stop() == 0
    finally:
        _release(fifo)
        systemd.close()
    events = proc.events()
    assert [e["pid"] for e in events if e["event"] == "worker_exited"] == [first]
    assert b"Traceback" not in proc.stderr


def test_a_tmpdir_too_long_for_a_unix_socket_does_not_stop_the_supervisor(server_process, tmp_path, request):
    """--workers with NOTIFY_SOCKET and a TMPDIR whose path is too long for a Unix socket's
    address (108 bytes): the supervisor's socket for its workers' READY=1 takes a name in the
    abstract namespace instead, and systemd hears READY=1 once both workers listen. Before,
    the supervisor died at start with an "AF_UNIX path too long" traceback."""
    redis = request.getfixturevalue("redis_server")
    systemd = Systemd(tmp_path)
    long_tmpdir = tmp_path / ("t" * 60) / ("m" * 60)
    long_tmpdir.mkdir(parents=True)
    env = {"NOTIFY_SOCKET": systemd.path, "TMPDIR": str(long_tmpdir)}
    try:
        proc = server_process("--workers", "2", "--store", redis.url, env=env, wait=False)
        assert "READY=1" in systemd.next().split("\n")
        assert [e["event"] for e in proc.events()].count("server_started") == 2  # (logged before READY=1)
        proc.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in systemd.next().split("\n")
        assert proc.stop(sig=None) == 0
    finally:
        systemd.close()
    assert b"Traceback" not in proc.stderr
    assert not [e for e in proc.events() if e["event"] == "notify_relay_unavailable"]
    assert not list(long_tmpdir.iterdir())  # (nothing left behind)


def test_what_a_supervisor_killed_by_sigkill_left_is_removed_by_the_next(server_process, tmp_path, request):
    """--workers with NOTIFY_SOCKET: the supervisor's socket for its workers' READY=1 is in a
    private directory of TMPDIR (only its user can send there: a name in the abstract
    namespace, tried first for a while, let any local user fill its queue and drop every
    READY=1, an attacker's pass). A supervisor killed by SIGKILL (no cleanup runs) leaves
    that directory; the next supervisor removes it (each such kill left one for good: 201
    in /tmp after test runs), and leaves alone another user's and one whose supervisor runs
    (a directory named for this test's own pid). Real: SIGKILL after READY=1; the workers,
    which exit when their supervisor dies, are waited for (killed by pid if still there at
    the deadline)."""
    redis = request.getfixturevalue("redis_server")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    running = tmpdir / f"kvgevent-notify-{os.getpid()}-abc"  # (its supervisor runs: this test)
    running.mkdir()
    others = tmpdir / "kvgevent-notify-999999999-abc"  # (no such pid, but another user's)
    others.mkdir()
    os.chown(others, 65534, 65534)
    env = {"TMPDIR": str(tmpdir)}

    def supervise(name: str) -> tuple[Any, list[int], set[str]]:
        (tmp_path / name).mkdir()
        systemd = Systemd(tmp_path / name)
        proc = server_process(
            "--workers", "2", "--store", redis.url, env={**env, "NOTIFY_SOCKET": systemd.path}
        )
        try:
            assert "READY=1" in systemd.next().split("\n")
        finally:
            systemd.close()
        pid = proc.proc.pid
        workers = [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return proc, workers, {entry.name for entry in tmpdir.iterdir()}

    workers: list[int] = []
    try:
        first, workers, seen = supervise("first")
        (left,) = seen - {running.name, others.name}
        assert left.startswith(f"kvgevent-notify-{first.proc.pid}-"), left
        first.proc.kill()
        first.proc.wait(timeout=10)
        wait_until(lambda: not any(Path(f"/proc/{w}").exists() for w in workers), 20, "the workers stayed")
        assert (tmpdir / left / "notify").exists()  # (what the kill left)
        second, workers, seen = supervise("second")
        assert left not in seen and {running.name, others.name} < seen, seen
        assert second.stop() == 0
        assert {entry.name for entry in tmpdir.iterdir()} == {running.name, others.name}
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)


NO_UNIX_SOCKET_BINDS = """
import errno, socket, sys
sys.path.insert(0, {root!r})
from gevent import monkey
monkey.patch_all()
import gevent.socket
bind = gevent.socket.socket.bind
def refused(self, address):
    if self.family == socket.AF_UNIX and "kvgevent-supervisor-port-" not in str(address):
        raise OSError(errno.EADDRINUSE, "Address already in use")
    return bind(self, address)
gevent.socket.socket.bind = refused
from kvgevent.serve.cli import main
sys.exit(main())
"""
"""``run_server.py`` whose Unix sockets cannot be bound (in the supervisor only: its workers
are processes of their own), but for its claim on its port."""


def test_a_supervisor_that_cannot_bind_its_workers_notify_socket_runs_without(
    server_process, tmp_path, request
):
    """--workers with NOTIFY_SOCKET, and no socket for the workers' READY=1 can be bound: the
    supervisor says so once (notify_relay_unavailable), tells systemd READY=1 once the workers
    are started, and serves; the workers, given no NOTIFY_SOCKET, tell systemd nothing
    themselves. Before, OSError ended the supervisor with a traceback. The bind's failure is
    injected (every AF_UNIX bind of the supervisor refused with EADDRINUSE): the abstract
    namespace, the fallback, cannot be made to refuse a fresh name for real."""
    redis = request.getfixturevalue("redis_server")
    systemd = Systemd(tmp_path)
    script = tmp_path / "supervisor.py"
    script.write_text(NO_UNIX_SOCKET_BINDS.format(root=str(ROOT)))
    try:
        proc = server_process(
            "--workers", "2", "--store", redis.url, env={"NOTIFY_SOCKET": systemd.path}, script=script
        )  # (returns once a worker listens)
        assert "READY=1" in systemd.next().split("\n")
        wait_until(lambda: proc.stderr.count(b'"server_started"') == 2, timeout=20)
        peer = Peer(proc.port)
        assert peer.request(b"") == []
        peer.close()
        proc.proc.send_signal(signal.SIGTERM)
        assert "STOPPING=1" in systemd.next().split("\n")
        assert proc.stop(sig=None) == 0
        systemd.sock.settimeout(0.5)  # (the workers' STOPPING=1 would have come with the supervisor's)
        with pytest.raises(TimeoutError):
            systemd.next()
    finally:
        systemd.close()
    (unavailable,) = [e for e in proc.events() if e["event"] == "notify_relay_unavailable"]
    assert unavailable["error"] == "Address already in use" and unavailable["hint"]
    assert b"Traceback" not in proc.stderr


@pytest.mark.parametrize("workers", [1, 2])
def test_systemd_watchdog_hears_from_the_event_loop_while_it_runs(server_process, tmp_path, workers, request):
    """WatchdogSec= set (WATCHDOG_USEC, here 0.6 s): WATCHDOG=1 comes every half of it, from
    the event loop: a server stopped for real (SIGSTOP) sends none, so systemd would restart
    it; resumed, it sends them again. With --workers the supervisor sends them (the workers
    are its to watch: --worker-timeout)."""
    systemd = Systemd(tmp_path)
    systemd.sock.settimeout(2.0)
    args = []
    if workers > 1:
        redis = request.getfixturevalue("redis_server")
        args = ["--workers", str(workers), "--store", redis.url]
    env = {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "600000"}
    try:
        proc = server_process(*args, env=env, wait=False)
        messages = [systemd.next() for _ in range(8)]
        assert any("READY=1" in m.split("\n") for m in messages)
        assert messages.count("WATCHDOG=1") >= 5
        proc.proc.send_signal(signal.SIGSTOP)
        try:
            systemd.sock.settimeout(0.3)
            with contextlib.suppress(TimeoutError):
                while True:  # (those sent before the stop)
                    systemd.next()
            systemd.sock.settimeout(1.5)  # (five intervals: none comes from a stopped loop)
            with pytest.raises(TimeoutError):
                systemd.next()
        finally:
            proc.proc.send_signal(signal.SIGCONT)
        systemd.sock.settimeout(5.0)
        assert systemd.next() == "WATCHDOG=1"
        assert proc.stop() == 0
    finally:
        systemd.close()


def test_systemd_watchdog_is_off_unless_asked_for_this_process(server_process, tmp_path):
    """No WATCHDOG=1 without WATCHDOG_USEC, nor when WATCHDOG_PID names another process
    (systemd's rule: the variables were meant for that one, a parent's leaked here)."""
    for env in ({}, {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}):
        systemd = Systemd(tmp_path)
        try:
            proc = server_process(env={"NOTIFY_SOCKET": systemd.path, **env}, wait=False)
            assert "READY=1" in systemd.next().split("\n")
            systemd.sock.settimeout(1.0)  # (ten intervals of the one asked for another process)
            with pytest.raises(TimeoutError):
                systemd.next()
            assert proc.stop() == 0
        finally:
            systemd.close()
            os.unlink(systemd.path)


def test_watchdog_usec_is_read_as_systemd_reads_it(monkeypatch):
    """WATCHDOG_USEC as sd_watchdog_enabled takes it: microseconds in ASCII digits, above 0
    and below USEC_INFINITY, for this process unless WATCHDOG_PID names another; anything
    else is no watchdog. Never more often than every 50 ms (before: a WATCHDOG_USEC of 1 made
    the loop send WATCHDOG=1 without end). Before, a non-ASCII digit ("\u00b2") raised ValueError at start,
    and USEC_INFINITY (or more) gave an interval of 292,000 years instead of None."""
    from kvgevent.serve.systemd import watchdog_interval

    monkeypatch.setenv("NOTIFY_SOCKET", "/nowhere")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    expected = {
        "600000": 0.3,
        "1": 0.05,  # (WATCHDOG_MIN_INTERVAL: half a microsecond would spin the loop)
        "18446744073709551614": (2**64 - 2) / 2e6,
        "18446744073709551615": None,  # USEC_INFINITY
        "99999999999999999999": None,
        "0": None,
        "": None,
        "-5": None,
        " 600000": None,
        "6e5": None,
        "\u00b2": None,  # (isdigit, but not int's)
        "\u0661\u0662": None,  # (Arabic-Indic digits: int's, not systemd's)
    }
    for usec, interval in expected.items():
        monkeypatch.setenv("WATCHDOG_USEC", usec)
        assert watchdog_interval() == interval, usec
    monkeypatch.setenv("WATCHDOG_USEC", "600000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 0.3
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.delenv("NOTIFY_SOCKET")
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() is None


def test_the_first_watchdog_and_ready_come_once_a_long_replay_is_over(server_process, tmp_path):
    """Running it as a service: "the server sends ``READY=1`` once it listens, after the
    append-only file was replayed", and with ``WatchdogSec=``: "The first goes once the store
    is loaded ...: a long append-only file replay comes under ``TimeoutStartSec=`` (90 s by
    default), not ``WatchdogSec=``". A real log of 300,000 records (about 1 s of replay here)
    and WATCHDOG_USEC of 0.2 s (a WATCHDOG=1 every 0.1 s): when the first WATCHDOG=1, and when
    READY=1, reach the test's notification socket, the server has already logged
    ``aof_replayed`` (it writes each log line before it goes on: a WATCHDOG=1 sent during the
    replay would find none yet); at READY=1 the port serves every value replayed for a key.
    Nothing injected. About 2 s."""
    from kvgevent.stores.aof import MAGIC, encode_record

    records = 300_000
    path = tmp_path / "data.aof"
    path.write_bytes(MAGIC + b"".join(encode_record(b"PUT:k%d:v%d" % (n % 1000, n)) for n in range(records)))
    systemd = Systemd(tmp_path)
    env = {"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "200000"}
    try:
        proc = server_process("--aof", str(path), env=env, wait=False)
        replayed_when_heard: dict[str, bool] = {}
        while len(replayed_when_heard) < 2:
            lines = systemd.next().split("\n")
            replayed = any(e["event"] == "aof_replayed" for e in proc.events())
            for kind in ("WATCHDOG=1", "READY=1"):
                if kind in lines:
                    replayed_when_heard.setdefault(kind, replayed)
        assert replayed_when_heard == {"WATCHDOG=1": True, "READY=1": True}
        peer = Peer(proc.port)
        assert peer.request(b"GET:k999\n") == [b"k999:v%d" % n for n in range(999, records, 1000)]
        peer.close()
        assert proc.stop() == 0
    finally:
        systemd.close()
        path.unlink()
    (replayed_event,) = [e for e in proc.events() if e["event"] == "aof_replayed"]
    assert replayed_event["records"] == records


def test_a_notification_socket_with_no_room_holds_up_neither_start_nor_shutdown(server_process, tmp_path):
    """Running it as a service: "a notification never holds up the server: one the receiver
    has no room for is dropped". A systemd that reads nothing, for real: the test's
    notification socket has its queue of datagrams filled by the test (until the kernel
    refuses one) before the server starts, and is read only once the server has exited; with
    WATCHDOG_USEC set too, a WATCHDOG=1 every 0.1 s finds no room either. The server starts
    (``server_started``), serves a client, and SIGTERM ends it with status 0 within the stop's
    10 s; the queue then holds the test's datagrams only (the server's were dropped). Nothing
    injected. Under 1 s."""
    systemd = Systemd(tmp_path)
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        filler.setblocking(False)
        filler.connect(systemd.path)
        queued: list[bytes] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                filler.send(b"FILLER=%d" % len(queued))
                queued.append(b"FILLER=%d" % len(queued))
        assert queued, "the queue took nothing"
        proc = server_process(env={"NOTIFY_SOCKET": systemd.path, "WATCHDOG_USEC": "200000"})
        peer = Peer(proc.port)
        assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
        peer.close()
        assert proc.stop() == 0
        systemd.sock.setblocking(False)
        heard: list[bytes] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                heard.append(systemd.sock.recv(4096))
        assert heard == queued
    finally:
        filler.close()
        systemd.close()


def test_a_sigterm_sent_the_moment_ready_is_announced_shuts_down_cleanly(tmp_path):
    """A SIGTERM that arrives as READY=1 is sent (systemd stopping a service just started, a
    supervisor that kills what it just saw listening) starts the usual shutdown: STOPPING=1,
    exit status 0. The signal is real, sent to the server's own process from its ``notify``
    at READY=1 (the window is microseconds wide: only there can a test hit it every time);
    the handlers used to be installed only after READY=1, and SIGTERM's default action
    killed the process."""
    import subprocess
    import sys
    import textwrap

    systemd = Systemd(tmp_path)
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from kvgevent.serve import cli
        send = cli.notify
        def notify(message):
            sent = send(message)
            if message.startswith("READY=1"):
                os.kill(os.getpid(), signal.SIGTERM)
            return sent
        cli.notify = notify
        sys.exit(cli.main(["--host", "127.0.0.1", "--port", "{free_port()}", "--log-format", "json"]))
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, "NOTIFY_SOCKET": systemd.path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert "READY=1" in systemd.next().split("\n")
        assert "STOPPING=1" in systemd.next().split("\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        systemd.close()


def test_a_worker_whose_supervisor_is_gone_does_not_serve(tmp_path):
    """A worker checks, once its own handlers are installed, that the supervisor that started
    it is still its parent, and asks again for its death signal: the request made between
    fork and exec is lost if the supervisor dies before it. A supervisor killed in that
    window left an orphan worker serving the port. The window is too narrow to hit from a test: here
    the worker is told a supervisor pid that is not its parent's, which is what it sees when
    its supervisor died first (its parent is then init)."""
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "KVGEVENT_SUPERVISOR_PID": str(os.getpid() + 1_000_000)}
    result = subprocess.run(
        [sys.executable, "-m", "kvgevent", "--host", "127.0.0.1", "--port", str(port), "--log-format=json"],
        cwd=Path(__file__).resolve().parent.parent, env=env, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1
    assert b"the supervisor of this worker is gone" in result.stderr
    assert b'"server_started"' not in result.stderr


def test_a_worker_starts_with_sighup_ignored_until_it_handles_it():
    """The supervisor passes SIGHUP on to every worker (each reopens its --log-file), a
    worker just started too: before the worker installed its own handler, SIGHUP's default
    action killed it (an extra restart, counted towards giving up). Workers start with SIGHUP
    ignored (kept across exec) until their handler replaces it."""
    import subprocess
    import sys

    from kvgevent.serve.workers import _die_with_parent

    out = subprocess.run(
        [sys.executable, "-c", "import signal; print(signal.getsignal(signal.SIGHUP) == signal.SIG_IGN)"],
        preexec_fn=_die_with_parent, capture_output=True, timeout=30, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == b"True"


PAUSE_AT_GEVENT_IMPORT = (
    "import os, sys\n"
    "fifo = os.environ.get('PAUSE_AT_GEVENT_IMPORT')\n"
    "class Pause:\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'gevent':\n"
    "            sys.meta_path.remove(self)\n"
    "            fd = os.open(fifo, os.O_RDONLY)\n"
    "            os.read(fd, 1)\n"
    "            os.close(fd)\n"
    "if fifo and not os.environ.get('KVGEVENT_SUPERVISOR_PID'):\n"
    "    sys.meta_path.insert(0, Pause())\n"
)
"""A sitecustomize for the server (the supervisor with --workers, not its workers): its first
import of gevent waits until the test has opened ``$PAUSE_AT_GEVENT_IMPORT`` (a FIFO) and
written a byte to it."""


@pytest.mark.parametrize("how", ["run_server.py", "kvgevent-server", "--workers"])
def test_a_sighup_while_the_server_starts_does_not_kill_it(server_process, tmp_path, how, request):
    """A SIGHUP (logrotate's postrotate, ExecReload=) that comes as the server starts, before
    its handler is installed: the server starts and serves. Before, SIGHUP's default action
    killed it (the supervisor too), in about the first 0.3 s after launch, and systemd counts
    a death by SIGHUP as clean: Restart=on-failure did not restart it. The SIGHUP is real; the
    process is held at its first import of gevent (a sitecustomize reading a FIFO) so that it
    comes inside that window every time. ``kvgevent-server`` is the installed command's script
    (``from kvgevent.serve.entry import main``)."""
    (tmp_path / "sitecustomize.py").write_text(PAUSE_AT_GEVENT_IMPORT)
    fifo = tmp_path / "pause"
    os.mkfifo(fifo)
    pythonpath = [str(tmp_path), str(ROOT), os.environ.get("PYTHONPATH")]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, pythonpath)), "PAUSE_AT_GEVENT_IMPORT": str(fifo)}
    args: list[str] = []
    options: dict[str, Any] = {}
    if how == "--workers":
        args = ["--workers", "2", "--store", request.getfixturevalue("redis_server").url]
    elif how == "kvgevent-server":
        options["script"] = tmp_path / "kvgevent-server"
        options["script"].write_text("import sys\nfrom kvgevent.serve.entry import main\nsys.exit(main())\n")
    proc = server_process(*args, env=env, wait=False, **options)
    writer = -1

    def paused() -> bool:  # (a FIFO opens for writing once its reader is opening it)
        nonlocal writer
        with contextlib.suppress(OSError):
            writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        return writer >= 0 or proc.proc.poll() is not None

    wait_until(paused, timeout=30, message="the server did not reach its import of gevent")
    assert writer >= 0, proc.stderr.decode()
    proc.proc.send_signal(signal.SIGHUP)
    with contextlib.suppress(BrokenPipeError):  # (the server died of it: its reader is gone)
        os.write(writer, b"x")
    os.close(writer)
    started = 2 if how == "--workers" else 1
    wait_until(
        lambda: proc.stderr.count(b'"server_started"') == started or proc.proc.poll() is not None,
        timeout=30,
        message="server did not start",
    )
    assert proc.proc.poll() is None, f"exit status {proc.proc.returncode}: {proc.stderr.decode()[-2000:]}"
    peer = Peer(proc.port)
    assert peer.request(b"") == []  # (it serves: a round trip, done before the SIGTERM)
    peer.close()
    assert_stopped_without_errors(proc)


# --- the log file --------------------------------------------------------------------------


def test_sighup_reopens_the_log_file_and_no_event_is_lost(server_process, tmp_path):
    """--log-file: after the file is renamed (logrotate) and SIGHUP is sent, the next events
    go to a new file at the path; every connection's client_connected is in one of the two."""
    path = tmp_path / "kv.log"
    proc = server_process("--log-file", str(path), wait=False)
    wait_until(lambda: path.exists() and b'"server_started"' in path.read_bytes(), 10)

    def connect_and_close() -> None:
        peer = Peer(proc.port)
        peer.expect_no_reply()  # a PING's PONG: client_connected was written before it
        peer.close()

    for _ in range(3):
        connect_and_close()
    rotated = tmp_path / "kv.log.1"
    os.rename(path, rotated)
    for _ in range(2):
        connect_and_close()  # still into the renamed file: not reopened yet
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(path.exists, 10, "the file was not reopened")
    for _ in range(4):
        connect_and_close()
    assert proc.stop() == 0
    old, new = rotated.read_text(), path.read_text()
    assert old.count('"client_connected"') == 5
    assert new.count('"client_connected"') == 4
    assert '"server_stopped"' in new
    assert proc.stderr == b"" or b"Traceback" not in proc.stderr


@pytest.mark.parametrize("fault", ["directory in its place", "directory gone"])
def test_a_sighup_whose_log_path_cannot_be_opened_keeps_the_old_file(server_process, tmp_path, fault):
    """Running it as a service: "a SIGHUP whose path cannot be opened (its directory gone, a
    directory in its place) keeps the old file and logs ``log_reopen_failed`` there". Real:
    logrotate played by renames, then a real SIGHUP: either the log renamed and a directory
    made at its path, or the log's whole directory renamed away (its path's directory gone).
    The server keeps serving, into the old file (at its new name), where one
    ``log_reopen_failed`` says why and the events after it follow (a client connected after
    it); a later SIGHUP, once the path can be opened again, reopens it; SIGTERM exits 0.
    Before, the reopen's error escaped the signal handler and ended the process (exit 1,
    every client cut). Nothing injected. About 1 s each."""
    logs = tmp_path / "logs"
    logs.mkdir()
    path = logs / "kv.log"
    proc = server_process("--log-file", str(path), wait=False)
    wait_until(lambda: path.exists() and b'"server_started"' in path.read_bytes(), 10)
    if fault == "directory in its place":
        rotated, error = logs / "kv.log.1", "Is a directory"
        os.rename(path, rotated)
        path.mkdir()
    else:
        rotated, error = tmp_path / "logs.old" / "kv.log", "No such file or directory"
        os.rename(logs, rotated.parent)
    peer = Peer(proc.port, timeout=10)
    assert peer.request(b"") == []  # (its client_connected is in before the SIGHUP)
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: b'"log_reopen_failed"' in rotated.read_bytes(), 10, "no log_reopen_failed")
    assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
    later = Peer(proc.port, timeout=10)
    assert later.request(b"GET:k\n") == [b"k:v"]  # (its client_connected is logged before)
    later.close()
    if fault == "directory in its place":
        path.rmdir()
    else:
        logs.mkdir()
    proc.proc.send_signal(signal.SIGHUP)
    wait_until(path.exists, 10, "the file was not reopened")
    assert peer.request(b"GET:k\n") == [b"k:v"]
    peer.close()
    assert proc.stop() == 0
    old = [json.loads(line) for line in rotated.read_text().splitlines()]
    (failed,) = [e for e in old if e["event"] == "log_reopen_failed"]
    assert (failed["path"], failed["error"]) == (str(path), error)
    after = [e["event"] for e in old[old.index(failed) + 1 :]]
    assert after.count("client_connected") == 1, after
    assert '"server_stopped"' in path.read_text() and b"Traceback" not in proc.stderr


@needs_redis
def test_a_sighup_to_the_supervisor_reopens_every_workers_log_file(server_process, redis_server, tmp_path):
    """Running it as a service: "``--log-file PATH`` writes JSON lines to PATH; SIGHUP reopens
    it, so logrotate's usual ``postrotate`` works (with ``--workers``, the supervisor passes
    SIGHUP on)". logrotate played for real: the log renamed, then one SIGHUP to the supervisor
    only (``systemctl kill -s HUP``, ``kill -HUP $MAINPID``). Then every process (the
    supervisor and both workers) holds a file at the path and none holds the rotated one
    (their descriptors, read in /proc), a client is served, and after SIGTERM each worker's
    ``server_stopped`` and the supervisor's ``workers_stopped`` are in the new file, none in
    the rotated one. Nothing injected. About 1.5 s (6 s on a busy machine)."""
    path, rotated = tmp_path / "kv.log", tmp_path / "kv.log.1"
    proc = server_process("--workers", "2", "--store", redis_server.url, "--log-file", str(path), wait=False)

    def started() -> set[int]:
        return {e["worker"] for e in _log_lines(path) if e["event"] == "server_started"}

    wait_until(lambda: len(started()) == 2 or proc.proc.poll() is not None, 30, "the workers did not start")
    workers = started()
    assert len(workers) == 2, proc.stderr.decode()[-2000:]
    pids = [proc.proc.pid, *sorted(workers)]
    os.rename(path, rotated)
    proc.proc.send_signal(signal.SIGHUP)

    def reopened() -> bool:
        return all(str(path) in _open_paths(pid) and str(rotated) not in _open_paths(pid) for pid in pids)

    try:
        wait_until(reopened, 10)
    except AssertionError:
        held = {pid: sorted(p for p in _open_paths(pid) if p.startswith(str(path))) for pid in pids}
        raise AssertionError(f"not every process reopened the log (supervisor first): {held}") from None
    peer = Peer(proc.port)
    assert peer.request(b"PUT:rotated:v\nGET:rotated\n") == [b"rotated:v"]
    peer.close()
    assert proc.stop() == 0
    new, old = _log_lines(path), _log_lines(rotated)
    assert {e["worker"] for e in new if e["event"] == "server_stopped"} == workers
    assert [e["event"] for e in new].count("workers_stopped") == 1
    assert [e["event"] for e in old if e["event"] in ("server_stopped", "workers_stopped")] == []
    assert b"Traceback" not in proc.stderr


def _log_lines(path: Path) -> list[dict[str, Any]]:
    """The complete lines of a JSON log file, parsed (none if it is not there)."""
    text = path.read_text() if path.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def _open_paths(pid: int) -> set[str]:
    """What the descriptors of ``pid`` name (a renamed file by its new name)."""
    paths = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # (closed meanwhile)
            paths.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return paths


def test_a_sighup_at_the_open_files_limit_reopens_the_log_once_files_are_free(server_process, tmp_path):
    """logrotate renamed the log and sent SIGHUP while the server had no file to spare (its
    open-files limit lowered for real, every free number taken): ``log_reopen_failed`` into
    the old file, as documented; then, once the limit is back, the reopen is tried again by
    itself and the log is at its path (``log_reopened`` there), with no second SIGHUP. It was
    never tried again: a whole day written into the rotated file (an attacker's pass)."""
    import resource

    path = tmp_path / "kv.log"
    proc = server_process("--log-file", str(path), wait=False)
    wait_until(lambda: path.exists() and b'"server_started"' in path.read_bytes(), 10)
    peer = Peer(proc.port, timeout=10)
    assert peer.request(b"") == []  # (accepted: its file is open before the limit is set)
    limits = resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE)
    fillers = fill_descriptors(proc.port, proc.proc.pid)
    try:
        rotated = tmp_path / "kv.log.1"
        os.rename(path, rotated)
        proc.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: b'"log_reopen_failed"' in rotated.read_bytes(), 10, "no log_reopen_failed")
        assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
        assert not path.exists()
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, limits)
        wait_until(path.exists, 10, "not reopened once files were free")
        wait_until(lambda: b'"log_reopened"' in path.read_bytes(), 10)
    finally:
        for filler in fillers:
            filler.close()
    peer.close()
    assert proc.stop() == 0
    assert '"server_stopped"' in path.read_text() and b"Traceback" not in proc.stderr


def test_a_log_on_a_full_disk_drops_lines_and_the_server_serves_on(server_process, tmp_path):
    """``--log-file`` on a real full disk (a 1 MiB tmpfs, its free space taken by a filler
    file): 40 clients are served one after another while their events are dropped (once the
    log's last page is full), stderr says so once;
    once space is free again, ``log_lines_lost`` counts the dropped lines; SIGTERM exits 0;
    every line of the log is whole JSON. Before, each failed log write raised into the
    client's handler: every client was reset, and SIGTERM exited 1 with a traceback; later,
    the line whose write filled the disk stayed half-written, the next event glued to it."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs, and mounting one needs root (CI runs as root)")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        path = disk / "kv.log"
        proc = server_process("--log-file", str(path), wait=False)
        wait_until(lambda: path.exists() and b'"server_started"' in path.read_bytes(), 10)
        filler = disk / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        with contextlib.suppress(OSError):  # (until the disk is full)
            while True:
                os.write(fd, bytes(4096))
        os.close(fd)
        for n in range(40):  # (each connects and goes: two events each; the last page fills)
            peer = Peer(proc.port, timeout=10)
            assert peer.request(b"PUT:k%d:v\nGET:k%d\n" % (n, n)) == [b"k%d:v" % n]
            peer.close()
        wait_until(lambda: b"cannot write the log file" in proc.stderr, 10, "stderr said nothing")
        filler.unlink()
        peer = Peer(proc.port, timeout=10)
        peer.close()

        def reported() -> bool:
            return b'"log_lines_lost"' in path.read_bytes()

        wait_until(reported, 10, "no log_lines_lost")
        assert proc.stop() == 0
        logged = [json.loads(line) for line in path.read_text().splitlines()]  # (each line whole)
        (lost,) = [event for event in logged if event["event"] == "log_lines_lost"]
        assert lost["lines"] >= 20 and "No space left" in lost["error"]
        assert proc.stderr.count(b"cannot write the log file") == 1 and b"Traceback" not in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_log_pipe_nobody_reads_does_not_stop_the_server(tmp_path):
    """``run_server.py``'s stderr is a pipe whose reader is alive but reads nothing (a stuck
    log shipper): 600 connections come and go (about 1,200 log lines, more than the pipe
    holds), and a client is still answered at once; once the pipe is read again, a
    ``log_lines_lost`` event says how many lines were dropped; SIGTERM exits 0. Before, the
    full pipe blocked the event loop in the log's write: no client was answered."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "run_server.py", "--port", str(port)],
        cwd=Path(__file__).resolve().parent.parent, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        os.set_blocking(fd, False)
        _serves_past_a_full_log_pipe(proc, port, fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _serves_past_a_full_log_pipe(proc: subprocess.Popen, port: int, fd: int) -> None:
    """``proc`` (run_server.py on ``port``) logs into a pipe nobody reads (``fd``: its read
    end, non-blocking): 600 connections come and go (about 1,200 lines, more than the pipe
    holds), a client is still answered at once; the pipe read again, every line in it is
    whole JSON and a ``log_lines_lost`` counts more than 100 lines; SIGTERM exits 0."""
    wait_until(lambda: _connects(port), 10, "the server did not listen")
    for _ in range(600):
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    peer = Peer(port, timeout=5)
    assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
    peer.close()
    read = b""

    def drain() -> None:  # (what the pipe holds now)
        nonlocal read
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(fd, 1 << 16):
                read += chunk

    drain()
    socket.create_connection(("127.0.0.1", port), timeout=10).close()  # (a line written again)

    def lost() -> bool:
        drain()
        return b'"log_lines_lost"' in read

    wait_until(lost, 10, "no log_lines_lost")
    events = [json.loads(line) for line in read.splitlines()]  # (each line whole)
    (event,) = [e for e in events if e["event"] == "log_lines_lost"]
    assert event["lines"] > 100
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_an_unbindable_metrics_port_is_a_start_failure(server_process):
    """A metrics port already taken: server_start_failed (listener metrics_port), exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = server_process("--metrics-port", str(taken.getsockname()[1]), wait=False)
        assert proc.stop(sig=None, timeout=20) == 1
    (failed,) = [e for e in proc.events() if e["event"] == "server_start_failed"]
    assert failed["listener"] == "metrics_port"


def test_gevent_is_not_blocked_while_a_scrape_is_served(server_process):
    """A scrape runs in the server's hub: clients are served meanwhile (20 scrapes while a
    client makes 200 round trips, all answered)."""
    proc, metrics = serving(server_process)
    peer = Peer(proc.port)
    scrapers = [gevent.spawn(scrape, metrics) for _ in range(20)]
    for _ in range(200):
        assert peer.request(b"PUT:k:v\nGET:k\nDELETE:k\n") == [b"k:v"]
    gevent.joinall(scrapers, timeout=30, raise_error=True)
    peer.close()


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(tmp_path):
    """``--log-file`` in a directory that does not exist: exit status 2 and one line that
    says why, as for any bad flag (it was a raw traceback)."""
    import subprocess
    import sys

    missing = str(tmp_path / "no" / "x.log")
    result = subprocess.run(
        [sys.executable, "run_server.py", "--port", str(free_port()), "--log-file", missing],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"cannot open --log-file" in result.stderr and b"No such file or directory" in result.stderr
    assert b"Traceback" not in result.stderr


def test_idle_metrics_connections_cannot_take_the_servers_files(server_process):
    """300 real TCP connections to the metrics port that never send a request, against a
    server whose open files limit is lowered (for real, as ``prlimit --pid`` does) to 60
    above what it holds: the metrics port serves METRICS_CONNECTIONS at once and leaves the
    others in its listen backlog, so the server holds at most that many of them, key-value
    clients are still served, and /healthz answers once they leave. Before: every one
    was accepted and kept for ever, the server ran out of files (key-value clients got no
    answer for as long as they stayed) and logged an ``unhandled_error`` a second."""
    import resource

    from kvgevent.config import METRICS_CONNECTIONS

    proc, metrics = serving(server_process)
    pid = proc.proc.pid

    def open_fds() -> int:
        return len(os.listdir(f"/proc/{pid}/fd"))

    before = open_fds()
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (before + 60, hard))
    idle: list[socket.socket] = []

    def connect() -> None:
        with contextlib.suppress(OSError):  # (the backlog full: a SYN dropped, a timeout)
            idle.append(socket.create_connection(("127.0.0.1", metrics), timeout=5))

    try:
        gevent.joinall([gevent.spawn(connect) for _ in range(300)], timeout=30)
        assert len(idle) > METRICS_CONNECTIONS + 60, "too few connected to show anything"
        peers = [Peer(proc.port) for _ in range(20)]  # key-value clients: served
        for peer in peers:
            assert peer.request(b"PUT:k:v\nGET:k\n")[-1] == b"k:v"
            peer.close()
        assert open_fds() - before <= METRICS_CONNECTIONS + 2, open_fds() - before
        for sock in idle:  # they leave: the backlog drains, a scraper is served
            sock.close()
        status, _ = http_get(metrics, "/healthz")
        assert status == 200
    finally:
        for sock in idle:
            sock.close()
    events = [e["event"] for e in proc.events()]
    assert "unhandled_error" not in events and "accept_failed" not in events


def test_connections_trickling_bytes_cannot_hold_the_metrics_port(monkeypatch, make_server):
    """METRICS_CONNECTIONS connections that each send half a request, then a byte every
    0.1 s, for ever: each is closed METRICS_TIMEOUT (here 0.5 s) after it came, so a
    scraper is answered (before: the silence timeout began again with each byte, and the
    port answered no one)."""
    import kvgevent.server.monitor as monitor
    from kvgevent.config import METRICS_CONNECTIONS

    monkeypatch.setattr(monitor, "METRICS_TIMEOUT", 0.5)
    server = make_server()
    port = server.serve_metrics(0, "127.0.0.1")
    stop = gevent.event.Event()

    def trickle() -> None:
        # (closed by the server: an OSError, and this one comes again)
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, contextlib.suppress(OSError):
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(0.1):
                sock.sendall(b"X")

    def trickler() -> None:
        while not stop.is_set():
            trickle()

    jobs = [gevent.spawn(trickler) for _ in range(METRICS_CONNECTIONS)]
    try:
        wait_until(lambda: server._monitor._http.pool.full(), timeout=10)  # (they take every place first)
        status, _ = http_get(port, "/healthz")
        assert status == 200
    finally:
        stop.set()
        gevent.joinall(jobs, timeout=10)


@needs_redis
def test_a_scrape_that_waits_on_a_stalled_redis_is_answered_past_the_deadline(
    monkeypatch, make_server, log_stream, tmp_path
):
    """A scrape whose key count waits on a real stalled Redis (SIGSTOP; the store's timeout
    1 s) for longer than METRICS_TIMEOUT (here 0.3 s): the deadline is for a request's
    arrival only, so the scrape is answered, 200, without ``kvgevent_keys`` (before: the
    connection's deadline went off inside the Redis call, a 500 and an ``unhandled_error``
    with a traceback)."""
    import kvgevent.server.monitor as monitor
    from kvgevent.stores.redis_store import RedisStore

    monkeypatch.setattr(monitor, "METRICS_TIMEOUT", 0.3)
    redis = RedisProcess(tmp_path)
    try:
        server = make_server(RedisStore(redis.url, prefix="m:", timeout=1.0))
        port = server.serve_metrics(0, "127.0.0.1")
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            status, text = http_get(port, "/metrics")
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        assert status == 200 and "kvgevent_keys " not in text
        assert not [e for e in log_events(log_stream) if e["event"] == "unhandled_error"]
    finally:
        redis.kill()


def test_requests_kept_alive_are_answered_without_waiting_for_a_delayed_ack(server_process):
    """50 health checks on a connection kept alive to ``run_server.py``'s metrics port (a new
    one after every METRICS_REQUESTS-th answer, which says ``Connection: close``) take well
    under a second (about 20 ms here). Before, pywsgi's two sends per answer (headers, then
    body) met Nagle's algorithm: the body waited for the client's delayed ACK, about 40 ms a
    request, 2.2 s for the 50."""
    import http.client

    proc, port = serving(server_process)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        began = time.monotonic()
        for _ in range(50):
            conn.request("GET", "/healthz")
            answer = conn.getresponse()
            assert (answer.status, answer.read()) == (200, b"ok\n")
        assert time.monotonic() - began < 1.0
    finally:
        conn.close()
    assert proc.stop() == 0


@pytest.mark.parametrize("holder", ["a body never sent", "answers never read"])
def test_connections_past_their_headers_cannot_hold_the_metrics_port(server_process, holder):
    """METRICS_CONNECTIONS connections to ``run_server.py``'s metrics port, each past its
    request's headers: one that declares a body of 1,000 bytes and sends none, or one that
    pipelines 5,000 scrapes and reads no answer. Each is closed METRICS_TIMEOUT (2 s) after
    its answer began, so a scraper behind them is answered; no log event, no traceback
    (before: each kept its place until it went, and eight kept every scraper out)."""
    from kvgevent.config import METRICS_CONNECTIONS

    proc, port = serving(server_process)
    if holder == "a body never sent":
        request = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
    else:
        request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n" * 5000
    socks = []
    try:
        for _ in range(METRICS_CONNECTIONS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # (fills at once)
            sock.settimeout(10)
            sock.connect(("127.0.0.1", port))
            sock.sendall(request)
            socks.append(sock)
        began = time.monotonic()
        status, _ = http_get(port, "/healthz")
        assert status == 200
        assert time.monotonic() - began < 8  # (about METRICS_TIMEOUT; without the bound: never)
        for sock in socks:  # each closed by the server: read to its end
            with contextlib.suppress(OSError):
                while sock.recv(1 << 16):
                    pass
    finally:
        for sock in socks:
            sock.close()
    assert_stopped_without_errors(proc)


PIPELINER = """
import socket, sys, threading, time
port, seconds = int(sys.argv[1]), float(sys.argv[2])
sock = socket.create_connection(("127.0.0.1", port))
received = []
def read():
    try:
        while chunk := sock.recv(1 << 20):
            received.append(chunk)
    except ConnectionResetError:
        pass
reader = threading.Thread(target=read, daemon=True)
reader.start()
end = time.monotonic() + seconds
try:
    while time.monotonic() < end:
        sock.sendall(b"GET /healthz HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n" * 50)
except OSError:
    pass
reader.join(5)  # (the server closes the connection: its end)
print(b"".join(received).count(b"HTTP/1.1 200"), int(not reader.is_alive()))
"""


def test_a_client_pipelining_metrics_requests_holds_up_nobody(server_process):
    """A client on the metrics port that keeps one connection alive and pipelines requests
    (50 per write, for 3 s, reading every answer): each was answered from pywsgi's buffer
    without a wait, and the loop served nothing else; the key-value port answered no PING for
    the whole attack (an attacker's pass: 10.0 s of 10), and SIGTERM waited for it. Now the
    handler lets the others run before each request, and closes the connection after
    METRICS_REQUESTS answers: PINGs are answered meanwhile (within 1 s each), and so is a
    scrape."""
    from kvgevent.config import METRICS_REQUESTS

    proc, metrics = serving(server_process)
    attacker = subprocess.Popen(
        [sys.executable, "-c", PIPELINER, str(metrics), "3"], stdout=subprocess.PIPE, text=True
    )
    peer = Peer(proc.port, timeout=10)
    try:
        end = time.monotonic() + 2.5
        slowest = 0.0
        while time.monotonic() < end:
            began = time.monotonic()
            assert peer.request(b"") == []
            slowest = max(slowest, time.monotonic() - began)
            gevent.sleep(0.02)  # (a client's pace, not a synchronisation)
        assert slowest < 1.0, slowest
        assert http_get(metrics, "/healthz") == (200, "ok\n")
        out, _ = attacker.communicate(timeout=30)
        answers, closed = map(int, out.split())
        # (at most: the server closes with requests unread, its reset may cut the last answers)
        assert 0 < answers <= METRICS_REQUESTS and closed == 1, (answers, closed)
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        peer.close()
    assert proc.stop() == 0


HOLDERS = """
import select, socket, sys, threading, time
port, kind, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
requests = {
    "idle": b"",
    "trickling": b"GET /metrics HTTP/1.1\\r\\nHost: x\\r\\nX-Pad: ",
    "a body never sent": b"POST /healthz HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: 1000\\r\\n\\r\\n",
}
stop = threading.Event()
came = threading.Semaphore(0)
def hold():
    while not stop.is_set():  # each comes back as soon as the server closes it
        try:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(30)
            with sock:
                sock.connect(("127.0.0.1", port))
                came.release()
                sock.sendall(requests[kind])
                closed = select.poll()  # (the server's end closed, whatever is unread)
                closed.register(sock, select.POLLRDHUP)
                while not stop.is_set() and not closed.poll(100):
                    if kind == "trickling":
                        sock.sendall(b"a")
        except OSError:
            pass
threads = [threading.Thread(target=hold, daemon=True) for _ in range(count)]
for thread in threads:
    thread.start()
deadline = time.monotonic() + 60
came_back = all(came.acquire(timeout=max(0, deadline - time.monotonic())) for _ in range(2 * count))
print("holding" if came_back else "too slow", flush=True)  # (every one connected, some twice)
sys.stdin.read()  # (until the test closes it)
stop.set()
"""


@pytest.mark.parametrize("kind", ["idle", "trickling", "a body never sent"])
def test_connections_that_come_back_as_soon_as_closed_do_not_keep_a_scraper_out(server_process, kind):
    """40 connections to ``run_server.py``'s metrics port, each back as soon as the server
    closes it: idle, sending a byte every 0.1 s, or declaring a body it never sends (its
    answer ready, pywsgi waits to read the body). Five times METRICS_CONNECTIONS of them
    wait in the listen backlog ahead of a scraper: each connection the scraper's is behind
    makes one waiting on its client past METRICS_GRACE give way, so its /healthz is answered
    in about a second (here within 6 s, three times over), and no error is logged. Before,
    each kept its place for METRICS_TIMEOUT (2 s) and a scraper waited that long for every 8
    ahead: 10 s here (an attacker's pass: 35 s behind 220 of all kinds). (Clients that do
    not read their answers cycle without this: after METRICS_REQUESTS answers, which the
    socket buffers take, the connection is closed.)"""
    proc, metrics = serving(server_process)
    holders = subprocess.Popen(
        [sys.executable, "-c", HOLDERS, str(metrics), kind, "40"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holders.stdout is not None and holders.stdout.readline() == "holding\n"
        for _ in range(3):
            began = time.monotonic()
            assert http_get(metrics, "/healthz") == (200, "ok\n")
            assert time.monotonic() - began < 6.0  # (without giving way: 10 s, past http_get's)
    finally:
        holders.communicate(timeout=30)  # (closes its stdin: the holders stop and it ends)
    assert holders.returncode == 0
    assert_stopped_without_errors(proc)


def test_a_connection_kept_alive_gives_way_after_new_ones_that_send_nothing(server_process):
    """A client keeps its connection alive after one answer (``http.client``), then 7
    connections that send nothing take the other places and 8 more wait in the backlog: the
    silent ones that have waited METRICS_GRACE give way to the backlog (8 of them closed),
    while the one kept alive keeps its place, and its second request, 1 s later, is
    answered. Before, the one kept alive was closed as soon as it had waited METRICS_GRACE,
    the first to have, and http.client's second request met a closed connection (an
    attacker's pass: RemoteDisconnected)."""
    import http.client

    from kvgevent.config import METRICS_CONNECTIONS

    proc, metrics = serving(server_process)
    kept = http.client.HTTPConnection("127.0.0.1", metrics, timeout=10)
    silent: list[socket.socket] = []
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"
        for _ in range(2 * METRICS_CONNECTIONS - 1):
            silent.append(socket.create_connection(("127.0.0.1", metrics), timeout=10))
        gevent.sleep(1.0)  # (the client's pace, under METRICS_TIMEOUT: the scenario)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"
        closed = 0
        for sock in silent:  # (closed by the server: an end of stream at once)
            sock.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                closed += sock.recv(1) == b""
        assert closed >= METRICS_CONNECTIONS, closed
    finally:
        kept.close()
        for sock in silent:
            sock.close()
    assert_stopped_without_errors(proc)


def test_the_metrics_backlog_holds_a_burst_of_connections(make_server):
    """600 connects to the metrics port while the server's loop cannot accept (this test
    holds the hub: stdlib sockets and poll, not gevent's): every one is established in the
    listen backlog within a second (METRICS_BACKLOG, 1024). With gevent's default of 128
    the kernel dropped the others' SYNs, to be tried again 1 s and 3 s later: a scraper
    behind a burst of connections waited 3 s before it even reached the backlog."""
    import _socket
    import errno
    import select

    from gevent import monkey

    poll = monkey.get_original("select", "poll")
    server = make_server()
    port = server.serve_metrics(0, "127.0.0.1")
    socks = [_socket.socket(_socket.AF_INET, _socket.SOCK_STREAM) for _ in range(600)]
    try:
        waiting = poll()
        for sock in socks:
            sock.setblocking(False)
            assert sock.connect_ex(("127.0.0.1", port)) in (0, errno.EINPROGRESS)
            waiting.register(sock.fileno(), select.POLLOUT)
        established: set[int] = set()
        deadline = time.monotonic() + 1.0  # (a SYN dropped is tried again after 1 s)
        while len(established) < len(socks) and time.monotonic() < deadline:
            for fd, _ in waiting.poll(50):
                waiting.unregister(fd)
                established.add(fd)
        assert len(established) == len(socks), len(established)
        assert all(sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ERROR) == 0 for sock in socks)
    finally:
        for sock in socks:
            sock.close()


def test_clients_beyond_the_places_that_send_at_once_are_all_answered(server_process):
    """Four times METRICS_CONNECTIONS clients connect at once, then each sends its request
    0.05 s later (a busy client's pace, under METRICS_GRACE): every one is answered, though
    most waited in the backlog while every place was taken. A connection gives way to the
    backlog only once it has waited on its client that long: closing the longest waiting at
    once closed clients about to send (a first version: 20 scrapes at once from one gevent
    process lost some)."""
    from kvgevent.config import METRICS_CONNECTIONS

    proc, metrics = serving(server_process)
    clients = 4 * METRICS_CONNECTIONS
    socks = [socket.create_connection(("127.0.0.1", metrics), timeout=20) for _ in range(clients)]
    try:
        gevent.sleep(0.05)  # (the clients' pace, leaving most of the grace to a busy machine)
        for sock in socks:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = [b"".join(iter(functools.partial(sock.recv, 1 << 16), b"")) for sock in socks]
    finally:
        for sock in socks:
            sock.close()
    assert [answer.split(b"\r\n")[0] for answer in answers] == [b"HTTP/1.1 200 OK"] * len(socks)
    assert_stopped_without_errors(proc)


def test_the_last_answer_of_a_connection_says_it_closes(server_process):
    """METRICS_REQUESTS requests and one more pipelined on one HTTP/1.1 connection: the first
    METRICS_REQUESTS are answered, only the last of them with ``Connection: close``, then the
    connection ends. Before, the last answer said nothing, and a client keeping the
    connection alive sent its next request to a closed connection (``http.client``:
    RemoteDisconnected)."""
    from kvgevent.config import METRICS_REQUESTS

    proc, metrics = serving(server_process)
    with socket.create_connection(("127.0.0.1", metrics), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n" * (METRICS_REQUESTS + 1))
        received = b"".join(iter(functools.partial(sock.recv, 1 << 16), b""))
    answers = received.split(b"HTTP/1.1 ")[1:]
    assert len(answers) == METRICS_REQUESTS
    assert [b"\r\nConnection: close\r\n" in answer for answer in answers] == [False] * (
        METRICS_REQUESTS - 1
    ) + [True]
    assert all(answer.endswith(b"\r\n\r\nok\n") for answer in answers)
    assert_stopped_without_errors(proc)


def test_a_head_request_gets_headers_and_no_body(server_process):
    """HEAD of /metrics, /healthz and an unknown path, then a GET, on one connection kept
    alive: each HEAD gets its GET's status and headers and no body, so the GET's answer is
    read as such (before: /metrics answered 405 with a body, and every HEAD's body was sent,
    which a client kept alive takes for the start of the next answer)."""
    proc, metrics = serving(server_process)
    heads = b"".join(b"HEAD %s HTTP/1.1\r\nHost: x\r\n\r\n" % p for p in (b"/metrics", b"/healthz", b"/nope"))
    with socket.create_connection(("127.0.0.1", metrics), timeout=10) as sock:
        sock.sendall(heads + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answers = b"".join(iter(functools.partial(sock.recv, 1 << 16), b"")).split(b"HTTP/1.1 ")[1:]
    assert [answer.split(b"\r\n")[0] for answer in answers] == [
        b"200 OK",
        b"200 OK",
        b"404 Not Found",
        b"200 OK",
    ]
    assert [answer.endswith(b"\r\n\r\n") for answer in answers[:3]] == [True] * 3
    assert answers[3].endswith(b"\r\n\r\nok\n")
    assert_stopped_without_errors(proc)


def test_a_request_with_too_many_headers_is_a_400_and_no_traceback(server_process):
    """A request with 101 headers (pywsgi's bound is 100): answered 400, and logged as one
    ``metrics_http_error``. Before, pywsgi printed a raw traceback on stderr for it (a JSON
    log broken, and a blocking write when stderr is a pipe nobody reads: the server froze
    after about 48 such requests)."""
    proc, metrics = serving(server_process)
    request = b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % n for n in range(101)) + b"\r\n"
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", metrics), timeout=10) as sock:
            sock.sendall(request)
            answer = b"".join(iter(functools.partial(sock.recv, 1000), b""))
        assert answer.startswith(b"HTTP/1.1 400"), answer[:60]
    assert proc.stop() == 0
    assert b"Traceback" not in proc.stderr
    errors = [e for e in proc.events() if e["event"] == "metrics_http_error"]  # (every line JSON)
    assert len(errors) == 1 and "100 headers" in errors[0]["error"], errors


def test_a_silent_metrics_connection_is_closed_after_the_timeout(server_process):
    """Connections to ``run_server.py``'s metrics port that send nothing, half a request
    line, or a line and half its headers, and then nothing, are closed METRICS_TIMEOUT (2 s)
    after they came, without a word: no answer, no log event, no traceback on stderr (a
    first version shut the socket down: pywsgi then took the part read for a request,
    answered 400 on the dead socket and printed a traceback); one that sent a whole request
    is answered first, then closed once idle as long."""
    proc, port = serving(server_process)
    sent = [b"", b"GET /heal", b"GET /healthz HTTP/1.1\r\nHost: x\r\n", b"GET /healthz HTTP/1.1\r\n\r\n"]
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in sent]
    try:
        for sock, request in zip(socks, sent, strict=True):
            sock.sendall(request)
        received = [b"".join(iter(functools.partial(sock.recv, 1000), b"")) for sock in socks]
        assert received[:-1] == [b""] * (len(socks) - 1)  # (each read to its end, or timed out)
        assert received[-1].startswith(b"HTTP/1.1 200") and received[-1].endswith(b"\r\n\r\nok\n")
    finally:
        for sock in socks:
            sock.close()
    assert_stopped_without_errors(proc)


def test_idle_metrics_connections_do_not_hold_up_the_shutdown(server_process):
    """A scraper's connection kept alive after its answer, and one that sent nothing yet, are
    closed as soon as SIGTERM comes: from ``shutdown_requested`` to ``server_stopped`` well
    under the second the metrics listener gives answers on their way (it took that second,
    waiting for those two to end, before: the whole exit was --shutdown-flush + 1 s)."""
    import http.client

    proc, port = serving(server_process)
    kept = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    silent = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() == b"ok\n"
        assert proc.stop() == 0
        assert silent.recv(100) == b""  # closed without a word
    finally:
        kept.close()
        silent.close()
    events = {e["event"]: e for e in proc.events()}
    asked, stopped = (
        datetime.fromisoformat(events[name]["timestamp"]) for name in ("shutdown_requested", "server_stopped")
    )
    assert (stopped - asked).total_seconds() < 0.6
    assert b"Traceback" not in proc.stderr and "metrics_http_error" not in events


@pytest.mark.parametrize("where", ["named-pipe", "dev-stderr"])
def test_a_log_file_that_is_a_pipe_nobody_reads_does_not_stop_the_server(tmp_path, where):
    """``--log-file`` a named pipe (a log shipper's) or ``/dev/stderr`` with stderr a pipe (a
    container's), its reader alive but reading nothing: 600 connections come and go (more
    lines than the pipe holds) and a client is still answered at once; once the pipe is read
    again, every line in it is whole JSON and ``log_lines_lost`` says how many were dropped;
    SIGTERM exits 0. (Before: the log's blocking write stopped the event loop, no client was
    answered, and SIGTERM was not obeyed.)"""
    port = free_port()
    if where == "named-pipe":
        path = tmp_path / "log.pipe"
        os.mkfifo(path)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # (the reader: there before the server)
        stderr: Any = subprocess.DEVNULL
    else:
        path, stderr = Path("/dev/stderr"), subprocess.PIPE
    proc = subprocess.Popen(
        [sys.executable, "run_server.py", "--port", str(port), "--log-file", str(path)],
        cwd=ROOT, stderr=stderr,
    )  # fmt: skip
    if where == "dev-stderr":
        assert proc.stderr is not None
        fd = proc.stderr.fileno()
        os.set_blocking(fd, False)
    try:
        _serves_past_a_full_log_pipe(proc, port, fd)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if where == "named-pipe":
            os.close(fd)


def test_a_log_pipe_without_a_reader_is_refused_at_start_and_kept_at_sighup(tmp_path):
    """A named pipe no process reads: at start, ``--log-file`` is a usage error that says so
    (exit 2; opening it would wait for a reader for ever); on SIGHUP (the reader gone), the
    old log stays and the server goes on serving and obeys SIGTERM. (Before: start hung, and
    a SIGHUP stopped the event loop in the pipe's open.)"""
    path = tmp_path / "log.pipe"
    os.mkfifo(path)
    command = [sys.executable, "run_server.py", "--port", str(free_port()), "--log-file", str(path)]
    refused = subprocess.run(command, cwd=ROOT, capture_output=True, timeout=30)
    assert refused.returncode == 2
    assert f"cannot open --log-file {path}: a pipe that no process reads".encode() in refused.stderr
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    port = free_port()
    proc = subprocess.Popen([*command[:3], str(port), *command[4:]], cwd=ROOT, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: _connects(port), 10, "the server did not listen")
        os.close(reader)
        reader = -1
        proc.send_signal(signal.SIGHUP)
        for _ in range(3):  # (each a new connection: its events written, or dropped, at once)
            peer = Peer(port, timeout=5)
            assert peer.request(b"PUT:k:v\nGET:k\n")[-1] == b"k:v"
            peer.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if reader >= 0:
            os.close(reader)
