"""Memory and work bounds that hold against real clients of ``run_server.py`` (issue 11):
a client that never reads, a client working on huge keys, ``--max-memory`` for the data and
for client buffers. RSS is read from ``/proc``; the figures measured on the project's 2-core
VM are in each test's docstring, the asserted bounds are looser (a busy CI machine)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from kvgevent.server.memory import MEMORY_TRIM_INTERVAL
from tests.conftest import Peer, ServerProcess, memory_of, read_stats, wait_until

MiB = 1 << 20
BIG_VALUE = 1_000_000  # a PUT line of it stays under the default --max-line of 1 MiB


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    return memory_of(pid)


@pytest.fixture
def run_server() -> Iterator[Callable[..., ServerProcess]]:
    """Start ``run_server.py`` with the given flags; every server is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*args: str, env: dict[str, str] | None = None) -> ServerProcess:
        process = ServerProcess(*args, env=env)
        started.append(process)
        process.wait_listening()
        return process

    yield start
    for process in started:
        process.stop(timeout=20)


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(port: int, timeout: float = 30.0) -> Peer:
        peer = Peer(port, timeout=timeout)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


def stuck_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer, so that it pins little in the kernel."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    return sock


def put_big_key(peer: Peer, key: bytes, count: int, size: int = BIG_VALUE) -> None:
    for index in range(count):
        peer.send(b"PUT:%s:%s\n" % (key, (b"%d" % index).rjust(size, b"v")))
    assert peer.request(b"") == []


def lines_before_pong(peer: Peer) -> list[bytes]:
    """Every reply line up to a PONG, read in big chunks (Peer.read_lines is line by line)."""
    data = bytearray(peer.buffer)
    peer.buffer = b""
    while not (data.endswith(b"PONG\n") and (len(data) == 5 or data[-6:-5] == b"\n")):
        chunk = peer.sock.recv(1 << 20)
        assert chunk, "connection closed"
        data += chunk
    return bytes(data).split(b"\n")[:-2]


def paced_lines_before_pong(peer: Peer, rate: int) -> list[bytes]:
    """Every reply line up to a PONG, read at about ``rate`` bytes a second (a client on a
    real network, not a loopback reader that keeps up with anything)."""
    data, began = bytearray(peer.buffer), time.monotonic()
    peer.buffer = b""
    while not (data.endswith(b"PONG\n") and (len(data) == 5 or data[-6:-5] == b"\n")):
        chunk = peer.sock.recv(1 << 16)
        assert chunk, "connection closed"
        data += chunk
        ahead = len(data) / rate - (time.monotonic() - began)
        if ahead > 0:
            gevent.sleep(ahead)
    return bytes(data).split(b"\n")[:-2]


def count_lines_before_pong(peer: Peer) -> int:
    """How many reply lines come before a PONG, counted chunk by chunk (no list of lines:
    splitting millions of them would stall this process, and with it the polite client)."""
    count, tail = 0, peer.buffer
    peer.buffer = b""
    while True:
        chunk = tail + peer.sock.recv(1 << 20)
        assert len(chunk) > len(tail), "connection closed"
        count += chunk.count(b"\n")
        if chunk.endswith(b"\nPONG\n") or chunk == b"PONG\n":
            return count - 1
        tail = chunk[-6:]
        count -= tail.count(b"\n")


def ping_rtt(peer: Peer) -> float:
    began = time.monotonic()
    assert peer.request(b"") == []
    return time.monotonic() - began


def events(server: ServerProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in server.events() if event["event"] == name]


# --- 1. a client that never reads ----------------------------------------------------------


def test_a_client_that_never_reads_pins_at_most_its_queue_bytes_plus_a_batch(run_server, peers):
    """4 clients each ask for 5 GETs of a key of 40 values of 1 MB (200 MB of replies each)
    and never read. Before the fix one queue item held a whole chunk of 256 lines: 512 MB
    pinned per client (RSS +2 GB, the issue's figure). Now each pins at most --queue-bytes
    (4 MiB here) plus one send batch of 1 MiB: measured RSS +16 MB for the 4 of them; the
    rest of the replies are dropped and counted, and a polite client is answered at once."""
    server = run_server("--queue-bytes", str(4 * MiB))
    polite = peers(server.port)
    put_big_key(polite, b"big", 40)
    before = rss(server.proc.pid)
    stuck = [stuck_socket(server.port) for _ in range(4)]
    try:
        for sock in stuck:
            sock.sendall(b"GET:big\n" * 5)
        # Each client gets (at most) 5 of its 200 lines queued or sent: the rest is dropped.
        wait_until(lambda: read_stats(polite)["messages_dropped"] >= 4 * (200 - 10), timeout=60)
        peak = rss(server.proc.pid)
        assert peak - before < 4 * (4 + 1) * MiB + 40 * MiB, (before, peak)
        assert read_stats(polite)["used_memory_clients"] <= 4 * (4 + 1) * MiB
        assert ping_rtt(polite) < 2.0
    finally:
        for sock in stuck:
            sock.close()
    wait_until(lambda: read_stats(polite)["active"] == 1, timeout=20)
    assert read_stats(polite)["used_memory_clients"] == 0  # every byte counted was given back


def test_a_reading_client_gets_a_reply_bigger_than_its_queue_whole_and_in_order(run_server, peers):
    """--queue-bytes bounds what is queued, not what a client that reads can get: 30 values
    of 1 MB through a 2 MiB queue, then 100,000 small values through a queue of 500 lines."""
    server = run_server("--queue-bytes", str(2 * MiB))
    peer = peers(server.port)
    put_big_key(peer, b"big", 30)
    peer.send(b"GET:big\nPING\n")
    lines = lines_before_pong(peer)
    assert [line[-4:] for line in lines] == [(b"%d" % i).rjust(4, b"v") for i in range(30)]
    assert all(len(line) == 4 + BIG_VALUE for line in lines)
    peer.send(b"".join(b"PUT:many:%d\n" % i for i in range(100_000)))
    peer.send(b"GET:many\nPING\n")
    assert lines_before_pong(peer) == [b"many:%d" % i for i in range(100_000)]
    assert read_stats(peer)["messages_dropped"] == 0


# --- 2. work per turn ----------------------------------------------------------------------


def huge_key(peer: Peer, key: bytes, count: int) -> None:
    for start in range(0, count, 100_000):
        peer.send(b"".join(b"PUT:%s:%d\n" % (key, i) for i in range(start, start + 100_000)))
    assert peer.request(b"") == []


def worst_rtt_while(peer: Peer, busy: Callable[[], bool], least: int = 20) -> float:
    """The worst PING round trip of ``peer`` while ``busy()`` (at least ``least`` of them)."""
    worst, done = 0.0, 0
    with gevent.Timeout(120):
        while busy() or done < least:
            worst = max(worst, ping_rtt(peer))
            done += 1
            gevent.sleep(0.005)
    return worst


def test_updates_scanning_a_huge_key_do_not_stall_other_clients(run_server, peers):
    """One read of ~250 UPDATEs of a value absent from a key of 1,000,000 values (each scans
    the whole list, ~13 ms): before, they ran in one turn and stalled every client ~4 s.
    Now a client's turn ends after TURN_WORK: a polite PING took at most ~40 ms (measured)."""
    server = run_server()
    polite, attacker = peers(server.port), peers(server.port, timeout=120)
    huge_key(attacker, b"huge", 1_000_000)
    lines = b"UPDATE:huge:absent:x\n" * 195  # 4 KiB: one read, one turn before the fix
    assert len(lines) <= 4096
    attacker.send(lines + b"PING\n")
    waiter = gevent.spawn(attacker.read_lines, 1)
    worst = worst_rtt_while(polite, lambda: not waiter.ready())
    assert waiter.get() == [b"PONG"]
    assert worst < 0.5, worst


def test_gets_of_a_huge_key_do_not_stall_other_clients(run_server, peers):
    """GETs of a key of 1,000,000 values (~180 ms to build each reply) from a client that
    reads them, and 6 from one that never reads: before, each reply was built in one go and
    the polite PING waited up to 0.7 s (3 stuck GETs); now they are built in pieces, a turn's
    work at a time, and the rest of a stuck client's replies is counted unbuilt: at most
    ~35 ms (measured)."""
    server = run_server()
    polite, reader = peers(server.port), peers(server.port, timeout=120)
    huge_key(reader, b"huge", 1_000_000)
    stuck = stuck_socket(server.port)
    try:
        stuck.sendall(b"GET:huge\n" * 6)
        reader.send(b"GET:huge\nGET:huge\nPING\n")

        waiter = gevent.spawn(count_lines_before_pong, reader)
        worst = worst_rtt_while(polite, lambda: not waiter.ready())
        assert waiter.get() == 2_000_000
        assert worst < 0.3, worst
    finally:
        stuck.close()


# --- 3. --max-memory: the data -------------------------------------------------------------

OOM = b"ERR out of memory"
SLACK = 16 * MiB
"""What RSS may exceed --max-memory by, beyond the 10% the accounting may be off: one batch of
writes accepted just under the limit, allocator rounding, a reply being built."""


def fill_until_full(peer: Peer, line: Callable[[int], bytes], batch: int) -> int:
    """PUT ``line(i)`` for i = 0, 1, ... in pipelined batches until one is refused for
    memory; returns how many were accepted."""
    accepted = 0
    with gevent.Timeout(120):
        while True:
            first = accepted
            replies = peer.request(b"".join(line(i) for i in range(first, first + batch)))
            if not replies:
                accepted += batch
                continue
            assert set(replies) == {OOM}, replies[:3]
            return accepted + batch - len(replies)


@pytest.mark.parametrize("size", [100, 64 * 1024])
def test_max_memory_refuses_writes_over_the_limit_and_serves_the_rest(run_server, peers, size):
    """With --max-memory 150M, PUTs of ``size``-byte values are accepted until the memory in
    use reaches the limit; then PUT and UPDATE get ERR out of memory while GET, DELETE, PING
    and STATS work, and once DELETEs bring it under the limit writes are accepted again. RSS
    stays under the limit plus 10% plus SLACK (measured: 100 B values 146 MB RSS at the first
    refusal, 64 KiB values 152 MB). One max_memory_reached and one max_memory_ok per episode."""
    limit = 150 * MiB
    server = run_server("--max-memory", "150M")
    peer = peers(server.port)
    value = b"v" * size
    accepted = fill_until_full(peer, lambda i: b"PUT:k%d:%s\n" % (i, value), 1000 if size < 1000 else 16)
    assert rss(server.proc.pid) < limit * 1.1 + SLACK
    stats = read_stats(peer)
    assert stats["maxmemory"] == limit
    assert stats["used_memory"] > limit
    assert stats["oom_rejected"] >= 1
    assert stats["keys"] == accepted
    # Over the limit: writes refused (a retry too), everything else served.
    assert peer.request(b"PUT:more:x\nUPDATE:k0:%s:y\nPUT:more:x\n" % value) == [OOM] * 3
    assert peer.request(b"GET:k0\nGET:more\n") == [b"k0:" + value]
    for _ in range(3):
        assert peer.request(b"PUT:more:x\n") == [OOM]
    rejected = read_stats(peer)["oom_rejected"]
    assert rejected >= 6
    assert len(events(server, "max_memory_reached")) == 1
    # DELETE brings the accounted memory down, and writes are accepted again.
    peer.request(b"".join(b"DELETE:k%d\n" % i for i in range(accepted // 2)))
    assert peer.request(b"PUT:more:x\nGET:more\n") == [b"more:x"]
    wait_until(lambda: events(server, "max_memory_ok"), timeout=10)
    (reached,) = events(server, "max_memory_reached")
    (ok,) = events(server, "max_memory_ok")
    assert reached["maxmemory"] == ok["maxmemory"] == limit
    assert ok["oom_rejected"] == rejected  # every refusal of the episode, the first one too
    assert rss(server.proc.pid) < limit * 1.1 + SLACK


def test_with_the_store_full_a_client_can_still_read_a_big_reply(run_server, peers):
    """With the store at --max-memory 100M, a GET of 200 values of 64 KiB (13 MB, twice the
    1/16 of the limit client buffers may hold) is answered whole, three times: over the limit
    a big reply is built only 1 MiB ahead of its reader. Before, the server filled the 16 MiB
    queue ahead of the reader and disconnected it, as the biggest holder, after 6.2 MB."""
    server = run_server("--max-memory", "100M")
    peer = peers(server.port)
    value = b"w" * 65536
    peer.request(b"".join(b"PUT:big:%s\n" % value for _ in range(200)))
    fill_until_full(peer, lambda i: b"PUT:k%d:%s\n" % (i, value), 16)
    for _ in range(3):
        peer.send(b"GET:big\nPING\n")
        assert paced_lines_before_pong(peer, 10_000_000) == [b"big:" + value] * 200
    assert read_stats(peer)["evicted_clients"] == 0


def test_a_prompt_reader_whose_reply_takes_the_server_over_the_limit_keeps_reading(run_server, peers):
    """The store 8 MiB under --max-memory, a client reading as fast as it can asks for 3 GETs
    of a key of 40 values of 1 MB: its queue fills towards --queue-bytes (16 MiB) while the
    server is still under the limit, and takes it over. It gets every value, and nobody is
    disconnected: eviction counts a queue its writer is draining as no more than the 1 MiB a
    big reply is built ahead of its reader over the limit. Before, that queue made it the
    biggest holder, disconnected at once (an attacker's pass: after 62 of 500 values)."""
    value = b"m" * 1_000_000
    load = b"".join(b"PUT:big:%s\n" % value for _ in range(40))
    probe = run_server()
    peer = peers(probe.port)
    assert peer.request(load) == []
    used = read_stats(peer)["used_memory"]
    probe.stop(timeout=20)
    server = run_server("--max-memory", str(used + 8 * MiB))
    loader = peers(server.port)
    assert loader.request(load) == []
    reader = peers(server.port)
    assert reader.request(b"GET:big\n" * 3) == [b"big:" + value] * 120
    assert read_stats(loader)["evicted_clients"] == 0


def test_a_prompt_reader_of_a_key_of_a_million_values_is_not_disconnected(run_server, peers):
    """The copy of a big list a GET reply is built from is its client's buffers (8 MB for a
    million values): counted in full for eviction, it made a prompt reader of such a key the
    biggest holder near --max-memory (100M), disconnected at once, 6 of 6 (an attacker's pass
    on the change that counted it). A reader draining its queue frees the copy by reading:
    eviction does not count it, as it does not count the queue beyond the pressed bound."""
    load = [
        b"".join(b"PUT:big:%010d\n" % n for n in range(start, start + 50_000))
        for start in range(0, 10**6, 50_000)
    ]
    probe = run_server()
    peer = peers(probe.port)
    for part in load:
        peer.send(part)
    used = read_stats(peer)["used_memory"]  # (its PING: every PUT applied)
    probe.stop(timeout=20)
    server = run_server("--max-memory", str(used + 4 * MiB))  # (the copy, 8 MB, takes it over)
    loader = peers(server.port)
    for part in load:
        loader.send(part)
    assert loader.request(b"") == []
    reader = peers(server.port)
    for _ in range(3):
        reader.send(b"GET:big\nPING\n")
        assert count_lines_before_pong(reader) == 1_000_000
    assert read_stats(loader)["evicted_clients"] == 0
    assert read_stats(loader)["used_memory_clients"] == 0


def test_max_memory_from_the_environment(run_server, peers):
    server = run_server(env={"KVGEVENT_MAX_MEMORY": "64m"})
    assert read_stats(peers(server.port))["maxmemory"] == 64 * MiB
    (started,) = events(server, "server_started")
    assert started["max_memory"] == 64 * MiB


def test_a_limit_under_what_the_process_uses_at_start_is_warned_of(run_server, peers):
    """--max-memory 8M: the process alone uses more once started (an interpreter and its
    libraries, some 40 MB), so every write is refused; this was said nowhere until a client
    got ``ERR out of memory`` (an attacker's pass: --max-memory 40M over Redis, with
    workers). Now one ``max_memory_below_start`` at start; a 256M limit gives none."""
    server = run_server("--max-memory", "8M")
    (warned,) = events(server, "max_memory_below_start")
    assert warned["maxmemory"] == 8 * MiB < warned["used_memory"]
    assert peers(server.port).request(b"PUT:k:v\n") == [b"ERR out of memory"]
    assert not events(run_server("--max-memory", "256M"), "max_memory_below_start")


# --- 4. --max-memory: client buffers -------------------------------------------------------


def hold_unfinished_line(port: int, socks: list[socket.socket], line: bytes) -> None:
    """A new connection (added to ``socks``) that sends ``line`` without its newline."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    socks.append(sock)
    try:
        sock.sendall(line)
    except OSError:
        pass  # disconnected for memory while sending: what these tests are after


def test_clients_holding_the_most_buffered_bytes_are_disconnected_first(run_server, peers):
    """300 connections each send 1,000,000 bytes of a request line without its newline
    (300 MB held) against --max-memory 200M: before, RSS grew with them (the issue: 3,000
    such connections, 2 GB). Now the server disconnects the biggest holders (reason
    memory_limit) and RSS stays under the limit plus 10% plus SLACK (measured 190 MB); a
    polite client, holding nothing, is never disconnected and keeps its answers prompt."""
    limit = 200 * MiB
    server = run_server("--max-memory", "200M")
    polite = peers(server.port)
    polite.request(b"PUT:k:v\n")
    socks: list[socket.socket] = []
    try:
        for index in range(300):
            hold_unfinished_line(server.port, socks, b"PUT:k%d:" % index + b"x" * (BIG_VALUE - 20))
            assert rss(server.proc.pid) < limit * 1.1 + SLACK
        # (more than two: the episode's one event is told from one per eviction; with 100 MB
        # over the limit there are dozens. Waiting for the first only, a loaded machine closed
        # the senders after one: the one failure of a clean-clone run)
        wait_until(lambda: read_stats(polite)["evicted_clients"] > 2, timeout=30)
        assert rss(server.proc.pid) < limit * 1.1 + SLACK
        assert polite.request(b"GET:k\n") == [b"k:v"]
        assert ping_rtt(polite) < 2.0
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: read_stats(polite)["active"] == 1, timeout=30)
    stats = read_stats(polite)
    assert stats["used_memory_clients"] == 0
    dropped = [e for e in events(server, "client_dropped") if e["reason"] == "memory_limit"]
    assert len(dropped) == stats["evicted_clients"] > 0
    # One event per episode, not per eviction (a slow machine may see the flood in two).
    assert 1 <= len(events(server, "max_memory_reached")) <= 2 < len(dropped)


def test_clients_holding_big_replies_under_way_are_counted_and_disconnected(run_server, peers):
    """100 clients each pipeline 20 GETs of a key of 100,000 values and never read, against
    --max-memory 100M. A GET of a big list copies it (800 kB of slots here) and the copy
    lives until the reply is built: none of it was counted, so the limit never bit (an
    attacker's pass: RSS at 1.8 times a 200M limit for 10 s with 200 such clients, 3 times
    with clients that come and go; no event, no eviction). Now those bytes are the client's
    buffers: STATS counts them, the guard disconnects the biggest holders (memory_limit),
    the polite client is served, and once they are gone nothing is left counted."""
    limit = 100 * MiB
    server = run_server("--max-memory", "100M")
    polite = peers(server.port)
    for start in range(0, 100_000, 10_000):
        polite.send(b"".join(b"PUT:big:%09d\n" % n for n in range(start, start + 10_000)))
    assert polite.request(b"PUT:k:v\n") == []
    socks: list[socket.socket] = []
    try:
        for _ in range(100):
            sock = stuck_socket(server.port)
            sock.sendall(b"GET:big\n" * 20)
            socks.append(sock)
        wait_until(lambda: read_stats(polite)["evicted_clients"] > 0, timeout=30, message="no eviction")
        assert polite.request(b"GET:k\n") == [b"k:v"]
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: read_stats(polite)["active"] == 1, timeout=30)
    assert read_stats(polite)["used_memory_clients"] == 0
    assert len(events(server, "max_memory_reached")) >= 1
    dropped = [e for e in events(server, "client_dropped") if e["reason"] == "memory_limit"]
    assert dropped and rss(server.proc.pid) < 2 * limit


def grown_or_evicted(peer: Peer, mark: int, evicted: int) -> bool:
    """Client buffers over ``mark``, or more clients disconnected for memory than ``evicted``."""
    stats = read_stats(peer)
    return stats["used_memory_clients"] > mark or stats["evicted_clients"] > evicted


def test_values_deleted_under_a_big_reply_are_counted_as_the_readers(run_server, peers):
    """Five times: a client that never reads GETs a key of 40 values of 1 MB, then another
    DELETEs the key and fills it again. Each reply's copy keeps the values the store dropped
    (200 MB with the store's 40, against --max-memory 150M), and they were counted as 8
    bytes each: the limit never bit (an attacker's pass: 751 MB against 200M). Now the
    guard counts a dropped list's values as its reader's: STATS sees them, the readers are
    disconnected (memory_limit) and RSS comes back under the limit."""
    limit = 150 * MiB
    server = run_server("--max-memory", "150M")
    writer, polite = peers(server.port), peers(server.port)
    put_big_key(writer, b"big", 40)
    socks: list[socket.socket] = []
    try:
        for round_ in range(5):
            before = read_stats(polite)
            mark, evicted = before["used_memory_clients"] + BIG_VALUE // 2, before["evicted_clients"]
            sock = stuck_socket(server.port)
            sock.sendall(b"GET:big\n")
            socks.append(sock)
            # (its reply under way: the first value queued, the list's copy held; or a reader
            # disconnected meanwhile, which took its bytes out of the figure: a busy CI run)
            wait_until(lambda mark=mark, evicted=evicted: grown_or_evicted(polite, mark, evicted), timeout=30)
            refill = b"".join(
                b"PUT:big:%s\n" % (b"%d" % n).rjust(BIG_VALUE, b"%d" % round_) for n in range(40)
            )
            writer.request(b"DELETE:big\n" + refill)  # (PUTs over the limit refused: ERR)
        wait_until(lambda: read_stats(polite)["evicted_clients"] > 0, timeout=30, message="no eviction")
        dropped = [e for e in events(server, "client_dropped") if e["reason"] == "memory_limit"]
        assert dropped
        wait_until(lambda: rss(server.proc.pid) < limit + SLACK, timeout=30, message="RSS stayed over")
        assert polite.request(b"GET:k\n") == []  # (served: reads go on over the limit too)
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: read_stats(polite)["active"] == 2, timeout=30)
    assert read_stats(polite)["used_memory_clients"] == 0
    # (writes again once the readers are gone: what they held is given back; a reader not
    # evicted yet may have kept the server over the limit until then, on a busy machine)
    wait_until(lambda: polite.request(b"PUT:k:v\nGET:k\n") == [b"k:v"], timeout=30, message="writes refused")


def test_many_clients_holding_small_unfinished_lines_are_disconnected_too(run_server, peers):
    """1,500 connections each hold 40,000 bytes of an unfinished line (60 MB) against
    --max-memory 64M. Before, clients holding under 64 KiB were never disconnected: 8,000 of
    them took a 100M server to 647 MB. Now the biggest holders of at least 4 KiB go first; the
    polite client holding nothing stays and is served."""
    limit = 64 * MiB
    server = run_server("--max-memory", "64M")
    polite = peers(server.port)
    assert polite.request(b"PUT:k:v\n") == []
    socks: list[socket.socket] = []
    try:
        for index in range(1500):
            hold_unfinished_line(server.port, socks, b"PUT:k%d:" % index + b"x" * 40_000)
        wait_until(lambda: read_stats(polite)["evicted_clients"] > 0, timeout=30)
        assert read_stats(polite)["used_memory"] < limit * 1.1 + SLACK
        assert rss(server.proc.pid) < limit * 1.1 + SLACK
        assert polite.request(b"GET:k\n") == [b"k:v"]  # (writes may still be refused: 1,500
        # connections of 16 kB each are most of the 64M, and they are not evicted for it)
    finally:
        for sock in socks:
            sock.close()


def test_after_a_burst_of_evictions_rss_comes_back_under_the_limit(run_server, peers):
    """400 connections grow 1 MB unfinished lines side by side, 8 KiB at a time (400 MB)
    against --max-memory 128M. Growing buffers interleaved leave holes the allocator keeps:
    once the biggest holders were disconnected, RSS stayed at 164 MiB until the 10 s trim
    for departed clients (measured; peak 175). Now the guard hands freed pages back as soon
    as a burst of evictions is over: RSS fell to 126 MiB at once (peak 171)."""
    limit = 128 * MiB
    server = run_server("--max-memory", "128M")
    polite = peers(server.port)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(400)]
    try:
        left = {sock: b"PUT:k:" + b"x" * (BIG_VALUE - 6) for sock in socks}
        deadline = time.monotonic() + 120
        for sock in socks:
            sock.setblocking(False)
        while left and time.monotonic() < deadline:
            for sock in list(left):
                try:
                    left[sock] = left[sock][sock.send(left[sock][:8192]) :]
                except BlockingIOError:
                    continue
                except OSError:
                    left[sock] = b""  # disconnected for memory: what this test is after
                if not left[sock]:
                    del left[sock]
            assert rss(server.proc.pid) < limit * 1.5 + SLACK
        assert not left, "the server stopped reading"
        assert read_stats(polite)["evicted_clients"] > 0
        wait_until(
            lambda: rss(server.proc.pid) < limit + SLACK,
            timeout=MEMORY_TRIM_INTERVAL / 2,
            message="RSS back under the limit soon after the evictions",
        )
    finally:
        for sock in socks:
            sock.close()


# --- slow readers, TLS, many attackers -----------------------------------------------------


def test_a_slow_but_steady_reader_of_big_replies_loses_nothing(run_server, peers):
    """A client reading about 1.5 MB/s through an 8 KiB receive buffer, 3 GETs of 20 values
    of 100 KB, --queue-bytes 1M. The kernel wakes the server's blocked send only once a third
    of its send buffer is free (seconds apart at that rate): judged by the bytes the kernel
    took, the client looked stuck and 42 of 60 lines arrived (the rest dropped). Judged by
    the bytes the client acknowledged, every line arrives."""
    server = run_server("--queue-bytes", "1M")
    peer = peers(server.port)
    value = b"s" * 100_000
    peer.request(b"".join(b"PUT:k:%s\n" % value for _ in range(20)))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"GET:k\n" * 3 + b"PING\n")
        received, began = bytearray(), time.monotonic()
        while not received.endswith(b"\nPONG\n"):
            chunk = sock.recv(4096)
            assert chunk, "connection closed"
            received += chunk
            ahead = len(received) / 1_500_000 - (time.monotonic() - began)
            if ahead > 0:
                gevent.sleep(ahead)
    finally:
        sock.close()
    assert bytes(received).split(b"\n")[:-2] == [b"k:" + value] * 60
    assert read_stats(peer)["messages_dropped"] == 0


def test_stuck_tls_clients_pin_no_more_than_plain_ones(server_process, certs, peers):
    """10 TLS clients each GET 60 values of 100 KB twice and never read, --queue-bytes 2M.
    Before, a whole 1 MiB batch was encrypted at once: the ciphertext (twice) and OpenSSL's
    buffer, which kept its size, were held besides the counted queue (20 stuck TLS clients:
    RSS +300 MB against +106 MB over plain TCP). Now TLS sends in 64 KiB slices: measured
    +46 MB for the 10."""
    server = server_process("--queue-bytes", "2M", "--tls-cert", str(certs.server_pem), wait=True)
    setup = Peer(server.port, tls=certs.client, timeout=30)
    value = b"t" * 100_000
    assert setup.request(b"".join(b"PUT:k:%s\n" % value for _ in range(60))) == []
    before = rss(server.proc.pid)
    stuck = [Peer(server.port, tls=certs.client, timeout=30) for _ in range(10)]
    try:
        for peer in stuck:
            peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            peer.send(b"GET:k\n" * 2)
        wait_until(lambda: read_stats(setup)["messages_dropped"] >= 10 * (120 - 60), timeout=30)
        grown = rss(server.proc.pid) - before
        print(f"\nRSS grew by {grown / MiB:.0f} MB for 10 stuck TLS clients")
        assert grown < 10 * (2 + 2) * MiB + 40 * MiB, f"{grown / MiB:.0f} MB"
    finally:
        for peer in stuck:
            peer.close()
        setup.close()


def test_a_tls_connection_counts_its_tls_state_in_the_memory_in_use(server_process, certs):
    """Each TLS connection's SSLObject, BIOs and OpenSSL buffers (59 kB idle after the
    handshake, with 1,000 clients in an auditor's run, against the 16 kB counted for any
    connection) count in used_memory: 1,000 TLS clients under --max-memory 100M took RSS to
    twice the limit, the accounting at half of it, nobody evicted. Now 64 kB each."""
    server = server_process("--max-memory", "1G", "--tls-cert", str(certs.server_pem), wait=True)
    first = Peer(server.port, tls=certs.client, timeout=30)
    more: list[Peer] = []
    try:
        before = read_stats(first)["used_memory"]
        more += [Peer(server.port, tls=certs.client, timeout=30) for _ in range(10)]
        for peer in more:
            assert peer.request(b"") == []
        grown = read_stats(first)["used_memory"] - before
        assert grown >= 10 * 64 * 1024, grown
    finally:
        for peer in [first, *more]:
            peer.close()


def lockstep(port: int, rounds: int) -> None:
    """An attacker: one UPDATE scanning a million values, and a PING, per round trip."""
    peer = Peer(port, timeout=60)
    try:
        for _ in range(rounds):
            peer.send(b"UPDATE:huge:absent:x\nPING\n")
            assert peer.read_lines(1) == [b"PONG"]
    finally:
        peer.close()


def polite_p90_beside(run_server, peers, attacker: Callable[[int, int], None]) -> float:
    """30 ``attacker(port, 8)`` greenlets against a server holding a key of a million values;
    the p90 of a polite client's PING round trips after their first round (asserted: 10 at
    least)."""
    server = run_server()
    polite, loader = peers(server.port), peers(server.port, timeout=120)
    huge_key(loader, b"huge", 1_000_000)
    attackers = [gevent.spawn(attacker, server.port, 8) for _ in range(30)]
    rtts: list[float] = []
    try:
        gevent.sleep(0.5)  # past the first round, when none of them is known to be heavy yet
        while not all(greenlet.ready() for greenlet in attackers):
            rtts.append(ping_rtt(polite))
            gevent.sleep(0.01)
        gevent.joinall(attackers, raise_error=True)
    finally:
        gevent.killall(attackers)
    rtts.sort()
    p90 = rtts[len(rtts) * 9 // 10]
    print(f"\npolite PINGs: {len(rtts)}, p50 {rtts[len(rtts) // 2] * 1000:.0f} ms, p90 {p90 * 1000:.0f} ms")
    assert len(rtts) >= 10
    return p90


def test_clients_sending_one_expensive_command_per_round_trip_queue_for_their_turn(run_server, peers):
    """30 clients each send one UPDATE scanning 1,000,000 values (13 ms), then a PING, per
    round trip. Each arrives as fresh input, so before, every one of them ran as soon as it
    arrived: one round held the loop for 30 x 13 ms and a polite PING waited up to a second
    (the issue's lockstep attack, 50 clients: max 984 ms, a third of the PINGs over 50 ms).
    Now a client whose turn held the loop for 1 ms queues its next request behind the ready
    clients: measured p90 under 20 ms after the first round."""
    p90 = polite_p90_beside(run_server, peers, lockstep)
    assert p90 < 0.1, f"p90 {p90 * 1000:.0f} ms"


def reconnecting_lockstep(port: int, rounds: int) -> None:
    """An attacker that reconnects for each round: one UPDATE scanning a million values and a
    PING on a new connection, read, closed."""
    for _ in range(rounds):
        peer = Peer(port, timeout=60)
        try:
            peer.send(b"UPDATE:huge:absent:x\nPING\n")
            assert peer.read_lines(1) == [b"PONG"]
        finally:
            peer.close()


def test_clients_reconnecting_for_each_expensive_command_queue_for_their_turn(run_server, peers):
    """As above, but each attacker opens a new connection for each round: its address is
    remembered heavy (HEAVY_HOST_MEMORY), so the new connection's request queues for its turn
    too. Before, a new connection started light and every round was a first round (an
    attacker's pass: 300 reconnecting clients held a polite client at 0.55 to 0.79 s at the
    median). Measured here as above: the polite PINGs' p90 after the first round."""
    p90 = polite_p90_beside(run_server, peers, reconnecting_lockstep)
    assert p90 < 0.1, f"p90 {p90 * 1000:.0f} ms"
