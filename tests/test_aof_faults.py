"""Persistence under real faults, through run_server.py.

- A disk that fills up: a tmpfs of a few hundred KiB mounted for the test (root only, as CI
  runs; skipped with the reason otherwise), filled by the server's own writes or by a filler
  file, then grown (remount) or emptied.
- A log that ends in NUL bytes, as a power loss can leave it.
- Compactions forced by small thresholds under ``--fsync always`` with concurrent clients, and
  on a disk where one would fit but leave less than its reserve free (a ballast file).
- A disk that stops syncing: EIO from fsync, injected in the server process at ``os.fsync``
  (tests/failing_fsync_server.py); tests/test_fsync_faults.py makes it real where loop
  devices can be set up.

For each fault: what the clients saw, what the log said (one event per episode), what STATS
counted, and after a restart every acknowledged write is there, in order, and nothing else.
"""

import os
import resource
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import gevent
import pytest
from conftest import ROOT, Peer, fill_descriptors, http_get, read_stats, scrape, wait_until

from kvgevent.stores.aof import MAGIC, encode_record


class Disk:
    """A mounted tmpfs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def resize(self, size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(self.path)], check=True)

    def fill(self) -> Path:
        """Take every free byte with a filler file; returns it (unlink it to free the disk)."""
        filler = self.path / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(fd, bytes(4096))
        except OSError:
            pass
        finally:
            os.close(fd)
        return filler


@pytest.fixture
def tiny_disk(tmp_path):
    """Factory of small tmpfs mounts (``size`` as mount takes it: ``512k``, ``1m``), unmounted
    after the test."""
    if os.geteuid() != 0:
        pytest.skip("a full disk needs a tmpfs, and mounting one needs root (CI runs as root)")
    mounted: list[Path] = []

    def make(size: str) -> Disk:
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        )
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
        mounted.append(path)
        return Disk(path)

    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


def events_named(proc, name: str) -> list[dict]:
    return [e for e in proc.events() if e["event"] == name]


def assert_no_bug_reported(proc) -> None:
    """Faults of the disk are expected: none may be reported as a bug (unhandled_error)."""
    assert not events_named(proc, "unhandled_error"), events_named(proc, "unhandled_error")[0]


def after_restart(server_process, path: Path, request: bytes):
    """Start a new server on the log at ``path``, send ``request`` (then a PING), stop it;
    returns (its reply lines, the process)."""
    restarted = server_process("--aof", str(path))
    check = Peer(restarted.port)
    try:
        replies = check.request(request)
    finally:
        check.close()
    assert restarted.stop() == 0
    return replies, restarted


def test_a_disk_full_mid_record_leaves_a_log_that_starts(server_process, tiny_disk):
    """The reproduction of the torn-record bug: on a 1 MiB disk, PUT 400 KB (PONG), PUT 800 KB
    (the disk takes part of it, then ENOSPC), grow the disk, PUT c (PONG), restart. The part
    of the 800 KB record that reached the file is cut, the PUT is refused and never applied,
    and the restarted server finds exactly the acknowledged writes."""
    disk = tiny_disk("1m")
    path = disk.path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", "always")
    peer = Peer(proc.port)
    watcher = Peer(proc.port)  # writes nothing: its PINGs never wait for the log
    try:
        a, b = b"a" * 400_000, b"b" * 800_000
        assert peer.request(b"PUT:a:" + a + b"\n") == []
        peer.send(b"PUT:b:" + b + b"\nPING\n")
        assert peer.read_lines(2) == [b"ERR persistence failed", b"PONG"]  # (PONG: a is on disk)
        assert peer.request(b"GET:b\n") == [], "a write the log refused was applied"
        assert path.stat().st_size < len(a) + 1000, "the torn part of the record is still in the file"
        stats = read_stats(watcher)
        assert stats["aof_write_errors"] >= 1 and stats["aof_writes_refused"] >= 1
        disk.resize("4m")
        wait_until(lambda: read_stats(watcher)["aof_ok"] == 1, 10, "the log did not recover")
        assert peer.request(b"PUT:c:after\n") == []
        assert len(events_named(proc, "aof_write_failed")) == 1
        assert len(events_named(proc, "aof_recovered")) == 1
    finally:
        peer.close()
        watcher.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    replies, restarted = after_restart(server_process, path, b"GET:a\nGET:b\nGET:c\n")
    assert replies == [b"a:" + a, b"c:after"]
    assert not events_named(restarted, "aof_torn_tail_truncated")


def test_a_full_disk_refuses_writes_without_a_crawl_or_a_flood(server_process, tiny_disk):
    """With the disk full (a filler file takes every byte) under everysec, a client flooding
    PUTs for 3 s gets 'ERR persistence failed' for each, fast; reads go on; the log says
    aof_write_failed once, not once per batch. Once the filler is removed the log recovers
    by itself (aof_recovered) and writes are accepted again."""
    disk = tiny_disk("2m")
    path = disk.path / "kv.aof"
    proc = server_process("--aof", str(path))
    peer = Peer(proc.port)
    watcher = Peer(proc.port)
    try:
        assert peer.request(b"PUT:k:before\n") == []
        filler = disk.fill()
        accepted = 0  # the log file's last page may still have room for a few records
        while b"ERR persistence failed" not in (replies := peer.request(b"PUT:f:x\n" * 200)):
            accepted += 200
        accepted += 200 - replies.count(b"ERR persistence failed")
        per_second = []
        for _ in range(3):
            sent = refused = 0
            end = time.monotonic() + 1
            while time.monotonic() < end:
                replies = peer.request(b"PUT:f:x\n" * 200)
                sent += 200
                refused += replies.count(b"ERR persistence failed")
            assert refused == sent, "a PUT was accepted by a full disk"
            per_second.append(sent)
        print(f"\nPUTs refused per second while the disk was full: {per_second}")
        assert min(per_second) >= 1000, "refusing writes slowed to a crawl"
        assert peer.request(b"GET:k\nGET:f\n") == [b"k:before"] + [b"f:x"] * accepted
        stats = read_stats(watcher)
        assert stats["aof_ok"] == 0 and stats["aof_writes_refused"] >= sum(per_second)
        assert len(events_named(proc, "aof_write_failed")) == 1
        assert len(proc.events()) < 20, "the log is flooded"
        filler.unlink()
        wait_until(lambda: read_stats(watcher)["aof_ok"] == 1, 10, "the log did not recover")
        assert peer.request(b"PUT:k:after\n") == []
        (recovered,) = events_named(proc, "aof_recovered")
        assert recovered["writes_refused"] == read_stats(watcher)["aof_writes_refused"]
    finally:
        peer.close()
        watcher.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    replies, _ = after_restart(server_process, path, b"GET:k\nGET:f\n")
    assert replies == [b"k:before", b"k:after"] + [b"f:x"] * accepted


def test_sigterm_while_the_disk_is_full_keeps_every_acknowledged_write(server_process, tiny_disk):
    """Clients write under everysec until the disk fills; SIGTERM while it is still full. What
    was acknowledged (PONG after the PUT, no ERR) is in the file and was synced, so the server
    exits 0 without aof_unwritten; after a restart every acknowledged write is there, in order,
    and no refused one."""
    disk = tiny_disk("512k")
    path = disk.path / "kv.aof"
    proc = server_process("--aof", str(path))
    acknowledged: list[list[int]] = [[] for _ in range(4)]

    def writer(n: int) -> None:
        peer = Peer(proc.port)
        try:
            for i in range(100_000):
                if peer.request(b"PUT:w%d:%d:%s\n" % (n, i, b"v" * 1000)) == []:
                    acknowledged[n].append(i)
                elif len(acknowledged[n]) and i > acknowledged[n][-1] + 200:
                    return  # refused for a while: the disk is full
        finally:
            peer.close()

    gevent.joinall([gevent.spawn(writer, n) for n in range(4)], raise_error=True)
    assert all(acknowledged), "no write was acknowledged before the disk filled"
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    assert not events_named(proc, "aof_unwritten")
    disk.resize("4m")
    replies, _ = after_restart(server_process, path, b"".join(b"GET:w%d\n" % n for n in range(4)))
    assert replies == [b"w%d:%d:%s" % (n, i, b"v" * 1000) for n in range(4) for i in acknowledged[n]]


def test_sigterm_with_writes_it_could_not_sync_exits_non_zero(server_process, tmp_path):
    """When fsync starts failing under everysec, the writes already applied cannot be made
    durable: writes are refused from then on, and SIGTERM, after a last attempt, logs
    aof_unwritten with the number of records and exits 1 instead of 0. (EIO injected at
    os.fsync in the server process.)"""
    path = tmp_path / "kv.aof"
    trigger = tmp_path / "fail-fsync"
    proc = server_process(
        "--aof",
        str(path),
        script=ROOT / "tests" / "failing_fsync_server.py",
        env={"KVGEVENT_TEST_FAIL_FSYNC": str(trigger)},
    )
    peer = Peer(proc.port)
    try:
        assert peer.request(b"PUT:k:1\nPUT:k:2\nPUT:k:3\n") == []
        trigger.touch()
        wait_until(lambda: events_named(proc, "aof_fsync_failed"), 10, "fsync did not fail")
        assert peer.request(b"PUT:k:4\n") == [b"ERR persistence failed"]
    finally:
        peer.close()
    assert proc.stop() == 1
    assert_no_bug_reported(proc)
    (unwritten,) = events_named(proc, "aof_unwritten")
    assert unwritten["records"] == 3 and unwritten["path"] == str(path)
    trigger.unlink()
    replies, _ = after_restart(server_process, path, b"GET:k\n")  # the page cache still had them
    assert replies == [b"k:1", b"k:2", b"k:3"]


def test_compactions_under_fsync_always_never_strand_a_ping(server_process, tmp_path):
    """The reproduction of the stranded barrier: 8 clients doing PUT, DELETE, PING under
    --fsync always with --aof-rewrite-min-size 2000000 --aof-rewrite-growth 1.5. Every PONG
    arrives within the socket timeout (5 s) while the file is compacted again and again;
    a restart finds exactly the acknowledged writes."""
    path = tmp_path / "kv.aof"
    proc = server_process(
        "--aof",
        str(path),
        "--fsync",
        "always",
        "--aof-rewrite-min-size",
        "2000000",
        "--aof-rewrite-growth",
        "1.5",
    )
    stop = threading.Event()
    acknowledged = [0] * 8
    value = b"x" * 4000

    def client(n: int) -> None:
        peer = Peer(proc.port, timeout=5)
        try:
            while not stop.is_set():
                i = acknowledged[n]
                batch = b"PUT:tmp%d:%s\nDELETE:tmp%d\nPUT:keep%d:%d\n" % (n, value, n, n, i)
                assert peer.request(batch) == []
                acknowledged[n] = i + 1
        finally:
            peer.close()

    clients = [gevent.spawn(client, n) for n in range(8)]
    watcher = Peer(proc.port)
    try:
        deadline = time.monotonic() + 30
        while read_stats(watcher)["aof_rewrites"] < 3 and time.monotonic() < deadline:
            assert not any(c.dead for c in clients), [c.exception for c in clients]
            gevent.sleep(0.1)
        rewrites = read_stats(watcher)["aof_rewrites"]
    finally:
        stop.set()
        gevent.joinall(clients, raise_error=True)
        watcher.close()
    assert rewrites >= 3, f"only {rewrites} compactions in 30 s"
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    replies, _ = after_restart(
        server_process, path, b"".join(b"GET:keep%d\nGET:tmp%d\n" % (n, n) for n in range(8))
    )
    assert replies == [b"keep%d:%d" % (n, i) for n in range(8) for i in range(acknowledged[n])]


@pytest.mark.parametrize("fsync", ["always", "everysec"])
def test_at_the_open_files_limit_the_log_still_syncs(server_process, tmp_path, fsync):
    """The server's open-files limit lowered for real (RLIMIT_NOFILE set on the running
    process, as ``prlimit --pid`` does) and every free number taken by a client: no file can
    be opened. Writes are still acknowledged and synced (the log's fsync runs on a duplicate
    of its descriptor: it gives up a spare one held for this), compactions due meanwhile
    fail and are retried, costing clients nothing, and once files are free again one runs.
    Before, the duplicate's EMFILE failed every write (ERR persistence failed, 177 of 180
    under always), and under everysec a compaction that could not open its directory to
    sync the rename demanded a rebuild, which the limit kept failing (an auditor's and an
    attacker's runs, 5 of 5)."""
    path = tmp_path / "kv.aof"
    proc = server_process(
        "--aof", str(path), "--fsync", fsync, "--aof-rewrite-min-size", "64K", "--aof-rewrite-growth", "1.5"
    )
    peer = Peer(proc.port)
    assert peer.request(b"") == []  # (accepted: its file is open before the limit is set)
    limits = resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE)
    fillers = fill_descriptors(proc.port, proc.proc.pid)
    value = b"x" * 4000
    try:
        n, end = 0, time.monotonic() + 3  # (everysec: fsyncs a second apart)
        while n < 60 or time.monotonic() < end:  # (240 KB or more: compactions due at 64 KB)
            peer.send(b"PUT:churn:%s\nDELETE:churn\nPUT:k%d:%d\nPING\n" % (value, n, n))
            assert peer.read_lines(1) == [b"PONG"], f"batch {n} refused at the open-files limit"
            n += 1
        stats = read_stats(peer)
        assert stats["aof_ok"] == 1 and stats["aof_fsync_errors"] == 0
        assert stats["aof_rewrites"] == 0 and events_named(proc, "aof_rewrite_failed")  # (no file for it)
        resource.prlimit(proc.proc.pid, resource.RLIMIT_NOFILE, limits)

        def compacted() -> bool:  # (a compaction is due at a write, after the last one's backoff)
            assert peer.request(b"PUT:churn:%s\nDELETE:churn\n" % value) == []
            return read_stats(peer)["aof_rewrites"] >= 1

        wait_until(compacted, 30, "no compaction once files were free")
    finally:
        for filler in fillers:
            filler.close()
        peer.close()
    assert not events_named(proc, "aof_fsync_failed")
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    replies, _ = after_restart(server_process, path, b"".join(b"GET:k%d\n" % i for i in range(n)))
    assert replies == [b"k%d:%d" % (i, i) for i in range(n)]


@pytest.mark.parametrize("fsync", ["always", "everysec", "no"])
def test_a_kill_among_back_to_back_compactions_loses_no_acknowledged_write(server_process, tmp_path, fsync):
    """README: a process crash (kill -9) loses nothing the kernel accepted, under any policy,
    and the log's path always names a file with every write accepted, whenever the process
    is killed. Four clients write (a key's next value, a 2 KB value put and deleted) under
    thresholds that compact again and again (64K, growth 1.01); kill -9 once several
    compactions ran; a restart on the file finds each client's values in order, every
    acknowledged one, nothing invented. (An auditor's runs: 33 of 33; untested before from
    outside, at a random point of a compaction.)"""
    path = tmp_path / "kv.aof"
    proc = server_process(
        "--aof", str(path), "--fsync", fsync, "--aof-rewrite-min-size", "64K", "--aof-rewrite-growth", "1.01"
    )
    acknowledged, sent = [0] * 4, [0] * 4
    churn = b"c" * 2000

    def client(n: int) -> None:
        peer = Peer(proc.port, timeout=10)
        try:
            while True:
                sent[n] += 1
                batch = b"PUT:keep%d:%d\nPUT:tmp%d:%s\nDELETE:tmp%d\n" % (n, sent[n] - 1, n, churn, n)
                if peer.request(batch) != []:
                    return
                acknowledged[n] = sent[n]
        except (OSError, AssertionError):  # (killed: the connection goes)
            return
        finally:
            peer.close()

    clients = [gevent.spawn(client, n) for n in range(4)]
    watcher = Peer(proc.port)
    try:
        wait_until(lambda: read_stats(watcher)["aof_rewrites"] >= 5, 30, "too few compactions")
    finally:
        watcher.close()
    proc.proc.kill()
    proc.proc.wait()
    gevent.joinall(clients)
    replies, _ = after_restart(server_process, path, b"".join(b"GET:keep%d\n" % n for n in range(4)))
    for n in range(4):
        values = [line for line in replies if line.startswith(b"keep%d:" % n)]
        assert values == [b"keep%d:%d" % (n, i) for i in range(len(values))]
        assert acknowledged[n] <= len(values) <= sent[n], (n, acknowledged[n], len(values), sent[n])


@pytest.mark.parametrize("repair", [False, True])
def test_a_log_ending_in_zero_bytes_starts_with_a_warning(server_process, tmp_path, repair):
    """A file whose tail is NUL bytes (its size reached the disk before its data) starts, with
    or without --aof-repair: the zeros are a torn tail, truncated with a warning."""
    path = tmp_path / "kv.aof"
    good = MAGIC + encode_record(b"PUT:k:1") + encode_record(b"PUT:k:2")
    path.write_bytes(good + bytes(8192))
    proc = server_process("--aof", str(path), *(["--aof-repair"] if repair else []))
    peer = Peer(proc.port)
    try:
        assert peer.request(b"GET:k\n") == [b"k:1", b"k:2"]
    finally:
        peer.close()
    (torn,) = events_named(proc, "aof_torn_tail_truncated")
    assert torn["offset"] == len(good) and torn["dropped_bytes"] == 8192
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    assert path.stat().st_size == len(good)


def test_a_compaction_that_does_not_fit_leaves_the_log_working(server_process, tiny_disk):
    """On a 1 MiB disk holding 600 KB of live data a compaction cannot fit: it stops before it
    takes the space the log appends into (aof_rewrite_failed once, counted), its file is
    removed, writes go on unharmed, and once the disk is grown a retry compacts the log."""
    disk = tiny_disk("1m")
    path = disk.path / "kv.aof"
    proc = server_process(
        "--aof", str(path), "--aof-rewrite-min-size", "600000", "--aof-rewrite-growth", "1.1"
    )
    peer = Peer(proc.port)
    try:
        for i in range(60):
            assert peer.request(b"PUT:live%d:%s\n" % (i, b"v" * 10_000)) == []
        wait_until(lambda: read_stats(peer)["aof_rewrite_failures"] >= 1, 10, "no compaction was tried")
        assert read_stats(peer)["aof_rewriting"] == 0
        for i in range(10):
            assert peer.request(b"PUT:small:%d\n" % i) == []
        assert sorted(p.name for p in disk.path.iterdir()) == ["kv.aof"]
        assert len(events_named(proc, "aof_rewrite_failed")) == 1
        assert not events_named(proc, "aof_write_failed")
        disk.resize("4m")

        def compacted() -> bool:
            peer.request(b"PUT:small:more\n")  # (a write lets the store see it may compact)
            return read_stats(peer)["aof_rewrites"] >= 1

        wait_until(compacted, 20, "the compaction was not retried")
        assert len(peer.request(b"GET:small\n")) >= 10
    finally:
        peer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)


DROP_OVERRIDES = "-dac_override,-dac_read_search,-fowner"
"""Capabilities that let root write where its user may not: dropped, root is a service user."""


@pytest.mark.parametrize("case", ["unwritable directory", "longest name"])
def test_a_log_recovers_where_no_file_can_be_made_beside_it(server_process, tiny_disk, case):
    """The recovery from a full disk used to write its probe in a new file beside the log
    (``PATH.probe``). Where the server may write the log but not make files in its
    directory (a root-owned /var/lib/kvgevent, the file given to the service's user: here a
    directory of nobody's, the server root without the capabilities that override file
    permissions, as setpriv drops them), or where the log's name leaves no room for the
    suffix (255 bytes), every attempt failed: writes refused for ever after the disk had
    room again, and no event said why (2/2 each, an auditor's runs). The probe is written
    past the log's end now."""
    disk = tiny_disk("2m")
    prefix: tuple[str, ...] = ()
    if case == "unwritable directory":
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's file capabilities")
        path = disk.path / "kv.aof"
        path.touch()
        os.chown(disk.path, 65534, 65534)
        disk.path.chmod(0o755)  # (a tmpfs's root is 1777)
        prefix = (setpriv, f"--inh-caps={DROP_OVERRIDES}", f"--bounding-set={DROP_OVERRIDES}")
    else:
        path = disk.path / ("k" * 255)
    proc = server_process("--aof", str(path), "--fsync", "always", prefix=prefix)
    peer = Peer(proc.port)
    try:
        assert peer.request(b"PUT:a:1\n") == []
        filler = disk.fill()
        peer.send(b"PUT:b:" + b"v" * 20_000 + b"\nPING\n")
        assert peer.read_lines(2) == [b"ERR persistence failed", b"PONG"]
        filler.unlink()
        wait_until(lambda: read_stats(peer)["aof_ok"] == 1, 10, "the log did not recover")
        assert peer.request(b"PUT:c:1\nGET:a\nGET:b\nGET:c\n") == [b"a:1", b"c:1"]
    finally:
        peer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
    assert [len(events_named(proc, name)) for name in ("aof_write_failed", "aof_recovered")] == [1, 1]
    # A name with no room for ".rewrite" is said at start: compactions and rebuilds need it.
    assert len(events_named(proc, "aof_name_too_long")) == (case == "longest name")
    replies, _ = after_restart(server_process, path, b"GET:a\nGET:b\nGET:c\n")
    assert replies == [b"a:1", b"c:1"]


def test_a_disk_with_room_for_small_writes_only_does_not_flap(server_process, tiny_disk):
    """A disk with about 300 KiB free, and a client that keeps retrying a 400 KB PUT: each
    attempt is refused, and the log does not recover and fail again at every attempt (its
    probe writes as much as the write that failed): one aof_write_failed, no aof_recovered,
    until the disk has room."""
    disk = tiny_disk("1m")
    path = disk.path / "kv.aof"
    (disk.path / "ballast").write_bytes(bytes(700 << 10))
    proc = server_process("--aof", str(path))
    peer = Peer(proc.port)
    try:
        end = time.monotonic() + 3
        attempts = 0
        while time.monotonic() < end:
            assert peer.request(b"PUT:big:" + b"b" * 400_000 + b"\n") == [b"ERR persistence failed"]
            attempts += 1
            gevent.sleep(0.02)
        assert attempts > 20
        assert len(events_named(proc, "aof_write_failed")) == 1
        assert not events_named(proc, "aof_recovered")
        (disk.path / "ballast").unlink()
        wait_until(lambda: events_named(proc, "aof_recovered"), 10, "the log did not recover")
        assert peer.request(b"PUT:big:" + b"b" * 400_000 + b"\n") == []
    finally:
        peer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)


def test_a_log_at_its_file_size_limit_does_not_flap(server_process, tmp_path):
    """A real file-size limit (RLIMIT_FSIZE set on the running server, as systemd's
    ``LimitFSIZE=`` would): once the log reaches it, every write fails with EFBIG while the
    disk has room. The log stays failing (its probe also extends the log itself): one
    aof_write_failed, no aof_recovered, each PUT refused, until the limit is lifted; then
    it recovers by itself. Before, a new small probe file passed: the log recovered and
    failed again about once a second, a pair of events each time."""
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", "always")
    peer = Peer(proc.port)
    try:
        assert peer.request(b"PUT:before:x\n") == []  # (its PONG: on disk)
        limit = path.stat().st_size + (256 << 10)
        resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        value = b"v" * 1000
        for n in range(2000):  # (about 256 PUTs fit under the limit)
            if peer.request(b"PUT:k%d:%s\n" % (n, value)) == [b"ERR persistence failed"]:
                break
        else:
            raise AssertionError("2 MB of PUTs passed a 256 KiB file-size limit")
        end = time.monotonic() + 3  # (the recovery tries at 50 ms doubling to 1 s: 5 tries)
        while time.monotonic() < end:
            assert peer.request(b"PUT:small:x\n") == [b"ERR persistence failed"]
            gevent.sleep(0.05)
        assert len(events_named(proc, "aof_write_failed")) == 1
        assert "too large" in events_named(proc, "aof_write_failed")[0]["error"]
        assert not events_named(proc, "aof_recovered")
        resource.prlimit(proc.proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
        wait_until(lambda: events_named(proc, "aof_recovered"), 10, "the log did not recover")
        assert peer.request(b"PUT:after:x\nGET:before\n") == [b"before:x"]
    finally:
        peer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)


def test_a_second_server_on_the_same_log_is_refused_even_after_a_compaction(server_process, tmp_path):
    """Two servers on one ``--aof`` file would each append at their own end, over the other's
    records: the acknowledged writes of one lost at the next start, silently. The second
    now exits 1 at once (``aof_unreadable``, the file in use), also after the first has
    compacted the file (its new file is locked before it takes the path); once the first
    has stopped, the file opens again with every write."""
    path = tmp_path / "kv.aof"
    first = server_process("--aof", str(path), "--fsync", "always", "--aof-rewrite-min-size", "4K")
    peer = Peer(first.port)
    try:
        assert peer.request(b"".join(b"PUT:k%d:%s\n" % (n, b"v" * 100) for n in range(100))) == []
        assert peer.request(b"DELETE:k0\n") == []
        wait_until(lambda: events_named(first, "aof_rewritten"), 10, "no compaction")
        second = server_process("--aof", str(path), wait=False)
        assert second.stop(sig=None, timeout=20) == 1
        (refused,) = events_named(second, "aof_unreadable")
        assert "in use by another process" in refused["error"], refused
        assert peer.request(b"PUT:after:x\nGET:k1\n") == [b"k1:" + b"v" * 100]
    finally:
        peer.close()
    assert first.stop() == 0
    replies, _ = after_restart(server_process, path, b"GET:after\nGET:k0\n")
    assert replies == [b"after:x"]


def test_a_symlinked_log_stays_the_locked_log_across_a_compaction(server_process, tmp_path):
    """``--aof`` names a symlink to the file: a compaction's rename used to replace the link
    with a new file beside it, leaving the file it named behind, unlocked (a second server
    on it then served stale data beside the first). The path is resolved at start: the
    link still names the log after a compaction, and a second server on it is refused."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "kv.aof"
    link = tmp_path / "kv.aof"
    link.symlink_to(target)
    first = server_process("--aof", str(link), "--aof-rewrite-min-size", "4K")
    peer = Peer(first.port)
    try:
        assert peer.request(b"".join(b"PUT:k%d:%s\n" % (n, b"v" * 100) for n in range(100))) == []
        assert peer.request(b"DELETE:k0\n") == []
        wait_until(lambda: events_named(first, "aof_rewritten"), 10, "no compaction")
        assert link.is_symlink() and link.resolve() == target
        second = server_process("--aof", str(target), wait=False)
        assert second.stop(sig=None, timeout=20) == 1
    finally:
        peer.close()
    assert first.stop() == 0
    # Every event names the log as its own events do: the file, not the link.
    paths = {e["path"] for e in first.events() if e["event"].startswith("aof_")}
    assert paths == {str(target)}, paths


def _values(peer: Peer, key: bytes) -> list[bytes]:
    return [line.split(b":", 1)[1] for line in peer.request(b"GET:" + key + b"\n")]


@pytest.mark.parametrize(
    ("fault", "fsync"),
    [("rm", "always"), ("mv", "always"), ("truncate", "always"), ("rm", "everysec"), ("truncate", "no")],
)
def test_a_log_file_taken_away_is_rebuilt_at_its_path(server_process, tmp_path, fault, fsync):
    """An operator's ``rm`` or ``mv`` of the log, or logrotate's ``copytruncate``, under a
    running server: it used to go on acknowledging writes as durable in a file no name led
    to (or past a hole at the old offset), log nothing, and a kill -9 then lost every write
    (20 of 20, an attacker's runs; a truncated log would not even start). Now the log looks
    after each fsync and every second: one ``aof_file_lost`` with the reason, writes
    refused and no PONG until the whole file is rewritten from memory at the path, then
    ``aof_recovered``; after a kill -9 the restart finds everything, and the path is locked
    again (a second server is refused). Under everysec and no, the look every second finds it."""
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", fsync)
    peer = Peer(proc.port)
    try:
        assert peer.request(b"".join(b"PUT:k:%d\n" % n for n in range(10))) == []  # (PONG: durable)
        if fault == "rm":
            path.unlink()
        elif fault == "mv":
            path.rename(tmp_path / "kv.aof.1")
        else:
            os.truncate(path, 0)
        if fsync == "always":  # the next PING's fsync finds it (or the look did: the PUT refused)
            probe = Peer(proc.port)
            probe.send(b"PUT:k:x\nPING\n")
            assert probe.read_lines(1) == [b"ERR persistence failed"]
            probe.close()
        wait_until(lambda: events_named(proc, "aof_recovered"), 10, "the file was not rebuilt")
        assert peer.request(b"".join(b"PUT:k:%d\n" % n for n in range(10, 20))) == []
        served = _values(peer, b"k")
        second = server_process("--aof", str(path), wait=False)
        assert second.stop(sig=None, timeout=20) == 1  # the rebuilt file is locked: refused
    finally:
        peer.close()
    reasons = {"rm": "removed", "mv": "renamed away", "truncate": "truncated"}
    lost = events_named(proc, "aof_file_lost")
    assert len(lost) == 1 and reasons[fault] in lost[0]["error"], lost
    assert [e["reason"] for e in events_named(proc, "aof_rewritten")] == ["recovery"]
    proc.stop(signal.SIGKILL)
    assert served[:10] == [b"%d" % n for n in range(10)]
    assert served[-10:] == [b"%d" % n for n in range(10, 20)]
    replies, _ = after_restart(server_process, path, b"GET:k\n")
    assert [line.split(b":", 1)[1] for line in replies] == served


@pytest.mark.parametrize("fault", ["rm", "truncate"])
def test_a_stop_right_after_the_log_file_was_taken_rewrites_it_first(server_process, tmp_path, fault):
    """A SIGTERM in the second after an ``rm`` (or a cut) of a log with everything synced:
    the stop saw nothing left to sync, exited 0, and the restart started empty (12 of 12, an
    attacker's runs). The stop looks at the file last: it is rewritten at the path from
    memory, then the server exits 0 and the restart finds every write."""
    path = tmp_path / "kv.aof"
    proc = server_process("--aof", str(path), "--fsync", "always")
    peer = Peer(proc.port)
    try:
        assert peer.request(b"".join(b"PUT:k:%d\n" % n for n in range(10))) == []  # (synced)
    finally:
        peer.close()
    if fault == "rm":
        path.unlink()
    else:
        os.truncate(path, 0)
    assert proc.stop() == 0
    replies, _ = after_restart(server_process, path, b"GET:k\n")
    assert replies == [b"k:%d" % n for n in range(10)]


@pytest.mark.parametrize("wait", [False, True])
def test_a_backup_moved_over_a_running_servers_log_is_left_alone_at_the_stop(server_process, tmp_path, wait):
    """An operator moves a backup of the log over the path of a running server, then stops
    it (SIGTERM at once, or once the server noticed): the backup is not the server's to
    replace, so it is left byte for byte, the writes since are refused, and the stop exits 1
    with ``aof_unwritten`` (README, When the disk fails). (An auditor's runs: 12 of 12;
    untested before.)"""
    path, backup = tmp_path / "kv.aof", tmp_path / "backup.aof"
    proc = server_process("--aof", str(path), "--fsync", "always")
    peer = Peer(proc.port)
    try:
        assert peer.request(b"".join(b"PUT:k:%d\n" % n for n in range(5))) == []
        shutil.copyfile(path, backup)
        assert peer.request(b"PUT:k:after-backup\n") == []
        saved = backup.read_bytes()
        backup.rename(path)  # (the operator's "restore")
        if wait:
            wait_until(lambda: events_named(proc, "aof_file_lost"), 10, "not noticed")
            peer.send(b"PUT:k:refused\n")
            assert peer.read_lines(1) == [b"ERR persistence failed"]
    finally:
        peer.close()
    assert proc.stop() == 1
    assert events_named(proc, "aof_unwritten")
    assert path.read_bytes() == saved


def test_a_log_path_another_server_took_is_never_replaced(server_process, tmp_path):
    """The log removed while its server was stopped (SIGSTOP), and a second server started on
    the free path: when the first resumes and finds its file gone, rewriting it at the path
    would rename over the second's log (an attacker's run: all 20 of the second's
    acknowledged writes lost at the first's next compaction). Instead it refuses writes,
    says so once (``aof_file_lost``), and leaves that file alone, also once the second has
    stopped; moved away by the operator, the path takes the first's log again."""
    path = tmp_path / "kv.aof"
    first = server_process("--aof", str(path), "--fsync", "always")
    peer = Peer(first.port)
    watcher = Peer(first.port)  # writes nothing: its PINGs never wait for the log
    try:
        assert peer.request(b"PUT:mine:1\n") == []
        os.kill(first.proc.pid, signal.SIGSTOP)
        try:
            path.unlink()
            second = server_process("--aof", str(path), "--fsync", "always")
            other = Peer(second.port)
            assert other.request(b"".join(b"PUT:theirs:%d\n" % n for n in range(5))) == []
            other.close()
        finally:
            os.kill(first.proc.pid, signal.SIGCONT)
        wait_until(lambda: events_named(first, "aof_file_lost"), 10, "the first did not notice")
        assert second.stop() == 0  # (its lock gone: the file is still not the first's to replace)
        # Its rebuild is tried and refused, again and again: the other file stays.
        wait_until(lambda: read_stats(watcher)["aof_rewrite_failures"] >= 2, 10, "no rebuild tried")
        peer.send(b"PUT:mine:2\n")
        assert peer.read_lines(1) == [b"ERR persistence failed"]
        assert read_stats(watcher)["aof_ok"] == 0
        replies, _ = after_restart(server_process, path, b"GET:theirs\nGET:mine\n")
        assert replies == [b"theirs:%d" % n for n in range(5)]
        path.rename(tmp_path / "theirs.aof")  # the operator moves it away: the path is free
        wait_until(lambda: events_named(first, "aof_recovered"), 10, "the log was not rewritten")
        assert peer.request(b"PUT:mine:3\n") == []
    finally:
        peer.close()
        watcher.close()
    assert first.stop() == 0
    lost = events_named(first, "aof_file_lost")
    assert len(lost) == 1 and "replaced" in lost[0]["error"], lost
    replies, _ = after_restart(server_process, path, b"GET:mine\nGET:theirs\n")
    assert replies == [b"mine:1", b"mine:3"]
    replies, _ = after_restart(server_process, tmp_path / "theirs.aof", b"GET:theirs\n")
    assert len(replies) == 5


def test_a_log_replaced_between_its_open_and_its_lock_is_opened_again(tmp_path, monkeypatch):
    """Another server's compaction can rename its new file over the path between this
    server's open and its lock: the file locked is then not the log. Injected at the OS-call
    boundary (the window is microseconds wide): the lock's first call renames a new file over
    the path first; the descriptor returned is the file now at the path."""
    from kvgevent.stores import aof_log

    path = tmp_path / "kv.aof"
    path.write_bytes(MAGIC)
    replacement = tmp_path / "new"
    replacement.write_bytes(MAGIC)
    real_lock, calls = aof_log.lock, []

    def lock_after_a_compaction(fd: int) -> None:
        if not calls:
            os.replace(replacement, path)
        calls.append(fd)
        real_lock(fd)

    monkeypatch.setattr(aof_log, "lock", lock_after_a_compaction)
    fd = aof_log._open_locked(str(path))
    try:
        assert len(calls) == 2
        assert os.fstat(fd).st_ino == path.stat().st_ino
    finally:
        os.close(fd)


def metrics_port(proc) -> int:
    """The port a server started with ``--metrics-port 0`` picked (its metrics_listening event)."""
    wait_until(lambda: events_named(proc, "metrics_listening"), 10, "no metrics_listening event")
    return events_named(proc, "metrics_listening")[0]["port"]


def aof_ok_gauge(port: int) -> float:
    """kvgevent_aof_ok as scraped (absent: a KeyError, not a 0)."""
    return scrape(port)[("kvgevent_aof_ok", ())]


def test_readyz_and_the_aof_ok_gauge_follow_a_full_disk(server_process, tiny_disk):
    """A real full disk: a 2 MiB tmpfs whose every free byte a filler file takes, under a
    server with --metrics-port 0. Once PUTs get 'ERR persistence failed', /readyz is 503 with
    a one-line reason naming the append-only file and /metrics shows kvgevent_aof_ok 0; once
    the filler is removed the log recovers by itself, /readyz is 200 and kvgevent_aof_ok 1."""
    disk = tiny_disk("2m")
    path = disk.path / "kv.aof"
    proc = server_process("--aof", str(path), "--metrics-port", "0")
    metrics = metrics_port(proc)
    peer = Peer(proc.port)
    try:
        assert http_get(metrics, "/readyz") == (200, "ready\n")
        assert aof_ok_gauge(metrics) == 1
        assert peer.request(b"PUT:k:before\n") == []
        filler = disk.fill()
        for _ in range(1000):  # the log file's last page may still have room for a few records
            if b"ERR persistence failed" in peer.request(b"PUT:f:x\n" * 200):
                break
        else:
            raise AssertionError("200,000 PUTs were accepted by a full disk")
        status, body = http_get(metrics, "/readyz")
        assert status == 503, body
        assert body.endswith("\n") and body.count("\n") == 1, body
        assert "append-only file" in body, body
        assert aof_ok_gauge(metrics) == 0
        assert read_stats(peer)["aof_ok"] == 0
        filler.unlink()
        wait_until(lambda: http_get(metrics, "/readyz") == (200, "ready\n"), 15, "/readyz is not 200 again")
        assert aof_ok_gauge(metrics) == 1
        assert peer.request(b"PUT:k:after\n") == []
        assert len(events_named(proc, "aof_write_failed")) == 1
        assert len(events_named(proc, "aof_recovered")) == 1
    finally:
        peer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)


def test_a_compaction_that_would_fit_stops_short_of_the_reserve(server_process, tiny_disk):
    """A real nearly full disk: a 4 MiB tmpfs holding 200 KB of live data, and a ballast file
    leaving about that plus half the reserve (5% of the disk: 204 KiB) free. The compaction a
    write then starts would fit, with ~100 KiB to spare, but would leave less than the reserve
    free: it stops (aof_rewrite_failed naming the bytes it keeps free) before the log's appends
    fail, its file is removed, and small PUTs go on being acknowledged, with no aof_write_failed.
    A client writing all along gets a retry after 1 s, then 2 s, then 4 s: over the 6 s after
    the first failure, 3 or 4 attempts in all (a retry each second makes 6 or 7)."""
    disk = tiny_disk("4m")
    path = disk.path / "kv.aof"
    fs = os.statvfs(disk.path)
    reserve = min(64 << 20, int(fs.f_blocks * fs.f_frsize * 0.05))  # the README's 5%, at most 64 MiB
    min_size = 300_000
    proc = server_process(
        "--aof", str(path), "--aof-rewrite-min-size", str(min_size), "--aof-rewrite-growth", "1.1"
    )
    peer = Peer(proc.port)
    writer = Peer(proc.port)
    try:
        assert peer.request(b"".join(b"PUT:live%d:%s\n" % (i, b"v" * 5000) for i in range(40))) == []
        snapshot = read_stats(peer)["aof_bytes"]  # what a compaction writes: the live records
        # Garbage (a value PUT then DELETEd) brings the file to just under the threshold.
        garbage = min_size - 600 - snapshot - len(b"PUT:g:") - len(b"DELETE:g") - 16
        assert peer.request(b"PUT:g:%s\nDELETE:g\n" % (b"g" * garbage)) == []
        assert min_size - 1000 < read_stats(peer)["aof_bytes"] < min_size
        assert read_stats(peer)["aof_rewrites"] == read_stats(peer)["aof_rewrite_failures"] == 0
        free = os.statvfs(disk.path).f_bavail * fs.f_frsize
        ballast = (free - snapshot - reserve // 2) // 4096 * 4096
        (disk.path / "ballast").write_bytes(bytes(ballast))
        free = os.statvfs(disk.path).f_bavail * fs.f_frsize
        # (the design: the compaction would fit, with 64 KiB to spare, but not keep the reserve)
        assert snapshot + (64 << 10) < free < snapshot + reserve - (64 << 10), (snapshot, free, reserve)

        assert peer.request(b"PUT:g:%s\nDELETE:g\n" % (b"g" * 1000)) == []  # crosses the threshold
        wait_until(
            lambda: (s := read_stats(peer))["aof_rewrite_failures"] + s["aof_rewrites"] >= 1,
            10,
            "no compaction was tried",
        )
        first = time.monotonic()
        assert not events_named(proc, "aof_rewritten"), "a compaction took the disk's reserve"
        (failed,) = events_named(proc, "aof_rewrite_failed")
        assert failed["error"] == f"compaction stopped to keep {reserve} bytes free for the log", failed
        assert failed["retry_in_s"] == 1
        acknowledged = 0
        while time.monotonic() < first + 6:  # a writer all along: each write may start a retry
            assert writer.request(b"PUT:small:%d\n" % acknowledged) == []
            acknowledged += 1
            gevent.sleep(0.02)
        stats = read_stats(peer)
        print(f"\ncompaction attempts in the 6 s after the first: {stats['aof_rewrite_failures']}")
        assert 3 <= stats["aof_rewrite_failures"] <= 4, stats
        assert stats["aof_rewrites"] == 0 and stats["aof_ok"] == 1
        assert len(events_named(proc, "aof_rewrite_failed")) == 1
        assert not events_named(proc, "aof_write_failed")
        assert not events_named(proc, "aof_rewritten")
        assert sorted(p.name for p in disk.path.iterdir()) == ["ballast", "kv.aof"]
        assert writer.request(b"GET:small\n") == [b"small:%d" % i for i in range(acknowledged)]
    finally:
        peer.close()
        writer.close()
    assert proc.stop() == 0
    assert_no_bug_reported(proc)
