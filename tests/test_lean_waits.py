"""The lean waits (kvgevent.fastio.park and the writer's parking in
kvgevent.server.connection): the gevent interfaces they rely on are still there, and every way
a parked reader or writer can end leaves no watcher started, no greenlet parked and every count
right. The faults are real: idle timeouts, resets (SO_LINGER 0), clients that never read,
sockets closed under a parked greenlet, the server closing."""

import contextlib
import gc
import socket
import tracemalloc
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.hub
import gevent.pool
import gevent.server
import gevent.socket
import pytest
from conftest import log_events, reset_close, wait_until

from kvgevent import KeyValueServer, MemoryStore
from kvgevent.config import MAX_SEND_BATCH, READER_PATIENCE_MAX, WRITER_IDLE
from kvgevent.fastio import FastSocket, TimedSocket, park, wrap
from kvgevent.server import server as server_module


def _pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    left, right = gevent.socket.socketpair()
    return left, right


def _tcp_pair() -> tuple[gevent.socket.socket, gevent.socket.socket]:
    """A connected pair of loopback TCP sockets (a reset needs TCP)."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    try:
        right = gevent.socket.create_connection(listener.getsockname(), timeout=5)
        left, _ = listener.accept()
    finally:
        listener.close()
    return left, right


def _parked(call, *args, watcher) -> gevent.Greenlet:
    """``call(*args)`` in a greenlet of its own, once it is parked on ``watcher``."""
    greenlet = gevent.spawn(call, *args)
    wait_until(lambda: watcher.active, timeout=5, message="the greenlet parked")
    assert not greenlet.dead
    return greenlet


def test_the_gevent_interfaces_the_lean_waits_use():
    """If a gevent release renames or drops any of these, this fails (and the pin in
    requirements.txt should not have let that release in): the server would otherwise fall
    back to PlainSocket silently, or break outright in the writer's parking."""
    left, right = _pair()
    try:
        assert left._sock.gettimeout() == 0.0  # the non-blocking socket under the wrapper
        for watcher in (left._read_event, left._write_event):
            assert callable(watcher.start) and callable(watcher.stop)
            assert watcher.active is False and watcher.callback is None
        # FastSocket.recv: a started watcher's callback swapped in place, stop() clearing it
        # (forget_reader tells a watcher left started by its callback; gevent's close defers
        # the socket's close while a watcher has one)
        watcher = left._read_event
        watcher.start(print)
        watcher.callback = len
        assert watcher.active and watcher.callback is len
        watcher.stop()
        assert not watcher.active and watcher.callback is None
        assert isinstance(wrap(left), FastSocket)
        hub = gevent.get_hub()
        assert callable(hub.loop.run_callback)
        assert callable(gevent.hub.Hub.switch)
        ran: list[bool] = []
        hub.loop.run_callback(lambda: ran.append(True))
        gevent.sleep(0)
        assert ran == [True]
        # kvgevent.fastio.park_for (TimedSocket): a loop timer made once, armed again and again
        timer = hub.loop.timer(0.01, 0.01)

        def fired(what: str) -> None:
            ran.append(what)
            timer.stop()

        for armed in (1, 2):
            timer.again(fired, "fired")
            wait_until(lambda n=armed: ran.count("fired") == n, timeout=5, message="the timer fired")
        timer.close()
        assert ran == [True, "fired", "fired"] and not timer.active
        # kvgevent.server.server._Listener: BaseServer's do_handle/do_close, _spawn and _handle
        pool = gevent.pool.Pool()
        listener = gevent.server.StreamServer(("127.0.0.1", 0), lambda *args: None, spawn=pool)
        assert callable(listener.do_handle) and callable(listener.do_close)
        assert listener._spawn == pool.spawn and callable(listener._handle)
        # kvgevent.server.server._throw_if_waiting: gr_frame tells a suspended greenlet apart
        unstarted = gevent.spawn(gevent.sleep, 10)
        assert unstarted.gr_frame is None
        gevent.sleep(0)
        assert unstarted.gr_frame is not None
        unstarted.kill()  # (gevent's kill: a throw from a callback, waited for)
        assert unstarted.dead and unstarted.gr_frame is None
    finally:
        left.close()
        right.close()


def test_park_resumes_when_the_socket_is_readable_and_stops_its_watcher():
    left, right = _pair()
    try:
        reader = _parked(park, left._read_event, gevent.get_hub(), watcher=left._read_event)
        right.sendall(b"x")
        reader.join(timeout=5)
        assert reader.successful()
        assert not left._read_event.active
    finally:
        left.close()
        right.close()


def test_a_greenlet_killed_while_parked_leaves_its_watcher_stopped():
    left, right = _pair()
    try:
        reader = _parked(park, left._read_event, gevent.get_hub(), watcher=left._read_event)
        reader.kill(timeout=5)
        assert reader.dead
        assert not left._read_event.active
    finally:
        left.close()
        right.close()


def test_closing_a_socket_under_a_parked_reader_wakes_it_with_an_error():
    """gevent's close() cancels waits on the socket's watchers by throwing into the greenlet
    that ``watcher.callback`` belongs to: with park's callback (the greenlet's own switch)
    that is the parked reader, which must wake rather than wait forever."""
    left, right = _pair()
    try:
        fast = wrap(left)
        watcher = left._read_event  # (close() drops the socket's reference to it)
        reader = _parked(fast.recv, 4096, watcher=watcher)
        left.close()
        reader.join(timeout=5)
        assert reader.dead
        assert isinstance(reader.exception, OSError)
        assert not watcher.active
    finally:
        right.close()


def test_a_reader_waiting_elsewhere_keeps_its_watcher_and_loses_nothing_sent_meanwhile():
    """After a wake-up the read watcher is left started (no epoll_ctl to add the socket
    again at the next wait, see FastSocket.recv) while the reader waits elsewhere, as for a
    Redis round trip. Data sent meanwhile stops the watcher (its callback only stops it: a
    watcher left firing on a readable socket would spin the loop) and is read at the next
    recv; the reader is not woken in its other wait."""
    left, right = _pair()
    try:
        fast = wrap(left)
        watcher = left._read_event
        elsewhere = gevent.event.Event()
        got: list[bytes] = []

        def read_wait_read() -> None:
            got.append(fast.recv(4096))
            elsewhere.wait()
            got.append(fast.recv(4096))

        reader = _parked(read_wait_read, watcher=watcher)
        right.sendall(b"first")
        wait_until(lambda: got == [b"first"], timeout=5, message="the first read")
        assert watcher.active and not fast.parked_reading()  # left started, nobody parked on it
        right.sendall(b"second")
        wait_until(lambda: not watcher.active, timeout=5, message="the watcher stopped by the data")
        assert got == [b"first"] and not reader.dead  # not woken in its other wait
        elsewhere.set()
        reader.join(timeout=5)
        assert reader.successful() and got == [b"first", b"second"]
        assert watcher.active  # (left started again after the second wake-up)
        fast.forget_reader()
        assert not watcher.active
        left.close()
        assert fast._raw.fileno() == -1  # closed at once, not after the loop's next turn
    finally:
        left.close()
        right.close()


def test_a_reader_s_watcher_is_stopped_when_its_client_closes_or_resets():
    """EOF and an error from recv stop the watcher left started: nothing is left for a
    socket that ends."""
    for end in ("close", "reset"):
        left, right = _pair() if end == "close" else _tcp_pair()
        try:
            fast = wrap(left)
            watcher = left._read_event
            right.sendall(b"x")
            assert fast.recv(4096) == b"x"
            assert watcher.active
            if end == "close":
                right.close()
                assert fast.recv(4096) == b""
            else:
                reset_close(right)
                with contextlib.suppress(ConnectionResetError):
                    while fast.recv(4096):
                        pass
            assert not watcher.active, end
        finally:
            left.close()
            right.close()


def test_a_parked_sender_resumes_as_the_peer_reads_and_sends_everything():
    left, right = _pair()
    try:
        fast = wrap(left)
        payload = bytes(range(256)) * 8192  # 2 MiB: far more than the socket buffers hold
        sender = gevent.spawn(fast.sendall, payload)
        received = bytearray()
        while len(received) < len(payload):
            received += right.recv(65536)
        sender.join(timeout=5)
        assert sender.successful()
        assert bytes(received) == payload and fast.sent == len(payload)
        assert fast.stalled_since == 0.0
        assert not left._write_event.active
    finally:
        left.close()
        right.close()


def _active_watchers() -> int:
    gc.collect()
    gevent.sleep(0.05)  # let closed sockets' cancelled waits and callbacks run
    return gevent.get_hub().loop.activecnt


@contextlib.contextmanager
def _served(**options: Any) -> Iterator[tuple[KeyValueServer, Callable[..., socket.socket]]]:
    """An in-process server (``options``) and a factory of its clients' sockets (``answered``:
    after a PING answered); the server, then every socket, closed after."""
    server = KeyValueServer(MemoryStore(), **options)
    server.start(0, host="127.0.0.1")
    socks: list[socket.socket] = []

    def client(answered: bool = False) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        socks.append(sock)
        if answered:
            sock.sendall(b"PING\n")
            assert sock.recv(64) == b"PONG\n"
        return sock

    try:
        yield server, client
    finally:
        server.close(flush_timeout=0.5)
        for sock in socks:
            sock.close()


def test_every_way_a_parked_client_ends_leaves_nothing_started(log_stream):
    """Clients parked in each place a connection waits end in each way they can: an idle
    reader timed out, a reader reset, a writer parked on an empty queue whose client closes,
    a writer parked in a send to a client that never reads (closed by the server), clients
    still connected when the server closes. Afterwards: every disconnect counted once, no
    writer greenlet left, and the loop has no more active watchers than before the server
    started (a watcher left started would keep one more)."""
    before = _active_watchers()
    with _served(idle_timeout=0.5) as (server, client):
        server.store.put("big", b"v" * 65536)
        idle = client()  # its reader parks; the idle timeout kills it
        reset = client(answered=True)  # the writer has run once: now parked on an empty queue
        closes = client(answered=True)
        stuck = client()
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.sendall(b"GET:big\n" * 64)  # 4 MiB of replies it never reads: the writer parks in send
        client(answered=True)  # still connected when the server closes
        wait_until(lambda: server.count_active() == 5)
        wait_until(lambda: any(c.io.stalled_since for c in server._conns.values()), timeout=10)
        reset_close(reset)
        closes.close()
        wait_until(lambda: server.count_dropped() >= 3, timeout=10, message="idle, reset and closed clients")
        assert idle.recv(64) == b""  # closed by the server's idle timeout
        server.close(flush_timeout=0.5)
        assert server.count_active() == 0
        assert server.count_dropped() == 5
        assert len(server._writers) == 0
        assert _active_watchers() <= before


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(min(size - len(data), 1 << 20))
        assert chunk, f"closed after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


def test_an_idle_writer_is_released_and_made_again_on_the_next_reply(log_stream):
    """A client answered once and then quiet has its writer greenlet and queue released
    (WRITER_IDLE): they are most of what such a client costs. Its next requests are answered
    in order by a new writer; a writer busy sending a big reply to a slow reader is never
    released (it is not parked on an empty queue), so that reader gets every byte."""
    server = KeyValueServer(MemoryStore())
    server.start(0, host="127.0.0.1")
    sock = socket.socket()
    sock.settimeout(10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # (before connecting: a small window)
    sock.connect(("127.0.0.1", server.port))
    try:
        sock.sendall(b"PUT:k:v\nGET:k\n")
        assert _recv_exactly(sock, 4) == b"k:v\n"
        (conn,) = server._conns.values()
        first = conn.writer
        assert first is not None
        wait_until(lambda: conn.writer is None, timeout=10, message="the idle writer released")
        wait_until(lambda: first.dead, timeout=5)
        assert conn.queue is None and len(server._writers) == 0
        sock.sendall(b"GET:k\nPUT:k:w\nGET:k\n")
        assert _recv_exactly(sock, 12) == b"k:v\nk:v\nk:w\n"
        assert conn.writer is not None and conn.writer is not first

        server.store.put("big", b"x" * 65536)
        sock.sendall(b"GET:big\n" * 128)  # 8 MiB of replies, read only after several sweeps
        wait_until(lambda: conn.io.stalled_since, timeout=10, message="the writer waits in send")
        gevent.sleep(WRITER_IDLE * 5)  # (the sweeper's passes: time itself is the condition)
        assert conn.writer is not None and not conn.writer.dead
        assert _recv_exactly(sock, 128 * 65541) == (b"big:" + b"x" * 65536 + b"\n") * 128
    finally:
        sock.close()
        server.close(flush_timeout=0.5)
    assert server.count_dropped() == 1 and len(server._writers) == 0


def test_a_reply_queued_as_a_writer_is_released_goes_out_through_a_new_one(log_stream):
    """The race the release must survive: the writer is released (its kill scheduled, not yet
    delivered) and a reply is queued before the loop runs again. The reply goes to a new
    queue and writer; the old writer dies in its park."""
    with _answered_client() as (_, sock, conn):
        wait_until(lambda: conn.parked, timeout=5)
        old = conn.writer
        conn.stale = True  # as if a sweep had seen it parked already
        assert conn.retire_writer() and conn.writer is None
        conn.send_lines([b"first\n", b"second\n"])  # before the kill is delivered
        assert conn.writer is not None and conn.writer is not old
        assert _recv_exactly(sock, 13) == b"first\nsecond\n"
        wait_until(lambda: old.dead, timeout=5)
        sock.sendall(b"PING\n")
        assert _recv_exactly(sock, 5) == b"PONG\n"


def test_clients_that_pause_about_as_long_as_the_writer_idles_lose_nothing(log_stream, monkeypatch):
    """Writers are released and made again while their clients keep sending: 40 clients each
    send a numbered GET, pausing around WRITER_IDLE between requests (so releases, wake-ups
    and new writers interleave with replies being queued), for about 40 requests each. Every
    reply arrives, in order; afterwards no writer is left beyond the connected clients', and
    once they are all quiet every writer is released."""
    import random

    from kvgevent.server.connection import Connection

    released = []
    retire = Connection.retire_writer

    def counting(conn: Connection) -> bool:
        done = retire(conn)
        released.append(done)
        return done

    monkeypatch.setattr(Connection, "retire_writer", counting)
    server = KeyValueServer(MemoryStore())
    server.start(0, host="127.0.0.1")
    for i in range(40):
        server.store.put(f"k{i}", b"v%d" % i)
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(40)]

    def client(index: int, sock: socket.socket) -> None:
        rnd = random.Random(index)
        for n in range(40):
            key = b"k%d" % ((index + n) % 40)
            sock.sendall(b"GET:" + key + b"\n")
            expected = key + b":v" + key[1:] + b"\n"
            assert _recv_exactly(sock, len(expected)) == expected
            gevent.sleep(rnd.uniform(0.5, 1.5) * WRITER_IDLE * (1 if n % 3 else 2))

    try:
        clients = [gevent.spawn(client, i, sock) for i, sock in enumerate(socks)]
        gevent.joinall(clients, timeout=60, raise_error=True)
        assert all(c.successful() for c in clients)
        assert sum(released) >= 100  # writers released between requests, and made again
        assert len(server._writers) <= len(socks)
        wait_until(lambda: len(server._writers) == 0, timeout=10, message="every idle writer released")
        assert server.count_active() == 40
    finally:
        for sock in socks:
            sock.close()
        server.close(flush_timeout=0.5)
    assert server.count_dropped() == 40


def _times_out(call, at_least: float) -> None:
    """``call()`` raises TimeoutError, after at least ``at_least`` seconds (within 5)."""
    began = gevent.get_hub().loop.now()
    with gevent.Timeout(5):
        try:
            call()
        except TimeoutError:
            pass
        else:
            raise AssertionError(f"{call} did not time out")
    assert gevent.get_hub().loop.now() - began >= at_least


def test_a_timed_socket_answers_times_out_and_leaves_nothing_started():
    """TimedSocket (the Redis store's connections): recv and sendall pass data; a peer that
    never answers makes recv, and one that never reads makes sendall, fail with TimeoutError
    after about the timeout (not sooner, not never); nothing is left started, and the socket
    still works after a timeout; close() closes socket and timer."""
    left, right = _pair()
    timed = TimedSocket(left, 0.2)
    try:
        timed.sendall(b"ping")
        assert right.recv(10) == b"ping"
        right.sendall(b"pong")
        assert timed.recv(10) == b"pong"
        _times_out(lambda: timed.recv(10), at_least=0.15)
        assert not left._read_event.active and not timed._timer.active
        right.sendall(b"late")
        assert timed.recv(10) == b"late"  # a timeout does not spoil the socket (nor the timer)
        _times_out(lambda: timed.recv(10), at_least=0.15)  # the full timeout again
        with gevent.Timeout(10):
            try:
                while True:  # the peer never reads: the buffers fill, then the wait times out
                    timed.sendall(b"x" * 65536)
            except TimeoutError:
                pass
        assert not left._write_event.active and not timed._timer.active
    finally:
        timed.close()
        right.close()
    assert left.closed and timed._timer is None


def test_a_timed_socket_closed_under_a_parked_greenlet_wakes_it():
    """The dispatcher closes a connection whose sender may be parked in recv: gevent's
    cancel_wait throws into it, and the watcher and timer end stopped."""
    left, right = _pair()
    timed = TimedSocket(left, 30)
    try:
        reader = _parked(timed.recv, 10, watcher=left._read_event)
        timer = timed._timer
        assert timer.active
        timed.close()
        reader.join(timeout=5)
        assert reader.dead and isinstance(reader.exception, OSError)
        assert not timer.active
    finally:
        right.close()


def test_a_timed_sendall_to_a_slow_reader_gives_up_after_the_timeout_in_all():
    """A peer that keeps reading, slowly: each wait for room ends, but the whole sendall has
    one deadline (as gevent's): TimeoutError after about the timeout, not after the data."""
    left, right = _pair()
    timed = TimedSocket(left, 0.3)

    def slow_reader() -> None:
        while True:
            if not right.recv(1 << 16):
                return
            gevent.sleep(0.05)

    reader = gevent.spawn(slow_reader)
    began = gevent.get_hub().loop.now()
    try:
        with gevent.Timeout(10):
            try:
                timed.sendall(b"x" * (30 << 20))  # 30 MB at ~1.3 MB/s: 20 s if it never gave up
            except TimeoutError:
                pass
            else:
                raise AssertionError("sendall did not time out")
        assert 0.25 <= gevent.get_hub().loop.now() - began < 5
        assert not left._write_event.active
    finally:
        reader.kill()
        timed.close()
        right.close()


def test_a_timed_socket_used_after_close_raises_instead_of_aborting():
    """After close(), recv and sendall raise OSError (a watcher started on a closed fd would
    make libev abort the whole process)."""
    left, right = _pair()
    timed = TimedSocket(left, 1)
    timed.close()
    timed.close()  # (twice is fine)
    try:
        for call in (lambda: timed.recv(10), lambda: timed.sendall(b"x" * (8 << 20))):
            try:
                call()
            except OSError:
                pass
            else:
                raise AssertionError("no OSError after close")
    finally:
        right.close()


def test_a_client_dropped_while_its_writer_sends_frees_the_batch_at_once(log_stream):
    """A client disconnected by the server (as ``--max-memory`` does, with ``abort``) while its
    writer is parked sending a batch to it. The killed writer used to end with its
    GreenletExit kept as the greenlet's value: the traceback held the writer's frame and so
    the batch (up to MAX_SEND_BATCH), until the cyclic collector freed the connection. With
    1,000 stuck readers of 1 KB replies evicted for ``--max-memory 256M``, RSS reached 433 MiB
    against an accounting of 278 (329 once fixed). Now nothing holds the batch once the
    client is gone. tracemalloc counts Python's allocations; the cyclic collector is off
    during the test so that it cannot free the leftover for us."""
    tracemalloc.start()
    gc.disable()
    server = KeyValueServer(MemoryStore())
    server.start(0, host="127.0.0.1")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    try:
        server.store.put("big", b"x" * (MAX_SEND_BATCH - 8))  # a reply of one whole batch
        before, _ = tracemalloc.get_traced_memory()
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(b"GET:big\n" * 8)  # about 8 MiB of replies it never reads
        wait_until(lambda: server.count_active() == 1)
        (conn,) = server._conns.values()
        wait_until(lambda: conn.io.stalled_since, timeout=10, message="the writer waits in send")
        writer = conn.writer
        held, _ = tracemalloc.get_traced_memory()
        assert held - before > MAX_SEND_BATCH  # the replies the kernel did not take: queued, in flight
        conn.abort("memory_limit")
        wait_until(lambda: server.count_active() == 0 and writer.dead, timeout=10)
        after, _ = tracemalloc.get_traced_memory()
        assert after - before < MAX_SEND_BATCH // 2, f"{after - before} bytes still held"
    finally:
        gc.enable()
        tracemalloc.stop()
        sock.close()
        server.close(flush_timeout=0.1)


# --- dormant clients: reader greenlets released while their clients are quiet --------------


def _dormant(server: KeyValueServer, count: int) -> list:
    """The server's connections once ``count`` of them are dormant (their readers released)."""
    wait_until(
        lambda: sum(conn.dormant for conn in server._conns.values()) >= count,
        timeout=10,
        message=f"{count} readers released",
    )
    return [conn for conn in server._conns.values() if conn.dormant]


@contextlib.contextmanager
def _answered_client(**options: Any) -> Iterator[tuple[KeyValueServer, socket.socket, Any]]:
    """An in-process server (``options``) and one client answered once (a PING): yields the
    server, the client's socket and its connection; the socket and server are closed after."""
    server = KeyValueServer(MemoryStore(), **options)
    server.start(0, host="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        sock.sendall(b"PING\n")
        assert _recv_exactly(sock, 5) == b"PONG\n"
        (conn,) = server._conns.values()
        yield server, sock, conn
    finally:
        sock.close()
        server.close(flush_timeout=0.5)


def test_a_quiet_client_s_reader_is_released_and_made_again_on_its_next_request(log_stream):
    """A client quiet for READER_IDLE or more, with nothing queued, has its reader greenlet
    released: a parked reader (its frames, its copy of the C stack) is most of what an idle
    connection costs (8.8 kB each at 10,000 before; 2.9 to 4.7 after: bench/OPTIMISATIONS.md,
    "a dormant reader", and bench/REPORT.md). Its next request makes a new reader, which
    answers in order; an incomplete line held while dormant is finished by the next read.
    Nothing is dropped or logged for it."""
    with _answered_client() as (server, sock, conn):
        sock.sendall(b"PUT:k:v\nGET:k\n")
        assert _recv_exactly(sock, 4) == b"k:v\n"
        _dormant(server, 1)
        first = conn.reader
        wait_until(lambda: first.dead, timeout=5)
        assert len(server._pool) == 0 and conn.writer is None
        assert server.stats()["dormant"] == 1 == server.count_active()  # (STATS and the gauge)
        sock.sendall(b"PUT:k:w\nGET:")  # a request and an incomplete line
        wait_until(lambda: not conn.dormant and conn.buffer.pending == 4, timeout=5)
        assert server.count_dormant() == 0
        _dormant(server, 1)
        assert conn.reader is not first and conn.reader.dead
        sock.sendall(b"k\nPING\n")
        assert _recv_exactly(sock, 13) == b"k:v\nk:w\nPONG\n"
        assert server.count_active() == 1 and server.count_dropped() == 0
    assert server.count_dropped() == 1 and len(server._pool) == 0
    assert not [e for e in log_events(log_stream) if e["event"] in ("unhandled_error", "client_error")]


@pytest.mark.parametrize("password", [None, "secret"])
def test_a_client_that_has_sent_nothing_has_no_reader_from_the_start(password, log_stream, monkeypatch):
    """A client that has sent nothing when it is accepted (the usual case: its request follows
    its connect) gets no reader greenlet until it sends: it is dormant from the start, as a
    client gone quiet is later (an idle connection 2.5 kB instead of 7.7 at 1,000 and 9.1 at
    10,000: bench/OPTIMISATIONS.md, "dormant from the start"). Its first request makes its
    reader, which answers it (after its AUTH, under a password), and earns no patience: that
    reader is released after one quiet READER_IDLE, as one made at accept would be. The
    sweeps that release quiet readers are off here (READER_IDLE an hour): dormancy can only
    be the new clients'."""
    monkeypatch.setattr(server_module, "READER_IDLE", 3600.0)
    server = KeyValueServer(MemoryStore(), password=password)
    server.start(0, host="127.0.0.1")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    try:
        _dormant(server, 20)
        assert len(server._pool) == 0 and server.stats()["dormant"] == 20 == server.count_active()
        auth = b"AUTH:secret\n" if password else b""
        for i, sock in enumerate(socks):
            sock.sendall(auth + b"PUT:k%d:v\nGET:k%d\n" % (i, i))
        for i, sock in enumerate(socks):
            expected = (b"OK\n" if password else b"") + b"k%d:v\n" % i
            assert _recv_exactly(sock, len(expected)) == expected
        assert server.count_dormant() == 0 and len(server._pool) == 20
        assert {conn.patience for conn in server._conns.values()} == {1}
        for sock in socks:
            sock.close()
        wait_until(lambda: server.count_dropped() == 20, timeout=10)
    finally:
        for sock in socks:
            sock.close()
        server.close(flush_timeout=0.5)
    events = log_events(log_stream)
    assert [e["reason"] for e in events if e["event"] == "client_dropped"] == ["closed"] * 20
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]


def test_a_client_dormant_from_the_start_ends_as_any_other(log_stream, monkeypatch):
    """Clients that never sent a byte, dormant since they connected, end as others do: reset
    (also one reset before the server looked at it: the look at accept, a MSG_PEEK, meets the
    reset and must not swallow it, as the kernel reports it once), closed, timed out idle,
    still connected when the server closes.
    Each is dropped once with its reason, and nothing is left started. (The sweeps that
    release quiet readers are off: READER_IDLE an hour.)"""
    monkeypatch.setattr(server_module, "READER_IDLE", 3600.0)
    before = _active_watchers()
    server = KeyValueServer(MemoryStore(), idle_timeout=5.0)
    server.start(0, host="127.0.0.1")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(3)]
    reset, closes, idle = socks
    # Reset before the server has even looked at it (no yield between the connect and the
    # reset): the look at accept meets the reset, which must be reported as one.
    reset_close(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    try:
        _dormant(server, 3)
        reset_close(reset)
        closes.close()
        wait_until(lambda: server.count_dropped() == 3, timeout=10, message="resets and closed")
        wait_until(lambda: server.count_dropped() == 4, timeout=20, message="the idle timeout")
        assert idle.recv(64) == b""
        socks.append(kept := socket.create_connection(("127.0.0.1", server.port), timeout=10))
        _dormant(server, 1)
        server.close(flush_timeout=0.5)
        assert kept.recv(64) == b""
    finally:
        for sock in socks:
            sock.close()
        server.close(flush_timeout=0.5)
    events = log_events(log_stream)
    reasons = [e["reason"] for e in events if e["event"] == "client_dropped"]
    assert sorted(reasons[:3]) == ["closed", "reset", "reset"] and reasons[3:] == ["idle", "server_shutdown"]
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]
    assert server.count_active() == 0 and len(server._pool) == 0
    assert _active_watchers() <= before


def test_every_way_a_dormant_client_ends_leaves_nothing_started(log_stream):
    """Dormant clients (no reader greenlet, a read watcher started) end in each way a client
    can: reset, closed, disconnected for memory, timed out idle, and still connected when the
    server closes. Each is dropped once with its reason, nothing is logged as an error, and
    afterwards no greenlet is left and the loop has no more active watchers than before."""
    before = _active_watchers()
    with _served(idle_timeout=4.0) as (server, client):
        reset, closes, evicted, kept = (client(answered=True) for _ in range(4))
        evicted.sendall(b"PUT:k:" + b"x" * 8000)  # an incomplete line it holds while dormant
        dormant = {conn.client_id: conn for conn in _dormant(server, 4)}
        assert len(dormant) == 4
        reset_close(reset)
        closes.close()
        wait_until(lambda: server.count_dropped() == 2, timeout=10, message="reset and closed")
        (held,) = [conn for conn in server._conns.values() if conn.buffer.pending]
        held.abort("memory_limit")
        assert evicted.recv(64) == b""
        wait_until(lambda: server.count_dropped() == 3, timeout=10)
        idle = client(answered=True)  # (its own reader: dropped by the idle timeout, dormant or not)
        wait_until(lambda: server.count_dropped() == 5, timeout=15, message="the idle timeout")
        assert kept.recv(64) == b"" and idle.recv(64) == b""
    events = log_events(log_stream)
    reasons = sorted(e["reason"] for e in events if e["event"] == "client_dropped")
    assert reasons == ["closed", "idle", "idle", "memory_limit", "reset"]
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]
    assert server.count_active() == 0 and len(server._pool) == 0 and len(server._writers) == 0
    assert _active_watchers() <= before


def test_dormant_clients_still_connected_at_close_are_closed_and_counted(log_stream):
    """Dormant clients when the server closes: each is closed (its socket reads EOF) and
    dropped once with reason server_shutdown, their readers made again to do it."""
    before = _active_watchers()
    server = KeyValueServer(MemoryStore())
    server.start(0, host="127.0.0.1")
    socks = [socket.create_connection(("127.0.0.1", server.port), timeout=10) for _ in range(20)]
    try:
        for sock in socks:
            sock.sendall(b"PING\n")
            assert sock.recv(64) == b"PONG\n"
        _dormant(server, 20)
        assert server.count_dormant() == 20
        server.close(flush_timeout=0.5)
        assert server.count_dormant() == 0
        assert all(sock.recv(64) == b"" for sock in socks)
    finally:
        server.close(flush_timeout=0.5)
        for sock in socks:
            sock.close()
    events = log_events(log_stream)
    assert [e["reason"] for e in events if e["event"] == "client_dropped"] == ["server_shutdown"] * 20
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]
    assert server.count_active() == 0 and len(server._pool) == 0
    assert _active_watchers() <= before


def test_a_client_that_has_not_authenticated_goes_dormant_and_authenticates_later(log_stream):
    """With a password, a client quiet before its AUTH is released too; its AUTH then works and
    the small pre-AUTH line bound gives way to --max-line as before."""
    server = KeyValueServer(MemoryStore(), password="secret")
    server.start(0, host="127.0.0.1")
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        _dormant(server, 1)
        sock.sendall(b"AUTH:secret\nPUT:k:" + b"v" * 10000 + b"\nGET:k\n")
        assert _recv_exactly(sock, 3 + 10003) == b"OK\n" + b"k:" + b"v" * 10000 + b"\n"
    finally:
        sock.close()
        server.close(flush_timeout=0.5)
    assert server.count_dropped() == 1


def test_a_tls_client_quiet_before_its_handshake_keeps_its_reader(certs, log_stream, monkeypatch):
    """A TLS server releases no reader: a client yet to finish its handshake reads through
    the bare socket (``conn.stream is conn.io``), and a reader made again for it would skip
    the handshake. A plain client that waited would then be served in plain text on the TLS
    port, and a TLS client slow to send its hello would fail (its hello parsed as requests).
    Sweeps every 20 ms here: the quarter second the clients wait is a dozen of them."""
    monkeypatch.setattr(server_module, "READER_IDLE", 0.02)
    server = KeyValueServer(MemoryStore(), tls=certs.server)
    server.start(0, host="127.0.0.1")
    plain = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    slow = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    try:
        wait_until(lambda: server.count_active() == 2, timeout=5)
        gevent.sleep(0.25)  # (the clients' slowness under test, not a synchronisation)
        assert not [conn for conn in server._conns.values() if conn.dormant]
        tls = certs.client.wrap_socket(slow, server_hostname="127.0.0.1")
        tls.sendall(b"PUT:k:v\nGET:k\n")
        assert _recv_exactly(tls, 4) == b"k:v\n"
        plain.sendall(b"PING\n")
        answer = b""
        while data := plain.recv(100):  # a TLS alert at most, then EOF
            answer += data
        assert b"PONG" not in answer
        wait_until(lambda: server.count_dropped() == 1, timeout=5)
    finally:
        plain.close()
        slow.close()
        server.close(flush_timeout=0.5)
    events = log_events(log_stream)
    assert next(e["reason"] for e in events if e["event"] == "client_dropped") == "tls_handshake_failed"
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]


def test_a_woken_reader_is_released_only_after_its_whole_patience(log_stream, monkeypatch):
    """A request that wakes a released reader starts a new quiet spell: the new reader is
    released after ``patience`` more quiet looks, the doubled patience whole (a count of
    quiet looks left over from before the wake-up halved it: a client pausing two seconds
    between requests got twice the readers made). The sweeps are made here by hand, calling
    what the sweeper calls (``Connection.retire_reader``), with READER_IDLE an hour."""
    monkeypatch.setattr(server_module, "READER_IDLE", 3600.0)
    with _answered_client() as (server, sock, conn):
        for patience in (1, 2, 4, 8):
            assert conn.patience == patience
            # (its writer released first, WRITER_IDLE after the last reply: no reader goes before)
            wait_until(lambda: conn.writer is None and conn.io.parked_reading(), timeout=5)
            looks = [conn.retire_reader() for _ in range(patience + 1)]
            assert looks == [False] * patience + [True]  # quiet through `patience` looks, then released
            _dormant(server, 1)
            sock.sendall(b"PING\n")
            assert _recv_exactly(sock, 5) == b"PONG\n"


def test_a_client_that_keeps_waking_its_reader_is_given_more_patience(log_stream, monkeypatch):
    """Each time a client's request wakes its released reader, the client's patience doubles
    (up to READER_PATIENCE_MAX passes of the sweeper): a client pausing about READER_IDLE
    between requests paid a greenlet made and ended per request (at one request a second,
    10,000 such clients cost 94 % of a core instead of 83 %, measured). Its reader is then
    kept through quiet spells shorter than its patience. Sweeps every 20 ms here."""
    monkeypatch.setattr(server_module, "READER_IDLE", 0.02)
    with _answered_client() as (server, sock, conn):
        for woken in range(1, 4):
            _dormant(server, 1)
            sock.sendall(b"PING\n")
            assert _recv_exactly(sock, 5) == b"PONG\n"
            assert conn.patience == 2**woken and not conn.dormant
        conn.patience = READER_PATIENCE_MAX // 2
        _dormant(server, 1)
        sock.sendall(b"PING\n")
        assert _recv_exactly(sock, 5) == b"PONG\n"
        assert conn.patience == READER_PATIENCE_MAX  # (doubled, then capped below)
        sock.sendall(b"PING\n")
        assert _recv_exactly(sock, 5) == b"PONG\n"
        gevent.sleep(READER_PATIENCE_MAX * 0.02 / 4)  # (a quiet spell well within its patience)
        assert not conn.dormant and not conn.reader.dead
        _dormant(server, 1)
        sock.sendall(b"PING\n")
        assert _recv_exactly(sock, 5) == b"PONG\n"
        assert conn.patience == READER_PATIENCE_MAX


def test_an_idle_timeout_taking_a_reader_being_released_still_closes_its_client(log_stream):
    """The idle timeout's sweep and the release of a reader in the same pass of the loop: the
    release's wake-up runs first, so the reader ends before the idle timeout's exception
    reaches it. The reader then must not go dormant (the exception would be lost, and the
    client kept for another whole timeout): it is dropped as idle at once. Done here by hand
    in one step, as the two sweeps would."""
    with _answered_client(idle_timeout=60.0) as (server, sock, conn):
        wait_until(lambda: conn.writer is None and conn.io.parked_reading(), timeout=5)
        conn.io.retire_reader(conn.reader)  # what Connection.retire_reader does, then, unyielding,
        conn.reading = False  # what _sweep_idle does
        server._interrupt(conn, server_module._Idle)
        assert sock.recv(64) == b""  # closed at once, not dormant
        wait_until(lambda: server.count_dropped() == 1, timeout=5)
    events = log_events(log_stream)
    assert [e["reason"] for e in events if e["event"] == "client_dropped"] == ["idle"]
    assert not [e for e in events if e["event"] in ("unhandled_error", "client_error")]
