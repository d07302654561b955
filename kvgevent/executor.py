"""Applying requests: the one place where commands meet the store and errors become replies.

:class:`Executor` takes the items a client's :class:`~kvgevent.protocol.LineBuffer` produced
(request lines, or too-long markers), parses them, hands each run of data commands to the
store in one call (:meth:`~kvgevent.store.KVStore.apply`), answers PING, STATS and AUTH
itself, and queues the replies on the connection in chunks. It does no I/O of its own.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from .config import MAX_AUTH_FAILURES, REPLY_CHUNK
from .connection import Connection, Counters
from .errors import KVError, ProtocolError
from .protocol import (
    ERR_AUTH_REQUIRED,
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
from .store import DATA_COMMANDS, KVStore


class TooManyAuthFailures(Exception):
    """A connection sent MAX_AUTH_FAILURES wrong passwords: the server closes it."""


class Executor:
    """Applies one client's requests in order; shared by every connection of a server."""

    def __init__(
        self, store: KVStore, counters: Counters, password: bytes | None, stats: Callable[[], dict[str, int]]
    ) -> None:
        self.store = store
        self.counters = counters
        self.password = password
        self.stats = stats

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
                    out.append(self._check_password(conn, cmd))  # type: ignore[arg-type]
                else:  # a ProtocolError, returned by the parser (or the line buffer)
                    errors += 1
                    if cmd is ERR_LINE_TOO_LONG:
                        self._line_too_long(conn)
                    out.append(cmd.reply)  # type: ignore[union-attr]
            except KVError as exc:  # a StoreError from STATS, or a refused AUTH
                errors += 1
                out.append(exc.reply)
            except TooManyAuthFailures:
                counters.errors += errors + 1
                out.append(ERR_INVALID_PASSWORD.reply)
                conn.send_lines(out)
                raise
        if run:
            errors += self._apply(conn, run, out)
        if out:
            conn.send_lines(out)
        counters.errors += errors

    def _apply(self, conn: Connection, run: list[Any], out: list[bytes]) -> int:
        """Have the store apply a run of data commands; add the GET replies and an ERR per
        failed command to ``out``, handing full chunks to the writer. Returns the errors."""
        store = self.store
        try:
            results = store.apply(run)
        except KVError as exc:  # the store failed as a whole
            out += [exc.reply] * len(run)
            return len(run)
        if store.needs_barrier:  # what this connection's next PING waits for
            conn.write_mark = store.write_position()
        errors = 0
        for cmd, values in zip(run, results, strict=True):
            if values:
                if values.__class__ is list:
                    out += value_lines(cmd[0], values)  # type: ignore[arg-type]
                    if len(out) >= REPLY_CHUNK:
                        conn.send_lines(out)
                        out.clear()  # send_lines has joined (or queued) the lines already
                else:  # a KVError
                    errors += 1
                    out.append(values.reply)  # type: ignore[union-attr]
        return errors

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
                    out.append(self._check_password(conn, cmd))  # type: ignore[arg-type]
                    rest = items[index + 1 :]
                    break
                except KVError as exc:
                    self.counters.errors += 1
                    out.append(exc.reply)
                except TooManyAuthFailures:
                    self.counters.errors += 1
                    out.append(ERR_INVALID_PASSWORD.reply)
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

    def _check_password(self, conn: Connection, cmd: Auth) -> bytes:
        """Mark the connection authenticated and return the OK line, or raise the ERR to
        send (TooManyAuthFailures after MAX_AUTH_FAILURES wrong ones)."""
        if self.password is None:
            raise ERR_NO_PASSWORD.fresh()
        if not hmac.compare_digest(cmd.password, self.password):  # constant time
            # (an authenticated connection stays so, as in Redis: a wrong AUTH changes nothing)
            self.counters.auth_failures += 1
            conn.auth_failures += 1
            conn.log.warning("auth_failed", auth_failures=conn.auth_failures)
            if conn.auth_failures >= MAX_AUTH_FAILURES:
                raise TooManyAuthFailures
            raise ERR_INVALID_PASSWORD.fresh()
        conn.authenticated = True
        return OK

    def _line_too_long(self, conn: Connection) -> None:
        self.counters.lines_too_long += 1
        conn.long_lines += 1
        if conn.long_lines == 1:  # once per connection: a hostile client cannot flood the log
            conn.log.warning("line_too_long", max_line=conn.buffer.max_line)
