"""What the bench scripts share: a run_server.py started on a free loopback port, and reading
a process's memory from /proc."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def proc_status(pid: int) -> tuple[int, int]:
    """(RSS in kB, open fds) of a process."""
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def wait_serving(port: int, timeout: float = 20.0) -> None:
    """Until a PING on ``port`` gets its PONG."""
    sys.path.insert(0, str(ROOT))
    from kvgevent.client import Client

    end = time.monotonic() + timeout
    while True:
        try:
            Client(port=port, timeout=5).close()
            return
        except Exception:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)


@contextlib.contextmanager
def server(*args: str, cpu: int | None = None) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``run_server.py`` with ``args`` on a free port (pinned to ``cpu`` when taskset
    exists), serving; stopped with SIGTERM on exit. Yields (process, port)."""
    port = free_port()
    pin = pinned(cpu)
    proc = subprocess.Popen(
        [
            *pin,
            sys.executable,
            str(ROOT / "run_server.py"),
            "--port",
            str(port),
            "--log-format",
            "json",
            "--log-level",
            "warning",
            *args,
        ],
        cwd=ROOT,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_serving(port)
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def load(port: int, tests: str, *args: str, cpu: int | None = None) -> dict[str, dict]:
    """``run_client.py bench -t tests`` against ``port`` (pinned to ``cpu`` when taskset
    exists); its JSON report, by test."""
    pin = pinned(cpu)
    out = subprocess.run(
        [
            *pin,
            sys.executable,
            str(ROOT / "run_client.py"),
            "bench",
            "--port",
            str(port),
            "-t",
            tests,
            "--json",
            "-q",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {report["test"]: report for report in map(json.loads, out.splitlines())}


def pinned(cpu: int | None) -> list[str]:
    """The prefix that runs a command on ``cpu`` (``taskset``), or none: no CPU given, or no
    taskset here."""
    return ["taskset", "-c", str(cpu)] if cpu is not None and shutil.which("taskset") else []


@contextlib.contextmanager
def redis_server(cpu: int | None = None) -> Iterator[int]:
    """A redis-server of its own on a free loopback port (no persistence, its files in a
    temporary directory; pinned to ``cpu`` when given), answering PING; stopped on exit.
    Yields its port. Exits with a message if redis-server is not installed."""
    if not shutil.which("redis-server"):
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    with tempfile.TemporaryDirectory() as directory:
        command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
        command += ["--appendonly", "no", "--dir", directory]
        redis = subprocess.Popen([*pinned(cpu), *command], stdout=subprocess.DEVNULL)
        try:
            _wait_redis(port, redis)
            yield port
        finally:
            redis.terminate()
            redis.wait(timeout=30)


def _wait_redis(port: int, redis: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Until the Redis on ``port`` answers a PING."""
    end = time.monotonic() + timeout
    while redis.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
                probe.sendall(b"PING\r\n")
                if probe.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        if time.monotonic() > end:
            break
        time.sleep(0.05)
    raise SystemExit(f"redis-server on {port} did not answer (exit code {redis.poll()})")
