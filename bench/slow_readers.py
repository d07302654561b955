#!/usr/bin/env python3
"""Over Redis, what do clients reading big replies slowly cost the server's memory, at peak and
after they left?

Starts a redis-server and ``run_server.py --store redis://... --max-memory M`` of their own on
free loopback ports and stores one key of ``--values`` values of ``--value-size`` bytes (a reply
longer than the first fetch's 256 KiB: fetched whole for a client that reads). Each round,
``--clients`` clients each send one GET of it and read the reply at ``--rate`` kB/s for
``--seconds`` (or to its end), then close; meanwhile the script samples the server's RSS and
STATS ``used_memory`` every 0.5 s. After each round it waits MEMORY_TRIM_INTERVAL and a second
with no client (the server hands freed memory back to the OS then) and reads RSS again.
Prints, per round: the peak of RSS and of ``used_memory``, clients disconnected for memory,
and RSS once they left, against RSS at start.

usage: python bench/slow_readers.py [--clients 5] [--values 20] [--value-size 1000000]
       [--rate 300] [--seconds 8] [--max-memory 150M] [--rounds 3]
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_status, redis_server, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402
from kvgevent.server.memory import MEMORY_TRIM_INTERVAL  # noqa: E402

MiB = 1 << 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--values", type=int, default=20, help="values the key holds")
    parser.add_argument("--value-size", type=int, default=1_000_000)
    parser.add_argument("--rate", type=float, default=300.0, help="kB/s each client reads")
    parser.add_argument("--seconds", type=float, default=8.0, help="how long each client reads")
    parser.add_argument("--max-memory", default="150M", help="the server's --max-memory")
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


def read_slowly(port: int, rate: float, seconds: float) -> int:
    """One GET of the key, its reply read at ``rate`` kB/s for ``seconds``; bytes read."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=seconds + 30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    got, began = 0, time.monotonic()
    try:
        sock.sendall(b"GET:big\nPING\n")
        tail = b""
        while time.monotonic() - began < seconds:
            data = sock.recv(64 << 10)
            if not data:
                break
            got += len(data)
            tail = (tail + data)[-5:]
            if tail == b"PONG\n":
                break
            gevent.sleep(max(0.0, began + got / (rate * 1000) - time.monotonic()))
    except OSError:
        pass  # (disconnected for memory: counted by the server)
    finally:
        sock.close()
    return got


def one_round(port: int, pid: int, monitor: Client, args: argparse.Namespace) -> str:
    before = monitor.stats()
    readers = [gevent.spawn(read_slowly, port, args.rate, args.seconds) for _ in range(args.clients)]
    peak_rss = peak_used = 0
    while not all(reader.dead for reader in readers):
        peak_rss = max(peak_rss, proc_status(pid)[0] >> 10)
        peak_used = max(peak_used, monitor.stats()["used_memory"] >> 20)
        gevent.sleep(0.5)
    after = monitor.stats()
    gevent.sleep(MEMORY_TRIM_INTERVAL + 1)
    evicted = after["evicted_clients"] - before["evicted_clients"]
    read = sum(reader.value or 0 for reader in readers) / MiB
    return (
        f"peak RSS {peak_rss} MB, peak used_memory {peak_used} MB, {evicted} disconnected for memory, "
        f"{read:.1f} MB read; RSS {proc_status(pid)[0] >> 10} MB after they left"
    )


def main() -> int:
    args = parse_args()
    with redis_server() as redis_port:
        store = ["--store", f"redis://127.0.0.1:{redis_port}/0", "--max-memory", args.max_memory]
        with server(*store) as (proc, port):
            writer = Client(port=port, timeout=60)
            for n in range(args.values):
                writer.put("big", f"{n}-".ljust(args.value_size, "v"))
            writer.close()
            monitor = Client(port=port, timeout=60)
            print(f"RSS at start {proc_status(proc.pid)[0] >> 10} MB (--max-memory {args.max_memory})")
            for number in range(1, args.rounds + 1):
                print(f"round {number}: {one_round(port, proc.pid, monitor, args)}", flush=True)
            monitor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
