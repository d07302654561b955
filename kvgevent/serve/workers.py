"""``run_server.py --workers N``: N server processes on one port, and the process that
supervises them.

Each worker is a full kvgevent server (``python -m kvgevent`` with the same flags, plus
``--reuse-port``) listening with SO_REUSEPORT, so the kernel spreads new connections over
them. They share their data through the store (Redis), which is why more than one worker is
refused with the memory store. The supervisor serves nothing itself: it checks that the port
is free, starts the workers, restarts one that dies (logged as ``worker_exited``), and on
SIGINT/SIGTERM passes SIGTERM on to every worker, waits for them and exits 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import gevent

from kvgevent.logs import Logger, redacted_url
from kvgevent.serve.signals import stop_requested

RESTART_DELAY = 0.5
"""Seconds before a worker that died is started again."""

GIVE_UP_AFTER = 5
"""Consecutive workers that die within STARTUP_GRACE of starting before the supervisor stops."""

STARTUP_GRACE = 2.0
"""A worker that dies sooner than this after starting counts as failing to start."""

PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal a process gets when its parent dies."""

PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


def _free_port(host: str, port: int) -> int:
    """Check that ``host:port`` is free (0: pick one); OSError if it is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((host, port))
        return probe.getsockname()[1]


SECRET_OPTIONS = {"password": "KVGEVENT_PASSWORD", "store": "KVGEVENT_STORE"}
"""Options a worker gets through its environment, not its command line (``ps`` shows that):
the password, and the store URL (it may hold Redis's password)."""

NOT_FOR_WORKERS = frozenset(("help", "workers", "port", "reuse_port"))
"""Options the supervisor keeps to itself or sets for each worker."""


def worker_command(
    parser: argparse.ArgumentParser, args: argparse.Namespace, port: int
) -> tuple[list[str], dict[str, str]]:
    """A worker's command line and the environment it adds, built from the parsed options
    (not by filtering our argv: an abbreviation or a ``--flag=value`` must not slip through
    and make every worker a supervisor). Every option is passed with its value, as parsed
    from a flag or the environment; secrets go through the environment."""
    argv = [sys.executable, "-m", "kvgevent"]
    env: dict[str, str] = {}
    for action in parser._actions:  # (argparse keeps no public list of its options)
        if not action.option_strings or action.dest in NOT_FOR_WORKERS:
            continue
        value = getattr(args, action.dest)
        if action.dest in SECRET_OPTIONS:
            if value is not None:
                env[SECRET_OPTIONS[action.dest]] = str(value)
        elif isinstance(action, argparse._StoreTrueAction):
            argv += [action.option_strings[0]] if value else []
        elif value is not None:
            argv += [action.option_strings[0], str(value)]
    return [*argv, "--port", str(port), "--reuse-port"], env


def supervise(args: argparse.Namespace, parser: argparse.ArgumentParser, log: Logger) -> int:

    try:
        port = _free_port(args.host, args.port)
    except OSError as exc:
        log.error(
            "server_start_failed",
            host=args.host,
            port=args.port,
            error=os.strerror(exc.errno) if exc.errno else str(exc),
            errno=exc.errno,
        )
        return 1
    command, secrets = worker_command(parser, args, port)
    env = {
        **os.environ,
        **secrets,
        "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
    }
    env.pop("KVGEVENT_WORKERS", None)
    env.pop("KVGEVENT_PORT", None)
    stop = stop_requested(log)
    workers: list[subprocess.Popen[bytes] | None] = [None] * args.workers
    started = [0.0] * args.workers
    quick_deaths = 0

    def start(slot: int) -> None:
        workers[slot] = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent)
        started[slot] = time.monotonic()
        log.info("worker_started", slot=slot, pid=workers[slot].pid)  # type: ignore[union-attr]  # (start() just made it)

    log.info(
        "workers_starting", workers=args.workers, host=args.host, port=port, store=redacted_url(args.store)
    )
    for slot in range(args.workers):
        start(slot)
    while not stop.is_set():
        for slot, proc in enumerate(workers):
            if proc is None or proc.poll() is None:
                continue
            lived = time.monotonic() - started[slot]
            log.warning(
                "worker_exited", slot=slot, pid=proc.pid, exit_status=proc.returncode, lived_s=round(lived, 1)
            )
            quick_deaths = quick_deaths + 1 if lived < STARTUP_GRACE else 0
            if quick_deaths >= GIVE_UP_AFTER:
                log.error(
                    "workers_failing", hint="workers exit as soon as they start; see their events above"
                )
                _stop_all(workers, args, log)
                return 1
            stop.wait(RESTART_DELAY)
            if not stop.is_set():
                start(slot)
        stop.wait(0.2)
    _stop_all(workers, args, log)
    log.info("workers_stopped", workers=args.workers)
    return 0


def _die_with_parent() -> None:
    """In the worker, before exec: SIGTERM it if the supervisor dies (even by SIGKILL), so no
    worker is left serving on its own."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's SIGTERM handling is all there is


def _stop_all(workers: list[Any], args: argparse.Namespace, log: Logger) -> None:
    """SIGTERM every worker, wait for them (each flushes its clients), then kill stragglers."""
    live = [p for p in workers if p is not None and p.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + args.shutdown_flush + 5.0
    for proc in live:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("worker_killed", pid=proc.pid)
            proc.kill()
            proc.wait()
    gevent.sleep(0)
