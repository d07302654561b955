"""The Redis store's wire encoding, byte for byte (no Redis needed): the bytes templates of
the data commands give exactly what hiredis.pack_command gives, whatever the key and value
hold (CR, LF, ':', NUL, non-ASCII, empty values, sizes across digit counts)."""

import random

import hiredis
import pytest

from kvgevent.stores.resp import ReplyMismatch, append_line, check_types, delete, get


def _samples() -> list[bytes]:
    rnd = random.Random(15)
    fixed = [b"", b"k", b"a:b", b"\r\n", b"\x00\xff", "clé".encode(), b"x" * 9, b"x" * 10, b"x" * 99999]
    return fixed + [bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 300))) for _ in range(50)]


@pytest.mark.parametrize("key", _samples()[:20])
def test_the_templates_are_what_hiredis_packs(key):
    for value in _samples():
        line = b"name:" + value + b"\n"
        assert append_line(key, b"name", value) == hiredis.pack_command((b"APPEND", key, line))
    assert get(key) == hiredis.pack_command((b"GET", key))
    assert delete(key) == hiredis.pack_command((b"DEL", key))


@pytest.mark.parametrize(
    "keys",
    [
        [b"k%07d" % n for n in range(16)],  # one length: one join
        [b"a", b"bb", b"a", b"\r\n", b"ccc"],  # lengths mixed
        [b"x" * 300, b"y" * 300],  # one length, past the head tables
        [b"x" * 10, b"y" * 300],  # one of them past the tables
        [b"only"],
    ],
)
def test_a_batch_of_gets_is_what_hiredis_packs_for_each_get(keys):
    """The GETs-only path of the Redis store (``get_plain``) sends exactly one ``GETRANGE
    <prefix><key> 0 262143`` per key (its first bytes: FIRST_FETCH_BYTES), in order, whatever
    the lengths of its keys, and gives back the replies as they are (no Redis: the
    dispatcher is a stand-in that keeps what it is given)."""
    from kvgevent.stores.redis_store import RedisStore

    store = RedisStore("redis://127.0.0.1:1/0", prefix="pre:")
    sent: list[bytes] = []

    class Keeper:
        def execute_encoded(self, payload: bytes, expected: list, writes: bool = True) -> list:
            sent.append(payload)
            assert expected == [bytes] * len(keys)
            return [b"k:v\n" for _ in expected]

        def close(self) -> None:
            pass

    store._dispatcher = Keeper()  # type: ignore[assignment]
    try:
        assert store.get_plain(keys) == [b"k:v\n"] * len(keys)  # type: ignore[misc]
        first = [hiredis.pack_command((b"GETRANGE", b"pre:" + k, b"0", b"262143")) for k in keys]
        assert sent == [b"".join(first)]
    finally:
        store.close()


def test_replies_are_checked_against_their_commands_types():
    assert check_types([[b"v"], 3, b"k:v\n"], [list, int, bytes]) is True  # (exact: no error reply)
    assert check_types([None, 3], [bytes, int]) is False  # (a nil: a GET of nothing, not exact)
    assert check_types([hiredis.ReplyError("NOSCRIPT No matching script"), 1], [int, int]) is False
    check_types([hiredis.ReplyError("OOM command not allowed")], [int])
    with pytest.raises(ReplyMismatch):
        check_types([b"LRANGE"], [list])  # (what a socket connected to itself echoes)
    with pytest.raises(ReplyMismatch):
        check_types([None], [int])  # (a nil only where a GET's bulk string was due)
    with pytest.raises(ReplyMismatch):
        check_types([[b"x"]], [int])


def test_updates_refused_with_noscript_are_sent_again_unless_a_later_write_ran():
    """Which commands go again as EVALSHA (and GET) after NOSCRIPT: an UPDATE refused after
    the last write (of any key) that ran, with the GETs of its key after it; never a command
    of another key, never an UPDATE after which a PUT, DELETE or UPDATE of any key ran
    (sent again, it would apply after that write)."""
    from kvgevent import Delete, Get, Put, Update
    from kvgevent.stores.redis_store import _redone

    noscript = hiredis.ReplyError("NOSCRIPT No matching script. Please use EVAL.")
    commands = [
        Get(b"a"),  # 0: before the UPDATE of a: not again
        Update(b"a", b"x", b"y"),  # 1: refused, but the PUT of b ran after it: not again
        Put(b"b", b"z"),  # 2: ran
        Get(b"a"),  # 3: a's UPDATE not sent again: neither is this
        Update(b"c", b"x", b"y"),  # 4: refused, nothing ran after it: again
        Get(b"b"),  # 5: another key
        Get(b"c"),  # 6: after 4: again
        Update(b"c", b"y", b"z"),  # 7: refused, after 4: again
        Update(b"d", b"x", b"y"),  # 8: refused: again
    ]
    replies = [[b"x"], noscript, 1, [b"x"], noscript, [b"z"], [b"x"], noscript, noscript]
    assert _redone(commands, replies) == [4, 6, 7, 8]
    assert _redone(commands, [[b"x"], 1, 1, [b"x"], 1, [b"z"], [b"x"], 1, 1]) == []
    assert _redone([Update(b"a", b"x", b"y"), Delete(b"a")], [noscript, 1]) == []
    assert _redone([Update(b"a", b"x", b"y"), Delete(b"e")], [noscript, 1]) == []
    assert _redone([Update(b"a", b"x", b"y"), Get(b"e")], [noscript, []]) == [0]


@pytest.mark.parametrize("prefix", [b"p:", b"P" * 100], ids=["short prefix", "prefix too long for tables"])
def test_the_plain_path_encodes_what_hiredis_packs(prefix):
    """RedisStore.apply_plain and get_plain build their commands from pieces (head tables
    with the prefix in them; a batch with a key too long for them, the general encoder): the
    same bytes as pack_command, for keys and values on both sides of the tables' bound; the
    GETs after a batch's last write (all of get_plain's) as GETRANGE of their first bytes."""
    from kvgevent.stores.redis_store import RedisStore
    from kvgevent.stores.resp import HEADS

    store = RedisStore("redis://127.0.0.1:1/0", prefix=prefix.decode())  # (connects on first use: never here)
    dispatcher = store._dispatcher
    sent: list[bytes] = []

    class Recorder:
        def execute_encoded(self, payload: bytes, expected: list[type], writes: bool = True) -> list[object]:
            sent.append(payload)
            return [b"" if kind is bytes else 0 for kind in expected]  # (GETRANGE of no key: "")

    def pack(op: tuple, first: bool = False) -> bytes:
        if len(op) == 1 and first:
            return hiredis.pack_command((b"GETRANGE", prefix + op[0], b"0", b"262143"))
        if len(op) == 1:
            return hiredis.pack_command((b"GET", prefix + op[0]))
        if op[1] is None:
            return hiredis.pack_command((b"DEL", prefix + op[0]))
        return hiredis.pack_command((b"APPEND", prefix + op[0], op[0] + b":" + op[1] + b"\n"))

    samples = _samples() + [b"k" * (HEADS + n) for n in range(-4, 2)]
    short = [key for key in samples if len(key) < HEADS]  # (the tables: every key shorter)
    batches = []
    for keys in (samples, short):  # with a key too long for the tables, and without
        ops = [(key,) for key in keys]
        ops += [(key, value) for key, value in zip(keys, reversed(samples), strict=False)]
        ops += [(key, None) for key in keys]
        writes = [op for op in ops if len(op) == 2]
        # mixed (GETs first: asked whole), writes only, and writes then GETs (by first bytes)
        batches += [(ops, 0), (writes, 0), (writes + ops[: len(keys)], len(writes))]
    store._dispatcher = Recorder()
    try:
        for ops, first in batches:
            results = store.apply_plain(ops)
            assert results == [None] * len(ops)
            assert sent.pop() == b"".join(pack(op, 0 < first <= index) for index, op in enumerate(ops))
        for keys in (samples, short):
            assert store.get_plain(keys) == [None] * len(keys)  # (no values)
            assert sent.pop() == b"".join(pack((key,), True) for key in keys)
    finally:
        store._dispatcher = dispatcher
        store.close()


def test_replies_are_read_whole_across_reads_and_a_zero_does_not_end_them():
    """RespConnection reads every complete reply in C (iter over the reader's gets): an
    integer reply of 0 (DEL of nothing) is a reply, not the end; replies split across reads
    are joined; more replies than commands means the stream is out of step."""
    from kvgevent.stores.resp import _NOT_YET, RespConnection

    class Chunks:
        def __init__(self, *chunks: bytes) -> None:
            self.chunks = list(chunks)

        def recv(self, size: int) -> bytes:
            return self.chunks.pop(0) if self.chunks else b""

    connection = RespConnection("127.0.0.1", 1, 0, None, None, 1.0)
    connection.reader = hiredis.Reader(notEnoughData=_NOT_YET)
    connection.sock = Chunks(b":0\r\n$1\r", b"\na\r\n*1\r\n:0", b"\r\n:0\r\n")
    assert connection._replies(4) == [0, b"a", [0], 0]
    connection.sock = Chunks(b":0\r\n:1\r\n:2\r\n")
    with pytest.raises(ReplyMismatch):
        connection._replies(2)
    connection.sock = Chunks(b":0\r\n")
    with pytest.raises(ConnectionError):
        connection._replies(2)  # (then the peer closed)


def test_a_burst_of_batches_is_split_over_connections_each_caller_gets_its_own_replies():
    """40 callers queue 16 commands each at once. The dispatcher sends them in round trips of
    at most MAX_ROUND_TRIP commands (one request is never split), several in flight at once
    on its connections (so Redis answers one while the worker works on another), and each
    caller gets exactly its own replies, in order. (Fake connections that yield to the loop
    as a socket wait would.)"""
    import gevent

    from kvgevent.stores.resp import MAX_ROUND_TRIP, Dispatcher

    sizes: list[int] = []
    in_flight = {"now": 0, "most": 0}

    class FakeConnection:
        def __init__(self) -> None:
            self.siblings: list = []
            self.ready = True

        def round_trip(self, payload: bytes, count: int) -> list:
            in_flight["now"] += 1
            in_flight["most"] = max(in_flight["most"], in_flight["now"])
            try:
                gevent.sleep(0.001)  # (the wire, and Redis)
                lines = payload.split(b"\n")[:-1]
                assert len(lines) == count
                sizes.append(count)
                return [[line] for line in lines]
            finally:
                in_flight["now"] -= 1

        def drop_if_closed(self) -> None:
            pass

        def close(self) -> None:
            pass

    dispatcher = Dispatcher(FakeConnection, connections=4)
    try:

        def caller(n: int) -> list:
            payload = b"".join(b"c%d-%d\n" % (n, i) for i in range(16))
            return dispatcher.execute_encoded(payload, [list] * 16)

        callers = [gevent.spawn(caller, n) for n in range(40)]
        gevent.joinall(callers, timeout=10, raise_error=True)
        for n, done in enumerate(callers):
            assert done.value == [[b"c%d-%d" % (n, i)] for i in range(16)]
        assert sum(sizes) == 40 * 16
        assert max(sizes) <= MAX_ROUND_TRIP < 40 * 16
        assert in_flight["most"] > 1
    finally:
        dispatcher.close()


def test_connections_failing_aside_is_logged_only_while_one_is_in():
    """``store_connections_failing`` says "no outage: the others serve". A refusal (or a loss
    in the setup: a refusal read as a reset) while no connection is in, one merely
    connecting, is an outage's (Redis restarted with another password: before, logged with
    ``connected: 0`` beside ``store_unavailable``, in 4 of 4 runs of an attacker's script);
    once one is in, the episode is logged once."""
    from kvgevent.stores.resp import Dispatcher, Lost, SetupRefused

    logged: list[tuple[str, dict]] = []

    class Log:
        def warning(self, event: str, **fields: object) -> None:
            logged.append((event, fields))

        info = warning

    class FakeConnection:
        def __init__(self) -> None:
            self.siblings: list = []
            self.ready = self.connecting = False

        def close(self) -> None:
            pass

    dispatcher = Dispatcher(FakeConnection, connections=4, log=Log(), node="r")  # type: ignore[arg-type]
    try:
        first, second = dispatcher._connections[:2]
        second.connecting = True
        dispatcher._failing_aside(SetupRefused("WRONGPASS invalid username-password pair"))
        dispatcher._failing_aside(Lost("lost in its setup: Connection reset by peer"))
        assert logged == []
        first.ready = True
        dispatcher._failing_aside(Lost("lost in its setup: Connection reset by peer"))
        dispatcher._failing_aside(SetupRefused("WRONGPASS invalid username-password pair"))
        assert [(e, fields["connected"]) for e, fields in logged] == [("store_connections_failing", 1)]
        for connection in dispatcher._connections:
            connection.ready = True
        dispatcher._connected()  # (every connection in: the episode ends)
        assert logged[-1][0] == "store_connections_restored"
        first.ready = False  # a CLIENT KILL storm: a setup lost soon after begins no episode
        dispatcher._failing_aside(Lost("lost in its setup: Connection reset by peer"))
        assert logged[-1][0] == "store_connections_restored"
        dispatcher._failing_aside(SetupRefused("WRONGPASS invalid username-password pair"))
        assert logged[-1][0] == "store_connections_failing"  # (a refusal in Redis's words does)
    finally:
        dispatcher.close()


def test_a_round_trip_takes_one_kind_and_leaves_the_others_in_order():
    """The dispatcher's queue: a round trip takes the requests of the kind whose first has
    waited longest (reads only, or holding writes), up to MAX_ROUND_TRIP commands, the
    others left waiting in their order; unless writes may go, reads only. It looks at no
    more requests than it takes: thousands may be queued (an attacker's pass: a single
    queue skipped over the other kind, 10 µs a request at 3,000 clients)."""
    from kvgevent.stores.resp import MAX_ROUND_TRIP, _Queue, _Request

    def request(name: str, writes: bool, count: int = 16) -> _Request:
        return _Request(name.encode(), [list] * count, None, writes)

    queue = _Queue()
    for name, writes in [("r1", False), ("w1", True), ("r2", False), ("w2", True)]:
        queue.append(request(name, writes))
    batch, count, writes = queue.take(True)
    assert [r.payload for r in batch] == [b"r1", b"r2"] and (count, writes) == (32, False)
    assert [r.payload for r in queue.writes] == [b"w1", b"w2"] and not queue.reads
    queue.append(request("r3", False))
    batch, count, writes = queue.take(False)  # (no more writes may go out)
    assert [r.payload for r in batch] == [b"r3"] and not writes
    assert queue.take(False) == ([], 0, False) and [r.payload for r in queue.writes] == [b"w1", b"w2"]
    taken, _, writes = queue.take(True)
    assert [r.payload for r in taken] == [b"w1", b"w2"] and writes
    queue.give_back(taken)  # (refused at its connect: back at the head, in order)
    queue.append(request("r4", False))
    assert [r.payload for r in queue.take(True)[0]] == [b"w1", b"w2"]  # (they came first)
    queue = _Queue()
    for n in range(1000):
        queue.append(request(f"w{n}", True))
    batch, count, writes = queue.take(True)
    assert count == MAX_ROUND_TRIP and writes and len(queue.writes) == 1000 - MAX_ROUND_TRIP // 16
    assert queue.writes[0].payload == b"w%d" % (MAX_ROUND_TRIP // 16)
