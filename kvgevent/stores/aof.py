"""The append-only file's format, and reading it back. Pure: no gevent, no sockets.

Format (little-endian)::

    file    = b"KVAOF1\\n" record*
    record  = length:u32  crc32(payload):u32  payload[length]
    payload = one request line without its newline: PUT:k:v | UPDATE:k:o:n | DELETE:k

A payload is never empty and never holds a newline (a request line cannot).

Reading (:class:`Scanner`) streams the file: memory is bounded by one read of
:data:`READ_CHUNK` or the largest record, never by the file. The first record that fails
its checks (a length of 0, a length past the end of the file, a checksum that does not
match) ends the good part of the file, and what follows it decides what it is:

* no well-formed record anywhere after it: a **torn tail**, what a crash leaves (a record
  cut short, or NUL bytes where the file's new size reached the disk before its data). It is
  truncated, with a warning.
* a well-formed record after it: **corruption**. Start-up stops with the file and the byte
  offset, unless repairing, which truncates there (dropping what follows).

Finding the next well-formed record is linear in the file's size: only offsets where a
payload could begin (a request verb, found by a regular expression in C) are checked, a
check stops at the first newline, and the checksum work has a budget of a few times the
bytes searched; past it the search gives up and calls the damage corruption (the safe
answer: nothing is dropped without ``--aof-repair``).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

MAGIC = b"KVAOF1\n"
HEADER = struct.Struct("<II")
MAX_RECORD = 1 << 30
"""A length above this cannot be a record: the header itself is damaged."""

READ_CHUNK = 1 << 20
"""Bytes read from the file at a time while scanning it."""

REPLAY_BATCH = 10_000
"""Most records handed to the store in one batch when replaying..."""

REPLAY_BATCH_BYTES = 4 << 20
"""...and most payload bytes: a batch of big values stays small beside the data."""

SEARCH_BUDGET = 4
"""Checksum work allowed when searching for a good record after a damaged one, in multiples
of the bytes searched (plus READ_CHUNK): keeps the search linear on any input."""

_NEWLINE = ord("\n")  # (an int: ``in`` on bytes is then a memchr, not the buffer protocol)

RECORD_START = re.compile(rb"PUT:|UPDATE:|DELETE:")
"""How every payload kvgevent writes begins: where a well-formed record can be."""

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, count)``: up to ``count`` bytes of the file from ``offset`` on."""


def encode_record(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


class AofCorrupt(Exception):
    """A damaged record with good records after it: start-up stops unless repairing."""

    def __init__(self, path: str, offset: int, records_after: int | None, bytes_after: int) -> None:
        self.path, self.offset = path, offset
        self.records_after, self.bytes_after = records_after, bytes_after
        super().__init__(
            f"{path}: corrupt record at byte offset {offset} "
            f"({bytes_after} bytes after it); start with --aof-repair to truncate the file there"
        )


@dataclass
class Scan:
    """What reading a log found."""

    size: int = 0  # bytes in the file
    records: int = 0  # good records, from the start
    good_end: int = 0  # offset after the last good record (0: no valid header either)
    torn: bool = False  # damage with nothing well-formed after it (a crash mid-write)
    corrupt_at: int | None = None  # damage with a well-formed record after it
    records_after: int | None = 0  # well-formed records after the damage, all of them (None: not known)


class _GaveUp(Exception):
    """The search for a good record used up its budget."""


class Scanner:
    """Streams the records of one log file through ``read_at``.

    Iterate :meth:`batches` for the good records (payloads, in order); once it is exhausted,
    :attr:`result` says where they end and what follows. :attr:`bytes_read` counts every
    byte asked of ``read_at`` (the tests check with it that scanning is linear)."""

    def __init__(self, read_at: ReadAt, size: int) -> None:
        self._read_at = read_at
        self.size = size
        self.result = Scan(size=size)
        self.bytes_read = 0
        # Checksum work left for the searches after damage (see _find_record).
        self._budget = SEARCH_BUDGET * size + READ_CHUNK

    def _read(self, offset: int, count: int) -> bytes:
        data = self._read_at(offset, count)
        self.bytes_read += len(data)
        return data

    def batches(
        self, max_records: int = REPLAY_BATCH, max_bytes: int = REPLAY_BATCH_BYTES
    ) -> Iterator[list[bytes]]:
        """The good records' payloads, in batches of at most ``max_records`` records and
        about ``max_bytes`` bytes."""
        result = self.result
        if not self._has_magic():
            return
        batch: list[bytes] = []
        size = 0
        walk = self._walk(len(MAGIC))
        for payload in walk:
            batch.append(payload)
            size += len(payload)
            if len(batch) >= max_records or size >= max_bytes:
                result.records += len(batch)
                yield batch
                batch, size = [], 0
        result.records += len(batch)
        if batch:
            yield batch
        result.good_end = self._stopped_at
        if result.good_end < self.size:
            self._classify_damage(result.good_end)

    # --- reading records --------------------------------------------------------------------

    def _has_magic(self) -> bool:
        """Check the header; when there is none, record what the file is instead."""
        result = self.result
        if self.size == 0:
            return False  # a new file
        head = self._read(0, len(MAGIC))
        if head == MAGIC:
            return True
        common = next((i for i, (a, b) in enumerate(zip(head, MAGIC, strict=False)) if a != b), len(head))
        if not head[common:].strip(b"\0") and self._zeros_from(len(head)):
            result.torn = True  # the header itself was cut short, or only its size reached the disk
        else:
            result.corrupt_at = 0  # not a kvgevent log, or one whose header is damaged:
            result.records_after = self._records_from(0)  # (then what a repair would drop)
        return False

    def _walk(self, offset: int) -> Iterator[bytes]:
        """Good records from ``offset`` on; sets ``_stopped_at`` to where they end."""
        size, unpack, crc = self.size, HEADER.unpack_from, zlib.crc32
        buffer, base = b"", offset  # file bytes from ``base`` on
        self._stopped_at = offset
        while offset < size:
            if size - offset < HEADER.size:
                return
            if offset + HEADER.size > base + len(buffer):
                buffer, base = self._refill(buffer, base, offset, HEADER.size)
            length, checksum = unpack(buffer, offset - base)
            end = offset + HEADER.size + length
            if not 0 < length <= MAX_RECORD or end > size:
                return
            if end <= base + len(buffer):
                payload = buffer[offset + HEADER.size - base : end - base]
            elif length > READ_CHUNK:
                # Checked in chunks before it is read whole (a damaged length must not make
                # the scan allocate what it claims), then read on its own: one copy, not two.
                if not self._payload_matches(offset + HEADER.size, length, checksum):
                    return
                payload = self._read(offset + HEADER.size, length)
                buffer, base = b"", end
            else:
                buffer, base = self._refill(buffer, base, offset, end - offset)
                payload = buffer[HEADER.size : end - base]
            if len(payload) != length:
                return  # the file is shorter than its size said
            if crc(payload) != checksum:
                return
            offset = self._stopped_at = end
            yield payload

    def _refill(self, buffer: bytes, base: int, offset: int, need: int) -> tuple[bytes, int]:
        """The buffer from ``offset`` on, holding at least ``need`` bytes where the file has them."""
        kept = buffer[offset - base :]
        more = self._read(offset + len(kept), max(READ_CHUNK, need - len(kept)))
        return kept + more, offset

    def _zeros_from(self, offset: int) -> bool:
        while offset < self.size:
            chunk = self._read(offset, READ_CHUNK)
            if not chunk:
                return True
            if chunk.strip(b"\0"):
                return False
            offset += len(chunk)
        return True

    # --- after damage -----------------------------------------------------------------------

    def _classify_damage(self, offset: int) -> None:
        result = self.result
        self._budget = SEARCH_BUDGET * (self.size - offset) + READ_CHUNK
        try:
            found = self._find_record(offset + 1)
        except _GaveUp:
            result.corrupt_at, result.records_after = offset, None
            return
        if found is None:
            result.torn = True
            return
        result.corrupt_at = offset
        result.records_after = self._records_from(found)

    def _records_from(self, offset: int) -> int:
        """How many well-formed records there are from ``offset`` on, past any damage between
        them (what a repair at ``offset`` drops, besides the damaged records, which cannot be
        counted): at least that many if the search's budget runs out."""
        count = 0
        try:
            found = self._find_record(offset)
            while found is not None:
                count += sum(1 for _ in self._walk(found))
                found = self._find_record(self._stopped_at + 1) if self._stopped_at < self.size else None
        except _GaveUp:
            pass
        return count

    def _find_record(self, start: int) -> int | None:
        """Offset of the first well-formed record that begins at or after ``start``; the
        checksum work it does comes out of ``_budget``, shared by every search of the scan
        (_GaveUp once it is spent: the searches stay linear in the file's size)."""
        budget = self._budget
        window_start = start + HEADER.size  # where the earliest possible payload begins
        overlap = len(b"UPDATE:") - 1  # a verb cut by the window's end is found in the next
        while window_start < self.size:
            window = self._read(window_start, READ_CHUNK + overlap)
            if not window:
                return None
            for match in RECORD_START.finditer(window):
                at = match.start()
                if at >= READ_CHUNK:
                    break
                if at >= HEADER.size:
                    header = window[at - HEADER.size : at]
                else:
                    header = self._read(window_start + at - HEADER.size, HEADER.size)
                length, checksum = HEADER.unpack(header)
                payload_at = window_start + at
                if not len(match.group()) <= length <= MAX_RECORD or payload_at + length > self.size:
                    continue  # (a payload holds at least its verb: never empty)
                budget -= length
                if budget < 0:
                    raise _GaveUp
                if self._payload_matches(payload_at, length, checksum):
                    self._budget = budget
                    return payload_at - HEADER.size
            window_start += READ_CHUNK
        self._budget = budget
        return None

    def _payload_matches(self, offset: int, length: int, checksum: int) -> bool:
        crc = 0
        end = offset + length
        while offset < end:
            chunk = self._read(offset, min(READ_CHUNK, end - offset))
            if not chunk or _NEWLINE in chunk:  # a payload never holds a newline
                return False
            crc = zlib.crc32(chunk, crc)
            offset += len(chunk)
        return crc == checksum


def scan(data: bytes) -> tuple[list[bytes], Scan]:
    """Scan a whole log held in memory: its good payloads and what follows them."""
    scanner = Scanner(lambda offset, count: data[offset : offset + count], len(data))
    payloads = [payload for batch in scanner.batches() for payload in batch]
    return payloads, scanner.result
