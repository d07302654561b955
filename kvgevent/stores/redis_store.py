"""RedisStore: the store interface over Redis or Redis Cluster, shared by many kvgevent
processes.

Each kvgevent key is a Redis string named ``<prefix><key>`` that holds its reply lines,
the bytes a GET of it answers (``<key>:<value>\n`` for each value, in order): PUT is APPEND
of one line, GET is GET (its reply goes to the client as it is: no list or line per value
in the worker, bench/OPTIMISATIONS.md, "the lines layout"; on the plain path GETRANGE of
its first FIRST_FETCH_BYTES, the whole fetched only for a client that takes it), DELETE is
DEL, and UPDATE is a Lua script (append ``new``'s line, remove the first line of ``old``
before it), atomic on the Redis side, so workers updating one key never lose or duplicate
a value. A key's values live in one string, hence in one cluster slot. kvgevent's own
bookkeeping lives under ``<prefix>_meta:``, which no client key can reach (client keys never
contain ':'). Keys that an older kvgevent kept as Redis lists (one value an item) are
converted at start (:meth:`RedisStore.convert_lists`).

Batches are not sent one round trip each: every batch queued while a round trip is in flight
goes out together in the next one (:mod:`kvgevent.stores.resp`), so a worker serves many requests per
Redis round trip; the store's semaphore is not held around network calls (Redis itself makes
each command, and the UPDATE script, atomic). Redis Cluster goes through redis-py's cluster
pipeline, one per batch. Calls are cooperative because the process is
monkey-patched (``run_server.py`` patches before anything else).

When Redis cannot be reached or does not answer within ``timeout``, commands fail with
``ERR store unavailable``; the outage and the recovery are logged once each.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar, cast
from urllib.parse import urlparse

import gevent
from gevent.event import AsyncResult
from gevent.lock import Semaphore

from kvgevent.config import DEFAULT_PREFIX, DEFAULT_REDIS_TIMEOUT
from kvgevent.errors import KVError, StoreError
from kvgevent.logs import Logger, get_logger, redacted_url
from kvgevent.protocol import COLON, Delete, Get, Put, Update, line_values, value_line
from kvgevent.stores.base import (
    STORE_WAIT,
    VERBS,
    Cut,
    DataCommand,
    Key,
    KVStore,
    Lines,
    PlainOp,
    PlainResult,
    key_bytes,
)
from kvgevent.stores.redis_health import ERR_UNAVAILABLE, NO_SCRIPT, READ_ONLY, RedisHealth, not_now
from kvgevent.stores.resp import (
    APPEND_HEAD,
    CRLF,
    DEL_HEAD,
    GET_HEAD,
    GETRANGE_HEAD,
    HEADS,
    VALUE_HEAD,
    VALUE_HEADS,
    Dispatcher,
    Lost,
    ReplyMismatch,
    RespConnection,
    append_line,
    delete,
    get,
    pack,
    range_tail,
)

_T = TypeVar("_T")

REDIS_PY_CONNECTIONS = 8
"""redis-py's data calls in flight at once to each Redis (each node of a cluster) where it
carries the data (a cluster, ``rediss://``), so its connections to it: a call uses one per node
it reaches, and waits for a free one of each (taken in the nodes' order: no two calls each
hold what the other waits for), --redis-timeout at most (then ``ERR store unavailable``, as
from a Redis that does not answer). (While redis-py reads a cluster's map again its old pools
keep their connections until collected: 15 to a node seen once.) Each connection is a file
beyond --max-clients, kept open:
unbounded, 300 clients at once held 148 open to a three-node cluster (256 at most over
``rediss://``), past FD_RESERVE's files at the open-files limit. Per node: with one bound for
all, a node stopped (SIGSTOP) took every call's turn, and clients of the others waited 2 s and
got errors. (Not redis-py's blocking pool: a cluster pipeline takes its nodes' connections one
after another, and 200 clients holding one node's while waiting for another's stalled them all
until the timeout.)"""

CLUSTER_BOOKKEEPING_CALLS = 3
"""Over a cluster, the bookkeeping calls in flight at once (the client report, the key count,
the cluster figures: one of each kind at a time, see RedisStore._shared), beside the data's
REDIS_PY_CONNECTIONS per node; a key count scans every node."""

REDIS_PY_POOL = 2 * REDIS_PY_CONNECTIONS
"""redis-py's pool per Redis there: room beyond REDIS_PY_CONNECTIONS and the bookkeeping's for
a call made outside them (none is known), so that one is not refused ("Too many
connections")."""

BOOKKEEPING_CONNECTIONS = 8
"""redis-py's connections per process over ``redis://``, where it carries only the bookkeeping
(the client report, the key count, the cluster figures, a conversion: one call of each kind
at a time, see RedisStore._shared). Its pool never closes one, and each is a file beyond
--max-clients: 300 STATS at once left 178 open for good (an attacker's pass), and at the
open-files limit the server could neither reach Redis nor accept clients."""

COUNT_KEYS_EVERY = 5.0
"""Seconds the ``keys`` figure of STATS is reused when counting took long (it scans every key)."""

COUNT_KEYS_MIN = 1.0
"""Seconds the ``keys`` figure is reused even when counting was quick: a client sending STATS
in a loop does not make every one of them scan the keyspace."""

WORKER_TTL = 5.0
"""Seconds after which a worker that stopped reporting no longer counts in cluster totals."""

WORKER_FORGET = 300.0
"""Seconds after which such a worker's entry is deleted from the table (by whoever reads the
totals next): one killed, or whose last report was lost, would otherwise stay for ever, and
every restart under ``--workers`` adds one (a new pid). Long beyond WORKER_TTL: a worker that
was only stopped (SIGSTOP) a while reports again, and puts its entry back."""

# Atomic p0 UPDATE: remove the first `old` (if any), append `new` (an absent key becomes [new]),
# on the key's reply lines; ARGV are the two lines (`key:old\n`, `key:new\n`). Run with no key
# it does nothing: _RELOAD puts it back in Redis's cache for a user allowed SCRIPT LOAD or one
# allowed EVAL (two permissions: either may be refused).
UPDATE_SCRIPT = (
    "if #KEYS == 0 then return 0 end "
    "local n = redis.call('APPEND', KEYS[1], ARGV[2]) "
    "local s = redis.call('GET', KEYS[1]) "
    "local at = string.find('\\n' .. string.sub(s, 1, n - #ARGV[2]), '\\n' .. ARGV[1], 1, true) "
    "if at then "
    "redis.call('SET', KEYS[1], string.sub(s, 1, at - 1) .. string.sub(s, at + #ARGV[1]), 'KEEPTTL') end "
    "return n"
)
"""UPDATE as one script (atomic: two workers' UPDATEs of a key never interleave): append
``new``'s line, then remove the first line of ``old`` among those before it (a line begins
the string or follows a newline: a value never holds one). The APPEND comes first so that
it is the script's first write: Redis refuses a script's first write that would grow
memory past ``maxmemory`` (OOM), not a later one. Returns an integer (only its type is
checked)."""

CONVERT_SCRIPT = (
    "if redis.call('TYPE', KEYS[1])['ok'] ~= 'list' then return -1 end "
    "local values = redis.call('LRANGE', KEYS[1], 0, -1) "
    "for i = 1, #values do values[i] = ARGV[1] .. values[i] .. '\\n' end "
    "local ttl = redis.call('PTTL', KEYS[1]) "
    "redis.call('DEL', KEYS[1]) "
    "redis.call('SET', KEYS[1], table.concat(values)) "
    "if ttl > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end "
    "return #values"
)
"""A key of the list layout (kvgevent before the lines layout: one value an item) made the
string of its reply lines, ``ARGV[1]`` (``<key>:``) before each value; a key that is not a
list is left alone (-1). Atomic: two workers converting at once convert it once."""

LAYOUT = b"lines"
"""The value of ``<prefix>_meta:layout`` once every key under the prefix is in the lines
layout (set by :meth:`RedisStore.convert_lists`, read by the next to start)."""

CONVERT_BATCH = 500
"""Keys converted a round trip (each one script run, atomic by itself)."""

CONVERT_TIMEOUT = 60.0
"""Seconds a call of the list layout's conversion may wait for Redis (if --redis-timeout is
less): a SCAN step, or a batch of scripts, one of which may convert a list of millions of
values (seconds of Redis's time)."""

CONVERT_RETRY = 60.0
"""Seconds before the conversion is tried again after Redis refused it (an error reply: a user
who may not write or run scripts): each try scans the whole keyspace."""
_SCRIPT = UPDATE_SCRIPT.encode()
_SCRIPT_SHA = hashlib.sha1(_SCRIPT).hexdigest().encode()
_RELOAD = pack((b"SCRIPT", b"LOAD", _SCRIPT)) + pack((b"EVAL", _SCRIPT, b"0"))
_RELOAD_REPLIES: list[type] = [bytes, int]

TABLE_PREFIX_MAX = 64
"""Longest key prefix put in the head tables of the plain path (each holds it 256 times: a
longer, unusual, prefix is encoded per command instead of taking megabytes per worker)."""

PIPELINE_NOTE = ("Command # ", " of pipeline caused error: ")
"""How redis-py begins the message of an error inside a pipeline, and what comes before the
error's own text: ``Command # 1 (HSET key field value) of pipeline caused error: BUSY ...``."""

QUOTED_ARGUMENTS = ", with args beginning with:"
"""Where Redis starts quoting a command's arguments in an error reply (``ERR unknown command
'EVALSHA', with args beginning with: 'sha' '1' 'key' 'value'...``: a renamed command)."""

PING_AFTER_TIMEOUT = 0.5
"""Seconds a PING through the data connections may take after a bookkeeping call timed out:
Redis answers one at once unless it is stalled (writes paused, CLIENT PAUSE WRITE, still
answer it), and a stall should not be waited for twice."""

RECOVERY_SETTLE = 0.5
"""Seconds beyond the store's timeout a node in an outage must answer, with no command
failing, for the outage to be over (``store_recovered``): a write sent as its writes were
paused (CLIENT PAUSE WRITE) fails one timeout after the reads are answered again, and should
not begin a new outage; the half second is for a busy worker's lateness."""

DISPATCH_CONNECTIONS = 5
"""Round trips in flight at once from one process (each carries the batches queued meanwhile,
up to resp.MAX_ROUND_TRIP commands). 2, 4 and 8 measured the same at 50 clients x 16 GETs
(bench/OPTIMISATIONS.md, "smaller round trips"); fewer leave more of a Redis's ``maxclients``.
One more than the 4 that serve writes: round trips holding writes take all connections but
one, kept for reads while Redis holds writes (resp.Dispatcher); with 4 in all, 1,000 clients
writing lost 8 %."""


FIRST_FETCH_BYTES = 256 * 1024
"""Bytes of a key's reply lines the plain path asks Redis for at first (``GETRANGE key 0
262143``), where no write of the batch comes after the GET: a reply that long is a
:class:`~kvgevent.stores.base.Cut`, fetched whole (:meth:`RedisStore._fetch_whole`) only when
its client has taken in what was queued before it. Asked whole at once, ten clients that never
read, each pipelining 30 GETs of a key of 8 MB, made Redis build 2.4 GB of replies in one go: a
PING waited 8 s behind 512 such GETs, other clients' commands past --redis-timeout (an
attacker's pass). A round trip of MAX_ROUND_TRIP first fetches asks for 32 MB at most. At
64 KiB, a reader pipelining GETs of 70 kB replies made a round trip per GET and Redis send
twice their bytes (another pass); replies up to this size come whole the first time."""

BIG_FETCHES = 2
"""Replies longer than FIRST_FETCH_BYTES one process asks Redis for at once: each is fetched in
a round trip of its own (with the first bytes of the GETs after it in its batch); others wait
their turn, so Redis builds at most this many big replies at a time, while the small commands
of other clients go on beside them."""

LINE_END = b"\n" + CRLF
"""The end of an APPEND's line and of the command."""

_INTS = frozenset((int,))
"""A write's reply that is not an error reply."""


class RedisStore(KVStore):
    """``url``: ``redis://[user:password@]host:port/db`` (``?db=N`` too), ``rediss://...`` (TLS),
    or ``redis+cluster://host:port`` (any node). Both of its clients (the dispatcher for data,
    redis-py for the rest) read the URL the same way: redis-py's ``parse_url``, so a
    percent-encoded password and ``?db=`` mean the same to both."""

    shared = True  # other processes see the same data: the server reports its counts here
    waits_elsewhere = True  # its calls add their time to STORE_WAIT

    def __init__(
        self,
        url: str,
        prefix: str = DEFAULT_PREFIX,
        timeout: float = DEFAULT_REDIS_TIMEOUT,
        log: Logger | None = None,
    ) -> None:
        super().__init__()
        import hiredis
        import redis

        self._unreachable: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.BusyLoadingError,
            redis.exceptions.MasterDownError,
            redis.exceptions.SlotNotCoveredError,
            redis.exceptions.RedisClusterException,
            hiredis.ProtocolError,
            OSError,  # ConnectionError and socket.timeout (TimeoutError) among them
        )
        # (redis-py drops the code word of the error replies it has a class for: put back by
        # _text, from the error's status_code, or by class before redis-py 5.1)
        self._code_words: dict[type[BaseException], str] = {
            redis.exceptions.ReadOnlyError: READ_ONLY,
            redis.exceptions.OutOfMemoryError: "OOM",
            redis.exceptions.NoScriptError: "NOSCRIPT",
        }
        self._timeouts = (redis.exceptions.TimeoutError, TimeoutError)
        self._redis_errors = (
            *self._unreachable,
            redis.exceptions.RedisError,
            hiredis.HiredisError,
            ReplyMismatch,
        )
        self.url = url
        self.prefix = prefix.encode()
        self.log = log if log is not None else get_logger()
        settle = timeout + RECOVERY_SETTLE  # (also how long a try of a node in an outage may take)
        self.health = RedisHealth(self.log, settle=settle, try_limit=settle)
        self.node = redacted_url(url)  # the node's name in logs (a cluster names each of its nodes)
        scheme = urlparse(url).scheme
        self.cluster = scheme == "redis+cluster"
        self.health.aside = self.node if self.cluster else None  # (the bookkeeping's, not a node)
        self._dispatcher: Dispatcher | None = None  # the fast data path (plain redis:// only)
        self._closed = False  # close() was called: failures after it begin no outage
        if scheme not in ("redis", "rediss", "redis+cluster"):
            raise ValueError(
                f"not a Redis URL: {redacted_url(url)!r} (redis://host:port/db, rediss://... or redis+cluster://host:port)"
            )
        self.client: Any = _redis_py_client(url, timeout)
        # redis-py's calls in flight where it carries the data (REDIS_PY_CONNECTIONS)
        self._redis_py_calls: dict[str, Semaphore] | None = None if scheme == "redis" else {}
        self._timeout = timeout
        self._flights: dict[str, AsyncResult] = {}  # what -> the bookkeeping call under way
        if scheme == "redis":
            self._dispatcher = _dispatcher(url, timeout, self.log, self.node)
            self.apply_plain = self._apply_plain
            self.get_plain = self._get_plain
            self.fetch_whole = self._fetch_whole
            # each command's head with the prefix in it, by the key's length (see _encoded)
            self._get_heads = _heads(GET_HEAD, self.prefix)
            self._get_gaps = [CRLF + head for head in self._get_heads]  # (key to key)
            self._append_heads = _heads(APPEND_HEAD, self.prefix)
            self._del_heads = _heads(DEL_HEAD, self.prefix)
            self._first_heads = _heads(GETRANGE_HEAD, self.prefix)  # (see FIRST_FETCH_BYTES)
            self._first_tail = range_tail(FIRST_FETCH_BYTES)
            self._first_gaps = [self._first_tail + head for head in self._first_heads]
            self._first_bytes = FIRST_FETCH_BYTES  # a reply this long may be cut short
            self._big_fetches = Semaphore(BIG_FETCHES)
        self._meta = self.prefix + b"_meta:"
        self._keys = (0.0, 0)  # (reuse until, count)
        self._bookkeeping_failing: dict[str, float] = {}  # what -> since when it fails
        self.layout_pending = True  # keys of the list layout may be left (see convert_lists)
        self._convert_after = 0.0  # (monotonic) no try before then: see convert_lists
        self._conversion: tuple[float, int] | None = None  # (began, keys converted) once needed
        self._convert_timeout = max(timeout, CONVERT_TIMEOUT)
        self._convert_at_start()

    def _convert_at_start(self) -> None:
        """:meth:`convert_lists` before the server listens. Redis away: the client report
        tries again within a second of its coming back; refused, or failed on the way (the
        server then listens with lists left): said now, ``store_bookkeeping_failed`` (the
        client report tries again, at once or CONVERT_RETRY seconds later if refused). Then
        redis-py's connection is closed: the data path has its own, and the first report
        makes it again."""
        try:
            self.convert_lists()
        except self._redis_errors as exc:
            if self._convert_after or self._conversion is not None:  # (not only unreachable)
                self._bookkeeping_failing["layout conversion"] = self.health.clock()
                error = self._text(exc)[:200]
                self.log.warning(
                    "store_bookkeeping_failed", node=self.node, what="layout conversion", error=error
                )
        if self._dispatcher is not None:
            self.client.connection_pool.disconnect()

    # --- the store interface ---------------------------------------------------------------

    def apply(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        if self._dispatcher is None:
            return self._apply_redis_py(commands)
        prefix = self.prefix
        encoded: list[bytes] = []
        expected: list[type] = []
        encode, expect = encoded.append, expected.append
        gets = 0  # (counted after the loop: the usual command is a GET)
        for cmd in commands:
            kind, key = cmd.__class__, prefix + cmd[0]
            if kind is Get:
                encode(get(key))
                expect(bytes)
                gets += 1
                continue
            self.applied[VERBS[kind]] += 1
            if kind is Put:
                encode(append_line(key, cmd[0], cmd[1]))  # type: ignore[misc]  # (kind narrows cmd; mypy does not follow __class__)
            elif kind is Update:  # loaded on every connection (see _dispatcher); else _scripts_again
                encode(pack((b"EVALSHA", _SCRIPT_SHA, b"1", key, *_update_lines(cmd))))
            elif kind is Delete:
                encode(delete(key))
            else:
                raise TypeError(f"not a data command: {cmd!r}")
            expect(int)
        self.applied["get"] += gets
        payload = encoded[0] if len(encoded) == 1 else b"".join(encoded)
        asked = self.health.clock()
        # (writes: a round trip of reads only passes paused writes)
        replies = self._round_trip(payload, expected, gets < len(commands))
        if replies.__class__ is not list:  # an error reply, maybe (rare: see resp.Mixed)
            self._scripts_again(commands, replies)
        return self._results(commands, replies, asked)

    def _scripts_again(self, commands: Sequence[DataCommand], replies: list[Any]) -> None:
        """After a NOSCRIPT (Redis's script cache flushed, or evicted; or this user may not
        SCRIPT LOAD): put the script back (_RELOAD), and send the UPDATEs refused again
        (EVALSHA, after it), unless a write (of any key) ran after them in the batch; with
        them, the GETs of their keys that came after them (they ran before the UPDATE did).
        Their replies replace those in ``replies``. If this second round trip fails too, the
        first replies stay: ``ERR store unavailable`` for each."""
        if not any(map(_no_script, replies)):
            return
        redo = _redone(commands, replies)
        pieces: list[bytes] = [_RELOAD]  # (even with nothing to send again: the next UPDATEs)
        expected = list(_RELOAD_REPLIES)
        for index in redo:
            cmd = commands[index]
            key = self.prefix + cmd[0]
            if cmd.__class__ is Get:
                pieces.append(get(key))
                expected.append(bytes)
            else:
                pieces.append(pack((b"EVALSHA", _SCRIPT_SHA, b"1", key, *_update_lines(cmd))))
                expected.append(int)
        try:
            again = self._round_trip(b"".join(pieces), expected, True)
        except KVError:
            return
        for index, reply in zip(redo, again[len(_RELOAD_REPLIES) :], strict=True):
            replies[index] = reply

    def _apply_plain(self, ops: list[PlainOp]) -> list[PlainResult]:
        """See :attr:`KVStore.apply_plain`: GET, APPEND or DEL for each, in one round trip
        shared with others, each reply judged as :meth:`apply` judges its command's. The GETs
        after the batch's last write ask for their first bytes only (FIRST_FETCH_BYTES: a
        longer reply is a :class:`~kvgevent.stores.base.Cut`, fetched whole when its client
        has room for it, :meth:`_fetch_whole`); a GET before a write of the batch is asked
        whole (fetched after that write, it could see it)."""
        first = _first_fetched(ops)
        try:
            payload, expected = self._encoded(ops, first)
        except IndexError:  # a key too long for the head tables (rare)
            payload, expected = _encoded_slowly(self.prefix, ops, first, self._first_of)
        asked = self.health.clock()
        # (writes: an APPEND or DEL among them)
        replies = self._round_trip(payload, expected, int in expected)
        if first < len(ops):
            replies = self._marked(replies, first)
        return self._plain_results(ops, replies, asked)

    def _encoded(self, ops: list[PlainOp], first: int) -> tuple[bytes, list[type]]:
        """The commands of :meth:`_apply_plain` (the GETs from ``first`` on by their first
        bytes), and their replies' types, from the head tables with the prefix in them (no
        call, no format per op); IndexError for a key too long for them."""
        get, append, delete = self._get_heads, self._append_heads, self._del_heads
        pieces: list[bytes] = []
        add = pieces.extend
        gets = False
        for op in ops[:first] if first < len(ops) else ops:
            key = op[0]
            if len(op) == 1:
                add((get[len(key)], key, CRLF))
                gets = True
                continue
            value = op[1]
            if value is None:
                add((delete[len(key)], key, CRLF))
            else:  # (APPEND of the line `key:value\n`)
                m = len(key) + len(value) + 2
                head = VALUE_HEADS[m] if m < HEADS else VALUE_HEAD % m
                add((append[len(key)], key, head, key, b":", value, LINE_END))
        if first < len(ops):  # (the GETs after the last write)
            pieces.append(self._first_fetch([op[0] for op in ops[first:]]))
            gets = True
        # (the types afterwards: writes only, the usual run of writes, need no loop)
        expected: list[type] = [bytes if len(op) == 1 else int for op in ops] if gets else [int] * len(ops)
        return b"".join(pieces), expected

    def _get_plain(self, keys: list[bytes]) -> list[Lines]:
        """See :attr:`KVStore.get_plain`: a GET for each, by its first bytes (as
        :meth:`_apply_plain`'s), in one round trip shared with others (as
        :meth:`_apply_plain`, with less to do per key); each key's reply lines as Redis holds
        them."""
        asked = self.health.clock()
        replies = self._round_trip(self._first_fetch(keys), [bytes] * len(keys), False)
        if (
            replies.__class__ is list  # (strings only, of GETRANGE: see resp.Mixed)
            and not self.health.outages
            and max(map(len, replies)) < self._first_bytes
            and b"" not in replies  # (GETRANGE of no key: an empty string)
        ):
            return replies
        return self._judged(keys, self._marked(replies, 0), asked, _lines)

    def _first_fetch(self, keys: list[bytes]) -> bytes:
        """``GETRANGE`` of the first FIRST_FETCH_BYTES of each of ``keys`` (or ``GET``, once
        Redis refused GETRANGE: :meth:`_marked`), encoded."""
        heads, size, tail = self._first_heads, len(keys[0]), self._first_tail
        if size < len(heads) and len(set(map(len, keys))) == 1:
            # (the usual batch, keys of one length: one join, each key's head between two)
            return b"".join((heads[size], self._first_gaps[size].join(keys), tail))
        pieces: list[bytes] = []
        add = pieces.extend
        try:
            for key in keys:
                add((heads[len(key)], key, tail))
        except IndexError:  # a key too long for the table (rare)
            pieces = [self._first_of(self.prefix + key) for key in keys]
        return b"".join(pieces)

    def _first_of(self, key: bytes) -> bytes:
        """:meth:`_first_fetch` of one Redis key, by the general encoder."""
        if self._first_tail == CRLF:
            return get(key)
        return pack((b"GETRANGE", key, b"0", b"%d" % (FIRST_FETCH_BYTES - 1)))

    def _fetch_whole(self, keys: list[bytes]) -> list[Lines]:
        """See :attr:`KVStore.fetch_whole`: the whole reply of ``keys[0]`` and the first
        fetches of the keys after it, in a round trip holding one of BIG_FETCHES (Redis
        builds no more big replies at once; the small commands of others go on beside)."""
        payload = get(self.prefix + keys[0])
        if len(keys) > 1:
            payload += self._first_fetch(keys[1:])
        asked = self.health.clock()
        with self._big_fetches:
            replies = self._round_trip(payload, [bytes] * len(keys), False)
        return self._judged(keys, self._marked(replies, 1), asked, _lines)

    def _marked(self, replies: list[Any], start: int) -> list[Any]:
        """``replies`` with each first fetch from ``start`` on that may be cut short (as long
        as a first fetch asks for) made a :class:`~kvgevent.stores.base.Cut` (a copy; the
        list itself if there is none). An error reply that refuses GETRANGE (an ACL user
        allowed GET only, a renamed command) is a Cut of nothing, and the first fetches are
        whole GETs from then on (logged once: ``store_getrange_refused``)."""
        if replies.__class__ is list and (
            len(replies) <= start or max(map(len, replies[start:])) < self._first_bytes
        ):
            return replies  # (strings only, none that long: the usual batch)
        marked: list[Any] | None = None
        for index in range(start, len(replies)):
            reply = replies[index]
            if reply.__class__ is bytes:
                if len(reply) < self._first_bytes:
                    continue
                cut = Cut(reply)
            elif isinstance(reply, Exception) and "getrange" in str(reply).lower():
                if self._first_bytes < sys.maxsize:
                    self._whole_from_now_on(str(reply))
                cut = Cut(b"")
            else:
                continue
            if marked is None:
                marked = replies.__class__(replies)  # (a Mixed list stays one)
            marked[index] = cut
        return replies if marked is None else marked

    def _whole_from_now_on(self, error: str) -> None:
        """First fetches become whole GETs (Redis refused GETRANGE: ``error``)."""
        self._first_heads, self._first_gaps, self._first_tail = self._get_heads, self._get_gaps, CRLF
        self._first_bytes = sys.maxsize
        self.log.warning("store_getrange_refused", node=self.node, error=error[:200])

    def _plain_results(self, ops: list[PlainOp], replies: list[Any], asked: float) -> list[PlainResult]:
        """Each plain op's result from its reply (types checked by the dispatcher: a string
        or nil for a GET, an int for a write, or an error reply)."""
        if not self.health.outages:  # the usual case: no error reply, no outage to end
            if _INTS.issuperset(map(type, replies)):  # (writes only; checked in C)
                return [None] * len(replies)
            if replies.__class__ is list:  # (no error reply: see resp.Mixed)
                # (a write's int is its None without a call: a GET among writes costs one)
                return [
                    None if reply.__class__ is int else _get_result(op[0], reply)
                    for op, reply in zip(ops, replies, strict=True)
                ]
        return self._judged([op[0] for op in ops], replies, asked, _get_result)

    def _judged(
        self, keys: list[bytes], replies: list[Any], asked: float, result: Callable[[bytes, Any], _T]
    ) -> list[_T | KVError]:
        """Each reply (to a call made at ``asked``) judged for its key: an error reply, its
        KVError; else ``result(key, reply)``, and any outage of the key's node is over."""
        health = self.health
        results: list[_T | KVError] = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):  # an error reply
                results.append(self._failed(key, reply))
                continue
            if health.outages:  # its node answered: any outage of it is over
                health.up(self._node_of(self.prefix + key), asked)
            results.append(result(key, reply))
        return results

    def _apply_redis_py(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        """Through one redis-py pipeline (for a cluster, it routes each command to its slot's
        node; for rediss://, it speaks TLS). With a cluster node in an outage and not due
        for another try, its commands fail at once, unsent."""
        prefix = self.prefix
        pipe = self.client.pipeline(transaction=False)
        sent: list[DataCommand] = []
        skipped: dict[int, KVError] = {}
        for index, cmd in enumerate(commands):
            kind, key = cmd.__class__, prefix + cmd[0]
            self.applied[VERBS[kind]] += 1
            if self.health.outages and self.health.waiting(self._node_of(key)):
                self.health.skipped(self._node_of(key), 1)
                skipped[index] = ERR_UNAVAILABLE
                continue
            if kind is Get:
                pipe.get(key)
            elif kind is Put:
                pipe.append(key, value_line(cmd[0], cmd[1]))  # type: ignore[misc]  # (kind narrows cmd; mypy does not follow __class__)
            elif kind is Update:
                # (execute_command: the cluster pipeline has no eval(), but routes EVAL by its key)
                pipe.execute_command("EVAL", UPDATE_SCRIPT, 1, key, *_update_lines(cmd))
            elif kind is Delete:
                pipe.delete(key)
            else:
                raise TypeError(f"not a data command: {cmd!r}")
            sent.append(cmd)
        replies: list[Any] = []
        asked = self.health.clock()
        if sent:
            execute = self._sent_once if self.cluster else self._pipe_execute
            replies = self._call(execute, pipe, commands=len(sent), keys=sent, per_command=True)
        results = iter(self._results(sent, replies, asked))
        return [skipped[i] if i in skipped else next(results) for i in range(len(commands))]

    def _sent_once(self, pipe: Any) -> list[Any]:
        """Execute a cluster pipeline (redis-py's), each command sent once: a command whose
        connection timed out or failed may have been applied (a PUT is an APPEND), so it
        fails (ERR store unavailable) and is not sent again, where redis-py's own execute
        sends such commands again one by one (a PUT answered OK stood twice after a stalled
        node's timeout). A command redirected (MOVED, ASK: not run by the node asked) is
        sent again through the cluster client, which follows the redirection."""
        import redis

        strategy = getattr(pipe, "_execution_strategy", None)  # (redis-py 7; 5 and 6: the pipe)
        stack = list(strategy.command_queue if strategy is not None else pipe.command_stack)
        try:
            replies = pipe.send_cluster_commands(stack, raise_on_error=False, allow_redirections=False)
        finally:
            pipe.reset()
        redirected = (redis.exceptions.MovedError, redis.exceptions.AskError)
        for index, reply in enumerate(replies):
            if isinstance(reply, redirected):
                command = stack[index]
                try:
                    replies[index] = self.client.execute_command(*command.args, **command.options)
                except redis.exceptions.RedisError as exc:
                    replies[index] = exc
        return list(replies)

    def _pipe_execute(self, pipe: Any) -> list[Any]:
        return list(pipe.execute(raise_on_error=False))

    def _results(
        self, commands: Sequence[DataCommand], replies: list[Any], asked: float
    ) -> list[list[bytes] | KVError | None]:
        """Each command's result from its reply (to a call made at ``asked``, the health's
        clock): a GET's values (an array, checked), None, or the StoreError of an error reply
        (a node that cannot serve now: unavailable)."""
        results: list[list[bytes] | KVError | None] = []
        health = self.health
        for cmd, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                results.append(self._failed(cmd[0], reply))
                continue
            if health.outages:  # its node answered: any outage of it is over
                health.up(self._node_of(self.prefix + cmd[0]), asked)
            if cmd.__class__ is Get:
                if reply is None:
                    results.append(None)
                elif reply.__class__ is not bytes:  # (the redis-py path: the dispatcher checked)
                    results.append(self.health.error_reply(f"GET answered a {type(reply).__name__}"))
                else:
                    results.append(line_values(cmd[0], reply) or None)
            else:
                results.append(None)
        return results

    def _failed(self, key: bytes, reply: Exception) -> KVError:
        """The StoreError of one command's error reply (or connection error)."""
        text = self._text(reply)
        if isinstance(reply, self._unreachable) or not_now(text):
            self.health.down(self._node_of(self.prefix + key), text, 1)
            return ERR_UNAVAILABLE
        return self.health.error_reply(text)

    def put(self, key: Key, value: bytes) -> None:
        self._raise_first(self.apply([Put(key_bytes(key), value)]))

    def get(self, key: Key) -> list[bytes]:
        result = self.apply([Get(key_bytes(key))])[0]
        if isinstance(result, KVError):
            raise result
        return result or []

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        self._raise_first(self.apply([Update(key_bytes(key), old, new)]))

    def delete(self, key: Key) -> None:
        self._raise_first(self.apply([Delete(key_bytes(key))]))

    def count_keys(self) -> int:
        """Keys under the prefix (a SCAN of the keyspace, reused for COUNT_KEYS_EVERY s, but not
        during an outage: STATS and the metrics leave it out then, README "When Redis fails";
        an auditor's pass saw the last figure for up to 5 s into one)."""
        counted_at, count = self._keys
        if time.monotonic() < counted_at and not self.health.outages:
            return count

        def scan() -> int:
            pattern, start = _glob_escape(self.prefix) + b"*", len(self.prefix)
            keys = self.client.scan_iter(match=pattern, count=1000)
            return sum(_client_key(key, start) for key in keys)

        began = time.monotonic()
        count = self._shared("key count", scan)
        took = time.monotonic() - began
        # A slow count (a big keyspace) is reused for a while; a quick one for a second.
        self._keys = (time.monotonic() + (COUNT_KEYS_EVERY if took > 0.05 else COUNT_KEYS_MIN), count)
        return count

    def close(self) -> None:
        """Close the data connections and redis-py's. A call waiting on Redis then (a metrics
        scrape's key count at shutdown) fails at once as a StoreError, and begins no outage:
        redis-py's ``close()`` leaves a pool it was given open, and the scrape waited for the
        whole ``--redis-timeout`` on a stalled Redis."""
        self._closed = True
        if self._dispatcher is not None:
            self._dispatcher.close()
        try:
            _close_redis_py(self.client)
        except Exception:
            pass

    # --- many workers, one store -------------------------------------------------------------

    def report_clients(self, worker: str, active: int, dropped_delta: int, final: bool = False) -> None:
        """Publish this worker's client counts (called every second by the server, and a last
        time, ``final``, when it stops: then it leaves the table). Ends the outages that
        settled meanwhile (RedisHealth.settled). Converts the keys of the list layout first
        if that could not be done at start (:meth:`convert_lists`)."""
        self.health.settled()
        if self.layout_pending and not final and time.monotonic() >= self._convert_after:
            self._bookkeeping("layout conversion", self.convert_lists)

        def report() -> None:
            pipe = self.client.pipeline(transaction=False)
            if final:
                pipe.hdel(self._meta + b"workers", worker)
            else:
                pipe.hset(self._meta + b"workers", worker, f"{active} {time.time():.3f}")
            if dropped_delta:
                pipe.incrby(self._meta + b"dropped", dropped_delta)
            pipe.execute()

        self._bookkeeping("client report", report)

    def convert_lists(self) -> None:
        """Make every key under the prefix that is a Redis list (the layout of kvgevent
        before the lines layout: a value an item) the string of its reply lines, each key at
        once (CONVERT_SCRIPT, atomic), unless ``<prefix>_meta:layout`` says this was done;
        then say so there. Run at start, before the server listens; if Redis could not be
        reached then, by the client report once it can (meanwhile a command of a key still a
        list gets ``ERR store error``, WRONGTYPE). Logs ``store_layout_converted`` when it
        converted any key. Raises what redis-py raises, ReplyMismatch for a peer whose
        replies redis-py cannot read; after an error reply (a user who may not write, or run
        scripts), the report tries again only after CONVERT_RETRY seconds (each try scans
        the keyspace). Its calls wait for Redis up to CONVERT_TIMEOUT seconds (or
        --redis-timeout if more): a list of millions of values takes Redis seconds."""
        import redis

        try:
            self._convert_lists()
        except redis.exceptions.ResponseError as exc:
            # (a refusal; not a node that cannot serve now, CLUSTERDOWN or TRYAGAIN, nor a
            # replica, READONLY in a failover: those are tried again with the next report)
            if not isinstance(exc, (*self._unreachable, redis.exceptions.ReadOnlyError)):
                self._convert_after = time.monotonic() + CONVERT_RETRY
            raise
        except (ValueError, TypeError) as exc:  # (redis-py could not read a reply: not Redis)
            raise ReplyMismatch(f"not a Redis reply: {exc}") from None

    def _convert_lists(self) -> None:
        """:meth:`convert_lists`, its errors as redis-py raises them."""
        import redis

        marker = self._meta + b"layout"
        if self.client.get(marker) == LAYOUT:
            self.layout_pending = False
            return
        if self._conversion is None:
            self._conversion = (time.monotonic(), 0)
        client = _redis_py_client(self.url, self._convert_timeout)
        try:
            batch: list[bytes] = []
            start = len(self.prefix)
            for key in client.scan_iter(match=_glob_escape(self.prefix) + b"*", count=1000, _type="list"):
                if _client_key(key, start):
                    batch.append(key)
                if len(batch) >= CONVERT_BATCH:
                    self._converted(client, batch)
                    batch = []
            self._converted(client, batch)
        finally:
            _close_redis_py(client)
        self.layout_pending = False  # (even if the marker cannot be set: nothing is left)
        began, converted = self._conversion
        if converted:
            took = round(time.monotonic() - began, 3)
            self.log.info("store_layout_converted", node=self.node, keys=converted, seconds=took)
        try:
            self.client.set(marker, LAYOUT)
        except redis.exceptions.ResponseError:  # (a user who may not write: nothing was left
            pass  # to convert, or the scripts would have failed first; the next start scans)

    def _converted(self, client: Any, keys: list[bytes]) -> None:
        """Convert ``keys`` (found to be lists) in one pipeline, counting those that were still
        lists (another worker may have converted some) in ``_conversion``."""
        if not keys:
            return
        pipe = client.pipeline(transaction=False)
        start = len(self.prefix)
        for key in keys:
            pipe.execute_command("EVAL", CONVERT_SCRIPT, 1, key, key[start:] + b":")
        converted = sum(1 for count in pipe.execute() if count >= 0)
        began, before = self._conversion  # type: ignore[misc]  # (set before the first batch)
        self._conversion = (began, before + converted)

    def cluster_stats(self, worker: str, active: int) -> dict[str, int]:
        """Cluster-wide totals: clients connected to live workers (this one's counted now,
        the others' as last reported), clients dropped by any."""

        def read() -> tuple[dict[bytes, bytes], bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self._meta + b"workers")
            pipe.get(self._meta + b"dropped")
            workers, dropped = pipe.execute()
            gone = _long_gone(workers, time.time())
            if gone:
                self.client.hdel(self._meta + b"workers", *gone)
                for name in gone:
                    del workers[name]
            return workers, dropped

        workers, dropped = self._shared("cluster figures", read)
        now, total, live = time.time(), active, 1
        for name, entry in workers.items():
            count, at = _worker_report(entry) or (0, 0.0)  # (unreadable ones were deleted)
            if name != worker.encode() and now - at <= WORKER_TTL:
                total += count
                live += 1
        return {"cluster_active": total, "cluster_dropped": int(dropped or 0), "workers": live}

    # --- outages and errors -----------------------------------------------------------------

    def _node_of(self, key: bytes) -> str:
        """The name of the node serving ``key`` (the URL's, but for a cluster)."""
        if not self.cluster:
            return self.node
        try:
            node = self.client.get_node_from_key(key)
        except Exception:  # no slot map yet: the cluster as a whole
            return self.node
        return str(node.name) if node is not None else self.node

    def _call(
        self,
        function: Any,
        *args: Any,
        commands: int = 1,
        keys: Sequence[Any] = (),
        per_command: bool = False,
        reads_only: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Run a Redis call for ``commands`` commands (on the nodes of ``keys``, data commands;
        the store's own node when none are given). Anything Redis makes it raise becomes a
        StoreError: unreachable, ``ERR store unavailable``; an error reply, its phrase; a
        reply of the wrong type, ``ERR store error`` (never data). Outages and errors are
        logged once per episode. ``per_command``: the caller judges each command's reply
        (and ends outages by them), so a call that returned ends none by itself.
        ``reads_only``: the call writes nothing (in an outage, reads have a try of their own:
        one of writes that Redis holds, CLIENT PAUSE WRITE, must not keep them waiting)."""
        health = self.health
        nodes = self._nodes(keys)  # (once: over a cluster each key's slot is looked up)
        if health.outages:
            if all(health.waiting(node, reads_only) for node in nodes):
                for node in nodes:
                    health.skipped(node, commands)
                raise ERR_UNAVAILABLE.fresh()
            health.trying(nodes, reads_only)  # (ended in the finally below)
        asked = health.clock()
        calls = self._redis_py_calls
        try:
            if calls is None:
                result = function(*args, **kwargs)
            else:
                result = self._call_within(nodes, function, *args, **kwargs)
        except self._redis_errors as exc:
            raise self._failure(exc, nodes, commands, asked).fresh() from None
        finally:
            STORE_WAIT.set(STORE_WAIT.get() + health.clock() - asked)
            if health.outages:  # (if this call was a node's try, its outcome is known now)
                health.tried(nodes, reads_only)
        if health.outages and not per_command:
            for node in nodes:
                health.up(node, asked)
        return result

    def _call_within(self, nodes: set[str], function: Any, *args: Any, **kwargs: Any) -> Any:
        """``function(*args, **kwargs)`` once it holds one of the calls of each of ``nodes``
        (REDIS_PY_CONNECTIONS each; the store's own node, for the cluster's bookkeeping,
        CLUSTER_BOOKKEEPING_CALLS), taken in their order; ``ERR store unavailable`` if they
        are not all free within --redis-timeout (each call under way waits for a Redis that
        does not answer: no outage is begun for that, theirs will be)."""
        deadline = time.monotonic() + self._timeout
        held: list[Semaphore] = []
        try:
            for node in sorted(nodes):
                calls = self._calls_of(node)
                if not calls.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    raise ERR_UNAVAILABLE.fresh()
                held.append(calls)
            return function(*args, **kwargs)
        finally:
            for calls in held:
                calls.release()

    def _calls_of(self, node: str) -> Semaphore:
        every = cast(dict[str, Semaphore], self._redis_py_calls)  # (set where redis-py carries the data)
        calls = every.get(node)
        if calls is None:
            most = CLUSTER_BOOKKEEPING_CALLS if self.cluster and node == self.node else REDIS_PY_CONNECTIONS
            calls = every[node] = Semaphore(most)
        return calls

    def _round_trip(self, payload: bytes, expected: list[type], writes: bool) -> list[Any]:
        """The dispatcher's round trip of ``payload`` (encoded commands, one per item of
        ``expected``; ``writes``: any of them writes), through :meth:`_call` with each
        command's reply judged by the caller (``per_command``). With no outage under way (the
        usual case) the same, without its general arguments: the data path's call for every
        batch, where their binding cost about 0.3 µs (bench/OPTIMISATIONS.md, "the Redis
        path's calls")."""
        health = self.health
        execute = self._dispatcher.execute_encoded  # type: ignore[union-attr]  # (set only with a dispatcher)
        if health.outages:
            count, reads_only = len(expected), not writes
            return self._call(
                execute, payload, expected, writes, commands=count, per_command=True, reads_only=reads_only
            )
        asked = health.clock()
        try:
            return execute(payload, expected, writes)
        except self._redis_errors as exc:
            raise self._failure(exc, {self.node}, len(expected), asked).fresh() from None
        finally:
            STORE_WAIT.set(STORE_WAIT.get() + health.clock() - asked)
            if health.outages:  # (one began meanwhile: as _call ends a try)
                health.tried({self.node}, not writes)

    def _nodes(self, keys: Sequence[Any]) -> set[str]:
        """The nodes of ``keys`` (data commands: the key is their first item), or the
        store's own node when none are given."""
        return {self._node_of(self.prefix + cmd[0]) for cmd in keys} if keys else {self.node}

    def _shared(self, what: str, function: Callable[[], _T]) -> _T:
        """:meth:`_bookkeeping` of ``what``, made once for all who ask while it is under way:
        they get its result, or its StoreError (many STATS at once read Redis once, on one
        connection: each took one of redis-py's, kept open for good). Not during an outage
        of the node: there each call fails at once unless its retry is due (one waiting
        for that retry's answer made the STATS that joined it wait twice --redis-timeout,
        an attacker's pass). Anything else the call raises (the server's stop thrown into
        its caller) is the caller's alone: the others get ``ERR store unavailable``."""
        if self.node in self.health.outages:
            return self._bookkeeping(what, function)
        flight = self._flights.get(what)
        if flight is not None:
            return cast(_T, flight.get())  # (what the call returned)
        flight = self._flights[what] = AsyncResult()
        try:
            result = self._bookkeeping(what, function)
        except KVError as exc:
            flight.set_exception(exc)
            raise
        except BaseException:  # (its caller stopped or killed: not the others' to raise)
            flight.set_exception(ERR_UNAVAILABLE.fresh())
            raise
        finally:
            del self._flights[what]
        flight.set(result)
        return result

    def _bookkeeping(self, what: str, function: Callable[[], _T]) -> _T:
        """``function()``, a bookkeeping call through redis-py (``what``: the client report,
        the key count, the cluster figures). With the dispatcher (``redis://``), its
        connections carry the data and judge the node: a bookkeeping call that fails begins
        no outage while the node answers a PING through them (redis-py's connection refused:
        Redis at its ``maxclients``, a password changed under it; a user who may not write
        the counts; its writes paused, CLIENT PAUSE WRITE). Such failures are one episode per
        ``what``, ``store_bookkeeping_failed`` then ``store_bookkeeping_recovered`` (when that
        call next works); the call raises StoreError. (Before, each began an outage that
        failed the data too, once a second.)"""
        if self._dispatcher is None:  # a cluster: redis-py carries the data too
            return self._call(function)
        if self.node in self.health.outages:
            self._ping_data_path()  # not due: fails at once; answered: the outage ends
        try:
            result = function()
        except self._redis_errors as exc:
            # the node does not serve: its outage begins there. (After a timeout, a PING
            # answered at once says the node serves the data, its writes paused perhaps; a
            # stalled one is not waited for as long again.)
            self._ping_data_path(PING_AFTER_TIMEOUT if isinstance(exc, self._timeouts) else None)
            if what not in self._bookkeeping_failing:
                self._bookkeeping_failing[what] = self.health.clock()
                error = self._text(exc)[:200]
                self.log.warning("store_bookkeeping_failed", node=self.node, what=what, error=error)
            raise ERR_UNAVAILABLE.fresh() from None
        since = self._bookkeeping_failing.pop(what, None)
        if since is not None:
            failed_s = round(self.health.clock() - since, 3)
            self.log.info("store_bookkeeping_recovered", node=self.node, what=what, failed_s=failed_s)
        return result

    def _ping_data_path(self, within: float | None = None) -> None:
        """A PING through the dispatcher's connections (StoreError if it fails: the node's
        outage begins, as for any data command; its answer ends one). ``within``: seconds
        to wait for its answer, if not the store's timeout (no answer by then: a timeout)."""
        ping = (self._dispatcher.execute, [(b"PING",)], [bytes], False)  # type: ignore[union-attr]  # (callers checked it is set)
        asked = self.health.clock()
        deadline = gevent.Timeout(within)  # (None: never fires; the store's timeout holds)
        try:
            with deadline:
                replies = self._call(*ping, per_command=True)
        except gevent.Timeout as exc:
            if exc is not deadline:  # (a caller's own deadline: not this PING's)
                raise
            raise self._failure(TimeoutError("no answer to a PING"), {self.node}, 1).fresh() from None
        self._pinged(replies, asked)

    def _pinged(self, replies: list[Any], asked: float) -> None:
        """Judge the data path's PING (sent at ``asked``) by its reply: an error reply (BUSY,
        LOADING: Redis cannot serve now) fails as a command would, an outage begun or going
        on; PONG says the node serves, the end of any outage."""
        if isinstance(replies[0], Exception):
            raise self._failure(replies[0], {self.node}, 1).fresh()
        if self.health.outages:
            self.health.up(self.node, asked)

    def _failure(
        self, exc: BaseException, nodes: set[str], commands: int, asked: float | None = None
    ) -> StoreError:
        """The StoreError for a call made at ``asked`` (the health clock) that raised ``exc``,
        with the episode it begins (none once the store is closed: the failure is the
        close's)."""
        if self._closed:
            return ERR_UNAVAILABLE
        text = self._text(exc)
        if isinstance(exc, ReplyMismatch):
            return self.health.error_reply(f"a reply of the wrong type: {text}", commands)
        if isinstance(exc, Lost):  # (a data connection: the store's own node)
            return self.health.lost(self.node, text, commands)
        if isinstance(exc, self._unreachable) or not_now(text):
            # A cluster pipeline fails as a whole when one node does: its message names it.
            named = {node for node in nodes if node in text}
            answering = self._answered_since(asked) if isinstance(exc, TimeoutError) else False
            for node in named or nodes:
                self.health.down(node, text, commands, answering)
            return ERR_UNAVAILABLE
        return self.health.error_reply(text, commands)

    def _answered_since(self, asked: float | None) -> bool:
        """Whether a data connection had a whole answer after ``asked`` (a call that timed out
        meanwhile: Redis answers, but held that call: paused writes)."""
        if asked is None or self._dispatcher is None:
            return False
        return self._dispatcher.answered_since(asked)

    def _text(self, exc: BaseException) -> str:
        """An error's text as Redis sent it, code word first, for the log: without what would
        show a command's keys and values (the note redis-py puts before an error inside a
        pipeline, which would also hide the code word; the arguments Redis quotes after an
        unknown command)."""
        text = str(exc) or type(exc).__name__
        if text.startswith(PIPELINE_NOTE[0]) and PIPELINE_NOTE[1] in text:
            text = text.split(PIPELINE_NOTE[1], 1)[1]
        text = text.split(QUOTED_ARGUMENTS, 1)[0]
        code = getattr(exc, "status_code", None) or self._code_words.get(type(exc))
        return f"{code} {text}" if code and not text.startswith(code) else text

    def stats(self) -> dict[str, int]:
        return self.health.stats()

    def not_ready(self) -> str | None:
        try:
            if self._dispatcher is None:
                self._call(self.client.ping)
            else:
                self._ping_data_path()
        except KVError as exc:
            return f"the Redis store: {exc.reason}"
        return None

    @staticmethod
    def _raise_first(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, KVError):
                raise result


def _redone(commands: Sequence[DataCommand], replies: list[Any]) -> list[int]:
    """Which of ``commands`` :meth:`RedisStore._scripts_again` sends again, in order: each
    UPDATE refused with NOSCRIPT after the last write (of any key) that ran, and from the
    first of them on, every GET of its key. One before a write that ran is not: sent again,
    it would apply after that write, and a client that saw the write (a PUT of another
    key, say) could see the key the UPDATE should have changed before it still unchanged."""
    last = -1  # the index of the last write that ran
    for index, (cmd, reply) in enumerate(zip(commands, replies, strict=True)):
        if cmd.__class__ is not Get and not _no_script(reply):
            last = index
    redo: list[int] = []
    again: set[bytes] = set()  # keys with an UPDATE sent again
    for index, (cmd, reply) in enumerate(zip(commands, replies, strict=True)):
        key = cmd[0]
        if key in again or (cmd.__class__ is Update and index > last and _no_script(reply)):
            again.add(key)
            redo.append(index)
    return redo


def _get_result(key: bytes, reply: Any) -> list[bytes] | Cut | None:
    """A plain op's result from its reply (not an error): a GET's values (or its Cut), None
    for a write."""
    if reply.__class__ is bytes:
        return line_values(key, reply) or None
    return reply if reply.__class__ is Cut else None


def _lines(key: bytes, reply: bytes | Cut | None) -> bytes | Cut | None:
    """A GET's :data:`Lines` from its reply (not an error): None for none (GETRANGE's ``""``
    too)."""
    return reply or None


def _client_key(key: bytes, start: int) -> bool:
    """Whether ``key`` (a Redis key whose prefix ends at ``start``) can be a client's: a name
    after the prefix, with no ':' (one with it is the bookkeeping's, ``_meta:``, or the key of
    a deployment whose prefix begins with this one's, ``kv:`` and ``kv:b:``)."""
    return len(key) > start and COLON not in key[start:]


def _update_lines(cmd: Any) -> tuple[bytes, bytes]:
    """The lines of an UPDATE's old and new values, as UPDATE_SCRIPT takes them."""
    key, old, new = cmd
    return value_line(key, old), value_line(key, new)


def _no_script(reply: Any) -> bool:
    """Whether ``reply`` is Redis's NOSCRIPT error reply (EVALSHA of a script it does not have)."""
    return isinstance(reply, Exception) and str(reply).startswith(NO_SCRIPT)


def _worker_report(entry: bytes) -> tuple[int, float] | None:
    """A workers table entry (``active reported_at``) read, or None if it cannot be."""
    try:
        active, at = entry.split()
        return int(active), float(at)
    except ValueError:
        return None


def _long_gone(workers: dict[bytes, bytes], now: float) -> list[bytes]:
    """The workers table's entries last reported WORKER_FORGET or more before ``now``, or
    unreadable."""
    gone = []
    for name, entry in workers.items():
        report = _worker_report(entry)
        if report is None or now - report[1] >= WORKER_FORGET:
            gone.append(name)
    return gone


def _heads(head: bytes, prefix: bytes) -> list[bytes]:
    """``head`` (a command's head, up to its key's length) with ``prefix`` after it, for each
    key length below HEADS (the key's length counted with the prefix); none for a prefix
    longer than TABLE_PREFIX_MAX (every batch then takes the general encoder)."""
    if len(prefix) > TABLE_PREFIX_MAX:
        return []
    return [head % (len(prefix) + n) + prefix for n in range(HEADS)]


def _encoded_slowly(
    prefix: bytes, ops: list[PlainOp], first: int, first_of: Callable[[bytes], bytes]
) -> tuple[bytes, list[type]]:
    """:meth:`RedisStore._encoded` for keys of any length (one call per op; ``first_of``
    encodes the first fetch of a GET from ``first`` on)."""
    commands = [
        (get(prefix + op[0]) if index < first else first_of(prefix + op[0]))
        if len(op) == 1
        else delete(prefix + op[0])
        if op[1] is None
        else append_line(prefix + op[0], op[0], op[1])
        for index, op in enumerate(ops)
    ]
    return b"".join(commands), [bytes if len(op) == 1 else int for op in ops]


def _first_fetched(ops: list[PlainOp]) -> int:
    """Where the GETs after the last write of ``ops`` begin (``len(ops)`` if a write ends it)."""
    first = len(ops)
    while first and len(ops[first - 1]) == 1:
        first -= 1
    return first


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for byte in prefix:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def _checked(base: type) -> type:
    """``base`` (a redis-py connection class) that refuses a socket connected to itself."""

    class NotToItself(base):
        def _connect(self) -> Any:
            sock = super()._connect()
            if sock.getsockname() == sock.getpeername():
                import redis

                sock.close()
                raise redis.exceptions.ConnectionError("connected to itself: nothing listens on its port")
            return sock

    return NotToItself


def _close_redis_py(client: Any) -> None:
    """Close redis-py's ``client`` and its connections: its ``close()`` alone leaves a pool it
    was given connected (ours, and a cluster's per node): a conversion's client held one
    connection to each node of a cluster for the process's life."""
    client.close()
    if hasattr(client, "disconnect_connection_pools"):  # (a cluster: a pool per node)
        client.disconnect_connection_pools()
    else:
        client.connection_pool.disconnect()


def _redis_py_client(url: str, timeout: float) -> Any:
    """redis-py's client for ``url``: fails fast (no retries: the store backs off), never
    uses a connection to itself, and each of its pools holds at most REDIS_PY_POOL
    connections where it carries the data (BOOKKEEPING_CONNECTIONS where it does not)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith("redis+cluster://"):
        from redis.cluster import RedisCluster

        options.update(max_connections=REDIS_PY_POOL, connection_class=_checked(redis.connection.Connection))
        return RedisCluster.from_url("redis://" + url[len("redis+cluster://") :], **options)
    base = redis.connection.SSLConnection if url.startswith("rediss://") else redis.connection.Connection
    most = REDIS_PY_POOL if url.startswith("rediss://") else BOOKKEEPING_CONNECTIONS
    options.update(max_connections=most, connection_class=_checked(base))
    return redis.Redis(connection_pool=redis.ConnectionPool.from_url(url, **options))


def _dispatcher(url: str, timeout: float, log: Logger, node: str) -> Dispatcher:
    """The auto-pipelining data path for a ``redis://`` URL, with redis-py's reading of it
    (host, port, db from the path or ``?db=``, percent-decoded user and password). Every
    connection loads the UPDATE script, so UPDATE sends its SHA-1, not the script."""
    from redis.connection import parse_url

    settings = parse_url(url)

    def connect() -> RespConnection:
        return RespConnection(
            settings.get("host") or "127.0.0.1",
            int(settings.get("port") or 6379),
            int(settings.get("db") or 0),
            settings.get("password"),
            settings.get("username"),
            timeout,
            setup=[(b"SCRIPT", b"LOAD", _SCRIPT)],
        )

    return Dispatcher(connect, connections=DISPATCH_CONNECTIONS, log=log, node=node)
