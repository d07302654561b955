"""Durability: the append-only file, replay, torn tails, corruption and repair, compaction
under load, fsync failures, group commit, and a SIGKILL crash test."""

import os
import random
import signal
import socket
import threading

import gevent
import pytest
from conftest import Peer, log_events, wait_until
from gevent.monkey import get_original

from kvgevent import KeyValueServer
from kvgevent import aof as aof_module
from kvgevent.aof import MAGIC, AofCorrupt, encode_record, scan
from kvgevent.durable import DurableStore

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
    found = scan(data)
    assert found.payloads == [b"PUT:k:v", b"DELETE:k"]
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
        monkeypatch.undo()
        assert peer.request(b"PUT:k:3\n") == []
    finally:
        server.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2", b"3"]


def test_write_failure_is_retried_and_surfaced(tmp_path, log_stream, connect, monkeypatch):
    """A failed write (disk full) is kept and retried; PONG says ERR until it succeeds."""
    _store, server = serving(tmp_path / "kv.aof", fsync="always")
    real_write = os.write
    try:
        peer = connect(server.port)

        def full(fd, data):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(aof_module.os, "write", full)
        peer.send(b"PUT:k:1\nPING\n")
        assert peer.read_lines(1) == [b"ERR persistence failed"]
        assert any(e["event"] == "aof_write_failed" for e in log_events(log_stream))
        monkeypatch.setattr(aof_module.os, "write", real_write)
        assert peer.request(b"PUT:k:2\n") == []
    finally:
        server.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2"]


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


def test_sigkill_loses_no_acknowledged_write(server_process, tmp_path):
    """Clients write under --fsync always and count a write as acknowledged when the PONG
    after it arrives; the server is SIGKILLed at a random moment and restarted on the same
    file: every acknowledged write is there, in order, and nothing that was not written."""
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", "always")
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


def test_a_failed_directory_fsync_keeps_writing_to_the_new_file(tmp_path, monkeypatch):
    from kvgevent import durable

    def broken(path):
        raise OSError(5, "Input/output error")

    store = opened(tmp_path / "kv.aof")
    store.put(b"k", b"1")
    monkeypatch.setattr(durable, "fsync_directory", broken)
    store.rewrite()
    assert store.aof.rewrites == 1
    store.put(b"k", b"2")
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2"]


def test_a_rewrite_waits_while_writes_to_the_log_fail(tmp_path, monkeypatch):
    """Records a failed write still holds are not duplicated by a rewrite."""
    store = opened(tmp_path / "kv.aof")
    store.put(b"k", b"1")
    real_write = os.write

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(aof_module.os, "write", full)
    store.put(b"k", b"2")
    store.rewrite()
    assert store.aof.rewrites == 0
    monkeypatch.setattr(aof_module.os, "write", real_write)
    store.put(b"k", b"3")
    store.rewrite()
    assert store.aof.rewrites == 1
    store.close()
    assert opened(tmp_path / "kv.aof").get(b"k") == [b"1", b"2", b"3"]


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
    wait_until(lambda: store.aof.synced == store.aof.size, timeout=5, message="never synced")
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
