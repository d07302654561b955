"""README promises that other tests did not break on purpose, each through run_server.py with
the real fault: a half-closed client that never reads, a reset with replies queued, the
counts in ``server_stopped``, the replay's ``aof_replayed`` event, and the log format a
server picks when its stderr is not a terminal."""

from __future__ import annotations

import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest

from kvgevent.config import MAX_SEND_BATCH
from tests.conftest import (
    ROOT,
    Peer,
    ServerProcess,
    Terminal,
    free_port,
    log_events,
    read_stats,
    reset_close,
    scrape,
    small_buffer_socket,
    wait_until,
)

FLOOD = 20_000
"""GETs a client that never reads pipelines: their replies (1 kB each) are far more than its
queue (500 lines) and both kernels' buffers hold."""

VALUE = b"v" * 1000


def _dropped_events(proc: ServerProcess, reason: str | None = None) -> list[dict[str, Any]]:
    return [e for e in proc.events() if e["event"] == "client_dropped" and reason in (None, e["reason"])]


def _to_end(sock: socket.socket) -> tuple[bytes, str]:
    """Everything ``sock`` receives until its end, and how it ended: "eof" or "reset" (a
    timeout raises)."""
    received = b""
    try:
        while chunk := sock.recv(1 << 16):
            received += chunk
    except ConnectionResetError:
        return received, "reset"
    return received, "eof"


def _commands_read(peer: Peer) -> Callable[[], int]:
    """A function that says how many commands the server has read (STATS through ``peer``),
    not counting the STATS it asked for itself."""
    asked = [0]

    def commands() -> int:
        asked[0] += 1
        return read_stats(peer)["commands"] - asked[0]

    return commands


def _half_closed_flood(proc: ServerProcess, connect: Callable[..., Peer]) -> socket.socket:
    """A client (the server's second: a first stored the 1 kB value k, and left) that
    pipelines FLOOD GETs of k with a small receive buffer, half-closes and reads nothing."""
    writer = connect(proc.port)
    writer.request(b"PUT:k:" + VALUE + b"\n")
    writer.close()
    wait_until(lambda: len(_dropped_events(proc)) == 1, timeout=10)
    sock = small_buffer_socket(proc.port)
    sock.sendall(b"GET:k\n" * FLOOD)
    sock.shutdown(socket.SHUT_WR)
    return sock


def test_a_half_closed_client_that_never_reads_is_closed_and_what_it_lost_is_counted(server_process, connect):
    """README, "Slow clients": a client that half-closes still gets its replies, unless it then
    reads nothing for 2 s: what was still queued is dropped and the connection closed, with an
    end of stream after the last reply. It pipelines FLOOD GETs of 1 kB, sends its FIN and
    reads nothing until the server has closed it: every line it asked for either reaches it
    whole or is counted, the log's count and STATS agree, and nothing is left active."""
    proc = server_process()
    sock = _half_closed_flood(proc, connect)
    try:
        wait_until(
            lambda: len(_dropped_events(proc)) == 2, timeout=30, message="the silent client was not closed"
        )
        (event,) = [e for e in _dropped_events(proc) if e["client_id"] == 2]
        received, end = _to_end(sock)
        lines = received.count(b"\n")  # (what the kernels held: it was on its way)
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
    reset_close(sock)
    wait_until(lambda: _dropped_events(proc, "reset"), timeout=10, message="the reset was not seen")
    (event,) = _dropped_events(proc, "reset")
    line = len(b"k:" + VALUE + b"\n")
    assert held > 2 * MAX_SEND_BATCH, "the kernels took most of the replies: nothing to tell apart"
    assert (held - MAX_SEND_BATCH) // line <= event["messages_dropped"] <= held // line
    assert read_stats(watcher)["messages_dropped"] == event["messages_dropped"]


def test_a_batch_is_carried_out_and_counted_when_its_client_resets_mid_reply(server_process, connect):
    """README, "Slow clients": a batch the server has read is carried out to its end when
    the client goes meanwhile, and the lines of its replies are counted. A key holds 20
    values of 400 kB (an 8 MB reply, over half --queue-bytes); a client pipelines 20 GETs of
    it, reads nothing, and resets once the server has read them all (the first reply being
    built, before the 2 s after which a silent client's replies are dropped): all 400 lines
    are counted but those the kernels took (at most a few MB: under 20 lines), the log and
    STATS agree, and a PUT sent in the same batch after the GETs is applied."""
    proc = server_process()
    watcher = connect(proc.port)
    watcher.request(b"".join(b"PUT:big:%s\n" % (b"%02d" % n * 200_000) for n in range(20)))
    sock = small_buffer_socket(proc.port)
    sock.sendall(b"GET:big\n" * 20 + b"PUT:after:reset\n")
    commands = _commands_read(watcher)
    wait_until(lambda: commands() >= 20 + 21, timeout=10, message="the GETs were not all read")
    reset_close(sock)
    wait_until(lambda: _dropped_events(proc, "reset"), timeout=10, message="the reset was not seen")
    (event,) = _dropped_events(proc, "reset")
    assert 400 - 20 <= event["messages_dropped"] <= 400
    assert read_stats(watcher)["messages_dropped"] == event["messages_dropped"]
    assert watcher.request(b"GET:after\n") == [b"after:reset"]


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
    reset_close(reset.sock)
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


def test_logs_are_json_by_default_when_stderr_is_not_a_terminal(server_process, connect):
    """README, "Logs": ``--log-format auto`` (the default) writes JSON lines when stderr is not
    a terminal (a pipe here), so a pipe or a file gets what log shippers parse."""
    proc = server_process(log_format=None)  # (its server_started found only in JSON)
    peer = connect(proc.port)
    peer.request(b"PUT:k:v\n")
    peer.close()
    wait_until(lambda: _dropped_events(proc), timeout=10)
    assert proc.stop() == 0
    events = [e["event"] for e in proc.events()]  # (fails on any line that is not JSON)
    for name in ("server_started", "client_connected", "client_dropped", "server_stopped"):
        assert name in events


# --- log levels, counts, long lines, places under --max-clients, TLS refusals, --raw, AUTH ---


def _connect_when_listening(connect: Callable[..., Peer], proc: ServerProcess) -> Peer:
    """The first client of a server that logs no ``server_started`` (``--log-level warning``):
    connects as soon as the port listens (a refused connect is tried again; the server exiting
    fails at once)."""
    peers: list[Peer] = []

    def connected() -> bool:
        assert proc.proc.poll() is None, f"server exited: {proc.stderr.decode()}"
        try:
            peers.append(connect(proc.port))
        except ConnectionRefusedError:
            return False
        return True

    wait_until(connected, timeout=15, message="the server did not listen")
    return peers[0]


def test_log_level_warning_hides_info_events_and_keeps_warnings(server_process, connect):
    """README, Configuration: ``--log-level`` (``info`` by default) is the least severe level
    logged; the Logs table gives each event's level. With ``--log-level warning``, a client
    that sends a line over ``--max-line`` and one refused over ``--max-clients`` log their
    warnings (``line_too_long``, ``client_rejected``), and none of the info events of the same
    run is written: not ``server_started``, ``client_connected``, ``client_dropped``,
    ``client_rejected_ended``, ``shutdown_requested`` nor ``server_stopped``."""
    proc = server_process("--log-level", "warning", "--max-clients", "1", "--max-line", "16", wait=False)
    holder = _connect_when_listening(connect, proc)
    assert holder.request(b"PUT:k:" + b"x" * 100 + b"\nPUT:k:v\nGET:k\n") == [b"ERR line too long", b"k:v"]
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as refused:
        assert _to_end(refused)[0] == b"ERR max clients reached\n"
    assert proc.stop(signal.SIGTERM, timeout=20) == 0
    events = proc.events()
    names = [e["event"] for e in events]
    assert "line_too_long" in names and "client_rejected" in names, names
    assert {e["level"] for e in events} <= {"warning", "error", "critical"}, events
    for info in (
        "server_started",
        "client_connected",
        "client_dropped",
        "client_rejected_ended",
        "shutdown_requested",
        "server_stopped",
    ):
        assert info not in names, f"{info} logged under --log-level warning"


def test_stats_connections_counts_the_clients_accepted_and_not_the_refused(server_process, connect):
    """README: ``connections`` in STATS (``kvgevent_connections_total``: clients accepted)
    and ``rejected`` (every refusal over ``--max-clients``). With ``--max-clients 3``: a
    watcher, five clients that come and go (three with a request, two that say nothing), two
    that stay, and one refused: connections=8 exactly, rejected=1, dropped=5, active=3."""
    proc = server_process("--max-clients", "3")
    watcher = connect(proc.port)
    watcher.request(b"")
    for index in range(5):
        peer = connect(proc.port)
        if index < 3:
            assert peer.request(b"PUT:k:%d\n" % index) == []
        peer.close()
        wait_until(lambda gone=index + 1: read_stats(watcher)["dropped"] == gone, timeout=10)
    staying = [connect(proc.port) for _ in range(2)]
    for peer in staying:
        assert peer.request(b"") == []
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as refused:
        assert _to_end(refused)[0] == b"ERR max clients reached\n"
    stats = read_stats(watcher)
    assert (stats["connections"], stats["rejected"]) == (8, 1), stats
    assert (stats["dropped"], stats["active"]) == (5, 3), stats


def test_line_too_long_is_logged_once_per_connection(server_process, connect):
    """README, Protocol and Limits: a line longer than ``--max-line`` gets one ``ERR line too
    long`` and the next line is served normally; ``line_too_long`` is logged once per
    connection, ``lines_too_long`` counts every line. With ``--max-line 16``: three long lines
    (one of 200 kB) on one connection and a fourth later on it, two on a second connection:
    six ERRs, each next line served (a line of exactly 16 bytes too), two events (one per
    connection, each with ``max_line``), lines_too_long=6."""
    proc = server_process("--max-line", "16")
    first = connect(proc.port)
    too_long = b"PUT:k:" + b"x" * 11 + b"\n" + b"GET:" + b"y" * 5000 + b"\n" + b"z" * 200_000 + b"\n"
    assert first.request(too_long + b"PUT:k:0123456789\nGET:k\n") == [b"ERR line too long"] * 3 + [
        b"k:0123456789"
    ]
    assert first.request(b"GET:" + b"k" * 13 + b"\nGET:k\n") == [b"ERR line too long", b"k:0123456789"]
    second = connect(proc.port)
    assert second.request(b"w" * 17 + b"\n" + b"w" * 17 + b"\nGET:k\n") == [b"ERR line too long"] * 2 + [
        b"k:0123456789"
    ]
    events = [e for e in proc.events() if e["event"] == "line_too_long"]
    assert sorted(e["client_id"] for e in events) == [1, 2], events
    assert all(e["max_line"] == 16 and e["level"] == "warning" for e in events)
    assert read_stats(first)["lines_too_long"] == 6


def test_a_connection_the_server_is_closing_keeps_its_place_under_max_clients(server_process, connect):
    """README, Slow clients: when the server closes a connection it first lets what the
    kernel took reach the client (2 s without progress at most), and meanwhile the connection
    keeps its file and its place under ``--max-clients``. With ``--max-clients 1``: a client
    pipelines FLOOD GETs of 1 kB, half-closes and never reads; once the server has read every
    GET (the metrics port, which is no client, says so) and so met the FIN, it is flushing
    that client: a new client is refused (``ERR max clients reached``) until the first is
    dropped, and one that comes after that is served."""
    metrics = free_port()
    proc = server_process("--max-clients", "1", "--metrics-port", str(metrics))
    sock = _half_closed_flood(proc, connect)
    try:
        wait_until(
            lambda: scrape(metrics)[("kvgevent_requests_total", ())] >= 2 + FLOOD,
            timeout=30,
            message="the GETs were not all read",
        )
        assert len(_dropped_events(proc)) == 1, "the silent client was dropped before it could be flushed"
        with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as refused:
            assert _to_end(refused)[0] == b"ERR max clients reached\n"
        assert len(_dropped_events(proc)) == 1, "the silent client was dropped before the refusal"
        wait_until(lambda: len(_dropped_events(proc)) == 2, timeout=30, message="the silent client stayed")
        (event,) = [e for e in _dropped_events(proc) if e["client_id"] == 2]
        received, end = _to_end(sock)
        lines = received.count(b"\n")
    finally:
        sock.close()
    assert event["reason"] == "closed" and event["messages_dropped"] > 0
    assert end == "eof" and lines + event["messages_dropped"] == FLOOD
    served = connect(proc.port)
    assert served.request(b"GET:k\n") == [b"k:" + VALUE]
    stats = read_stats(served)
    assert (stats["rejected"], stats["connections"]) == (1, 3), stats


def test_a_tls_client_over_max_clients_is_closed_without_the_err_line(server_process, connect, certs):
    """README, Configuration (``--max-clients``): one client too many gets ``ERR max clients
    reached`` and is closed, but over TLS it is closed without it (the line would have to wait
    for a handshake); Limits: ``rejected`` counts every refusal. With ``--tls-cert`` and
    ``--max-clients 1``, a TLS client in its place: a TCP connection gets no byte, only its
    end of stream; a TLS client's handshake fails; rejected=2, and no ERR was sent
    (errors=0)."""
    proc = server_process("--tls-cert", str(certs.server_pem), "--max-clients", "1")
    holder = connect(proc.port, tls=certs.client)
    assert holder.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as plain:
        assert _to_end(plain)[0] == b""
    with (
        socket.create_connection(("127.0.0.1", proc.port), timeout=10) as raw,
        pytest.raises(OSError),  # (ssl.SSLError is one: an end of stream in the handshake)
    ):
        certs.client.wrap_socket(raw, server_hostname="127.0.0.1")
    stats = read_stats(holder)
    assert (stats["rejected"], stats["errors"], stats["connections"], stats["active"]) == (2, 0, 1, 1), stats


def _on_terminal(*args: str) -> tuple[int, bytes]:
    """Run ``run_client.py args`` with its stdout on a pseudo-terminal: (exit status, output)."""
    term = Terminal([sys.executable, str(ROOT / "run_client.py"), *args])
    try:
        return term.finish()
    finally:
        term.close()


def test_raw_forces_raw_output_on_a_terminal(server_process, connect):
    """README, Client: output is formatted on a terminal and raw otherwise; ``--raw`` forces
    raw. A value holding an escape sequence (one that clears the screen): on a terminal,
    ``get`` shows it numbered, quoted and escaped; with ``--raw`` on the same terminal, its
    bytes as the server sent them, one line, nothing else."""
    proc = server_process()
    value = b"green \x1b[2J apple"
    connect(proc.port).request(b"PUT:fruit:" + value + b"\n")
    port = ("--port", str(proc.port))
    status, formatted = _on_terminal(*port, "get", "fruit")
    assert status == 0 and b'1) "green \\x1b[2J apple"' in formatted, formatted
    assert b"\x1b[2J" not in formatted
    status, raw = _on_terminal(*port, "--raw", "get", "fruit")
    assert status == 0 and raw == value + b"\r\n", raw  # (the terminal's \n is \r\n)


class _Clock:
    """A monotonic clock the test moves, counting its readings."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now


def test_a_minute_without_a_wrong_password_ends_the_auth_throttle(make_server, connect, log_stream):
    """README, Limits: 10 wrong passwords from one address throttle its AUTHs; a minute
    without a wrong password ends it (``auth_throttle_ended``, info, with ``host``,
    ``seconds``, ``auth_failures``, ``auth_delayed``, ``auth_refused``). An in-process server
    whose throttle reads a clock the test moves (its ``clock``, the parameter the throttle is
    built for): 59 s after the 10th wrong password, once a sweep has read the clock, the
    episode goes on (two AUTHs sent together: the second waits for its turn); at 61 s the
    sweep ends it, and two AUTHs sent together are then both answered at once."""
    server = make_server(password="s3cret")
    clock = _Clock(1000.0)
    server.auth_throttle.clock = clock
    guesser = connect(server.port)
    guesser.send(b"AUTH:wrong\n" * 10)
    assert guesser.read_lines(10) == [b"ERR invalid password"] * 10
    assert guesser.sock.recv(10) == b""  # (closed after 10 wrong passwords)
    events = log_events(log_stream)
    assert [e["host"] for e in events if e["event"] == "auth_throttled"] == ["127.0.0.1"]
    clock.now += 59
    readings = clock.readings
    wait_until(lambda: clock.readings > readings, timeout=10, message="no sweep read the clock")
    assert not [e for e in log_events(log_stream) if e["event"] == "auth_throttle_ended"]
    early = connect(server.port)
    assert early.request(b"AUTH:s3cret\nAUTH:s3cret\n") == [b"OK", b"OK"]
    assert read_stats(early)["auth_throttled"] == 1  # the second waited: still throttled
    clock.now += 2
    wait_until(
        lambda: [e for e in log_events(log_stream) if e["event"] == "auth_throttle_ended"],
        timeout=10,
        message="no auth_throttle_ended 61 s after the last wrong password",
    )
    (ended,) = [e for e in log_events(log_stream) if e["event"] == "auth_throttle_ended"]
    assert ended["level"] == "info" and ended["host"] == "127.0.0.1"
    assert (ended["seconds"], ended["auth_failures"], ended["auth_delayed"], ended["auth_refused"]) == (
        61.0,
        10,
        1,
        0,
    )
    late = connect(server.port)
    assert late.request(b"AUTH:s3cret\nAUTH:s3cret\n") == [b"OK", b"OK"]
    assert read_stats(late)["auth_throttled"] == 1  # neither waited: the episode is over
