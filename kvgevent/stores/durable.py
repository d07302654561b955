"""DurableStore: the memory store plus an append-only file, replayed at start and compacted
while the server runs.

Every mutation (PUT, UPDATE, DELETE) becomes one record (:mod:`kvgevent.stores.aof`), written
before it is applied (:mod:`kvgevent.stores.aof_log`): a batch the log cannot take is refused with
``ERR persistence failed`` and changes nothing, and while the log is failing every write is
refused that way; reads go on. :meth:`DurableStore.barrier` is what the server calls before
a ``PONG``: under ``--fsync always`` it returns only once the connection's earlier
mutations are on disk, in the file that survives a compaction.

The log's writes are made by one greenlet at a time (the log's writer: the caller itself when
no write is under way), for every batch that came while the last write was made: one write for
all of them, then each applied in the order of its records, under the store's lock. While the
disk is busy or slow the write is made by the log's thread (AppendOnlyLog._write), so the
event loop does not wait for it (on ext4 on a slow device a write made from the loop waited for
the journal, and the whole server with it, for up to 33 s: an attacker's pass); reads are
answered meanwhile, from memory as it was before the batches being written.

Compaction (:mod:`kvgevent.stores.rewrite`) starts when the file has grown enough; one that fails
is logged once, counted and retried with backoff. After a failed fsync the log's recovery
rebuilds the file with the same machinery.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gevent
import gevent.event

from kvgevent.errors import KVError
from kvgevent.logs import Logger, get_logger
from kvgevent.protocol import Delete, Get, Put, Update, parse, request_line
from kvgevent.stores.aof_log import ERR_PERSISTENCE, AppendOnlyLog, Interruption
from kvgevent.stores.base import DATA_COMMANDS, STORE_WAIT, DataCommand, Key, KVStore, key_bytes
from kvgevent.stores.memory import MemoryStore
from kvgevent.stores.rewrite import Aborted, Rewrite
from kvgevent.timings import SLOW_BUCKETS, Timings

DEFAULT_REWRITE_MIN_SIZE = 64 << 20
"""Bytes the file must reach before it is compacted."""

DEFAULT_REWRITE_GROWTH = 2.0
"""Compact when the file is this many times its size after the last rewrite (or load)."""

REWRITE_RETRY_MIN = 1.0
"""Seconds before a failed compaction is tried again..."""

REWRITE_RETRY_MAX = 60.0
"""...doubling up to this (a disk that stays full costs one attempt a minute)."""

Result = list[bytes] | KVError | None


class _Write:
    """A batch for the log's writer: its commands, its mutations, and its results (None until
    it is applied or refused)."""

    __slots__ = ("commands", "mutations", "results")

    def __init__(self, commands: Sequence[DataCommand], mutations: list[DataCommand]) -> None:
        self.commands, self.mutations = commands, mutations
        self.results: list[Result] | None = None


class DurableStore(KVStore):
    """A :class:`MemoryStore` whose mutations are logged to ``path``. Call :meth:`open`
    (replay) before serving; :meth:`close` makes what was written durable, or says how much
    it could not (:attr:`unsaved_records`)."""

    def __init__(
        self,
        path: str,
        fsync: str = "everysec",
        rewrite_min_size: int = DEFAULT_REWRITE_MIN_SIZE,
        rewrite_growth: float = DEFAULT_REWRITE_GROWTH,
        log: Logger | None = None,
    ) -> None:
        super().__init__()
        self.memory = MemoryStore()
        self.applied = self.memory.applied  # (the memory store applies, and counts, every command)
        self.lookup = self.memory.lookup  # reads need no log: the memory store answers them
        self.rewrite_seconds = Timings(SLOW_BUCKETS)  # how long compactions took
        self.lock = self.memory.lock  # one semaphore for the data and the file
        self.log = log if log is not None else get_logger()
        self.aof = AppendOnlyLog(path, fsync, self.log, rebuild=self._rebuild)
        self.rewrite_min_size = rewrite_min_size
        self.rewrite_growth = rewrite_growth
        self.compaction: Rewrite | None = None  # a rewrite writing its snapshot: sees mutations first
        self.closing = False
        self.unsaved_records = 0  # after close(): records that could not be made durable
        self.rewrite_failures = 0
        self._base_size = 0
        self._rewriter: gevent.Greenlet | None = None
        self._retry_at = 0.0
        self._retry_delay = REWRITE_RETRY_MIN
        self._rewrite_failing = False  # a streak of failed compactions (logged once)
        self._queued: list[_Write] = []  # batches for the log's writer's next write
        self._queued_done: gevent.event.Event | None = None  # set once those are applied or refused
        self._writer: Any = None  # the log's writer (a greenlet), while it has work

    def open(self, repair: bool = False) -> dict[str, Any]:
        """Check, repair if asked, and replay the file. Raises aof.AofCorrupt, OSError, or
        ValueError (a record that is not a command); the store is unusable after that."""
        began = time.perf_counter()
        report = self.aof.load(self._replay, repair)
        report["replay_s"] = round(time.perf_counter() - began, 3)
        self._base_size = self.aof.size
        return report

    def _replay(self, payloads: list[bytes]) -> None:
        commands = [parse(p) for p in payloads]
        for command in commands:
            if command.__class__ not in DATA_COMMANDS:
                reason = getattr(command, "reason", type(command).__name__)
                raise ValueError(f"{self.aof.path}: a record that is not a command: {reason}")
        self.memory.apply(commands)  # type: ignore[arg-type]  # (each line was parsed: a data command)

    # --- the store interface ---------------------------------------------------------------

    waits_elsewhere = True  # a batch of writes waits for the disk (in a thread): STORE_WAIT

    def apply(self, commands: Sequence[DataCommand]) -> list[Result]:
        """A batch with mutations is applied once its records are in the file, or refused
        (``ERR persistence failed``) if they could not be written, by the log's writer (the
        module's docstring): the caller itself when no write is under way, else the one
        making it, next. A caller interrupted while another writes for it leaves its batch to
        that one (applied or refused all the same, as its records say); one interrupted while
        it writes (the write itself cannot be stopped) finishes the writing first."""
        mutations = [c for c in commands if c.__class__ is not Get]
        if not mutations:
            return self.memory.apply(commands)
        write = _Write(commands, mutations)
        began = time.perf_counter()
        if self._writer is None:  # no write under way: this caller writes
            self._queued.append(write)
            self._writer = gevent.getcurrent()
            self._write_queued()
        else:
            done = self._queued_done
            if done is None:
                done = self._queued_done = gevent.event.Event()
            self._queued.append(write)
            done.wait()
        STORE_WAIT.set(STORE_WAIT.get() + time.perf_counter() - began)
        if self._rewriter is None and self._should_rewrite():
            self._rewriter = gevent.spawn(self._rewrite_in_background)
        return write.results  # type: ignore[return-value]  # (set before done)

    def _write_queued(self) -> None:
        """As the log's writer: write what is queued, a group at a time, until nothing is.
        An interruption is raised once the group under way is applied; what is queued then
        goes to a writer greenlet of its own, as when the lock's wait was interrupted."""
        interrupted: Interruption = None
        try:
            while self._queued and interrupted is None:
                with self.lock:  # (a compaction's switch may hold it: no new file meanwhile)
                    group, self._queued = self._queued, []
                    done, self._queued_done = self._queued_done, None
                    try:
                        interrupted = self._write_group(group)
                    except Exception as exc:  # a bug: fail the log (a rebuild makes it match memory)
                        self.log.exception("aof_write_error")
                        self.aof.fail_write(exc)
                        for write in group:
                            if write.results is None:
                                write.results = self._refused(write.commands)
                    finally:
                        if done is not None:  # (someone waits: made by the first waiter)
                            done.set()
        finally:
            self._writer = None
            if self._queued:
                self._writer = gevent.spawn(self._write_queued)
        if interrupted is not None:
            raise interrupted

    def _write_group(self, group: list[_Write]) -> Interruption:
        """Write the records of ``group`` in one write (AppendOnlyLog.append: from the loop or
        by the log's thread; the caller holds the lock: no compaction switches files
        meanwhile), then apply each batch in order, or refuse them all. Returns an
        interruption that came during the write (raised by the caller)."""
        written, interrupted = self.aof.append([request_line(c) for write in group for c in write.mutations])
        if written:  # write-ahead
            compaction = self.compaction  # (one may have begun while the write was made)
            for write in group:
                if compaction is not None:
                    compaction.before_mutations(write.mutations)
                write.results = self.memory.apply_under_lock(write.commands)
        else:
            for write in group:
                write.results = self._refused(write.commands)
        return interrupted

    def apply_some(self, commands: Sequence[DataCommand], budget: int) -> tuple[list[Result], int]:
        # Cut the batch before logging it: what is logged must be applied at once.
        count, work = self.memory.affordable(commands, budget)
        return self.apply(commands[:count] if count < len(commands) else commands), work

    def memory_used(self) -> int:
        return self.memory.used_bytes

    def _refused(self, commands: Sequence[DataCommand]) -> list[Result]:
        """The log could not take the batch: reads are answered, every write is refused."""
        data = self.memory.data
        results: list[Result] = []
        for command in commands:
            if command.__class__ is Get:
                values = data.get(command[0])
                results.append(values[:] if values else None)
            else:
                results.append(ERR_PERSISTENCE)
        return results

    def _apply_one(self, command: DataCommand) -> None:
        result = self.apply([command])[0]
        if isinstance(result, KVError):
            raise result.fresh()

    def put(self, key: Key, value: bytes) -> None:
        self._apply_one(Put(key_bytes(key), value))

    def get(self, key: Key) -> list[bytes]:
        return self.memory.get(key)

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        self._apply_one(Update(key_bytes(key), old, new))

    def delete(self, key: Key) -> None:
        self._apply_one(Delete(key_bytes(key)))

    def count_keys(self) -> int:
        return self.memory.count_keys()

    def write_position(self) -> int:
        return self.aof.written

    def barrier(self, position: int | None = None) -> None:
        self.aof.barrier(position)

    def stats(self) -> dict[str, int]:
        return {
            **self.aof.stats(),
            "aof_rewriting": int(self._rewriter is not None),
            "aof_rewrite_failures": self.rewrite_failures,
        }

    def timings(self) -> dict[str, Timings]:
        return {"aof_fsync": self.aof.fsync_seconds, "aof_rewrite": self.rewrite_seconds}

    def not_ready(self) -> str | None:
        if not self.aof.ok:
            return "the append-only file is failing: writes are refused until it recovers"
        return None

    @property
    def needs_barrier(self) -> bool:  # type: ignore[override]  # (a property where the base class has an attribute)
        return self.aof.policy == "always"

    def close(self) -> None:
        """Stop compacting (a compaction under way stops at its next turn), make everything
        written durable if the disk allows, close the file. If some records could not be
        made durable, logs ``aof_unwritten`` and sets :attr:`unsaved_records`. Idempotent."""
        if self.closing:
            return
        self.closing = True
        if self._writer is not None:
            self._writer.join()  # (the batches it has are applied or refused first)
        if self._rewriter is not None:
            self._rewriter.join()
        self.unsaved_records = self.aof.close()
        if self.unsaved_records:
            self.log.error(
                "aof_unwritten",
                path=self.aof.path,
                records=self.unsaved_records,
                hint="these writes were applied but could not be made durable; they may be lost",
            )

    # --- compaction -------------------------------------------------------------------------

    def _should_rewrite(self) -> bool:
        size = self.aof.size
        return (
            size >= self.rewrite_min_size
            and size >= self.rewrite_growth * max(self._base_size, 1)
            and self.aof.failure is None
            and not self.closing
            and time.monotonic() >= self._retry_at
        )

    def rewrite(self) -> None:
        """Compact now and wait for it (for tests and tools): after a compaction under way,
        if any, ends. Failures are handled as for an automatic compaction."""
        if self._rewriter is not None:
            self._rewriter.join()
        self._rewriter = gevent.spawn(self._rewrite_in_background)
        self._rewriter.join()

    def _rewrite_in_background(self) -> None:
        try:
            report = Rewrite(self).run()
        except Aborted:
            pass  # tried again once the log works (never while closing)
        except Exception as exc:
            self._rewrite_failed(exc)
        else:
            self._rewritten(report, "growth")
        finally:
            self._rewriter = None

    def _rebuild(self) -> None:
        """The log's recovery after a failed fsync: rewrite the whole file from memory.
        Raises OSError (the recovery tries again later)."""
        if self._rewriter is not None:
            self._rewriter.join()  # it stops at its next turn: the log is failing
        try:
            report = Rewrite(self, recovery=True).run()
        except Exception:
            self.rewrite_failures += 1
            raise
        self._rewritten(report, "recovery")

    def _rewrite_failed(self, exc: Exception) -> None:
        self.rewrite_failures += 1
        delay = self._retry_delay
        self._retry_at = time.monotonic() + delay
        self._retry_delay = min(delay * 2, REWRITE_RETRY_MAX)
        if self._rewrite_failing or self.aof.failure is not None:
            return  # once per streak; and a failure that fails the log is the log's to report
        self._rewrite_failing = True
        if isinstance(exc, OSError):
            self.log.error(
                "aof_rewrite_failed",
                path=self.aof.path,
                error=exc.strerror or str(exc),
                errno=exc.errno,
                retry_in_s=delay,
            )
        else:  # a bug
            self.log.exception("aof_rewrite_failed", path=self.aof.path, retry_in_s=delay)

    def _rewritten(self, report: dict[str, Any], reason: str) -> None:
        self._base_size = self.aof.size
        self._retry_at, self._retry_delay = 0.0, REWRITE_RETRY_MIN
        self._rewrite_failing = False
        self.rewrite_seconds.observe(report.get("seconds", 0.0))
        self.log.info("aof_rewritten", path=self.aof.path, reason=reason, **report)
