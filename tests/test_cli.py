"""The programs as a user runs them: run_server.py (flags, JSON logs, signals, exit
statuses) and run_client.py, each in a subprocess on a free loopback port."""

import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, Peer, wait_until

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
