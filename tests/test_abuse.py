"""Strangers and guessers against ``run_server.py --password`` (issue 11, items 5-7): what an
unauthenticated connection may hold, password guessing by reconnecting, and secrets in the
logs. Over real loopback sockets; RSS read from ``/proc``. Figures measured on the project's
2-core VM are in the docstrings; the asserted bounds are looser (a busy CI machine)."""

from __future__ import annotations

import json
import socket
import ssl
import time
import uuid
from collections import Counter

import gevent
import pytest

from kvgevent import KeyValueServer
from tests.conftest import BioSession, Peer, WrappedStore, log_events, read_stats, wait_until
from tests.test_memory import rss

PASSWORD = "correct-horse-battery"


def events(server, name: str) -> list[dict]:
    return [event for event in server.events() if event["event"] == name]


def authenticated(port: int, password: str = PASSWORD, source: str | None = None) -> Peer:
    peer = Peer(port, timeout=30, source=source)
    assert peer.request(f"AUTH:{password}\n".encode()) == [b"OK"]
    return peer


# --- 5. what a connection may hold before AUTH ---------------------------------------------


def test_unauthenticated_connections_hold_a_small_line_at_most(server_process):
    """300 connections that never authenticate each send 1 MiB without a newline. Before,
        each held its 1 MiB (the issue: 500 of them, RSS +526 MB). Now a line before AUTH is
        bounded by 4 KiB: each gets one 'ERR line too long', its bytes are discarded as they
        arrive, and RSS grew by 19-20 MB for the 300 (measured: a connection that has had a reply
    costs about 22 kB; that is a bench/ figure, not the bound)."""
    server = server_process("--password", PASSWORD)
    watcher = authenticated(server.port)
    before = rss(server.proc.pid)
    socks: list[socket.socket] = []
    try:
        for _ in range(300):
            sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
            socks.append(sock)
            sock.sendall(b"x" * (1 << 20))
        for sock in socks:
            assert sock.recv(100) == b"ERR line too long\n"
        wait_until(lambda: read_stats(watcher)["lines_too_long"] == 300, timeout=30)
        grown = rss(server.proc.pid) - before
        print(f"\nRSS grew by {grown / 2**20:.1f} MB for 300 unauthenticated 1 MiB senders")
        assert grown < 60 << 20, f"RSS grew by {grown / 2**20:.0f} MB"
        assert read_stats(watcher)["used_memory_clients"] < 300 * 4096 + 4096
    finally:
        for sock in socks:
            sock.close()


def test_requests_pipelined_behind_auth_keep_the_full_line_bound(server_process):
    """The small bound ends with the AUTH line: a 100 KB value in the same write as AUTH is
    stored whole, and a too-long line before AUTH leaves the connection usable."""
    server = server_process("--password", PASSWORD)
    peer = Peer(server.port, timeout=30)
    value = b"v" * 100_000
    assert peer.request(b"PUT:k:" + b"x" * 5000 + b"\n") == [b"ERR line too long"]
    replies = peer.request(f"AUTH:{PASSWORD}\n".encode() + b"PUT:k:" + value + b"\nGET:k\n")
    assert replies == [b"OK", b"k:" + value]
    peer.close()


FLOODERS = """
import socket, sys, time
port, count, seconds, password = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
socks = []
for _ in range(count):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.sendall(b"AUTH:%s\\n" % password.encode())
    sock.setblocking(False)
    socks.append(sock)
print("flooding", flush=True)
until, burst = time.monotonic() + seconds, b"PING\\n" * 800
while time.monotonic() < until:
    for sock in socks:
        try:
            sock.send(burst)
        except BlockingIOError:
            pass
    time.sleep(0.01)
"""
"""Authenticated clients that send 4 KB of PINGs every 10 ms each and never read (a process
of their own: in the test's, they would slow the measuring client down too)."""


def test_commands_pipelined_behind_auth_do_not_wait_behind_flooding_clients(server_process):
    """README, Limits: "each event-loop iteration first serves everything that is ready
    (clients with a request or two ...) and only then gives the queue a 2 ms slice": that
    holds for a client that sends its AUTH and its first commands in one write, as ``nc``
    and p0's clients do. Before, what followed the AUTH line always queued for a turn behind
    every client with a backlog: beside 100 flooding clients such a round trip took 231 ms at
    the median, against 11 ms once fixed (an attacker's pass: 0.45 s beside 300, 3 s beside
    1,000). Real: run_server.py --password, 100 authenticated flooders in a process of their
    own; from 127.0.0.2, new connections alternate between the AUTH and the commands in one
    write and the AUTH answered before the commands are sent (which never queued); the
    median of the first is within 3 times the second's (or 0.1 s). About 3 s."""
    import subprocess
    import sys

    server = server_process("--password", PASSWORD)
    flooders = subprocess.Popen(
        [sys.executable, "-c", FLOODERS, str(server.port), "100", "30", PASSWORD],
        stdout=subprocess.PIPE,
    )
    together: list[float] = []
    apart: list[float] = []
    try:
        assert flooders.stdout is not None and flooders.stdout.readline() == b"flooding\n"
        commands = b"PUT:lk:1\nGET:lk\nDELETE:lk\n"  # (request() adds its PING)
        for trip in range(24):
            began = time.monotonic()
            peer = Peer(server.port, timeout=30, source="127.0.0.2")
            if trip % 2:
                peer.send(f"AUTH:{PASSWORD}\n".encode())  # (alone: nothing after it to queue)
                assert peer.read_lines(1) == [b"OK"]
                assert peer.request(commands) == [b"lk:1"]
                apart.append(time.monotonic() - began)
            else:
                assert peer.request(f"AUTH:{PASSWORD}\n".encode() + commands) == [b"OK", b"lk:1"]
                together.append(time.monotonic() - began)
            peer.close()
    finally:
        flooders.kill()
        flooders.wait()
    together.sort()
    apart.sort()
    medians = f"AUTH with its commands {together[6] * 1000:.0f} ms, AUTH then them {apart[6] * 1000:.0f} ms"
    print(f"\nmedian round trips: {medians}")
    assert together[6] <= max(3 * apart[6], 0.1), (together, apart)


# --- 6. password guessing ------------------------------------------------------------------


def guess_by_reconnecting(port: int, until: float, replies: Counter) -> None:
    """A guesser: connect, one wrong AUTH, read the answer, close; again until ``until``."""
    while time.monotonic() < until:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"AUTH:guess-%d\n" % sum(replies.values()))
            reply = sock.recv(100)
            replies[reply.strip()] += 1


def test_password_guessing_by_reconnecting_is_throttled_per_address(server_process):
    """8 guessers reconnect for a fresh connection per wrong password, from 127.0.0.1, for
    5 s. Before, about 18,000 guesses a second were checked. Now after 10 failures the address
    gets one turn at a time, further apart after each wrong password (0.25 s doubling to
    4 s): measured 15 passwords checked in the 5 s, about 8,500 more answered 'ERR auth
    throttled' unchecked. Meanwhile a client from 127.0.0.2 authenticates at once every time
    (worst measured 9 ms), and one auth_throttled event names the address."""
    server = server_process("--password", PASSWORD)
    replies: Counter = Counter()
    until = time.monotonic() + 5
    guessers = [gevent.spawn(guess_by_reconnecting, server.port, until, replies) for _ in range(8)]
    worst = 0.0
    try:
        while time.monotonic() < until:
            began = time.monotonic()
            authenticated(server.port, source="127.0.0.2").close()
            worst = max(worst, time.monotonic() - began)
            gevent.sleep(0.2)
        gevent.joinall(guessers, timeout=30, raise_error=True)
    finally:
        gevent.killall(guessers)
    checked = replies[b"ERR invalid password"]
    print(f"\nin 5 s: {dict(replies)}; worst AUTH from 127.0.0.2: {worst * 1000:.0f} ms")
    assert set(replies) <= {b"ERR invalid password", b"ERR auth throttled"}, replies
    assert 10 <= checked <= 25, replies
    assert worst < 1.0, f"a client from another address waited {worst:.2f} s"
    stats = read_stats(authenticated(server.port, source="127.0.0.2"))
    assert stats["auth_failures"] == checked
    assert stats["auth_throttled"] >= replies[b"ERR auth throttled"]
    (throttled,) = events(server, "auth_throttled")
    assert throttled["host"] == "127.0.0.1" and throttled["auth_failures"] == 10


def test_sequential_guesses_from_a_throttled_address_wait_longer_and_longer(server_process):
    """After 10 wrong passwords, one guesser on one connection at a time: its next four
    wrong AUTHs are answered after 0.25, 0.5, 1 and 2 s (measured). The correct password,
    sent next, waits its turn too (4 s), then succeeds."""
    server = server_process("--password", PASSWORD)
    for _ in range(10):
        peer = Peer(server.port)
        assert peer.request(b"AUTH:wrong\n") == [b"ERR invalid password"]
        peer.close()
    peer = Peer(server.port, timeout=30)
    waits = []
    for _ in range(4):
        began = time.monotonic()
        assert peer.request(b"AUTH:wrong\n") == [b"ERR invalid password"]
        waits.append(time.monotonic() - began)
    print(f"\nwaits: {[round(w, 2) for w in waits]}")
    assert waits[1] >= 0.4 and waits[2] >= 0.8 and waits[3] >= 1.6, waits
    began = time.monotonic()
    assert peer.request(f"AUTH:{PASSWORD}\n".encode()) == [b"OK"]
    assert time.monotonic() - began >= 3.0  # its turn: 4 s after the last failure
    peer.close()


def test_a_connection_authenticated_before_is_not_touched_by_its_addresss_throttle(server_process):
    """README, Limits, "--password: guessing": while an address is throttled, "connections
    authenticated before are not touched". A connection authenticates from 127.0.0.1, then 8
    guessers reconnect for a fresh wrong password each from 127.0.0.1 too, for 3 s: the
    address is throttled (asserted: guesses answered 'ERR auth throttled', one auth_throttled
    event naming it). Meanwhile the authenticated connection keeps making round trips
    (DELETE, PUT, GET of its own key, then PING): each gets exactly its value back, no ERR,
    the connection is never closed, and no round trip takes 2 s (measured on a 2-core VM:
    about 120 round trips while throttled, worst 14 ms). All real: run_server.py, real
    sockets, real guesses; nothing injected. About 4.5 s (the guessers' last AUTHs wait their
    turns after the 3 s, up to 4 s more)."""
    server = server_process("--password", PASSWORD)
    peer = authenticated(server.port)
    replies: Counter = Counter()
    until = time.monotonic() + 3
    guessers = [gevent.spawn(guess_by_reconnecting, server.port, until, replies) for _ in range(8)]
    trips = while_throttled = 0
    worst = 0.0
    try:
        while time.monotonic() < until:
            throttled = replies[b"ERR auth throttled"] > 0
            began = time.monotonic()
            assert peer.request(b"DELETE:mine\nPUT:mine:%d\nGET:mine\n" % trips) == [b"mine:%d" % trips]
            worst = max(worst, time.monotonic() - began)
            trips += 1
            while_throttled += throttled
            gevent.sleep(0.02)  # (a pace, not a synchronisation: a client's steady traffic)
        gevent.joinall(guessers, timeout=30, raise_error=True)
    finally:
        gevent.killall(guessers)
    print(
        f"\nguesses: {dict(replies)}; {trips} round trips, {while_throttled} while throttled, "
        f"worst {worst * 1000:.0f} ms"
    )
    assert replies[b"ERR auth throttled"] > 0, f"the address was never throttled: {replies}"
    assert worst < 2.0, f"a round trip of the authenticated connection took {worst:.2f} s"
    assert while_throttled >= 20, f"only {while_throttled} round trips while throttled"
    assert peer.request(b"GET:mine\n") == [b"mine:%d" % (trips - 1)]  # (still open, still served)
    (throttled_event,) = events(server, "auth_throttled")
    assert throttled_event["host"] == "127.0.0.1"
    assert read_stats(peer)["auth_throttled"] >= replies[b"ERR auth throttled"]
    peer.close()


# --- 7. secrets in the logs ----------------------------------------------------------------


def test_no_log_line_holds_a_password_or_a_value(server_process):
    """Wrong passwords, the right one, values and over-long lines that carry a secret, at
    debug level, then SIGTERM: no line of the whole log holds either secret."""
    password, secret = f"pw-{uuid.uuid4().hex}", f"value-{uuid.uuid4().hex}"
    server = server_process("--password", password, "--log-level", "debug", "--max-line", "200")
    guesser = Peer(server.port)
    for attempt in range(12):
        guesser.send(f"AUTH:{password}{attempt}\n".encode())
    guesser.send(f"PUT:k:{secret}\n".encode() + b"x" * 300 + secret.encode() + b"\n")
    peer = authenticated(server.port, password)
    lines = [f"PUT:k:{secret}", f"UPDATE:k:{secret}:{secret}", f"GET:{secret}:x", f"{secret}"]
    lines += ["x" * 300 + secret, f"AUTH:{password}x"]
    peer.request("".join(line + "\n" for line in lines).encode())
    guesser.close()
    peer.close()
    assert server.stop() == 0
    log = server.stderr.decode()
    assert "auth_failed" in log and "line_too_long" in log  # the log did see these requests
    assert password not in log
    assert secret not in log


class BuggyStore(WrappedStore):
    """A store with a bug whose message quotes the value it was given."""

    def put(self, key, value):
        raise RuntimeError(f"a bug while storing {value!r}")


def test_a_bug_is_logged_without_the_request_that_hit_it(log_stream, connect):
    """A bug hit by a request whose batch holds the password and a value: the one
    client_error event says where the bug is (type, frames), not what was sent (no locals,
    no message, no source line)."""
    password, secret = f"pw-{uuid.uuid4().hex}", f"value-{uuid.uuid4().hex}"
    server = KeyValueServer(BuggyStore(), password=password)
    server.start(0)
    try:
        peer = connect(server.port)
        peer.send(f"AUTH:{password}\nPUT:k:{secret}\n".encode())
        assert peer.read_lines(1) == [b"OK"]
        assert peer.sock.recv(100) == b""
        wait_until(lambda: server.count_dropped() == 1)
    finally:
        server.close()
    (error,) = [e for e in log_events(log_stream) if e["event"] == "client_error"]
    assert error["exception"]["type"] == "RuntimeError"
    assert any(frame.endswith(" put") for frame in error["exception"]["frames"])
    text = log_stream.getvalue()
    assert password not in text and secret not in text
    assert json.dumps(error).count("a bug while storing") == 0


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_neither_log_format_renders_exception_locals(fmt):
    """Both renderers get the exception as the same safe field, never the frames' locals."""
    import io

    from kvgevent.logs import configure_logging, get_logger

    stream = io.StringIO()
    configure_logging(fmt, "debug", stream=stream)
    request = b"AUTH:hunter2-" + uuid.uuid4().hex.encode()
    try:
        raise ValueError(f"cannot parse {request!r}")
    except ValueError:
        get_logger().exception("client_error")
    assert request.decode() not in stream.getvalue()
    assert "ValueError" in stream.getvalue()


class TinyRecords(BioSession):
    """A TLS session with the server at ``port`` and ``plaintext``, then a PING, encrypted one
    byte to a record, ready to send: the attacker's whole cost paid up front. :meth:`attack`
    sends it all and reads until ``replies`` lines came back."""

    def __init__(self, port: int, context: ssl.SSLContext, plaintext: bytes) -> None:
        super().__init__(port, context)
        records = []
        for byte in range(len(plaintext)):
            self.tls.write(plaintext[byte : byte + 1])
            records.append(self.outgoing.read())
        self.tls.write(b"PING\n")
        records.append(self.outgoing.read())
        self.data = b"".join(records)

    def attack(self, replies: int) -> None:
        self.sock.sendall(self.data)
        got = 0
        while got < replies:
            try:
                got += self.tls.read(65536).count(b"\n")
            except ssl.SSLWantReadError:
                chunk = self.sock.recv(65536)
                assert chunk, "the server closed"
                self.incoming.write(chunk)


@pytest.mark.parametrize("password", [None, "s3cret"])
def test_tls_records_of_one_byte_do_not_hold_the_others(server_process, certs, password):
    """README, Limits: "A client never takes more than its share of time". Over TLS each
    record costs the server a call into the TLS engine, whatever it holds: a read of 64 KiB
    of one-byte records (about 2,800 of them, 3 KB of requests) took it about 10 ms, and
    counted as 3 KB; eight clients sending such records, with no password (before AUTH)
    or none set, held a polite client's PING 0.8 to 5.5 s (an attacker's pass: 2.4 to 3.6 s
    in the engineers' runs of it). A read of more than TLS_RECORDS_PER_TURN records now
    waits for a turn, as a backlog: the polite client's PINGs stay under 0.5 s. Real:
    run_server.py over TLS, 8 clients sending 100,000 bytes of requests one byte to a
    record (made up front, so the test's own work does not slow the PINGs). About 4 s."""
    env = {"KVGEVENT_PASSWORD": password} if password else {}
    proc = server_process("--tls-cert", str(certs.server_pem), env=env)
    # (PUTs have no reply, then the PING's; before AUTH each line gets ERR, the PING too)
    if password is None:
        lines, replies = b"PUT:t:v\n" * 12_500, 1
    else:
        lines, replies = (b"x" * 99 + b"\n") * 1000, 1001
    attackers = [TinyRecords(proc.port, certs.client, lines) for _ in range(8)]
    polite = Peer(proc.port, tls=certs.client, timeout=30)
    if password:
        assert polite.request(b"AUTH:" + password.encode() + b"\n") == [b"OK"]
    sending = [gevent.spawn(attacker.attack, replies) for attacker in attackers]
    rtts = []
    try:
        while not all(job.ready() for job in sending):
            began = time.monotonic()
            assert polite.request(b"") == []
            rtts.append(time.monotonic() - began)
            gevent.sleep(0.01)
        gevent.joinall(sending, raise_error=True)
    finally:
        gevent.killall(sending)
        for attacker in attackers:
            attacker.sock.close()
        polite.close()
    assert len(rtts) >= 10 and max(rtts) < 0.5, (len(rtts), max(rtts))
    assert proc.stop() == 0
