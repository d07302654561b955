"""The programs as a user runs them: run_server.py (flags, JSON logs, signals, exit
statuses) and run_client.py, each in a subprocess on a free loopback port."""

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest
from conftest import ROOT, Peer, RedisProcess, free_port, needs_redis, read_stats, wait_until

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)$")


def run(script: str, *args: str, stdin: bytes = b"", env: dict | None = None, timeout: float = 20):
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def test_server_logs_are_json_with_connect_and_drop_events(server_process):
    """Every stderr line is a JSON object with timestamp/level/event; connects and drops are
    logged with client_id, peer, reason and counts; SIGTERM stops with exit status 0."""
    proc = server_process()
    peer = Peer(proc.port)
    assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
    local = f"127.0.0.1:{peer.sock.getsockname()[1]}"
    peer.close()
    wait_until(lambda: b'"client_dropped"' in proc.stderr)
    assert proc.stop(signal.SIGTERM) == 0
    events = proc.events()
    for event in events:
        assert {"timestamp", "level", "event"} <= set(event)
        assert ISO_UTC.match(event["timestamp"]), event["timestamp"]
    names = [e["event"] for e in events]
    assert names[0] == "server_started" and names[-1] == "server_stopped"
    assert events[0]["port"] == proc.port and events[0]["host"] == "127.0.0.1"
    connected = [e for e in events if e["event"] == "client_connected"]
    dropped = [e for e in events if e["event"] == "client_dropped"]
    assert connected[0]["peer"] == local and connected[0]["active"] >= 1
    assert dropped[0]["peer"] == local and dropped[0]["reason"] == "closed"
    assert dropped[0]["client_id"] == connected[0]["client_id"]
    assert {"active", "dropped", "messages_dropped"} <= set(dropped[0])
    assert "shutdown_requested" in names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_closes_clients_and_exits_zero(server_process, sig):
    """On SIGINT or SIGTERM connected clients are closed (they see EOF) and the exit is 0."""
    proc = server_process()
    peer = Peer(proc.port)
    assert peer.request(b"") == []
    proc.proc.send_signal(sig)
    assert peer.sock.recv(10) == b""
    peer.close()
    assert proc.stop(None) == 0
    events = proc.events()
    (drop,) = [e for e in events if e["event"] == "client_dropped"]
    assert drop["reason"] == "server_shutdown"
    assert not any("Traceback" in line for line in proc.stderr.decode().splitlines())


def test_port_in_use_prints_one_line_and_exits_1(server_process):
    """A second server on a taken port fails fast: exit status 1, one clear line on stderr."""
    first = server_process()
    result = run("run_server.py", "--port", str(first.port), "--log-format", "json")
    assert result.returncode == 1
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1
    assert "in use" in lines[0] and str(first.port) in lines[0]


def test_help_shows_every_flag_with_its_default():
    result = run("run_server.py", "--help")
    assert result.returncode == 0
    text = result.stdout.decode()
    for flag, default in [
        ("--host", "127.0.0.1"),
        ("--port", "9999"),
        ("--queue-size", "500"),
        ("--max-line", "1048576"),
        ("--log-format", "auto"),
        ("--log-level", "info"),
    ]:
        assert flag in text and default in text
    assert "KVGEVENT_PORT" in text


def test_flags_can_come_from_the_environment(server_process):
    """KVGEVENT_MAX_LINE sets --max-line (and a bad environment value is a usage error)."""
    proc = server_process(env={"KVGEVENT_MAX_LINE": "10"})
    peer = Peer(proc.port)
    assert peer.request(b"PUT:k:0123456789\n") == [b"ERR line too long"]
    peer.close()
    bad = run("run_server.py", env={"KVGEVENT_QUEUE_SIZE": "lots"})
    assert bad.returncode == 2 and b"KVGEVENT_QUEUE_SIZE" in bad.stderr


def test_help_works_whatever_the_environment_holds():
    """--help prints the help (exit 0) even with a malformed KVGEVENT_* value: the one place a
    user learns what the variable should hold. Before, it was a usage error (exit 2)."""
    for script in ("run_server.py", "run_client.py"):
        result = run(script, "--help", env={"KVGEVENT_QUEUE_SIZE": "lots", "KVGEVENT_TIMEOUT": "never"})
        assert result.returncode == 0 and b"usage:" in result.stdout, result.stderr


def test_a_malformed_environment_value_is_a_usage_error_in_every_command():
    """Each command reading KVGEVENT_* values reports a malformed one (exit 2, naming it),
    the client's bench too, rather than running with the placeholder it fell back to."""
    for args in (("run_server.py",), ("run_client.py", "PING"), ("run_client.py", "bench", "-q")):
        result = run(*args, env={"KVGEVENT_PORT": "abc"})
        assert result.returncode == 2 and b"KVGEVENT_PORT" in result.stderr, (args, result.stderr)


def test_a_flag_given_overrides_a_malformed_environment_value(server_process):
    """The flag wins over its environment variable, a malformed one included."""
    proc = server_process("--max-line", "10", env={"KVGEVENT_MAX_LINE": "ten"})
    peer = Peer(proc.port)
    assert peer.request(b"PUT:k:0123456789\n") == [b"ERR line too long"]
    peer.close()


def test_bad_flag_value_is_a_usage_error():
    result = run("run_server.py", "--port", "70000")
    assert result.returncode == 2 and b"--port" in result.stderr


def test_a_password_too_long_for_the_line_bound_is_a_usage_error(server_process):
    """A password whose AUTH line is longer than --max-line could never authenticate (its
    AUTH gets ERR line too long): refused at start, from the flag or the environment, the
    password not shown (before: the server started and every client was refused)."""
    secret = "s" * 20
    for args, env in [(["--password", secret], None), ([], {"KVGEVENT_PASSWORD": secret})]:
        result = run("run_server.py", "--max-line", "20", *args, env=env)
        assert result.returncode == 2 and b"--password is too long for --max-line" in result.stderr
        assert secret.encode() not in result.stderr
    for bad in ("a\nb", "ab\r"):  # (a newline ends the AUTH line; a \r before it is dropped)
        result = run("run_server.py", "--password", bad)
        assert result.returncode == 2 and b"--password may not hold a newline" in result.stderr
    proc = server_process("--max-line", "25", "--password", secret)  # (AUTH: + 20 bytes fits)
    peer = Peer(proc.port)
    assert peer.request(b"AUTH:" + secret.encode() + b"\n") == [b"OK"]
    peer.close()
    # Bytes that are not UTF-8 (before: a traceback at start, exit 1): the password is them.
    raw = os.fsdecode(b"p\xff\xfe")
    proc = server_process(env={"KVGEVENT_PASSWORD": raw})
    peer = Peer(proc.port)
    assert peer.request(b"AUTH:p\xff\xfe\nGET:k\n") == [b"OK"]
    peer.close()


def test_a_worker_timeout_below_the_minimum_is_a_usage_error():
    """--worker-timeout below MIN_WORKER_TIMEOUT (but 0: never), from the flag or from
    KVGEVENT_WORKER_TIMEOUT, is refused: the supervisor checks five times a second, and
    before, 1e-9 had it kill every idle worker until it gave up (workers_failing)."""
    from kvgevent.config import MIN_WORKER_TIMEOUT

    store = "redis://127.0.0.1:1/0"  # (never reached: refused before anything starts)
    for value in ("1e-9", "0.1", str(MIN_WORKER_TIMEOUT / 2)):
        result = run("run_server.py", "--workers", "2", "--store", store, "--worker-timeout", value)
        assert result.returncode == 2 and b"--worker-timeout must be 0" in result.stderr, value
    result = run("run_server.py", "--workers", "2", "--store", store, env={"KVGEVENT_WORKER_TIMEOUT": "0.5"})
    assert result.returncode == 2 and b"--worker-timeout must be 0" in result.stderr


def test_a_store_url_redis_cannot_read_is_a_usage_error():
    """A --store URL redis-py cannot read (a port that is not a number, or out of range), from
    the flag or from KVGEVENT_STORE, with or without --workers: exit 2 with a usage message
    naming --store, its password hidden. Before, the store's constructor raised ValueError:
    a traceback, exit 1 (with --workers, one per worker and restart until workers_failing)."""
    for url in ("redis://127.0.0.1:abc/0", "redis://:sekrit@127.0.0.1:70000/0", "redis+cluster://h:x"):
        for args, env in [(["--store", url], None), ([], {"KVGEVENT_STORE": url})]:
            for workers in ("1", "2"):
                result = run("run_server.py", "--port", "0", "--workers", workers, *args, env=env)
                assert result.returncode == 2, (url, workers, result.stderr[-300:])
                assert b"--store redis" in result.stderr and b"Port" in result.stderr, result.stderr
                assert b"Traceback" not in result.stderr and b"sekrit" not in result.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_redis_cluster_unreachable_at_start_is_a_start_failure(server_process, workers):
    """--store redis+cluster:// whose node does not answer (a port nothing listens on): the
    cluster client asks it for the slots as the store is made. One ``server_start_failed``
    (the store, redis-py's error, a hint) and exit 1; with --workers each worker logs it and
    exits 1, and the supervisor gives up (workers_failing). Before, a RedisClusterException
    traceback and no event."""
    from kvgevent.serve.workers import GIVE_UP_AFTER

    url = f"redis+cluster://127.0.0.1:{free_port()}"
    proc = server_process("--workers", workers, "--store", url, wait=False)
    assert proc.stop(None, timeout=50) == 1
    events = proc.events()
    failed = [e for e in events if e["event"] == "server_start_failed"]
    assert failed and all(e["store"] == url and e["error"] and e["hint"] for e in failed), failed
    assert "Redis Cluster cannot be connected" in failed[0]["error"]
    if workers == "1":
        assert len(failed) == 1 and "server_started" not in [e["event"] for e in events]
    else:
        supervisor = [e["event"] for e in events if "worker" not in e]  # (workers' lines name them)
        assert len(failed) >= GIVE_UP_AFTER and supervisor[-1] == "workers_failing"
    assert b"Traceback" not in proc.stderr


def test_append_only_file_options_without_a_file_are_a_usage_error(server_process):
    """--fsync always, --aof-repair or a compaction threshold without --aof (from a flag or
    from the environment) is refused, naming what was given: before, the server started
    with the memory store alone and kept nothing, though asked for the strictest fsync.
    With --aof they start it, and the defaults alone do not need it."""
    cases = [
        (["--fsync", "always"], {}, b"--fsync needs --aof"),
        (["--aof-repair"], {}, b"--aof-repair needs --aof"),
        (["--aof-rewrite-growth", "3"], {"KVGEVENT_FSYNC": "no"}, b"--fsync, --aof-rewrite-growth need"),
        ([], {"KVGEVENT_AOF_REWRITE_MIN_SIZE": "1M"}, b"--aof-rewrite-min-size needs --aof"),
    ]
    for args, env, said in cases:
        result = run("run_server.py", "--port", "0", *args, env=env)
        assert result.returncode == 2 and said in result.stderr, (args, env, result.stderr[-200:])
    proc = server_process("--fsync", "everysec")  # (the default, given: nothing to refuse)
    assert proc.stop() == 0


def test_a_stray_heartbeat_descriptor_is_not_written_outside_a_worker(server_process):
    """KVGEVENT_HEARTBEAT_FD left in the environment of a server that no supervisor started
    (here naming its stderr) is ignored. Before, it wrote a heartbeat (a dot) to that
    descriptor every second, whatever it was: here, into the JSON log lines."""
    proc = server_process(env={"KVGEVENT_HEARTBEAT_FD": "2"})
    Peer(proc.port).close()
    assert proc.stop() == 0
    assert proc.events()[0]["event"] == "server_started"


def test_client_reads_stdin_when_given_no_lines(server_process):
    proc = server_process()
    lines = b"".join(b"PUT:many:%d\n" % i for i in range(3000)) + b"GET:many\n"
    result = run("run_client.py", "--port", str(proc.port), stdin=lines)
    assert result.returncode == 0
    assert result.stdout.splitlines() == [b"many:%d" % i for i in range(3000)]


def test_server_survives_a_client_that_resets_mid_reply(server_process):
    """A client that vanishes while replies are in flight costs the server nothing."""
    proc = server_process()
    loader = Peer(proc.port)
    loader.request(b"".join(b"PUT:big:%s\n" % (b"x" * 4000) for _ in range(500)))
    rude = socket.create_connection(("127.0.0.1", proc.port))
    rude.sendall(b"GET:big\n" * 20)
    rude.recv(1000)
    rude.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    rude.close()
    assert len(loader.request(b"GET:big\n")) == 500
    loader.close()
    assert proc.stop() == 0
    reasons = sorted(e["reason"] for e in proc.events() if e["event"] == "client_dropped")
    assert reasons == ["closed", "reset"]


def test_a_sigint_before_the_server_is_up_ends_it_without_a_traceback(tmp_path):
    """A Ctrl-C during start-up (here: while a big AOF is replayed, before the server's own
    handlers exist) ends the process as SIGINT's default does. Before, Python's own handler
    raised KeyboardInterrupt in the replay: a traceback on stderr."""
    from kvgevent.stores.aof import MAGIC, encode_record

    path = tmp_path / "big.aof"
    record = encode_record(b"PUT:k:" + b"v" * 10)
    with open(path, "wb") as aof:
        aof.write(MAGIC)
        aof.write(record * 3_000_000)  # a few seconds of replay
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_server.py"), "--port", "0", "--aof", str(path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:

        def replaying() -> bool:
            for fd in os.listdir(f"/proc/{proc.pid}/fd"):
                try:
                    if os.readlink(f"/proc/{proc.pid}/fd/{fd}") == str(path):
                        return True
                except OSError:  # closed meanwhile (an import's file)
                    pass
            return False

        wait_until(replaying, timeout=20, message="the replay began")
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        path.unlink()  # (72 MB: pytest keeps the last runs' tmp_path)
    assert proc.returncode == -signal.SIGINT
    assert b"Traceback" not in stderr and b"KeyboardInterrupt" not in stderr, stderr[-2000:]


def test_the_store_loads_with_the_collector_paused_then_tuned(tmp_path):
    """load_store replays with the cyclic collector off, freezes what it loaded out of the
    collector's reach, then collects the youngest generation every GC_YOUNG_THRESHOLD
    allocations (not Python's 700: over Redis that was 4% of a worker's CPU)."""
    import gc

    from kvgevent.config import GC_YOUNG_THRESHOLD
    from kvgevent.serve.cli import build_parser, load_store
    from kvgevent.stores.aof import MAGIC, encode_record

    aof = tmp_path / "data.aof"
    aof.write_bytes(MAGIC + b"".join(encode_record(b"PUT:k%d:v" % n) for n in range(1000)))
    args = build_parser().parse_args(["--aof", str(aof)])
    before, enabled = gc.get_threshold(), gc.isenabled()
    try:
        store = load_store(args, _NullLog())
        assert store is not None and store.count_keys() == 1000
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *before[1:])
        assert gc.isenabled()
        assert gc.get_freeze_count() >= 1000  # (the replayed value lists at least)
        store.close()
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        (gc.enable if enabled else gc.disable)()


class _NullLog:
    def bind(self, **_: object) -> "_NullLog":
        return self

    def info(self, *_: object, **__: object) -> None:
        pass

    warning = error = info


# --- README promises checked through the real program: --help, --redis-timeout, shutdown ---------

HELP_SECTIONS = ("options:", "optional arguments:", "positional arguments:")
HIDDEN_SERVER_FLAGS = {"--reuse-port"}
"""Set by the --workers supervisor for its workers, not by people: kept out of --help."""


def help_entries(text: str) -> dict[str, str]:
    """The entries of an argparse ``--help``'s option sections, by each option string (and
    each positional's name): the entry's whole text, its wrapping undone."""
    blocks: list[list[str]] = []
    in_section = False
    for line in text.splitlines():
        if line in HELP_SECTIONS:
            in_section = True
        elif not line.strip():
            in_section = False
        elif in_section and line.startswith("  ") and not line.startswith("   "):
            blocks.append([line])  # a new entry ("  --host HOST  address to ...")
        elif in_section and blocks:
            blocks[-1].append(line)  # its wrapped help
    entries = {}
    for block in blocks:
        invocation = re.split(r"\s{2,}", block[0].strip(), maxsplit=1)[0]  # "-h, --help"
        for name in invocation.split(", "):
            entries[name.split(" ")[0]] = " ".join(" ".join(block).split())
    return entries


def environment_names(build_parser, monkeypatch) -> dict[str, str]:
    """``{dest: KVGEVENT_NAME}`` for every option whose default its environment variable sets,
    found by setting each candidate (``--queue-size``: KVGEVENT_QUEUE_SIZE) and seeing which
    defaults change, not by reading the help text."""
    plain = {action.dest: action.default for action in build_parser()._actions}
    candidates = {
        "KVGEVENT_" + option[2:].upper().replace("-", "_"): action.dest
        for action in build_parser()._actions
        for option in action.option_strings
        if option.startswith("--")
    }
    with monkeypatch.context() as env:
        for name in candidates:
            env.setenv(name, "probe")
        probed = {action.dest: action.default for action in build_parser()._actions}
    return {dest: name for name, dest in candidates.items() if probed[dest] is not plain[dest]}


def check_help_lists_every_option(script: str, build_parser, monkeypatch, hidden=frozenset()) -> None:
    """``python <script> --help`` shows every option of ``build_parser()`` (but ``hidden``), each
    with some help, its default (unless None, or a switch's False) and its KVGEVENT_* name if
    it has one. Run with no KVGEVENT_* variable set, so the defaults shown are the built-in ones."""
    for name in [name for name in os.environ if name.startswith("KVGEVENT_")]:
        monkeypatch.delenv(name)
    env_names = environment_names(build_parser, monkeypatch)
    assert env_names, "no option reads the environment: the probe is broken"
    result = run(script, "--help")
    assert result.returncode == 0, result.stderr
    entries = help_entries(result.stdout.decode())
    suppressed = set()
    for action in build_parser()._actions:
        names = action.option_strings or [action.metavar or action.dest]
        if action.help == argparse.SUPPRESS:
            suppressed.update(names)
            continue
        assert action.help, f"{names} has no help text"
        missing = [name for name in names if name not in entries]
        assert not missing, f"{missing} not in {script} --help"
        entry = entries[names[0]]
        if action.nargs != 0 and action.default is not None:  # (nargs 0: a switch)
            assert f"default: {action.default}" in entry, (names, action.default, entry)
        if action.dest in env_names:
            assert env_names[action.dest] in entry, (names, entry)
    assert suppressed == set(hidden), f"options hidden from --help: {suppressed}"


def test_help_lists_every_server_option_with_its_default_and_environment_name(monkeypatch):
    """README: "python run_server.py --help lists every option with its default", and each
    can be set from the environment. Every option the parser has (but the workers' internal
    --reuse-port) is in the help with its help text, its default and its KVGEVENT_* name: a
    flag added without them fails here."""
    from kvgevent.serve.cli import build_parser

    check_help_lists_every_option("run_server.py", build_parser, monkeypatch, HIDDEN_SERVER_FLAGS)


@needs_redis
def test_redis_timeout_flag_bounds_a_call_to_a_stopped_redis(server_process, tmp_path):
    """run_server.py --redis-timeout 0.5 over a Redis frozen with SIGSTOP: a GET gets
    'ERR store unavailable' after about half a second, well before the default 2 s."""
    redis = RedisProcess(tmp_path)
    assert redis.proc is not None
    try:
        proc = server_process("--store", redis.url, "--redis-timeout", "0.5")
        peer = Peer(proc.port, timeout=3)  # (a reply later than 3 s fails the test)
        try:
            assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]  # connected to Redis
            os.kill(redis.proc.pid, signal.SIGSTOP)
            began = time.monotonic()
            assert peer.request(b"GET:k\n") == [b"ERR store unavailable"]
            elapsed = time.monotonic() - began
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
            peer.close()
        assert 0.4 <= elapsed < 1.6, elapsed  # 0.5 s, not the default 2 s (with room for a busy machine)
    finally:
        redis.kill()


def reply_socket(port: int) -> socket.socket:
    """A client socket with a small receive buffer: what it does not read stays queued in
    the server (a big buffer would take megabytes off the server's queue)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_to_end(sock: socket.socket, into: bytearray, pause: float = 0.0) -> bool:
    """Append what ``sock`` receives to ``into`` until the end of the stream (then return
    True), reading 16 kB every ``pause`` seconds (a slow reader) or as fast as it comes."""
    while chunk := sock.recv(16384):
        into += chunk
        if pause:
            gevent.sleep(pause)  # (the client's pace, not a synchronisation)
    return True


def test_shutdown_delivers_the_replies_that_left_to_a_client_with_requests_unread(server_process):
    """A client pipelined 30,000 GETs of a 1 kB value and reads them slowly: at SIGTERM
    megabytes of replies sit in the kernel's send queue and requests the server will not
    read in its receive queue. It reads to a clean end of stream, every line whole. (Before:
    closing with unread input made the kernel reset the connection and throw the send queue
    away: ECONNRESET after a few thousand lines, the rest lost uncounted, messages_dropped 0.)"""
    proc = server_process("--shutdown-flush", "2")
    value = b"x" * 1000
    monitor = Peer(proc.port)
    assert monitor.request(b"PUT:v:" + value + b"\n") == []
    client = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    got = bytearray()
    try:
        client.sendall(b"GET:v\n" * 30_000 + b"PING\n")
        reader = gevent.spawn(read_to_end, client, got, 0.02)  # (about 800 kB/s)
        wait_until(lambda: read_stats(monitor)["commands"] > 3000, timeout=20, message="not served")
        monitor.close()
        proc.proc.send_signal(signal.SIGTERM)
        assert proc.stop(None, timeout=20) == 0
        reader.kill()  # (the rest as fast as it comes)
        ended = gevent.spawn(read_to_end, client, got)
        ended.join(timeout=30)
    finally:
        client.close()
    assert ended.value is True, ended.exception  # the end of the stream, not a reset
    lines = bytes(got).split(b"\n")
    assert lines[-1] == b"" and len(lines) > 3000
    assert set(lines[:-1]) <= {b"v:" + value, b"PONG"}


def test_a_client_reading_a_big_reply_at_sigterm_gets_it_whole_within_the_flush(server_process):
    """README, SIGINT or SIGTERM: the shutdown "lets a batch of requests under way (... or
    for its client to take the replies before it: a big GET's reply is built as it leaves)
    finish, gives queued replies up to --shutdown-flush seconds to leave". Through
    run_server.py --shutdown-flush 10: a client reading a reply of 40 lines of 1 MB (more
    than its queue's 16 MiB) at about 10 MB/s when SIGTERM comes gets every line and its
    PONG, and the server exits 0 with nothing counted dropped. (Before, the reader waiting
    for room for the reply was stopped at the signal: 20 to 28 of 40 lines, an attacker's
    pass.) About 6 s."""
    proc = server_process("--shutdown-flush", "10")
    value = b"v" * 1_000_000
    loader = Peer(proc.port, timeout=30)
    assert loader.request(b"".join(b"PUT:big:" + value + b"\n" for _ in range(40))) == []
    loader.close()
    client = socket.create_connection(("127.0.0.1", proc.port), timeout=30)
    got = bytearray()
    try:
        client.sendall(b"GET:big\nPING\n")
        signalled = False
        while chunk := client.recv(1 << 20):
            got += chunk
            if not signalled and len(got) >= 3_000_000:  # (the rest is built as it leaves)
                proc.proc.send_signal(signal.SIGTERM)
                signalled = True
            gevent.sleep(len(chunk) / 10e6)  # (the client's pace, 10 MB/s: not a synchronisation)
    finally:
        client.close()
    assert proc.stop(None, timeout=30) == 0
    assert bytes(got) == b"big:" + b"\nbig:".join([value] * 40) + b"\nPONG\n"
    (stopped,) = [e for e in proc.events() if e["event"] == "server_stopped"]
    assert stopped["messages_dropped"] == 0, stopped


GOOD_BATCH = 300
"""GETs per batch of the reading client: a batch of 4 kB values is applied in one turn."""


def test_shutdown_flushes_a_reading_client_past_a_stuck_one_and_a_second_sigterm(server_process):
    """README: SIGTERM stops the server; it gives queued replies up to --shutdown-flush seconds
    to leave, closes every client and exits 0; another signal during the shutdown is ignored
    and logged once (shutdown_in_progress). Through run_server.py --shutdown-flush 1, with a
    client that never reads (a full queue of GET replies), one reading slowly (the flush
    lasts its full second: the second SIGTERM, 0.3 s after the first, comes during it), and
    one that pipelined megabytes of GETs without reading and reads from the first SIGTERM
    on: it gets every reply and its PONGs, then the end of the stream."""
    proc = server_process("--shutdown-flush", "1", "--queue-size", "100000")
    small, big = b"s" * 4000, b"b" * (512 << 10)
    monitor = Peer(proc.port)
    assert monitor.request(b"PUT:small:" + small + b"\nPUT:big:" + big + b"\n") == []
    sent = 3  # request lines from clients other than the monitor's STATS polls
    polls = 0

    def stats() -> dict[str, int]:
        nonlocal polls
        polls += 1
        return read_stats(monitor)

    def all_counted() -> bool:
        """Every request line sent so far has reached the server (each poll sends 2)."""
        return stats()["commands"] - 2 * polls >= sent

    stuck, slow, good = (reply_socket(proc.port) for _ in range(3))
    slow_got, good_got = bytearray(), bytearray()
    slow_reader = good_reader = None
    try:
        stuck.sendall(b"GET:big\n" * 100)  # 50 MB of replies, never read
        sent += 100
        wait_until(lambda: stats()["messages_dropped"] > 0, timeout=20, message="stuck queue not full")
        slow.sendall(b"GET:big\n" * 40)
        sent += 40
        slow_reader = gevent.spawn(read_to_end, slow, slow_got, 0.05)
        batch = b"GET:small\n" * GOOD_BATCH + b"PING\n"
        for _ in range(10):  # 12 MB: more than the kernel's buffers hold
            good.sendall(batch)
            sent += GOOD_BATCH + 1
            wait_until(all_counted, timeout=20, message="batch not applied")
        monitor.close()
        began = time.monotonic()
        proc.proc.send_signal(signal.SIGTERM)
        good_reader = gevent.spawn(read_to_end, good, good_got)
        gevent.sleep(0.3)  # (the second signal's timing, as the test asks)
        assert proc.proc.poll() is None, "the shutdown ended before the second SIGTERM"
        proc.proc.send_signal(signal.SIGTERM)
        status = proc.stop(None, timeout=10)
        stopped_after = time.monotonic() - began
        good_reader.join(timeout=10)
    finally:
        for reader in (slow_reader, good_reader):
            if reader is not None:
                reader.kill()
        for sock in (stuck, slow, good):
            sock.close()
    assert status == 0
    assert stopped_after < 6, stopped_after  # --shutdown-flush 1, and a margin
    assert good_reader.value is True, good_reader.exception  # it read to the end of the stream
    expected = (b"small:" + small + b"\n") * GOOD_BATCH + b"PONG\n"
    assert good_got == expected * 10, f"{len(good_got)} bytes of {len(expected) * 10}"
    events = proc.events()
    names = [event["event"] for event in events]
    assert names.count("shutdown_requested") == 1
    (second,) = [event for event in events if event["event"] == "shutdown_in_progress"]
    assert second["signal"] == "SIGTERM"
    assert names[-1] == "server_stopped"


# --- the README's Security section ----------------------------------------------------------


def tcp_listeners(port: int) -> list[str]:
    """The addresses a socket listens on at TCP ``port``, from the kernel's own tables
    (``/proc/net/tcp`` and ``tcp6``; state ``0A`` is LISTEN): ``127.0.0.1`` for IPv4, the hex
    of the address in brackets for IPv6."""
    found = []
    for table in ("tcp", "tcp6"):
        if not os.path.exists(f"/proc/net/{table}"):  # (IPv6 off)
            continue
        with open(f"/proc/net/{table}") as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                address, hex_port = fields[1].split(":")
                if int(hex_port, 16) == port and fields[3] == "0A":
                    ipv4 = table == "tcp"
                    found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]) if ipv4 else f"[{address}]")
    return found


def test_the_server_listens_on_loopback_unless_told_otherwise(tmp_path, log_stream):
    """README, Security: "The server binds `127.0.0.1` unless told otherwise." Real:
    run_server.py started as a user starts it, with no --host (and no KVGEVENT_HOST in its
    environment), and a KeyValueServer started in this process with no host; what listens on
    each port is read from the kernel's own tables (/proc/net/tcp and tcp6): one socket, on
    127.0.0.1; none on any other address nor on IPv6. The server serves there, its
    server_started event names 127.0.0.1 and it logs no unprotected_bind. Nothing is
    injected. Under a second (0.5-0.7 s)."""
    from kvgevent import KeyValueServer

    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "KVGEVENT_HOST"}
    log = tmp_path / "server.log"
    args = [sys.executable, str(ROOT / "run_server.py"), "--port", str(port), "--log-format", "json"]
    with open(log, "wb") as stderr:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        wait_until(
            lambda: b'"server_started"' in log.read_bytes() or proc.poll() is not None,
            timeout=15,
            message="run_server.py did not start",
        )
        assert tcp_listeners(port) == ["127.0.0.1"], log.read_text()
        peer = Peer(port)
        assert peer.request(b"PUT:k:v\nGET:k\n") == [b"k:v"]
        peer.close()
    finally:
        proc.terminate()  # (by pid)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["host"] for e in events if e["event"] == "server_started"] == ["127.0.0.1"]
    assert "unprotected_bind" not in [e["event"] for e in events]
    server = KeyValueServer()  # the library: start() with no host
    server.start(0)
    try:
        assert tcp_listeners(server.port) == ["127.0.0.1"]
    finally:
        server.close()


def readme_tls_recipe() -> list[list[str]]:
    """The commands of the README's TLS recipe (the ``sh`` block of "### Security"), each as
    its words."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Security") :]
    block = section[section.index("```sh\n") + len("```sh\n") :]
    block = block[: block.index("```")]
    commands = []
    for line in block.replace("\\\n", " ").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            commands.append(shlex.split(line))
    return commands


def split_command(words: list[str], script: str) -> tuple[dict[str, str], list[str]]:
    """``VAR=value ... python SCRIPT ARGS``: the environment it sets and ARGS."""
    at = words.index(script)
    assert words[at - 1] == "python", words
    env = dict(word.split("=", 1) for word in words[: at - 1])
    return env, words[at + 1 :]


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the README's recipe needs the openssl command")
def test_the_readmes_tls_recipe_works_as_written(tmp_path, server_process):
    """README, Security: "`--tls-cert` / `--tls-key`: every client speaks TLS 1.2+", and its
    recipe: a self-signed certificate made by ``openssl req -x509 ...`` ("it is its own CA"),
    ``KVGEVENT_PASSWORD=s3cret python run_server.py --tls-cert server.pem --tls-key
    server-key.pem`` and ``KVGEVENT_PASSWORD=s3cret python run_client.py --tls-ca server.pem
    get fruit``. Real: the three commands are read from the README's block and run as written
    (the real openssl, run_server.py and run_client.py in subprocesses, in a fresh directory),
    only with a free loopback port (``--host 127.0.0.1 --port N``) added. The key in a file
    of its own (--tls-key) is a path no other test takes: theirs hold the key and the chain
    in one file. The client without the password gets ``ERR auth required`` (exit 1), and a
    plain-TCP client is one ``client_dropped`` event with ``reason: tls_handshake_failed``.
    Nothing is injected. About 1.5 s."""
    make_cert, start_server, run_get = readme_tls_recipe()
    assert make_cert[:3] == ["openssl", "req", "-x509"], make_cert
    made = subprocess.run(make_cert, cwd=tmp_path, capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr[-1000:]
    server_env, server_args = split_command(start_server, "run_server.py")
    client_env, client_args = split_command(run_get, "run_client.py")
    assert server_args[:2] == ["--tls-cert", "server.pem"] and "--tls-key" in server_args, server_args
    proc = server_process(*server_args, env=server_env, cwd=tmp_path)

    def run_client(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
        command = [sys.executable, str(ROOT / "run_client.py"), "--port", str(proc.port), *args]
        inherited = {name: value for name, value in os.environ.items() if name != "KVGEVENT_PASSWORD"}
        return subprocess.run(
            command, cwd=tmp_path, capture_output=True, timeout=30, env={**inherited, **env}
        )

    put = run_client([*client_args[:-2], "put", "fruit", "apple"], client_env)
    assert (put.returncode, put.stderr) == (0, b""), put.stderr
    got = run_client(client_args, client_env)  # the README's line as written
    assert (got.returncode, got.stdout, got.stderr) == (0, b"apple\n", b"")
    refused = run_client(client_args, {})  # (and KVGEVENT_PASSWORD unset: see run_client)
    assert (refused.returncode, refused.stdout) == (1, b""), refused.stderr
    assert b"ERR auth required" in refused.stderr
    plain = socket.create_connection(("127.0.0.1", proc.port), timeout=10)
    plain.sendall(b"PING\n")
    while plain.recv(100):  # a TLS alert at most, then the end of the stream
        pass
    plain.close()
    wait_until(
        lambda: b'"tls_handshake_failed"' in proc.stderr, timeout=10, message="no handshake failure logged"
    )
    assert proc.stop() == 0
    drops = [e for e in proc.events() if e["event"] == "client_dropped" and e["reason"].startswith("tls_")]
    assert [e["reason"] for e in drops] == ["tls_handshake_failed"] and drops[0]["error"], drops
    assert b"Traceback" not in proc.stderr
