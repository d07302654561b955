"""The client library against a real in-process server, run_server.py, and servers that
misbehave on purpose."""

import select
import socket
import subprocess
import sys
import time

import gevent
import gevent.event
import pytest
from conftest import ROOT, answer, free_port, read_to_ping, wait_until

from kvgevent.client import Client
from kvgevent.errors import ConnectionLost, InvalidArgument, ServerError
from kvgevent.protocol import STATS, Auth, Get, Put


@pytest.fixture
def client(server):
    with Client(port=server.port, timeout=10) as kv:
        yield kv


def test_every_command(client):
    """put/get/update/delete/ping/stats each do what the protocol says."""
    client.put("k", b"a")
    client.put(b"k", "b")
    assert client.get("k") == [b"a", b"b"]
    client.update("k", b"a", b"c")
    assert client.get("k") == [b"b", b"c"]
    client.delete("k")
    assert client.get("k") == []
    assert client.ping() is True
    stats = client.stats()
    assert stats["active"] == 1 and stats["keys"] == 0


def test_values_with_colons_and_binary_bytes_round_trip(client):
    value = b"a:b\x00\xff\r c"
    client.put("bin", value)
    assert client.get("bin") == [value]


def test_str_keys_and_values_are_sent_as_utf8(make_server, connect):
    """README, Library: "keys and values: str (UTF-8) or bytes". Real: an in-process server
    on a loopback socket, the library's calls given non-ASCII ``str`` keys and values, and a
    raw protocol client reading what the server holds; nothing is injected. The server holds
    the UTF-8 bytes (not Latin-1, not replaced), a ``str`` and the ``bytes`` of its UTF-8 name
    the same key, and every call (put, get, update, delete, a pipeline) agrees. Well under a
    second."""
    server = make_server()
    raw = connect(server.port)
    with Client(port=server.port, timeout=10) as kv:
        kv.put("café", "thé ☕")
        assert raw.request("GET:café\n".encode()) == ["café:thé ☕".encode()]
        assert raw.request(b"GET:caf\xc3\xa9\n") == [b"caf\xc3\xa9:th\xc3\xa9 \xe2\x98\x95"]
        assert kv.get("café") == kv.get(b"caf\xc3\xa9") == ["thé ☕".encode()]
        kv.update("café", "thé ☕", "maté")
        with kv.pipeline() as pipe:
            pipe.put("naïve", "ø").get("café")
        assert pipe.results[1] == ["maté".encode()]
        assert raw.request(b"GET:na\xc3\xafve\n") == [b"na\xc3\xafve:\xc3\xb8"]
        kv.delete("café")
        assert raw.request("GET:café\n".encode()) == []


def test_write_is_applied_when_the_call_returns(server, client):
    """Every call returns only after the server applied it (the PING barrier)."""
    client.put("seen", b"1")
    assert server.store.get(b"seen") == [b"1"]


def test_pipeline_returns_results_in_order(client):
    """10,000 commands in one pipeline: one write, results in order."""
    with client.pipeline() as pipe:
        for i in range(10_000):
            pipe.put("p", b"%d" % i)
        pipe.get("p")
        pipe.ping()
    assert pipe.results[:3] == [None, None, None]
    assert pipe.results[10_000] == [b"%d" % i for i in range(10_000)]
    assert pipe.results[10_001] is True


def test_err_reply_raises_server_error_with_reason(make_server):
    """An ERR is a typed exception carrying the reason; the connection stays usable."""
    server = make_server(max_line=50)
    with Client(port=server.port, timeout=10) as kv:
        with pytest.raises(ServerError) as info:
            kv.put("k", b"x" * 100)
        assert info.value.reason == "line too long"
        assert kv.send_raw([b"BOGUS", b"PUT:k:v", b"GET:k"]) == [[b"ERR unknown command"], [], [b"k:v"]]
        assert kv.get("k") == [b"v"]


def test_pipeline_keeps_going_past_an_error(make_server):
    """With raise_on_error=False the ERR takes its command's place and the rest still apply."""
    server = make_server(max_line=50)
    with Client(port=server.port, timeout=10) as kv:
        pipe = kv.pipeline().put("k", b"1").put("k", b"x" * 100).put("k", b"2").get("k")
        results = pipe.execute(raise_on_error=False)
        assert results[0] is None and results[2] is None
        assert isinstance(results[1], ServerError)
        assert results[3] == [b"1", b"2"]


def test_pipeline_that_raises_keeps_every_result(make_server):
    """A pipeline whose ERR raises (``with`` block) still holds every command's result: the
    other commands were applied and their replies read (they were lost: results empty)."""
    server = make_server(max_line=50)
    with Client(port=server.port, timeout=10) as kv:
        with pytest.raises(ServerError) as info, kv.pipeline() as pipe:
            pipe.put("k", b"1").put("k", b"x" * 100).get("k")
        assert info.value.reason == "line too long"
        assert pipe.results[0] is None and pipe.results[1] is info.value
        assert pipe.results[2] == [b"1"]


@pytest.mark.parametrize(
    ("key", "value"),
    [("", b"v"), ("a:b", b"v"), ("a\nb", b"v"), ("k", b"v\nw"), ("k", b"trailing\r")],
)
def test_unsendable_arguments_are_refused_before_sending(server, client, key, value):
    """Keys with ':' or newlines, empty keys, newlines in values: InvalidArgument, nothing sent."""
    before = server.stats()["commands"]
    with pytest.raises(InvalidArgument):
        client.put(key, value)
    assert server.stats()["commands"] == before


def test_server_gone_raises_connection_lost(make_server):
    server = make_server()
    kv = Client(port=server.port, timeout=5)
    kv.put("k", b"v")
    server.close(flush_timeout=0)
    with pytest.raises(ConnectionLost):
        kv.get("k")
    with pytest.raises(ConnectionLost):
        kv.ping()


def test_no_server_raises_connection_lost():
    from conftest import free_port

    with pytest.raises(ConnectionLost):
        Client(port=free_port(), timeout=5)


# --- replies are classified by the protocol's rule (issue 12, item 7) -------------------------


def test_a_key_that_starts_with_err_is_a_value(client):
    """GET:ERR x answers 'ERR x:hello': a value (it has a ':'), never a ServerError, in every
    library path; a real ERR next to it is still one."""
    client.put("ERR x", b"hello")
    client.put("ERR x", b"ERR y:z")
    assert client.get("ERR x") == [b"hello", b"ERR y:z"]
    results = client.execute([Get(b"ERR x"), Auth(b"pw"), Get(b"ERR x")], raise_on_error=False)
    assert results[0] == results[2] == [b"hello", b"ERR y:z"]
    assert isinstance(results[1], ServerError) and results[1].reason == "no password is set"
    assert client.send_raw([b"GET:ERR x", b"BOGUS"]) == [
        [b"ERR x:hello", b"ERR x:ERR y:z"],
        [b"ERR unknown command"],
    ]


def test_send_raw_counts_what_the_server_reads_as_ping(client):
    """'PING\\r' is a PING to the server (it drops a \\r before the newline), so no barrier is
    added after it; a line with a newline in it would be two requests and is refused."""
    client.put("k", b"v")
    assert client.send_raw([b"PING\r", b"ping", b"GET:k"]) == [[b"PONG"], [b"PONG"], [b"k:v"]]
    assert client.get("k") == [b"v"]  # replies still line up
    with pytest.raises(InvalidArgument):
        client.send_raw([b"PUT:k:v\nPUT:k:w"])


# --- pipelines of any size: replies are read while requests are written (item 8) -------------


def test_a_million_gets_in_one_pipeline(server_process):
    """1,000,000 GETs in one pipeline() against run_server.py: the server stops reading a
    client whose replies pile up, so this completes only if the client reads while it
    writes. Nothing is dropped and the connection stays usable."""
    proc = server_process()
    with Client(port=proc.port, timeout=10) as kv:
        kv.put("k", b"v")
        with kv.pipeline() as pipe:
            for _ in range(1_000_000):
                pipe.get("k")
        assert len(pipe.results) == 1_000_000
        assert pipe.results.count([b"v"]) == 1_000_000
        assert kv.ping() is True
        assert kv.stats()["messages_dropped"] == 0


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_deep_pipeline_with_a_small_reply_queue(make_server, certs, tls):
    """An in-process server (so the client must wait cooperatively, in gevent's selector)
    with a 10-line reply queue; one pipeline of 10,000 GETs of a 1 KB value and 10,000 PUTs
    of 2 KB: 20 MB of requests, more than the kernel's buffers hold, so writing them all
    before reading would wait on a server waiting for its replies to be read. Plain TCP and
    TLS."""
    server = make_server(queue_size=10, tls=certs.server if tls else None)
    value, put = b"x" * 1000, b"y" * 2000
    with Client(port=server.port, timeout=10, tls=certs.client if tls else False) as kv:
        kv.put("big", value)
        with kv.pipeline() as pipe:
            for i in range(10_000):
                pipe.get("big").put("n", b"%05d" % i + put)
        assert pipe.results[0::2] == [[value]] * 10_000
        assert [v[:5] for v in kv.get("n")] == [b"%05d" % i for i in range(10_000)]
        assert server.stats()["messages_dropped"] == 0


# --- the timeout bounds a wait without progress ------------------------------------------------


def test_a_slow_but_steady_reply_is_not_a_timeout(fake_server):
    """PONG arriving a byte every 0.4 s takes 2 s in all, twice the 1 s timeout: each wait is
    shorter than the timeout, so the call succeeds."""
    kv = Client(port=fake_server(answer(b"PONG\n", gap=0.4)), timeout=1)
    try:
        assert kv.ping() is True
    finally:
        kv.close()


@pytest.mark.parametrize("size", [1, 20_000], ids=["one-command", "20MB-pipeline"])
def test_a_server_that_never_answers_times_out(fake_server, size):
    """A server that accepts nothing: a lone PING waits for a reply, a 20 MB pipeline waits
    for the server to take its bytes; both give up after the 1 s timeout without progress
    and close the client."""
    kv = Client(port=fake_server(), timeout=1)
    begin = time.monotonic()
    with pytest.raises(ConnectionLost, match="timed out: nothing sent or received for 1 s"):
        kv.execute([Put(b"k", b"x" * 1000)] * size)
    assert time.monotonic() - begin < 15
    assert not kv.connected
    with pytest.raises(ConnectionLost, match="not connected"):
        kv.ping()


@pytest.mark.parametrize(
    ("call", "reply", "why"),
    [
        (lambda kv: kv.put("k", b"v"), b"k:v\nPONG\n", b"to PUT: b'k:v'"),
        (lambda kv: kv.get("k"), b"garbage\nPONG\n", b"to GET: b'garbage'"),
        (lambda kv: kv.get("k"), b"k:v\nOK\nPONG\n", b"to GET: b'OK'"),
        (lambda kv: kv.stats(), b"PONG\n", b"to STATS"),
        (lambda kv: kv.stats(), b"k:v\nPONG\n", b"to STATS: b'k:v'"),
        (lambda kv: kv.stats(), b"not stats\nPONG\n", b"to STATS: b'not stats'"),
        (lambda kv: kv.ping(), b"PONG\nPONG\n", b"a PONG nothing asked for"),
    ],
)
def test_a_reply_the_command_cannot_have_is_connection_lost(fake_server, call, reply, why):
    """A server that answers what the protocol never does (a value for a PUT, a status line
    in a GET's reply, no STATS line): ConnectionLost naming the command and the line, and
    the client is closed (its replies can no longer be matched to commands)."""
    kv = Client(port=fake_server(answer(reply)), timeout=5)
    with pytest.raises(ConnectionLost, match="unexpected reply from the server") as info:
        call(kv)
    assert why.decode() in str(info.value)
    assert not kv.connected


def test_the_client_wing_imports_neither_gevent_nor_structlog_nor_the_server():
    """``import kvgevent.client`` (the package's names are imported lazily) loads the client
    wing and the root wing only: no gevent, no structlog, no server, store or CLI module."""
    code = (
        "import sys\n"
        "import kvgevent.client\n"
        "from kvgevent import Client\n"
        "heavy = ('gevent', 'structlog', 'kvgevent.server', 'kvgevent.stores', 'kvgevent.serve')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(heavy))\n"
        "print(loaded, Client)\n"
        "assert not loaded, loaded\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30, cwd=ROOT)
    assert result.returncode == 0, result.stderr.decode()
    assert b"[] <class 'kvgevent.client.client.Client'>" in result.stdout


def test_stats_through_execute(client):
    """STATS among other commands in one execute: one dict in its place."""
    results = client.execute([Put(b"s", b"1"), STATS, Get(b"s")])
    assert results[0] is None and results[1]["keys"] >= 1 and results[2] == [b"1"]


# --- a reply nothing asked for, between two calls (review 32, item 6) --------------------------


def stray_after_ping(stray: bytes, go: gevent.event.Event, received: list[bytes]):
    """A respond() that answers the first PING with PONG, sends ``stray`` once ``go`` is set,
    then keeps every byte the client sends after that in ``received`` (answering each read
    as a GET of k would be), and ``<closed>`` once the client closes."""

    def respond(conn: socket.socket) -> None:
        if not read_to_ping(conn):
            return
        conn.sendall(b"PONG\n")
        go.wait()
        conn.sendall(stray)
        while chunk := conn.recv(1 << 16):
            received.append(chunk)
            conn.sendall(b"k:real-value\nPONG\n")
        received.append(b"<closed>")

    return respond


@pytest.mark.parametrize(
    ("stray", "why"),
    [
        (b"PONG\n", "b'PONG' when nothing was asked for"),
        (b"k:v\nPONG\n", "b'k:v' when nothing was asked for"),
        (b"PON", "b'PON' when nothing was asked for"),
    ],
    ids=["pong", "value-and-pong", "part-of-a-line"],
)
def test_a_stray_reply_between_two_calls_is_connection_lost(fake_server, stray, why):
    """README ("A server that misbehaves"): a PONG nothing asked for is ConnectionLost and the
    client is closed. Here it arrives after ping()'s reply, before the next call: the next
    call raises before sending anything (before, get() took the stray PONG as its reply and
    returned [], leaving the real reply to answer the call after)."""
    received: list[bytes] = []
    go = gevent.event.Event()
    kv = Client(port=fake_server(stray_after_ping(stray, go, received)), timeout=5)
    try:
        assert kv.ping() is True
        go.set()
        wait_readable(kv)
        with pytest.raises(ConnectionLost, match="unexpected reply from the server") as info:
            kv.get("k")
        assert why in str(info.value)
        assert not kv.connected
        wait_until(lambda: received == [b"<closed>"], message=f"the server received {received!r}")
    finally:
        kv.close()


@pytest.mark.parametrize("stray", [b"k:v\n", b"k:"], ids=["line", "part-of-a-line"])
def test_a_stray_reply_in_the_same_read_as_the_last_one_is_connection_lost(fake_server, stray):
    """A line (or part of one) after the last PONG, in the same write as it: the call that read
    it raises ConnectionLost for a whole line, the next call for a part, and the client is
    closed (before, a whole line was dropped silently and a part was glued to the next reply)."""
    kv = Client(port=fake_server(answer(b"PONG\n" + stray)), timeout=5)
    try:
        if stray.endswith(b"\n"):
            with pytest.raises(ConnectionLost, match="b'k:v' when nothing was asked for"):
                kv.ping()
        else:
            assert kv.ping() is True
            with pytest.raises(ConnectionLost, match="bytes after the last reply"):
                kv.get("k")
        assert not kv.connected
    finally:
        kv.close()


def wait_readable(kv: Client, timeout: float = 5.0) -> None:
    """Wait until the client's socket holds something to read (a stray reply has arrived)."""
    ready, _, _ = select.select([kv._sock], [], [], timeout)
    assert ready, "nothing arrived"


def test_a_server_that_closed_between_two_calls_is_reported_before_sending(server_process):
    """run_server.py stopped between two calls: the next call raises 'connection closed by
    the server' (the end of the stream is seen before anything is written), the client is
    closed, and connect() to a new server works again."""
    proc = server_process()
    kv = Client(port=proc.port, timeout=5)
    try:
        kv.put("k", b"v")
        assert proc.stop() == 0
        wait_readable(kv)
        with pytest.raises(ConnectionLost, match="connection closed by the server"):
            kv.get("k")
        assert not kv.connected
    finally:
        kv.close()


@pytest.mark.parametrize("timeout", [0, -1, float("nan"), float("inf"), 1e300, True, "5"])
def test_a_timeout_that_is_not_a_number_of_seconds_is_an_invalid_argument(timeout):
    """timeout=0 made a socket that never waits ("cannot connect ...: Operation now in
    progress"), -1 a raw ValueError from the socket module, inf an OverflowError at the
    connect (an attacker's pass and a review): the CLI's --timeout 0 means no limit, which
    is the library's None. Refused at once now, as the CLI bounds --timeout."""
    with pytest.raises(InvalidArgument, match="timeout must be a number of seconds above 0"):
        Client(port=free_port(), timeout=timeout, connect=False)


def test_a_host_the_resolver_cannot_encode_is_connection_lost():
    """A host name IDNA refuses (a label over 63 bytes) raised UnicodeError from the
    resolver, not ConnectionLost (an attacker's pass)."""
    kv = Client("a" * 64 + ".example", free_port(), timeout=2, connect=False)
    with pytest.raises(ConnectionLost, match="not a host name"):
        kv.connect()


def test_a_socket_connected_to_itself_is_refused(monkeypatch):
    """A connect to a local port nobody listens on can be given that same port as its source
    port, and TCP then connects the socket to itself (every request comes back as its own
    "reply"). Forced here by binding the source port: Client() raises ConnectionLost "cannot
    connect ... connected to itself" at once (before, it connected, and ping() read its own
    echo until the timeout, or for ever with timeout=None)."""
    from conftest import free_port

    port = free_port()
    real = socket.create_connection

    def from_the_same_port(address, timeout=None, source_address=None):
        return real(address, timeout, source_address=("127.0.0.1", port))

    monkeypatch.setattr(socket, "create_connection", from_the_same_port)
    kv = Client(port=port, timeout=None, connect=False)
    with pytest.raises(ConnectionLost, match=f"cannot connect to 127.0.0.1:{port}: connected to itself"):
        kv.connect()
    assert not kv.connected


def test_an_err_and_a_pong_nothing_asked_for_are_an_unexpected_reply(fake_server):
    """A server that answers a PUT with its PONG, then an ERR and another PONG: the client
    says so at once (ConnectionLost), as for a lone stray PONG. (Before, the ERR was taken as
    the reply of a command that does not exist, and the call waited for ever with no timeout,
    or got a timeout's message after it.)"""
    kv = Client(port=fake_server(answer(b"PONG\nERR x\nPONG\n")), timeout=None)
    try:
        with gevent.Timeout(10), pytest.raises(ConnectionLost, match="nothing asked for"):
            kv.put("k", "v")
    finally:
        kv.close()


@pytest.mark.parametrize(
    ("lines", "reply"),
    [
        ([b"PUT:k:v"], b"k:garbage\nPONG\n"),  # a value for a PUT
        ([b"GET:k"], b"OK\nPONG\n"),  # a status line among a GET's values
        ([b"get:k"], b"other:v\nPONG\n"),  # a value of another key
        ([b"PING"], b"k:v\nPONG\n"),  # anything before a PING's PONG
        ([b"STATS"], b"PONG\n"),  # no STATS line
    ],
    ids=["value-for-put", "status-in-get", "other-key", "before-pong", "no-stats-line"],
)
def test_protocol_lines_replies_are_checked_as_commands_are(fake_server, lines, reply):
    """README, "A server that misbehaves": a line the command cannot have ends the exchange
    (ConnectionLost) for protocol lines sent as typed (``send_raw``: one-shot lines, stdin,
    the REPL) as for commands. (Before, such lines were shown as the reply.)"""
    kv = Client(port=fake_server(answer(reply)), timeout=5)
    try:
        with pytest.raises(ConnectionLost, match="unexpected reply from the server"):
            kv.send_raw(lines)
    finally:
        kv.close()


def test_protocol_lines_get_their_replies_as_sent(server_process):
    """The checks let through every reply a real server gives: values in any verb's case
    and with a \\r, ERR for any line, OK for AUTH's absence as ERR, a STATS line."""
    proc = server_process()
    with Client(port=proc.port, timeout=10) as kv:
        kv.put("k", "v")
        replies = kv.send_raw([b"gEt:k\r", b"PING", b"BOGUS", b"AUTH:x", b"PUT:k"])
        assert replies == [
            [b"k:v"],
            [b"PONG"],
            [b"ERR unknown command"],
            [b"ERR no password is set"],
            [b"ERR wrong number of fields for PUT"],
        ]
        (stats,) = kv.send_raw([b"STATS"])
        assert len(stats) == 1 and stats[0].startswith(b"active=")


def _tls_reply_then_garbage(certs, reply: bytes, closed: gevent.event.Event):
    """A respond() playing a TLS server: after the handshake it reads up to the client's
    PING, then sends the ciphertext of ``reply`` and a record of garbage (its MAC fails) in
    one write, and keeps the connection open until the client closes it (``closed`` set)."""
    from gevent.lock import Semaphore

    from kvgevent.tls import TlsStream

    class Held:
        """What the stream sends, kept to go out with the garbage in one write."""

        data = b""

        def sendall(self, data: bytes) -> None:
            self.data += data

    def respond(conn: socket.socket) -> None:
        tls = TlsStream(conn, certs.server, server_side=True, lock_factory=Semaphore)
        tls.handshake()
        received = b""
        while b"PING\n" not in received:
            received += tls.recv(1 << 16)
        held = Held()
        tls.sock = held  # type: ignore[assignment]
        tls.sendall(reply)
        conn.sendall(held.data + b"\x17\x03\x03\x00\x20" + b"\x01" * 32)
        while conn.recv(1 << 16):
            pass
        closed.set()

    return respond


@pytest.mark.parametrize("whole", [True, False], ids=["whole-reply", "cut-reply"])
def test_a_tls_failure_after_a_reply_keeps_the_reply_and_is_reported_at_once(fake_server, certs, whole):
    """A TLS server sends a reply and, in the same write, a record that fails (its MAC), and
    keeps the connection open. A whole reply is returned (the failure comes after it, as a
    reset after a reply would); a reply cut short by it is ConnectionLost with the TLS error
    at once, even with no timeout. Before, the failure was held for the next read, which
    the client made only once the socket was readable again: it waited for its timeout, or
    for ever without one (an attacker's pass: run_client.py --timeout 0 hung)."""
    closed = gevent.event.Event()
    reply = b"k:v1\nk:v2\nPONG\n" if whole else b"k:v1\nk:v2\n"
    port = fake_server(_tls_reply_then_garbage(certs, reply, closed))
    kv = Client(port=port, timeout=None, tls=certs.client)
    try:
        with gevent.Timeout(10, AssertionError("the client waited for a read that never came")):
            if whole:
                assert kv.get(b"k") == [b"v1", b"v2"]
            else:
                with pytest.raises(ConnectionLost, match=r"BAD_RECORD_MAC|bad record mac"):
                    kv.get(b"k")
    finally:
        kv.close()
    assert closed.wait(10)


# --- a reply line longer than the client's limit ----------------------------------------------

LONG_REPLY = 66 << 20
"""Bytes the fake below sends as one reply line, without its newline: over the 64 MiB limit."""


def endless_value(sent: list[int], closed: gevent.event.Event):
    """A respond() that reads up to the first PING, then answers with ``k:`` and a value of
    LONG_REPLY bytes in all, 1 MiB a write (one buffer, reused), and no newline, then holds the
    connection open; it stops once the client closed (a reset on a send, or the end of stream
    after the last one). ``sent[0]``: the bytes the kernel took, then; ``closed``: set then."""

    def respond(conn: socket.socket) -> None:
        piece = memoryview(b"v" * (1 << 20))
        try:
            if read_to_ping(conn):
                conn.sendall(b"k:")
                sent[0] = 2
                while sent[0] < LONG_REPLY:
                    sent[0] += conn.send(piece)  # (every byte a "v": a short send needs no offset)
                while conn.recv(1 << 16):
                    pass
        except OSError:  # the client closed with bytes unread: its kernel answers with a reset
            pass
        closed.set()

    return respond


def test_a_reply_line_longer_than_64_mib_is_connection_lost(fake_server):
    """README, "A server that misbehaves": a server that "sends a reply line longer than
    64 MiB" makes the call raise ``ConnectionLost("reply line too long")``, and the client is
    closed. The server is a real loopback fake that answers GET:k with 66 MiB of one line and
    no newline, and keeps the connection open: the client gives up once the line is over
    64 MiB (the fake had sent more than that when the client closed: no smaller limit), not
    after its 10 s timeout, nor at an end of stream (there is none). Nothing is injected. The
    client may buffer the line up to its limit: about 64 MB of this process, for a moment
    (about 0.5 s in all on the project's VM)."""
    sent = [0]
    closed = gevent.event.Event()
    kv = Client(port=fake_server(endless_value(sent, closed)), timeout=10)
    try:
        with pytest.raises(ConnectionLost) as info:
            kv.get("k")
        assert str(info.value) == "reply line too long"
        assert not kv.connected
    finally:
        kv.close()
    assert closed.wait(10), "the client did not close its connection"
    assert sent[0] > 64 << 20, f"the client gave up after {sent[0]:,} bytes of the line"
