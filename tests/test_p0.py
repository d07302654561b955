"""The original p0 server suite, ported with its parameters, over real loopback sockets.

Basic: concurrent clients store, delete and read back values; every reply must match a model
of the store exactly, within the original's timeout. Count: rounds of clients connecting and
disconnecting; active and dropped must be exact after each round. SlowClient: clients that do
not read for seconds while others do; the others get everything, the slow ones at least the
queue's worth, and some replies to them are dropped.

Where the original slept one second between a round and its check, these tests poll with a
deadline instead (longer than the original's pause, so they are never stricter).
"""

import socket
import struct
import time

import gevent
import pytest
from conftest import wait_until

QUEUE_SIZE = 500
"""The p0 per-client queue length: the least a slow client must receive."""

COUNT_DEADLINE = 2.0
"""Seconds a Count round may take to show in the counts (the original paused 1 s)."""


def _model_stream(client: int, messages: int, deletes: int) -> tuple[bytes, list[bytes]]:
    """The requests of one Basic client and the exact reply lines they must produce.

    The client spreads ``messages`` PUTs over its own keys (reading some back as it goes),
    then deletes ``deletes`` of them and reads every key back; a model dict predicts each
    GET's lines."""
    nkeys = max(10, 2 * deletes)
    keys = [b"c%dk%d" % (client, i) for i in range(nkeys)]
    model: dict[bytes, list[bytes]] = {}
    requests, replies = [], []

    def get(key: bytes) -> None:
        requests.append(b"Get:" + key + b"\n")
        replies.extend(key + b":" + v for v in model.get(key, []))

    for i in range(messages):
        key = keys[i % nkeys]
        value = b"value-%d-%d:%s" % (client, i, b"x" * (i % 7))
        requests.append(b"Put:" + key + b":" + value + b"\n")
        model.setdefault(key, []).append(value)
        if i % 10 == 9:
            get(key)
    for j in range(deletes):
        key = keys[(2 * j) % nkeys]
        requests.append(b"Delete:" + key + b"\n")
        model.pop(key, None)
    for key in keys:
        get(key)
    return b"".join(requests), replies


def _run_basic_client(port: int, client: int, messages: int, deletes: int) -> None:
    payload, expected = _model_stream(client, messages, deletes)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sender = gevent.spawn(sock.sendall, payload)
        data = b""
        want = sum(len(line) + 1 for line in expected)
        while len(data) < want:
            chunk = sock.recv(1 << 16)
            assert chunk, "server closed the connection"
            data += chunk
        sender.get()
        assert data.split(b"\n")[:-1] == expected


@pytest.mark.parametrize(
    ("clients", "messages", "deletes", "timeout_ms"),
    [
        pytest.param(1, 100, 10, 5000, id="Basic1"),
        pytest.param(1, 1500, 50, 10000, id="Basic2"),
        pytest.param(2, 20, 5, 5000, id="Basic3"),
        pytest.param(2, 1500, 50, 10000, id="Basic4"),
        pytest.param(5, 50, 5, 10000, id="Basic5"),
        pytest.param(10, 1500, 50, 10000, id="Basic6"),
    ],
)
def test_basic(server, clients, messages, deletes, timeout_ms):
    """Concurrent clients: every GET reply matches the model exactly, within the timeout."""
    with gevent.Timeout(timeout_ms / 1000, AssertionError(f"not done in {timeout_ms} ms")):
        jobs = [gevent.spawn(_run_basic_client, server.port, c, messages, deletes) for c in range(clients)]
        gevent.joinall(jobs, raise_error=True)
    assert server.stats()["messages_dropped"] == 0


def _disconnect(sock: socket.socket, how: int) -> None:
    """End a client in one of three ways: clean close, reset (RST), or half-close."""
    if how == 1:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elif how == 2:
        sock.shutdown(socket.SHUT_WR)  # the server sees EOF; the socket is closed later
    else:
        sock.close()


@pytest.mark.parametrize(
    "rounds",
    [
        pytest.param([(20, 10), (10, 15), (30, 0), (0, 35)], id="Count1"),
        pytest.param([(100, 50), (200, 100), (5, 155), (50, 0), (0, 50)], id="Count2"),
    ],
)
def test_count(server, rounds):
    """Each round starts some clients and kills some; active and dropped are exact after it."""
    live: list[socket.socket] = []
    half_closed: list[socket.socket] = []
    started = killed = 0
    try:
        for start, kill in rounds:
            for _ in range(start):
                live.append(socket.create_connection(("127.0.0.1", server.port)))
            started += start
            for n in range(kill):
                sock = live.pop(0)
                _disconnect(sock, n % 3)
                if n % 3 == 2:
                    half_closed.append(sock)
            killed += kill
            active, dropped = started - killed, killed
            wait_until(
                lambda a=active, d=dropped: (server.count_active(), server.count_dropped()) == (a, d),
                timeout=COUNT_DEADLINE,
                message=f"expected active={active} dropped={dropped}, got "
                f"{server.count_active()} / {server.count_dropped()}",
            )
            gevent.sleep(0.05)  # and the counts stay put: no client counted twice
            assert (server.count_active(), server.count_dropped()) == (active, dropped)
    finally:
        for sock in live + half_closed:
            sock.close()


VALUE_SIZE = 4096
"""The original's large message size."""


def _slow_client_stream(client: int, messages: int, deletes: int) -> tuple[bytes, bytes, list[bytes]]:
    """Setup requests, then ``messages`` requests (GETs of 4 KB values, with ``deletes`` DELETEs
    among them) and the reply lines they produce, in order."""
    nkeys = 200
    keys = [b"s%dk%d" % (client, i) for i in range(nkeys)]
    values = {k: b"%d:" % i + b"v" * (VALUE_SIZE - 8) for i, k in enumerate(keys)}
    setup = b"".join(b"Put:" + k + b":" + values[k] + b"\n" for k in keys)
    requests, replies = [], []
    present = set(keys)
    delete_every = messages // deletes
    for i in range(messages):
        key = keys[i % nkeys]
        if i % delete_every == delete_every - 1:
            victim = keys[(i * 7) % nkeys]
            requests.append(b"Delete:" + victim + b"\n")
            present.discard(victim)
        else:
            requests.append(b"Get:" + key + b"\n")
            if key in present:
                replies.append(key + b":" + values[key])
    return setup, b"".join(requests), replies


def _read_all(sock: socket.socket, want: int, deadline: float) -> list[bytes]:
    """Read lines until ``want`` arrived, the server goes quiet for a second, or the deadline;
    never stopping inside a line (its rest would be taken for a line of its own by the next
    read: "reply out of order" on a loaded machine, where a 4 KB line came in two reads a
    second apart)."""
    data = b""
    while (data.count(b"\n") < want or data[-1:] not in (b"", b"\n")) and time.monotonic() < deadline:
        sock.settimeout(max(0.01, min(1.0, deadline - time.monotonic())))
        try:
            chunk = sock.recv(1 << 16)
        except TimeoutError:
            if data[-1:] in (b"", b"\n"):
                break
            continue  # (inside a line: its rest is on the way)
        if not chunk:
            break
        data += chunk
    return data.split(b"\n")[:-1]


def _read_until_pong(sock: socket.socket, deadline: float) -> list[bytes]:
    """Send PING; return the lines before its PONG."""
    sock.sendall(b"PING\n")
    data = b""
    while not data.endswith(b"PONG\n"):
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(1 << 16)
        assert chunk, "the server closed the connection"
        data += chunk
    return data.split(b"\n")[:-2]


@pytest.mark.parametrize(
    ("slow", "normal", "slow_delay", "timeout"),
    [
        pytest.param(1, 1, 5.0, 10.0, id="SlowClient1"),
        pytest.param(4, 2, 6.0, 12.0, id="SlowClient2"),
    ],
)
def test_slow_client(server, slow, normal, slow_delay, timeout):
    """Slow clients send 2000 requests and read nothing for seconds; normal clients, at the
    same time, get every reply; the slow ones then get at least 500, in order, and some
    replies to them were dropped."""
    messages, deletes = 2000, 100
    streams = [_slow_client_stream(c, messages, deletes) for c in range(slow + normal)]
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in streams]
    start = time.monotonic()
    deadline = start + timeout
    try:
        for sock, (setup, _, _) in zip(socks, streams, strict=True):
            sock.sendall(setup + b"PING\n")
            assert _read_all(sock, 1, deadline) == [b"PONG"]

        def run_normal(sock, requests, expected):
            sender = gevent.spawn(sock.sendall, requests)
            got = _read_all(sock, len(expected), deadline)
            sender.get()
            assert got == expected

        def run_slow(sock, requests, expected):
            sock.sendall(requests)
            gevent.sleep(max(0.0, start + slow_delay - time.monotonic()))  # the slowness itself
            got = _read_all(sock, len(expected), deadline)  # what was kept, until a quiet second
            got += _read_until_pong(sock, deadline)  # and a PING's PONG, behind anything still in flight
            assert len(got) >= QUEUE_SIZE
            assert got[:QUEUE_SIZE] == expected[:QUEUE_SIZE]
            positions = iter(range(len(expected)))
            for line in got:  # what arrived is a subsequence of what was asked, in order
                assert any(expected[p] == line for p in positions), "reply out of order"
            return len(expected) - len(got)

        slow_jobs = [gevent.spawn(run_slow, socks[c], *streams[c][1:]) for c in range(slow)]
        normal_jobs = [
            gevent.spawn(run_normal, socks[c], *streams[c][1:]) for c in range(slow, slow + normal)
        ]
        gevent.joinall(normal_jobs, raise_error=True)
        assert time.monotonic() < start + slow_delay, "normal clients waited for the slow ones"
        gevent.joinall(slow_jobs, raise_error=True)
        missing = sum(job.value for job in slow_jobs)
        assert missing > 0, "no reply was dropped for the slow clients"
        assert server.stats()["messages_dropped"] == missing
    finally:
        for sock in socks:
            sock.close()
