"""Shared fixtures. The whole test process is monkey-patched by gevent, so the in-process
server serves while a test blocks in a socket call, and helper greenlets play concurrent
clients. Every test runs under a deadline, and every socket and server it opens is closed."""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import select  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.error  # noqa: E402
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Iterator, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.socket  # noqa: E402
import pytest  # noqa: E402

from kvgevent import KeyValueServer, KVStore, MemoryStore, configure_logging  # noqa: E402
from kvgevent.tls import TlsStream, client_context, server_context  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TEST_DEADLINE = 60.0
"""Seconds any single test may take before it fails (the slowest ones take about 12)."""


@pytest.fixture(autouse=True)
def deadline() -> Iterator[None]:
    """Fail a test that blocks past TEST_DEADLINE instead of hanging the suite."""
    timeout = gevent.Timeout(TEST_DEADLINE, AssertionError(f"test exceeded {TEST_DEADLINE} s"))
    timeout.start()
    try:
        yield
    finally:
        timeout.cancel()


class Certificates:
    """A throwaway CA and a server certificate for 127.0.0.1, as files and as contexts."""

    def __init__(self, directory: Path) -> None:
        import trustme

        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1", "localhost")
        self.server_pem = directory / "server.pem"
        self.ca_pem = directory / "ca.pem"
        cert.private_key_and_cert_chain_pem.write_to_path(str(self.server_pem))
        ca.cert_pem.write_to_path(str(self.ca_pem))
        self.server = server_context(str(self.server_pem))
        self.client = client_context(str(self.ca_pem))


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return Certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def log_stream() -> io.StringIO:
    """In-process server logs, as JSON lines (parse them with :func:`log_events`)."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    return stream


def log_events(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


@pytest.fixture
def make_server(log_stream: io.StringIO) -> Iterator[Callable[..., KeyValueServer]]:
    """Factory of started servers on free loopback ports; all are closed after the test."""
    servers: list[KeyValueServer] = []

    def make(store: Any = None, **options: Any) -> KeyValueServer:
        server = KeyValueServer(store if store is not None else MemoryStore(), **options)
        server.start(0, host="127.0.0.1")
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close(flush_timeout=0.5)


class RedisProcess:
    """A throwaway redis-server on a free loopback port (no persistence), stopped by pid."""

    def __init__(self, directory: Path, port: int | None = None, *extra: str) -> None:
        self.port = port or free_port()
        self.directory = directory
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_until(self._answers, timeout=10, message="redis-server did not start")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                return probe.recv(100).startswith((b"+PONG", b"-NOAUTH"))  # (with --requirepass)
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


REDIS_SERVER = shutil.which("redis-server") or ""
needs_redis = pytest.mark.skipif(
    not REDIS_SERVER,
    reason="redis-server is not installed here (apt-get install redis-server; .ci/run installs it)",
)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """One redis-server for the session; each test uses its own key prefix."""
    if not REDIS_SERVER:
        pytest.skip("redis-server is not installed here (apt-get install redis-server; .ci/run installs it)")
    redis = RedisProcess(tmp_path_factory.mktemp("redis"))
    yield redis
    redis.kill()


def redis_store(url: str) -> Any:
    from kvgevent.stores.redis_store import RedisStore

    return RedisStore(url, prefix=f"test{uuid.uuid4().hex[:12]}:")


@pytest.fixture(params=["memory", "redis"])
def server(request: pytest.FixtureRequest, make_server: Callable[..., KeyValueServer]) -> KeyValueServer:
    """A started server, once over the memory store and once over Redis (the protocol suite
    runs on both)."""
    if request.param == "memory":
        return make_server()
    redis = request.getfixturevalue("redis_server")
    return make_server(store=redis_store(redis.url))


class WrappedStore(KVStore):
    """A store built on the KVStore interface alone (its default apply() calls the methods
    one by one), delegating to a MemoryStore: the base of the test stores below."""

    def __init__(self):
        super().__init__()
        self.inner = MemoryStore()

    def put(self, key, value):
        self.inner.put(key, value)

    def get(self, key):
        return self.inner.get(key)

    def update(self, key, old, new):
        self.inner.update(key, old, new)

    def delete(self, key):
        self.inner.delete(key)

    def count_keys(self):
        return self.inner.count_keys()


class Systemd:
    """The notification socket systemd would give a Type=notify service."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(30)

    def next(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


class Peer:
    """A raw protocol client over a (gevent-patched) socket, for byte-exact assertions; with
    ``tls`` (a client SSLContext) it speaks TLS through kvgevent's own TlsStream."""

    def __init__(
        self, port: int, timeout: float = 10.0, tls: ssl.SSLContext | None = None, source: str | None = None
    ) -> None:
        # ``source``: another loopback address to connect from (127.0.0.2: another client host)
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0) if source else None
        )
        self.stream: Any = self.sock
        if tls is not None:
            self.stream = TlsStream(
                self.sock, tls, server_side=False, server_hostname="127.0.0.1", lock_factory=threading.Lock
            )
            self.stream.handshake()
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.stream.sendall(data)

    def read_lines(self, count: int) -> list[bytes]:
        """Exactly ``count`` lines (without newlines), or fail at the socket timeout."""
        while self.buffer.count(b"\n") < count:
            chunk = self.stream.recv(1 << 16)
            if not chunk:
                raise AssertionError(f"connection closed after {self.buffer!r}")
            self.buffer += chunk
        lines = self.buffer.split(b"\n")
        taken, rest = lines[:count], lines[count:]
        self.buffer = b"\n".join(rest)
        return taken

    def request(self, data: bytes) -> list[bytes]:
        """Send ``data`` then PING; return every reply line before the PONG."""
        self.send(data + b"PING\n")
        lines = []
        while (line := self.read_lines(1)[0]) != b"PONG":
            lines.append(line)
        return lines

    def expect_no_reply(self) -> None:
        """Assert that nothing is pending: a PING's PONG is the very next line."""
        assert self.request(b"") == [], "unexpected reply lines"

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def connect() -> Iterator[Callable[..., Peer]]:
    """Factory of :class:`Peer` connections, all closed after the test."""
    peers: list[Peer] = []

    def make(port: int, **options: Any) -> Peer:
        peer = Peer(port, **options)
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()


def read_stats(peer: Peer) -> dict[str, int]:
    """The STATS line of ``peer``'s server, as numbers by name."""
    line = peer.request(b"STATS\n")[0].decode()
    return {name: int(value) for name, value in (pair.split("=") for pair in line.split())}


def fill_descriptors(port: int, pid: int) -> list[Peer]:
    """Lower the soft RLIMIT_NOFILE of server ``pid`` (a real limit, set from outside as
    ``prlimit --pid`` does) to just above its highest open descriptor, and take the free
    numbers below it with served clients: its next accept() fails with EMFILE."""

    def open_fds() -> set[int]:
        return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}

    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (max(open_fds()) + 1, hard))
    fillers = []
    for _ in set(range(max(open_fds()) + 1)) - open_fds():  # (holes: a closed file's number)
        fillers.append(Peer(port))
        assert fillers[-1].request(b"") == []
    return fillers


def memory_of(pid: int, field: str = "VmRSS") -> int:
    """A size from ``/proc/PID/status`` in bytes: ``VmRSS`` (resident now) or ``VmHWM`` (the
    most it has been resident since it started)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0, message: str = "") -> None:
    """Poll ``predicate`` until it is true; fail after ``timeout`` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(message or "condition not reached in time")
        gevent.sleep(0.01)


class ServerProcess:
    """``python run_server.py`` in a subprocess, on a free port, with its stderr (JSON logs)
    collected by a greenlet as it is written."""

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        port: int | None = None,
        script: Path = ROOT / "run_server.py",
        cwd: Path = ROOT,
        prefix: Sequence[str] = (),
        log_format: str | None = "json",
    ) -> None:
        # ``prefix``: a command that execs the server (e.g. setpriv, to drop capabilities);
        # ``log_format``: None leaves the server's default (``auto``)
        self.port = port or free_port()
        self.args = [
            *prefix,
            sys.executable,
            str(script),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *(("--log-format", log_format) if log_format else ()),
            *args,
        ]
        self.proc = subprocess.Popen(
            self.args,
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env={**os.environ, **(env or {})},
        )
        self.stderr = b""
        assert self.proc.stderr is not None
        self._stderr_fd = self.proc.stderr.fileno()
        os.set_blocking(self._stderr_fd, False)
        # The server drops a log line its stderr cannot take at once (a full pipe): room for
        # 1 MiB of lines while this process is busy elsewhere (Linux's F_SETPIPE_SZ).
        with contextlib.suppress(OSError):
            fcntl.fcntl(self._stderr_fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), 1 << 20)
        self._collector = gevent.spawn(self._collect)

    def _collect(self) -> None:
        while self._drain():
            gevent.socket.wait_read(self._stderr_fd)

    def _drain(self) -> bool:
        """Append what the pipe holds now to ``stderr``; False at its end. :meth:`events`
        calls it too: the server logs an event before it sends the reply that follows it, so
        a test that has that reply finds the event without waiting for the collector's turn."""
        while True:
            try:
                chunk = os.read(self._stderr_fd, 1 << 16)
            except BlockingIOError:
                return True
            except OSError:
                return False
            if not chunk:
                return False
            self.stderr += chunk

    def wait_listening(self, timeout: float = 10.0) -> None:
        """Wait for the server_started event (without connecting, which would count)."""
        wait_until(
            lambda: b'"server_started"' in self.stderr or self.proc.poll() is not None,
            timeout=timeout,
            message="server did not start",
        )
        if b'"server_started"' not in self.stderr:
            raise AssertionError(f"server exited: {self.stderr.decode()}")

    def stop(self, sig: int | None = 15, timeout: float = 10.0) -> int:
        """Send ``sig`` (by pid; None: send nothing) and wait for the exit; return its status."""
        if sig is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        self._collector.join(timeout=timeout)
        return self.proc.returncode

    def events(self) -> list[dict[str, Any]]:
        """Every complete stderr line, parsed as JSON (fails if any line is not JSON)."""
        if not self._collector.dead:
            self._drain()
        complete = self.stderr[: self.stderr.rfind(b"\n") + 1]
        return [json.loads(line) for line in complete.decode().splitlines()]


class Terminal:
    """A program on a pseudo-terminal, driven like a user at a keyboard."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        master, slave = os.openpty()
        self.proc = subprocess.Popen(
            args,
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            start_new_session=True,
            env={**os.environ, "TERM": "xterm", **(env or {})},
        )
        os.close(slave)
        self.master = master
        self.output = b""
        self.seen = 0  # output before this offset was matched already

    def send(self, keys: bytes) -> None:
        os.write(self.master, keys)

    def expect(self, text: bytes, timeout: float = 10.0) -> bytes:
        """Wait until ``text`` appears after what was matched before; return the output up
        to and including it."""
        end = time.monotonic() + timeout
        while (found := self.output.find(text, self.seen)) < 0:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{text!r} not seen; output: {self.output[self.seen :]!r}")
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the program exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"{text!r} not seen before exit: {self.output[self.seen :]!r}")
                self.output += chunk
        start, self.seen = self.seen, found + len(text)
        return self.output[start : self.seen]

    def finish(self, timeout: float = 20.0) -> tuple[int, bytes]:
        """Read what the program writes until it exits: (its exit status, the output not
        matched by :meth:`expect` yet)."""
        end = time.monotonic() + timeout
        while True:
            ready, _, _ = select.select([self.master], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise AssertionError(f"the program did not finish: {self.output[self.seen :]!r}")
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # EIO: the program exited and its output was read
                chunk = b""
            if not chunk:
                return self.proc.wait(timeout=10), self.output[self.seen :]
            self.output += chunk

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.kill()
        code = self.proc.wait(timeout=10)
        os.close(self.master)
        return code


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def server_process() -> Iterator[Callable[..., ServerProcess]]:
    """Factory of ``run_server.py`` subprocesses, each stopped (by pid) after the test."""
    procs: list[ServerProcess] = []

    def make(*args: str, wait: bool = True, **options: Any) -> ServerProcess:
        proc = ServerProcess(*args, **options)
        procs.append(proc)
        if wait:
            proc.wait_listening()
        return proc

    yield make
    for proc in procs:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()
        proc._collector.join(timeout=5)
        for pipe in (proc.proc.stdout, proc.proc.stderr):
            if pipe is not None:
                pipe.close()


def http_get(port: int, path: str) -> tuple[int, str]:
    """(status, body) of an HTTP GET on loopback."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    status, text = http_get(port, "/metrics")
    assert status == 200
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


# --- fake servers, for the clients' tests ----------------------------------------------------


@pytest.fixture
def fake_server():
    """Factory of loopback listeners playing a server: ``respond(conn)`` serves the first
    connection in a greenlet; without it the connection is never even accepted (the kernel
    completes it). Everything is closed after the test."""
    listeners: list[socket.socket] = []
    greenlets: list[gevent.Greenlet] = []

    def make(respond=None) -> int:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listeners.append(listener)
        if respond is not None:

            def serve():
                conn, _ = listener.accept()
                with conn:
                    respond(conn)

            greenlets.append(gevent.spawn(serve))
        return listener.getsockname()[1]

    yield make
    gevent.killall(greenlets)
    for listener in listeners:
        listener.close()


def read_to_ping(conn: socket.socket) -> bool:
    """Read what the client sends up to its first PING: False if it closed before one."""
    received = b""
    while b"PING\n" not in received:
        chunk = conn.recv(1 << 16)
        if not chunk:
            return False
        received += chunk
    return True


def answer(reply: bytes, gap: float = 0.0):
    """A respond() that reads up to the first PING, then sends ``reply`` (a byte every
    ``gap`` seconds when given), then reads until the client closes."""

    def respond(conn: socket.socket) -> None:
        if not read_to_ping(conn):
            return
        if gap:
            for byte in reply:
                conn.sendall(bytes([byte]))
                gevent.sleep(gap)  # the slow server under test, not a synchronisation
        else:
            conn.sendall(reply)
        while conn.recv(1 << 16):
            pass

    return respond


def reset_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP reset instead of a FIN (SO_LINGER on, with a zero timeout)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


class BioSession:
    """A client's TLS session over a loopback socket with the TLS engine on ``ssl.MemoryBIO``
    (the test decides what goes on the wire: records of any size, a FIN without
    close_notify, garbage), the handshake done and its last bytes sent. ``send(plaintext)``
    encrypts and sends; :attr:`sock`, :attr:`tls`, :attr:`incoming`, :attr:`outgoing`."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self.outgoing.read())
                self.incoming.write(self.sock.recv(1 << 16))
        self.sock.sendall(self.outgoing.read())  # (the handshake's last bytes, if any)

    def send(self, plaintext: bytes) -> None:
        self.tls.write(plaintext)
        self.sock.sendall(self.outgoing.read())


def small_buffer_socket(port: int, rcvbuf: int = 4096) -> socket.socket:
    """A client socket connected to ``port`` with a small receive buffer (what it does not
    read stays in the server, not in this kernel) and a 10 s timeout."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock
