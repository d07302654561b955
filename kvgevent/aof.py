"""The append-only file: its record format, and the log that writes and syncs it.

Format (little-endian)::

    file   = b"KVAOF1\\n" record*
    record = length:u32  crc32(payload):u32  payload[length]
    payload = one protocol request line without its newline: PUT:k:v | UPDATE:k:o:n | DELETE:k

Every record is checked on replay: a record cut short at the end of the file, or a bad last
record, is a torn tail from a crash and is truncated (with a warning); a bad record with data
after it is corruption, and start-up stops with the file name and byte offset (or, with
``repair``, the file is truncated to the last good record). Payloads are parsed with the
server's own parser.

:class:`AppendOnlyLog` appends with ``os.write`` (page cache, microseconds) and runs every
``fsync`` in gevent's threadpool, so the event loop never waits for the disk. Policies:
``always`` (``barrier()`` returns once everything written so far is on disk; concurrent
callers share one fsync), ``everysec`` (a background fsync each second), ``no`` (the OS
decides).
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from .errors import StoreError
from .logs import get_logger

MAGIC = b"KVAOF1\n"
HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 30
"""A length above this cannot be a record: the header itself is damaged."""

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_FSYNC = "everysec"
EVERYSEC_INTERVAL = 1.0
"""Seconds between background fsyncs under ``everysec``."""

ERR_PERSISTENCE = StoreError("persistence failed")


def encode_record(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class AofCorrupt(Exception):
    """A damaged record with data after it: start-up stops unless repairing."""

    def __init__(self, path: str, offset: int, records_after: int, bytes_after: int) -> None:
        self.path, self.offset = path, offset
        self.records_after, self.bytes_after = records_after, bytes_after
        super().__init__(
            f"{path}: corrupt record at byte offset {offset} "
            f"({bytes_after} bytes after it); start with --aof-repair to truncate the file there"
        )


@dataclass
class Scan:
    """What reading a log found: the good records and where they end."""

    payloads: list[bytes] = field(default_factory=list)
    good_end: int = len(MAGIC)  # offset after the last good record
    torn: bool = False  # a cut-short or bad *last* record (a crash mid-write)
    corrupt_at: int | None = None  # a bad record with data after it
    records_after: int = 0  # good-looking records after the corruption (what a repair drops)


def scan(data: bytes) -> Scan:
    """Check and split a whole log file's bytes (pure: no I/O)."""
    result = Scan()
    if not data:
        result.good_end = 0
        return result
    if not data.startswith(MAGIC):
        if MAGIC.startswith(data):  # the header itself was torn
            result.good_end, result.torn = 0, True
        else:
            result.good_end, result.corrupt_at = 0, 0
        return result
    offset, end, unpack, crc = len(MAGIC), len(data), HEADER.unpack_from, zlib.crc32
    payloads = result.payloads
    while offset < end:
        if end - offset < HEADER.size:
            result.torn = True
            break
        length, checksum = unpack(data, offset)
        start, stop = offset + HEADER.size, offset + HEADER.size + length
        if length > MAX_RECORD or stop > end:
            # Cut short by the end of the file (a torn append), unless a good record follows:
            # then it is a damaged length in the middle, and everything after it matters.
            first = _first_good(data, offset + HEADER.size)
            if first is not None:
                result.corrupt_at = offset
                result.records_after = _count_records(data, first)
            else:
                result.torn = True
            break
        payload = data[start:stop]
        if crc(payload) != checksum:
            if stop == end:
                result.torn = True  # the last record, half written
            else:
                result.corrupt_at = offset
                result.records_after = _count_records(data, stop)
            break
        payloads.append(payload)
        offset = stop
    result.good_end = offset
    return result


def _first_good(data: bytes, start: int) -> int | None:
    """Where the first well-formed record (sane length, matching checksum) from ``start`` on
    begins. Only called on a damaged file, so a byte-by-byte search is affordable."""
    end = len(data)
    for offset in range(start, end - HEADER.size + 1):
        length, checksum = HEADER.unpack_from(data, offset)
        stop = offset + HEADER.size + length
        if length and stop <= end and zlib.crc32(data[offset + HEADER.size : stop]) == checksum:
            return offset
    return None


def _count_records(data: bytes, offset: int) -> int:
    """Good records from ``offset`` on (after a bad one whose length looked sane)."""
    count = 0
    while offset + HEADER.size <= len(data):
        length, checksum = HEADER.unpack_from(data, offset)
        stop = offset + HEADER.size + length
        if (
            length > MAX_RECORD
            or stop > len(data)
            or zlib.crc32(data[offset + HEADER.size : stop]) != checksum
        ):
            break
        count += 1
        offset = stop
    return count


def fsync_directory(path: str) -> None:
    """Make a rename in ``path``'s directory durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class AppendOnlyLog:
    """The open log file: appends, fsyncs by policy, reports what it did.

    Not thread-safe: used from greenlets of one hub. ``barrier()`` may yield; nothing else
    does, except the fsyncs, which run in the hub's threadpool."""

    def __init__(self, path: str, fsync: str = DEFAULT_FSYNC, log: Any = None) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        self.path, self.policy = path, fsync
        self.log = log if log is not None else get_logger()
        self.fd = -1
        self.size = 0  # bytes written to the file (and acknowledged by the OS)
        self.synced = 0  # bytes known to be on disk
        self.records = 0  # records since the file was last rewritten
        self.rewrites = 0
        self.fsync_errors = 0
        self.write_errors = 0
        self.last_fsync = time.monotonic()
        self.failed: str | None = None  # why the last write or fsync failed, until one succeeds
        self._pending = b""  # encoded records a failed write could not hand to the OS
        self._syncing = False
        self._wanted = 0  # the size barrier() callers want synced
        self._generation = 0  # which file: changes when a rewrite replaces it
        self._round_done = gevent.event.Event()
        self._ticker: gevent.Greenlet | None = None

    # --- opening --------------------------------------------------------------------------

    def load(self, repair: bool = False) -> tuple[list[bytes], dict[str, Any]]:
        """Read and check the file (creating it if absent), truncate a torn tail (or, with
        ``repair``, a corrupt one), open it for appending. Returns the payloads to replay
        and what was done. Raises AofCorrupt for corruption without ``repair``."""
        stale = self.path + ".rewrite"
        if os.path.exists(stale):  # a rewrite that a crash interrupted: the old log is intact
            os.unlink(stale)
        try:
            with open(self.path, "rb") as existing:
                data = existing.read()
        except FileNotFoundError:
            data = b""
        found = scan(data)
        report: dict[str, Any] = {"records": len(found.payloads), "bytes": len(data)}
        if found.corrupt_at is not None:
            if not repair:
                raise AofCorrupt(
                    self.path, found.corrupt_at, found.records_after, len(data) - found.corrupt_at
                )
            report.update(
                repaired_at=found.corrupt_at,
                dropped_records=1 + found.records_after,
                dropped_bytes=len(data) - found.corrupt_at,
            )
        elif found.torn:
            report.update(truncated_at=found.good_end, dropped_bytes=len(data) - found.good_end)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if found.good_end < len(data):
            os.ftruncate(self.fd, found.good_end)
            os.fsync(self.fd)
        if found.good_end == 0:
            write_all(self.fd, MAGIC)
            os.fsync(self.fd)
            fsync_directory(self.path)
        self.size = self.synced = max(found.good_end, len(MAGIC))
        self.records = len(found.payloads)
        if self.policy == "everysec":
            self._ticker = gevent.spawn(self._every_second)
        return found.payloads, report

    # --- writing --------------------------------------------------------------------------

    def append(self, payloads: list[bytes]) -> None:
        """Write records (one ``os.write``). A failed write keeps them to retry, and is
        logged and counted; it does not raise (``barrier()`` reports it)."""
        data = b"".join([encode_record(p) for p in payloads])
        self.records += len(payloads)
        if self._pending:
            data, self._pending = self._pending + data, b""
        try:
            write_all(self.fd, data)
        except OSError as exc:
            self._pending = data
            self.write_errors += 1
            self._fail("aof_write_failed", exc)
            return
        self.size += len(data)
        if self.failed and self.failed.startswith("write"):
            self.failed = None

    def retry_pending(self) -> None:
        if self._pending:
            self.append([])

    @property
    def has_pending(self) -> bool:
        """Records a failed write could not hand to the OS yet."""
        return bool(self._pending)

    def barrier(self) -> None:
        """Under ``always``: return once everything written so far is on disk. Callers that
        arrive while an fsync runs share the next one (group commit). Raises
        StoreError('persistence failed') if a write or fsync failed. Other policies return
        at once."""
        if self.policy != "always":
            return
        self.retry_pending()
        target = self.size
        while self.synced < target:
            if self._pending:
                raise ERR_PERSISTENCE.fresh()
            self._wanted = max(self._wanted, target)
            if not self._syncing:
                self._syncing = True  # now, not when the greenlet starts: one syncer at a time
                gevent.spawn(self._sync_rounds)
            self._round_done.wait()
            if self.failed:
                raise ERR_PERSISTENCE.fresh()
        if self._pending:
            raise ERR_PERSISTENCE.fresh()

    def sync(self) -> bool:
        """fsync now (in the threadpool); True on success.

        The fsync runs on a duplicate of the descriptor: a rewrite may switch files and close
        the old descriptor meanwhile. It only counts for the file it was made on."""
        target, generation = self.size, self._generation
        fd = os.dup(self.fd)
        try:
            gevent.get_hub().threadpool.apply(os.fsync, (fd,))
        except OSError as exc:
            self.fsync_errors += 1
            self._fail("aof_fsync_failed", exc)
            return False
        finally:
            os.close(fd)
        if generation != self._generation:  # the file was replaced meanwhile (it came synced)
            return True
        self.synced = max(self.synced, target)
        self.last_fsync = time.monotonic()
        if self.failed and self.failed.startswith("fsync"):
            self.failed = None
        return True

    def _sync_rounds(self) -> None:
        """fsync until every barrier() caller is served; each round serves all who were
        waiting when it started (they wait on the event that round sets)."""
        try:
            while True:
                done, self._round_done = self._round_done, gevent.event.Event()
                ok = self.sync()
                done.set()
                if not ok or self.synced >= self._wanted:
                    break
        finally:
            self._syncing = False
            # Callers that began waiting during the last round: let them look again.
            late, self._round_done = self._round_done, gevent.event.Event()
            late.set()

    def _every_second(self) -> None:
        while True:
            gevent.sleep(EVERYSEC_INTERVAL)
            self.retry_pending()
            if self.synced < self.size and not self._syncing:
                self._syncing = True
                try:
                    self.sync()
                finally:
                    self._syncing = False

    def _fail(self, event: str, exc: OSError) -> None:
        self.failed = f"{'write' if 'write' in event else 'fsync'}: {exc.strerror or exc}"
        if self.log is not None:
            self.log.error(event, path=self.path, error=exc.strerror or str(exc), errno=exc.errno)

    # --- switching files (compaction) --------------------------------------------------------

    def replace_with(self, fd: int, size: int, records: int) -> None:
        """Continue on a rewritten file, already synced and renamed over ``path``."""
        old, self.fd = self.fd, fd
        self._generation += 1
        self.size = self.synced = self._wanted = size
        self.records = records
        self.rewrites += 1
        self.last_fsync = time.monotonic()
        os.close(old)

    def close(self) -> None:
        """Write what is pending and fsync (waits for the disk: used at shutdown)."""
        if self._ticker is not None:
            self._ticker.kill()
        if self.fd < 0:
            return
        self.retry_pending()
        try:
            os.fsync(self.fd)
            self.synced = self.size
        except OSError as exc:
            self.fsync_errors += 1
            self._fail("aof_fsync_failed", exc)
        os.close(self.fd)
        self.fd = -1

    def stats(self) -> dict[str, int]:
        return {
            "aof_bytes": self.size,
            "aof_records": self.records,
            "aof_last_fsync_ms": int((time.monotonic() - self.last_fsync) * 1000),
            "aof_rewrites": self.rewrites,
            "aof_fsync_errors": self.fsync_errors,
            "aof_write_errors": self.write_errors,
            "aof_ok": 0 if self.failed else 1,
        }
