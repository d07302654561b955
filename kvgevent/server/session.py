"""Applying requests: the one place where commands meet the store and errors become replies.

:class:`Executor` takes the items a client's :class:`~kvgevent.protocol.LineBuffer` produced
(request lines, or too-long markers), parses them, hands each run of data commands to the
store in one call (:meth:`~kvgevent.store.KVStore.apply`), answers PING, STATS and AUTH
itself, and queues the replies on the connection in chunks. It does no I/O of its own.

Work per turn. A client's turn ends after TURN_WORK units of work (values the store scans,
reply lines and bytes built), not only after TURN_BYTES of requests: the executor then hands
the replies built so far to the writer and waits for the client's next turn (``pause``). A GET
of a huge key is built and queued in pieces of at most REPLY_CHUNK lines and MAX_SEND_BATCH
bytes; once its client's queue is full and the client does not read, the rest of the reply is
counted as dropped without being built.

Memory. While the server is over ``--max-memory`` (:class:`~kvgevent.memory.MemoryGuard`),
PUT and UPDATE get ``ERR out of memory``; GET and DELETE are applied as usual.

Passwords. Before a password is checked, the client's address may have to wait for its turn
(:class:`~kvgevent.auth_throttle.AuthThrottle`): the replies built so far are queued first, then
the reader sleeps; an AUTH whose turn is too far off gets ``ERR auth throttled`` unchecked.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from kvgevent.config import (
    INLINE_REPLY_BYTES,
    INLINE_REPLY_VALUES,
    MAX_AUTH_FAILURES,
    REPLY_CHUNK,
    TURN_WORK,
)
from kvgevent.errors import KVError, ProtocolError
from kvgevent.protocol import (
    ERR_AUTH_REQUIRED,
    ERR_AUTH_THROTTLED,
    ERR_INVALID_PASSWORD,
    ERR_LINE_TOO_LONG,
    ERR_NO_PASSWORD,
    OK,
    PONG,
    Auth,
    Ping,
    Stats,
    parse,
    stats_line,
    value_lines,
)
from kvgevent.server.auth_throttle import AuthThrottle
from kvgevent.server.connection import Connection
from kvgevent.server.counters import Counters
from kvgevent.server.memory import ERR_OUT_OF_MEMORY, MemoryGuard
from kvgevent.stores.base import DATA_COMMANDS, WRITES, KVStore, Result

REPLY_LINE_WORK = 18
"""Work units of building one reply line (about 180 ns), besides one per 8 of its bytes."""


class TooManyAuthFailures(Exception):
    """A connection sent MAX_AUTH_FAILURES wrong (or refused) AUTHs: the server closes it
    after sending ``reply``, the answer to the last one."""

    def __init__(self, reply: bytes) -> None:
        super().__init__()
        self.reply = reply


class Executor:
    """Applies one client's requests in order; shared by every connection of a server."""

    def __init__(
        self,
        store: KVStore,
        counters: Counters,
        password: bytes | None,
        stats: Callable[[], dict[str, int]],
        guard: MemoryGuard,
        pause: Callable[[], None],
        throttle: AuthThrottle,
        sleep: Callable[[float], None],
        log: Any,
    ) -> None:
        self.store = store
        self.counters = counters
        self.password = password
        self.stats = stats
        self.guard = guard
        self.pause = pause  # waits for the calling client's next turn (Turns.wait)
        self.throttle = throttle
        self.sleep = sleep  # waits for an AUTH's turn (gevent.sleep)
        self.log = log

    def execute(self, conn: Connection, items: list[bytes | ProtocolError]) -> None:
        """Apply parsed requests in order; the one place where errors become ``ERR`` lines.

        Each run of data commands (PUT/GET/UPDATE/DELETE) goes to the store as one batch
        (:meth:`KVStore.apply`), and the replies are queued in chunks, not one per line: at 50
        clients x 16 pipelined GETs, per-line queueing was a fifth of the server's time."""
        counters = self.counters
        counters.commands += len(items)  # counted up front, so a STATS in this batch sees them
        if not conn.authenticated:
            items = self._authenticate(conn, items)
        out: list[bytes] = []
        run: list[Any] = []
        errors = 0
        for item in items:
            cmd = parse(item) if item.__class__ is bytes else item
            kind = cmd.__class__
            if kind in DATA_COMMANDS:
                run.append(cmd)
                continue
            if run:
                errors += self._apply(conn, run, out)
                run = []
            try:
                if kind is Ping:
                    if self.store.needs_barrier:  # PONG only once earlier writes are durable
                        if out:
                            conn.send_lines(out)
                            out = []
                        self.store.barrier(conn.write_mark)
                    out.append(PONG)
                elif kind is Stats:
                    out.append(stats_line(self.stats()))
                elif kind is Auth:
                    out.append(self._check_password(conn, cmd, out))  # type: ignore[arg-type]
                else:  # a ProtocolError, returned by the parser (or the line buffer)
                    errors += 1
                    if cmd is ERR_LINE_TOO_LONG:
                        self._line_too_long(conn)
                    out.append(cmd.reply)  # type: ignore[union-attr]
            except KVError as exc:  # a StoreError from STATS, or a refused AUTH
                errors += 1
                out.append(exc.reply)
            except TooManyAuthFailures as exc:
                counters.errors += errors + 1
                out.append(exc.reply)
                conn.send_lines(out)
                raise
        if run:
            errors += self._apply(conn, run, out)
        if out:
            conn.send_lines(out)
        counters.errors += errors

    def _apply(self, conn: Connection, run: list[Any], out: list[bytes]) -> int:
        """Have the store apply a run of data commands, a turn's work at a time; add the GET
        replies and an ERR per failed command to ``out``, handing full chunks to the writer.
        Returns the errors."""
        errors = 0
        while True:
            try:
                results, work = self._apply_some(conn, run)
            except KVError as exc:  # the store failed as a whole
                out += [exc.reply] * len(run)
                return errors + len(run)
            conn.work += work
            errors += self._replies(conn, run, results, out)
            if len(results) == len(run):
                return errors
            run = run[len(results) :]
            if conn.work >= TURN_WORK:
                self._pause(conn, out)

    def _apply_some(self, conn: Connection, run: list[Any]) -> tuple[list[Result], int]:
        """Apply the first commands of ``run`` within the turn's remaining work; over the
        memory limit, refuse the writes that lead ``run``, or apply what comes before the
        first write."""
        guard = self.guard
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
        store = self.store
        results, work = store.apply_some(run, TURN_WORK - conn.work)
        if store.needs_barrier:  # what this connection's next PING waits for
            conn.write_mark = store.write_position()
        return results, work

    def _replies(self, conn: Connection, run: list[Any], results: list[Result], out: list[bytes]) -> int:
        """Add the replies of ``results`` (of the first commands of ``run``) to ``out``;
        returns the errors among them."""
        errors = 0
        for cmd, values in zip(run, results, strict=False):
            if values:
                if values.__class__ is list:
                    count = len(values)  # type: ignore[arg-type]
                    if (count == 1 and len(values[0]) <= INLINE_REPLY_BYTES) or (  # type: ignore[index]
                        count <= INLINE_REPLY_VALUES and sum(map(len, values)) <= INLINE_REPLY_BYTES  # type: ignore[arg-type]
                    ):
                        out += value_lines(cmd[0], values)  # type: ignore[arg-type]
                        if len(out) >= REPLY_CHUNK:
                            conn.send_lines(out)
                            out.clear()  # send_lines has joined (or queued) the lines already
                    else:
                        self._send_values(conn, cmd[0], values, out)  # type: ignore[arg-type]
                        if conn.work >= TURN_WORK:  # (GETs of single big values add up too)
                            self._pause(conn, out)
                else:  # a KVError
                    errors += 1
                    out.append(values.reply)  # type: ignore[union-attr]
        return errors

    def _send_values(self, conn: Connection, key: bytes, values: list[bytes], out: list[bytes]) -> None:
        """Build and queue a big GET reply in pieces that fit the client's queue, each built
        only once the queue has room for it (so nothing is built for a client that does not
        read), yielding the turn as the work adds up; once the client does not read, count
        the rest as dropped, unbuilt."""
        if out:
            conn.send_lines(out)  # the replies before this one go first
            out.clear()
        prefix = key + b":"
        extra = len(prefix) + 1
        max_lines, max_bytes = conn.chunk_bounds()
        count = len(values)
        index = 0
        while index < count:
            end, size = index + 1, len(values[index]) + extra  # at least one line a piece
            while end < count and end - index < max_lines and size + len(values[end]) + extra <= max_bytes:
                size += len(values[end]) + extra
                end += 1
            if not conn.reserve(end - index, size):  # waits for room, as send() does
                if conn.failed is None:
                    conn.drop(count - index)
                return
            parts: list[bytes] = []
            for value in values[index:end]:
                parts += (prefix, value, b"\n")
            conn.put_reserved(b"".join(parts), end - index)  # one copy of each value
            del parts
            conn.work += REPLY_LINE_WORK * (end - index) + (size >> 3)
            index = end
            if conn.work >= TURN_WORK and index < count:
                self._pause(conn, out)

    def _pause(self, conn: Connection, out: list[bytes]) -> None:
        """End this client's turn: queue the replies built so far, wait for the next turn."""
        if out:
            conn.send_lines(out)
            out.clear()
        self.pause()
        conn.work = 0

    def _authenticate(
        self, conn: Connection, items: list[bytes | ProtocolError]
    ) -> list[bytes | ProtocolError]:
        """Before AUTH succeeds only AUTH and PING are served; returns the items after a
        successful AUTH (to be executed normally), or nothing."""
        out: list[bytes] = []
        rest: list[bytes | ProtocolError] = []
        for index, item in enumerate(items):
            cmd = parse(item) if item.__class__ is bytes else item
            if cmd.__class__ is Auth:
                try:
                    out.append(self._check_password(conn, cmd, out))  # type: ignore[arg-type]
                    rest = items[index + 1 :]
                    break
                except KVError as exc:
                    self.counters.errors += 1
                    out.append(exc.reply)
                except TooManyAuthFailures as exc:
                    self.counters.errors += 1
                    out.append(exc.reply)
                    conn.send_lines(out)
                    raise
            elif cmd.__class__ is Ping:
                out.append(PONG)  # nothing to wait for: this connection has written nothing yet
            elif cmd is ERR_LINE_TOO_LONG:  # the line's length, not its content, is the problem
                self.counters.errors += 1
                self._line_too_long(conn)
                out.append(cmd.reply)
            else:
                self.counters.errors += 1
                out.append(ERR_AUTH_REQUIRED.reply)
        if out:
            conn.send_lines(out)
        return rest

    def _check_password(self, conn: Connection, cmd: Auth, out: list[bytes]) -> bytes:
        """Mark the connection authenticated and return the OK line, or raise the ERR to
        send (TooManyAuthFailures after MAX_AUTH_FAILURES wrong or refused ones). Waits
        first for the client address's turn, if it is throttled (queueing ``out`` before)."""
        if self.password is None:
            raise ERR_NO_PASSWORD.fresh()
        wait = self.throttle.admit(conn.host)
        if wait is None:  # its turn is too far off: refused unchecked
            self.counters.auth_throttled += 1
            self._count_failure(conn, ERR_AUTH_THROTTLED)
            raise ERR_AUTH_THROTTLED.fresh()
        if wait:
            self.counters.auth_throttled += 1
            if out:
                conn.send_lines(out)
                out.clear()
            self.sleep(wait)
        if not hmac.compare_digest(cmd.password, self.password):  # constant time
            # (an authenticated connection stays so, as in Redis: a wrong AUTH changes nothing)
            self.counters.auth_failures += 1
            conn.log.warning("auth_failed", auth_failures=conn.auth_failures + 1)
            began = self.throttle.failed(conn.host)
            if began is not None:
                self.log.warning(
                    "auth_throttled",
                    host=began.host,
                    auth_failures=began.failures,
                    delay_s=began.delay,
                    hint="this address's AUTHs are checked one at a time, further apart after "
                    "each wrong password, until it sends none for a while",
                )
            self._count_failure(conn, ERR_INVALID_PASSWORD)
            raise ERR_INVALID_PASSWORD.fresh()
        conn.authenticated = True
        return OK

    @staticmethod
    def _count_failure(conn: Connection, error: KVError) -> None:
        """One more wrong or refused AUTH on ``conn`` (answered ``error``); too many close it."""
        conn.auth_failures += 1
        if conn.auth_failures >= MAX_AUTH_FAILURES:
            raise TooManyAuthFailures(error.reply)

    def _line_too_long(self, conn: Connection) -> None:
        self.counters.lines_too_long += 1
        conn.long_lines += 1
        if conn.long_lines == 1:  # once per connection: a hostile client cannot flood the log
            conn.log.warning("line_too_long", max_line=conn.buffer.max_line)
