"""DurableStore: the memory store plus an append-only file, replayed at start and compacted
while the server runs.

Every applied mutation (PUT, UPDATE, DELETE) becomes one record (:mod:`kvgevent.aof`),
written after the batch is applied in memory and before any reply to it is queued.
:meth:`DurableStore.barrier` is what the server calls before a ``PONG``: under
``--fsync always`` it returns only once every earlier mutation is on disk.

Compaction rewrites the file from the data, without stopping service and without a full copy
of the data up front. The rewrite writes the state as it was when it started (T0): the keys
are listed at T0 and written a chunk at a time between turns of the event loop; a mutation of
a key not yet written first saves that key's T0 values (copy on first write). Records appended
to the old file since T0 are then copied after them, and the last step, with mutations held on
the store's semaphore, copies the final records, fsyncs, renames the new file over the old one
and fsyncs the directory.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import gevent

from .aof import MAGIC, AppendOnlyLog, encode_record, fsync_directory, write_all
from .errors import KVError
from .logs import get_logger
from .protocol import Delete, Get, Put, Update, parse, request_line
from .store import DataCommand, Key, KVStore, MemoryStore, _key

DEFAULT_REWRITE_MIN_SIZE = 64 << 20
"""Bytes the file must reach before it is compacted."""

DEFAULT_REWRITE_GROWTH = 2.0
"""Compact when the file is this many times its size after the last rewrite (or load)."""

REWRITE_CHUNK = 1000
"""Keys written by the rewrite between two turns of the event loop."""

TAIL_FINAL = 1 << 20
"""Bytes of new records left for the final step, which holds mutations while it runs."""

REPLAY_BATCH = 10_000
"""Records applied per batch when replaying."""


class DurableStore(KVStore):
    """A :class:`MemoryStore` whose mutations are logged to ``path``. Call :meth:`open`
    (replay) before serving; :meth:`close` writes and fsyncs what is pending."""

    def __init__(
        self,
        path: str,
        fsync: str = "everysec",
        rewrite_min_size: int = DEFAULT_REWRITE_MIN_SIZE,
        rewrite_growth: float = DEFAULT_REWRITE_GROWTH,
        log: Any = None,
    ) -> None:
        super().__init__()
        self.memory = MemoryStore()
        self.lock = self.memory.lock  # one semaphore for the data and the file
        self.log = log if log is not None else get_logger()
        self.aof = AppendOnlyLog(path, fsync, self.log)
        self.rewrite_min_size = rewrite_min_size
        self.rewrite_growth = rewrite_growth
        self._base_size = 0
        self._rewriter: gevent.Greenlet | None = None
        self._pending_keys: set[bytes] | None = None  # T0 keys the rewrite has not written
        self._saved: dict[bytes, list[bytes]] = {}  # their T0 values, saved on first write
        self.rewrite_failures = 0

    def open(self, repair: bool = False) -> dict[str, Any]:
        """Check, repair if asked, and replay the file. Raises aof.AofCorrupt."""
        payloads, report = self.aof.load(repair)
        began = time.perf_counter()
        apply = self.memory.apply
        for start in range(0, len(payloads), REPLAY_BATCH):
            commands = [parse(p) for p in payloads[start : start + REPLAY_BATCH]]
            bad = [c for c in commands if isinstance(c, KVError)]
            if bad:
                raise ValueError(f"{self.aof.path}: a record that is not a command: {bad[0].reason}")
            apply(commands)  # type: ignore[arg-type]
        report["replay_s"] = round(time.perf_counter() - began, 3)
        self._base_size = self.aof.size
        return report

    # --- the store interface ---------------------------------------------------------------

    def apply(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        if self._pending_keys is not None:
            self._save_first_writes(commands)
        results = self.memory.apply(commands)
        payloads = [request_line(c) for c in commands if c.__class__ is not Get]
        if payloads:
            self.aof.append(payloads)
            if self._rewriter is None and self._should_rewrite():
                self._rewriter = gevent.spawn(self._rewrite)
        return results

    def put(self, key: Key, value: bytes) -> None:
        self.apply([Put(_key(key), value)])

    def get(self, key: Key) -> list[bytes]:
        return self.memory.get(key)

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        self.apply([Update(_key(key), old, new)])

    def delete(self, key: Key) -> None:
        self.apply([Delete(_key(key))])

    def count_keys(self) -> int:
        return self.memory.count_keys()

    def barrier(self) -> None:
        self.aof.barrier()

    def stats(self) -> dict[str, int]:
        return {**self.aof.stats(), "aof_rewriting": int(self._rewriter is not None)}

    @property
    def needs_barrier(self) -> bool:  # type: ignore[override]
        return self.aof.policy == "always"

    def close(self) -> None:
        if self._rewriter is not None:
            self._rewriter.kill()
        self.aof.close()

    # --- compaction -------------------------------------------------------------------------

    def _should_rewrite(self) -> bool:
        size = self.aof.size
        return size >= self.rewrite_min_size and size >= self.rewrite_growth * max(self._base_size, 1)

    def rewrite(self) -> None:
        """Compact now (and wait for it); for tests and tools."""
        if self._rewriter is None:
            self._rewriter = gevent.spawn(self._rewrite)
        self._rewriter.join()

    def _save_first_writes(self, commands: Sequence[DataCommand]) -> None:
        pending, saved, data = self._pending_keys, self._saved, self.memory.data
        for command in commands:
            key = command[0]
            if command.__class__ is not Get and key in pending and key not in saved:  # type: ignore[operator]
                saved[key] = list(data[key])

    def _rewrite(self) -> None:
        path = self.aof.path
        temporary = path + ".rewrite"
        began = time.perf_counter()
        before = self.aof.size
        self.aof.retry_pending()
        if self.aof.has_pending:  # records a failed write still holds would be duplicated
            self.log.warning("aof_rewrite_postponed", path=path, reason="a write to the log is failing")
            self._base_size = self.aof.size
            self._rewriter = None
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        reader = -1
        try:
            write_all(fd, MAGIC)
            size, records = len(MAGIC), 0
            data = self.memory.data
            keys = list(data)  # T0
            self._pending_keys, self._saved = set(keys), {}
            tail_from, tail_records_from = self.aof.size, self.aof.records
            for start in range(0, len(keys), REWRITE_CHUNK):
                parts: list[bytes] = []
                for key in keys[start : start + REWRITE_CHUNK]:
                    values = self._saved.pop(key) if key in self._saved else data.get(key)
                    self._pending_keys.discard(key)
                    if values:
                        prefix = b"PUT:" + key + b":"
                        parts += [encode_record(prefix + value) for value in values]
                        records += len(values)
                blob = b"".join(parts)
                write_all(fd, blob)
                size += len(blob)
                gevent.sleep(0)  # the rest of the server runs between chunks
            self._pending_keys, self._saved = None, {}
            # The records appended since T0, copied as they are.
            reader = os.open(path, os.O_RDONLY)
            copied = tail_from
            while self.aof.size - copied > TAIL_FINAL:
                chunk = os.pread(reader, min(1 << 20, self.aof.size - copied), copied)
                write_all(fd, chunk)
                copied += len(chunk)
                size += len(chunk)
                gevent.sleep(0)
            pool = gevent.get_hub().threadpool
            with self.lock:  # no mutation until the new file is in place
                self.aof.retry_pending()
                if self.aof.has_pending:
                    raise OSError("records could not be written to the current log")
                while copied < self.aof.size:
                    chunk = os.pread(reader, self.aof.size - copied, copied)
                    write_all(fd, chunk)
                    copied += len(chunk)
                    size += len(chunk)
                pool.apply(os.fsync, (fd,))
                os.rename(temporary, path)
                # From the rename on, the new file is the log: switch before anything can fail.
                self.aof.replace_with(fd, size, records + self.aof.records - tail_records_from)
                fd = -1
                try:
                    pool.apply(fsync_directory, (path,))
                except OSError as exc:
                    self.log.error("aof_directory_fsync_failed", path=path, error=str(exc))
            self._base_size = size
            if self.log is not None:
                self.log.info(
                    "aof_rewritten",
                    path=path,
                    bytes_before=before,
                    bytes_after=size,
                    records=self.aof.records,
                    seconds=round(time.perf_counter() - began, 3),
                )
        except Exception as exc:
            self.rewrite_failures += 1
            self._base_size = self.aof.size  # try again only once the file has grown as much again
            if self.log is not None:
                self.log.error("aof_rewrite_failed", path=path, error=str(exc))
            try:
                os.unlink(temporary)
            except OSError:
                pass
        finally:
            self._pending_keys, self._saved = None, {}
            if fd >= 0:
                os.close(fd)
            if reader >= 0:
                os.close(reader)
            self._rewriter = None
