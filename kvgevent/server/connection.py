"""One client connection: its reply queue, its writer greenlet, and the rules for a full queue.

Ownership: the server's reader greenlet owns the socket: it closes it when the client is
dropped (:meth:`Connection.close`), and gevent's StreamServer closes it once more when the
reader's handler returns (a second close does nothing). A client quiet long enough, or one
that has sent nothing yet, has no reader (``dormant``: the server released it, see
:meth:`Connection.retire_reader`, or made none at accept): its socket stays open, and the
next reader, made when it sends or must go, owns it. The
writer greenlet never closes it: on a write error it records :attr:`Connection.failed`,
empties the queue and shuts the socket down, which wakes a reader blocked in ``recv`` (or a
dormant client's read watcher); so does :meth:`Connection.abort`.

Full queues. A client's queue is bounded both in lines (``queue_size``) and in bytes
(``queue_bytes``, counting the batch the writer is sending: what a client that never reads
pins is at most ``queue_bytes``, or one reply line when that is bigger). A chunk of lines
that could never fit goes line by line. A reply that finds the queue full waits for the
writer to make room (yielding: gevent's ``recv`` does not yield while data is ready, so
without this a fast pipelining client that reads promptly would lose replies). It gives up
when the client has acknowledged no byte for :data:`DROP_GRACE` while the writer's send waits
(:meth:`~kvgevent.fastio.PlainSocket.acked`: the client is not reading): that reply, and every
further one that finds the queue full, is dropped and counted without waiting, until the queue
has room again. Each such
episode logs one ``messages_dropping`` event. A client that reads, however slowly, is waited
for: it slows only itself.

Memory. Every byte a connection holds (its incomplete request line, its queued and in-flight
replies) is added to the server's :class:`~kvgevent.server.memory.MemoryGuard` ``buffered`` figure
while held, and given back by :meth:`Connection.release` when the client is dropped.
"""

from __future__ import annotations

import os
import socket
import ssl
import time
from typing import Any

import gevent
import gevent.event
from gevent import GreenletExit
from gevent.greenlet import Greenlet
from gevent.pool import Group
from gevent.queue import Queue, UnboundQueue
from gevent.socket import wait_read

from kvgevent.config import (
    DROP_GRACE,
    EVICT_DRAIN_RATE,
    EVICT_DRAIN_WINDOW,
    EVICT_DRAINING,
    LINGER_POLL,
    MAX_SEND_BATCH,
    PRESSED_QUEUE_BYTES,
    ROOM_WAIT_LIMIT,
)
from kvgevent.fastio import FastSocket, unacknowledged, unread, wrap
from kvgevent.logs import Logger
from kvgevent.protocol import LineBuffer
from kvgevent.server.counters import Counters
from kvgevent.server.memory import MemoryGuard

_EOF = b""
"""Queue sentinel (never a reply: every reply ends in a newline): the writer sends what was
queued before it, then exits."""


class Connection:
    """A client, as the server sees it. Created and driven by the reader greenlet."""

    __slots__ = (
        "client_id",
        "peer",
        "host",
        "sock",
        "io",
        "stream",
        "queue",
        "queue_size",
        "queue_bytes",
        "queued_lines",
        "queued_bytes",
        "buffer",
        "writer",
        "reader",
        "_log",
        "counters",
        "writers",
        "reading",
        "dormant",
        "patience",
        "dropping",
        "waiting",
        "executing",
        "room",
        "messages_dropped",
        "failed",
        "last_seen",
        "acked_mark",
        "guard",
        "input_held",
        "reply_held",
        "released",
        "heavy",
        "session",
        "sending",
        "batch",
        "batch_from",
        "acked",
        "acked_at",
        "drain_seen",
        "parked",
        "stale",
        "_hub",
    )

    def __init__(
        self,
        client_id: int,
        peer: str,
        sock: Any,
        *,
        host: str,
        queue_size: int,
        queue_bytes: int,
        max_line: int,
        log: Logger,
        counters: Counters,
        writers: Group,
        guard: MemoryGuard,
    ) -> None:
        self.client_id = client_id
        self.peer = peer
        self.host = host  # the client's address without the port (AUTH throttling)
        self.sock = sock
        # The byte stream: the socket itself, or a TlsStream over it (see KeyValueServer).
        self.io = wrap(sock)  # counts what the kernel accepted, and since when it accepts nothing
        # What recv and sendall are called on: the socket's io, or a TlsStream over it. (One
        # reference, not two bound methods: an idle client holds it for its whole life.)
        self.stream: Any = self.io
        # Items are chunks of one or more reply lines; the bounds below are in lines and
        # bytes, kept by this class: the gevent queue itself is unbounded (so a miscount,
        # a value with a newline from another Redis client say, cannot make a put raise),
        # an UnboundQueue: gevent's Queue for that, without a deque for waiting putters
        # (0.76 kB a writer). Made with the writer, at the first reply: an idle client holds
        # neither (a gevent Queue is kilobytes: bench/OPTIMISATIONS.md, "an idle client's
        # queue").
        self.queue: Queue | None = None
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.queued_lines = 0
        self.queued_bytes = 0
        self.buffer = LineBuffer(max_line)
        self.writer: Greenlet | None = None  # started with the first reply
        self.reader: Greenlet = gevent.getcurrent()  # type: ignore[assignment]  # (the reader is a gevent Greenlet: StreamServer spawned it)
        self._log = log  # the server's logger; bound to this client only when logging
        self.counters = counters
        self.writers = writers
        self.reading = True  # False once the reader stopped reading (flushing, closing, dormant)
        self.dormant = False  # no reader greenlet: a read watcher makes one (KeyValueServer)
        self.patience = 1  # READER_IDLE periods parked in recv before the reader is released (0: see _handle)
        self.dropping = False  # inside an episode of dropped replies
        self.waiting = False  # the reader waits for room; the writer must signal it
        self.executing = False  # the reader is in a batch (KeyValueServer._execute), not in a read
        self.room: gevent.event.Event | None = None
        self.messages_dropped = 0
        self.failed: str | None = None  # why writing failed, once it has
        self.last_seen = time.monotonic()  # when the client last sent bytes
        self.acked_mark: int | None = None  # its acknowledged bytes at the idle sweep's last look
        self.guard = guard
        self.input_held = 0  # bytes allocated for an incomplete request line, counted in guard.buffered
        self.reply_held = 0  # bytes the big replies being built hold (hold()), counted there too
        self.released = False  # release() has run: nothing more is counted
        self.heavy = False  # its last turn held the loop for HEAVY_TURN: the next one queues
        self.session: Any = None  # its Session (kvgevent.server.session), set by the server
        self.sending = 0  # reply lines in the writer's sendall now (lost if it is killed)
        self.batch: bytes | None = None  # the bytes of that sendall
        self.batch_from = 0  # the socket's bytes sent before it (what of it the kernel took)
        self.acked = -1  # bytes the client had acknowledged when last looked at (io.acked)
        self.acked_at = 0.0  # when that figure was first seen: the client's last known progress
        self.drain_seen = (0, 0.0)  # (io.sent, when) at the last eviction check (holding)
        self.parked = False  # the writer waits for the queue to get something (_write_batches)
        self.stale = False  # the writer has been parked since the last retire_writer()
        self._hub = gevent.get_hub()

    @property
    def log(self) -> Logger:
        """A logger bound to this client (made on use: most clients log twice in their life)."""
        return self._log.bind(client_id=self.client_id, peer=self.peer)

    def _start_writer(self) -> Queue:
        self.queue = UnboundQueue()
        self.writer = self.writers.spawn(self._write_loop, self.queue)
        return self.queue

    def _enqueue(self, data: bytes) -> None:
        """Put ``data`` in the queue and wake the writer if it is parked on an empty queue:
        its ``switch`` scheduled with ``loop.run_callback``, so it runs once this turn yields
        (see :meth:`_write_batches`). Nothing else can resume it before that callback runs: a
        kill (abort, release) is delivered by a callback scheduled after it, and a switch to
        a greenlet that died meanwhile would go to its parent, the hub, which runs the
        callback: a no-op. (:meth:`_put` does the same inline.)"""
        (self.queue or self._start_writer()).put_nowait(data)  # unbounded: see __init__
        if self.parked:
            self.parked = self.stale = False
            self._hub.loop.run_callback(self.writer.switch)  # type: ignore[union-attr]  # (parked: a writer exists)

    def retire_writer(self) -> bool:
        """Release the writer greenlet and its queue if the writer has been parked on an
        empty queue since the last call (the server calls this every WRITER_IDLE): nothing
        is queued or in flight then, and the next reply makes both again. Returns whether
        they were released."""
        if not self.parked:
            return False
        if not self.stale:
            self.stale = True  # released at the next call if it is still parked then
            return False
        writer = self.writer
        self.writer = self.queue = None
        self.parked = self.stale = False
        if not self.waiting:
            self.room = None
        writer.kill(block=False)  # type: ignore[union-attr]  # (parked: a writer exists)
        return True

    def retire_reader(self) -> bool:
        """Release the reader greenlet if it has been parked in ``recv`` through ``patience``
        calls (the server calls this every READER_IDLE, on a plain TCP server only) with no
        writer: nothing queued or in flight, nothing but its buffers held. It raises
        :class:`~kvgevent.fastio.Dormant` there and the server leaves the socket's read
        watcher to make the next one. Returns whether it was released."""
        io = self.io
        if not (
            self.reading
            and self.writer is None
            and self.stream is io
            and self.failed is None
            and isinstance(io, FastSocket)
            and io.parked_reading()
        ):
            return False
        if io.quiet < self.patience:
            io.quiet += 1  # (FastSocket.recv sets it back to 0 at each wake-up)
            return False
        io.retire_reader(self.reader)
        return True

    def send_lines(self, lines: list[bytes]) -> None:
        """Queue reply lines (each ending in a newline) as one chunk, with :meth:`send`'s
        rules for a full queue; a chunk that could never fit goes line by line."""
        if self.failed is not None:  # the client is gone: nothing can reach it
            self.count_lost(len(lines))
            return
        count = len(lines)
        data = lines[0] if count == 1 else b"".join(lines)
        size = len(data)
        # (the usual case of _fits inline: a call less per reply; the rest of it below)
        if (
            self.queued_lines + count <= self.queue_size and self.queued_bytes + size <= self.queue_bytes
        ) or (
            count > 1
            and not self.dropping
            and count <= self.queue_size
            and size <= self.queue_bytes
            and self._wait_for_room(count, size)
        ):
            self._put(data, count, size)
            return
        if count == 1:
            self.send(data)
            return
        del data
        for line in lines:
            self.send(line)

    def send(self, line: bytes) -> None:
        """Queue one reply line (ending in a newline); see the module docstring when full."""
        if self.failed is not None:
            self.count_lost(1)
            return
        size = len(line)
        if self._fits(1, size) or (not self.dropping and self._wait_for_room(1, size)):
            self._put(line, 1, size)
            return
        self.drop(1)

    def drop(self, count: int) -> None:
        """Count ``count`` reply lines as dropped (the queue is full and the client does not
        read), logging ``messages_dropping`` once per episode."""
        if not self.dropping:
            self.dropping = True
            self.log.warning(
                "messages_dropping",
                queue_size=self.queue_size,
                queued_bytes=self.queued_bytes,
                messages_dropped=self.messages_dropped,
            )
        self.messages_dropped += count
        self.counters.messages_dropped += count

    def drop_unbuilt(self, count: int) -> None:
        """Count ``count`` lines of a big reply left unbuilt: dropped (:meth:`drop`) while the
        client is here, else lost (gone: no episode of a full queue)."""
        if self.failed is None:
            self.drop(count)
        else:
            self.count_lost(count)

    def reserve(self, count: int, size: int) -> bool:
        """Whether a chunk of ``count`` lines and ``size`` bytes may be queued now, waiting
        for room as :meth:`send` does; False if the client does not read (its replies are
        being dropped) or is gone. On True, build the chunk and :meth:`put_reserved` it
        before yielding. Over --max-memory the queue holds less (``guard.queue_cap``)."""
        if self.failed is not None:
            return False
        limit = min(self.queue_bytes, self.guard.queue_cap)
        return self._room_for(count, size, limit) or (
            not self.dropping and self._wait_for_room(count, size, limit)
        )

    def put_reserved(self, data: bytes, count: int) -> None:
        """Queue a chunk of ``count`` lines that :meth:`reserve` made room for (counted as
        lost if the client went meanwhile)."""
        if self.failed is None:
            self._put(data, count, len(data))
        else:
            self.count_lost(count)

    def _put(self, data: bytes, count: int, size: int) -> None:
        # (_enqueue inline: a call less per reply, bench/OPTIMISATIONS.md, "calls per request")
        (self.queue or self._start_writer()).put_nowait(data)
        if self.parked:
            self.parked = self.stale = False
            self._hub.loop.run_callback(self.writer.switch)  # type: ignore[union-attr]  # (parked: a writer exists)
        self.queued_lines += count
        self.queued_bytes += size
        self.dropping = False
        guard = self.guard
        guard.buffered += size
        if guard.buffered > guard.mark:
            guard.check()

    def _fits(self, count: int, size: int) -> bool:
        # One line larger than the byte bound still goes into an empty queue (nothing in
        # flight either): the bound is there to stop a stuck client from hoarding, not to
        # refuse a big value.
        return self.queued_lines + count <= self.queue_size and (
            self.queued_bytes + size <= self.queue_bytes or (count == 1 and not self.queued_bytes)
        )

    def _room_for(self, count: int, size: int, limit: int) -> bool:
        """:meth:`_fits` with a byte bound of ``limit``."""
        return self.queued_lines + count <= self.queue_size and (
            self.queued_bytes + size <= limit or (count == 1 and not self.queued_bytes)
        )

    def _wait_for_room(self, count: int, size: int, limit: int | None = None) -> bool:
        """Wait while the writer makes room for ``count`` lines of ``size`` bytes. Give up
        (the client is not reading) once, while the writer's send waits, neither the kernel
        took a byte nor the client acknowledged one for DROP_GRACE (the last acknowledgement
        seen is remembered across waits, so a client known to be stuck is given up on at
        once), or after ROOM_WAIT_LIMIT without progress (the writer never got to run). A
        client that keeps reading, however slowly, is waited for: a big batch's room appears
        only once all of it is sent, long after its first bytes left. ``limit``: the byte
        bound, if not ``queue_bytes``."""
        if self.room is None:
            self.room = gevent.event.Event()
        io = self.io
        give_up = time.monotonic() + ROOM_WAIT_LIMIT
        self.waiting = True
        try:
            bound = self.queue_bytes if limit is None else limit
            while not self._room_for(count, size, bound):
                if self.failed is not None:
                    return False
                now = time.monotonic()
                seen = io.acked()
                if seen != self.acked:  # the client has read since we last looked
                    self.acked, self.acked_at, give_up = seen, now, now + ROOM_WAIT_LIMIT
                stalled = io.stalled_since  # (the writer's own progress: bytes the kernel took)
                if (stalled and now - max(stalled, self.acked_at) >= DROP_GRACE) or now >= give_up:
                    return False
                self.room.clear()
                self.room.wait(DROP_GRACE / 5)
            return self.failed is None  # (a client gone meanwhile: its queue emptied, not read)
        finally:
            self.waiting = False

    def note_input(self) -> None:
        """Count the incomplete request line the buffer holds now (after a ``feed``): the
        memory allocated for it, which runs ahead of its length."""
        held = self.buffer.allocated
        delta = held - self.input_held
        if delta and not self.released:
            self.input_held = held
            self._count_held(delta)

    def hold(self, size: int) -> None:
        """Count ``size`` bytes that the big replies being built for this client hold (the
        session's :class:`~kvgevent.server.session.Holding`), in place of what was counted."""
        delta = size - self.reply_held
        if delta and not self.released:
            self.reply_held = size
            self._count_held(delta)
            if self.guard.limit:  # (looked at again while it holds any: rehold)
                if size:
                    self.guard.holders.add(self)
                else:
                    self.guard.holders.discard(self)

    def rehold(self, seen: set[int]) -> None:
        """Count again what the big replies being built hold, if that changed
        (``Session.held_now``: values the store dropped meanwhile are theirs now, unless
        another client's reply, in ``seen``, counts them)."""
        size = self.session.held_now(seen)
        if size is not None:
            self.hold(size)

    def counted(self, seen: set[int]) -> None:
        """``Session.counted``: the dropped lists this client's replies count as theirs."""
        self.session.counted(seen)

    def _count_held(self, delta: int) -> None:
        """Add ``delta`` bytes to the guard's count of client buffers; past its mark, it looks
        whether the server is over --max-memory."""
        guard = self.guard
        guard.buffered += delta
        if guard.buffered > guard.mark:
            guard.check()

    def buffered(self) -> int:
        """Bytes this client holds now: its incomplete line, queued and in-flight replies, and
        what the big replies being built hold."""
        return self.input_held + self.queued_bytes + self.reply_held

    def holding(self, now: float) -> int:
        """What this client holds as eviction for --max-memory judges it: :meth:`buffered`,
        but while its writer is draining the queue (:meth:`_draining`; this look is noted
        for the next), the queue counts for no more than PRESSED_QUEUE_BYTES and what its
        big replies hold (:meth:`hold`) not at all: over the limit, a big reply is built no
        further ahead of its reader than that, so a prompt reader's queue shrinks to it by
        itself, and its copy goes at the reply's end, where a client that does not read
        keeps what it holds."""
        queued = self.queued_bytes
        if (queued > PRESSED_QUEUE_BYTES or self.reply_held) and self._draining(now):
            # (nor does what its big replies hold count: a prompt reader frees it by reading;
            # counted, a reader of a 1M-value key was disconnected at --max-memory 100M)
            return self.input_held + min(queued, PRESSED_QUEUE_BYTES)
        return self.input_held + queued + self.reply_held

    def _draining(self, now: float) -> bool:
        """Whether the writer is sending the queue out: at EVICT_DRAIN_RATE or more since the
        last look (within EVICT_DRAIN_WINDOW), else, at a first look, a byte left within
        EVICT_DRAINING."""
        sent, seen_at = self.drain_seen
        self.drain_seen = (self.io.sent, now)
        if seen_at and now - seen_at < EVICT_DRAIN_WINDOW:
            return self.io.sent - sent >= EVICT_DRAIN_RATE * (now - seen_at)
        stalled = self.io.stalled_since
        return not stalled or now - stalled < EVICT_DRAINING

    def release(self) -> None:
        """Give back everything this connection counted in the guard (when it is dropped);
        nothing is counted afterwards."""
        if not self.released:
            self.released = True
            self.guard.buffered -= self.input_held + self.queued_bytes + self.reply_held
            self.input_held = self.reply_held = 0
            self.guard.holders.discard(self)

    def abort(self, reason: str) -> None:
        """Disconnect now, from any greenlet, dropping what is queued: record ``reason`` as
        the failure, stop the writer, free the queue and shut the socket down (the reader
        wakes, sees :attr:`failed` and ends; it still closes the socket)."""
        if self.failed is None:
            self.failed = reason
        if self.writer is not None and not self.writer.dead:
            self.count_lost(self._unsent_lines())  # (the send it is killed in)
            self.writer.kill(block=False)
        self._discard_queue()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _discard_queue(self) -> None:
        """Empty the queue (its replies are lost, and counted so), wake a reader waiting for
        room."""
        queue = self.queue
        if self.queued_lines:
            self.count_lost(self.queued_lines)
        while queue is not None and not queue.empty():
            queue.get_nowait()
        if not self.released:
            self.guard.buffered -= self.queued_bytes
        self.queued_lines = self.queued_bytes = 0
        if self.room is not None:
            self.room.set()  # a reader waiting for room gives up at once

    def _write_loop(self, queue: Queue) -> None:
        """The writer greenlet: send queued chunks in batches of up to MAX_SEND_BATCH bytes,
        one ``sendall`` per batch, until the _EOF sentinel or a socket error
        (:meth:`_write_batches`); a socket error is recorded (:meth:`_write_failed`)."""
        try:
            self._write_batches(queue)
        except OSError as exc:
            self._write_failed(exc)
        except GreenletExit:
            pass  # killed: end as a plain return, so that no traceback pins the batch
        finally:
            self.batch = None  # (nor does this: flush counted its lines before the kill)

    def _write_batches(self, queue: Queue) -> None:
        """The writer's loop (:meth:`_write_loop`). An empty queue parks it with a bare
        ``Hub.switch``, :attr:`parked` set; whoever puts into the queue (:meth:`_enqueue`)
        schedules its wake-up with ``loop.run_callback``. gevent's ``Queue.get`` on an empty
        queue makes a ``Waiter`` and enters a pure-Python ``Timeout`` context each time, and
        ``put_nowait`` wakes it through a scheduled callback of its own: more than the rest
        of a small reply costs (bench/OPTIMISATIONS.md, "lean waits"). A kill while parked
        comes out of the switch as GreenletExit. A batch's bytes are free only once
        ``sendall`` returned (until then the batch is pinned): then a reader waiting for room
        may go on."""
        sendall = self.stream.sendall
        io = self.io
        hub = self._hub
        guard = self.guard
        while True:
            if not queue.qsize():
                self.parked = True
                hub.switch()
                continue
            data = queue.get_nowait()
            if not data:  # _EOF
                return
            eof = False
            if queue.qsize():
                data, eof = self._gather(queue, data)
                self.sending = data.count(b"\n")  # values never hold a newline
            else:  # (the queue's only chunk: every line queued is in it, no count needed)
                self.sending = self.queued_lines
            self.queued_lines -= self.sending
            if self.waiting:
                self.room.set()  # type: ignore[union-attr]  # (waiting: _wait_for_room made the event)
            self.batch, self.batch_from = data, io.sent
            sendall(data)
            self.sending = 0
            self.batch = None
            size = len(data)
            del data
            if self.failed is not None:
                return  # aborted meanwhile: abort() has discarded the queue and its bytes
            # Its bytes are free now (inline, not a method: a call less per batch).
            self.queued_bytes -= size
            if not self.released:
                guard.buffered -= size
            if self.waiting:
                self.room.set()  # type: ignore[union-attr]  # (waiting: _wait_for_room made the event)
            if eof:
                return

    @staticmethod
    def _gather(queue: Queue, data: bytes) -> tuple[bytes, bool]:
        """``data`` joined with the chunks queued after it, up to MAX_SEND_BATCH bytes (one
        ``sendall``); and whether the _EOF sentinel came among them."""
        batch = [data]
        size = len(data)
        for _ in range(queue.qsize()):
            chunk = queue.get_nowait()
            if not chunk:  # _EOF
                return b"".join(batch), True
            batch.append(chunk)
            size += len(chunk)
            if size >= MAX_SEND_BATCH:
                break
        return b"".join(batch), False

    def _write_failed(self, exc: OSError) -> None:
        """Sending failed: record why, drop what is queued, wake the reader (see the module
        docstring: the writer never closes the socket)."""
        if self.failed is None:
            self.failed = _write_failure(exc)
            self.count_lost(self._unsent_lines())  # (the send that failed; after an abort: counted)
        self._discard_queue()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the reader if it is in recv
        except OSError:
            pass

    def flush(self, stall: float, deadline: float | None, linger: bool = True) -> None:
        """Let the writer send what is queued, then stop it, and (``linger``) let what left
        reach the client (:meth:`_linger`). Gives up when no byte leaves for ``stall``
        seconds (the client is not reading) or at ``deadline`` (monotonic); what was still
        queued then counts as dropped."""
        writer = self.writer
        if writer is not None and not writer.dead:
            self._wait_for_writer(writer, stall, deadline)
        if writer is None or writer.dead:  # (all left the queue; or released while idle)
            if self.failed is None and self.stream is not self.io:
                self._close_notify()
            if self.failed is None and linger:
                self._linger(stall, deadline)
            return
        self.count_lost(self.queued_lines + self._unsent_lines())  # queued, or in a send that will not end
        writer.kill(block=True)

    def _close_notify(self) -> None:
        """TLS: send this side's close_notify after the last reply, if the kernel takes it at
        once (a client that does not read is not waited for): a client that ends the session
        properly (``SSLSocket.unwrap``) waits for it."""
        alert = self.stream.close_notify()
        if alert:
            try:
                os.write(self.sock.fileno(), alert)  # (the socket is non-blocking: never waits)
            except OSError:
                pass

    def _wait_for_writer(self, writer: Greenlet, stall: float, deadline: float | None) -> None:
        """Queue the end of the stream and wait for the writer to send everything before it:
        until it ends, no byte was acknowledged for ``stall`` seconds, or ``deadline``."""
        self._enqueue(_EOF)  # (the queue is unbounded: it always takes it)
        while not writer.dead:
            wait = stall
            if deadline is not None:
                wait = min(wait, deadline - time.monotonic())
                if wait <= 0:
                    return
            acked = self.io.acked()  # bytes the client took (see kvgevent.fastio)
            writer.join(wait)
            if not writer.dead and self.io.acked() == acked:
                return  # no progress: the client is not reading

    def _unsent_lines(self) -> int:
        """Of the lines in the writer's sendall now, those the kernel has not taken whole
        (a line whose newline it has not taken does not reach the client whole). Over TLS,
        where bytes sent are not the reply's: all of them."""
        batch = self.batch
        if batch is None or self.stream is not self.io:
            return self.sending
        return batch.count(b"\n", self.io.sent - self.batch_from)

    def _linger(self, stall: float, deadline: float | None) -> None:
        """Once the queue has left, and the client sent what was not read (or replies still
        wait in the kernel): shut the write side (its end of stream comes right after the
        last reply), then read and throw away what it sends until the replies are
        acknowledged and it closes too, as flush waits (no progress for ``stall`` seconds,
        or ``deadline``). A socket closed with unread input is reset by the kernel, which
        throws away its send queue (and the client's kernel, what it had not read yet): a
        client pipelining requests lost megabytes of replies that had left, unseen and
        uncounted."""
        pending = unacknowledged(self.sock)
        # Waiting for its close matters only if it sent what was not read (else nothing can
        # make the kernel reset the connection): an idle client whose last reply awaits a
        # delayed ACK is closed once that comes.
        sent_input = unread(self.sock) > 0
        if pending is None or not (pending or sent_input):  # (the usual close)
            return
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return
        fd = self.sock.fileno()
        progress_at = time.monotonic()
        ended = False
        while pending or (sent_input and not ended):
            now = time.monotonic()
            left = stall - (now - progress_at)
            if deadline is not None:
                left = min(left, deadline - now)
            if left <= 0:
                return
            found = discard_input(fd, min(LINGER_POLL, left), ended)
            if found == INPUT_FAILED:
                return
            sent_input = sent_input or found == INPUT_SOME
            ended = found == INPUT_ENDED
            now_pending = unacknowledged(self.sock) or 0
            if now_pending < pending:
                progress_at = time.monotonic()
            pending = now_pending

    def count_lost(self, count: int) -> None:
        """Count ``count`` reply lines the client will never get (not a full queue's drop:
        no ``messages_dropping`` episode)."""
        if not count:
            return
        self.messages_dropped += count
        self.counters.messages_dropped += count

    def awaiting_input(self) -> bool:
        """For the idle sweep: whether the reader waits for the client's input (parked in
        ``recv``, nothing unread). One busy elsewhere (a batch, room for its replies, its
        turn) has the client's requests still to read: the silence is the server's, and a
        client closed then lost the writes it had sent (an auditor's runs: 0 of 300)."""
        io = self.io
        if isinstance(io, FastSocket) and not io.parked_reading():
            return False
        return unread(self.sock) == 0

    def receiving(self) -> bool | None:
        """For the idle sweep: whether replies are on their way to the client and it took
        some since the sweep's last look (None: replies are on their way, and this is the
        first look: ask again at the next). A client reading a long reply sends nothing, and
        is not idle; one that does not read is."""
        acked = self.io.acked()
        mark, self.acked_mark = self.acked_mark, acked
        if self.queued_lines or self.sending or unacknowledged(self.sock):
            return None if mark is None else acked > mark
        self.acked_mark = None
        return False

    def close(self) -> None:
        self.io.forget_reader()
        try:
            self.sock.close()
        except OSError:
            pass


def discard_input(fd: int, timeout: float, ended: bool) -> int:
    """Wait up to ``timeout`` for input on socket ``fd`` and throw away what came, at most
    DISCARD_READS reads (a client sending faster than that is read again after a wait, which
    lets the others run); once its input ``ended``, only wait. INPUT_NONE, INPUT_SOME,
    INPUT_ENDED, or INPUT_FAILED (reset: nothing more can be delivered)."""
    if ended:
        gevent.sleep(timeout)  # (the acknowledgements have no event of their own)
        return INPUT_ENDED
    try:
        wait_read(fd, timeout)
    except TimeoutError:  # (gevent's socket.timeout)
        return INPUT_NONE
    try:
        for _ in range(DISCARD_READS):
            if not os.read(fd, DISCARD_READ):
                return INPUT_ENDED
    except BlockingIOError:
        pass
    except OSError:
        return INPUT_FAILED
    return INPUT_SOME


INPUT_NONE, INPUT_SOME, INPUT_ENDED, INPUT_FAILED = range(4)
"""What :func:`discard_input` found."""

DISCARD_READS = 16
"""Reads of a closing client's input in a row before it waits again (1 MiB at most)."""

DISCARD_READ = 1 << 16
"""Bytes read at a time from a closing client's input, to be thrown away."""


def _write_failure(exc: OSError) -> str:
    """The drop reason of a send that failed: a TLS session that failed (its reader met a
    corrupt record or an alert after lines whose replies are being sent) is ``tls_error``, as
    the reader would have said."""
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    return "tls_error" if isinstance(exc, ssl.SSLError) else "write_error"
