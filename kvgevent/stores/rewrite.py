"""Compaction: rewriting the append-only file from the data while the server serves.

A :class:`Rewrite` writes the state as it was when it began (T0), then the records appended
since, and switches the log to the new file:

1. **Snapshot.** The keys are listed at T0 and their values written as ``PUT`` records, at
   most :data:`TURN_BYTES` or :data:`TURN_RECORDS` per turn of the event loop; a key with
   many or big values is split across turns. A key's first mutation meanwhile saves its
   values first (copy on first write: a list of references, not of bytes). Values
   are written from where they are (``pwritev``, no copy), in gevent's threadpool, so the
   event loop never waits for the disk; the checksum of a very big value is computed there
   too (zlib releases the GIL).
2. **Tail.** The records appended to the old file since T0 are copied as they are, in the
   threadpool, until less than :data:`TAIL_FINAL` is left; the bulk is fsynced (no lock
   held), and the copy catches up again.
3. **Switch**, under the store's lock: the last records are copied, under ``--fsync always``
   the new file is fsynced (what came during the last fsync without the lock), and it is
   renamed over the old one; the log appends to it from then on
   (:meth:`AppendOnlyLog.switch_to`): the path always names a file with every record
   accepted, whenever the process is killed.
4. **In place**, with no lock: fsync the new file again (what was appended since the switch,
   and under the other policies what the switch copied) and the directory. Only then do
   positions written after T0 count as durable, so a ``PONG`` under ``--fsync always``
   always waits for the file that survives a power loss. A failure here leaves the log
   failing (writes refused) until a rebuild succeeds.

Memory: the list of T0 keys (8 bytes a key), the lists saved by copy on first write
(references, not bytes; a deleted value stays alive until the snapshot is written), and one
turn of records (about 1 MiB). A compaction never leaves less than :data:`RESERVE_FRACTION` of the
disk free: it stops and is retried later instead.
"""

from __future__ import annotations

import errno
import os
import stat
import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol

from gevent.lock import Semaphore

from kvgevent.stores.aof import HEADER, MAGIC
from kvgevent.stores.aof_log import (
    REWRITE_SUFFIX,
    AppendOnlyLog,
    FileTaken,
    file_taken,
    foreign_file,
    in_thread,
    lock,
    pwrite_all,
)
from kvgevent.stores.memory import MemoryStore


class Compacted(Protocol):
    """What a compaction needs of the store whose log it rewrites (a DurableStore): its data,
    its lock, its log, and where to say that a compaction is under way."""

    memory: MemoryStore
    lock: Semaphore
    aof: AppendOnlyLog
    closing: bool
    compaction: Any


TURN_BYTES = 1 << 20
"""Most bytes of records prepared between two turns of the event loop."""

TURN_RECORDS = 500
"""Most records encoded in one turn: enough to make progress, few enough that a turn stays a
couple of milliseconds (bench/OPTIMISATIONS.md, "compaction turns")."""

JOIN_BELOW = 4096
"""Values shorter than this are copied into one buffer with their header; longer ones are
handed to ``pwritev`` where they are."""

CRC_IN_THREAD = 4 << 20
"""Values at least this long get their checksum in the threadpool: their CRC would hold the
event loop for a millisecond or more (bench/OPTIMISATIONS.md, "CRC in the threadpool")."""

TAIL_FINAL = 1 << 20
"""Bytes of new records left for the switch, which holds mutations while it copies them."""

COPY_CHUNK = 1 << 20
"""Bytes copied from the old file to the new one per read."""

RESERVE_FRACTION = 0.05
"""A compaction stops (and is retried later) rather than leave less than this share of the
disk free: the log's own appends must not fail because a compaction took the last bytes..."""

RESERVE_MAX = 64 << 20
"""...but never asks for more than this."""


class Aborted(Exception):
    """The log started failing, or the store is closing: the old file stays the log."""


def copy_range(source: int, target: int, start: int, end: int, offset: int) -> int:
    """Copy bytes ``start:end`` of ``source`` to ``target`` at ``offset``; returns the count."""
    copied = 0
    while start < end:
        chunk = os.pread(source, min(COPY_CHUNK, end - start), start)
        if not chunk:
            raise OSError(errno.EIO, "the log is shorter than its records")
        pwrite_all(target, [chunk], offset)
        start += len(chunk)
        offset += len(chunk)
        copied += len(chunk)
    return copied


class Rewrite:
    """One compaction of a :class:`~kvgevent.stores.durable.DurableStore`'s file.

    ``recovery``: a rebuild while the log is failing (writes are refused meanwhile, so no
    record is appended during it); it goes on despite the failure, which an ordinary
    compaction does not."""

    def __init__(self, store: Compacted, recovery: bool = False) -> None:
        self.store = store
        self.aof = store.aof
        self.recovery = recovery
        self.path = self.aof.path
        self.temporary = self.path + REWRITE_SUFFIX
        self.saved: dict[bytes, list[bytes]] = {}  # T0 values, saved on first write
        self.fd = -1
        self.size = 0  # bytes in the new file
        self.records = 0
        self.copied = 0  # offset in the old file up to which records are copied
        self.tail_records_from = 0
        self.held = 0.0  # seconds the switch held the store's lock (mutations waited)
        self._buffers: list[bytes] = []  # the turn being prepared
        self._turn_bytes = self._turn_records = 0

    def before_mutations(self, commands: Sequence[Any]) -> None:
        """Called (with the lock held) before the store applies mutations while the snapshot
        is written: save the values of each key on its first mutation. Those are its T0
        values if the snapshot has not written it yet; for a key written already (or made
        since T0) the copy is not needed, but telling them apart would take a set of every
        T0 key, whose making stalls the server (bench/OPTIMISATIONS.md, "T0 keys"). A key absent now and not
        saved was not in T0 or is written already (a T0 key's deletion saves it), so it costs
        nothing."""
        saved, data = self.saved, self.store.memory.data
        for command in commands:
            key = command[0]
            if key not in saved:
                values = data.get(key)
                if values is not None:
                    saved[key] = list(values)

    def run(self) -> dict[str, Any]:
        """Compact; returns what to log. Raises Aborted, or OSError (the old file stays the
        log if it is raised before the switch; after it, the log is failing)."""
        self._check()
        _not_anothers(self.path, self.aof.fd)  # (before the work: a rebuild retries each second)
        began = time.perf_counter()
        before = self.aof.size
        self._create()
        try:
            self.size = pwrite_all(self.fd, [MAGIC], 0)
            self._write_snapshot()
            self._copy_tail(TAIL_FINAL)
            in_thread(os.fsync, self.fd)  # the bulk, with no lock held
            self._copy_tail(TAIL_FINAL)
            in_thread(os.fsync, self.fd)  # the rest but what comes meanwhile, still no lock
            old = self._switch()
        except BaseException:  # (the switch is all or nothing: the old file is still the log)
            os.close(self.fd)
            try:
                os.unlink(self.temporary)
            except OSError:
                pass
            raise
        self._put_in_place(old)
        return {
            "bytes_before": before,
            "bytes_after": self.aof.size,
            "records": self.aof.records,
            "seconds": round(time.perf_counter() - began, 3),
            "writes_held_s": round(self.held, 3),
        }

    def _create(self) -> None:
        try:
            os.unlink(self.temporary)  # a fresh file, even if a failed switch left this name
        except FileNotFoundError:
            pass
        self.fd = os.open(self.temporary, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        lock(self.fd)  # (renamed over the log's path: locked as the log is)
        # It takes the log's place: its permissions and owner too (an operator's 0600 log,
        # owned by the service's user, must not come back readable by all, owned by root).
        log = os.fstat(self.aof.fd)
        os.fchmod(self.fd, stat.S_IMODE(log.st_mode))
        if (log.st_uid, log.st_gid) != (os.geteuid(), os.getegid()):
            try:
                os.fchown(self.fd, log.st_uid, log.st_gid)
            except PermissionError:  # (not root: the file stays ours, as a new log would be)
                pass

    def _check(self, writing: int = 0) -> None:
        """Stop unless the compaction should go on and ``writing`` more bytes leave the disk
        its reserve (a rebuild, which runs while writes are refused anyway, takes what it needs)."""
        if self.recovery:
            return
        if self.store.closing:
            raise Aborted("the store is closing")
        if self.aof.failure is not None:
            raise Aborted("the log is failing")
        if writing:
            disk = os.statvfs(os.path.dirname(os.path.abspath(self.path)))
            reserve = min(RESERVE_MAX, int(disk.f_blocks * disk.f_frsize * RESERVE_FRACTION))
            if disk.f_bavail * disk.f_frsize - writing < reserve:
                raise OSError(errno.ENOSPC, f"compaction stopped to keep {reserve} bytes free for the log")

    # --- 1. the snapshot ----------------------------------------------------------------------

    def _write_snapshot(self) -> None:
        store = self.store
        data = store.memory.data
        # T0: no yield from here... A tuple, not a list: the garbage collector stops tracking
        # a tuple of bytes after one look, while every full collection would walk a list of
        # the keys again (bench/OPTIMISATIONS.md, "T0 keys").
        keys = tuple(data)
        self.copied, self.tail_records_from = self.aof.size, self.aof.records
        store.compaction = self  # ...to here
        try:
            for key in keys:
                self._write_key(key, data)
            self._flush()
        finally:
            store.compaction = None
            self.saved = {}

    def _write_key(self, key: bytes, data: dict[bytes, list[bytes]]) -> None:
        prefix = b"PUT:" + key + b":"
        seed = zlib.crc32(prefix)
        saved = self.saved
        index = 0
        while True:
            # Looked up after every turn: a mutation may have saved the T0 list meanwhile.
            values = saved[key] if key in saved else data.get(key, ())
            if index >= len(values):
                break
            value = values[index]
            index += 1
            if len(value) >= CRC_IN_THREAD:
                self._flush()
                self._write_big(prefix, seed, value)
                continue
            header = HEADER.pack(len(prefix) + len(value), zlib.crc32(value, seed))
            if len(value) < JOIN_BELOW:
                self._buffers.append(b"".join((header, prefix, value)))
            else:
                self._buffers += (header, prefix, value)
            self._turn_bytes += HEADER.size + len(prefix) + len(value)
            self._turn_records += 1
            if self._turn_bytes >= TURN_BYTES or self._turn_records >= TURN_RECORDS:
                self._flush()
        saved.pop(key, None)

    def _flush(self) -> None:
        """Write the turn's records in the threadpool (other greenlets run meanwhile)."""
        self._check(self._turn_bytes)
        if self._buffers:
            self.size += in_thread(pwrite_all, self.fd, self._buffers, self.size)
            self.records += self._turn_records
        self._buffers = []
        self._turn_bytes = self._turn_records = 0

    def _write_big(self, prefix: bytes, seed: int, value: bytes) -> None:
        self._check(HEADER.size + len(prefix) + len(value))

        def write(fd: int, offset: int) -> int:  # in a thread: the checksum too
            header = HEADER.pack(len(prefix) + len(value), zlib.crc32(value, seed))
            return pwrite_all(fd, [header, prefix, value], offset)

        self.size += in_thread(write, self.fd, self.size)
        self.records += 1

    # --- 2. the tail, 3. the switch, 4. in place -------------------------------------------------

    def _copy_tail(self, leave: int) -> None:
        while self.aof.size - self.copied > leave:
            end = self.aof.size
            self._check(end - self.copied)
            self.size += in_thread(copy_range, self.aof.fd, self.fd, self.copied, end, self.size)
            self.copied = end

    def _switch(self) -> int:
        """Copy the last records and rename the new file over the log's path, then append to
        it: all under the store's lock, so that the path names, at every moment, a file with
        every record accepted (a kill -9 after a switch that left the new file under its
        temporary name lost the records appended since: the restart replays the path and
        deletes the temporary file). Mutations wait meanwhile, reads do not.

        Under ``--fsync always`` the new file is fsynced before the rename (after a power
        loss the name may point to the new file, and a PONG may have been given for what
        came during the last fsync without the lock: it was on disk in the old file). Under
        the other policies nothing was promised for those records, and that fsync is left to
        :meth:`_put_in_place`, with no lock held: on a slow disk it held every write for 9 to
        18 s (an attacker's pass: ext4 over a throttled device), and Redis too fsyncs a
        rewritten file after its rename but under ``always``. Returns the old file's
        descriptor (see :meth:`_put_in_place`)."""
        aof = self.aof
        with self.store.lock:  # no mutation until the log appends to the new file
            began = time.perf_counter()
            try:
                return self._switch_held(aof)
            finally:
                self.held = time.perf_counter() - began

    def _switch_held(self, aof: AppendOnlyLog) -> int:
        """:meth:`_switch`'s work, with the lock held."""
        self._check()
        self.size += copy_range(aof.fd, self.fd, self.copied, aof.size, self.size)
        self.copied = aof.size
        if aof.policy == "always":
            in_thread(os.fsync, self.fd)
            self._check()  # (again: the log may have failed meanwhile)
        _not_anothers(self.path, aof.fd)
        # The records copied from the old file are only good while it is the log: cut
        # (copytruncate) during the compaction, the copy holds its NUL bytes. Then the old
        # file stays the log, and the look finds it taken and rebuilds it from memory. (A
        # rebuild copies nothing from it: writes are refused while it runs.)
        taken = None if self.recovery else file_taken(aof.fd, self.path, aof.size)
        if taken is not None:
            raise OSError(errno.EIO, f"the log's file was {taken} during the compaction")
        # (nothing yields after this)
        # In the event loop: no wait, the old file's pages stay held by the log's descriptor.
        os.rename(self.temporary, self.path)
        return aof.switch_to(self.fd, self.size, self.records + aof.records - self.tail_records_from)

    def _put_in_place(self, old: int) -> None:
        """Close the old file (``old``, its descriptor), fsync the new one (what was appended
        since the switch, and what the switch copied unless it fsynced) and the directory;
        then the log's positions count as durable (and nothing yields until the caller has
        logged the compaction)."""
        position, records = self.aof.written, self.aof.written_records
        try:
            # The old file loses its last reference here, and the kernel frees its page cache
            # in the call: in the threadpool (bench/OPTIMISATIONS.md, "the rename's page
            # cache"). (A kill while this waits leaves the close to the thread, which runs it
            # anyway: closing it here too could close a descriptor number reused meanwhile.)
            in_thread(_close, old)
            in_thread(os.fsync, self.fd)
            in_thread(self.aof.sync_directory)
        except BaseException as exc:  # killed too: the log must not believe the file is in place
            failure = exc if isinstance(exc, Exception) else OSError(errno.EINTR, "interrupted")
            self.aof.finish_switch(position, records, failure)
            raise
        self.aof.finish_switch(position, records, None)


def _not_anothers(path: str, fd: int) -> None:
    """Raise FileTaken if a file the server did not put there is at the log's ``path`` (the
    log's own file, open as ``fd``, was taken away, and another server started on the path,
    or an operator moved a file there): a rename over it would lose that file."""
    if foreign_file(path, fd):
        raise FileTaken(errno.EEXIST, f"{path} is a file this server did not put there: move it away")


def _close(fd: int) -> None:
    """Close ``fd``; an error is of no consequence (nothing is written through it any more)."""
    try:
        os.close(fd)
    except OSError:
        pass
