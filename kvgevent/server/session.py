"""The session: one client's requests in, replies and waits out. No sockets, no queue, no
waiting of its own (sans-I/O, in the manner of h11).

A :class:`Session` holds one client's protocol state (authenticated or not, wrong passwords,
long lines, the store position its next PING waits for, the work of its current turn) and
applies the items its :class:`~kvgevent.protocol.LineBuffer` produced: each run of data
commands goes to the store in one call, PING, STATS and AUTH are answered here, and every
error becomes its ``ERR`` line here and nowhere else. :meth:`Session.handle` is a generator of
*actions*, which the read loop (:mod:`kvgevent.server.server`) carries out:

- a ``list`` of reply lines: queue them (the connection's full-queue rules apply). The list is
  the session's own: the read loop is done with it when it resumes the session;
- :class:`Room` ``(lines, size)``: may a chunk of a big reply be queued now? The read loop waits
  for room as for any reply and sends back True (the session then builds the chunk and yields
  it as a :class:`Chunk`) or False (the client does not read: the rest of the reply is yielded
  as :class:`Dropped`, never built);
- :class:`Holding` ``(size)``: the big replies being built hold ``size`` bytes of this client's
  (the lists of values they copy, until their last chunk is built): count them as its buffers
  (``--max-memory``), in place of what the last one said; 0 when they are done;
- :data:`NEXT_TURN`: this turn's work is done (TURN_WORK); wait for the client's next turn;
- :class:`Durable` ``(position)``: wait until the store's writes up to ``position`` are durable
  (a PING under ``--fsync always``); the read loop sends back None, or the StoreError;
- :class:`Sleep` ``(seconds)``: wait for the client address's turn before a password is
  checked (:class:`~kvgevent.server.auth_throttle.AuthThrottle`);
- :class:`Close` ``(reason)``: after what was yielded, the client is closed (too many wrong
  passwords); the session is not resumed.

Work per turn. A turn ends after TURN_WORK units of work (values the store scans, reply lines
and bytes built), not only after TURN_BYTES of requests. A GET of a huge key is built in chunks
that fit the client's queue, each only once the queue has room for it.

Memory. While the server is over ``--max-memory`` (:class:`~kvgevent.server.memory.MemoryGuard`),
PUT and UPDATE get ``ERR out of memory``; GET and DELETE are applied as usual.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvgevent.config import (
    INLINE_REPLY_BYTES,
    MAX_AUTH_FAILURES,
    MAX_SEND_BATCH,
    REPLY_CHUNK,
    ROUND_TRIP_GETS,
    TURN_WORK,
)
from kvgevent.errors import KVError, ProtocolError, StoreError
from kvgevent.logs import Logger
from kvgevent.protocol import (
    COLON,
    DELETE_SPELLINGS,
    ERR_AUTH_REQUIRED,
    ERR_AUTH_THROTTLED,
    ERR_INVALID_PASSWORD,
    ERR_LINE_TOO_LONG,
    ERR_NO_PASSWORD,
    GET_SPELLINGS,
    OK,
    PING_SPELLINGS,
    PONG,
    PUT_SPELLINGS,
    Auth,
    Delete,
    Get,
    Ping,
    Put,
    Stats,
    add_small_reply,
    line_values,
    parse,
    small_reply,
    stats_line,
    value_lines,
)
from kvgevent.server.auth_throttle import AuthThrottle
from kvgevent.server.counters import Counters
from kvgevent.server.memory import ERR_OUT_OF_MEMORY, MemoryGuard
from kvgevent.stores.base import DATA_COMMANDS, WRITES, Cut, KVStore, Lines, PlainOp, Result

_GET_INITIALS = b"Gg"
"""What a GET line starts with (:meth:`Session.handle`)."""

_GET_HEADS = frozenset(verb + b":" for verb in GET_SPELLINGS)
"""How a GET line begins: ``GET:``, ``Get:`` (the original's clients), ``get:``."""

_VERB_BY_INITIAL: dict[int, type] = {ord("P"): Put, ord("p"): Put, ord("D"): Delete, ord("d"): Delete}
"""The command class of a plain PUT or DELETE line by its first byte (a GET's is the default):
the batch's verb, for the metrics."""

EMPTY_QUEUE = 1 << 62
"""A :class:`Room` size no queue bound admits: room only once the client's queue is empty (a
reply to fetch whole, of unknown size: :meth:`Session._fetched_whole`)."""

REPLY_LINE_WORK = 18
"""Work units of building one reply line, besides one per 8 of its bytes (bench/OPTIMISATIONS.md,
"a reply line's work")."""


class Room(NamedTuple):
    lines: int  # reply lines
    size: int  # bytes


class Chunk(NamedTuple):
    data: bytes  # reply lines, joined
    lines: int


class Dropped(NamedTuple):
    lines: int  # reply lines dropped unbuilt


class Holding(NamedTuple):
    size: int  # bytes the big replies being built hold (0: none any more)


class Durable(NamedTuple):
    position: int


class Whole:
    """A big GET reply fetched whole from a store kept elsewhere: its reply lines as they are
    sent (``lines``), sent in slices (:meth:`Session._line_slices`), never split into values."""

    __slots__ = ("lines",)

    def __init__(self, lines: bytes) -> None:
        self.lines = lines


class Sleep(NamedTuple):
    seconds: float


class Close(NamedTuple):
    reason: str  # the client_dropped reason


class _NextTurn:
    __slots__ = ()

    def __repr__(self) -> str:
        return "NEXT_TURN"


NEXT_TURN = _NextTurn()

ChunkPlan = tuple[int, int, Callable[[], bytes]]
"""A chunk of a big reply to come: its lines, its bytes, and what builds it (once there is room)."""

Action = list[bytes] | Room | Chunk | Dropped | Holding | Durable | Sleep | Close | _NextTurn
Items = list[bytes | ProtocolError]
Actions = Generator[Action, Any, None]


@dataclass(slots=True)
class Shared:
    """What every session of a server uses: the store, the counters, the password, STATS'
    figures, the memory rule, the AUTH throttle and the server's logger."""

    store: KVStore
    counters: Counters
    password: bytes | None
    stats: Callable[[], dict[str, int]]
    guard: MemoryGuard
    throttle: AuthThrottle
    log: Logger


class Session:
    """One client's requests, applied in order. Made by the server for each connection.
    It holds no reference to the connection (no cycle: a dropped client's buffers are freed
    at once, not at the garbage collector's next pass)."""

    __slots__ = (
        "shared",
        "client_id",
        "peer",
        "host",
        "max_line",
        "authenticated",
        "auth_failures",
        "long_lines",
        "write_mark",
        "work",
        "chunk_lines",
        "chunk_bytes",
        "verb",
        "abandoned",
        "held",
    )

    def __init__(
        self,
        shared: Shared,
        client_id: int,
        peer: str,
        host: str,
        max_line: int,
        chunk: tuple[int, int] = (REPLY_CHUNK, MAX_SEND_BATCH),
    ) -> None:
        self.shared = shared
        self.client_id, self.peer = client_id, peer  # who it is, in its log events
        self.host = host  # the client's address (AUTH throttling)
        self.max_line = max_line  # for the line_too_long event
        self.authenticated = shared.password is None
        self.auth_failures = 0  # wrong (or refused) AUTHs on this connection
        self.long_lines = 0  # lines over the bound sent on this connection
        self.write_mark = 0  # the store's write position after this client's last batch
        self.work = 0  # work done in this client's current turn (TURN_WORK units)
        # The most lines and bytes of a big reply's chunk: one that fits the client's queue.
        self.chunk_lines, self.chunk_bytes = chunk
        # The class of the last batch's first request (metrics). A class, not the line: no
        # request bytes outlive their batch (a quiet client holds its incomplete line only).
        self.verb: type = type(None)
        self.abandoned = 0  # lines of big replies left unbuilt when their client went (see _chunks)
        # The lists of values the big replies under way are built from, as [key, values, bytes
        # of the values counted as the reply's own, the store's list they were copied from]
        # (see held_now); empty between them.
        self.held: list[list[Any]] = []

    def logger(self) -> Logger:
        """The server's logger bound to this client (made on use: most clients never log)."""
        return self.shared.log.bind(client_id=self.client_id, peer=self.peer)

    # --- requests ---------------------------------------------------------------------------

    def handle(self, items: Items) -> list[bytes] | Actions:
        """Apply ``items`` in order. Returns their reply lines, a list, when the batch needs
        nothing of the read loop but queueing them (the usual case: data commands with small
        replies, PING, STATS, errors), or else a generator of the actions of the module
        docstring, which carries out the whole batch. Each run of data commands
        (PUT/GET/UPDATE/DELETE) goes to the store as one batch, and replies come in chunks,
        not line by line: at 50 clients x 16 pipelined GETs, per-line queueing was a fifth
        of the server's time. (The plain path saves the generators' cost where a batch is a
        request or two: about 7% of the server's time at one request per round trip.) The
        usual lines, well-formed PUT, GET and DELETE, are served first without a command
        object each: the memory store's right here (its GET loop, then ``serve_plain``: a
        call less per request, bench/OPTIMISATIONS.md, "the memory store's batch served in
        handle"), the other stores' by :meth:`_looked_up`; the general path takes over at the
        first line that is anything else (:meth:`_rest`)."""
        shared = self.shared
        shared.counters.commands += len(items)  # counted first: a STATS in this batch sees them
        if not self.authenticated:
            return self._unauthenticated(items)
        out: list[bytes] = []
        store = shared.store
        serve = store.serve_plain
        if serve is None or len(items) > REPLY_CHUNK:
            return self._rest(items, 0, out, False)
        self.verb = Get  # (until a line says otherwise)
        first = items[0]
        done = 0
        if first.__class__ is bytes and first and first[0] in _GET_INITIALS:  # (an int: a memchr)
            # GETs first where the batch starts with one: a GET-only loop, without the lock,
            # is the fastest for them (about 4% of a pipelined GET's cost).
            done = self._gets(items, 0, store, out)
            if done == len(items):
                return out
            if self.work >= TURN_WORK:  # (the rest waits for the next turn: see _rest)
                return self._rest(items, done, out, True)
        # Over the memory limit, it stops before a PUT (checked once a batch, as the general
        # path does: it refuses them). (A store that serves plainly needs no write mark.)
        guard = shared.guard
        served, work = serve(
            items[done:] if done else items, out, TURN_WORK - self.work, not guard.limit or not guard.over()
        )
        self.work += work
        if served and not done:
            self.verb = _VERB_BY_INITIAL.get(first[0], Get)  # type: ignore[index]  # (served: bytes)
        done += served
        return out if done == len(items) else self._rest(items, done, out, True)

    def _rest(self, items: Items, done: int, out: list[bytes], served: bool) -> list[bytes] | Actions:
        """:meth:`handle` from ``items[done:]`` on, the replies so far in ``out``: the plain
        path of a store without ``serve_plain`` first unless ``served`` (the memory store has
        served what it could), then the general path."""
        store = self.shared.store
        if served:
            if self.work >= TURN_WORK:  # the rest waits for the next turn
                return self._actions(items, done, out, self._next_turn(out))
        # (A store that holds its data here builds the replies of at most a chunk of lines at
        # once; one kept elsewhere answers in chunks, and a bigger batch is a bigger round trip.)
        elif len(items) <= REPLY_CHUNK if store.lookup is not None else store.apply_plain is not None:
            self.verb = Get  # (until a line says otherwise)
            done, rest = self._looked_up(items, store, out)
            if rest is None:
                if done == len(items):
                    return out
                if self.work >= TURN_WORK:  # the rest waits for the next turn
                    rest = self._next_turn(out)
            if rest is not None:
                return self._actions(items, done, out, rest)
        items = items[done:]
        cmds = [parse(item) if item.__class__ is bytes else item for item in items]
        if not done:
            self.verb = cmds[0].__class__  # the batch's, for the metrics
        if DATA_COMMANDS.issuperset(map(type, cmds)):  # data commands only: one run (checked in C)
            rest = self._apply_plainly(cmds, out)
            return out if rest is None else self._actions(cmds, len(cmds), out, rest)
        return self._mixed(cmds, out)

    def _looked_up(self, items: Items, store: KVStore, out: list[bytes]) -> tuple[int, Actions | None]:
        """The plain path of a store without ``serve_plain`` (see :meth:`handle`): the leading GETs from
        one that holds its data here (:meth:`_gets`), the leading plain lines from one kept
        elsewhere (:meth:`_applied_plainly`)."""
        if store.lookup is None:
            return self._applied_plainly(items, store, out)
        done = self._gets(items, 0, store, out)
        if done and store.needs_barrier:  # what this client's next PING waits for
            self.write_mark = store.write_position()
        return done, None

    def _applied_plainly(self, items: Items, store: KVStore, out: list[bytes]) -> tuple[int, Actions | None]:
        """The well-formed PUT, GET and DELETE lines leading ``items``, and the PINGs among
        them, applied in one call (``store.apply_plain``; one per ROUND_TRIP_GETS GETs, see
        :meth:`_in_groups`) and answered as the general path would: how many lines, and None, or
        the generator that finishes their replies (a big one comes in chunks) when not all fit
        in ``out`` at once. Each is applied and judged once: none is left for the general path
        to do again. A PING's PONG comes after the replies of the commands before it, as ever;
        the commands after it go in the same round trip (the general path would make one round
        trip per run between PINGs, and a client library that follows each command with a PING,
        as kvgevent's does, would pay one per command). Not across a PING that waits for the
        disk (``needs_barrier``). Over the memory limit, only what comes before the first PUT
        (the general path refuses it). A store that failed as a whole: each command its ERR
        line. (No work is counted for the store's part, as the general path counts none for a
        store kept elsewhere.)"""
        guard = self.shared.guard
        # (looked at once a batch, GETs alone too: it also sets how much a big reply may queue)
        puts = not (guard.limit and guard.over())
        first = items[0]
        if (
            store.get_plain is not None
            and len(items) <= ROUND_TRIP_GETS
            and first.__class__ is bytes
            and first
            and first[0] in _GET_INITIALS  # (an int: a memchr)
        ):
            keys = _get_keys(items)
            if keys is not None:  # GETs only (the usual read): quicker by themselves
                self.verb = Get
                store.applied["get"] += len(keys)
                return len(keys), self._fetched_values(keys, store, out)
        ops, kinds, pongs = _plain_ops(items, puts, not store.needs_barrier)
        if not ops:
            return 0, None
        self.verb = _first_verb(ops, pongs)
        applied = store.applied
        for verb, count in zip(("get", "put", "delete"), kinds, strict=True):
            applied[verb] += count
        if kinds[0] > ROUND_TRIP_GETS:  # (their values would all be here at once)
            return len(ops) + len(pongs), self._in_groups(ops, pongs, store, out)
        return len(ops) + len(pongs), self._ponged_replies(ops, _fetched(store.apply_plain, ops), out, pongs)

    def _fetched_values(self, keys: list[bytes], store: KVStore, out: list[bytes]) -> Actions | None:
        """:meth:`_applied_plainly` for a batch of GETs only (their ``keys``), through
        ``store.get_plain``, whose results are the replies' lines: the usual ones (one line
        each, small) queued as they are; if one is not (several values, a big one, an
        error), all of them as :meth:`_ponged_replies` builds them from their values, which
        counts and chunks their lines as the queue's bounds and counts want."""
        results = _fetched(store.get_plain, keys)
        if _one_small_line_each(results):  # the usual read
            out += results
            return None
        found = [lines for lines in results if lines is not None]  # (no values: no line)
        if len(found) < len(results) and _one_small_line_each(found):
            out += found
            return None
        ops: list[PlainOp] = [(key,) for key in keys]  # (unusual: the general way, from values)
        values = [_lines_result(key, lines) for key, lines in zip(keys, results, strict=True)]
        return self._ponged_replies(ops, values, out, [])

    def _ponged_replies(
        self, ops: list[PlainOp], results: list[Result], out: list[bytes], pongs: list[int]
    ) -> Actions | None:
        """:meth:`_applied_plainly`'s replies, with a PONG after the replies of the first
        ``p`` commands for each ``p`` of ``pongs`` (the PINGs among them, if any). None if
        they all fit in ``out`` at once, else the generator that finishes them."""
        if (
            results[-1] is None
            and len(out) + len(pongs) < REPLY_CHUNK
            and results.count(None) == len(results)
        ):
            # nothing but None (writes that succeeded, GETs that found nothing: the usual
            # write): nothing to answer but the PINGs. (The last result first: a run that
            # ends with a GET's values, the usual read, is not counted through.)
            for _ in pongs:
                self._count("ping")
            out += [PONG] * len(pongs)
            return None
        start = 0
        for index, end in enumerate(pongs):
            done = self._inline_replies(ops, results, out, start, end)
            if done < end or len(out) >= REPLY_CHUNK:  # a big reply, or a full chunk
                return self._ponged_rest(ops, results, out, pongs[index:], done)
            self._count("ping")
            out.append(PONG)
            start = end
        done = self._inline_replies(ops, results, out, start)
        return None if done == len(ops) else self._replies(ops, results, out, done)

    def _ponged_rest(
        self, ops: list[PlainOp], results: list[Result], out: list[bytes], pongs: list[int], done: int
    ) -> Actions:
        """The rest of :meth:`_ponged_replies`, from the reply of ``ops[done]`` on."""
        for end in pongs:
            yield from self._replies(ops, results, out, done, end)
            self._count("ping")
            out.append(PONG)
            if len(out) >= REPLY_CHUNK:
                yield out
                out.clear()
            done = end
        yield from self._replies(ops, results, out, done)

    def _in_groups(self, ops: list[PlainOp], pongs: list[int], store: KVStore, out: list[bytes]) -> Actions:
        """:meth:`_applied_plainly` for a run of more than ROUND_TRIP_GETS GETs: one call per
        group of at most that many (and the writes among them), each group's replies, and
        the PONGs that follow them, queued before the next group is fetched."""
        results: list[Result] = []
        start = 0
        for end in _group_ends(ops):
            results += _fetched(store.apply_plain, ops[start:end])
            # the PINGs after this group's commands (and before the next group's)
            ponged = [p for p in pongs if start < p <= end or p == start == 0]
            yield from self._ponged_rest(ops, results, out, ponged, start)
            if out:
                yield out  # (queued now: the next group waits for room in the client's queue)
                out.clear()
            results[start:end] = [None] * (end - start)  # (answered: their values go now)
            start = end

    def _gets(self, items: Items, start: int, store: KVStore, out: list[bytes]) -> int:
        """Serve the well-formed GETs with small replies from ``items[start:]`` on, straight
        from ``store.lookup`` (a key's values, no command object per GET: a third of a
        pipelined GET's cost, bench/OPTIMISATIONS.md, "GETs straight from the store"), their
        replies added to ``out``, until the turn's work is done; returns the index of the
        first item not served. Counts them (the caller notes the write mark)."""
        lookup: Callable[[bytes], list[bytes] | None] = store.lookup  # type: ignore[assignment]  # (the caller checked it is not None)
        append = out.append
        # Work: one unit per value copied. The usual GET's one unit is counted from the
        # totals (the GETs served, less those that found nothing), not GET by GET; the
        # budget is looked at after a GET of several values: one of a single value or none
        # adds a unit, and a batch holds at most a chunk of lines.
        budget = TURN_WORK - self.work
        missing = extra = 0  # GETs that found nothing; values beyond the first of the others
        index = start
        try:
            for line in items[start:] if start else items:
                # A marker (a too-long line) has no partition: AttributeError, caught below
                # (as MemoryStore.serve_plain: cheaper than a check per line).
                verb, _, key = line.partition(b":")  # type: ignore[union-attr]  # (a marker: see above)
                # (equality first: as MemoryStore.serve_plain)
                if not (verb == b"Get" or verb == b"GET" or verb in GET_SPELLINGS) or not key or COLON in key:
                    break
                values = lookup(key)
                if not values:
                    missing += 1
                elif len(values) == 1 and len(values[0]) <= INLINE_REPLY_BYTES:  # the usual GET
                    append(b"".join((key, b":", values[0], b"\n")))
                elif add_small_reply(key, values, out):
                    extra += len(values) - 1
                    if index + 1 - start - missing + extra >= budget:  # the turn's work is done
                        index += 1
                        break
                else:
                    break
                index += 1
        except AttributeError:
            pass
        if index > start:
            self.work += index - start - missing + extra
            store.applied["get"] += index - start
        return index

    def _mixed(self, cmds: list[Any], out: list[bytes]) -> list[bytes] | Actions:
        """:meth:`handle` for a batch with PING, STATS, AUTH or errors among data commands."""
        run: list[Any] = []
        for index, cmd in enumerate(cmds):
            if cmd.__class__ in DATA_COMMANDS:
                run.append(cmd)
                continue
            if run:
                rest = self._apply_plainly(run, out)
                if rest is not None:
                    return self._actions(cmds, index, out, rest)
                run = []
            if not self._answer(cmd, out):
                return self._actions(cmds, index, out)
        if run:
            rest = self._apply_plainly(run, out)
            if rest is not None:
                return self._actions(cmds, len(cmds), out, rest)
        return out

    def _unauthenticated(self, items: Items) -> Actions:
        items = yield from self._authenticate(items)
        yield from self._actions(items, 0, [])

    def _actions(
        self, items: list[Any], start: int, out: list[bytes], rest: Actions | None = None
    ) -> Actions:
        """The general path: finish ``rest`` (the end of a data run), then apply
        ``items[start:]`` (request lines, or commands parsed already), yielding actions;
        ``out`` holds the replies built so far."""
        if rest is not None:
            yield from rest
        run: list[Any] = []
        for item in items[start:]:
            cmd = parse(item) if item.__class__ is bytes else item
            if cmd.__class__ in DATA_COMMANDS:
                run.append(cmd)
                continue
            if run:
                yield from self._apply(run, out)
                run = []
            yield from self._other(cmd, out)
        if run:
            yield from self._apply(run, out)
        if out:
            yield out

    def _answer(self, cmd: Any, out: list[bytes]) -> bool:
        """Answer PING, STATS or an error item in ``out`` if it needs no action (False for
        AUTH, and a PING that waits for the disk)."""
        kind = cmd.__class__
        if kind is Ping:
            if self.shared.store.needs_barrier:
                return False
            self._count("ping")
            out.append(PONG)
        elif kind is Stats:
            self._count("stats")
            out.append(stats_line(self.shared.stats()))
        elif kind is Auth:
            return False
        else:  # a ProtocolError, from the line buffer or the parser
            if cmd is ERR_LINE_TOO_LONG:
                self._line_too_long()
            self._reply(out, cmd)
        return True

    def _other(self, cmd: Any, out: list[bytes]) -> Actions:
        """PING, STATS, AUTH or an error item: its reply added to ``out``."""
        if self._answer(cmd, out):
            return
        if cmd.__class__ is Auth:
            yield from self._auth(cmd, out)
            return
        if out:  # a PING that waits for the disk: what came before leaves first
            yield out
            out.clear()
        self._count("ping")
        failure = yield Durable(self.write_mark)
        self._reply(out, PONG if failure is None else failure)

    def _count(self, verb: str) -> None:
        """One more PING, STATS or AUTH served (data commands are counted by the store)."""
        verbs = self.shared.counters.verbs
        verbs[verb] = verbs.get(verb, 0) + 1

    def _reply(self, out: list[bytes], reply: bytes | KVError) -> None:
        """Add ``reply`` to ``out``: a line, or an error's ERR line (counted)."""
        if reply.__class__ is bytes:
            out.append(reply)
        else:
            self.shared.counters.count_error(reply.reason)  # type: ignore[union-attr]  # (not bytes: a KVError)
            out.append(reply.reply)  # type: ignore[union-attr]  # (not bytes: a KVError)

    # --- data commands --------------------------------------------------------------------

    def _apply_plainly(self, run: list[Any], out: list[bytes]) -> Actions | None:
        """Have the store apply a run of data commands and add their replies to ``out``; None
        when that is all there is to it, else the generator that finishes the run (a big
        reply, a full chunk of replies, the rest of the run after a turn's work)."""
        results = self._applied(run)
        done = self._inline_replies(run, results, out, 0)
        if done == len(run):
            return None
        return self._apply(run, out, results, done)

    def _apply(
        self, run: list[Any], out: list[bytes], results: list[Result] | None = None, done: int = 0
    ) -> Actions:
        """Have the store apply a run of data commands, a turn's work at a time, and add the
        replies (ERR for a failed command) to ``out``; ``results``: those of the first
        commands, applied already, ``done`` of them replied to."""
        while True:
            if results is None:
                results = self._applied(run)
                done = 0
            yield from self._replies(run, results, out, done)
            if len(results) == len(run):
                return
            run, results = run[len(results) :], None
            if self.work >= TURN_WORK:
                yield from self._next_turn(out)

    def _applied(self, run: list[Any]) -> list[Result]:
        """:meth:`_apply_some`'s results, its work counted."""
        results, work = self._apply_some(run)
        self.work += work
        return results

    def _apply_some(self, run: list[Any]) -> tuple[list[Result], int]:
        """Apply the first commands of ``run`` within the turn's remaining work; over the
        memory limit, refuse the writes that lead ``run``, or apply what comes before the
        first write. A store that failed as a whole: each command given to it, its error."""
        guard = self.shared.guard
        if guard.limit and guard.over():
            writes = 0
            for cmd in run:
                if cmd.__class__ not in WRITES:
                    break
                writes += 1
            if writes:
                guard.refused(writes)
                return [ERR_OUT_OF_MEMORY] * writes, 0
            end = next((i for i, cmd in enumerate(run) if cmd.__class__ in WRITES), len(run))
            run = run[:end]
        store = self.shared.store
        try:
            results, work = store.apply_some(run, TURN_WORK - self.work)
        except KVError as exc:  # failed as a whole: each command it was given, its ERR line
            return [exc.fresh()] * len(run), 0  # (the writes held back over the limit: refused next)
        # What this client's next PING waits for; not when the store refused every command
        # (the log failing): they read and wrote nothing, so the PING after them waits for no
        # one's writes (the writes of others that the position includes may never be synced).
        if store.needs_barrier and not all(isinstance(result, StoreError) for result in results):
            self.write_mark = store.write_position()
        return results, work

    def _inline_replies(
        self, run: list[Any], results: list[Result], out: list[bytes], start: int, end: int | None = None
    ) -> int:
        """Add the replies of ``results[start:end]`` to ``out`` while they are small; returns
        the index of the first one not added (a big GET reply; ``end``, or ``len(results)``,
        if none is), or stops after the one that fills ``out`` to REPLY_CHUNK lines.
        (``run`` may be longer: results are of its first commands.)"""
        index = start - 1
        append = out.append
        for values in results[start:end] if start or end is not None else results:
            index += 1
            if values is None:
                continue
            if values.__class__ is not list:  # a KVError, or a Cut or Whole (a big reply)
                if values.__class__ is Cut or values.__class__ is Whole:
                    return index
                self._reply(out, values)  # type: ignore[arg-type]  # (not a list: a KVError)
                continue
            if len(values) == 1 and len(values[0]) <= INLINE_REPLY_BYTES:  # the usual GET
                append(b"".join((run[index][0], b":", values[0], b"\n")))
            elif small_reply(values):
                out += value_lines(run[index][0], values)
            else:
                return index
            if len(out) >= REPLY_CHUNK:
                return index + 1
        return len(results) if end is None else end

    def _replies(
        self, run: list[Any], results: list[Any], out: list[bytes], start: int, end: int | None = None
    ) -> Actions:
        """Add the replies of ``results[start:end]`` (of the first commands of ``run``) to
        ``out``, yielding full chunks; a big GET reply goes through :meth:`_big_reply`, one the
        store fetched the first bytes of (a :class:`~kvgevent.stores.base.Cut`) through
        :meth:`_fetched_whole` first. The lists of values of the big replies are held until
        the last is built: at the first, their size is yielded as :class:`Holding` (many
        clients each holding a GET of a big list under way went unseen by --max-memory: RSS
        at 3 times the limit, an attacker's pass), again when a whole fetch added to them,
        and 0 at the end (a client that goes meanwhile gives back all it held)."""
        held = 0
        index = start
        stop = len(results) if end is None else end
        try:
            while index < stop:
                index = self._inline_replies(run, results, out, index, end)
                if len(out) >= REPLY_CHUNK:
                    yield out
                    out.clear()
                elif index < stop:  # a big GET reply
                    if results[index].__class__ is Cut:  # fetched whole (or dropped) first
                        yield from self._fetched_whole(run, results, index, out)
                        if held:
                            held = self._hold(run, results, index)
                            yield Holding(held)
                        continue
                    if not held:
                        if out:
                            yield out  # (the replies before it go first)
                            out.clear()
                        held = self._hold(run, results, index)
                        yield Holding(held)
                    yield from self._big_reply(run[index][0], results[index], out)
                    index += 1
                    if self.work >= TURN_WORK:  # (GETs of single big values add up too)
                        yield from self._next_turn(out)
        finally:
            self.held = []  # (closed too: its client went)
        if held:
            yield Holding(0)

    def _fetched_whole(self, run: list[Any], results: list[Any], index: int, out: list[bytes]) -> Actions:
        """The GET of ``results[index]``, a :class:`~kvgevent.stores.base.Cut` (the store
        fetched its first bytes only), fetched whole (``store.fetch_whole``) once its client
        has taken in everything queued before it (the queue is empty: a client holds one such
        reply at a time), in place in ``results``; with it, the GETs after it that were not
        cut are fetched again (each result after it is a GET's: the store cuts only GETs after
        a batch's last write), so that no reply after this one is older than it: those cut
        are fetched whole later still, or dropped unseen. For a client that does not read,
        dropped unfetched: none of it is asked of the store, and it counts as the lines of
        its first bytes (one at least), what is known of it (README "Limits")."""
        if out:
            yield out  # the replies before it go first
            out.clear()
        first = results[index].first
        # (a first fetch Redis refused, GETRANGE: nothing known of it, not even that it is
        # long; fetched whole now, as every GET is from then on)
        if first and not (yield Room(1, EMPTY_QUEUE)):
            yield Dropped(first.count(b"\n") or 1)
            results[index] = None
            return
        later = [at for at in range(index + 1, len(results)) if results[at].__class__ is not Cut]
        keys = [run[at][0] for at in (index, *later)]
        fetched = _fetched(self.shared.store.fetch_whole, keys)
        whole = fetched[0]
        # (its lines are the reply: sent in slices, not split into values, a bytes object each)
        results[index] = Whole(whole) if whole.__class__ is bytes else _lines_result(keys[0], whole)
        for at, key, lines in zip(later, keys[1:], fetched[1:], strict=True):
            results[at] = _lines_result(key, lines)

    def _hold(self, run: list[Any], results: list[Result], start: int) -> int:
        """What the lists of values of ``results[start:]`` hold (:func:`held_bytes`), noted in
        :attr:`held` when the store holds its data here (see :meth:`held_now`)."""
        lookup = self.shared.store.lookup
        if lookup is not None:
            found = enumerate(results[start:], start)
            keys = [(run[index][0], values) for index, values in found if values.__class__ is list]
            self.held = [[key, values, 0, lookup(key)] for key, values in keys]
        return held_bytes(results, start, lookup is None)

    def counted(self, seen: set[int]) -> None:
        """Add to ``seen`` the lists whose values a reply under way counts as its own (see
        :meth:`held_now`)."""
        for _, values, own, source in self.held:
            if own:
                seen.add(id(values if source is None else source))

    def held_now(self, seen: set[int]) -> int | None:
        """What the big replies under way hold now, if that changed since :class:`Holding`
        counted it (else None): their lists' slots, and the values of a list the store has
        dropped since (a DELETE, a refill), which the reply's copy alone keeps now (they went
        uncounted: a slow reader's GET of a big key deleted and refilled six times held RSS
        at 751 MB against --max-memory 200M, an attacker's pass). Dropped means the key no
        longer holds the very list the copy was made from (values compared by identity were
        fooled by CPython's shared one-byte objects, an attacker's pass); that list is kept
        until the reply is done, so its identity cannot be taken by another. The values of a
        list several readers copied count once, for the first of them the server looks at
        (``seen``, which :meth:`counted` filled: each counted them in full, and prompt
        readers of one big key were disconnected, an attacker's pass). The server looks
        every MEMORY_CHECK_INTERVAL while the client holds any (``MemoryGuard.holders``)."""
        lookup = self.shared.store.lookup
        if not self.held or lookup is None:
            return None
        changed = False
        for entry in self.held:
            key, values, own, source = entry
            if own or not values or (source is not None and lookup(key) is source):
                continue
            dropped = id(values if source is None else source)
            if dropped not in seen:  # (else another reader's reply counts them)
                seen.add(dropped)
                entry[2] = sum(map(len, values)) + BYTES_COST * len(values)
                changed = True
        if not changed:
            return None
        return sum(LIST_COST + 8 * len(values) + own for _, values, own, _ in self.held)

    def _value_slices(self, key: bytes, values: list[bytes]) -> Iterator[ChunkPlan]:
        """The :meth:`_chunks` of a big GET reply from its values, each joined from them."""
        prefix = key + b":"
        extra = len(prefix) + 1
        index = 0
        while index < len(values):
            end, size = self._chunk(values, index, extra)
            yield end - index, size, functools.partial(_joined_lines, prefix, values, index, end)
            index = end

    def _big_reply(self, key: bytes, found: list[bytes] | Whole, out: list[bytes]) -> Actions:
        """A big GET reply in :meth:`_chunks`: from its lines as fetched (:class:`Whole`), or
        from its values."""
        if found.__class__ is Whole:
            lines = found.lines  # (Whole: checked)
            return self._chunks(self._line_slices(lines), lines.count(b"\n"), out)
        values: list[bytes] = found  # type: ignore[assignment]  # (not Whole: a list of values)
        return self._chunks(self._value_slices(key, values), len(values), out)

    def _chunks(self, chunks: Iterator[ChunkPlan], count: int, out: list[bytes]) -> Actions:
        """A big GET reply of ``count`` lines, in ``chunks`` (each: its lines, its bytes, and
        how to build it) that fit the client's queue (at most REPLY_CHUNK lines and one send
        batch, at least one line), each built only once the queue has room for it, the turn
        ending as the work adds up; once the client does not read, the rest is
        :class:`Dropped`, unbuilt. Closed before its end (its client went), it adds the lines
        left unbuilt to :attr:`abandoned`."""
        if out:
            yield out  # the replies before this one go first
            out.clear()
        sent = 0
        try:
            for lines, size, build in chunks:
                if not (yield Room(lines, size)):
                    yield Dropped(count - sent)
                    return
                yield Chunk(build(), lines)
                sent += lines
                self.work += REPLY_LINE_WORK * lines + (size >> 3)
                if self.work >= TURN_WORK and sent < count:
                    yield from self._next_turn(out)
        except GeneratorExit:  # the client goes mid-reply (shutdown, eviction, a reset)
            self.abandoned += count - sent  # (the server counts them as dropped)
            raise

    def _line_slices(self, lines: bytes) -> Iterator[ChunkPlan]:
        """The :meth:`_chunks` of a reply fetched whole (:class:`Whole`: its ``lines`` as they
        are sent), each a slice of ``lines`` that ends a line. What follows the last newline
        is not a line: left out (a string another program wrote, README "When Redis
        fails")."""
        end_of_lines = lines.rfind(b"\n") + 1
        start = 0
        while start < end_of_lines:
            end, count = self._line_chunk(lines, start, end_of_lines)
            yield count, end - start, functools.partial(_sliced, lines, start, end)
            start = end

    def _line_chunk(self, lines: bytes, start: int, end_of_lines: int) -> tuple[int, int]:
        """Where the chunk of reply ``lines`` that starts at ``start`` ends (after a newline,
        at most ``end_of_lines``), and how many lines it holds: at most ``chunk_lines`` lines
        and ``chunk_bytes`` bytes, at least one line."""
        window = lines[start : min(start + self.chunk_bytes, end_of_lines)]
        parts = window.split(b"\n", self.chunk_lines)  # (the last: what follows the chunk)
        if len(parts) == 1:  # one line longer than a chunk: alone
            return lines.index(b"\n", start) + 1, 1
        return start + len(window) - len(parts[-1]), len(parts) - 1

    def _chunk(self, values: list[bytes], index: int, extra: int) -> tuple[int, int]:
        """Where the chunk of a big reply that starts at ``index`` ends, and its size: at
        most ``chunk_lines`` lines and ``chunk_bytes`` bytes, at least one line (``extra``:
        the bytes a line adds to its value)."""
        end, size = index + 1, len(values[index]) + extra
        count, lines, most = len(values), self.chunk_lines, self.chunk_bytes
        while end < count and end - index < lines and size + len(values[end]) + extra <= most:
            size += len(values[end]) + extra
            end += 1
        return end, size

    def _next_turn(self, out: list[bytes]) -> Actions:
        """End this turn: the replies built so far go first, then wait for the next turn."""
        if out:
            yield out
            out.clear()
        yield NEXT_TURN
        self.work = 0

    # --- passwords --------------------------------------------------------------------------

    def _authenticate(self, items: Items) -> Generator[Action, Any, Items]:
        """Before AUTH succeeds only AUTH and PING are served; returns the items after a
        successful AUTH (to be applied as usual), or none."""
        out: list[bytes] = []
        for index, item in enumerate(items):
            cmd = parse(item) if item.__class__ is bytes else item
            if cmd.__class__ is Auth:
                yield from self._auth(cmd, out)
                if self.authenticated:
                    if out:
                        yield out
                    return items[index + 1 :]
            elif cmd.__class__ is Ping:
                self._count("ping")
                out.append(PONG)  # nothing to wait for: this connection has written nothing yet
            elif cmd is ERR_LINE_TOO_LONG:  # the line's length, not its content, is the problem
                self._line_too_long()
                self._reply(out, cmd)
            else:
                self._reply(out, ERR_AUTH_REQUIRED)
        if out:
            yield out
        return []

    def _auth(self, cmd: Auth, out: list[bytes]) -> Actions:
        """Check a password (after the client address's turn, if it is throttled) and add the
        reply to ``out``: OK (and the session is authenticated) or an ERR; after
        MAX_AUTH_FAILURES wrong or refused AUTHs, the reply and a :class:`Close`."""
        shared = self.shared
        self._count("auth")
        if shared.password is None:
            self._reply(out, ERR_NO_PASSWORD)
            return
        wait = shared.throttle.admit(self.host)
        if wait is None:  # its turn is too far off: refused unchecked
            shared.counters.auth_throttled += 1
            yield from self._auth_failed(ERR_AUTH_THROTTLED, out)
            return
        if wait:
            shared.counters.auth_throttled += 1
            if out:
                yield out
                out.clear()
            yield Sleep(wait)
        if hmac.compare_digest(cmd.password, shared.password):  # constant time
            self.authenticated = True
            out.append(OK)
            return
        # (an authenticated session stays so, as in Redis: a wrong AUTH changes nothing)
        shared.counters.auth_failures += 1
        self.logger().warning("auth_failed", auth_failures=self.auth_failures + 1)
        began = shared.throttle.failed(self.host)
        if began is not None:
            shared.log.warning(
                "auth_throttled",
                host=began.host,
                auth_failures=began.failures,
                delay_s=began.delay,
                hint="this address's AUTHs are checked one at a time, further apart after "
                "each wrong password, until it sends none for a while",
            )
        yield from self._auth_failed(ERR_INVALID_PASSWORD, out)

    def _auth_failed(self, error: ProtocolError, out: list[bytes]) -> Actions:
        """A wrong or refused AUTH answered ``error``; the MAX_AUTH_FAILURES-th closes."""
        self._reply(out, error)
        self.auth_failures += 1
        if self.auth_failures >= MAX_AUTH_FAILURES:
            yield out
            out.clear()
            yield Close("auth_failures")

    def _line_too_long(self) -> None:
        self.shared.counters.lines_too_long += 1
        self.long_lines += 1
        if self.long_lines == 1:  # once per connection: a hostile client cannot flood the log
            self.logger().warning("line_too_long", max_line=self.max_line)


LIST_COST = 56
"""Bytes a list object costs beside its 8 bytes a slot (CPython 3.11, 64-bit)."""

BYTES_COST = 33
"""Bytes a bytes object costs beside its length (CPython 3.11, 64-bit)."""


def _sliced(lines: bytes, start: int, end: int) -> bytes:
    return lines[start:end]


def _joined_lines(prefix: bytes, values: list[bytes], start: int, end: int) -> bytes:
    """The reply lines of ``values[start:end]`` (``prefix`` is ``key:``), joined: one copy of
    each value."""
    return b"".join([piece for value in values[start:end] for piece in (prefix, value, b"\n")])


def held_bytes(results: list[Any], start: int, values: bool) -> int:
    """What the lists of values of ``results[start:]`` cost, the big replies to be built from:
    their slots, and with ``values`` the values too (a store kept elsewhere: they are the
    reply's own; a memory store's are its data, unless it drops them meanwhile)."""
    lists = [found for found in results[start:] if isinstance(found, list)]
    held = sum(LIST_COST + 8 * len(found) for found in lists)
    if values:
        held += sum(sum(map(len, found)) + BYTES_COST * len(found) for found in lists)
        held += sum(len(found.lines) + BYTES_COST for found in results[start:] if found.__class__ is Whole)
    return held


def _fetched(fetch: Callable[[list[Any]], list[Any]] | None, ops: list[Any]) -> list[Any]:
    """``fetch(ops)``'s results (a store's ``apply_plain`` or ``get_plain``); if the store
    failed as a whole, its error for each op (a fresh one: the raised error's traceback would
    hold the batch), counted as its ERR line is added."""
    try:
        return fetch(ops)  # type: ignore[misc]  # (the callers checked it is not None)
    except KVError as exc:
        return [exc.fresh()] * len(ops)


def _one_small_line_each(replies: list[Any]) -> bool:
    """Whether each of ``replies`` (GETs' :data:`Lines`) is one reply line of at most
    INLINE_REPLY_BYTES: bytes, its lines counted all at once (a GET's lines each end in a
    newline, and it has one at least), not one by one. A batch that starts or ends with a big
    one is told by those sizes, not joined: 30 GETs of a key of 8 MB were joined and scanned,
    240 MB twice (0.4 s each time; their values are split out after, which costs more still,
    README "Limits"), and ten clients sending such a batch each held the loop for seconds (an
    attacker's pass). (Any big one makes the joined size over the bound: not scanned.)"""
    try:
        if len(replies[0]) > INLINE_REPLY_BYTES or len(replies[-1]) > INLINE_REPLY_BYTES:
            return False  # (a batch of big ones: not joined)
        joined = b"".join(replies)
    except TypeError:  # (None: no values; an error)
        return False
    except IndexError:  # (no replies: none is big)
        return True
    size = len(joined)
    if size > INLINE_REPLY_BYTES * len(replies):  # (one at least is big: not scanned)
        return False
    # (small all together, the usual batch: none is big, no look at each)
    return joined.count(b"\n") == len(replies) and (
        size <= INLINE_REPLY_BYTES or max(map(len, replies)) <= INLINE_REPLY_BYTES
    )


def _lines_result(key: bytes, lines: Lines) -> Result:
    """A GET's result (its values, None or its error) from its :data:`Lines`."""
    return (line_values(key, lines) or None) if lines.__class__ is bytes else lines  # type: ignore[return-value]  # (bytes: checked)


def _first_verb(ops: list[PlainOp], pongs: list[int]) -> type:
    """The command that leads a plain run (for the metrics): a PING before any command, else
    the first command's kind."""
    if pongs and not pongs[0]:
        return Ping
    first = ops[0]
    if len(first) == 1:
        return Get
    return Put if first[1] is not None else Delete


def _group_ends(ops: list[PlainOp]) -> list[int]:
    """Where :meth:`Session._in_groups` ends each group of ``ops``: after every
    ROUND_TRIP_GETS-th GET, and at the end."""
    ends: list[int] = []
    gets = 0
    for index, op in enumerate(ops):
        if len(op) == 1:
            gets += 1
            if gets == ROUND_TRIP_GETS:
                ends.append(index + 1)
                gets = 0
    if not ends or ends[-1] != len(ops):
        ends.append(len(ops))
    return ends


def _get_keys(items: Items) -> list[bytes] | None:
    """The keys of ``items`` if each is a well-formed GET line (by the rules of
    :func:`_plain_ops`), else None."""
    try:  # the usual lines, each ``Get:key`` in one spelling: split in C, not one by one
        joined = b"\n".join(items)  # type: ignore[arg-type]  # (a marker: TypeError)
    except TypeError:
        return None
    head = joined[:4]
    if head in _GET_HEADS:
        keys = joined[4:].split(b"\n" + head)
        # (as many as lines: each began with the head; as many ':' as lines: none in a key)
        if len(keys) == len(items) and joined.count(COLON) == len(keys) and b"" not in keys:
            return keys
    return _spelled_get_keys(items)


def _spelled_get_keys(items: Items) -> list[bytes] | None:
    """:func:`_get_keys` line by line (GET in any of its spellings)."""
    keys: list[bytes] = []
    append = keys.append
    try:
        for line in items:
            # (a marker, a too-long line, has no partition: AttributeError, as in _gets)
            verb, _, key = line.partition(b":")  # type: ignore[union-attr]  # (a marker: see above)
            if not (verb == b"Get" or verb == b"GET" or verb in GET_SPELLINGS) or not key or COLON in key:
                return None
            append(key)
    except AttributeError:
        return None
    return keys


def _plain_ops(
    items: Items, puts: bool, pings: bool
) -> tuple[list[PlainOp], tuple[int, int, int], list[int]]:
    """The run of well-formed PUT, GET and DELETE lines that leads ``items``, as
    :attr:`KVStore.apply_plain` takes them (``(key,)``, ``(key, value)``, ``(key, None)``);
    how many GETs, PUTs and DELETEs it holds; and, when ``pings``, where the PING lines among
    them go (for each, how many commands come before it: the run goes on past them). It
    ends before the first PUT unless ``puts``. The rules are
    :func:`~kvgevent.protocol.parse`'s for the spellings that need no case folding."""
    ops: list[PlainOp] = []
    append = ops.append
    pongs: list[int] = []
    get_count = put_count = deletes = 0
    try:
        for line in items:
            # (a marker, a too-long line, has no split: AttributeError, as in _gets)
            fields = line.split(b":", 2)  # type: ignore[union-attr]  # (one call: two partitions cost half as much again)
            if len(fields) == 3:  # verb:key:value, the value may hold ':'
                verb = fields[0]
                # (equality first, as MemoryStore.serve_plain: cheaper than hashing the verb)
                if not (puts and (verb == b"PUT" or verb == b"Put" or verb in PUT_SPELLINGS) and fields[1]):
                    break
                append((fields[1], fields[2]))
                put_count += 1
            elif len(fields) == 2 and fields[1] and fields[0] in GET_SPELLINGS:  # no ':' in the key
                append((fields[1],))
                get_count += 1
            elif len(fields) == 2 and fields[1] and fields[0] in DELETE_SPELLINGS:
                append((fields[1], None))
                deletes += 1
            elif pings and line in PING_SPELLINGS:
                pongs.append(len(ops))
            else:
                break
    except AttributeError:
        pass
    return ops, (get_count, put_count, deletes), pongs
