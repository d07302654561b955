"""The session, sans I/O: parsed requests in, actions out, byte for byte. No socket, no server,
no greenlet: the test plays the read loop, answering Room and Durable itself."""

from __future__ import annotations

import hmac
from typing import Any

import pytest

from kvgevent.config import REPLY_CHUNK
from kvgevent.errors import StoreError
from kvgevent.protocol import ERR_LINE_TOO_LONG, Delete, Put, Update, value_lines
from kvgevent.server.auth_throttle import AuthThrottle
from kvgevent.server.counters import Counters
from kvgevent.server.memory import MemoryGuard
from kvgevent.server.session import (
    BYTES_COST,
    LIST_COST,
    NEXT_TURN,
    Chunk,
    Close,
    Dropped,
    Durable,
    Holding,
    Room,
    Session,
    Shared,
    Sleep,
    held_bytes,
)
from kvgevent.stores.base import UNBOUNDED
from kvgevent.stores.memory import MemoryStore


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []

    def bind(self, **_: Any) -> Log:
        return self

    def warning(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    info = error = warning


def session_for(store=None, password: bytes | None = None, chunk=(256, 1 << 20), throttle=None) -> Session:
    store = store or MemoryStore()
    counters = Counters()
    log = Log()
    shared = Shared(
        store,
        counters,
        password,
        lambda: {"keys": store.count_keys()},
        MemoryGuard(0, store, lambda: 1, log),
        throttle or AuthThrottle(),
        log,
    )
    return Session(shared, 1, "127.0.0.1:5", "127.0.0.1", 1 << 20, chunk)


def run(session: Session, data: bytes, answers: dict | None = None) -> list[Any]:
    """Every action of ``session`` applying the lines of ``data``; Room is answered True (or
    by ``answers['room']``, a list consumed in order), Durable by ``answers['durable']``."""
    answers = answers or {}
    rooms = list(answers.get("room", []))
    items = [line for line in data.split(b"\n")[:-1]]
    actions = session.handle(items)
    if isinstance(actions, list):  # the plain path: reply lines, no action
        return [actions] if actions else []
    out: list[Any] = []
    reply: Any = None
    try:
        while True:
            action = actions.send(reply)
            out.append(list(action) if action.__class__ is list else action)
            reply = None
            if isinstance(action, Room):
                reply = rooms.pop(0) if rooms else True
            elif isinstance(action, Durable):
                reply = answers.get("durable")
            elif isinstance(action, Close):
                break
    except StopIteration:
        pass
    return out


def test_a_batch_is_one_list_of_reply_lines():
    session = session_for()
    assert run(session, b"PUT:k:v\nPUT:k:w\nGET:k\nGET:none\nPING\n") == [[b"k:v\n", b"k:w\n", b"PONG\n"]]
    assert session.shared.counters.commands == 5


def test_errors_are_err_lines_in_place_and_counted():
    session = session_for()
    actions = run(session, b"bogus\nPUT:k\nGET:\nPING\n")
    assert actions == [
        [b"ERR unknown command\n", b"ERR wrong number of fields for PUT\n", b"ERR empty key\n", b"PONG\n"]
    ]
    assert session.shared.counters.errors == 3


def test_a_too_long_line_is_reported_once_per_connection():
    session = session_for()
    actions = session.handle([ERR_LINE_TOO_LONG, ERR_LINE_TOO_LONG])
    assert actions == [b"ERR line too long\n", b"ERR line too long\n"]  # (the plain path: a list)
    assert [event for event, _ in session.shared.log.events] == ["line_too_long"]
    assert session.shared.counters.lines_too_long == 2


def test_a_big_reply_comes_in_chunks_each_after_room_was_found():
    """A GET of 20 values of 300 bytes (too big to build at once) with chunks of at most 8
    lines: the replies before it first, then what its list of values holds (counted as the
    client's buffers until the reply is built), Room before each chunk, the chunk bytes exact."""
    session = session_for(chunk=(8, 1 << 20))
    values = [(b"%02d" % i) * 150 for i in range(20)]
    run(session, b"".join(b"PUT:big:%s\n" % value for value in values))
    actions = run(session, b"PING\nGET:big\nPING\n")
    lines = [b"big:" + value + b"\n" for value in values]
    assert actions == [
        [b"PONG\n"],
        Holding(LIST_COST + 8 * 20),
        Room(8, 8 * 305),
        Chunk(b"".join(lines[0:8]), 8),
        Room(8, 8 * 305),
        Chunk(b"".join(lines[8:16]), 8),
        Room(4, 4 * 305),
        Chunk(b"".join(lines[16:20]), 4),
        Holding(0),
        [b"PONG\n"],
    ]


def test_a_big_reply_whose_list_the_store_dropped_holds_its_values_too():
    """A big reply under way (its client waits for room) holds the list's slots; once the
    store drops the list (a DELETE, a refill), ``held_now`` adds the values, which the reply's
    copy alone keeps: once (None after), and nothing is noted once the reply is done. UPDATEs
    and PUTs change the list in place: not a drop. Values of one byte (objects CPython shares:
    a refill holds the very same ones) are seen dropped all the same."""
    for value, count in ((b"x", 200), (b"%02d" % 7 * 150, 20)):
        session = session_for(chunk=(8, 1 << 20))
        run(session, b"".join(b"PUT:big:%s\n" % value for _ in range(count)))
        actions = session.handle([b"GET:big", b"PING"])
        assert next(actions) == Holding(LIST_COST + 8 * count) and next(actions).__class__ is Room
        store = session.shared.store
        assert session.held_now(set()) is None
        store.apply([Update(b"big", value, b"new"), Put(b"big", b"more")])
        assert session.held_now(set()) is None
        store.apply([Delete(b"big"), *(Put(b"big", value) for _ in range(count))])  # (refilled)
        own = count * (len(value) + BYTES_COST)
        assert session.held_now(set()) == LIST_COST + 8 * count + own
        assert session.held_now(set()) is None  # (counted once)
        actions.close()  # (its client went)
        assert session.held == []


def test_values_dropped_under_several_readers_count_once():
    """Two clients each reading a big key when it is deleted: its values count once, for the
    first one looked at (each counted them in full, and prompt readers of one big key were
    disconnected at a limit RSS was far under, an attacker's pass); once that reader goes,
    the other counts them."""
    first = session_for(chunk=(8, 1 << 20))
    second = Session(first.shared, 2, "127.0.0.1:6", "127.0.0.1", 1 << 20, (8, 1 << 20))
    values = [(b"%02d" % i) * 150 for i in range(20)]
    run(first, b"".join(b"PUT:big:%s\n" % value for value in values))
    readers = [session.handle([b"GET:big"]) for session in (first, second)]
    for actions in readers:
        next(actions)  # (Holding: the copy made)
    first.shared.store.apply([Delete(b"big")])
    own = sum(map(len, values)) + 20 * BYTES_COST
    seen: set[int] = set()
    assert first.held_now(seen) == LIST_COST + 8 * 20 + own
    assert second.held_now(seen) is None
    seen = set()
    first.counted(seen)  # (the next look: the first still holds them)
    assert second.held_now(seen) is None
    readers[0].close()  # (the first reader went)
    assert second.held_now(set()) == LIST_COST + 8 * 20 + own


def test_what_big_replies_hold_is_their_lists_and_for_a_store_kept_elsewhere_their_values():
    """Holding's size: 56 bytes a list and 8 a value (a memory store's values are its data);
    a store kept elsewhere (Redis) also the values, 33 bytes beside their length (a reply
    of 100,000 values of 1 KiB from Redis holds 100 MB, not 800 kB). Errors and None: 0."""
    results = [None, [b"a" * 10, b"b" * 20], StoreError("x"), [b"c"]]
    assert held_bytes(results, 1, False) == (56 + 16) + (56 + 8)
    assert held_bytes(results, 1, True) == (56 + 16 + 30 + 2 * 33) + (56 + 8 + 1 + 33)
    assert held_bytes(results, 3, False) == 56 + 8
    assert held_bytes(results, 4, True) == 0


def test_a_big_reply_for_a_client_that_does_not_read_is_dropped_unbuilt():
    session = session_for(chunk=(2, 1 << 20))
    run(session, b"".join(b"PUT:big:%s\n" % (b"x" * 5000) for _ in range(5)))
    actions = run(session, b"GET:big\nPING\n", {"room": [True, False]})
    assert [type(a).__name__ for a in actions] == [
        "Holding",
        "Room",
        "Chunk",
        "Room",
        "Dropped",
        "Holding",
        "list",
    ]
    assert actions[4] == Dropped(3) and actions[5:] == [Holding(0), [b"PONG\n"]]


def test_a_turn_ends_when_its_work_is_done():
    """5 UPDATEs scanning a 30,000-value key with a turn of 50,000 units: two a turn, NEXT_TURN between
    them, and the work counts from zero after it."""
    session = session_for()
    run(session, b"".join(b"PUT:h:%d\n" % i for i in range(30_000)))
    import kvgevent.server.session as module

    old, module.TURN_WORK = module.TURN_WORK, 50_000
    try:
        actions = run(session, b"UPDATE:h:absent:x\n" * 5 + b"PING\n")
    finally:
        module.TURN_WORK = old
    assert actions == [NEXT_TURN, NEXT_TURN, [b"PONG\n"]]


class Durably(MemoryStore):
    """A memory store that promises durability: PONG waits for a barrier."""

    needs_barrier = True
    serve_plain = None  # (its positions count apply_some's commands only)

    def __init__(self) -> None:
        super().__init__()
        self.position = 0

    def apply_some(self, commands, budget):
        self.position += len(commands)
        return super().apply_some(commands, budget)

    def write_position(self) -> int:
        return self.position


def test_a_ping_under_a_durable_store_waits_for_the_writes_before_it():
    session = session_for(Durably())
    assert run(session, b"PUT:a:1\nGET:a\nPING\n") == [[b"a:1\n"], Durable(2), [b"PONG\n"]]
    failed = run(session, b"PUT:b:1\nPING\n", {"durable": StoreError("persistence failed")})
    assert failed == [Durable(3), [b"ERR persistence failed\n"]]


def test_before_auth_only_auth_and_ping_are_served():
    session = session_for(password=b"pw")
    assert run(session, b"GET:k\nPING\nAUTH:nope\nAUTH:pw\nPUT:k:v\nGET:k\n") == [
        [b"ERR auth required\n", b"PONG\n", b"ERR invalid password\n", b"OK\n"],
        [b"k:v\n"],
    ]
    assert session.authenticated


def test_the_tenth_wrong_password_closes_after_its_reply():
    session = session_for(password=b"pw", throttle=AuthThrottle(after=100))
    actions = run(session, b"AUTH:x\n" * 12)
    assert actions == [[b"ERR invalid password\n"] * 10, Close("auth_failures")]
    assert session.shared.counters.errors == 10


def test_a_throttled_address_sleeps_before_its_password_is_checked():
    clock = [100.0]
    throttle = AuthThrottle(after=2, clock=lambda: clock[0])
    session = session_for(password=b"pw", throttle=throttle)
    assert run(session, b"PING\nAUTH:a\nAUTH:b\n") == [
        [b"PONG\n", b"ERR invalid password\n", b"ERR invalid password\n"]
    ]
    actions = run(session, b"PING\nAUTH:pw\n")
    assert actions == [[b"PONG\n"], Sleep(0.25), [b"OK\n"]]


def test_the_password_is_judged_by_hmac_compare_digest(monkeypatch):
    """README, Security: "The comparison takes constant time": an AUTH's password is compared
    with the server's by ``hmac.compare_digest``, whose time does not depend on where the two
    first differ (``==`` stops at the first different byte: a guesser could time it to find
    the password a byte at a time). Injected: ``compare_digest`` is replaced by a wrapper that
    records its arguments and answers as the real one does, or as the test forces. Every AUTH
    checked goes through it with the candidate and the password, and its answer alone decides:
    a wrong password is refused, the right one accepted, and with the answer forced the right
    one is refused and a wrong one accepted. The timing itself is not measured: the two
    comparisons differ by nanoseconds on a password, far below what a shared 2-core machine's
    scheduling and garbage collection add to any one measurement (microseconds), so a timing
    test could not tell them apart: it would fail at random and pass a regression."""
    real = hmac.compare_digest
    calls: list[tuple[bytes, ...]] = []
    forced: list[bool] = []  # empty: the real comparison's answer

    def recording(a: bytes, b: bytes) -> bool:
        calls.append(tuple(sorted((bytes(a), bytes(b)))))  # (either order is constant time)
        return forced[0] if forced else real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", recording)
    session = session_for(password=b"secret")
    assert run(session, b"AUTH:nope\nAUTH:secret\nPUT:k:v\nGET:k\n") == [
        [b"ERR invalid password\n", b"OK\n"],
        [b"k:v\n"],
    ]
    assert calls == [(b"nope", b"secret"), (b"secret", b"secret")]

    calls.clear()
    forced.append(False)
    refused = session_for(password=b"secret")
    assert run(refused, b"AUTH:secret\nGET:k\n") == [[b"ERR invalid password\n", b"ERR auth required\n"]]
    assert not refused.authenticated
    forced[0] = True
    accepted = session_for(password=b"secret")
    assert run(accepted, b"AUTH:wrong\n") == [[b"OK\n"]]
    assert accepted.authenticated
    assert calls == [(b"secret", b"secret"), (b"secret", b"wrong")]


@pytest.mark.parametrize("verb", [b"PUT:k:v", b"UPDATE:k:a:b"])
def test_over_max_memory_writes_are_refused_and_reads_served(verb):
    session = session_for()
    run(session, b"PUT:k:v\n")
    session.shared.guard.limit = 1  # everything is over it
    assert run(session, verb + b"\nGET:k\nDELETE:k\nGET:k\n") == [[b"ERR out of memory\n", b"k:v\n"]]


class General(MemoryStore):
    """A memory store whose sessions serve every line by the general path (a command object
    per line, :meth:`apply_some`): the reference the plain path must match."""

    serve_plain = None

    def __init__(self) -> None:
        super().__init__()
        self.lookup = None


PLAIN_LINES = [
    b"%s:k%d:%s" % (verb, key, value)
    for verb in (b"PUT", b"Put", b"put")
    for key in range(4)
    for value in (b"", b"v", b"a:b", b"x" * 3000)
] + [
    b"%s:k%d" % (verb, key)
    for verb in (b"GET", b"Get", b"get", b"DELETE", b"Delete", b"delete")
    for key in range(4)
]
"""Lines the plain path serves (PUTs and DELETEs of four keys, GETs of them; 3000-byte values
make some GET replies too big to build inline)."""

OTHER_LINES = [
    b"PUT:k1",
    b"PUT::v",
    b"PUT",
    b"pUT:k1:v",
    b"GET:",
    b"GET:k1:x",
    b"GET",
    b"gEt:k1",
    b"DELETE:",
    b"DELETE:k1:x",
    b"DeLeTe:k2",
    b"UPDATE:k1:v:w",
    b"PING",
    b"STATS",
    b"AUTH:x",
    b"",
    b"NOPE:k1",
    ERR_LINE_TOO_LONG,
]
"""Lines it leaves to the general path (malformed, other verbs, case-folded spellings)."""


def served(session: Session, items: list) -> tuple[bytes, int]:
    """The reply bytes of ``items`` (Room answered True) and the turns they ended."""
    actions = session.handle(list(items))
    if isinstance(actions, list):
        return b"".join(actions), 0
    data, turns = [], 0
    reply = None
    try:
        while True:
            action = actions.send(reply)
            reply = True if isinstance(action, Room) else None
            if action is NEXT_TURN:
                turns += 1
            elif isinstance(action, list):
                data += action
            elif isinstance(action, Chunk):
                data.append(action.data)
    except StopIteration:
        pass
    return b"".join(data), turns


@pytest.mark.parametrize("turn_work", [200_000, 3])
@pytest.mark.parametrize("seed", range(4))
def test_the_plain_path_does_exactly_what_the_general_path_does(seed, turn_work, monkeypatch):
    """Random batches of PUT/GET/DELETE lines mixed with everything else (some about a reply
    chunk long, some with keys of many values, some over --max-memory), through a session
    over the memory store (plain path) and one over a store that offers no plain path: the
    same replies byte for byte, turns, data, cost-model bytes, counts, work and metrics verb.
    A tiny turn budget makes GETs and DELETEs end turns mid-batch: the same replies and data
    then, but the plain path ends a turn as soon as its work is done, the general path only
    as it applies the next command (its turns are not compared)."""
    import random

    import kvgevent.server.session as module

    monkeypatch.setattr(module, "TURN_WORK", turn_work)
    rnd = random.Random(seed)
    plain, general = session_for(), session_for(General())
    for _ in range(400):
        lines = PLAIN_LINES if rnd.random() < 0.8 else PLAIN_LINES + OTHER_LINES
        count = rnd.choice([rnd.randint(1, 24), REPLY_CHUNK - 1, REPLY_CHUNK, REPLY_CHUNK + 1])
        items = [rnd.choice(lines) for _ in range(count)]
        if rnd.random() < 0.2:  # a key of more small values than a reply builds inline
            items = [b"PUT:k0:s%d" % n for n in range(rnd.randint(1, 80))] + items
        # --max-memory: none, or a limit about where the data is (refused PUTs on both paths)
        limit = rnd.choice([0, 0, max(1, plain.shared.store.used_bytes + rnd.randint(-500, 500))])
        plain.shared.guard.limit = general.shared.guard.limit = limit
        plain.work = general.work = 0  # (a new turn: the read loop's part)
        (replies, turns), (expected, expected_turns) = served(plain, items), served(general, items)
        assert replies == expected, items
        if turn_work > 3:
            assert turns == expected_turns
            assert (plain.work, plain.verb) == (general.work, general.verb), items
    for a, b in ((plain, general),):
        assert a.shared.store.data == b.shared.store.data
        assert a.shared.store.used_bytes == b.shared.store.used_bytes
        assert a.shared.store.applied == b.shared.store.applied
        assert a.shared.counters.errors == b.shared.counters.errors
        assert a.shared.counters.commands == b.shared.counters.commands
    assert plain.shared.store.applied["delete"] > 100 and plain.shared.store.applied["put"] > 1000


def test_a_delete_that_ends_the_turn_leaves_the_rest_of_the_batch_for_the_next(monkeypatch):
    import kvgevent.server.session as module

    session = session_for()
    run(session, b"PUT:k:1\nPUT:k:2\nPUT:k:3\nPUT:j:1\n")
    monkeypatch.setattr(module, "TURN_WORK", 3)
    session.work = 0
    assert run(session, b"DELETE:k\nPUT:k:v\nGET:k\n") == [NEXT_TURN, [b"k:v\n"]]
    session.work = 0
    replies = [b"k:v\n", b"j:1\n", b"j:2\n"]  # GET:j's two values end the turn
    assert run(session, b"GET:k\nPUT:j:2\nGET:j\nDELETE:k\n") == [replies, NEXT_TURN]
    assert session.shared.store.data == {b"j": [b"1", b"2"]}


def test_over_max_memory_the_plain_path_leaves_writes_to_the_general_path():
    session = session_for()
    run(session, b"PUT:k:v\n")
    session.shared.guard.limit = 1  # everything is over it
    replies = run(session, b"GET:k\nPUT:k:w\nDELETE:k\nGET:k\nPut:j:v\n")
    assert replies == [[b"k:v\n", b"ERR out of memory\n", b"ERR out of memory\n"]]
    assert session.shared.store.data == {}


UNAVAILABLE = StoreError("store unavailable")


class Fetching(MemoryStore):
    """A memory store seen as a store kept elsewhere: no lookup, no plain writes; runs of
    plain lines through ``apply_plain`` (one call) when ``plain``, else through
    ``apply_some``; every command on k3 fails with its own error (after its effect: the same
    on both paths), the rest of the batch served. Counts no work for what it applies, as a
    store kept elsewhere."""

    serve_plain = None

    def __init__(self, plain: bool) -> None:
        super().__init__()
        self.lookup = None
        if plain:
            self.apply_plain = self._apply_plain
        self.calls = 0

    def apply_some(self, commands, budget):
        self.calls += 1
        results, _ = super().apply_some(commands, UNBOUNDED)
        failing = [cmd[0] == b"k3" for cmd in commands]
        # all of them, and no work: as a store kept elsewhere (KVStore.apply_some's default)
        return [UNAVAILABLE if bad else result for bad, result in zip(failing, results, strict=False)], 0

    def _apply_plain(self, ops):
        self.calls += 1
        data, results = self.data, []
        for op in ops:
            key = op[0]
            if len(op) == 1:
                results.append(data[key][:] if data.get(key) else None)
            elif op[1] is None:
                data.pop(key, None)
                results.append(None)
            else:
                data.setdefault(key, []).append(op[1])
                results.append(None)
            if key == b"k3":
                results[-1] = UNAVAILABLE
        return results


class FetchingGets(Fetching):
    """``Fetching(True)`` with ``get_plain`` too (a batch of GETs alone, in one call), which
    gives each GET's reply lines, as the Redis store does (None for a key without values)."""

    def __init__(self) -> None:
        super().__init__(True)
        self.get_plain = self._get_plain
        self.get_calls = 0

    def _get_plain(self, keys):
        self.get_calls += 1
        results = self._apply_plain([(key,) for key in keys])
        pairs = zip(keys, results, strict=True)
        return [b"".join(value_lines(key, r)) if r.__class__ is list else r for key, r in pairs]


GET_LINES = [line for line in PLAIN_LINES if line[:1] in b"Gg"]


def test_gets_alone_queue_one_item_per_reply_line_whatever_the_store_hands_over():
    """The queue's bounds (``--queue-size`` lines) and ``messages_dropped`` count the items
    a batch hands over as lines: a batch of GETs alone through ``get_plain`` (whose results
    are each key's reply lines in one piece) gives one item per line, for keys of one value,
    several (small: 500 in 2,890 bytes), none, and one value bigger than a reply built inline.
    (Before, a key of 1,000 values was one item: an auditor's client queued 7 million lines
    against 1.4 million from the memory store, and 999 of each such reply's lost lines went
    uncounted.)"""
    store = FetchingGets()
    for n in range(500):  # (2,890 bytes of lines: not big)
        store.apply_plain([(b"m", b"%d" % n)])
    store.apply_plain([(b"one", b"x"), (b"big", b"b" * 5000)])
    session = session_for(store)
    for keys in ([b"one", b"one"], [b"one", b"none", b"one"], [b"one", b"m"], [b"big", b"one"]):
        handed = session.handle([b"GET:" + key for key in keys])
        items: list = [handed] if isinstance(handed, list) else []
        reply = None
        try:
            while not isinstance(handed, list):  # (the general path's actions, Room granted)
                action = handed.send(reply)
                reply = True if isinstance(action, Room) else None
                items.append(action)
        except StopIteration:
            pass
        for item in items:
            if isinstance(item, list):  # one line an item
                assert all(line.count(b"\n") == 1 and line.endswith(b"\n") for line in item), keys
            elif isinstance(item, Chunk):  # lines joined, and counted
                assert item.data.count(b"\n") == item.lines, keys
    assert session.handle([b"GET:one", b"GET:one"]) == [b"one:x\n", b"one:x\n"]


@pytest.mark.parametrize("gets", [False, True], ids=["apply_plain", "get_plain"])
@pytest.mark.parametrize("seed", range(4))
def test_plain_lines_applied_at_once_are_answered_as_the_general_path_answers_them(seed, gets):
    """The apply_plain path (a store kept elsewhere, such as Redis; with ``get_plain`` for
    batches of GETs alone, or not) against the general path on random batches (some longer
    than a reply chunk, some with a PING after each line, some GETs only): the same replies
    byte for byte (a command's own error as its ERR line, big replies in chunks), data,
    counts and errors; and a batch of plain lines takes one store call."""
    import random

    rnd = random.Random(seed)
    plain, general = session_for(FetchingGets() if gets else Fetching(True)), session_for(Fetching(False))
    for _ in range(300):
        lines = PLAIN_LINES if rnd.random() < 0.8 else PLAIN_LINES + OTHER_LINES
        if rnd.random() < 0.3:  # GETs only (a marker among them at times: a too-long line)
            lines = [*GET_LINES, ERR_LINE_TOO_LONG] if rnd.random() < 0.2 else GET_LINES
        count = rnd.choice([rnd.randint(1, 24), rnd.randint(1, 24), REPLY_CHUNK - 1, REPLY_CHUNK + 1, 600])
        items = [rnd.choice(lines) for _ in range(count)]
        if rnd.random() < 0.1:  # a key of more small values than a reply builds inline
            items = [b"PUT:k1:s%d" % n for n in range(rnd.randint(1, 80))] + items
        if rnd.random() < 0.3:  # PINGs among them, as a client library sends them
            items = [x for item in items for x in (item, rnd.choice(PINGS)) if x is not None]
        plain.work = general.work = 0
        assert served(plain, items) == served(general, items), items
        assert plain.verb == general.verb, items
    for a, b in ((plain, general),):
        assert a.shared.store.data == b.shared.store.data
        assert a.shared.store.applied == b.shared.store.applied
        assert a.shared.counters.errors_by == b.shared.counters.errors_by
        assert a.shared.counters.verbs == b.shared.counters.verbs
    assert plain.shared.counters.errors_by.get("store unavailable", 0) > 50
    if gets:
        assert plain.shared.store.get_calls > 10
    fetched = session_for(Fetching(True))
    run(fetched, b"PUT:k1:v\n")
    calls = fetched.shared.store.calls
    assert run(fetched, b"GET:k1\nPUT:k2:w\nGET:k3\nGET:k2\nDELETE:k1\nGET:k1\n") == [
        [b"k1:v\n", b"ERR store unavailable\n", b"k2:w\n"]
    ]
    assert fetched.shared.store.calls == calls + 1


PINGS = [b"PING", b"Ping", b"ping", None, None]
"""What follows a line when a test puts PINGs among them (None: nothing)."""


def test_commands_with_a_ping_after_each_take_one_store_call():
    """A client library that follows each command with a PING (kvgevent's does, to know when
    a PUT is done) gets one round trip for the batch, not one per command: each PONG still
    comes after the replies of the commands before it."""
    store = Fetching(True)
    session = session_for(store)
    run(session, b"PUT:k1:v\nPING\n")
    calls = store.calls
    replies = run(session, b"PUT:k2:w\nPING\nGET:k1\nPing\nGET:k3\nping\nDELETE:k1\nPING\nGET:k2\nPING\n")
    assert replies == [
        [
            b"PONG\n",
            b"k1:v\n",
            b"PONG\n",
            b"ERR store unavailable\n",
            b"PONG\n",
            b"PONG\n",
            b"k2:w\n",
            b"PONG\n",
        ]
    ]
    assert store.calls == calls + 1
    assert session.shared.counters.verbs["ping"] == 6
    # longer than a reply chunk (a read of a client library's pipeline): still one call
    items = [x for n in range(300) for x in (b"PUT:p%d:v" % n, b"PING")]
    assert served(session, items) == (b"PONG\n" * 300, 0)
    assert store.calls == calls + 2
    store.apply_plain = lambda ops: (_ for _ in ()).throw(UNAVAILABLE)  # the store is down
    assert run(session, b"GET:k2\nPING\nPUT:k2:x\nPING\n") == [
        [b"ERR store unavailable\n", b"PONG\n", b"ERR store unavailable\n", b"PONG\n"]
    ]


def test_a_long_run_of_gets_is_fetched_a_group_at_a_time_each_queued_before_the_next():
    """From a store kept elsewhere, a run of more than ROUND_TRIP_GETS GETs (PINGs among them
    or not) is fetched a group at a time: a group's values are all in memory until their
    replies are queued, and the next group is fetched only once they are (the client's
    queue then has room: one that does not read holds back its own fetches)."""
    from kvgevent.config import ROUND_TRIP_GETS

    store = Fetching(True)
    session = session_for(store)
    run(session, b"PUT:k1:v\n")
    for ping in (b"", b"PING\n"):
        calls = store.calls
        count = 2 * ROUND_TRIP_GETS + 5
        items = ((b"GET:k1\n" + ping) * count).split(b"\n")[:-1]
        actions = session.handle(items)
        first = list(next(actions))  # (the session reuses its list once it is queued)
        assert store.calls == calls + 1  # the first group only, until its replies are queued
        assert first == [b"k1:v\n", *([b"PONG\n"] if ping else [])] * ROUND_TRIP_GETS
        rest = [line for action in actions for line in action]
        assert store.calls == calls + 3
        assert first + rest == [b"k1:v\n", *([b"PONG\n"] if ping else [])] * count


def test_a_failed_round_trip_leaves_no_cycle_that_holds_the_batch():
    """A store kept elsewhere that fails as a whole, PINGs among the commands: each ERR line
    comes from a fresh error, not the raised one, whose traceback would hold the batch's
    frames and lines (an AUTH password, a 1 MB PUT) until the cyclic GC runs."""
    import gc

    store = Fetching(True)

    def down(ops):
        raise StoreError("store unavailable")

    store.apply_plain = down
    session = session_for(store)
    for ping in (b"", b"PING\n"):
        batch = b"GET:a\n" + ping + b"PUT:b:" + b"x" * 1000 + b"\n" + ping
        gc.collect()
        gc.disable()
        try:
            run(session, batch)
            assert gc.collect() == 0, ping
        finally:
            gc.enable()


def test_over_max_memory_with_the_store_down_both_paths_give_the_same_errors():
    """Over --max-memory, a run's writes are held back (then refused) while what comes before
    them goes to the store; with the store down, those get its error and the writes
    ``ERR out of memory``, on the general path as on the plain one (the general path used to
    answer the held-back writes with the store's error too)."""
    from kvgevent.config import CONNECTION_COST

    outcomes = []
    for plain in (True, False):
        store = Fetching(plain)

        def down(*args):
            raise StoreError("store unavailable")

        store.apply_plain = down if plain else None
        store.apply_some = down
        session = session_for(store)
        session.shared.guard.limit = CONNECTION_COST + 1  # (its base: 0 until calibrated)
        session.shared.guard.buffered = 10_000  # over the limit
        assert session.shared.guard.over()
        outcomes.append(
            (served(session, [b"GET:a", b"DELETE:b", b"PUT:c:v", b"PING"]), session.shared.counters.errors_by)
        )
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == (b"ERR store unavailable\n" * 2 + b"ERR out of memory\n" + b"PONG\n", 0)


def test_a_store_that_fails_as_a_whole_answers_each_plain_line_with_its_error():
    store = Fetching(True)

    def down(ops):
        raise UNAVAILABLE

    store.apply_plain = down
    session = session_for(store)
    assert run(session, b"GET:a\nPUT:b:v\nPING\n") == [[b"ERR store unavailable\n"] * 2 + [b"PONG\n"]]
    assert session.shared.counters.errors_by == {"store unavailable": 2}
    assert session.shared.store.applied == {"put": 1, "get": 1, "update": 0, "delete": 0}


def test_a_batch_that_crosses_max_memory_is_judged_once_as_the_general_path_judges_it():
    """The memory limit is looked at once a batch on both paths: a PUT that takes the store
    over it does not make a later PUT of the same batch refused on one path only."""
    from kvgevent.config import CONNECTION_COST

    items = [b"PUT:a:" + b"x" * 2000, b"GET:b", b"PUT:b:y"]
    outcomes = []
    for store in (MemoryStore(), General()):
        session = session_for(store)
        session.shared.guard.limit = CONNECTION_COST + 1000  # (its base: 0 until calibrated)
        assert not session.shared.guard.over()
        outcomes.append((served(session, items), sorted(store.data)))
    assert outcomes[0] == outcomes[1] == ((b"", 0), [b"a", b"b"])


@pytest.mark.parametrize(
    "batch",
    [
        [b"GET:k", b"PUT:k:w", b"DELETE:k", b"GET:k", b"Put:j:v"],
        [b"GET:k", b"DELETE:k", b"GET:k"],
    ],
)
def test_over_max_memory_plain_lines_count_as_the_general_path_counts(batch):
    """Over the limit, a store kept elsewhere takes the plain lines before the first PUT (a
    DELETE is allowed over the limit); the PUT and what follows go to the general path, which
    refuses the PUT. Replies, data and the counts per verb are the general path's."""
    outcomes = []
    for plain in (True, False):
        session = session_for(Fetching(plain))
        served(session, [b"PUT:k:v"])
        session.shared.guard.limit = 1  # everything is over it
        session.work = 0
        replies = served(session, batch)
        outcomes.append((replies, dict(session.shared.store.applied), session.shared.store.data))
    assert outcomes[0] == outcomes[1]


def test_a_plain_batch_that_ends_with_the_turns_work_is_not_followed_by_a_wait(monkeypatch):
    """The turn ends with the batch that did its work: a batch served whole by the plain path
    returns its replies, with no NEXT_TURN after them (nothing is left to wait for)."""
    import kvgevent.server.session as module

    session = session_for()
    run(session, b"PUT:j:1\nPUT:j:2\nPUT:j:3\n")
    monkeypatch.setattr(module, "TURN_WORK", 3)
    session.work = 0
    assert run(session, b"GET:j\n") == [[b"j:1\n", b"j:2\n", b"j:3\n"]]


def test_the_get_loop_ends_the_turn_after_the_get_that_did_its_work(monkeypatch):
    """The lock-free GET loop counts a unit per value copied (a GET of one value or none is
    counted from the totals): a GET of several values that takes the turn's work to the
    budget ends the turn after its reply, and the work after a batch is what it copied."""
    import kvgevent.server.session as module

    session = session_for()
    run(session, b"PUT:j:1\nPUT:j:2\nPUT:j:3\nPUT:k:1\n")
    session.work = 0
    run(session, b"GET:k\nGET:none\nGET:j\nGET:k\n")
    assert session.work == 5  # 1 + 0 + 3 + 1
    monkeypatch.setattr(module, "TURN_WORK", 4)
    session.work = 0
    assert run(session, b"GET:k\nGET:none\nGET:j\nGET:k\n") == [
        [b"k:1\n", b"j:1\n", b"j:2\n", b"j:3\n"],
        NEXT_TURN,
        [b"k:1\n"],
    ]


def test_no_request_line_outlives_its_batch():
    """A quiet client holds its incomplete line only (counted by --max-memory): once a batch
    is done the session keeps none of its lines (not a 1 MB PUT's, not an AUTH's password),
    whichever path served it."""
    for store in (MemoryStore(), General()):
        for password in (None, b"a-long-password"):
            session = session_for(store, password=password)
            big = b"PUT:k:" + b"x" * (1 << 20)
            for batch in ([b"AUTH:a-long-password"], [big], [b"PUT:k:" + b"y" * 10, b"PING"]):
                run(session, b"\n".join(batch) + b"\n")
                held = [getattr(session, name, None) for name in Session.__slots__]
                assert not any(isinstance(value, bytes) and len(value) > 8 for value in held), batch


def test_a_batch_of_gets_alone_takes_one_get_plain_call_and_its_errors_are_fresh():
    """A batch of GETs only, from a store kept elsewhere with ``get_plain``: one call, the
    usual replies (nothing for a key without values, empty list or None); a store down as a
    whole answers each GET with its ERR line, from a fresh error (the raised one's traceback
    would hold the batch until the cyclic GC runs)."""
    import gc

    store = FetchingGets()
    session = session_for(store)
    run(session, b"PUT:k1:v\nPUT:k2:a\nPUT:k2:b\n")
    calls = store.calls
    assert run(session, b"GET:k1\nGet:none\nget:k2\nGET:k3\n") == [
        [b"k1:v\n", b"k2:a\n", b"k2:b\n", b"ERR store unavailable\n"]
    ]
    assert (store.calls, store.get_calls) == (calls + 1, 1)
    assert store.applied["get"] == 4

    def down(keys):
        raise StoreError("store unavailable")

    store.get_plain = down
    gc.collect()
    gc.disable()
    try:
        assert run(session, b"GET:k1\nGET:k2\n") == [[b"ERR store unavailable\n"] * 2]
        assert gc.collect() == 0
    finally:
        gc.enable()
    assert session.shared.counters.errors_by == {"store unavailable": 3}


@pytest.mark.parametrize(
    "items, keys",
    [
        ([b"GET:a", b"GET:bb"], [b"a", b"bb"]),
        ([b"Get:a", b"Get:bb", b"Get:c"], [b"a", b"bb", b"c"]),  # (the original's clients)
        ([b"get:a"], [b"a"]),
        ([b"Get:a", b"GET:b", b"get:c"], [b"a", b"b", b"c"]),  # spellings mixed: line by line
        ([b"Get:a", b"Get:b:c"], None),  # ':' in a key
        ([b"Get:a", b"Get:"], None),  # an empty key
        ([b"Get:a", b"Put:b:c"], None),  # not a GET
        ([b"Get:a", b"xGet:b"], None),
        ([b"GET:a\nGET:b"], None),  # (one line: a key may not hold a newline)
        ([b"Get:a", Dropped], None),  # (a marker: a line too long)
        ([b"GeT:a"], None),  # (a spelling the general path folds)
    ],
)
def test_the_keys_of_a_batch_of_gets_are_split_as_the_line_by_line_rules_say(items, keys):
    """The GETs-only fast path (one join and one split for a batch in one spelling) gives
    exactly the keys of the line-by-line rules, and None where they refuse a line."""
    from kvgevent.server.session import _get_keys, _spelled_get_keys

    assert _get_keys(items) == keys
    assert _spelled_get_keys(items) == keys


class FirstBytesStore(MemoryStore):
    """A store kept "elsewhere" (no serve_plain, no lookup) whose GETs give a Cut for a key
    named ``big*`` (as the Redis store does for a reply longer than its first fetch), and
    whose ``fetch_whole`` gives the whole of the first key and, for the others, their first
    fetch again: a Cut, or a reply marked ``again`` (so a test can tell what was fetched
    again); every call recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.serve_plain = None  # type: ignore[assignment]
        self.lookup = None  # type: ignore[assignment]
        self.calls: list[tuple[str, list[bytes]]] = []
        self.apply_plain = self._apply_plain  # type: ignore[method-assign]
        self.get_plain = self._get_plain  # type: ignore[method-assign]
        self.fetch_whole = self._fetch_whole  # type: ignore[method-assign]

    def _lines(self, key: bytes, whole: bool = False) -> Any:
        from kvgevent.stores.base import Cut

        if key == b"bigsmall":  # ten lines of 46 bytes, then bytes that are not a line
            lines = b"".join(b"bigsmall:%036d\n" % n for n in range(10)) + b"tail"
            return lines if whole else Cut(lines[:100])
        if key.startswith(b"big"):
            lines = b"".join(b"%s:%d%s\n" % (key, n, b"v" * 70_000) for n in range(2))
            return lines if whole else Cut(lines[:65536])
        return b"%s:first\n" % key

    def _get_plain(self, keys: list[bytes]) -> list[Any]:
        self.calls.append(("get_plain", keys))
        return [self._lines(key) for key in keys]

    def _apply_plain(self, ops: list[Any]) -> list[Any]:
        from kvgevent.stores.redis_store import _get_result

        self.calls.append(("apply_plain", [op[0] for op in ops]))
        return [_get_result(op[0], self._lines(op[0])) if len(op) == 1 else None for op in ops]

    def _fetch_whole(self, keys: list[bytes]) -> list[Any]:
        self.calls.append(("fetch_whole", keys))
        again = [self._lines(key) if key.startswith(b"big") else b"%s:again\n" % key for key in keys[1:]]
        return [self._lines(keys[0], whole=True), *again]


@pytest.mark.parametrize(
    "batch",
    [
        b"GET:a\nGET:big1\nGET:b\nGET:big2\nGET:c\n",
        b"GET:a\nPING\nGET:big1\nPING\nGET:b\nGET:big2\nPING\nGET:c\n",
    ],
    ids=["gets", "gets and pings"],
)
def test_a_cut_reply_is_fetched_whole_with_the_gets_after_it_or_dropped_unfetched(batch):
    """A store that fetched the first bytes of a long reply (a Cut): for a client with room
    (an empty queue), the session asks ``fetch_whole`` for it and every GET after it that was
    not cut (so replies stay in the order of the GETs: those after it are the ones fetched
    again, never the first fetch's), in the batch's order, PONGs where they were; for a
    client that does not read (Room answered False), nothing is fetched again, each Cut is
    Dropped as the lines of its first bytes, and the other replies are the first fetch's.
    Byte for byte, no socket."""
    big1 = b"".join(b"big1:%d%s\n" % (n, b"v" * 70_000) for n in range(2))
    big2 = b"".join(b"big2:%d%s\n" % (n, b"v" * 70_000) for n in range(2))
    pong = b"PONG\n" if b"PING" in batch else b""
    store = FirstBytesStore()
    replies, _ = served(session_for(store), batch.split(b"\n")[:-1])
    assert replies == b"a:first\n" + pong + big1 + pong + b"b:again\n" + big2 + pong + b"c:again\n"
    fetched = [keys for name, keys in store.calls if name == "fetch_whole"]
    # (the cut one whole, and the GETs after it that were not cut: a cut one is fetched whole
    # later, or dropped unseen, so it needs no fetch now)
    assert fetched == [[b"big1", b"b", b"c"], [b"big2", b"c"]]
    store = FirstBytesStore()
    actions = run(session_for(store), batch, {"room": [False] * 8})
    assert [a.lines for a in actions if isinstance(a, Dropped)] == [1, 1]  # (no newline in 64 KiB)
    lines = b"".join(b"".join(a) for a in actions if isinstance(a, list))
    assert lines == b"a:first\n" + pong + pong + b"b:first\n" + pong + b"c:first\n"
    assert [name for name, _ in store.calls] == ["get_plain" if not pong else "apply_plain"]


def test_a_reply_fetched_whole_is_sent_in_slices_of_its_lines():
    """A reply a store kept elsewhere fetched whole is sent as slices of its lines, not split
    into values: each Chunk ends a line and holds at most the session's chunk lines and bytes
    (a longer line alone), together exactly its lines (what follows the last newline is not a
    line: left out), its lines counted; once Room is refused the rest is Dropped, unbuilt,
    counted by its lines. Byte for byte, no socket."""
    lines = b"".join(b"bigsmall:%036d\n" % n for n in range(10))
    actions = run(session_for(FirstBytesStore(), chunk=(3, 100)), b"GET:bigsmall\nGET:big1\n")
    chunks = [a for a in actions if isinstance(a, Chunk)]
    assert [c.lines for c in chunks[:5]] == [2] * 5 and all(len(c.data) == 92 for c in chunks[:5])
    assert b"".join(c.data for c in chunks[:5]) == lines
    big1 = b"".join(b"big1:%d%s\n" % (n, b"v" * 70_000) for n in range(2))
    assert [c.data for c in chunks[5:]] == big1.splitlines(keepends=True)  # (a line each)
    # the client stops reading after two chunks: the rest dropped, by its lines, unbuilt
    actions = run(
        session_for(FirstBytesStore(), chunk=(3, 100)), b"GET:bigsmall\n", {"room": [True] * 3 + [False]}
    )
    assert [a.lines for a in actions if isinstance(a, Chunk)] == [2, 2]
    assert [a.lines for a in actions if isinstance(a, Dropped)] == [6]
