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
