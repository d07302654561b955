#!/usr/bin/env python3
"""Soak test: does the server's memory stop growing under churn and slow readers?

Starts ``run_server.py`` on a free loopback port, then for ``--minutes``:

* ``--clients`` connection slots (default 1,000) churn without pause: each connects, writes
  and reads a little, stays 0.5-2 s and leaves with a clean close or a reset; ``--slow`` of
  them (default 100) are slow readers instead: they flood GETs of a ``--value-size`` value
  (8 MB of replies), read nothing for 5-15 s, then leave;
* one well-behaved client does a PUT+GET round trip every 10 ms and records its latency.

Every ``--every`` seconds it prints the server's RSS, open fds and counters. At the end it
stops the churn, checks that active/dropped add up, and prints the verdict on RSS (growth
between the middle and the end of the run), the peak RSS, and the well-behaved client's p99.

usage: python bench/soak.py [--minutes 3] [--clients 1000] [--slow 100] [--value-size 1000] [--every 10]
exit status: 0 if RSS stopped growing and the counts are exact, 1 otherwise
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import random  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_status, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402

RESET = struct.pack("ii", 1, 0)


class Churn:
    """Connection slots that come and go until ``running`` is cleared."""

    def __init__(self, port: int, seed: int, slow_gets: int) -> None:
        self.port = port
        self.rng = random.Random(seed)
        self.slow_gets = slow_gets
        self.running = True
        self.connections = 0

    def slot(self, slow: bool) -> None:
        while self.running:
            try:
                self.visit(slow)
            except OSError:
                pass  # a reset we caused, or the server shedding us: churn goes on

    def visit(self, slow: bool) -> None:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        self.connections += 1
        try:
            if slow:  # flood GETs, read nothing for a while, then leave
                sock.sendall(b"GET:slow\n" * self.slow_gets)
                gevent.sleep(self.rng.uniform(5, 15))
            else:
                key = b"churn%d" % self.rng.randrange(1000)
                sock.sendall(b"PUT:" + key + b":x\nGET:" + key + b"\nDELETE:" + key + b"\nPING\n")
                data = b""
                while not data.endswith(b"PONG\n"):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                gevent.sleep(self.rng.uniform(0.5, 2.0))
            if self.rng.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, RESET)
        finally:
            sock.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=1000, help="churning connection slots")
    parser.add_argument("--slow", type=int, default=100, help="of which slow readers")
    parser.add_argument("--value-size", type=int, default=1000, help="bytes of the value slow readers GET")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between samples")
    args = parser.parse_args()

    with server() as (server_proc, port):
        good = Client(port=port, timeout=30)
        good.put("slow", b"s" * args.value_size)
        monitor = Client(port=port, timeout=30)  # its own connection: one greenlet per socket
        latencies: list[float] = []

        def well_behaved() -> None:
            i = 0
            while churn.running:
                begin = time.monotonic()
                good.put("good", b"%d" % i)
                assert good.get("good")[-1] == b"%d" % i
                latencies.append(time.monotonic() - begin)
                if i % 100 == 99:
                    good.delete("good")
                i += 1
                gevent.sleep(0.01)

        # Enough GETs that the replies (8 MB) overflow the kernel's buffers and the queue.
        churn = Churn(port, seed=1, slow_gets=max(1000, (8 << 20) // args.value_size))
        slots = [gevent.spawn(churn.slot, i < args.slow) for i in range(args.clients)]
        prober = gevent.spawn(well_behaved)
        start = time.monotonic()
        samples: list[tuple[float, int]] = []
        print(
            f"{'t_s':>6} {'rss_kB':>8} {'fds':>6} {'active':>7} {'dropped':>8} {'msgs_dropped':>13} "
            f"{'p99_ms':>7}"
        )
        while time.monotonic() - start < args.minutes * 60:
            gevent.sleep(args.every)
            rss, fds = proc_status(server_proc.pid)
            stats = monitor.stats()
            recent = sorted(latencies[-2000:]) or [0.0]
            p99 = recent[len(recent) * 99 // 100] * 1000
            elapsed = time.monotonic() - start
            samples.append((elapsed, rss))
            print(
                f"{elapsed:6.0f} {rss:8d} {fds:6d} {stats['active']:7d} {stats['dropped']:8d} "
                f"{stats['messages_dropped']:13d} {p99:7.1f}",
                flush=True,
            )
        churn.running = False
        gevent.joinall([*slots, prober], timeout=60)
        deadline = time.monotonic() + 10
        good.close()
        while monitor.stats()["active"] != 1 and time.monotonic() < deadline:
            gevent.sleep(0.1)
        stats = monitor.stats()
        rss, fds = proc_status(server_proc.pid)
        # Still connected: the monitor. Churned, plus the well-behaved client, all dropped.
        exact = stats["active"] == 1 and stats["dropped"] == stats["connections"] - 1
        # Besides the churn: the start-up probe (bench.common), the well-behaved client, the monitor.
        exact = exact and stats["connections"] == churn.connections + 3
        half = max(1, len(samples) // 2)  # RSS in the first half of the run against the second
        middle = max((r for _, r in samples[:half]), default=rss)
        end = max((r for _, r in samples[half:]), default=middle)
        growth = (end - middle) / middle
        latencies.sort()
        p50, p99 = latencies[len(latencies) // 2] * 1000, latencies[len(latencies) * 99 // 100] * 1000
        counts = " ".join(f"{k}={stats[k]}" for k in ("connections", "active", "dropped", "messages_dropped"))
        verdict = "exact" if exact else "MISMATCH"
        print(f"connections churned: {churn.connections}; server: {counts} -> {verdict}")
        print(
            f"RSS: peak {max(r for _, r in samples)} kB; first-half max {middle} kB, "
            f"second-half max {end} kB "
            f"({growth:+.1%}); after churn {rss} kB with {fds} fds open"
        )
        print(
            f"well-behaved client: {len(latencies)} round trips, p50 {p50:.2f} ms, p99 {p99:.2f} ms, "
            f"max {latencies[-1] * 1000:.1f} ms"
        )
        stable = growth < 0.10
        print(
            "verdict:",
            "RSS stopped growing" if stable else "RSS still growing",
            "/",
            "counts exact" if exact else "counts wrong",
        )
        monitor.close()
        return 0 if stable and exact else 1


if __name__ == "__main__":
    sys.exit(main())
