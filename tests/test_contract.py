"""README promises that other tests did not break on purpose, each through run_server.py with
the real fault: a half-closed client that never reads, a reset with replies queued, the
counts in ``server_stopped``, the replay's ``aof_replayed`` event, and the log format a
server picks when its stderr is not a terminal."""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from kvgevent.config import MAX_SEND_BATCH
from tests.conftest import ROOT, Peer, ServerProcess, free_port, read_stats, small_buffer_socket, wait_until

FLOOD = 20_000
"""GETs a client that never reads pipelines: their replies (1 kB each) are far more than its
queue (500 lines) and both kernels' buffers hold."""

VALUE = b"v" * 1000


def _dropped_events(proc: ServerProcess, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e["event"] == "client_dropped" and reason in (None, e["reason"])]


def _read_to_end(sock: socket.socket) -> tuple[int, str]:
    """Read what ``sock`` receives until its end: (lines, "eof" or the error's name)."""
    received = b""
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except OSError as exc:
        return received.count(b"\n"), type(exc).__name__
    return received.count(b"\n"), "eof"


def _reset(sock: socket.socket) -> None:
    """Close with an RST instead of a FIN (SO_LINGER with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _commands_read(peer: Peer) -> Callable[[], int]:
    """A function that says how many commands the server has read (STATS through ``peer``),
    not counting the STATS it asked for itself."""
    asked = [0]

    def commands() -> int:
        asked[0] += 1
        return read_stats(peer)["commands"] - asked[0]

    return commands


def test_a_half_closed_client_that_never_reads_is_closed_and_what_it_lost_is_counted(server_process, connect):
    """README, "Slow clients": a client that half-closes still gets its replies, unless it then
    reads nothing for 2 s: what was still queued is dropped and the connection closed, with an
    end of stream after the last reply. It pipelines FLOOD GETs of 1 kB, sends its FIN and
    reads nothing until the server has closed it: every line it asked for either reaches it
    whole or is counted, the log's count and STATS agree, and nothing is left active."""
    proc = server_process()
    writer = connect(proc.port)
    writer.request(b"PUT:k:" + VALUE + b"\n")
    writer.close()
    wait_until(lambda: len(_dropped_events(proc)) == 1, timeout=10)
    sock = small_buffer_socket(proc.port)
    try:
        sock.sendall(b"GET:k\n" * FLOOD)
        sock.shutdown(socket.SHUT_WR)
        wait_until(
            lambda: len(_dropped_events(proc)) == 2, timeout=30, message="the silent client was not closed"
        )
        (event,) = [e for e in _dropped_events(proc) if e["client_id"] == 2]
        lines, end = _read_to_end(sock)  # (what the kernels held: it was on its way)
    finally:
        sock.close()
    assert event["reason"] == "closed"
    assert end == "eof", "the stream ended with a reset, not after the last reply"
    assert event["messages_dropped"] > 0
    assert lines + event["messages_dropped"] == FLOOD
    stats = read_stats(connect(proc.port))
    assert stats["messages_dropped"] == event["messages_dropped"]
    assert stats["active"] == 1  # (the STATS client itself)


def test_replies_queued_for_a_client_that_resets_are_counted(server_process, connect):
    """README: ``messages_dropped`` counts the lines queued when a client was reset, besides
    those of the send under way, not those the kernel had taken. The client pipelines 8,000
    GETs of 1 kB that all fit in its queue (--queue-size 8000), never reads, and resets once
    the server has read them all and holds their replies (several MB: more than both
    kernels' buffers take): the count in ``client_dropped`` (reason reset) is the lines the
    server held, but for those of the send under way that the kernel had taken (at most a
    send's 1 MiB); STATS agrees."""
    proc = server_process("--queue-size", "8000")
    watcher = connect(proc.port)
    watcher.request(b"PUT:k:" + VALUE + b"\n")
    sock = small_buffer_socket(proc.port)
    sock.sendall(b"GET:k\n" * 8000)
    commands = _commands_read(watcher)
    wait_until(lambda: commands() >= 2 + 8000, timeout=10, message="the GETs were not all read")
    looks: list[int] = []  # what it holds: settled once two looks agree

    def settled() -> bool:
        looks.append(read_stats(watcher)["used_memory_clients"])
        return len(looks) > 1 and looks[-1] == looks[-2]

    wait_until(settled, timeout=10)
    held = looks[-1]
    _reset(sock)
    wait_until(lambda: _dropped_events(proc, "reset"), timeout=10, message="the reset was not seen")
    (event,) = _dropped_events(proc, "reset")
    line = len(b"k:" + VALUE + b"\n")
    assert held > 2 * MAX_SEND_BATCH, "the kernels took most of the replies: nothing to tell apart"
    assert (held - MAX_SEND_BATCH) // line <= event["messages_dropped"] <= held // line
    assert read_stats(watcher)["messages_dropped"] == event["messages_dropped"]


def test_server_stopped_carries_the_final_counts(server_process, connect):
    """README, "Logs": ``server_stopped`` carries ``dropped``, ``connections``, ``commands``,
    ``messages_dropped`` and ``rejected`` once every client is closed. Clients leave in every
    way first (a close, a reset), one stays idle, one never reads its replies, one more is
    refused by --max-clients; then SIGTERM: the event's counts are the last STATS's, with
    the clients the shutdown closed, and its ``messages_dropped`` is the sum of the
    ``client_dropped`` events'."""
    proc = server_process("--max-clients", "2", "--shutdown-flush", "1")
    closed = connect(proc.port)
    closed.request(b"PUT:k:" + VALUE + b"\n")
    closed.close()
    wait_until(lambda: len(_dropped_events(proc)) == 1, timeout=10)
    reset = connect(proc.port)
    reset.request(b"GET:k\n")
    _reset(reset.sock)
    wait_until(lambda: len(_dropped_events(proc)) == 2, timeout=10)
    idle = connect(proc.port)
    idle.request(b"GET:k\n")
    stuck = small_buffer_socket(proc.port)
    try:
        stuck.sendall(b"GET:k\n" * FLOOD)
        wait_until(
            lambda: any(e["event"] == "messages_dropping" for e in proc.events()),
            timeout=20,
            message="no drops",
        )
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as refused:
            assert refused.recv(100).startswith(b"ERR max clients reached")
        # every request of the stuck client read (a client whose replies drop is read at once)
        commands = _commands_read(idle)
        wait_until(lambda: commands() >= 2 + 2 + 2 + FLOOD, timeout=10)
        last = read_stats(idle)
        assert proc.stop(signal.SIGTERM, timeout=20) == 0
    finally:
        stuck.close()
    (stopped,) = [e for e in proc.events() if e["event"] == "server_stopped"]
    drops = _dropped_events(proc)
    assert stopped["dropped"] == len(drops) == 4
    assert stopped["connections"] == last["connections"] == 4
    assert stopped["rejected"] == last["rejected"] == 1
    assert stopped["commands"] == last["commands"]
    assert stopped["messages_dropped"] == sum(e["messages_dropped"] for e in drops) > 0
    assert stopped["messages_dropped"] >= last["messages_dropped"]


def test_aof_replayed_says_what_was_loaded_before_the_server_serves(server_process, connect, tmp_path):
    """README, "Durability": the log is replayed before the server accepts clients, and
    ``aof_replayed`` says how many records (and keys) it loaded, with the fsync policy."""
    path = tmp_path / "kv.aof"
    first = server_process("--aof", str(path))
    peer = connect(first.port)
    peer.request(b"PUT:a:1\nPUT:a:2\nPUT:b:1\nUPDATE:a:1:3\nDELETE:b\nPUT:c:x\n")
    before = peer.request(b"GET:a\nGET:b\nGET:c\n")
    assert first.stop() == 0
    second = server_process("--aof", str(path), "--fsync", "always")
    names = [e["event"] for e in second.events()]
    assert names.index("aof_replayed") < names.index("server_started")
    (replayed,) = [e for e in second.events() if e["event"] == "aof_replayed"]
    assert (replayed["records"], replayed["keys"], replayed["fsync"]) == (6, 2, "always")
    assert replayed["path"] == str(path) and replayed["seconds"] >= 0
    assert connect(second.port).request(b"GET:a\nGET:b\nGET:c\n") == before == [b"a:2", b"a:3", b"c:x"]


def test_logs_are_json_by_default_when_stderr_is_not_a_terminal(connect, tmp_path):
    """README, "Logs": ``--log-format auto`` (the default) writes JSON lines when stderr is not
    a terminal, so a pipe or a file gets what log shippers parse."""
    port = free_port()
    log = tmp_path / "stderr.log"
    with log.open("wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "run_server.py"), "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            env={k: v for k, v in os.environ.items() if not k.startswith("KVGEVENT_")},
        )
    try:
        wait_until(lambda: b"server_started" in log.read_bytes(), timeout=15, message="no server_started")
        peer = connect(port)
        peer.request(b"PUT:k:v\n")
        peer.close()
        wait_until(lambda: b"client_dropped" in log.read_bytes(), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    for name in ("server_started", "client_connected", "client_dropped", "server_stopped"):
        assert name in events
