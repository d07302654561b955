"""``run_server.py --workers N``: N server processes on one port, and the process that
supervises them.

Each worker is a full kvgevent server (``python -m kvgevent`` with the same flags, plus
``--reuse-port``) listening with SO_REUSEPORT, so the kernel spreads new connections over
them. They share their data through the store (Redis), which is why more than one worker is
refused with the memory store. The supervisor serves nothing itself: it checks that the port
is free, starts the workers, restarts one that dies (logged as ``worker_exited``), and on
SIGINT/SIGTERM passes SIGTERM on to every worker, waits for them and exits 0.

A worker that is alive but does not run (stopped by SIGSTOP, or its event loop stuck) would
keep its share of new connections, which the kernel hands it whatever it does. So each
worker's event loop writes a byte to a pipe of its own every HEARTBEAT_INTERVAL
(:func:`beat_for_supervisor`), and the supervisor kills (SIGKILL) one that has been silent for
``--worker-timeout`` seconds (``worker_unresponsive``); it is then restarted as any worker
that died. A pipe, not a file: nothing to create on a disk that may be full.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gevent

from kvgevent.config import FIRST_HEARTBEAT_TIMEOUT, HEARTBEAT_INTERVAL, SUPERVISOR_CHECK
from kvgevent.logs import LogFile, Logger, redacted_url
from kvgevent.serve.signals import reopen_on_hangup, stop_requested
from kvgevent.serve.systemd import ReadyCollector, feed_watchdog, notify

CHECK_INTERVAL = 0.2
"""Seconds between two checks of the workers (exits and heartbeats) by the supervisor: a dead
worker's slot is empty for at most this plus RESTART_DELAY, for a waitpid and a pipe read per
worker each time; and MIN_WORKER_TIMEOUT is a few of them."""

RESTART_DELAY = 0.5
"""Seconds before a worker that died is started again."""

START_RETRY_MAX = 10.0
"""Most seconds between two attempts to start a worker that the system would not start (its
fork refused for a while: systemd's TasksMax=, a pids cgroup, memory), doubling from
RESTART_DELAY: the other workers serve meanwhile."""

GIVE_UP_AFTER = 5
"""Consecutive workers that die within STARTUP_GRACE of starting, before they listened,
before the supervisor stops."""

READY_TIMEOUT = 60.0
"""Seconds the supervisor waits for every worker's READY=1 before it tells systemd none."""

STARTUP_GRACE = 2.0
"""A worker that dies sooner than this after starting, and had not listened (sent READY=1),
counts as failing to start."""

NO_WORKER = -1
"""The pid that stands for an empty slot: no process has it, so no READY=1 comes from it."""

PR_SET_PDEATHSIG = 1
"""Linux prctl option: the signal a process gets when its parent dies."""

PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
"""The directory that holds the kvgevent package (this file is kvgevent/serve/workers.py): on
the workers' PYTHONPATH, so ``python -m kvgevent`` finds it from any working directory."""

SUPERVISOR_ENV = "KVGEVENT_SUPERVISOR_PID"
"""The environment variable that gives a worker its supervisor's pid."""

HEARTBEAT_ENV = "KVGEVENT_HEARTBEAT_FD"
"""The environment variable that gives a worker the descriptor its heartbeats are written to."""


def _claim_port(host: str, port: int) -> tuple[int, socket.socket]:
    """Check that ``host:port`` is free (0: pick one) and claim it for this supervisor: a
    Unix socket bound in the abstract namespace under the address and port, held until this
    process ends (the kernel frees it then). Workers bind the port with SO_REUSEPORT, which
    lets any process of the same user join: a second supervisor started within half a second
    of the first found the port free too, and both served it, clients split between them (an
    attacker's pass, 5 of 5). OSError if the port is taken or claimed."""
    port = _free_port(host, port)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0kvgevent-supervisor-port-{host}:{port}")
    except OSError as exc:
        claim.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(errno.EADDRINUSE, "another kvgevent supervisor (--workers) serves this port") from None
    return port, claim


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

NOT_FOR_WORKERS = frozenset(("help", "workers", "port", "reuse_port", "metrics_port"))
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


def supervise(
    args: argparse.Namespace, parser: argparse.ArgumentParser, log: Logger, log_file: LogFile | None = None
) -> int:
    """Run ``args.workers`` workers on ``args.port`` until SIGINT/SIGTERM; the exit status."""
    try:
        port, claim = _claim_port(args.host, args.port)
    except OSError as exc:
        log.error(
            "server_start_failed",
            host=args.host,
            port=args.port,
            error=exc.strerror or str(exc),
            errno=exc.errno,
        )
        return 1
    with claim:
        return Supervisor(args, parser, log, port, log_file).run()


class Supervisor:
    """The workers of one port: started, restarted when they die, stopped together. SIGHUP is
    passed on to them (each reopens its --log-file). They report READY=1 to this process (their
    NOTIFY_SOCKET is its ReadyCollector's, with systemd or not): with systemd (NOTIFY_SOCKET),
    it reports READY=1 once all of them have; and a worker that listened is not one that
    failed to start, however soon it died."""

    def __init__(
        self,
        args: argparse.Namespace,
        parser: argparse.ArgumentParser,
        log: Logger,
        port: int,
        log_file: LogFile | None,
    ) -> None:
        self.args, self.log, self.port = args, log, port
        self.command, secrets = worker_command(parser, args, port)
        self.env = {
            **os.environ,
            **secrets,
            "PYTHONPATH": os.pathsep.join(filter(None, [PACKAGE_ROOT, os.environ.get("PYTHONPATH")])),
        }
        self.env.pop("KVGEVENT_WORKERS", None)
        self.env.pop("KVGEVENT_PORT", None)
        for name in ("WATCHDOG_USEC", "WATCHDOG_PID"):  # (systemd watches this process; we, the workers)
            self.env.pop(name, None)
        self.env[SUPERVISOR_ENV] = str(
            os.getpid()
        )  # (a worker checks it still has us: see die_with_supervisor)
        self.workers: list[subprocess.Popen[bytes] | None] = [None] * args.workers
        self.started = [0.0] * args.workers
        self.retries: dict[int, tuple[float, float]] = {}  # slot: (next attempt, delay) (start)
        self.heartbeats: list[Heartbeat | None] = [None] * args.workers
        self.quick_deaths = 0
        self.stop = stop_requested(log)
        self.readiness = self._ready_collector()
        if self.readiness is not None:
            self.env["NOTIFY_SOCKET"] = self.readiness.path
        else:  # (workers must not tell systemd READY=1 themselves: it is the supervisor's to say)
            self.env.pop("NOTIFY_SOCKET", None)
        reopen_on_hangup(log_file, then=self._pass_hangup_on)

    def _ready_collector(self) -> ReadyCollector | None:
        """The socket the workers send READY=1 to; None if none can be bound (logged once:
        systemd is then told READY=1 as soon as the workers are started, not once they listen,
        for a notification never holds up the server; and a worker that dies within
        STARTUP_GRACE counts as failing to start, whether it listened or not)."""
        try:
            return ReadyCollector()
        except OSError as exc:
            self.log.warning(
                "notify_relay_unavailable",
                error=exc.strerror or str(exc),
                hint="the workers' READY=1 is not heard: systemd's is sent once they are started, and "
                f"any worker dying within {STARTUP_GRACE:g} s of its start counts towards workers_failing",
            )
            return None

    def run(self) -> int:
        args = self.args
        store = redacted_url(args.store)
        self.log.info("workers_starting", workers=args.workers, host=args.host, port=self.port, store=store)
        for slot in range(args.workers):
            self.start(slot)
        if self.readiness is None:  # (without the relay: see _ready_collector)
            notify(self._ready_message())
        greenlets = (
            []
            if self.readiness is None
            else [gevent.spawn(self.readiness.read), gevent.spawn(self._report_ready)]
        )
        feed_watchdog()
        status = 0
        while not self.stop.is_set() and status == 0:
            status = self._check_workers()
            self.stop.wait(CHECK_INTERVAL)
        notify("STOPPING=1")
        for slot, proc in enumerate(self.workers):  # (died since the last check: logged too)
            if status == 0 and proc is not None and proc.poll() is not None:
                self._exited(slot, proc)
        self._stop_all()
        for heartbeat in self.heartbeats:
            if heartbeat is not None:
                heartbeat.close()
        gevent.killall(greenlets)  # (the socket is closed next: not under a greenlet reading it)
        if self.readiness is not None:
            self.readiness.close()
        if status == 0:
            self.log.info("workers_stopped", workers=args.workers)
        return status

    def start(self, slot: int) -> bool:
        """Start the worker of ``slot``; False if the system would not (a ``fork`` refused:
        ``worker_start_failed``, tried again by :meth:`_retry_starts` after a delay doubling up
        to START_RETRY_MAX). A refused fork was an uncaught traceback that took the whole
        service down, the healthy workers with it (an attacker's pids cgroup, 4 of 4)."""
        try:
            self._spawn(slot)
        except (OSError, subprocess.SubprocessError) as exc:
            _, delay = self.retries.get(slot, (0.0, RESTART_DELAY))
            self.retries[slot] = (time.monotonic() + delay, min(delay * 2, START_RETRY_MAX))
            error = getattr(exc, "strerror", None) or str(exc)
            number = getattr(exc, "errno", None)
            self.log.error("worker_start_failed", slot=slot, error=error, errno=number, retry_in_s=delay)
            return False
        self.retries.pop(slot, None)
        return True

    def _retry_starts(self) -> None:
        """Start again, once their delay is over, the workers the system would not start."""
        now = time.monotonic()
        for slot, (when, _) in list(self.retries.items()):
            if now >= when and not self.stop.is_set():
                self.start(slot)

    def _spawn(self, slot: int) -> None:
        command = self.command
        if self.args.metrics_port is not None:  # one metrics port per worker: this + its slot
            metrics_port = self.args.metrics_port + slot if self.args.metrics_port else 0
            command = [*command, "--metrics-port", str(metrics_port)]
        env, writer = self.env, None
        if self.args.worker_timeout:
            reader, writer = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)  # (the worker never waits on it)
            env = {**env, HEARTBEAT_ENV: str(writer)}
        try:
            proc = subprocess.Popen(
                command, env=env, preexec_fn=_die_with_parent, pass_fds=() if writer is None else (writer,)
            )
        except BaseException:
            if writer is not None:
                os.close(reader)
            raise
        finally:
            if writer is not None:
                os.close(writer)  # (the worker's copy is the only one: its death closes the pipe)
        old = self.heartbeats[slot]
        if old is not None:
            old.close()
        self.heartbeats[slot] = Heartbeat(reader) if writer is not None else None
        self.workers[slot], self.started[slot] = proc, time.monotonic()
        self.log.info("worker_started", slot=slot, pid=proc.pid)

    def _check_workers(self) -> int:
        """Restart the workers that died; kill those silent for --worker-timeout (restarted
        at a later check, once they are gone); 1 once too many died as soon as they started."""
        self._retry_starts()
        for slot, proc in enumerate(self.workers):
            if proc is None:
                continue
            if proc.poll() is None:
                self._check_heartbeat(slot, proc)
                continue
            lived = self._exited(slot, proc)
            quick = lived < STARTUP_GRACE and not self._had_started(slot, proc.pid)
            self.quick_deaths = self.quick_deaths + 1 if quick else 0
            if self.quick_deaths >= GIVE_UP_AFTER:
                self.log.error(
                    "workers_failing", hint="workers exit as soon as they start; see their events above"
                )
                return 1
            self.stop.wait(RESTART_DELAY)
            if not self.stop.is_set():
                self.start(slot)
        return 0

    def _stop_all(self) -> None:
        """SIGTERM every worker (and SIGCONT: one stopped by SIGSTOP would handle its SIGTERM
        only once killed), wait for them (each flushes its clients), then kill stragglers. One
        that another signal than our SIGTERM ends meanwhile (killed: its clients' drops are
        not logged) is a ``worker_exited``; one that exits with a status of its own has logged
        why, and one our SIGTERM ended was still starting (its handler not yet installed)."""
        live = [(slot, p) for slot, p in enumerate(self.workers) if p is not None and p.poll() is None]
        for _, proc in live:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)  # (a stopped worker too: it flushes, not killed later)
        deadline = time.monotonic() + self.args.shutdown_flush + 5.0
        for slot, proc in live:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.log.warning("worker_killed", pid=proc.pid)
                proc.kill()
                proc.wait()
                continue
            if proc.returncode < 0 and proc.returncode != -signal.SIGTERM:  # (ours: one still starting)
                self._exited(slot, proc)
        gevent.sleep(0)

    def _exited(self, slot: int, proc: subprocess.Popen[bytes]) -> float:
        """Log ``worker_exited`` for the worker that exited from ``slot`` (reaped), and empty
        the slot; the seconds it lived."""
        lived = time.monotonic() - self.started[slot]
        self.log.warning(
            "worker_exited", slot=slot, pid=proc.pid, exit_status=proc.returncode, lived_s=round(lived, 1)
        )
        self.workers[slot] = None
        return lived

    def _had_started(self, slot: int, pid: int) -> bool:
        """Whether the worker ``pid`` that exited from ``slot`` had started: it listened (sent
        READY=1: killed as soon as it served, by an OOM killer say, it is replaced for as
        long as it takes), or was killed for its silence (it beat, or had
        FIRST_HEARTBEAT_TIMEOUT: stopped or stuck as soon as it served). Its READY=1 is
        forgotten. Before, any worker that lived less than STARTUP_GRACE counted as failing
        to start, and five killed so made the supervisor give up."""
        listened = self.readiness is not None and self.readiness.forget(pid)
        heartbeat = self.heartbeats[slot]
        return listened or (heartbeat is not None and heartbeat.killed)

    def _check_heartbeat(self, slot: int, proc: subprocess.Popen[bytes]) -> None:
        """Kill the worker in ``slot`` if it has sent no heartbeat for --worker-timeout seconds
        (FIRST_HEARTBEAT_TIMEOUT, if more, for its first); logged once."""
        heartbeat = self.heartbeats[slot]
        if heartbeat is None or heartbeat.killed:
            return
        timeout = self.args.worker_timeout
        silent = heartbeat.silence()
        if silent < (timeout if heartbeat.beaten else max(timeout, FIRST_HEARTBEAT_TIMEOUT)):
            return
        self.log.warning(
            "worker_unresponsive",
            slot=slot,
            pid=proc.pid,
            silent_s=round(silent, 1),
            worker_timeout=timeout,
            first_heartbeat=not heartbeat.beaten,
        )
        proc.kill()  # (SIGKILL ends a stopped process too)
        heartbeat.killed = True

    def _report_ready(self) -> None:
        """READY=1 to systemd once every worker running has sent it (the one in each slot:
        a worker that exited counts no more, its replacement must send its own)."""
        assert self.readiness is not None
        if self.readiness.wait(self._slot_pids, READY_TIMEOUT):
            notify(self._ready_message())

    def _slot_pids(self) -> list[int]:
        """The pid of the worker in each slot; NO_WORKER for a slot whose worker has exited
        (not yet restarted, or not yet seen by _check_workers)."""
        return [NO_WORKER if proc is None or proc.poll() is not None else proc.pid for proc in self.workers]

    def _ready_message(self) -> str:
        return f"READY=1\nSTATUS={len(self.workers)} workers serving on {self.args.host}:{self.port}"

    def _pass_hangup_on(self) -> None:
        for proc in self.workers:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGHUP)


class Heartbeat:
    """The supervisor's end of one worker's heartbeat pipe (non-blocking)."""

    __slots__ = ("fd", "heard", "checked", "beaten", "killed")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.heard = time.monotonic()  # the last heartbeat read; the worker's start before the first
        self.checked = self.heard  # the last call of silence()
        self.beaten = False  # a heartbeat came
        self.killed = False  # the supervisor killed the worker for its silence

    def silence(self) -> float:
        """Seconds the worker has sent no heartbeat while this process ran, after reading
        every one waiting (those written while this process alone was stopped are read now).
        Time this process did not run, beyond the CHECK_INTERVAL between two checks, is not
        counted: stopped and resumed with its workers (Ctrl-Z and fg, a SIGSTOP to the process
        group, a cgroup freeze), it may run before they do, and would find them all silent
        for that long, and kill them."""
        now = time.monotonic()
        self.heard += max(0.0, now - self.checked - CHECK_INTERVAL)
        self.checked = now
        try:
            while os.read(self.fd, 4096):  # (b"": the worker is gone, its end closed)
                self.heard, self.beaten = time.monotonic(), True
        except BlockingIOError:
            pass
        return time.monotonic() - self.heard

    def close(self) -> None:
        os.close(self.fd)


def beat_for_supervisor(timeout: float) -> None:
    """In a worker (HEARTBEAT_ENV set) with a ``timeout`` (--worker-timeout): write a
    heartbeat to the supervisor every HEARTBEAT_INTERVAL, or a quarter of ``timeout`` if that
    is less, from a greenlet, for as long as this process's event loop runs. Never waits: a
    pipe the supervisor has not read lately is full of heartbeats already. The first is
    written before this returns. Not in a process no supervisor started, whatever its
    environment holds: the descriptor could be anything there (its log, a client)."""
    fd = os.environ.get(HEARTBEAT_ENV)
    if fd and timeout and os.environ.get(SUPERVISOR_ENV) and _beat(int(fd)):
        gevent.spawn(_beat_every, int(fd), min(HEARTBEAT_INTERVAL, timeout / 4))


def _beat(fd: int) -> bool:
    """One heartbeat; False once the supervisor is gone (its end closed: die_with_supervisor
    ends this worker)."""
    try:
        os.write(fd, b".")
    except BlockingIOError:
        pass
    except OSError:
        return False
    return True


def _beat_every(fd: int, interval: float) -> None:
    while True:
        gevent.sleep(interval)
        if not _beat(fd):
            return


def _die_with_parent() -> None:
    """In the worker, before exec: SIGCONT it when the supervisor dies (see
    :func:`die_with_supervisor`); and SIGHUP ignored until the worker handles it itself (the
    supervisor passes SIGHUP on to every worker, one just started too, whose default action
    would be to die)."""
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # (kept across exec; the worker's handler replaces it)
    _set_death_signal()


def _set_death_signal() -> None:
    """SIGCONT this process when its parent dies (Linux's PR_SET_PDEATHSIG): a worker stopped
    by SIGSTOP runs again, to find its supervisor gone. (SIGTERM, as before, stayed pending in
    a stopped worker for ever: it kept listening on the port, its connections hung, and a new
    supervisor could not bind it.)"""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGCONT)
    except (OSError, AttributeError):
        pass  # not Linux: the supervisor's SIGTERM handling is all there is


def die_with_supervisor() -> bool:
    """In a worker whose signal handlers are installed: check that the supervisor has not
    died already (False if it has: the worker must exit), and from then on look every
    SUPERVISOR_CHECK seconds, from a greenlet, whether it is still this process's parent:
    when it is not (killed, even by SIGKILL), SIGTERM this process, whose shutdown flushes its
    clients. The death signal (SIGCONT) is asked for again: the request made before exec is
    lost if the supervisor died before it was made. True for a process not started by a
    supervisor."""
    supervisor = os.environ.get(SUPERVISOR_ENV)
    if not supervisor:
        return True
    _set_death_signal()
    if os.getppid() != int(supervisor):
        return False
    gevent.spawn(_watch_supervisor, int(supervisor))
    return True


def _watch_supervisor(supervisor: int) -> None:
    while os.getppid() == supervisor:
        gevent.sleep(SUPERVISOR_CHECK)
    os.kill(os.getpid(), signal.SIGTERM)  # (the handler that stop_requested installed)
