"""Durability: the append-only file, replay, torn tails, corruption and repair, compaction
under load, fsync failures, group commit, and a SIGKILL crash test."""

import errno
import os
import random
import shutil
import signal
import socket
import threading
import time
import tracemalloc
from pathlib import Path

import gevent
import gevent.event
import pytest
from conftest import Peer, log_events, memory_of, wait_until
from gevent.monkey import get_original

from kvgevent import KeyValueServer
from kvgevent.errors import StoreError
from kvgevent.protocol import Put, parse
from kvgevent.stores.aof import (
    HEADER,
    MAGIC,
    READ_CHUNK,
    SEARCH_BUDGET,
    AofCorrupt,
    Scanner,
    encode_record,
    scan,
)
from kvgevent.stores.durable import DurableStore

_stores: list[DurableStore] = []


def new_store(path, **options) -> DurableStore:
    """A DurableStore (not opened yet), closed after the test."""
    store = DurableStore(str(path), **options)
    _stores.append(store)
    return store


def opened(path, **options) -> DurableStore:
    store = new_store(path, **options)
    store.open()
    return store


def serving(path, **options) -> tuple[DurableStore, KeyValueServer]:
    """An opened DurableStore and a started server over it (the test closes the server)."""
    store = opened(path, **options)
    server = KeyValueServer(store)
    server.start(0)
    return store, server


@pytest.fixture(autouse=True)
def close_stores():
    yield
    while _stores:
        store = _stores.pop()
        if store.aof.fd >= 0:
            store.close()


def test_replay_restores_every_command(tmp_path):
    """PUT, UPDATE, DELETE and binary values with ':' come back exactly after a restart."""
    path = tmp_path / "kv.aof"
    store = opened(path)
    store.put(b"k", b"a:b\x00\xff")
    store.put(b"k", b"2")
    store.put(b"gone", b"x")
    store.update(b"k", b"2", b"three\r:3")
    store.update(b"fresh", b"nope", b"new")
    store.delete(b"gone")
    store.close()
    again = opened(path)
    assert again.get(b"k") == [b"a:b\x00\xff", b"three\r:3"]
    assert again.get(b"fresh") == [b"new"]
    assert again.get(b"gone") == []
    assert again.count_keys() == 2
    again.close()


def test_record_format_is_length_and_checksum_framed():
    data = MAGIC + encode_record(b"PUT:k:v") + encode_record(b"DELETE:k")
    payloads, found = scan(data)
    assert payloads == [b"PUT:k:v", b"DELETE:k"]
    assert found.good_end == len(data) and not found.torn and found.corrupt_at is None


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_torn_tail_is_truncated(tmp_path, cut):
    """A record cut short by a crash (in its header or payload) is dropped with a report."""
    path = tmp_path / "kv.aof"
    good = MAGIC + encode_record(b"PUT:k:1") + encode_record(b"PUT:k:2")
    path.write_bytes(good + encode_record(b"PUT:k:3")[:cut])
    store = new_store(path)
    report = store.open()
    assert report["truncated_at"] == len(good)
    assert store.get(b"k") == [b"1", b"2"]
    assert path.stat().st_size == len(good)
    store.put(b"k", b"4")  # and appending goes on from there
    store.close()
    assert opened(path).get(b"k") == [b"1", b"2", b"4"]


def test_half_written_last_record_is_truncated(tmp_path):
    """A last record whose checksum fails (its page half written) is a torn tail too."""
    path = tmp_path / "kv.aof"
    good = MAGIC + encode_record(b"PUT:k:1")
    last = bytearray(encode_record(b"PUT:k:2"))
    last[-1] ^= 0xFF
    path.write_bytes(good + bytes(last))
    store = new_store(path)
    assert store.open()["truncated_at"] == len(good)
    assert store.get(b"k") == [b"1"]


def test_corruption_in_the_middle_stops_start_up(tmp_path):
    """A bad record with records after it: refused, naming the file and the offset."""
    path = tmp_path / "kv.aof"
    first = MAGIC + encode_record(b"PUT:k:1")
    bad = bytearray(encode_record(b"PUT:k:2"))
    bad[10] ^= 0x01
    path.write_bytes(first + bytes(bad) + encode_record(b"PUT:k:3") + encode_record(b"PUT:k:4"))
    with pytest.raises(AofCorrupt) as info:
        new_store(path).open()
    assert info.value.offset == len(first)
    assert str(path) in str(info.value) and str(len(first)) in str(info.value)
    assert path.stat().st_size > len(first)  # nothing was changed


def test_repair_truncates_at_the_last_good_record(tmp_path):
    path = tmp_path / "kv.aof"
    first = MAGIC + encode_record(b"PUT:k:1")
    bad = bytearray(encode_record(b"PUT:k:2"))
    bad[10] ^= 0x01
    path.write_bytes(first + bytes(bad) + encode_record(b"PUT:k:3") + encode_record(b"PUT:k:4"))
    store = new_store(path)
    report = store.open(repair=True)
    assert report["repaired_at"] == len(first)
    assert report["dropped_records"] == 3
    assert store.get(b"k") == [b"1"]
    assert path.stat().st_size == len(first)


def test_the_records_a_repair_drops_are_counted_past_further_damage_and_a_damaged_header():
    """``records_after`` (what ``aof_corrupt`` and ``aof_repaired`` report) counts every
    well-formed record after the damage: past a second damaged record, and the whole file
    when its header is damaged. Before, it counted only up to the next damage (records 300
    and 700 damaged in 1,000: 399, where a repair drops 700) and 0 for a damaged header
    (one bit of ``KVAOF1``: a repair emptied the file, reported as 1 record dropped)."""
    records = [bytearray(encode_record(b"PUT:k%d:v" % i)) for i in range(1000)]
    for damaged in (300, 700):
        records[damaged][HEADER.size] ^= 0x01  # (its checksum no longer matches)
    good = MAGIC + b"".join(records[:300])
    payloads, found = scan(MAGIC + b"".join(records))
    assert len(payloads) == 300 and found.corrupt_at == len(good)
    assert found.records_after == 1000 - 300 - 2  # (the damaged ones cannot be counted)
    plain = [encode_record(b"PUT:k%d:v" % i) for i in range(1000)]
    zeroed = bytearray(MAGIC + b"".join(plain))
    start = len(MAGIC) + sum(map(len, plain[:500]))
    zeroed[start : start + 300] = bytes(300)  # (a stretch over about 17 records)
    _, found = scan(bytes(zeroed))
    assert found.corrupt_at == start and 470 < found.records_after < 500
    header = bytearray(zeroed[: len(MAGIC)] + zeroed[len(MAGIC) : start])
    header[0] ^= 0x01
    payloads, found = scan(bytes(header))
    assert payloads == [] and found.corrupt_at == 0 and found.records_after == 500


def test_a_compaction_keeps_the_logs_permissions_and_owner(tmp_path):
    """The compaction's new file takes the log's place: it came back 0644 and root's for a
    log an operator made 0600 and gave to the service's user (readable by every local user,
    2/2 in an auditor's runs). (Giving a file to another user needs root: skipped otherwise.)"""
    if os.geteuid() != 0:
        pytest.skip("giving the log to another user needs root (CI runs as root)")
    path = tmp_path / "kv.aof"
    opened(path).close()
    path.chmod(0o600)
    os.chown(path, 65534, 65534)
    store = opened(path)
    store.put(b"k", b"v")
    store.rewrite()
    assert store.aof.rewrites == 1
    store.close()
    found = path.stat()
    assert (oct(found.st_mode & 0o777), found.st_uid, found.st_gid) == ("0o600", 65534, 65534)
    assert opened(path).get(b"k") == [b"v"]


def test_compaction_under_concurrent_writes(tmp_path, log_stream, connect):
    """While clients write, the file is rewritten (automatically and on demand) and replaced;
    after a restart the data is exactly what the clients wrote, from a smaller file."""
    path = tmp_path / "kv.aof"
    store, server = serving(path, rewrite_min_size=32 * 1024, rewrite_growth=2.0)
    models: list[dict[bytes, list[bytes]]] = []

    def client(n: int) -> None:
        rng = random.Random(n)
        peer = connect(server.port)
        model: dict[bytes, list[bytes]] = {}
        models.append(model)
        for i in range(1500):
            key = b"c%dk%d" % (n, rng.randrange(20))
            op = rng.random()
            if op < 0.6:
                value = b"v%d" % i
                peer.send(b"PUT:" + key + b":" + value + b"\n")
                model.setdefault(key, []).append(value)
            elif op < 0.85:
                values = model.setdefault(key, [])
                old = values[0] if values else b"none"
                peer.send(b"UPDATE:" + key + b":" + old + b":u%d\n" % i)
                if old in values:
                    values.remove(old)
                values.append(b"u%d" % i)
            else:
                peer.send(b"DELETE:" + key + b"\n")
                model.pop(key, None)
            if i % 100 == 0:
                peer.request(b"")

        peer.request(b"")

    try:
        writers = [gevent.spawn(client, n) for n in range(6)]
        gevent.sleep(0.05)
        store.rewrite()  # one on demand, mid-flight
        gevent.joinall(writers, raise_error=True)
        assert store.aof.rewrites >= 2, "the automatic rewrite did not run"
        store.rewrite()  # (waits for an automatic one under way, then compacts)
        churn = connect(server.port)
        churn.request(b"PUT:churn:x\nDELETE:churn\n" * 50)  # records that compact to nothing
        size_before = path.stat().st_size
        store.rewrite()
        assert path.stat().st_size < size_before
    finally:
        server.close()
    again = opened(path)
    expected = {k: v for model in models for k, v in model.items() if v}
    assert {k: again.get(k) for k in expected} == expected
    assert again.count_keys() == len(expected)
    assert any(e["event"] == "aof_rewritten" for e in log_events(log_stream))


def test_fsync_failure_is_logged_and_surfaced(tmp_path, log_stream, connect, monkeypatch):
    """Under --fsync always a failed fsync turns PONG into 'ERR persistence failed', shows in
    STATS and the log; once fsync works again, PONG comes back."""
    _store, server = serving(tmp_path / "kv.aof", fsync="always")
    try:
        peer = connect(server.port)
        assert peer.request(b"PUT:k:1\n") == []

        def broken(fd):
            raise OSError(5, "Input/output error")

        monkeypatch.setattr(os, "fsync", broken)
        peer.send(b"PUT:k:2\nPING\n")
        assert peer.read_lines(1) == [b"ERR persistence failed"]  # in place of the PONG
        peer.send(b"STATS\n")  # (a PING would get the ERR too, as long as fsync fails)
        stats = dict(x.split(b"=") for x in peer.read_lines(1)[0].split())
        assert int(stats[b"aof_fsync_errors"]) >= 1 and stats[b"aof_ok"] == b"0"
        failures = [e for e in log_events(log_stream) if e["event"] == "aof_fsync_failed"]
        assert failures and failures[0]["errno"] == 5
        # While the log is failing, writes are refused and change nothing; reads go on.
        # (the PING too: this connection's PUT:k:2 is not known to be on disk)
        peer.send(b"PUT:k:refused\nGET:k\nPING\n")
        assert peer.read_lines(4) == [b"ERR persistence failed", b"k:1", b"k:2", b"ERR persistence failed"]
        monkeypatch.undo()
        wait_until(lambda: any(e["event"] == "aof_recovered" for e in log_events(log_stream)), 10)
        assert peer.request(b"PUT:k:3\n") == []
    finally:
        server.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2", b"3"]


class FullDisk:
    """``os.pwritev`` as on a disk that fills up mid-write: the first write it sees takes half
    of its bytes, every later one fails with ENOSPC, until :meth:`free` (for every file, the
    recovery's probe included). Injected at the OS-call boundary to pin down the short write;
    the tmpfs tests make the disk really full."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.real = os.pwritev
        self.calls = 0
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(os, "pwritev", self.pwritev)

    def pwritev(self, fd, buffers, offset):
        self.calls += 1
        if self.calls == 1:
            data = b"".join(bytes(b) for b in buffers)
            return self.real(fd, [data[: len(data) // 2]], offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    def free(self) -> None:
        self.monkeypatch.setattr(os, "pwritev", self.real)


def test_a_failed_write_is_refused_and_cut_from_the_file(tmp_path, log_stream, connect, monkeypatch):
    """A write the disk takes only part of is cut from the file and refused: the PUT gets
    'ERR persistence failed' and changes nothing, later writes are refused without touching
    the disk, one aof_write_failed is logged; once the disk has room the log recovers by
    itself and the file holds exactly the acknowledged writes."""
    path = tmp_path / "kv.aof"
    store, server = serving(path, fsync="always")
    try:
        peer = connect(server.port)
        assert peer.request(b"PUT:k:1\n") == []
        disk = FullDisk(monkeypatch)
        peer.send(b"PUT:k:2\nPING\n")
        # PONG: this connection's earlier write (k:1) is on disk; k:2 was never applied.
        assert peer.read_lines(2) == [b"ERR persistence failed", b"PONG"]
        assert path.stat().st_size == store.aof.size, "the torn half record is still in the file"
        assert peer.request(b"GET:k\nPUT:k:3\nUPDATE:k:1:x\nDELETE:k\nGET:k\n") == [
            b"k:1",
            *[b"ERR persistence failed"] * 3,
            b"k:1",
        ]
        assert disk.calls == 1 + 1, "refused writes must not touch the disk"  # (+1: a probe)
        stats = dict(x.split(b"=") for x in peer.request(b"STATS\n")[0].split())
        assert stats[b"aof_ok"] == b"0" and int(stats[b"aof_writes_refused"]) == 4
        disk.free()
        wait_until(lambda: any(e["event"] == "aof_recovered" for e in log_events(log_stream)), 10)
        assert peer.request(b"PUT:k:4\n") == []
        events = [e["event"] for e in log_events(log_stream)]
        assert events.count("aof_write_failed") == 1 and events.count("aof_recovered") == 1
    finally:
        server.close()
    assert opened(path).get(b"k") == [b"1", b"4"]


def test_concurrent_pings_share_fsyncs(tmp_path, connect, monkeypatch):
    """Group commit: 20 clients each doing 20 write+PING rounds need far fewer fsyncs."""
    _store, server = serving(tmp_path / "kv.aof", fsync="always")
    calls = []
    real_fsync = os.fsync
    real_sleep = get_original("time", "sleep")

    def counting(fd):
        calls.append(fd)
        real_sleep(0.002)  # a disk that takes its time (this runs in the threadpool)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting)
    try:

        def client(n):
            peer = connect(server.port)
            for i in range(20):
                assert peer.request(b"PUT:g%d:%d\n" % (n, i)) == []

        gevent.joinall([gevent.spawn(client, n) for n in range(20)], raise_error=True)
        print(f"\n400 acknowledged writes, {len(calls)} fsyncs")
        assert 0 < len(calls) < 400 / 2
    finally:
        server.close()


class SlowWrites:
    """``os.pwritev`` as on a slow disk: each write takes ``seconds`` (a real sleep, in the
    thread that makes it) and is counted. Injected at the OS-call boundary: a write that
    blocks for seconds happens for real on ext4 over a throttled device (an attacker's pass
    held the event loop 0.8 to 33 s that way, with the write made from the loop), but not
    within a test's time or on every machine."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
        self.real, self.seconds, self.calls = os.pwritev, seconds, 0
        self.sleep = get_original("time", "sleep")
        monkeypatch.setattr(os, "pwritev", self.pwritev)

    def pwritev(self, fd, buffers, offset):
        self.calls += 1
        self.sleep(self.seconds)
        return self.real(fd, buffers, offset)


def test_after_a_slow_write_the_log_holds_neither_the_loop_nor_the_reads(tmp_path, connect, monkeypatch):
    """README, Persistence: once a write of the log was slow (SLOW_WRITE), its writes are
    made by a thread of its own for THREADED_FOR, so the event loop does not wait for the
    disk (the first slow write, made from the loop, could not be foreseen). With each write
    taking 1 s, after a first one: a client's PUT waits for its write while another client's
    GETs and PINGs are answered at once (within 0.3 s; the writer's reply comes after 1 s);
    writes that come meanwhile wait for that write and are then written together (one
    write for the three), each applied in the order of its records: a restart finds the
    values in the order they were served."""
    store, server = serving(tmp_path / "kv.aof", fsync="everysec")
    try:
        setup = connect(server.port)
        slow = SlowWrites(monkeypatch, 1.0)
        assert setup.request(b"PUT:k:0\n") == []  # (slow, from the loop: the thread from now on)
        slow.calls = 0
        writer, reader = connect(server.port), connect(server.port)
        began = time.monotonic()
        writer.send(b"PUT:k:1\nPING\n")
        wait_until(lambda: slow.calls == 1, 5)
        assert reader.request(b"GET:k\n") == [b"k:0"]  # (from memory: the PUT is not applied yet)
        answered = time.monotonic() - began
        others = [connect(server.port) for _ in range(3)]
        for n, peer in enumerate(others, 2):
            peer.send(b"PUT:k:%d\nPING\n" % n)
        assert writer.read_lines(1) == [b"PONG"]
        waited = time.monotonic() - began
        for peer in others:
            assert peer.read_lines(1) == [b"PONG"]
        assert answered < 0.3 < 1.0 <= waited, (answered, waited)
        assert slow.calls == 2, slow.calls  # (the three that came meanwhile: one write)
        got = reader.request(b"GET:k\n")
        assert got[:2] == [b"k:0", b"k:1"] and sorted(got[2:]) == [b"k:2", b"k:3", b"k:4"], got
    finally:
        server.close()
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [line[2:] for line in got]  # (the file's order)


def test_a_write_made_while_an_fsync_is_under_way_does_not_hold_the_loop(tmp_path, monkeypatch):
    """README, Persistence: while the disk is busy with the server's other work (an fsync
    here), the log's writes are made by its thread, the first one included: that is when a
    write from the loop waited for the journal (an attacker's pass, ext4 over a throttled
    device). An fsync and then a write each take 1 s; while the write is made, the event
    loop goes on turning (no gap of 0.5 s between two 10 ms sleeps), and the write still
    waits for its second. Injected: slow os.fsync and os.pwritev (SlowWrites)."""
    store = opened(tmp_path / "kv.aof", fsync="always")
    store.apply([Put(b"k", b"0")])  # (from the loop: the disk keeps up)
    real_fsync, sleep, syncing = os.fsync, get_original("time", "sleep"), []

    def slow_fsync(fd):
        syncing.append(fd)
        sleep(1.0)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    syncer = gevent.spawn(store.barrier)
    wait_until(lambda: syncing, 5)
    SlowWrites(monkeypatch, 1.0)
    began = time.monotonic()
    writer = gevent.spawn(store.apply, [Put(b"k", b"1")])
    gaps, last = [], time.monotonic()
    while not writer.ready():
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
    assert writer.get() == [None] and time.monotonic() - began >= 1.0
    assert max(gaps) < 0.5, f"the loop stood still for {max(gaps):.2f} s"
    syncer.join(timeout=10)
    assert store.get(b"k") == [b"0", b"1"]


def test_a_writer_killed_while_its_write_is_made_applies_it_first(tmp_path, monkeypatch):
    """The log's write cannot be stopped once made: a greenlet killed while its write is
    under way (the server's stop kills the clients it could not close) waits for the write,
    applies its batch, and only then dies, so memory and the file agree. Before, a write in
    a thread left that way would have left a record in the file that memory never had, and
    the next write would have gone over it. Injected: a slow os.pwritev (SlowWrites)."""
    path = tmp_path / "kv.aof"
    store = opened(path)
    slow = SlowWrites(monkeypatch, 0.3)
    store.apply([Put(b"k", b"0")])  # (slow, from the loop: the thread from now on)
    victim = gevent.spawn(store.apply, [Put(b"k", b"1")])
    wait_until(lambda: slow.calls == 2, 5)
    victim.kill(block=True, timeout=5)
    assert victim.dead and isinstance(victim.value, gevent.GreenletExit)
    assert store.get(b"k") == [b"0", b"1"]
    store.apply([Put(b"k", b"2")])
    store.close()
    assert opened(path).get(b"k") == [b"0", b"1", b"2"]


def test_stats_report_the_log(tmp_path, connect):
    _store, server = serving(tmp_path / "kv.aof")
    try:
        line = connect(server.port).request(b"PUT:k:v\nSTATS\n")[0]
        stats = dict(x.split(b"=") for x in line.split())
        for name in (b"aof_bytes", b"aof_records", b"aof_last_fsync_ms", b"aof_rewrites"):
            assert stats[name].isdigit(), name
        assert stats[b"aof_records"] == b"1"
    finally:
        server.close()


# --- through run_server.py ---------------------------------------------------------------------


def test_corrupt_file_stops_the_server_and_repair_starts_it(server_process, tmp_path):
    path = tmp_path / "kv.aof"
    first = MAGIC + encode_record(b"PUT:k:1")
    bad = bytearray(encode_record(b"PUT:k:2"))
    bad[9] ^= 0x01
    path.write_bytes(first + bytes(bad) + encode_record(b"PUT:k:3"))
    proc = server_process("--aof", str(path), wait=False)
    assert proc.stop(None) == 1
    (event,) = proc.events()
    assert event["event"] == "aof_corrupt" and event["path"] == str(path) and event["offset"] == len(first)
    repaired = server_process("--aof", str(path), "--aof-repair")
    peer = Peer(repaired.port)
    assert peer.request(b"GET:k\n") == [b"k:1"]
    peer.close()
    assert repaired.stop() == 0
    assert any(e["event"] == "aof_repaired" and e["dropped_records"] == 2 for e in repaired.events())


def test_graceful_shutdown_keeps_everything(server_process, tmp_path):
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", "no")
    peer = Peer(proc.port)
    peer.request(b"".join(b"PUT:s:%d\n" % i for i in range(1000)))  # applied (not yet synced)
    assert proc.stop(signal.SIGTERM) == 0
    peer.close()
    restarted = server_process("--aof", str(path))
    peer = Peer(restarted.port)
    assert len(peer.request(b"GET:s\n")) == 1000
    peer.close()


CHURN_ROUNDS = 4000
CHURN_VALUE = b"v" * (64 << 10)
"""A log of 4,000 PUTs of 64 KiB values, each followed by a DELETE of its key: 262 MB."""


def test_run_server_replays_a_big_log_in_far_less_memory_than_the_file(server_process, tmp_path):
    """README, Persistence, "The file": "**Replay** streams the file: memory is bounded by the
    largest record, not by the file." A real 262 MB log in the server's format (written by
    kvgevent.stores.aof's own encode_record) of churn: 4,000 PUTs of 64 KiB values, each
    followed by a DELETE of its key, then one small PUT, so the data it ends with is one short
    value. run_server.py --aof replays it (aof_replayed: every record, one key), and its peak
    resident set size since it started (VmHWM, from /proc: the kernel's count, page cache not
    included) stays under a third of the file; it is about 50 MB on the project's VM, and a
    replay that read the file whole would hold at least the file. Nothing is injected. About
    2 s on the project's VM, writing the file included; skipped (saying why) without 3 times
    the file free on tmp_path's disk, and the file is removed at the end (pytest keeps the
    last runs' tmp_path)."""
    path = tmp_path / "big.aof"
    size = len(MAGIC) + CHURN_ROUNDS * (HEADER.size * 2 + len(b"PUT:k:0000:DELETE:k") + len(CHURN_VALUE))
    free = shutil.disk_usage(tmp_path).free
    if free < 3 * size:
        pytest.skip(f"{free / 1e6:.0f} MB free on {tmp_path}: this test writes a {size / 1e6:.0f} MB log")
    try:
        delete = encode_record(b"DELETE:k")
        with open(path, "wb") as file:
            file.write(MAGIC)
            for i in range(CHURN_ROUNDS):
                file.write(encode_record(b"PUT:k:%04d:" % i + CHURN_VALUE) + delete)
            file.write(encode_record(b"PUT:kept:1"))
        written = path.stat().st_size
        assert written > size
        proc = server_process("--aof", str(path))
        peak = memory_of(proc.proc.pid, "VmHWM")  # (server_started: the replay is over)
        (replayed,) = [event for event in proc.events() if event["event"] == "aof_replayed"]
        assert (replayed["records"], replayed["keys"]) == (2 * CHURN_ROUNDS + 1, 1)
        peer = Peer(proc.port)
        assert peer.request(b"GET:kept\nGET:k\n") == [b"kept:1"]
        peer.close()
        assert peak < written / 3, f"peak RSS {peak / 1e6:.0f} MB replaying a {written / 1e6:.0f} MB log"
        assert proc.stop() == 0
    finally:
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_sigkill_loses_no_acknowledged_write(server_process, tmp_path, fsync):
    """Clients write under each --fsync policy and count a write as acknowledged when the
    PONG after it arrives; the server is SIGKILLed at a random moment and restarted on the
    same file: every acknowledged write is there, in order, and nothing that was not written
    (README: a process crash loses nothing the kernel accepted, under any policy; only a
    machine's crash can lose what was not synced)."""
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", fsync)
    acked = [0] * 4
    sent = [0] * 4
    stop = threading.Event()

    def writer(n):
        sock = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
        buffer = b""
        try:
            i = 0
            while not stop.is_set():
                batch = range(i, i + 5)
                sock.sendall(b"".join(b"PUT:crash%d:%d\n" % (n, j) for j in batch) + b"PING\n")
                sent[n] = i + 5
                while b"PONG\n" not in buffer:
                    chunk = sock.recv(100)
                    if not chunk:
                        return
                    buffer += chunk
                buffer = buffer.split(b"PONG\n", 1)[1]
                i += 5
                acked[n] = i
        except OSError:
            return
        finally:
            sock.close()

    jobs = [gevent.spawn(writer, n) for n in range(4)]
    gevent.sleep(random.uniform(0.5, 1.5))
    os.kill(proc.proc.pid, signal.SIGKILL)
    proc.proc.wait()
    stop.set()
    gevent.joinall(jobs, timeout=10)
    assert min(acked) > 0, "no write was acknowledged before the kill"
    restarted = server_process("--aof", str(path))
    peer = Peer(restarted.port)
    for n in range(4):
        values = [int(line.split(b":")[1]) for line in peer.request(b"GET:crash%d\n" % n)]
        assert values == list(range(len(values))), "out of order or invented"
        assert acked[n] <= len(values) <= sent[n]
    peer.close()


def test_a_damaged_length_in_the_middle_is_corruption_not_a_torn_tail(tmp_path):
    """A length field that points past the end, with good records after it, stops start-up
    instead of silently dropping the rest of the file."""
    path = tmp_path / "kv.aof"
    first = MAGIC + encode_record(b"PUT:k:1")
    bad = bytearray(encode_record(b"PUT:k:2"))
    bad[3] = 0x7F  # the length's high byte: now far beyond the end of the file
    path.write_bytes(first + bytes(bad) + b"".join(encode_record(b"PUT:k:%d" % i) for i in range(3, 100)))
    with pytest.raises(AofCorrupt) as info:
        new_store(path).open()
    assert info.value.offset == len(first)


def test_pong_waits_for_the_fsync(tmp_path, connect, monkeypatch):
    """Under --fsync always the PONG after a write leaves only once an fsync has returned."""
    _store, server = serving(tmp_path / "kv.aof", fsync="always")
    gate_out, gate_in = os.pipe()  # an OS-level gate: the fsync runs in another thread
    real_fsync = os.fsync

    def held(fd):
        os.read(gate_out, 1)  # a disk that has not answered yet
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", held)
    try:
        peer = connect(server.port)
        peer.send(b"PUT:k:1\nPING\n")
        peer.sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            peer.read_lines(1)
        os.write(gate_in, b"x")
        peer.sock.settimeout(10)
        assert peer.read_lines(1) == [b"PONG"]
    finally:
        os.write(gate_in, b"xxxx")  # whatever else is waiting
        server.close()
        os.close(gate_out)
        os.close(gate_in)


def test_compaction_under_fsync_always_keeps_acknowledgements_honest(tmp_path, connect, monkeypatch):
    """After a rewrite, barriers still wait for real fsyncs of the new file (and do not spin)."""
    store, server = serving(tmp_path / "kv.aof", fsync="always")
    calls = []
    real_fsync = os.fsync

    def counting(fd):
        calls.append(fd)
        real_fsync(fd)

    try:
        peer = connect(server.port)
        for i in range(50):
            assert peer.request(b"PUT:k:%d\nPUT:k:%d\n" % (i, i)) == []
        store.rewrite()
        monkeypatch.setattr(os, "fsync", counting)
        assert peer.request(b"PUT:k:after\n") == []
        gevent.sleep(0.2)
        assert 1 <= len(calls) <= 2, f"{len(calls)} fsyncs for one acknowledged write"
    finally:
        server.close()
    assert opened(tmp_path / "kv.aof").get(b"k")[-1] == b"after"


def test_a_failed_directory_fsync_fails_the_log_until_a_rebuild(tmp_path, log_stream, monkeypatch):
    """If the directory fsync after a compaction's rename fails, the rename may not survive a
    crash: nothing written since the switch counts as durable, writes are refused, and the
    recovery rebuilds the file (injected at the directory fsync: EIO cannot be made real)."""
    failures = []
    store = opened(tmp_path / "kv.aof", fsync="always")
    real = store.aof.sync_directory

    def once():
        if not failures:
            failures.append(1)
            raise OSError(errno.EIO, "Input/output error")
        real()

    store.put(b"k", b"1")
    monkeypatch.setattr(store.aof, "sync_directory", once)
    store.rewrite()
    assert not store.aof.ok and store.aof.durable < store.aof.written
    with pytest.raises(StoreError):
        store.put(b"k", b"refused")
    wait_until(lambda: store.aof.ok, 10, "the log did not recover")
    events = log_events(log_stream)
    assert [e["reason"] for e in events if e["event"] == "aof_rewritten"] == ["recovery"]
    assert [e["event"] for e in events].count("aof_fsync_failed") == 1
    store.put(b"k", b"2")
    store.barrier()
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2"]


def test_no_compaction_runs_while_the_log_is_failing(tmp_path, monkeypatch):
    """A compaction started while writes fail stops before it replaces anything (it is not a
    failure of its own), and runs once the log has recovered."""
    store = opened(tmp_path / "kv.aof")
    store.put(b"k", b"1")
    disk = FullDisk(monkeypatch)
    with pytest.raises(StoreError):
        store.put(b"k", b"2")
    store.rewrite()
    assert store.aof.rewrites == 0 and store.rewrite_failures == 0
    disk.free()
    wait_until(lambda: store.aof.ok, 10)
    store.put(b"k", b"3")
    store.rewrite()
    assert store.aof.rewrites == 1
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"3"]


def test_everysec_syncs_in_the_background(tmp_path, monkeypatch):
    """Under everysec, written records reach the disk within about a second, with no PING."""
    calls = []
    real_fsync = os.fsync

    def counting(fd):
        calls.append(fd)
        real_fsync(fd)

    store = opened(tmp_path / "kv.aof", fsync="everysec")
    monkeypatch.setattr(os, "fsync", counting)
    store.put(b"k", b"v")
    wait_until(lambda: store.aof.durable == store.aof.written > 0, timeout=5, message="never synced")
    assert calls


def test_fsync_no_never_syncs_on_its_own(tmp_path, monkeypatch):
    calls = []
    store = opened(tmp_path / "kv.aof", fsync="no")
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append(fd))
    store.put(b"k", b"v")
    store.barrier()
    gevent.sleep(1.5)
    assert calls == []


def test_a_rewrite_left_by_a_crash_is_removed_at_start(tmp_path):
    path = tmp_path / "kv.aof"
    store = opened(path)
    store.put(b"k", b"v")
    store.close()
    (tmp_path / "kv.aof.rewrite").write_bytes(MAGIC + encode_record(b"PUT:k:half-done"))
    again = opened(path)
    assert again.get(b"k") == [b"v"]
    assert not (tmp_path / "kv.aof.rewrite").exists()


# --- crash tails and damage --------------------------------------------------------------------


@pytest.mark.parametrize("zeros", [3, 8, 4096, 100_000])
def test_a_tail_of_zero_bytes_is_a_torn_tail(tmp_path, zeros):
    """After a power loss a file can end in NUL bytes (its new size reached the disk before its
    data). Eight of them look like an empty record with a matching checksum; an empty record
    is never valid, and NULs to the end of the file are a torn tail: truncated, not refused."""
    path = tmp_path / "kv.aof"
    good = MAGIC + encode_record(b"PUT:k:1") + encode_record(b"PUT:k:2")
    path.write_bytes(good + bytes(zeros))
    store = new_store(path)
    report = store.open()
    assert report["truncated_at"] == len(good) and report["dropped_bytes"] == zeros
    assert store.get(b"k") == [b"1", b"2"]
    assert path.stat().st_size == len(good)


def test_a_file_of_zero_bytes_is_a_torn_header(tmp_path):
    (tmp_path / "kv.aof").write_bytes(bytes(4096))
    store = new_store(tmp_path / "kv.aof")
    assert store.open()["truncated_at"] == 0
    store.put(b"k", b"v")
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"v"]


def test_an_empty_record_in_the_middle_is_corruption(tmp_path):
    path = tmp_path / "kv.aof"
    first = MAGIC + encode_record(b"PUT:k:1")
    path.write_bytes(first + encode_record(b"") + encode_record(b"PUT:k:2"))
    with pytest.raises(AofCorrupt) as info:
        new_store(path).open()
    assert info.value.offset == len(first) and info.value.records_after == 1


def test_replay_memory_is_bounded_by_a_record_not_by_the_file(tmp_path):
    """A 48 MB log whose records cancel out (PUT then DELETE of 12 KB values) replays within
    a few MB of allocations: the file is streamed, not read whole."""
    path = tmp_path / "kv.aof"
    with open(path, "wb") as file:
        file.write(MAGIC)
        for i in range(4000):
            file.write(encode_record(b"PUT:k:%d:" % i + b"v" * 12_000) + encode_record(b"DELETE:k"))
    tracemalloc.start()
    try:
        store = new_store(path)
        assert store.open()["records"] == 8000
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert store.count_keys() == 0
    assert peak < 16 << 20, f"replay allocated {peak / 2**20:.1f} MiB for a 48 MB file"


def _scanned(data: bytes) -> Scanner:
    scanner = Scanner(lambda offset, count: data[offset : offset + count], len(data))
    for _ in scanner.batches():
        pass
    return scanner


def test_finding_the_good_records_after_damage_is_linear(tmp_path):
    """The search for a good record after a damaged one reads each byte a bounded number of
    times: after ordinary records, and among decoys (bytes that look like the start of a
    record whose length points to the end of the file), where a check per offset costs the
    whole rest of the file."""
    records = b"".join(encode_record(b"PUT:k%d:%s" % (i % 100, b"v" * 100)) for i in range(70_000))
    damaged = MAGIC + b"\xff" * 20 + records
    scanner = _scanned(damaged)
    assert scanner.result.corrupt_at == len(MAGIC) and scanner.result.records_after == 70_000
    assert scanner.bytes_read <= 3 * len(damaged)

    size = 4 << 20
    decoys = bytearray(b"x" * size)
    body = len(MAGIC) + HEADER.size  # a damaged first record, then decoys
    for at in range(body, size - 64, 12):
        header = HEADER.pack(size - at - HEADER.size, 0)
        if b"\n" not in header:
            decoys[at : at + 12] = header + b"PUT:"
    data = MAGIC + HEADER.pack(1 << 31, 0) + bytes(decoys[body:])
    scanner = _scanned(data)
    assert scanner.result.corrupt_at == len(MAGIC)  # unknown what follows: refused, not dropped
    assert scanner.bytes_read <= (SEARCH_BUDGET + 3) * len(data) + 4 * READ_CHUNK


# --- failures of fsync, dup, open ------------------------------------------------------------------


def _fails_once(monkeypatch, module, name, error, times=1):
    """Make ``module.name`` raise OSError(``error``) on its first call only (or first
    ``times`` calls)."""
    real = getattr(module, name)
    calls = []

    def once(*args, **kwargs):
        calls.append(args)
        if len(calls) <= times:
            raise OSError(error, os.strerror(error))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, once)
    return calls


def _logged(stream, event):
    return [e for e in log_events(stream) if e["event"] == event]


@pytest.fixture(autouse=True)
def no_bug_reported(request):
    """A fault of the disk is expected: it may never be reported as a bug (unhandled_error)."""
    stream = request.getfixturevalue("log_stream") if "log_stream" in request.fixturenames else None
    yield
    if stream is not None:
        assert not _logged(stream, "unhandled_error")


def test_a_failed_fsync_is_not_forgotten(tmp_path, log_stream, connect, monkeypatch):
    """After an fsync fails the kernel may have dropped the pages it could not write, and the
    next fsync succeeding proves nothing about them. So the PING waiting for them gets ERR,
    and no PONG comes for that write until the file was rebuilt from memory and synced.
    (EIO injected at os.fsync, failing once: it cannot be made real here.)"""
    path = tmp_path / "kv.aof"
    _store, server = serving(path, fsync="always")
    try:
        peer = connect(server.port)
        assert peer.request(b"PUT:k:1\n") == []
        _fails_once(monkeypatch, os, "fsync", errno.EIO)
        peer.send(b"PUT:k:2\nPING\n")
        assert peer.read_lines(1) == [b"ERR persistence failed"]

        def pong() -> bool:
            peer.send(b"PING\n")
            return peer.read_lines(1) == [b"PONG"]

        wait_until(pong, 10, "no PONG after the log recovered")
        # By the first PONG, the file had been rewritten from memory.
        assert [e["reason"] for e in _logged(log_stream, "aof_rewritten")] == ["recovery"]
        assert len(_logged(log_stream, "aof_fsync_failed")) == 1
        wait_until(lambda: _logged(log_stream, "aof_recovered"), 10, "the episode did not end")
    finally:
        server.close()
    assert opened(path).get(b"k") == [b"1", b"2"]


def test_a_failed_dup_in_the_syncer_fails_the_ping_instead_of_hanging(
    tmp_path, log_stream, connect, monkeypatch
):
    """EMFILE from the syncer's os.dup, its spare descriptor given up and EMFILE again
    (injected: test_aof_faults runs out of descriptors for real): the waiting PING gets ERR at
    once, not a hang, the failure is logged once, and the log recovers by itself."""
    _store, server = serving(tmp_path / "kv.aof", fsync="always")
    try:
        peer = connect(server.port)
        _fails_once(monkeypatch, os, "dup", errno.EMFILE, times=2)
        peer.send(b"PUT:k:1\nPING\n")
        assert peer.read_lines(1) == [b"ERR persistence failed"]
        wait_until(lambda: _logged(log_stream, "aof_recovered"), 10, "the log did not recover")
        assert peer.request(b"PUT:k:2\n") == []
        assert [e["errno"] for e in _logged(log_stream, "aof_fsync_failed")] == [errno.EMFILE]
        assert not _logged(log_stream, "aof_rewritten"), "no fsync failed: no rebuild needed"
    finally:
        server.close()


def test_the_syncer_gives_up_its_spare_descriptor_at_the_open_files_limit(
    tmp_path, log_stream, connect, monkeypatch
):
    """EMFILE from the syncer's os.dup (injected, as above): the log's spare descriptor is
    given up for it, the PING gets its PONG and nothing fails; the spare is taken back, so
    the next EMFILE is met the same way."""
    store, server = serving(tmp_path / "kv.aof", fsync="always")
    try:
        peer = connect(server.port)
        for value in (b"1", b"2"):
            calls = _fails_once(monkeypatch, os, "dup", errno.EMFILE)
            assert peer.request(b"PUT:k:" + value + b"\n") == []
            assert len(calls) == 2 and store.aof._spare is not None
            monkeypatch.undo()
        assert not _logged(log_stream, "aof_fsync_failed") and store.aof.ok
    finally:
        server.close()


def test_a_compaction_that_cannot_open_its_file_is_retried(tmp_path, log_stream, monkeypatch):
    """EMFILE when opening the rewrite file (injected at os.open): counted, logged once, the
    rewriter is reset (aof_rewriting=0), and a later automatic attempt compacts. Attempts are
    spaced by a backoff, not made on every write."""
    store = opened(tmp_path / "kv.aof", rewrite_min_size=1, rewrite_growth=1.01)
    real_open = os.open

    def no_descriptors(path, *args, **kwargs):
        if str(path).endswith(".rewrite"):
            raise OSError(errno.EMFILE, "Too many open files")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_descriptors)
    for i in range(50):
        store.put(b"k", b"%d" % i)
        gevent.sleep(0)  # let an automatic compaction start and fail
    assert store.rewrite_failures == 1 and store.stats()["aof_rewriting"] == 0
    assert len(_logged(log_stream, "aof_rewrite_failed")) == 1
    monkeypatch.undo()

    def compacted() -> bool:
        store.put(b"k", b"more")
        return store.aof.rewrites >= 1

    wait_until(compacted, 10, "the compaction was not retried")


def test_close_says_what_it_could_not_make_durable(tmp_path, log_stream, monkeypatch):
    store = opened(tmp_path / "kv.aof", fsync="no")
    for i in range(3):
        store.put(b"k", b"%d" % i)

    def broken(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", broken)
    store.close()
    assert store.unsaved_records == 3
    assert [e["records"] for e in _logged(log_stream, "aof_unwritten")] == [3]


def test_an_fsync_under_way_when_the_file_is_found_taken_marks_nothing_durable(tmp_path, monkeypatch):
    """Under --fsync always the once-a-second look can find the file removed while a sync
    round's fsync (which looked before the rm) is still on its way back: the round then
    marked its writes durable again over the verdict, and the PING waiting for them got a
    PONG with the file gone (a reviewer's run, with the round held as here). The verdict
    starts a new generation: the round marks nothing. The round is held in its thread by
    the test after its look (threading.Event); the rm is real."""
    import threading

    from kvgevent.stores import aof_log

    path = tmp_path / "kv.aof"
    store = opened(path, fsync="always")
    real = aof_log._fsync_and_look
    looked, release = threading.Event(), threading.Event()

    def held(fd, where, size):
        verdict = real(fd, where, size)  # (the file is still there: None)
        looked.set()
        release.wait(10)
        return verdict

    monkeypatch.setattr(aof_log, "_fsync_and_look", held)
    store.put(b"k", b"1")
    waiter = gevent.spawn(store.barrier)
    wait_until(looked.is_set, 10, "the sync round did not look")
    path.unlink()
    with pytest.raises(aof_log.FileTaken):
        store.aof._look()
    release.set()
    waiter.join(timeout=10)
    assert isinstance(waiter.exception, StoreError), waiter.exception  # ERR, not a PONG
    assert store.aof.durable == 0
    store.close()
    assert store.unsaved_records == 0 and path.exists()  # (rewritten at the path by then)


def test_a_log_cut_during_a_compaction_is_not_copied_into_the_new_file(tmp_path, log_stream, monkeypatch):
    """logrotate's copytruncate while a compaction ran: the records it copied from the old
    file's tail were the hole's NUL bytes, and its new file, renamed over the path, was
    corrupt at the next start (an attacker's run). The switch looks at the old file first:
    the compaction fails, the old file stays the log, the look finds it cut and the file is
    rewritten from memory. The cut is real (os.truncate), made as the switch copies the tail."""
    from kvgevent.stores import rewrite
    from kvgevent.stores.aof_log import FileTaken

    path = tmp_path / "kv.aof"
    store = opened(path, fsync="no")
    for i in range(100):
        store.put(b"k", b"%d" % i)
    real, cut = rewrite.copy_range, []

    def cutting(*args):
        if not cut:
            cut.append(True)
            os.truncate(path, 0)
        return real(*args)

    monkeypatch.setattr(rewrite, "copy_range", cutting)
    old = path.stat().st_ino
    store.rewrite()
    assert cut and path.stat().st_ino == old  # (not replaced by a copy of the hole)
    assert "truncated during the compaction" in _logged(log_stream, "aof_rewrite_failed")[0]["error"]
    with pytest.raises(FileTaken):
        store.aof._look()
    wait_until(lambda: _logged(log_stream, "aof_recovered"), 10, "the file was not rewritten")
    store.close()
    assert opened(path).get(b"k") == [b"%d" % i for i in range(100)]


def test_a_stop_during_a_rebuild_ends_the_episode_without_aof_recovered(tmp_path, log_stream, monkeypatch):
    """close() lets a recovery attempt under way (a rebuild after a failed fsync) finish
    rather than cut it short; that attempt then ended the episode with ``aof_recovered``,
    though writes are never accepted again (the README's shutdown row: no aof_recovered;
    9 of 36 in an attacker's runs with a real failing disk). The rebuild is held by the test
    until the stop has begun; EIO injected at os.fsync, once."""
    store = opened(tmp_path / "kv.aof", fsync="always")
    store.put(b"k", b"1")
    real = store.aof.rebuild
    assert real is not None
    began, release = gevent.event.Event(), gevent.event.Event()

    def held() -> None:
        began.set()
        release.wait()
        real()

    store.aof.rebuild = held
    _fails_once(monkeypatch, os, "fsync", errno.EIO)
    with pytest.raises(StoreError):
        store.barrier()
    assert began.wait(timeout=10)
    closing = gevent.spawn(store.close)
    wait_until(lambda: store.aof._closed, 10, "the stop did not begin")
    release.set()
    closing.join(timeout=20)
    assert closing.successful()
    assert store.unsaved_records == 0  # the attempt made everything durable
    assert [e["reason"] for e in _logged(log_stream, "aof_rewritten")] == ["recovery"]
    assert not _logged(log_stream, "aof_recovered")


# --- compaction under load -----------------------------------------------------------------------


def test_pings_under_fsync_always_are_answered_across_compactions(tmp_path, connect):
    """8 clients doing PUT, DELETE, PING under --fsync always while compactions keep replacing
    the file: every PONG arrives (the socket timeout is the deadline; a barrier waiting for an
    offset of the old file never got one), and a restart finds every acknowledged write."""
    path = tmp_path / "kv.aof"
    store, server = serving(path, fsync="always", rewrite_min_size=64 << 10, rewrite_growth=1.5)
    rounds = 250

    def client(n: int) -> None:
        peer = connect(server.port, timeout=5)
        for i in range(rounds):
            batch = b"PUT:tmp%d:%s\nDELETE:tmp%d\nPUT:keep%d:%d\n" % (n, b"x" * 500, n, n, i)
            assert peer.request(batch) == []

    try:
        gevent.joinall([gevent.spawn(client, n) for n in range(8)], raise_error=True)
        assert store.aof.rewrites >= 3, f"only {store.aof.rewrites} compactions"
    finally:
        server.close()
    again = opened(path)
    for n in range(8):
        assert again.get(b"keep%d" % n) == [b"%d" % i for i in range(rounds)]
        assert again.get(b"tmp%d" % n) == []


def test_compaction_of_big_values_neither_stalls_clients_nor_copies_them(tmp_path, connect):
    """A key of 256 x 1 MiB values and 20,000 small keys is compacted while a polite client
    pings: no round trip takes a second (the old rewrite encoded 1,000 keys in one turn: 5 s
    for 600 MiB), and the rewrite allocates far less than the data (values are written from
    where they are, not copied)."""
    store, server = serving(tmp_path / "kv.aof", fsync="no", rewrite_min_size=1 << 40)
    try:
        store.apply([Put(b"big", b"%04d" % i + bytes(1 << 20)) for i in range(256)])
        store.apply([Put(b"s%d" % i, b"v%d" % i) for i in range(20_000)])
        peer = connect(server.port)
        tracemalloc.start()
        try:
            rewriting = gevent.spawn(store.rewrite)
            round_trips = []
            while not rewriting.dead:
                began = time.monotonic()
                assert peer.request(b"GET:s1\n") == [b"s1:v1"]
                round_trips.append(time.monotonic() - began)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert store.aof.rewrites == 1
        assert len(round_trips) >= 10, "the compaction ran in too few turns"
        assert max(round_trips) < 1.0, f"a round trip took {max(round_trips):.2f} s"
        assert peak < 64 << 20, f"the compaction allocated {peak / 2**20:.0f} MiB"
    finally:
        server.close()


@pytest.mark.parametrize("mutation", ["PUT", "UPDATE", "DELETE", "DELETE+PUT"])
def test_a_key_mutated_while_its_values_are_being_written(tmp_path, monkeypatch, mutation):
    """A key with 5,000 values is written over several turns; between two of them the key is
    mutated. The compacted file still holds the state as of the compaction's start plus the
    mutation's own record, so after a restart the data is exactly what memory holds."""
    from kvgevent.stores import rewrite

    path = tmp_path / "kv.aof"
    store = opened(path)
    store.apply([Put(b"big", b"%d" % i) for i in range(5000)] + [Put(b"other", b"x")])
    real_flush = rewrite.Rewrite._flush
    turns = []

    def flush_then_mutate(self):
        real_flush(self)
        turns.append(self.records)
        if len(turns) == 1:
            assert 0 < self.records < 5000, "the test wants to be in the middle of the big key"
            for verb in mutation.split("+"):
                line = {"PUT": b"PUT:big:new", "UPDATE": b"UPDATE:big:10:u", "DELETE": b"DELETE:big"}[verb]
                store.apply([parse(line)])

    monkeypatch.setattr(rewrite.Rewrite, "_flush", flush_then_mutate)
    store.rewrite()
    assert store.aof.rewrites == 1 and len(turns) >= 3
    expected = {key: list(values) for key, values in store.memory.data.items()}
    store.close()
    assert opened(path).memory.data == expected


def _ends_in_zeros(fd: int) -> bool:
    """Whether the file ``fd`` ends in 8 NUL bytes (False for a directory)."""
    size = os.fstat(fd).st_size
    try:
        return size >= 8 and os.pread(fd, 8, size - 8) == bytes(8)
    except IsADirectoryError:
        return False


class SwitchFaults:
    """The faults of the next tests, at the OS calls: a slow fsync of the compaction's new file
    (the next one once armed) and of the recovery's probe, one ENOSPC at os.pwritev (once armed), one
    EACCES at the compaction's os.rename."""

    def __init__(self, monkeypatch) -> None:
        self.real_fsync, self.real_pwritev, self.real_rename = os.fsync, os.pwritev, os.rename
        self.real_sleep = get_original("time", "sleep")  # the fsyncs run in threads: a real wait
        self.slow, self.write, self.rename_fails = False, False, True
        monkeypatch.setattr(os, "fsync", self.fsync)
        monkeypatch.setattr(os, "pwritev", self.pwritev)
        monkeypatch.setattr(os, "rename", self.rename)

    def fsync(self, fd):
        probe = _ends_in_zeros(fd)  # (the recovery's probe: zeros past the log's end)
        if self.slow and not probe:  # (armed as the new file is put in place)
            self.slow = False
            self.real_sleep(0.3)
        elif probe:
            self.real_sleep(0.5)
        self.real_fsync(fd)

    def pwritev(self, fd, buffers, offset):
        if self.write:
            self.write = False
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real_pwritev(fd, buffers, offset)

    def rename(self, source, target):
        if source.endswith(".rewrite") and self.rename_fails:
            self.rename_fails = False
            raise OSError(errno.EACCES, "Permission denied")
        return self.real_rename(source, target)


def test_a_failure_during_a_compactions_switch_never_ends_the_episode_early(tmp_path, monkeypatch):
    """While a compaction's new file is being put in place (its fsync is slow), a write fails
    and the recovery starts. The recovery must neither count the new file as durable before
    it is fsynced, nor end the episode early: acknowledged writes survive a restart. (The
    rename used to come here too, after the switch, and could fail with the log appending to
    a file not at its path; it now comes before the switch: see the next test.) (Injected:
    see SwitchFaults; the reviewer's reproduction.)"""
    from kvgevent.stores import rewrite

    path = tmp_path / "kv.aof"
    store = opened(path, fsync="always", rewrite_min_size=1 << 40)
    for i in range(100):
        store.put(b"k", b"v%d" % i)
    store.barrier()
    faults = SwitchFaults(monkeypatch)
    faults.rename_fails = False
    real_put_in_place = rewrite.Rewrite._put_in_place

    def slowly(self, old):
        faults.slow = True
        real_put_in_place(self, old)

    monkeypatch.setattr(rewrite.Rewrite, "_put_in_place", slowly)
    compacting = gevent.spawn(store.rewrite)
    wait_until(lambda: store.aof._switching is not None, 10, "the compaction did not switch")
    faults.write = True
    with pytest.raises(StoreError):
        store.put(b"x", b"refused")
    compacting.join()
    wait_until(lambda: store.aof.ok, 20, "the log did not recover")
    assert not store.aof.lost and os.readlink(f"/proc/self/fd/{store.aof.fd}") == str(path)
    for i in range(5):
        store.put(b"acked", b"%d" % i)
        store.barrier(store.write_position())
    store.close()
    assert store.unsaved_records == 0
    again = opened(path)
    assert again.get(b"acked") == [b"%d" % i for i in range(5)] and again.get(b"x") == []


def test_a_compaction_whose_rename_fails_leaves_the_old_file_the_log(tmp_path, monkeypatch):
    """The new file is renamed over the log's path before the log appends to it: a rename
    that fails (EACCES, injected at os.rename: see SwitchFaults) stops the compaction with
    the old file still the log, at its path, and nothing acknowledged is lost."""
    path = tmp_path / "kv.aof"
    store = opened(path, fsync="always", rewrite_min_size=1 << 40)
    for i in range(100):
        store.put(b"k", b"v%d" % i)
    store.barrier()
    SwitchFaults(monkeypatch)  # (its rename fails once)
    store.rewrite()
    assert store.rewrite_failures == 1 and store.aof.rewrites == 0
    assert store.aof.ok and os.readlink(f"/proc/self/fd/{store.aof.fd}") == str(path)
    assert not os.path.exists(str(path) + ".rewrite")
    store.put(b"k", b"after")
    store.barrier(store.write_position())
    store.close()
    assert opened(path).get(b"k") == [b"v%d" % i for i in range(100)] + [b"after"]


@pytest.mark.parametrize("fsync", ["everysec", "no"])
def test_a_kill_right_after_a_compactions_switch_loses_nothing_written(tmp_path, fsync):
    """A process killed (SIGKILL) just after a compaction switched the log to its new file,
    before anything else of the compaction ran, with writes appended since: a restart
    replays every one of them (the kernel had them all). The new file used to be renamed
    over the log's path only after the switch, and a restart replayed the old file and
    deleted the new one: writes already acknowledged under everysec were lost (found with a
    kill -9 timed by polling /proc). The kill is real, sent by the process to itself from
    the compaction's next step, the only way to hit that moment every time."""
    import subprocess
    import sys
    import textwrap

    path = tmp_path / "kv.aof"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})
        from kvgevent.stores import rewrite
        from kvgevent.stores.durable import DurableStore

        store = DurableStore({str(path)!r}, fsync={fsync!r}, rewrite_min_size=1 << 40)
        store.open()
        for i in range(200):
            store.put(b"k", b"before-%d" % i)

        def put_in_place(self, old):  # the compaction's next step after its switch
            for i in range(50):
                store.put(b"k", b"after-%d" % i)
            os.kill(os.getpid(), signal.SIGKILL)

        rewrite.Rewrite._put_in_place = put_in_place
        store.rewrite()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()
    again = opened(path)
    expected = [b"before-%d" % i for i in range(200)] + [b"after-%d" % i for i in range(50)]
    assert again.get(b"k") == expected


def test_the_search_after_damage_never_takes_an_empty_record():
    """NUL bytes before a 'PUT:' look like an empty record with a matching checksum: a
    payload holds at least its verb, so this is still a torn tail."""
    good = MAGIC + encode_record(b"PUT:k:1")
    _, found = scan(good + bytes(16) + b"PUT:")
    assert found.torn and found.corrupt_at is None and found.good_end == len(good)


def test_a_damaged_length_does_not_make_the_scan_allocate_it():
    """A header claiming a 400 MB record in a (virtual) 401 MB file: the checksum is checked
    in chunks before the record is read whole, so no read asks for more than a chunk."""
    size = 401 << 20
    head = MAGIC + HEADER.pack(400 << 20, 1)
    asked = []

    def read_at(offset, count):
        asked.append(count)
        data = head[offset : offset + count]
        return data + bytes(min(count, size - offset) - len(data))

    scanner = Scanner(read_at, size)
    for _ in scanner.batches():
        pass
    assert scanner.result.torn and scanner.result.good_end == len(MAGIC)
    assert max(asked) <= 2 * READ_CHUNK
