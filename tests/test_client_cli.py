"""run_client.py as a user runs it: one-shot commands and exit statuses, raw output when
piped, requests from stdin, --pipe, --stat, --latency, and the REPL on a pseudo-terminal."""

import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import time
from typing import Any

import gevent.event
import pytest
from conftest import ROOT, Peer, Terminal, answer, free_port, wait_until
from test_client import endless_value

from kvgevent.client import Client
from kvgevent.client.commands import escape
from kvgevent.errors import ConnectionLost


def client(port: int, *args: str, stdin: bytes = b"", env: dict | None = None, timeout: float = 60):
    return subprocess.run(
        [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def port(server_process):
    return server_process().port


# --- one-shot commands -------------------------------------------------------------------------


def test_a_password_that_is_not_utf8_works_from_the_command_line_and_the_environment(server_process):
    """The server takes a password's bytes as given, bytes that are not UTF-8 too; the client
    failed on those with a UnicodeEncodeError traceback (exit 1), from --password and from
    KVGEVENT_PASSWORD alike (an auditor's runs, 2/2 each)."""
    password = os.fsdecode(b"\xffpw")  # (as Python gives such bytes of argv and environ)
    proc = server_process("--password", password)
    for args, env in ((["--password", password], None), ([], {"KVGEVENT_PASSWORD": password})):
        result = client(proc.port, *args, "put", "k", "v", env=env)
        assert (result.returncode, result.stderr) == (0, b"")
    result = client(proc.port, "--password", os.fsdecode(b"\xfepw"), "get", "k")
    assert (result.returncode, result.stdout) == (1, b"")
    # The bench's connections too (its workers encoded it as UTF-8: a traceback, exit 1).
    reports = bench_json(proc.port, "bench", "--password", password, "-t", "put,ping")
    assert [(r["errors"], r["failed_connections"]) for r in reports] == [(0, 0), (0, 0)]


@pytest.mark.parametrize(
    "mode", [["ping"], ["stats"], ["--pipe"], ["bench", "-n", "10", "-c", "1", "-t", "ping"]]
)
def test_an_output_that_cannot_be_written_is_not_the_servers_fault(port, mode):
    """Stdout on a full disk (/dev/full: ENOSPC on every write) gave a bare "[Errno 28]" and
    exit 3, which says the server cannot be reached (9 of 9 modes, an attacker's pass): now
    one line naming the output, and exit 1."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), *mode],
            input=b"PUT:a:b\n",
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 1, result.stderr
    assert result.stderr.endswith(b"cannot write the output: No space left on device\n"), result.stderr
    assert result.stderr.count(b"\n") == 1, result.stderr


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "a..b"])
@pytest.mark.parametrize("mode", [["ping"], ["bench", "-n", "1"], ["--stat"]])
def test_a_host_the_resolver_cannot_encode_is_one_line_and_exit_3(host, mode):
    """A --host whose name IDNA refuses (a label over 63 bytes, an empty label) made the
    resolver raise UnicodeError, not OSError: two chained tracebacks and exit 1, in every
    mode (13 of 13, an attacker's runs). Now it is a connection that cannot be made."""
    result = client(free_port(), "--host", host, "--timeout", "2", *mode)
    assert result.returncode == 3, result
    assert result.stderr.count(b"\n") == 1 and b"Traceback" not in result.stderr, result.stderr
    assert b"not a host name" in result.stderr, result.stderr


@pytest.mark.parametrize("mode", [["ping"], ["bench", "-n", "1"]])
def test_a_tls_ca_that_cannot_be_used_is_a_usage_error_naming_it(tmp_path, mode):
    """--tls-ca naming no file, or a file with no certificate: a usage error (exit 2) that
    names the file. Before: "[Errno 2] No such file or directory" without the path, or
    OpenSSL's "[X509: NO_CERTIFICATE_OR_CRL_FOUND] ... (_ssl.c:4154)", and exit 3, which
    says the server could not be reached (no server is needed to tell)."""
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"")
    for path, why in ((tmp_path / "absent.pem", b"No such file"), (empty, b"no CA certificate")):
        result = client(free_port(), "--tls-ca", str(path), *mode)
        assert result.returncode == 2, result
        assert b"--tls-ca " + str(path).encode() + b": " + why in result.stderr, result.stderr


def test_one_shot_commands_and_raw_output(port):
    """put/get/update/delete as words; piped output is one value per line and nothing else."""
    assert client(port, "put", "fruit", "apple").returncode == 0
    assert client(port, "put", "fruit", "pear tree:ripe").returncode == 0
    result = client(port, "get", "fruit")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"apple\npear tree:ripe\n", b"")
    assert client(port, "update", "fruit", "apple", "fig").returncode == 0
    assert client(port, "get", "fruit").stdout == b"pear tree:ripe\nfig\n"
    assert client(port, "delete", "fruit").returncode == 0
    assert client(port, "get", "fruit").stdout == b""


def test_one_shot_ping_and_stats(port):
    assert client(port, "ping").stdout == b"PONG\n"
    lines = client(port, "stats").stdout.decode().splitlines()
    stats = dict(line.split("=") for line in lines)
    assert {"active", "dropped", "messages_dropped", "keys", "commands", "uptime_s"} <= set(stats)


def test_formatted_output_for_people(port):
    """On a terminal (forced here with --no-raw) values are numbered and quoted, and a key
    with no values shows (empty)."""
    client(port, "put", "k", "a\x01b")
    result = client(port, "--no-raw", "get", "k")
    assert result.stdout == b'1) "a\\x01b"\n'
    assert client(port, "--no-raw", "get", "nothing").stdout == b"(empty)\n"
    assert client(port, "--no-raw", "put", "k", "v").stdout == b"OK\n"


def test_exit_status_on_server_err(port):
    """ERR from the server: exit 1 and a one-line message on stderr."""
    result = client(port, "PUT:k")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["(error) ERR wrong number of fields for PUT"]


def test_exit_status_on_bad_usage():
    for args in (["get"], ["put", "k"], ["frobnicate", "k"], ["put", "a:b", "v"]):
        result = client(free_port(), *args)
        assert result.returncode == 2, args
        assert b"run_client.py: error:" in result.stderr


def test_exit_status_when_the_server_is_unreachable():
    result = client(free_port(), "get", "k")
    assert result.returncode == 3
    assert len(result.stderr.decode().splitlines()) == 1
    assert "cannot connect" in result.stderr.decode()


def test_host_and_port_from_the_environment(port):
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_client.py"), "ping"],
        capture_output=True,
        timeout=30,
        cwd=ROOT,
        env={**os.environ, "KVGEVENT_HOST": "127.0.0.1", "KVGEVENT_PORT": str(port)},
    )
    assert (result.returncode, result.stdout) == (0, b"PONG\n")


def test_requests_from_stdin_mix_words_and_protocol_lines(port):
    result = client(port, stdin=b"put k v1\nPUT:k:v2\nget k\nGET:k\n\nbogus\n")
    assert result.stdout == b"v1\nv2\nk:v1\nk:v2\n"
    assert result.returncode == 1
    assert b"unknown command 'bogus'" in result.stderr


def test_an_unknown_word_is_shown_escaped(port):
    """A word from stdin that holds control bytes or is not UTF-8 is named escaped in the
    error, as everything from the server is: it reached the terminal raw (an attacker's
    pass: an ESC sequence in the message)."""
    result = client(port, stdin=b"\xff\x1b[2Jbogus k\n")
    assert result.returncode == 1
    assert b"unknown command '\\xff\\x1b[2Jbogus'" in result.stderr
    assert b"\x1b" not in result.stderr


@pytest.mark.parametrize("word", ["help", "HELP"])
def test_help_as_a_command_lists_the_commands(word):
    """``run_client.py help`` shows the commands, as ``help`` does in the REPL, and sends
    nothing (no server is needed); it said "unknown command 'help' (try: help)", exit 2."""
    result = client(free_port(), word)
    assert result.returncode == 0, result.stderr
    assert b"put KEY VALUE" in result.stdout and b"UPDATE:key:old:new" in result.stdout
    assert result.stderr == b""


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize(
    ("script", "args"), [("run_client.py", []), ("run_client.py", ["bench"]), ("run_server.py", [])]
)
def test_a_help_that_cannot_be_written_is_an_error(script, args):
    """``--help > /dev/full`` (a full disk): exit 1 and one line on stderr. argparse drops a
    write's error: it exited 0 having written nothing."""
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [sys.executable, str(ROOT / script), *args, "--help"],
            stdout=full,
            stderr=subprocess.PIPE,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert result.stderr.endswith(b": cannot write the help: No space left on device\n"), result.stderr


INTERRUPT_AT_IMPORT = """
import os, signal, sys

class Interrupt:
    def find_spec(self, name, path=None, target=None):
        if name == "kvgevent.client.cli":
            os.kill(os.getpid(), signal.SIGINT)  # a Ctrl-C while the client imports
        return None

sys.meta_path.insert(0, Interrupt())
"""


@pytest.mark.parametrize(
    "command", [[str(ROOT / "run_client.py")], ["-c", "from kvgevent.client.entry import main; main()"]]
)
def test_ctrl_c_while_the_client_starts_is_not_a_traceback(tmp_path, command):
    """A Ctrl-C in the tenth of a second the client takes to import (a ``sitecustomize``
    sends the real SIGINT as ``kvgevent.client.cli`` is imported) ends it as the signal's
    default does, as a shell shows it (130), with nothing on stderr; it was a
    KeyboardInterrupt traceback and exit 1. run_client.py and the installed command alike."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, *command, "--port", str(free_port()), "ping"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert (result.returncode, result.stderr) == (-signal.SIGINT, b"")


def test_a_client_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    """Started with SIGINT ignored (a shell's background job, ``trap '' INT``), the client
    goes on through a SIGINT at its import and ends as its command does (exit 3 here: no
    server): the start-up's default handler is only put in place of Python's own (a
    reviewer's pass: it was put in place of an ignored one, and the signal killed it)."""
    (tmp_path / "sitecustomize.py").write_text(INTERRUPT_AT_IMPORT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    result = subprocess.run(
        [sys.executable, str(ROOT / "run_client.py"), "--port", str(free_port()), "ping"],
        capture_output=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert result.returncode == 3 and b"cannot connect" in result.stderr, result


# --- --pipe, --stat, --latency ---------------------------------------------------------------


def test_pipe_mass_inserts_100000_lines(port):
    """--pipe sends 100,000 protocol lines and reports them; every value is stored."""
    lines = b"".join(b"PUT:bulk%d:%d\n" % (i % 100, i) for i in range(100_000))
    result = client(port, "--pipe", stdin=lines)
    assert result.returncode == 0, result.stderr
    summary = result.stdout.decode()
    assert "sent 100000 commands" in summary and "0 errors" in summary
    peer = Peer(port)
    assert peer.request(b"GET:bulk7\n") == [b"bulk7:%d" % i for i in range(7, 100_000, 100)]
    peer.close()


def test_pipe_counts_errors_and_survives_user_pings(port):
    result = client(port, "--pipe", stdin=b"PUT:a:1\nBOGUS\nPING\nGET:a\nPUT:b:")
    assert result.returncode == 1
    assert "sent 5 commands" in result.stdout.decode() and "1 errors" in result.stdout.decode()
    assert b"ERR unknown command" in result.stderr
    assert client(port, "get", "b").stdout == b"\n"  # the unterminated last line was sent too


def pipe_replies(sent: bytes, replies: bytes) -> tuple[int, int]:
    """Feed --pipe's reply checker ``replies`` for a pipe that sent ``sent`` in one chunk:
    (reply lines, errors) counted, or ConnectionLost for a line it cannot be answered with."""
    from kvgevent.client.tools import PipeSummary, _PipeInput, _PipeReplies

    source = _PipeInput(io.BytesIO(sent), PipeSummary(), None)
    while source.read() is not None:
        pass
    checker = _PipeReplies(source)
    checker.feed(replies.splitlines())
    assert checker.complete()
    return source.summary.replies, source.summary.errors


def test_pipe_checks_each_reply_against_what_was_sent():
    """A reply line is taken only if a line sent can be answered with it (values of a key
    GET read, in any case of the verb and with a \\r; a STATS line for a STATS, OK for an
    AUTH, a PONG for each PING); an ERR may answer any line. Anything else (here a value for a
    PUT, or an OK, a STATS line or a PONG nobody asked for) is ConnectionLost: the replies no
    longer match the commands."""
    sent = b"PUT:k:v\nget:k\r\nGeT:other\nPING\nSTATS\nAUTH:pw\nBOGUS\n"
    good = b"k:v\nk:w\nother:x\nPONG\nactive=1 dropped=0\nOK\nERR unknown command\nPONG\n"
    assert pipe_replies(sent, good) == (5, 1)
    assert pipe_replies(b"PUT:k:v\n", b"ERR x\nPONG\n") == (0, 1)
    for line in (b"k:v", b"OK", b"active=1", b"garbage", b"PONG"):
        with pytest.raises(ConnectionLost, match="unexpected reply from the server to --pipe"):
            pipe_replies(b"PUT:k:v\nPUT:a:b\n", line + b"\nPONG\n")
    with pytest.raises(ConnectionLost):  # a second STATS line for one STATS
        pipe_replies(b"STATS\n", b"active=1\nactive=1\nPONG\n")
    with pytest.raises(ConnectionLost):  # a value of a key read by a later chunk only
        pipe_replies(b"GET:a\n", b"b:1\nPONG\n")


def test_pipe_ends_with_status_3_when_a_server_answers_a_put_with_a_value(fake_server):
    """A server (a loopback fake here) that answers a PUT with a value line: --pipe says so in
    one line on stderr and exits 3, as the library does for a reply that cannot be."""
    result = client(
        fake_server(answer(b"k:surprise\nPONG\n")), "--timeout", "10", "--pipe", stdin=b"PUT:k:v\n"
    )
    assert result.returncode == 3
    assert result.stderr.decode().splitlines() == [
        "run_client.py: unexpected reply from the server to --pipe: b'k:surprise'"
    ]


@pytest.mark.parametrize("how", ["argument", "stdin"])
def test_a_protocol_line_answered_with_a_line_it_cannot_have_is_status_3(fake_server, how):
    """README, "A server that misbehaves": a value for a PUT is exit 3 and one line on
    stderr, for a protocol line as for words. (Before: the value was printed, exit 0.)"""
    port = fake_server(answer(b"k:garbage\nPONG\n"))
    result = client(port, "PUT:k:v") if how == "argument" else client(port, stdin=b"PUT:k:v\n")
    assert (result.returncode, result.stdout) == (3, b"")
    assert result.stderr.decode().splitlines() == [
        "run_client.py: unexpected reply from the server to PUT: b'k:garbage'"
    ]


def test_the_bench_shows_a_refused_auths_reason_escaped(fake_server):
    """An AUTH refused with control bytes in its reason (a server that would retitle the
    terminal and clear it): the bench's one line on stderr has them escaped, as every other
    mode's. (Before, they reached the terminal as they came.)"""
    port = fake_server(answer(b"ERR no\x1b]0;pwned\x07\x1b[2J\nPONG\n"))
    result = client(port, "--password", "x", "bench", "-n", "10", "-c", "1")
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["run_client.py bench: ERR no\\x1b]0;pwned\\x07\\x1b[2J"]


def test_stat_prints_a_line_per_interval(port):
    result = client(port, "--stat", "--interval", "0.1", "--count", "3")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0
    assert lines[0].split()[:3] == ["time", "active", "dropped"]
    assert len(lines) == 4
    assert lines[1].split()[1] == "1"  # the --stat client itself


def test_latency_prints_round_trip_statistics(port):
    result = client(port, "--latency", "--interval", "0.2", "--count", "2")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0 and len(lines) == 2
    assert all(line.startswith("latency ms: min ") and "p99" in line for line in lines)


# --- the REPL ------------------------------------------------------------------------------


def repl(port: int, tmp_path) -> Terminal:
    env = {"HOME": str(tmp_path), "KVGEVENT_HISTFILE": str(tmp_path / "history")}
    return Terminal([sys.executable, str(ROOT / "run_client.py"), "--port", str(port)], env=env)


def type_at_prompt(term: Terminal, keys: bytes, prompt: bytes = b"> ") -> None:
    """Wait for the prompt (readline is then reading keys in raw mode), then type."""
    term.expect(prompt)
    term.send(keys)


def test_repl_runs_words_and_protocol_lines(port, tmp_path):
    term = repl(port, tmp_path)
    try:
        for keys, shown in [
            (b"put fruit 'green apple'\r", b"OK"),
            (b"get fruit\r", b'1) "green apple"'),
            (b"get nothing\r", b"(empty)"),
            (b"GET:fruit\r", b"fruit:green apple"),
            (b"PUT:k\r", b"(error) ERR wrong number of fields for PUT"),
            (b"get\r", b"(error) usage: get KEY"),
            (b"help\r", b"Commands"),
        ]:
            type_at_prompt(term, keys, f"127.0.0.1:{port}> ".encode())
            term.expect(shown)
        type_at_prompt(term, b"quit\r")
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.close()


def test_repl_history_is_recalled_and_persisted(port, tmp_path):
    """Up-arrow recalls the previous line, and the history survives a restart."""
    term = repl(port, tmp_path)
    try:
        type_at_prompt(term, b"put h remembered\r")
        term.expect(b"OK")
        type_at_prompt(term, b"get h\r")
        term.expect(b'1) "remembered"')
        type_at_prompt(term, b"\x1b[A\r")  # up arrow: 'get h' again
        term.expect(b'1) "remembered"')
        type_at_prompt(term, b"\x04")  # Ctrl-D
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.close()
    assert "put h remembered" in (tmp_path / "history").read_text()
    again = repl(port, tmp_path)
    try:
        type_at_prompt(again, b"\x1b[A\r")  # the last line of the previous session: 'get h'
        again.expect(b'1) "remembered"')
    finally:
        again.close()


def test_repl_keeps_no_auth_in_its_history(server_process, tmp_path):
    """AUTH typed at the prompt (as words or a protocol line) goes to no history, as in
    redis-cli: the history file outlives the session. (Before, the password was written to
    ~/.kvgevent_history.)"""
    proc = server_process("--password", "s3cret")
    term = repl(proc.port, tmp_path)
    try:
        for keys, shown in [(b"auth s3cret\r", b"OK"), (b"AUTH:s3cret\r", b"OK"), (b"get k\r", b"(empty)")]:
            type_at_prompt(term, keys, f"127.0.0.1:{proc.port}> ".encode())
            term.expect(shown)
        type_at_prompt(term, b"\x1b[A\x1b[A\r")  # up twice: before 'get k' there is nothing
        term.expect(b"(empty)")
        type_at_prompt(term, b"\x04")
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.close()
    history = (tmp_path / "history").read_text()
    assert "get k" in history and "s3cret" not in history


def test_repl_reports_a_lost_connection_and_reconnects(server_process, tmp_path):
    first = server_process()
    term = repl(first.port, tmp_path)
    try:
        type_at_prompt(term, b"ping\r")
        term.expect(b"PONG")
        assert first.stop() == 0
        type_at_prompt(term, b"ping\r")
        term.expect(b"(error) connection lost")
        server_process(port=first.port)
        type_at_prompt(term, b"ping\r", b"(not connected)> ")
        term.expect(b"PONG")
        term.expect(f"127.0.0.1:{first.port}> ".encode())
    finally:
        term.close()


def test_a_command_after_an_idle_timeout_is_sent_once_on_a_new_connection(server_process, tmp_path):
    """README, the REPL: a connection the server closed while the prompt waited (its
    --idle-timeout) is found before the next command is sent (Client: NotSent, a
    ConnectionLost), so the REPL reconnects and sends it, once, saying so. (Before, it said
    "the last command may or may not have been applied" and did not send it: a user left
    unsure whether to type a PUT again, which appends, an attacker's pass.) Real: run_server.py
    --idle-timeout 1, the REPL in a pty; the server's idle_closed is waited for."""
    proc = server_process("--idle-timeout", "1")
    term = repl(proc.port, tmp_path)
    try:
        type_at_prompt(term, b"put idle v1\r")
        term.expect(b"OK")
        with Client(port=proc.port, timeout=5) as kv:
            wait_until(lambda: kv.stats()["idle_closed"] >= 1, timeout=20, message="not closed for idleness")
        type_at_prompt(term, b"put idle v2\r")
        term.expect(b"reconnected; the command had not been sent: sending it now")
        term.expect(b"OK")
        type_at_prompt(term, b"get idle\r")
        term.expect(b'2) "v2"')
        with Client(port=proc.port, timeout=5) as kv:
            assert kv.get("idle") == [b"v1", b"v2"]
    finally:
        term.close()


def test_escape_shows_every_byte_unambiguously():
    assert escape(b"plain text") == '"plain text"'
    assert escape(b'q"b\\s') == '"q\\"b\\\\s"'
    assert escape(b"\x00\r\xff\xc3\xa9") == '"\\x00\\r\\xffé"'


def test_bench_reports_every_test_as_json(port):
    """run_client.py bench runs each test to completion without errors and cleans up."""
    result = client(
        port,
        "bench",
        "--port",
        str(port),
        "-c",
        "4",
        "-P",
        "8",
        "-n",
        "2000",
        "--keys",
        "50",
        "-t",
        "put,get,update,delete,ping",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["test"] for r in reports] == ["put", "get", "update", "delete", "ping"]
    for report in reports:
        assert report["requests"] == 2000 and report["errors"] == 0 and report["failed_connections"] == 0
        assert report["ops_s"] > 0 and 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]
    assert client(port, "stats").stdout.count(b"keys=0") == 1


def test_a_bench_over_the_servers_max_line_says_why(server_process):
    """Values longer than the server's --max-line: the preload's refusal is named (exit 1),
    where GET reported "0 ERR replies, 2 failed connections" after --timeout; a write test
    counts every ERR (8 or 9 of 10 were counted: an ERR and its batch's PONG in two reads, the
    PONG was taken for the next batch's reply). The keys are deleted either way."""
    port = server_process().port  # (--max-line 1 MiB: the ERR comes before the line's end)
    common = ["bench", "--port", str(port), "-c", "2", "-n", "40", "--keys", "5", "-d", "2000000", "--json"]
    result = client(port, *common, "-t", "get", "--timeout", "10")
    assert result.returncode == 1
    assert result.stderr == b"run_client.py bench: the server refused the preload: ERR line too long\n"
    result = client(port, *common, "-t", "put,delete")
    assert result.returncode == 1, result.stderr
    put, delete = (json.loads(line) for line in result.stdout.splitlines())
    assert (put["requests"], put["errors"], put["failed_connections"]) == (40, 40, 0)
    assert (delete["errors"], delete["failed_connections"]) == (0, 0)
    assert client(port, "stats").stdout.count(b"keys=0") == 1


def test_bench_in_several_processes(port):
    result = client(
        port, "bench", "--port", str(port), "-c", "4", "-n", "400", "-t", "get", "--processes", "2"
    )
    assert result.returncode == 0, result.stderr
    assert b"400 requests completed" in result.stdout and b"2 bench process(es)" in result.stdout


# --- issue 12: what the server sends is read by the protocol's rule and shown safely ---------


def test_a_key_that_starts_with_err_is_a_value_in_every_mode(port, tmp_path):
    """'ERR x' is a legal key: its values are values in one-shot, protocol-line, stdin,
    --pipe and REPL modes (exit 0, nothing on stderr); a real ERR still counts."""
    assert client(port, "put", "ERR x", "hello").returncode == 0
    result = client(port, "get", "ERR x")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello\n", b"")
    result = client(port, "GET:ERR x")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"ERR x:hello\n", b"")
    result = client(port, stdin=b"get 'ERR x'\nGET:ERR x\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, b"hello\nERR x:hello\n", b"")
    result = client(port, "--pipe", stdin=b"GET:ERR x\nGET:ERR x\nBOGUS\n")
    assert result.returncode == 1
    assert "1 errors, 2 reply lines" in result.stdout.decode()
    assert result.stderr.decode().splitlines() == ["(error) ERR unknown command"]
    term = repl(port, tmp_path)
    try:
        type_at_prompt(term, b"get 'ERR x'\r")
        term.expect(b'1) "hello"')
        type_at_prompt(term, b"GET:ERR x\r")
        term.expect(b"ERR x:hello\r\n")
        type_at_prompt(term, b"quit\r")
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.close()
    assert b"(error)" not in term.output


def test_bench_counts_only_err_status_lines():
    """The bench counts ERR lines as the client library does: not a value line that starts
    with 'ERR ', not an unfinished line."""
    from kvgevent.client.bench import count_errors

    assert count_errors(b"ERR x:v\nk:ERR y\nERR unknown command\nPONG\nERR unfinished") == 1
    assert count_errors(b"k:v\nPONG\n") == 0


@pytest.mark.parametrize("stdin_kind", ["pipe", "file"])
def test_pipe_gives_up_on_a_server_that_stopped(server_process, tmp_path, stdin_kind):
    """run_server.py stopped with SIGSTOP takes no more bytes once the kernel's buffers are
    full: --pipe with 32 MB of input (from a pipe, and from a regular file) gives up after
    --timeout 3 s without progress, exits 3 and says so in one line."""
    proc = server_process()
    data = b"".join(b"PUT:k:%0100d\n" % i for i in range(300_000))
    source = tmp_path / "input"
    source.write_bytes(data)
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        begin = time.monotonic()
        with open(source, "rb") as stdin:
            given = {"stdin": stdin} if stdin_kind == "file" else {"input": data}
            result = subprocess.run(
                [
                    sys.executable,
                    str(ROOT / "run_client.py"),
                    "--port",
                    str(proc.port),
                    "--timeout",
                    "3",
                    "--pipe",
                ],
                capture_output=True,
                timeout=50,
                cwd=ROOT,
                **given,
            )
        elapsed = time.monotonic() - begin
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode().splitlines() == [
        "run_client.py: timed out: nothing sent or received for 3 s"
    ]
    assert elapsed < 30


def pipe_from(port: int, stdin: Any) -> subprocess.CompletedProcess:
    """``run_client.py --pipe`` with ``stdin`` (an open file) as its standard input."""
    command = [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), "--pipe"]
    return subprocess.run(command, stdin=stdin, capture_output=True, timeout=60, cwd=ROOT)


def test_pipe_from_a_file_whose_only_line_is_longer_than_a_chunk(port, tmp_path):
    """A regular file is read without waiting: a 2 MiB unterminated line (two reads, the
    first with no newline) is still sent, answered ERR line too long, and --pipe ends."""
    source = tmp_path / "input"
    source.write_bytes(b"PUT:long:" + b"a" * (2 << 20))
    with open(source, "rb") as stdin:
        result = pipe_from(port, stdin)
    assert result.returncode == 1
    assert "sent 1 commands" in result.stdout.decode() and "1 errors" in result.stdout.decode()
    assert result.stderr == b"(error) ERR line too long\n"


def test_pipe_and_one_shot_over_tls(server_process, certs):
    """--pipe over TLS reads 20 MB of replies while it writes; one-shot commands too."""
    proc = server_process("--tls-cert", str(certs.server_pem))
    tls = ("--tls-ca", str(certs.ca_pem))
    assert client(proc.port, *tls, "put", "big", "x" * 1000).returncode == 0
    lines = b"GET:big\n" * 20_000 + b"".join(b"PUT:n:%d\n" % i for i in range(100_000))
    result = client(proc.port, *tls, "--pipe", stdin=lines)
    assert result.returncode == 0, result.stderr
    assert (
        "sent 120000 commands" in result.stdout.decode()
        and "0 errors, 20000 reply lines" in result.stdout.decode()
    )
    result = client(proc.port, *tls, "get", "n")
    assert result.stdout == b"".join(b"%d\n" % i for i in range(100_000))


def test_protocol_lines_are_sent_exactly_as_typed(port, tmp_path):
    """Only the line ending (\\n or \\r\\n) is taken off a protocol line: trailing spaces and
    tabs, a \\r inside, bytes that are not UTF-8 and leading spaces all reach the server."""
    assert client(port, "PUT:k:two trailing spaces  ").returncode == 0
    stdin = b"PUT:k:tab\t\nPUT:k:crlf ending \r\nPUT:k:cr\rinside\nPUT:k:\xff not utf-8 \n"
    assert client(port, stdin=stdin).returncode == 0
    result = client(port, " PUT:k:leading space")
    assert result.returncode == 1 and result.stderr == b"(error) ERR unknown command\n"
    term = repl(port, tmp_path)
    try:
        type_at_prompt(term, b"PUT:k:typed at the prompt \t \r")
        term.expect(b"(no reply)")
    finally:
        term.close()
    peer = Peer(port)
    assert peer.request(b"GET:k\n") == [
        b"k:two trailing spaces  ",
        b"k:tab\t",
        b"k:crlf ending ",
        b"k:cr\rinside",
        b"k:\xff not utf-8 ",
        b"k:typed at the prompt \t ",
    ]
    peer.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--latency", "--interval", "0"],
        ["--stat", "--interval", "0"],
        ["--latency", "--interval", "-1"],
        ["--latency", "--interval", "nan"],
        ["--latency", "--interval", "inf"],
        ["--stat", "--count", "0"],
        ["--timeout", "-1", "ping"],
        ["--timeout", "nan", "ping"],
        ["--timeout", "inf", "ping"],
        ["bench", "-c", "0"],
        ["bench", "-n", "0"],
        ["bench", "-P", "-1"],
    ],
)
def test_numbers_that_make_no_sense_are_usage_errors(args):
    """A non-positive (or not finite) interval, count, timeout or bench size: exit 2 with a
    usage message, never a traceback."""
    result = client(free_port(), *args)
    assert result.returncode == 2, result.stderr
    assert b"error: argument" in result.stderr and b"Traceback" not in result.stderr


def test_a_bad_timeout_in_the_environment_is_a_usage_error():
    result = client(free_port(), "ping", env={"KVGEVENT_TIMEOUT": "-1"})
    assert result.returncode == 2 and b"invalid value in KVGEVENT_TIMEOUT" in result.stderr


def test_latency_with_a_tiny_interval_still_measures(port):
    """An interval shorter than a round trip: each line still has one sample (it crashed
    with an IndexError when a line had none)."""
    result = client(port, "--latency", "--interval", "0.000001", "--count", "2")
    lines = result.stdout.decode().splitlines()
    assert result.returncode == 0, result.stderr
    assert len(lines) == 2 and all(line.endswith("(1 samples)") for line in lines)


@pytest.mark.parametrize(
    "args",
    [
        ["--pip"],
        ["--stat", "--int", "1"],
        ["--time", "1", "ping"],
        ["--no-r", "ping"],
        ["bench", "--proc", "2"],
        ["bench", "--key", "5"],
    ],
)
def test_abbreviated_options_are_refused(args):
    """'--pip' is not taken for --pipe (nor '--proc' for bench's --processes): a usage error."""
    result = client(free_port(), *args)
    assert result.returncode == 2, result.stderr
    assert b"unrecognized arguments" in result.stderr


STORED_ATTACK = b"\x1b]0;pwned\x07\x1b[2J\xc2\x9bend"
"""A value that would retitle the window, clear the screen and start a CSI if printed raw."""


def test_repl_shows_control_bytes_escaped_in_both_modes(port, tmp_path):
    """A stored value with ESC/OSC sequences reaches the terminal escaped, from a protocol
    line (unquoted, as the server sent it) as from a word command (quoted)."""
    peer = Peer(port)
    peer.request(b"PUT:bin:" + STORED_ATTACK + b"\n")
    peer.close()
    term = repl(port, tmp_path)
    try:
        type_at_prompt(term, b"GET:bin\r")
        term.expect(b"bin:\\x1b]0;pwned\\x07\\x1b[2J\\x9bend\r\n")
        type_at_prompt(term, b"get bin\r")
        term.expect(b'1) "\\x1b]0;pwned\\x07\\x1b[2J\\x9bend"')
        type_at_prompt(term, b"quit\r")
        assert term.proc.wait(timeout=10) == 0
    finally:
        term.close()
    for raw in (b"\x1b]0;pwned", b"\x1b[2J", b"\xc2\x9b"):
        assert raw not in term.output


def test_protocol_line_output_is_escaped_on_a_terminal_and_raw_when_piped(port):
    """One-shot protocol lines: formatted output (a terminal) escapes, raw output (a pipe)
    is the server's bytes, for tools."""
    peer = Peer(port)
    peer.request(b"PUT:bin:" + STORED_ATTACK + b"\n")
    peer.close()
    assert client(port, "--no-raw", "GET:bin").stdout == b"bin:\\x1b]0;pwned\\x07\\x1b[2J\\x9bend\n"
    assert client(port, "GET:bin").stdout == b"bin:" + STORED_ATTACK + b"\n"


# --- README promises: --help lists everything; time limits ------------------------------------


def test_help_lists_every_client_option_with_its_default_and_environment_name(monkeypatch):
    """README: "python run_client.py --help shows everything". Every option of the client's
    parser (and its COMMAND) is in the help with its help text, its default and its
    KVGEVENT_* name when it has one: a flag added without them fails here."""
    from test_cli import check_help_lists_every_option

    from kvgevent.client.cli import build_parser

    check_help_lists_every_option("run_client.py", build_parser, monkeypatch)


def pipe_fed_by(
    writer: str, port: int, timeout: str, wait_for_writer: bool = False
) -> tuple[int, bytes, bytes, float, int | None]:
    """``run_client.py --timeout T --pipe`` with its stdin from the stdout of ``python -c
    writer``: its exit status, stdout and stderr, the seconds it ran, and (if asked) the
    writer's exit status once it ended. Both processes are killed if still there."""
    source = client = None
    try:
        source = subprocess.Popen([sys.executable, "-c", writer], stdout=subprocess.PIPE)
        assert source.stdout is not None
        began = time.monotonic()
        client = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run_client.py"),
                "--port",
                str(port),
                "--timeout",
                timeout,
                "--pipe",
            ],
            stdin=source.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        source.stdout.close()  # (the client holds the pipe's only read end)
        out, err = client.communicate(timeout=30)
        took = time.monotonic() - began
        writer_status = source.wait(timeout=10) if wait_for_writer else None
    finally:
        for proc in (source, client):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    return client.returncode, out, err, took, writer_status


SLOW_WRITER = (
    "import sys, time\n"
    "sys.stdout.write('PUT:slow:first\\n'); sys.stdout.flush()\n"
    "time.sleep(3)\n"
    "sys.stdout.write('PUT:slow:second\\n')\n"
)
"""A stdin that gives one line, then nothing for 3 s, then another."""


def test_pipe_waits_for_a_slow_stdin_without_a_time_limit(port):
    """README: --timeout bounds a wait while a reply is due; "Waiting for stdin itself has
    no time limit". --timeout 1 --pipe fed by a writer that pauses 3 s between two lines:
    exit 0, and both lines were carried out. (Before, the wait for stdin was charged to the
    server: exit 3, "timed out: nothing sent or received for 1 s", the second line never sent.)"""
    status, out, err, _, writer_status = pipe_fed_by(SLOW_WRITER, port, "1", wait_for_writer=True)
    assert writer_status == 0
    assert status == 0, err
    assert "sent 2 commands" in out.decode() and "0 errors" in out.decode(), out
    peer = Peer(port)
    assert peer.request(b"GET:slow\n") == [b"slow:first", b"slow:second"]
    peer.close()


def test_one_shot_with_timeout_0_waits_for_a_stopped_server(server_process):
    """README: --timeout 0 means no limit. A GET to a run_server.py frozen with SIGSTOP is
    still waiting after 3 s (the default would give up after 10, --timeout 1 after 1); once
    the server runs again it gets its answer: exit 0, the value."""
    proc = server_process()
    assert client(proc.port, "put", "k", "v").returncode == 0
    os.kill(proc.proc.pid, signal.SIGSTOP)
    one_shot = None
    try:
        one_shot = subprocess.Popen(
            [
                sys.executable,
                str(ROOT / "run_client.py"),
                "--port",
                str(proc.port),
                "--timeout",
                "0",
                "get",
                "k",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=ROOT,
        )
        with pytest.raises(subprocess.TimeoutExpired):
            one_shot.wait(timeout=3)
        os.kill(proc.proc.pid, signal.SIGCONT)
        out, err = one_shot.communicate(timeout=20)
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        if one_shot is not None and one_shot.poll() is None:
            one_shot.kill()
            one_shot.wait()
    assert (one_shot.returncode, out, err) == (0, b"v\n", b"")


TRICKLING_WRITER = (
    "import sys, time\n"
    "for i in range(60):\n"
    "    sys.stdout.write('GET:k\\n'); sys.stdout.flush()\n"
    "    time.sleep(0.5)\n"
)
"""A stdin that gives a line every half second for 30 s."""


def test_pipe_gives_up_on_a_stopped_server_while_stdin_keeps_giving(server_process):
    """README: a server that stops answering is given up on after --timeout. A run_server.py
    frozen with SIGSTOP, `run_client.py --timeout 2 --pipe` fed a line every 0.5 s: its lines
    still leave (the kernel takes them), but no reply comes, so it exits 3 "timed out" in a few
    seconds. (Before, each line sent counted as progress: it waited as long as stdin gave.)"""
    proc = server_process()
    os.kill(proc.proc.pid, signal.SIGSTOP)
    try:
        status, out, err, took, _ = pipe_fed_by(TRICKLING_WRITER, proc.port, "2")
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
    assert status == 3, (out, err)
    assert b"timed out" in err
    assert took < 15, took


# --- review 32: usage errors, a closed stdout, bench ----------------------------------------


def test_a_protocol_line_argument_holding_a_newline_is_a_usage_error(port):
    """`run_client.py PUT:a:1 $'PUT:k:a\\nGET:k'`: the second argument would be two requests.
    A usage error (exit 2, no traceback) before anything is sent: PUT:a:1 is not applied
    either. (Before: an InvalidArgument traceback, exit 1.) A trailing line ending is still
    only a line ending."""
    result = client(port, "PUT:a:1", "PUT:k:a\nGET:k")
    assert result.returncode == 2, result.stderr
    assert b"error: a protocol line may not contain a newline: PUT:k:a\\nGET:k" in result.stderr
    assert b"Traceback" not in result.stderr
    assert client(port, "get", "a").stdout == b""
    assert client(port, "PUT:a:2\n").returncode == 0
    assert client(port, "get", "a").stdout == b"2\n"


def read_then_close(port: int, *args: str, lines: int) -> tuple[int, bytes]:
    """``run_client.py ARGS | head -LINES``: read that many lines of its stdout, close the
    pipe, and return its exit status and stderr. The client is killed if still there."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        for _ in range(lines):
            assert proc.stdout.readline()
        proc.stdout.close()
        status = proc.wait(timeout=20)
        return status, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def test_a_closed_stdout_ends_the_client_quietly(port):
    """`run_client.py get many | head -1` (2 MB of values, more than a pipe holds) and
    `--stat | head -2`: the reader went away, the server did not. Exit 141 (as a tool ended
    by SIGPIPE) with nothing on stderr. (Before: "[Errno 32] Broken pipe", exit 3, the
    status of an unreachable server.)"""
    lines = b"".join(b"PUT:many:%0100d\n" % i for i in range(20_000))
    assert client(port, "--pipe", stdin=lines).returncode == 0
    assert read_then_close(port, "get", "many", lines=1) == (141, b"")
    assert read_then_close(port, "--stat", "--interval", "0.05", lines=2) == (141, b"")


def test_a_closed_stdout_ends_the_bench_quietly_and_its_keys_are_deleted(port):
    """`run_client.py bench | head -1`: exit 141 with nothing on stderr, and no key of the
    bench's left on the server. (Before: "[Errno 32] Broken pipe" and exit 3, the status of
    an unreachable server.)"""
    status, stderr = read_then_close(port, "bench", "-t", "ping,put,get", "-n", "400", "-c", "2", lines=1)
    assert (status, stderr) == (141, b"")
    assert client(port, "stats").stdout.count(b"keys=0") == 1


@pytest.mark.parametrize("test", ["ping", "put", "delete", "get"])
def test_bench_against_a_dead_port_is_one_line_and_exit_3(test):
    """README: "3 if the server cannot be reached; a failure prints one line on stderr".
    (Before, -t ping/put/delete printed a traceback per connection, an empty report and
    a cleanup traceback, exit 1.)"""
    port = free_port()
    result = client(port, "bench", "--port", str(port), "-t", test, "-n", "10", "-c", "2", "-q")
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode().splitlines() == [
        f"run_client.py bench: cannot connect to 127.0.0.1:{port}: Connection refused"
    ]
    assert result.stdout == b""


def bench_json(port: int, *args: str, env: dict | None = None) -> list[dict]:
    """``run_client.py ARGS`` (a bench with --json): its reports; it must exit 0."""
    result = client(port, *args, "-c", "2", "-P", "4", "-n", "400", "--keys", "20", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_bench_connection_connected_to_itself_is_a_failed_connection(monkeypatch):
    """A bench worker connecting to a dead local port can be given that port as its source
    port and be connected to itself: it took its own echo for replies and reported a clean
    run (500 requests, no error, 3 of 3 in an attacker's runs in a network namespace; with a
    big -n it went on for minutes). Forced here as in the library's test, by binding the
    source port, with the worker run in this process: a failed connection, no request."""
    import queue

    import gevent.socket

    from kvgevent.client import bench

    port = free_port()
    real = gevent.socket.create_connection

    def from_the_same_port(address, timeout=None, source_address=None):
        return real(address, timeout, source_address=("127.0.0.1", port))

    monkeypatch.setattr(gevent.socket, "create_connection", from_the_same_port)
    args = {"test": "ping", "pipeline": 1, "size": 16, "prefix": b"t", "keys": 10}
    args.update(host="127.0.0.1", port=port, timeout=5.0, password=None, tls=None)
    results: queue.Queue = queue.Queue()
    with gevent.Timeout(20):
        bench._worker(args, 1, 5, 0, [0], 0, results)
    result = results.get_nowait()
    assert any("connected to itself" in f for f in result["failed"]), result["failed"]
    assert result["latencies"] == []


def test_a_ctrl_c_before_the_bench_wrote_anything_says_nothing_of_keys(fake_server):
    """A Ctrl-C while the bench's first PING waits (a server that accepts and never answers)
    said "stopped before its keys (...) were deleted", though none was ever written (4 of 4,
    an attacker's runs): now the interruption's status alone, and no such line."""
    import gevent
    import gevent.event

    accepted = gevent.event.Event()

    def hold(conn) -> None:  # never answers
        accepted.set()
        gevent.sleep(60)

    bench = start_bench(fake_server(hold), ("--timeout", "0", "-n", "10"))
    try:
        assert accepted.wait(timeout=20), "the bench did not connect"
        bench.send_signal(signal.SIGINT)
        _, err = bench.communicate(timeout=20)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 130, err
    assert b"keys" not in err and b"Traceback" not in err, err


def test_bench_takes_the_connection_options_of_every_mode(server_process, certs):
    """README: every mode takes --timeout, and --password (or KVGEVENT_PASSWORD) and TLS. The
    bench against a server with a password and TLS: every test runs without an error or a
    failed connection, with the options after `bench` or before it (--timeout too), or from
    the environment, and it cleans up. (Before, they were usage errors, KVGEVENT_PASSWORD was
    ignored: '100 ERR replies', and nothing could reach a TLS server.)"""
    proc = server_process("--tls-cert", str(certs.server_pem), env={"KVGEVENT_PASSWORD": "sekret"})
    ca = str(certs.ca_pem)
    runs = [
        (["bench", "--password", "sekret", "--tls-ca", ca, "--timeout", "5"], None),
        (["--timeout", "5", "--password=sekret", "--tls-insecure", "bench"], None),
        (["bench", "--tls"], {"KVGEVENT_PASSWORD": "sekret", "KVGEVENT_TLS_CA": ca, "KVGEVENT_TIMEOUT": "5"}),
    ]
    for args, env in runs:
        reports = bench_json(proc.port, *args, "-t", "put,get,update,delete,ping", env=env)
        assert [r["test"] for r in reports] == ["put", "get", "update", "delete", "ping"], args
        for report in reports:
            assert (report["requests"], report["errors"], report["failed_connections"]) == (400, 0, 0), args
    stats = client(proc.port, "--tls-ca", ca, "--password", "sekret", "stats")
    assert b"keys=0\n" in stats.stdout, stats


def start_bench(port: int, args: tuple[str, ...], **popen: Any) -> subprocess.Popen:
    """``run_client.py --port PORT bench ARGS`` started, its stdout and stderr piped."""
    command = [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), "bench", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, **popen)


BENCH_FOREVER = ("-t", "ping", "-n", "100000000", "-c", "2", "-q")
"""A bench that runs until it is stopped."""


def test_bench_gives_up_on_a_stopped_server(server_process):
    """README: "a server that stops answering is given up on after --timeout seconds (exit 3,
    one line on stderr)". KVGEVENT_TIMEOUT=2 bench -t ping, run_server.py SIGSTOPped once the
    bench is under way: the bench's connections time out (counted as failed), its cleanup
    too (said: its keys were not deleted), and it exits 3 within seconds. (Before, it was
    still blocked after 37 s.)"""
    proc = server_process()
    bench = None
    try:
        bench = start_bench(proc.port, BENCH_FOREVER, env={**os.environ, "KVGEVENT_TIMEOUT": "2"})
        with Client(port=proc.port, timeout=5) as kv:
            wait_until(lambda: kv.stats()["commands"] > 1000, timeout=20, message="the bench did not start")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        stopped = time.monotonic()
        out, err = bench.communicate(timeout=30)
        took = time.monotonic() - stopped
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 3, err
    left = f"run_client.py bench: its keys (bench{bench.pid}_*) were not deleted"
    assert err.decode().splitlines() == [f"{left}: timed out: nothing sent or received for 2 s"]
    assert b"0 ERR replies, 2 failed connections" in out
    assert took < 15, took


BENCH_PUTS = ("-t", "put,get", "-n", "100000000", "-c", "4", "-q", "--keys", "2000")
"""A bench that preloads 2,000 keys, then PUTs until it is stopped."""


@pytest.mark.parametrize(
    ("how", "status"), [("ctrl-c", 130), ("sigterm", 143)], ids=["ctrl-c-to-the-group", "sigterm"]
)
def test_an_interrupted_bench_still_cleans_up_its_keys(server_process, how, status):
    """README: the bench "cleans up the keys it used", also when stopped: Ctrl-C (SIGINT to
    its whole process group, workers included) or SIGTERM to its pid in the middle of a PUT
    test (2,000 preloaded keys and the PUT test's own) leaves keys=0, exits 128 + the
    signal's number and prints nothing on stderr. (Before: keys=4000 and a KeyboardInterrupt
    traceback after Ctrl-C, keys=8000 after SIGTERM.)"""
    proc = server_process()
    bench = None
    try:
        bench = start_bench(proc.port, BENCH_PUTS, start_new_session=True)  # (its own group: a job)
        with Client(port=proc.port, timeout=5) as kv:
            wait_until(lambda: kv.stats()["keys"] > 2000, timeout=20, message="the PUT test did not start")
            if how == "ctrl-c":
                os.killpg(bench.pid, signal.SIGINT)
            else:
                bench.send_signal(signal.SIGTERM)
            _out, err = bench.communicate(timeout=30)
            assert (bench.returncode, err) == (status, b"")
            assert kv.stats()["keys"] == 0
    finally:
        if bench is not None and bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()


@pytest.mark.parametrize(("how", "status"), [("ctrl-c", 130), ("sigterm", 143)])
def test_a_bench_interrupted_while_the_server_is_stopped_says_its_keys_were_left(server_process, how, status):
    """README: Ctrl-C exits 130, SIGTERM 143, and the bench cleans up its keys; when the
    server cannot be reached for that, it says which keys were left. Real: run_server.py
    SIGSTOPped in the middle of a PUT test (KVGEVENT_TIMEOUT=2), then the bench interrupted:
    it exits 128 + the signal's number with one line naming its keys' prefix. (Before: exit
    3, and only the cleanup's timeout said, the keys unmentioned: an attacker's pass.)"""
    proc = server_process()
    bench = None
    try:
        env = {**os.environ, "KVGEVENT_TIMEOUT": "2"}
        bench = start_bench(proc.port, BENCH_PUTS, env=env, start_new_session=True)
        with Client(port=proc.port, timeout=5) as kv:
            wait_until(lambda: kv.stats()["keys"] > 2000, timeout=20, message="the PUT test did not start")
        os.kill(proc.proc.pid, signal.SIGSTOP)
        if how == "ctrl-c":
            os.killpg(bench.pid, signal.SIGINT)
        else:
            bench.send_signal(signal.SIGTERM)
        _out, err = bench.communicate(timeout=30)
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        if bench is not None and bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()
    assert bench.returncode == status, err
    (line,) = err.decode().splitlines()
    assert line.startswith(f"run_client.py bench: its keys (bench{bench.pid}_*) were not deleted: "), line


def read_line_within(fd: int, seconds: float) -> bytes:
    """One line from ``fd`` (a pipe), read a byte at a time; fails after ``seconds``."""
    end, line = time.monotonic() + seconds, b""
    while not line.endswith(b"\n"):
        left = end - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            raise AssertionError(f"no line within {seconds} s (so far {line!r})")
        byte = os.read(fd, 1)
        assert byte, f"the client's stdout ended (so far {line!r})"
        line += byte
    return line


def test_piped_requests_are_sent_once_stdin_has_nothing_more_ready(port):
    """README: "each stdin line is one request". A producer that writes two lines and waits
    for the reply before writing the third (a coprocess, `tail -f`) gets each reply while
    stdin stays open, and a stdin left open after a PUT does not keep it from the server.
    (Before, requests waited for 1,000 lines or the end of stdin: no reply came, and the
    PUT was lost when the client was killed.)"""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run_client.py"), "--port", str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        os.write(proc.stdin.fileno(), b"put k v\nget k\n")
        assert read_line_within(proc.stdout.fileno(), 10) == b"v\n"
        os.write(proc.stdin.fileno(), b"put k w\n")
        with Client(port=port, timeout=5) as kv:
            wait_until(lambda: kv.get("k") == [b"v", b"w"], timeout=10, message="the PUT was not sent")
        os.write(proc.stdin.fileno(), b"get k\n")
        assert read_line_within(proc.stdout.fileno(), 10) == b"v\n"
        assert read_line_within(proc.stdout.fileno(), 10) == b"w\n"
        proc.stdin.close()
        assert proc.wait(timeout=10) == 0
    finally:
        ended(proc)


def ended(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, reap it and close its output pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pipe in (proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def has_a_socket(pid: int) -> bool:
    """Whether process ``pid`` holds a socket (run_client.py has connected: it is past its
    start, and a SIGINT is Python's KeyboardInterrupt, not the default action)."""
    fds = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(f"{fds}/{fd}").startswith("socket:") for fd in os.listdir(fds))
    except OSError:  # (an fd closed meanwhile, or the process gone)
        return False


@pytest.mark.parametrize("mode", ["one-shot", "protocol-line", "pipe"])
def test_ctrl_c_ends_a_command_with_status_130(server_process, mode):
    """README: 130 after Ctrl-C. A one-shot command waiting on a SIGSTOPped run_server.py,
    and --pipe waiting for more of its stdin, end with 130 when interrupted: a script sees
    that the command was cut short. (Before: 0, as if it had succeeded.)"""
    proc = server_process()
    args = {"one-shot": ["put", "k", "v"], "protocol-line": ["PUT:k:v"], "pipe": ["--pipe"]}[mode]
    if mode != "pipe":
        os.kill(proc.proc.pid, signal.SIGSTOP)
    command = [
        sys.executable,
        str(ROOT / "run_client.py"),
        "--port",
        str(proc.port),
        "--timeout",
        "60",
        *args,
    ]
    run = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT
    )
    try:
        if mode == "pipe":
            assert run.stdin is not None
            run.stdin.write(b"PUT:k:v\n")
            run.stdin.flush()  # (and stdin stays open: it waits for more)
        wait_until(lambda: has_a_socket(run.pid), timeout=20, message="the client did not connect")
        run.send_signal(signal.SIGINT)
        run.communicate(timeout=20)
        assert run.returncode == 130
    finally:
        os.kill(proc.proc.pid, signal.SIGCONT)
        if run.poll() is None:
            run.kill()
            run.wait()


STAT_OR_LATENCY_LINES = {
    # its header, then a row of counters (active=1: the --stat client itself)
    "--stat": (rb"time +active +dropped ", rb"\d\d:\d\d:\d\d +1 "),
    "--latency": (rb"latency ms: min [\d.]+ avg ", rb"latency ms: min [\d.]+ avg "),
}
"""What the first two lines of each mode look like (README, "Live stats." and "Latency.")."""


@pytest.mark.parametrize("mode", ["--stat", "--latency"])
def test_ctrl_c_ends_stat_and_latency_with_status_0(port, mode):
    """README, "One command": "130 after Ctrl-C (in every mode but `--stat` and `--latency`,
    which Ctrl-C ends with 0)": without --count they run until stopped, so Ctrl-C is how they
    end normally. run_client.py MODE --interval 0.1 against a real run_server.py prints its
    first two lines (--stat its header and a row of counters, --latency two "latency ms: min
    ..." lines: it is connected and in its loop), then gets a real SIGINT by pid, what a
    terminal's Ctrl-C sends: it exits 0 with nothing on stderr (no KeyboardInterrupt
    traceback). Nothing is injected. Under 1 s each on the project's VM."""
    command = [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), mode, "--interval", "0.1"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        assert run.stdout is not None
        for pattern in STAT_OR_LATENCY_LINES[mode]:
            line = read_line_within(run.stdout.fileno(), 20)
            assert re.match(pattern, line), line
        run.send_signal(signal.SIGINT)
        _out, err = run.communicate(timeout=20)
        assert (run.returncode, err) == (0, b"")
    finally:
        ended(run)


def test_pipe_from_dev_null_sends_nothing_and_succeeds(port):
    """stdin /dev/null (cron, systemd, ``docker run`` without -i), which epoll cannot watch:
    an empty mass insertion, exit 0. (Before: "connection failed: Operation not permitted",
    exit 3, against a healthy server.)"""
    with open(os.devnull, "rb") as devnull:
        result = pipe_from(port, devnull)
    assert (result.returncode, result.stderr) == (0, b"")
    assert result.stdout.startswith(b"sent 0 commands")


@pytest.mark.parametrize(
    "args",
    [["--timeout", "3e6", "get", "k"], ["--timeout", "1e10", "get", "k"], ["--stat", "--interval", "1e10"]],
    ids=["timeout-3e6", "timeout-1e10", "interval-1e10"],
)
def test_seconds_too_long_for_the_os_are_a_usage_error(args):
    """A --timeout or --interval over 1,000,000 s: exit 2 and argparse's message, nothing
    sent. (Before: an OverflowError traceback from the OS's wait, exit 1.)"""
    result = client(free_port(), *args)
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr and b"run_client.py: error:" in result.stderr


def test_a_closed_stdout_or_stdin_is_no_traceback(port):
    """``ping >&-`` and ``<&-`` (the caller closed the stream): the command runs and its exit
    status tells, as with /dev/null. (Before: an AttributeError traceback, exit 1.)"""
    base = f"exec {sys.executable} {ROOT / 'run_client.py'} --port {port}"
    for shell in (f"{base} ping >&-", f"{base} put k v <&-", f"{base} <&-", f"{base} --pipe <&-"):
        result = subprocess.run(["sh", "-c", shell], capture_output=True, timeout=60, cwd=ROOT)
        assert (result.returncode, result.stderr) == (0, b""), shell
    assert client(port, "get", "k").stdout == b"v\n"


def test_a_bench_process_that_dies_is_a_failed_test(port):
    """A bench worker killed (SIGKILL: the OOM killer, say) takes its part of the requests
    with it: the report says so and the exit status is 1. (Before: a short count, no ERRORS
    line, exit 0.)"""
    bench = start_bench(port, ("-t", "ping", "-n", "100000", "-c", "2", "--processes", "2", "-q"))
    try:
        workers: list[int] = []

        def started() -> bool:
            workers[:] = [pid for pid in children(bench.pid) if b"spawn_main" in cmdline(pid)]
            return len(workers) == 2

        wait_until(started, timeout=30, message="the bench's workers did not start")
        os.kill(workers[0], signal.SIGKILL)  # (50,000 PINGs each, one at a time: seconds)
        out, _err = bench.communicate(timeout=120)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert bench.returncode == 1
    assert b"ERRORS: 0 ERR replies, 0 failed connections, 1 bench process(es) lost" in out


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read()
    except OSError:
        return b""


def test_stat_shows_a_figure_the_server_did_not_send_as_a_dash():
    """--stat against a server whose STATS line lacks figures (older or newer than this
    client; ``keys`` during a Redis outage): "-" in their columns, no KeyError traceback."""
    from kvgevent.client.tools import run_stat

    class Stub:
        samples = iter([{"active": 1}, {"active": 2, "dropped": 0}])

        def stats(self) -> dict[str, int]:
            return next(self.samples)

    out = io.StringIO()
    run_stat(Stub(), 0.001, 1, out, tty=False)  # type: ignore[arg-type]
    _header, row = out.getvalue().splitlines()
    assert row.split()[1:] == ["2", "0", "-", "-", "-", "-", "-"]


@pytest.mark.parametrize(
    ("args", "stdin"), [(["get", "k"], b""), (["--pipe"], b"GET:k\n")], ids=["get", "pipe"]
)
def test_a_reply_line_longer_than_64_mib_is_one_line_and_exit_3(fake_server, args, stdin):
    """README, "A server that misbehaves": a server that "sends a reply line longer than
    64 MiB" is exit 3 and one line on stderr (no traceback), for one command and for --pipe.
    The server is a real loopback fake (test_client.py's) that answers the GET with 66 MiB of
    one line and no newline and keeps the connection open; the client gives up once the line
    is over 64 MiB (more than that had been sent when it closed), well within its --timeout.
    Nothing is injected. About 0.5 s each on the project's VM; the client may hold the line
    up to its limit, about 64 MB, for that moment."""
    sent = [0]
    closed = gevent.event.Event()
    result = client(fake_server(endless_value(sent, closed)), "--timeout", "10", *args, stdin=stdin)
    assert result.returncode == 3, result.stderr
    assert result.stderr.decode().splitlines() == ["run_client.py: reply line too long"]
    assert result.stdout == b""
    assert closed.wait(10), "the client did not close its connection"
    assert sent[0] > 64 << 20, f"the client gave up after {sent[0]:,} bytes of the line"
