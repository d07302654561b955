"""The open append-only file: writing records, syncing them by policy, and what happens when
the disk fails.

Positions. Every byte appended since the file was opened has a place in one sequence,
:attr:`AppendOnlyLog.written`, that goes on across compactions (which replace the file and
restart its offsets). :attr:`AppendOnlyLog.durable` is how far that sequence is known to be
on disk *in the file at the log's path*. A barrier waits for a position, never for a file
offset, so an acknowledgement spanning a compaction waits for the file that survives.

Writing is write-ahead: :meth:`AppendOnlyLog.append` writes a batch's records before the
store applies them, at the offset after the last whole record. If the write fails (disk
full, I/O error), whatever part of it reached the file is truncated away and the batch is
refused: nothing the log could not take is applied, served, or retried later.

Failures. A failed write or fsync opens an *episode* (logged once: ``aof_write_failed`` or
``aof_fsync_failed``). During it every write is refused (``ERR persistence failed``; reads
go on) and a recovery greenlet retries on a timer with backoff (:data:`RETRY_MIN` doubling to
:data:`RETRY_MAX`): cut any torn tail, make what was written durable (an fsync; after a
failed fsync the kernel may have dropped the data, so only a rewrite of the whole file from
the data in memory counts), then write and fsync as many bytes as the write that failed
(:data:`PROBE_BYTES` to :data:`PROBE_MAX`) past the log's end, and cut them off again. When
every step succeeds the episode ends with one ``aof_recovered`` event and writes are
accepted again.

The file taken away. A log file removed, renamed away, replaced or truncated under the server
(an operator's ``rm``, logrotate's ``copytruncate``) holds none of what it promised any more.
After every fsync, and every FILE_CHECK_INTERVAL besides, the log looks whether the file at its
path is still its own and no shorter (:func:`file_taken`); when not, it opens an episode
(``aof_file_lost``, with the reason) and treats what was written as an fsync that failed would
leave it: writes are refused and no PONG is given until the recovery has rewritten the whole
file from memory at the path. Never over a file the server did not put there (another
server's log, started on the path once it was free; a file an operator moved there): the
episode lasts until that file is moved away, then the log is rewritten at the path.

Policies: ``always`` (:meth:`AppendOnlyLog.barrier` returns once a position is durable;
concurrent callers share one fsync), ``everysec`` (a background fsync each second), ``no``
(the OS decides; fsync only at close). Every fsync runs in gevent's threadpool: the event
loop never waits for the disk.
"""

from __future__ import annotations

import _queue
import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import gevent
import gevent.event
from gevent import getcurrent
from gevent.monkey import get_original

from kvgevent.errors import StoreError
from kvgevent.logs import Logger, get_logger
from kvgevent.stores.aof import MAGIC, AofCorrupt, Scan, Scanner, encode_record
from kvgevent.timings import Timings

FSYNC_POLICIES = ("always", "everysec", "no")
DEFAULT_FSYNC = "everysec"
EVERYSEC_INTERVAL = 1.0
"""Seconds between background fsyncs under ``everysec``."""

FILE_CHECK_INTERVAL = 1.0
"""Seconds between two looks, besides those after each fsync, at whether the file at the
log's path is still the log (a ``stat`` and an ``fstat``): an ``rm`` is noticed within a
second even with no writes."""

SLOW_WRITE = 0.02
"""Seconds a write of the log made from the event loop may take before the next writes, for
THREADED_FOR, are made by the log's thread: on a disk that keeps up, a write from the loop
takes microseconds, a trip to the thread tens of them (bench/OPTIMISATIONS.md, "the log's
writes in a thread")..."""

THREADED_FOR = 10.0
"""...seconds (from the last slow write)."""

SLOW_SYNC_AFTER = 2.0
"""Seconds writes may wait to be on disk (under ``everysec`` and ``always``) before the disk
is said to be slow (``aof_fsync_slow``, once per episode; Redis warns after 2 s too): on a
disk slower than the writes the background fsync fell behind by 13 to 48 s, and nothing
said so (an attacker's pass). Also how long the last sync at a stop may take before the
log says what the stop waits for."""

RETRY_MIN = 0.05
"""Seconds before the first attempt to recover a failing log: space an operator frees is
used again at once."""

RETRY_MAX = 1.0
"""Most seconds between two recovery attempts (each costs a few system calls)."""

RELAPSE_WINDOW = 10.0
"""A failure this soon after a recovery continues the last backoff instead of starting over,
so a disk that keeps failing again cannot turn into a stream of log events."""

PROBE_BYTES = 64 << 10
"""Least bytes the recovery writes and fsyncs past the log's end before writes are accepted
again; as many as the write that failed, if more..."""

PROBE_MAX = 16 << 20
"""...up to this: a disk with room for a small write but not for the big one that failed
would otherwise recover and fail again at every attempt."""

REWRITE_SUFFIX = ".rewrite"
PROBE_SUFFIX = ".probe"
"""(A scratch file earlier versions probed with: one a crash left is removed at start.)"""

LOCK_TRIES = 3
"""Attempts to open and lock the log when another server's compaction keeps replacing the
file at its path (each a rename: the locked file was not the log any more)."""

ERR_PERSISTENCE = StoreError("persistence failed")

Payloads = Sequence[bytes]
IOV_MAX = os.sysconf("SC_IOV_MAX")

Failure = Literal["write", "fsync", "file"]

FAILURE_EVENTS = {"write": "aof_write_failed", "fsync": "aof_fsync_failed", "file": "aof_file_lost"}
"""The event that opens a failure episode, by what failed (each logged once per episode)."""

_UNTIL_RECOVERED = "writes get 'ERR persistence failed' until the log recovers; reads go on"

FAILURE_HINTS = {
    "write": _UNTIL_RECOVERED,
    "fsync": _UNTIL_RECOVERED,
    "file": "writes get 'ERR persistence failed' until the file is rewritten from memory at the "
    "path (never over a file put there meanwhile: move it away); reads go on",
}


def open_directory(path: str) -> int:
    """A descriptor of ``path``'s directory, to fsync a rename in it (held for the log's life:
    see :meth:`AofLog.sync_directory`)."""
    return os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_CLOEXEC)


# The spare is closed with the real close(): gevent's (monkey-patched into ``os`` since 25.8.1)
# defers closing anything but a regular file to its loop's next check, and the duplicate
# made right after the close found no free number (EMFILE again, under strace).
_close_now = get_original("os", "close")


def _spare_descriptor() -> int | None:
    """A descriptor held in reserve (/dev/null), given up for the log's own at the open-files
    limit (:meth:`AofLog._dup`); None if none can be had now."""
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


def pwrite_all(fd: int, buffers: Sequence[bytes | memoryview], offset: int) -> int:
    """Write ``buffers`` one after the other at ``offset`` (``pwritev``, IOV_MAX at a time),
    going on after short writes; returns the bytes written. On OSError some of the bytes
    may be in the file: the caller truncates them away."""
    views = [memoryview(b) for b in buffers if len(b)]
    total = index = 0
    while index < len(views):
        done = os.pwritev(fd, views[index : index + IOV_MAX], offset)
        if done == 0:
            raise OSError(errno.EIO, "the file took no bytes")
        offset += done
        total += done
        while done:
            if done >= len(views[index]):
                done -= len(views[index])
                index += 1
            else:
                views[index] = views[index][done:]
                done = 0
    return total


def lock(fd: int) -> None:
    """Take the log file ``fd`` for this process (an exclusive ``flock``, released when the
    last descriptor of it closes, a crash included), or raise OSError: two servers appending
    to one file write over each other's records, at their own ends, and the acknowledged
    writes of one are lost at the next start. A compaction's new file is locked before it
    is renamed over the log's path, so the file at the path is always locked. A filesystem
    that cannot lock (ENOLCK: an NFS mount without its lock daemon) is used unlocked."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OSError(errno.EBUSY, "the file is in use by another process (locked)") from None
    except OSError:
        pass  # (no locks here: as before there were)


def _open_locked(path: str) -> int:
    """The log file at ``path`` (created if missing), opened and locked (:func:`lock`). A
    file locked after another server's compaction renamed its new file over the path is no
    longer the log: opened again."""
    for _ in range(LOCK_TRIES):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            lock(fd)
            opened, current = os.fstat(fd), os.stat(path)
        except BaseException:
            os.close(fd)
            raise
        if os.path.samestat(opened, current):
            return fd
        os.close(fd)
    raise OSError(errno.EBUSY, "the file is in use by another process (replaced while opened)")


class FileTaken(OSError):
    """The log's file is no longer the file at its path, or was cut short (:func:`file_taken`);
    or a file the server did not put there is at the path (a rewrite over it refused)."""


def file_taken(fd: int, path: str, size: int) -> str | None:
    """Why the file open as ``fd``, holding ``size`` bytes of records, is no longer the log at
    ``path``: "removed", "renamed away", "replaced" (another file at the path) or
    "truncated" (shorter than ``size``, or its header gone: a cut to 0 written past since; a
    cut further in, written past, is not seen); None while it still is. Other errors are not
    judged here (None): a failing disk shows in the writes and fsyncs."""
    try:
        opened = os.fstat(fd)
        try:
            current = os.stat(path)
        except FileNotFoundError:
            return "removed" if opened.st_nlink == 0 else "renamed away"
    except OSError:
        return None
    if not os.path.samestat(opened, current):
        return "replaced"
    try:
        # Cut short, or cut and then written past (the hole's NUL bytes where the header was:
        # logrotate's copytruncate, then the next record at the old offset).
        if opened.st_size < size or os.pread(fd, len(MAGIC), 0) != MAGIC:
            return "truncated"
    except OSError:
        return None
    return None


def _look_and_close(fd: int, path: str, size: int) -> str | None:
    """:func:`file_taken`, then close ``fd`` (a duplicate): in the thread, which owns it (a
    greenlet killed while it waits must not close a number the thread still uses)."""
    try:
        return file_taken(fd, path, size)
    finally:
        os.close(fd)


def _fsync_and_look(fd: int, path: str, size: int) -> str | None:
    """fsync ``fd``, then :func:`file_taken` (one trip to the threadpool for both)."""
    os.fsync(fd)
    return file_taken(fd, path, size)


def name_problem(path: str) -> str | None:
    """Why the directory does not take ``path`` with REWRITE_SUFFIX added, or None: a
    compaction and the rebuild of a file that failed an fsync or was taken away write the new
    file under that name first, so with no room for it every one of them fails. (The rest
    works: the recovery from a failed write probes in the log itself.)"""
    directory, name = os.path.split(path)
    try:
        longest = os.pathconf(directory or ".", "PC_NAME_MAX")
    except (OSError, ValueError):
        return None  # (not told: found at the first compaction)
    if len(os.fsencode(name + REWRITE_SUFFIX)) <= longest:
        return None
    return f"no room for the suffix {REWRITE_SUFFIX!r} in the name (at most {longest} bytes here)"


def foreign_file(path: str, fd: int) -> bool:
    """Whether a file that is not the one open as ``fd`` is at ``path``: something the
    server did not put there (another server's log, a file an operator moved there), which
    no compaction or rebuild may replace. (No file at the path is not foreign.)"""
    try:
        current = os.stat(path)
        opened = os.fstat(fd)
    except OSError:  # none there; or not judged here: the rename says what is wrong
        return False
    return not os.path.samestat(opened, current)


_disk_work = [0]
"""Calls of :func:`in_thread` under way (fsyncs, a compaction's copies): while there are any,
the log's writes are made by its thread (see AppendOnlyLog.append)."""


def in_thread(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` in gevent's threadpool (the calling greenlet waits; the others
    run). An exception is raised here, in the caller, and only here: gevent would also hand
    one raised in the worker to the hub's error handler, which reports it as a bug, and a
    failed fsync on a failing disk is not one."""

    def capture() -> tuple[Any, BaseException | None]:
        try:
            return function(*args), None
        except Exception as exc:
            return None, exc

    _disk_work[0] += 1
    try:
        result, error = gevent.get_hub().threadpool.apply(capture)
    finally:
        _disk_work[0] -= 1
    if error is not None:
        raise error
    return result


_start_thread = get_original("_thread", "start_new_thread")

Interruption = BaseException | None
"""What was thrown into a greenlet while it waited for the log's thread (a kill, the server's
stop): raised by the caller once it has accounted for what the thread did."""


class DiskThread:
    """An OS thread of the log's own for its writes: ``call(function, *args)`` runs there
    while the calling greenlet waits and the others run (gevent's threadpool took 44 to 74
    µs a call on the project's VM, this about 30: bench/OPTIMISATIONS.md, "the log's
    writes in a thread"). The caller parks with a bare ``Hub.switch`` and is switched to from
    the hub by a loop ``async_`` watcher that the thread ``send``s (thread-safe); requests and
    answers cross in the unpatched ``_queue.SimpleQueue``, the thread is started with the
    unpatched ``_thread.start_new_thread``: the gevent interfaces relied on. The watcher holds
    the loop (``ref``) only while a call is under way. A caller interrupted while it waits (a
    kill, an exception thrown in) waits for the answer all the same: ``call`` returns the
    interruption beside the result, for the caller to raise once it has accounted for what
    the thread did. :meth:`stop` ends the thread after the calls under way."""

    def __init__(self) -> None:
        self._hub = gevent.get_hub()
        self._requests: Any = _queue.SimpleQueue()
        self._answers: Any = _queue.SimpleQueue()
        self._pending = 0
        watcher: Any = self._hub.loop.async_()  # (its stub lacks ``ref``)
        watcher.start(self._deliver)
        watcher.ref = False
        self._watcher = watcher
        _start_thread(self._run, ())

    def call(self, function: Callable[..., Any], *args: Any) -> tuple[Any, Exception | None, Interruption]:
        """(``function(*args)``'s result, the exception it raised or None, an interruption of
        the caller that came meanwhile or None)."""
        slot: list[Any] = [None, None, getcurrent()]  # result, exception, whom to wake
        self._requests.put((function, args, slot))
        self._pending += 1
        self._watcher.ref = True
        interrupted: Interruption = None
        while True:
            try:
                self._hub.switch()  # (woken by _deliver once the thread is done)
                break
            except BaseException as exc:  # (the thread goes on: its answer is waited for)
                interrupted = interrupted or exc
        return slot[0], slot[1], interrupted

    def stop(self) -> None:
        self._requests.put(None)
        self._watcher.stop()
        self._watcher.close()

    def _run(self) -> None:  # (in the thread)
        requests, answers, send = self._requests, self._answers, self._watcher.send
        while (request := requests.get()) is not None:
            function, args, slot = request
            try:
                slot[0] = function(*args)
            except Exception as exc:
                slot[1] = exc
            answers.put(slot)
            send()

    def _deliver(self) -> None:  # (in the hub)
        while True:
            try:
                slot = self._answers.get_nowait()
            except _queue.Empty:
                break
            self._pending -= 1
            if not self._pending:
                self._watcher.ref = False
            slot[2].switch()


def _error_text(exc: BaseException) -> str:
    return (getattr(exc, "strerror", None) or str(exc)) or type(exc).__name__


@dataclass
class Episode:
    """A time during which the log cannot be trusted to take writes: they are refused."""

    error: str
    errno: int | None
    began: float = field(default_factory=time.monotonic)
    logged: set[str] = field(default_factory=set)  # the failure kinds already logged
    refused: int = 0  # writes refused meanwhile
    attempts: int = 0  # recovery attempts
    failed_bytes: int = 0  # the largest write that failed (the probe writes as much)


class AppendOnlyLog:
    """The open log file. Used from greenlets of one hub; not thread-safe.

    ``rebuild`` (given by the store) rewrites the whole file from the data in memory and
    switches to it (:meth:`switch_to`, :meth:`finish_switch`); the recovery calls it after a
    failed fsync. It raises OSError when it cannot."""

    def __init__(
        self,
        path: str,
        fsync: str = DEFAULT_FSYNC,
        log: Logger | None = None,
        rebuild: Callable[[], None] | None = None,
    ) -> None:
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_POLICIES)}")
        # Resolved: a compaction renames its new file over the path, and over a symlink it
        # would replace the link, leaving the file it named behind (and unlocked).
        self.path, self.policy = os.path.realpath(path), fsync
        self.log = log if log is not None else get_logger()
        self.rebuild = rebuild
        self.fd = -1
        self.size = 0  # bytes of whole records in the current file: where the next one goes
        self.records = 0  # records in the current file
        self.written = 0  # position: bytes appended since opening, across files
        self.written_records = 0
        self.durable = 0  # position known to be on disk in the file at ``path``
        self.durable_records = 0
        self.generation = 0  # which file: a compaction's switch starts the next one
        self.failure: Episode | None = None
        self.torn = False  # bytes past ``size`` may be in the file (a failed write, not cut yet)
        self.lost = False  # an fsync failed: only a rebuild makes what was written durable
        self.rewrites = 0
        self.fsync_seconds = Timings()  # how long the fsyncs of the file took
        self.fsync_errors = 0
        self.write_errors = 0
        self.writes_refused = 0
        self.last_fsync = time.monotonic()
        self._pending_since: float | None = None  # about when the oldest write not on disk was made
        self._fsync_began: float | None = None  # when the sync round's fsync under way began
        self._slow_since: float | None = None  # when an aof_fsync_slow episode began
        self._switching: gevent.event.Event | None = None  # set while a new file is not in place
        self._syncing = False
        self._wanted = 0  # the position barrier() callers wait for
        self._round_done = gevent.event.Event()
        self._ticker: gevent.Greenlet | None = None
        self._recovery: gevent.Greenlet | None = None
        self._resting = False  # the recovery greenlet sleeps between attempts (it may be killed)
        self._recovered_at = -RELAPSE_WINDOW
        self._last_delay = RETRY_MIN
        self._closed = False
        # Held for the log's life, so that neither a rename's fsync nor an fsync's duplicate
        # needs a new descriptor at the open-files limit (clients took the others): there an
        # fsync that could not be tried failed every write, and a compaction's switch that
        # could not sync its directory demanded a rebuild (an auditor's prlimit runs).
        self._dir_fd = -1
        self._spare: int | None = None
        self._disk: DiskThread | None = None  # the thread that makes the writes (at the first)
        self._threaded_until = 0.0  # (monotonic) writes by the thread until then: see _write

    # --- opening --------------------------------------------------------------------------

    def load(self, apply: Callable[[list[bytes]], None], repair: bool = False) -> dict[str, Any]:
        """Stream the file's good records to ``apply`` (in batches), cut a torn tail (or, with
        ``repair``, a corrupt one), and open the file for appending. Creates a missing file.
        Raises AofCorrupt for corruption without ``repair`` (``apply`` has then seen the
        records before it), OSError if the file cannot be read or written."""
        problem = name_problem(self.path)
        if problem is not None:
            self.log.warning(
                "aof_name_too_long",
                path=self.path,
                error=problem,
                hint="compactions, and the rebuild after a failed fsync or a file taken away, "
                "cannot run: give the log a shorter name",
            )
        fd = _open_locked(self.path)  # (before the leftovers: they may be another server's)
        try:
            self._dir_fd = open_directory(self.path)
            self._spare = _spare_descriptor()
            for leftover in (self.path + REWRITE_SUFFIX, self.path + PROBE_SUFFIX):
                if os.path.exists(leftover):  # left by a crash: the log itself is intact
                    os.unlink(leftover)
            # gevent makes its threadpool, importing its module, at the first use: at the
            # open-files limit the import failed (EMFILE) and the first PING after it never
            # got an answer. Made now, before any client.
            in_thread(int)
            found = self._replay(fd, apply)
            report = self._check(found, repair)
            if found.good_end < found.size:
                os.ftruncate(fd, found.good_end)
                os.fsync(fd)
            if found.good_end == 0:
                pwrite_all(fd, [MAGIC], 0)
                os.fsync(fd)
                self.sync_directory()
        except BaseException:
            os.close(fd)
            self._close_reserved()
            raise
        self.fd = fd
        self.size = max(found.good_end, len(MAGIC))
        self.records = found.records
        self._ticker = gevent.spawn(self._tick)
        return report

    @staticmethod
    def _replay(fd: int, apply: Callable[[list[bytes]], None]) -> Scan:
        scanner = Scanner(lambda offset, count: os.pread(fd, count, offset), os.fstat(fd).st_size)
        for batch in scanner.batches():
            apply(batch)
        return scanner.result

    def _check(self, found: Scan, repair: bool) -> dict[str, Any]:
        report: dict[str, Any] = {"records": found.records, "bytes": found.size}
        if found.corrupt_at is not None:
            if not repair:
                raise AofCorrupt(
                    self.path, found.corrupt_at, found.records_after, found.size - found.corrupt_at
                )
            after = found.records_after
            damaged = 1 if found.corrupt_at else 0  # (at 0: the header, not a record)
            report.update(
                repaired_at=found.corrupt_at,
                dropped_records=None if after is None else damaged + after,
                dropped_bytes=found.size - found.corrupt_at,
            )
        elif found.torn:
            report.update(truncated_at=found.good_end, dropped_bytes=found.size - found.good_end)
        return report

    # --- writing --------------------------------------------------------------------------

    @property
    def ok(self) -> bool:
        """False while writes are refused (a failure episode)."""
        return self.failure is None

    def append(self, payloads: Payloads) -> tuple[bool, Interruption]:
        """Write records before they are applied: (True once the OS has all of them, False
        if the log is failing or this write failed: then none of them is in the file; an
        interruption of the caller while the write was made, for it to raise once it has
        applied them). The write is made from the loop or by the log's thread (:meth:`_write`;
        the caller holds the store's lock: one write at a time, no compaction switches files
        meanwhile); everything else here runs in the loop."""
        interrupted: Interruption = None
        if self.failure is None:
            data = b"".join([encode_record(p) for p in payloads])
            error, interrupted = self._write(data)
            if error is not None:
                exc = error if isinstance(error, OSError) else OSError(errno.EIO, _error_text(error))
                self.write_errors += 1
                self.torn = True
                failure = self._fail("write", exc)
                failure.failed_bytes = max(failure.failed_bytes, len(data))
                self._cut_torn_tail()
            else:
                if self._pending_since is None:
                    self._pending_since = time.monotonic()
                self.size += len(data)
                self.written += len(data)
                self.records += len(payloads)
                self.written_records += len(payloads)
                return True, interrupted
        self.writes_refused += len(payloads)
        self.failure.refused += len(payloads)  # type: ignore[union-attr]  # (failing: self.failure is set)
        return False, interrupted

    def _write(self, data: bytes) -> tuple[Exception | None, Interruption]:
        """Write ``data`` at the end of the log; (the OSError it raised or None, an
        interruption of the caller meanwhile, see :class:`DiskThread`). By the log's thread
        while the disk is busy with other work of the server's (an fsync, a compaction's
        copy: on ext4 over a slow device a write then waited for the journal behind the
        fsync's commit for up to 33 s, and from the loop the whole server with it, an
        attacker's pass) or was lately slow (SLOW_WRITE, THREADED_FOR); else from the loop,
        where it takes microseconds (a trip to the thread for each took single-client
        sequential writes from 0.15 to 0.38 ms)."""
        began = time.monotonic()
        error: Exception | None = None
        interrupted: Interruption = None
        if _disk_work[0] or began < self._threaded_until:
            if self._disk is None:
                self._disk = DiskThread()
            _, error, interrupted = self._disk.call(pwrite_all, self.fd, [data], self.size)
        else:
            try:
                pwrite_all(self.fd, [data], self.size)
            except OSError as exc:
                error = exc
        now = time.monotonic()
        if now - began >= SLOW_WRITE:
            self._threaded_until = now + THREADED_FOR
        return error, interrupted

    def fail_write(self, exc: BaseException) -> None:
        """A write whose outcome is not known (a bug on the way): the log fails as after a
        failed fsync; only a rebuild from memory makes the file hold what was applied."""
        self.write_errors += 1
        self.lost = True
        self._fail("write", exc)

    def _cut_torn_tail(self) -> None:
        """Truncate what a failed write left, and fsync the truncation (in the threadpool):
        else a power loss could bring back whole records of a batch that was refused."""
        try:
            os.ftruncate(self.fd, self.size)
            self._fsync_current()
            self.torn = False
        except OSError:
            pass  # the recovery tries again before anything else

    # --- syncing --------------------------------------------------------------------------

    def barrier(self, position: int | None = None) -> None:
        """Under ``always``: return once ``position`` (default: everything written) is on
        disk. Callers that arrive while an fsync runs share the next one (group commit).
        Raises StoreError('persistence failed') while the log is failing. Other policies
        return at once."""
        if self.policy != "always":
            return
        target = self.written if position is None else position
        while self.durable < target:
            if self.failure is not None:
                raise ERR_PERSISTENCE.fresh()
            self._request_sync(target)
            self._round_done.wait()

    def _request_sync(self, target: int) -> None:
        self._wanted = max(self._wanted, target)
        if not self._syncing:
            self._syncing = True  # now, not when the greenlet starts: one syncer at a time
            gevent.spawn(self._sync_rounds)

    def _sync_rounds(self) -> None:
        """fsync until every barrier() caller is served; each round serves all who were
        waiting when it started (they wait on the event that round sets)."""
        try:
            while self.failure is None and self.durable < self._wanted:
                if self._switching is not None:  # a compaction is putting its file in place
                    self._switching.wait()
                    continue
                done, self._round_done = self._round_done, gevent.event.Event()
                try:
                    self._sync_round()
                finally:
                    done.set()
        except Exception as exc:  # a bug: fail the log (waiters get ERR) rather than spin or hang
            self.log.exception("aof_sync_error")
            self._fail("fsync", exc)
        finally:
            self._syncing = False
            # Callers that began waiting during the last round: let them look again.
            late, self._round_done = self._round_done, gevent.event.Event()
            late.set()

    def _sync_round(self) -> None:
        position, records, generation = self.written, self.written_records, self.generation
        began = self._fsync_began = time.monotonic()
        try:
            self._fsync_current()
        except FileTaken:
            return  # (its episode is open)
        except OSError as exc:
            self._fail("fsync", exc)
            return
        finally:
            self._fsync_began = None
        if generation == self.generation:  # else the file was replaced meanwhile
            self._mark_durable(position, records, began)

    def _fsync_current(self) -> None:
        """fsync the current file in the threadpool, then look whether it is still the log
        (:func:`file_taken`, in the same trip to the thread). On a duplicate of its
        descriptor: a compaction may close the descriptor while the thread waits for the
        disk. A failed fsync (not a failed dup) sets :attr:`lost`; so does a file taken away
        (FileTaken, its episode opened)."""
        try:
            fd = self._dup()
        except OSError:  # (EMFILE, no spare left): no fsync happened, so nothing is lost
            self.fsync_errors += 1
            raise
        began, generation, size = time.monotonic(), self.generation, self.size
        try:
            taken = in_thread(_fsync_and_look, fd, self.path, size)
            self.fsync_seconds.observe(time.monotonic() - began)
        except OSError:
            self.fsync_errors += 1
            self.lost = True  # the kernel may have dropped the pages it could not write
            raise
        finally:
            os.close(fd)
            self._respare()  # (the number just freed: nothing ran in between)
        self._judge(taken, generation)

    def _dup(self) -> int:
        """A duplicate of the log's descriptor for an fsync (it runs in a thread: a compaction
        may close the descriptor meanwhile). At the open-files limit (EMFILE) the spare is
        given up for it; :meth:`_respare` takes the number back as the duplicate is closed."""
        try:
            return os.dup(self.fd)
        except OSError as exc:
            if exc.errno != errno.EMFILE or self._spare is None:
                raise
        _close_now(self._spare)
        self._spare = None
        try:
            return os.dup(self.fd)
        except OSError:
            self._respare()  # (the number just freed, if nothing took it: kept for next time)
            raise

    def _respare(self) -> None:
        if self._spare is None:
            self._spare = _spare_descriptor()

    def sync_directory(self) -> None:
        """Make a rename in the log's directory durable (an fsync of its descriptor, held
        open: no descriptor needed at the open-files limit). Raises OSError."""
        os.fsync(self._dir_fd)

    def _close_reserved(self) -> None:
        for fd in (self._dir_fd, self._spare):
            if fd is not None and fd >= 0:
                _close_now(fd)
        self._dir_fd, self._spare = -1, None

    def _look(self) -> None:
        """Whether the file is still the log (:func:`file_taken`), with no fsync: FileTaken
        if not (:meth:`_judge`)."""
        generation, size = self.generation, self.size
        try:
            fd = os.dup(self.fd)  # (not the spare: the thread closes this one, as the loop runs)
        except OSError:  # (EMFILE) looked at here, in the loop: two stats and a 4-byte read
            # (skipped, a log removed at the open-files limit went unseen: under --fsync no a
            # kill -9 then lost every write, and a stop exited 0, an attacker's pass)
            self._judge(file_taken(self.fd, self.path, size), generation)
            return
        taken = in_thread(_look_and_close, fd, self.path, size)  # (the thread owns the dup)
        self._judge(taken, generation)

    def _judge(self, taken: str | None, generation: int) -> None:
        """A look's verdict: if the file was ``taken`` and is still the log's (no compaction
        switched files meanwhile: the old file is then rightly not at the path), only a
        rebuild makes what was written durable (nothing counts as durable until then): open
        the episode, raise FileTaken."""
        if taken is None or generation != self.generation or self._switching is not None:
            return
        self.lost = True
        # Nothing is known to be on disk at the path now, what was synced before included: a
        # PING waiting for none of the new writes gets ERR too, and the stop counts all. And
        # the file is not the log's any more: a new generation, so that an fsync under way
        # (looked at before the file went) marks nothing durable when it comes back.
        self.durable = self.durable_records = 0
        self.generation += 1
        exc = FileTaken(None, f"the log's file was {taken} under the server")  # (no errno: none failed)
        self._fail("file", exc)
        raise exc

    def _mark_durable(self, position: int, records: int, began: float | None = None) -> None:
        """Everything up to ``position`` is on disk, by an fsync that ``began`` then (if
        known: the writes after ``position`` came later)."""
        self.durable = max(self.durable, position)
        self.durable_records = max(self.durable_records, records)
        self.last_fsync = time.monotonic()
        if self.durable >= self.written:
            self._pending_since = None
        elif began is not None and self._pending_since is not None:
            self._pending_since = max(self._pending_since, began)

    def _tick(self) -> None:
        """Under ``everysec``, fsync what was written each EVERYSEC_INTERVAL (and look at the
        file: :meth:`_fsync_current`); otherwise, and with nothing to fsync, look at the file
        each FILE_CHECK_INTERVAL (:meth:`_look`). Runs until killed."""
        everysec = self.policy == "everysec"
        while True:
            gevent.sleep(EVERYSEC_INTERVAL if everysec else FILE_CHECK_INTERVAL)
            self._watch_lag()
            if self.failure is not None or self._switching is not None:
                continue  # (the recovery looks after the file; a compaction is replacing it)
            if everysec and self.durable < self.written:
                self._request_sync(self.written)
                continue
            if self._syncing:
                continue  # (a sync round looks after its fsync: one look at a time)
            try:
                self._look()
            except FileTaken:
                pass  # (its episode is open)
            except OSError:  # (not looked at: the threadpool could not run it) the next time
                pass

    def _lag(self, now: float) -> float:
        """Seconds the disk is behind: how long the fsync under way has run, and under
        ``everysec`` how long the oldest write not on disk has waited (about), whichever is
        longer. (Under ``always`` writes no PING waits for are not synced: no lag; under
        ``no`` none is promised.)"""
        running = 0.0 if self._fsync_began is None else now - self._fsync_began
        pending = self._pending_since if self.policy == "everysec" else None
        return max(running, 0.0 if pending is None else now - pending)

    def _watch_lag(self) -> None:
        """Begin or end an ``aof_fsync_slow`` episode: the disk SLOW_SYNC_AFTER or more
        behind (:meth:`_lag`) begins one (not while the log is failing: that episode says
        more); less ends it. Looked at once a second, by the ticker."""
        now = time.monotonic()
        lag = self._lag(now)
        if self._slow_since is None:
            if lag >= SLOW_SYNC_AFTER and self.failure is None:
                self._slow_since = now
                self.log.warning(
                    "aof_fsync_slow",
                    path=self.path,
                    behind_s=round(lag, 1),
                    unsynced_bytes=self.written - self.durable,
                    hint="the disk takes the log's writes slower than they come: under everysec "
                    "a crash of the machine loses more than a second of them; under always "
                    "PINGs wait that long",
                )
        elif lag < SLOW_SYNC_AFTER:
            began, self._slow_since = self._slow_since, None
            self.log.info("aof_fsync_slow_ended", path=self.path, seconds=round(now - began, 1))

    # --- failing and recovering -------------------------------------------------------------

    def _fail(self, kind: Failure, exc: BaseException) -> Episode:
        """Open an episode (or add to the current one); log each kind of failure once per
        episode. Returns the episode."""
        error, number = _error_text(exc), getattr(exc, "errno", None)
        episode = self.failure
        if episode is None:
            episode = self.failure = Episode(error, number)
            if self._recovery is None and not self._closed:
                self._recovery = gevent.spawn(self._recover)
        if kind not in episode.logged:
            episode.logged.add(kind)
            self.log.error(
                FAILURE_EVENTS[kind], path=self.path, error=error, errno=number, hint=FAILURE_HINTS[kind]
            )
        return episode

    def _recover(self) -> None:
        """Retry until the log works again (see the module docstring)."""
        relapse = time.monotonic() - self._recovered_at < RELAPSE_WINDOW
        delay = min(self._last_delay * 2, RETRY_MAX) if relapse else RETRY_MIN
        try:
            while self.failure is not None and not self._closed:
                self._resting = True
                try:
                    gevent.sleep(delay)
                finally:
                    self._resting = False
                if self._closed:
                    break
                episode = self.failure
                episode.attempts += 1
                self._last_delay = delay  # a relapse soon after goes on from here
                delay = min(delay * 2, RETRY_MAX)
                try:
                    self.make_durable()
                    self._probe(episode.failed_bytes)
                except Exception as exc:
                    if not isinstance(exc, OSError) and "recovery_error" not in episode.logged:
                        episode.logged.add("recovery_error")  # a bug: once, not every attempt
                        self.log.exception("aof_recovery_error")
                    continue
                # Only a log in a known good state ends the episode: something may have failed
                # meanwhile (a compaction's rename, say) while this attempt waited for the disk.
                # And not at the stop: close() joined this attempt, and writes are not accepted
                # again (the README: no aof_recovered then).
                if not (self.lost or self.torn or self._switching is not None or self._closed):
                    self._end_episode()
        finally:
            self._recovery = None

    def make_durable(self) -> None:
        """Bring the file to a known good state holding everything written, on disk: cut a
        torn tail, then fsync, or after a failed fsync rebuild the file. Raises OSError."""
        if self._switching is not None:  # a compaction's new file is not in place yet
            self._switching.wait()  # (it ends either way, setting ``lost`` if it failed)
        if self.lost:
            if self.rebuild is None:
                raise OSError(errno.EIO, "an fsync failed and nothing can rebuild the file")
            self.rebuild()  # switches to a new file, and clears ``lost`` once it is in place
            return
        if self.torn:
            os.ftruncate(self.fd, self.size)
            self.torn = False
        position, records, generation = self.written, self.written_records, self.generation
        self._fsync_current()
        if generation != self.generation or self._switching is not None:
            raise OSError(errno.EAGAIN, "the file was replaced while it was synced")
        self._mark_durable(position, records)

    def _probe(self, failed_bytes: int) -> None:
        """Write and fsync as many bytes as the write that failed (at least PROBE_BYTES, at
        most PROBE_MAX) past the log's end, then cut them off: the log takes such a write
        again. In the log itself, not in a file beside it: a file-size limit
        (RLIMIT_FSIZE, systemd's ``LimitFSIZE=``; a filesystem's largest file) fails the
        log's writes with EFBIG while a new small file passes, and a directory the server
        may not create files in, or a path with no room for a suffix, would fail every
        attempt for ever. (A crash before the cut leaves a tail of NUL bytes: a torn tail,
        cut at start.) Raises OSError."""
        size = min(max(PROBE_BYTES, failed_bytes), PROBE_MAX)
        fd, end = self.fd, self.size  # (no write moves them while the log is failing)

        def probe() -> None:
            try:
                pwrite_all(fd, [bytes(size)], end)
                os.fsync(fd)
            finally:
                os.ftruncate(fd, end)

        in_thread(probe)

    def _end_episode(self) -> None:
        episode, self.failure = self.failure, None
        assert episode is not None
        self._recovered_at = time.monotonic()
        self.log.info(
            "aof_recovered",
            path=self.path,
            seconds=round(self._recovered_at - episode.began, 3),
            writes_refused=episode.refused,
            attempts=episode.attempts,
        )

    # --- switching files (compaction) --------------------------------------------------------

    def switch_to(self, fd: int, size: int, records: int) -> int:
        """Append to ``fd`` from now on: a rewritten file holding every record written so far,
        renamed over the log's path already (called with the store's lock held). No position
        after this counts as durable until :meth:`finish_switch`. Returns the old descriptor,
        for the caller to close (out of the event loop: closing the last reference to a big
        file frees its page cache in the call)."""
        old, self.fd, self.size, self.records = self.fd, fd, size, records
        self.generation += 1
        self.torn = False
        self._switching = gevent.event.Event()
        return old

    def finish_switch(self, position: int, records: int, exc: BaseException | None) -> None:
        """The switched-to file (at the log's path already) is fsynced up to ``position``,
        and its directory too (``exc`` is None), or one of those fsyncs failed (``exc``): then
        only a rebuild makes anything written since the switch durable."""
        if exc is None:
            self._mark_durable(position, records)
            self.rewrites += 1
            self.lost = False
        else:
            self.fsync_errors += 1
            self.lost = True
            self._fail("fsync", exc)
        switching, self._switching = self._switching, None
        if switching is not None:
            switching.set()

    # --- closing ----------------------------------------------------------------------------

    def close(self) -> int:
        """Stop the background work, make everything written durable if the disk allows (a
        last recovery attempt if the log is failing), and close the file. Returns how many
        records could not be made durable (0: all are on disk). Idempotent."""
        if self._closed:
            return self.written_records - self.durable_records
        self._closed = True
        if self._ticker is not None:
            self._ticker.kill()
        if self._recovery is not None:
            if self._resting:
                self._recovery.kill()
            else:
                self._recovery.join()  # an attempt under way (a rebuild) is not cut short
        if self.fd < 0:
            return 0
        if self.failure is None:
            # A last look: a file removed in the second before the stop, with everything
            # synced, was left unnoticed and the server exited 0 with its data in memory only
            # (an attacker's runs, 12 of 12). Found, it is rewritten at the path below.
            with contextlib.suppress(OSError):  # (FileTaken too: its episode is open)
                self._look()
        if self.failure is not None or self.lost or self.torn or self.durable < self.written:
            # (a slow disk makes the stop wait for it: said, or it looks hung)
            warning = gevent.spawn_later(SLOW_SYNC_AFTER, self._say_stop_waits, self.written - self.durable)
            try:
                self._last_attempt()
            finally:
                warning.kill()
        try:
            os.close(self.fd)
        finally:
            self.fd = -1
            self._close_reserved()
            if self._disk is not None:
                self._disk.stop()
                self._disk = None
        return self.written_records - self.durable_records

    def _say_stop_waits(self, unsynced: int) -> None:
        self.log.warning(
            "aof_stop_waits_for_disk",
            path=self.path,
            unsynced_bytes=unsynced,
            waited_s=SLOW_SYNC_AFTER,
            hint="the stop ends once the log's last writes are on disk (a service manager's stop "
            "timeout may kill it first: what was not on disk is then up to the OS)",
        )

    def _last_attempt(self) -> None:
        """:meth:`make_durable` at the stop; a file found taken away meanwhile (its episode
        opened) is rebuilt by a second attempt."""
        for _ in range(2):
            try:
                self.make_durable()
                return
            except FileTaken:  # (said: aof_file_lost; a file put at the path stays)
                continue
            except OSError as exc:
                # (An episode of a file taken away has said what it is: its rebuild failing
                # at the stop is no fsync's failure.)
                if self.failure is None or "file" not in self.failure.logged:
                    self._fail("fsync" if self.lost else "write", exc)
                return

    def stats(self) -> dict[str, int]:
        return {
            "aof_bytes": self.size,
            "aof_records": self.records,
            "aof_last_fsync_ms": int((time.monotonic() - self.last_fsync) * 1000),
            "aof_rewrites": self.rewrites,
            "aof_fsync_errors": self.fsync_errors,
            "aof_write_errors": self.write_errors,
            "aof_writes_refused": self.writes_refused,
            "aof_ok": int(self.failure is None),
        }
