#!/usr/bin/env python3
"""How much memory do clients that never read cost the server, and do the others notice?

Starts ``run_server.py`` on a free loopback port, stores one ``--value-size`` value, then opens
``--clients`` connections (default 1,000) that each send enough GETs of it to overflow the
kernel's buffers and their queue (``--replies-mb`` of replies each), and never read. While the
server works through the floods, a well-behaved client times PUT+GET round trips. Prints the
server's RSS before, at its peak, per stuck client, and after the stuck clients are gone, plus
the well-behaved client's latency.

Per stuck client the server holds at most its queue (``--queue-size`` lines, ``--queue-bytes``)
plus the writer's batch in flight (1 MiB at most); everything beyond is dropped and counted.

usage: python bench/stuck_clients.py [--clients 1000] [--value-size 1000] [--replies-mb 8]
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

from bench.common import proc_status, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--value-size", type=int, default=1000)
    parser.add_argument("--replies-mb", type=float, default=8.0, help="MB of replies each client asks for")
    args = parser.parse_args()
    gets = int(args.replies_mb * 1e6 / (args.value_size + 6))

    stuck: list[socket.socket] = []
    with server() as (server_proc, port):
        try:
            good = Client(port=port, timeout=60)
            good.put("v", b"x" * args.value_size)
            baseline, _ = proc_status(server_proc.pid)
            target = good.stats()["commands"] + args.clients * gets
            flood = b"GET:v\n" * gets
            latencies: list[float] = []
            slow: list[tuple[float, float]] = []  # (started at, took) of round trips over 0.5 s
            start = time.monotonic()
            done = False

            def probe() -> None:
                while not done:
                    begin = time.monotonic()
                    good.put("good", b"1")
                    good.get("good")
                    good.delete("good")
                    latencies.append(time.monotonic() - begin)
                    if latencies[-1] > 0.5:
                        slow.append((round(begin - start, 2), round(latencies[-1], 2)))
                    gevent.sleep(0.01)

            prober = gevent.spawn(probe)

            def one() -> None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                stuck.append(sock)
                sock.sendall(flood)

            gevent.joinall([gevent.spawn(one) for _ in range(args.clients)], raise_error=True)
            monitor = Client(port=port, timeout=60)
            peak = baseline
            while monitor.stats()["commands"] < target:
                peak = max(peak, proc_status(server_proc.pid)[0])
                gevent.sleep(0.2)
            rss, fds = proc_status(server_proc.pid)
            peak = max(peak, rss)
            stats = monitor.stats()
            elapsed = time.monotonic() - start
            done = True
            prober.join()
            for sock in stuck:
                sock.close()
            deadline = time.monotonic() + 60
            while monitor.stats()["active"] > 1 and time.monotonic() < deadline:
                gevent.sleep(0.2)
            gevent.sleep(1)
            after, fds_after = proc_status(server_proc.pid)
            latencies.sort()
            n = len(latencies)
            print(
                f"{args.clients} clients that never read, each asking for {gets} GETs of {args.value_size} B "
                f"({args.replies_mb:g} MB of replies); the server applied them in {elapsed:.1f} s"
            )
            print(
                f"server RSS: {baseline} kB before, peak {peak} kB "
                f"({(peak - baseline) / args.clients:.0f} kB per stuck client), {after} kB after they left "
                f"(fds {fds} -> {fds_after})"
            )
            print(f"replies dropped: {stats['messages_dropped']}; active while stuck: {stats['active']}")
            print(
                f"well-behaved client meanwhile: {n} round trips, p50 {latencies[n // 2] * 1000:.1f} ms, "
                f"p99 {latencies[n * 99 // 100] * 1000:.1f} ms, max {latencies[-1] * 1000:.0f} ms"
            )
            if slow:
                print(f"round trips over 0.5 s, as (started at s, took s): {slow}")
            good.close()
            monitor.close()
            return 0
        finally:
            for sock in stuck:
                sock.close()


if __name__ == "__main__":
    sys.exit(main())
