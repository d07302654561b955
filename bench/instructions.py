#!/usr/bin/env python3
"""Instructions per batch: kvgevent beside the lean card-shaped ceiling, counted, not timed.

Throughput ratios on a shared 2-core VM move 20-30 % from one hour to the next, and by a few
percent between two runs of the same build side by side; a change worth 3 % cannot be seen
in them. This counts the user-space instructions each server executes per batch of the load
generator's requests, under valgrind's callgrind (``Ir``), which does not depend on what
else the machine is doing: the same build and load give the same count within a fraction
of a percent. Collection is switched on (``callgrind_control -i on``) only once the server
serves and the keys are loaded, and off before it stops, so start-up is not counted.

Both servers make the same system calls per batch at these loads (``strace -c``: a ``recv``
and a ``send`` for each), so on a server that keeps its CPU busy, the ratio of the counts is
close to the ratio of the ops/s a compare run measures; the kernel's share, equal for both,
is not in the counts: the ratio of throughputs is nearer 1 than the ratio of counts.

Needs valgrind (``apt-get install -y valgrind``) and the load generator
(``../shared/bench/loadgen``, built with Go when ``--loadgen`` is not given).

usage: python bench/instructions.py [--shapes put:50x1,get:50x1,put:50x16] [--batches N]
                                    [--checkout DIR ...] [--ceiling PATH] [--loadgen PATH]
                                    [--redis]

``--checkout`` (repeatable) counts other checkouts of kvgevent beside this one (each with
a ``.venv`` or run by this Python): before and after a change, in one run. ``--redis`` counts
each checkout over a Redis too (redis-server, started here and pinned to CPU 1 with the load;
only kvgevent's instructions are counted, not Redis's). Under valgrind kvgevent is some 50
times slower and Redis is not: fewer requests wait for each round trip than in a native run,
so the dispatcher's cost per round trip weighs more per batch here than it does natively.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import free_port, pinned, redis_server  # noqa: E402

SHARED = ROOT.parent / "shared" / "bench"

SHAPES = "put:50x1,get:50x1,put:50x16,get:50x16"
"""Loads counted by default: mode:connections x pipeline (one request in flight per
connection is where kvgevent is furthest from the ceiling)."""

BATCHES = 10_000
"""Batches counted per run (the load generator is asked for this many times the pipeline in
requests): under callgrind a server runs some 50 times slower, so a run takes 15 to 60 s; the
per-batch figure moves by under 0.5 % with more (the 50 connections' set-up is in it)."""

KEYS = 1000
"""Preloaded keys: few enough to load quickly under callgrind."""

SLOWDOWN = 100
"""How many times slower a server runs under callgrind, about (50-100 here): kvgevent's
HEAVY_TURN is scaled by it, so that a batch that would not hold the loop for HEAVY_TURN
natively is not judged heavy for valgrind's slowness (which would send its client's next
request through the turn queue, a path the native run does not take)."""

_SLOWED = (
    "import sys; sys.path.insert(0, {checkout!r}); import kvgevent.config as config; "
    f"config.HEAVY_TURN *= {SLOWDOWN}; import runpy; sys.argv[0] = {{checkout!r}} + '/run_server.py'; "
    "runpy.run_path(sys.argv[0], run_name='__main__')"
)
"""``python -c`` that runs a checkout's run_server.py with HEAVY_TURN scaled by SLOWDOWN
(before the server's modules import it)."""

START_TIMEOUT = 120.0
"""Seconds a server under valgrind may take to start serving (kvgevent imports structlog,
redis-py and prometheus_client: about 20 s under callgrind)."""


def main() -> None:
    args = _parse()
    loadgen = args.loadgen or _build_loadgen()
    with contextlib.ExitStack() as stack:
        redis = stack.enter_context(redis_server(cpu=1)) if args.redis else None
        servers = _servers(args, redis)
        print(
            f"| load | {' | '.join(server.name for server in servers)} | "
            + " | ".join(_ratio_names(servers))
            + " |"
        )
        print("|---" * (1 + len(servers) + len(servers) - 1) + "|")
        for shape in args.shapes.split(","):
            mode, conns, pipeline = _shape(shape)
            counts = [
                _per_batch(server.command, loadgen, mode, conns, pipeline, args.batches) for server in servers
            ]
            ratios = [counts[server.against] / count for server, count in zip(servers, counts, strict=True)][
                1:
            ]
            cells = [f"{count:,.0f}" for count in counts] + [f"{ratio:.2f}" for ratio in ratios]
            print(f"| {mode.upper()} {conns} x {pipeline} | {' | '.join(cells)} |", flush=True)
    print(
        f"\ninstructions per batch (callgrind Ir, user space), about {args.batches:,} batches a run; "
        "ceiling / kvgevent is the share of kvgevent's instructions the ceiling needs"
        + (
            "; kvgevent / over Redis, the share of its instructions over Redis that it needs over memory"
            if args.redis
            else ""
        )
    )


class Server(NamedTuple):
    """A server counted: its name, its command (its port as PORT), and the index of the
    server its ratio is taken against (the ceiling for kvgevent over memory; the same
    checkout over memory for one over Redis)."""

    name: str
    command: list[str]
    against: int


def _ratio_names(servers: list[Server]) -> list[str]:
    return [f"{servers[server.against].name} / {server.name}" for server in servers[1:]]


PORT = "{port}"
"""Where a server's command takes its port (:func:`_servers`)."""


def _servers(args: argparse.Namespace, redis: int | None) -> list[Server]:
    """The ceiling, then each kvgevent checkout over memory, then (``redis``: a Redis's port)
    each over that Redis."""
    servers = [Server("ceiling", [_python(ROOT), str(args.ceiling), PORT], 0)]
    checkouts = [ROOT, *args.checkout]
    for checkout in checkouts:
        name = "kvgevent" if checkout == ROOT else f"kvgevent@{checkout}"
        servers.append(Server(name, _kvgevent(checkout), 0))
    if redis is not None:
        for index, checkout in enumerate(checkouts, start=1):
            store = ["--store", f"redis://127.0.0.1:{redis}/0"]
            servers.append(Server(f"{servers[index].name} over Redis", _kvgevent(checkout, *store), index))
    return servers


def _kvgevent(checkout: Path, *args: str) -> list[str]:
    """The command that runs ``checkout``'s server (HEAVY_TURN scaled: see _SLOWED)."""
    slowed = _SLOWED.format(checkout=str(checkout))
    return [_python(checkout), "-c", slowed, "--log-level", "warning", "--port", PORT, *args]


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default=SHAPES, help=f"mode:CxP,... (default: {SHAPES})")
    parser.add_argument("--batches", type=int, default=BATCHES, help=f"batches a run (default: {BATCHES})")
    parser.add_argument("--checkout", type=Path, action="append", default=[], help="another checkout")
    parser.add_argument("--ceiling", type=Path, default=SHARED / "ceiling" / "gcard_lean.py")
    parser.add_argument("--loadgen", help="a built kvloadgen (default: build ../shared/bench/loadgen)")
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also count each checkout over a Redis of its own (redis-server, on CPU 1)",
    )
    args = parser.parse_args()
    for tool in ("valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            parser.error(f"{tool} not found: apt-get install -y valgrind")
    return args


def _shape(text: str) -> tuple[str, int, int]:
    match = re.fullmatch(r"(get|put|mix):(\d+)x(\d+)", text.strip())
    if match is None:
        raise SystemExit(f"not a shape: {text!r} (mode:CxP, e.g. put:50x1)")
    return match[1], int(match[2]), int(match[3])


def _python(checkout: Path) -> str:
    venv = checkout / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def _build_loadgen() -> str:
    out = Path(tempfile.mkdtemp(prefix="kvloadgen-")) / "loadgen"
    subprocess.run(["go", "build", "-o", str(out), "."], cwd=SHARED / "loadgen", check=True)
    return str(out)


def _per_batch(command: list[str], loadgen: str, mode: str, conns: int, pipeline: int, batches: int) -> float:
    """Instructions the server ``command`` (its port as PORT) executed per batch of the load."""
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        server = subprocess.Popen(
            [
                *pinned(0),
                "valgrind",
                "--tool=callgrind",
                "--instr-atstart=no",
                f"--callgrind-out-file={out}",
                *(str(port) if arg == PORT else arg for arg in command),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_listening(port, server)
            prefix = f"ic{os.getpid()}"
            common = ["-addr", f"127.0.0.1:{port}", "-keys", str(KEYS), "-prefix", prefix, "-quiet"]
            preload = [*pinned(1), loadgen, "-mode", "preload", *common]
            subprocess.run(preload, check=True, capture_output=True)
            _instrument(server.pid, "on")
            report = subprocess.run(
                [
                    *pinned(1),
                    loadgen,
                    *common,
                    "-mode",
                    mode,
                    "-conns",
                    str(conns),
                    "-pipeline",
                    str(pipeline),
                    "-requests",
                    str(batches * pipeline),  # (about that many batches: the count is read back below)
                    "-warmup",
                    "0s",
                    "-timeout",
                    "60s",
                    "-preload=false",
                ],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            _instrument(server.pid, "off")
        finally:
            server.terminate()
            server.wait(timeout=120)
        done = json.loads(report)["batches"]
        return _total(out) / done


def _instrument(pid: int, state: str) -> None:
    subprocess.run(["callgrind_control", "-i", state, str(pid)], check=True, capture_output=True)


def _total(out: Path) -> int:
    """The ``Ir`` total of a callgrind output: its ``totals:`` line (``summary:`` counts only
    what ran before collection was switched on: 0 here)."""
    for line in out.read_text(errors="replace").splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise SystemExit(f"no totals in {out}")


def _wait_listening(port: int, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode} before it served")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"nothing listened on {port} within {START_TIMEOUT:.0f} s")


if __name__ == "__main__":
    main()
