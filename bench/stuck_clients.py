#!/usr/bin/env python3
"""How much memory do clients that never read cost the server, and do the others notice?

Starts ``run_server.py`` on a free loopback port, stores one key of ``--values`` values of
``--value-size`` bytes, then opens ``--clients`` connections (default 1,000) that each send
enough GETs of it to overflow the kernel's buffers and their queue (``--replies-mb`` of
replies each, or ``--gets`` GETs), and never read. While the server works through the floods,
a well-behaved client times PUT+GET round trips. Prints the server's RSS before, at its peak,
per stuck client, and after the stuck clients are gone, plus the well-behaved client's latency.

Per stuck client the server holds at most its queue (``--queue-size`` lines, ``--queue-bytes``,
counting the writer's batch in flight) or one reply line when that is bigger; everything beyond
is dropped and counted (a big GET reply is built in pieces, and once the client's queue is full
the rest is counted without being built). The script checks the peak per stuck client against
``--queue-bytes`` plus 2 MiB.

With ``--redis`` the server runs over a redis-server of its own, and the script prints what
Redis was asked for: whole GETs and first fetches (GETRANGE of a reply's first 256 KiB: a longer
reply is fetched whole only for a client with room for it).

usage: python bench/stuck_clients.py [--clients 1000] [--value-size 1000] [--replies-mb 8]
       python bench/stuck_clients.py --clients 100 --values 100 --value-size 1048576 --gets 5
       python bench/stuck_clients.py --redis --clients 10 --values 8 --value-size 1000000 --gets 30
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_status, redis_server, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402
from kvgevent.config import DEFAULT_QUEUE_BYTES  # noqa: E402

MiB = 1 << 20


class Prober:
    """A well-behaved client timing PUT+GET+DELETE round trips every 10 ms, in a greenlet."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.latencies: list[float] = []
        self.slow: list[tuple[float, float]] = []  # (started at, took) of round trips over 0.5 s
        self.start = time.monotonic()
        self.done = False
        self.greenlet = gevent.spawn(self._run)

    def _run(self) -> None:
        while not self.done:
            begin = time.monotonic()
            self.client.put("good", b"1")
            self.client.get("good")
            self.client.delete("good")
            self.latencies.append(time.monotonic() - begin)
            if self.latencies[-1] > 0.5:
                self.slow.append((round(begin - self.start, 2), round(self.latencies[-1], 2)))
            gevent.sleep(0.01)

    def stop(self) -> str:
        self.done = True
        self.greenlet.join()
        latencies = sorted(self.latencies)
        n = len(latencies)
        return (
            f"well-behaved client meanwhile: {n} round trips, p50 {latencies[n // 2] * 1000:.1f} ms, "
            f"p99 {latencies[n * 99 // 100] * 1000:.1f} ms, max {latencies[-1] * 1000:.0f} ms"
        )


def store_key(client: Client, values: int, size: int) -> None:
    with client.pipeline() as pipe:
        for index in range(values):
            pipe.put("v", (b"%d" % index).rjust(size, b"x"))


def wait_for_peak(monitor: Client, pid: int, target: int, baseline: int) -> int:
    """Poll RSS until the server has counted ``target`` commands and has worked through the
    floods: replies were dropped and none more for 2 s (or none at all for 5 s: the queues
    held everything). Returns the highest RSS seen, in kB."""
    peak = baseline
    dropped, still_since = -1, time.monotonic()
    while True:
        peak = max(peak, proc_status(pid)[0])
        stats = monitor.stats()
        if stats["messages_dropped"] != dropped:
            dropped, still_since = stats["messages_dropped"], time.monotonic()
        elif stats["commands"] >= target and time.monotonic() - still_since >= (2.0 if dropped else 5.0):
            return max(peak, proc_status(pid)[0])
        gevent.sleep(0.1)


def wait_gone(monitor: Client) -> None:
    deadline = time.monotonic() + 60
    while monitor.stats()["active"] > 1 and time.monotonic() < deadline:
        gevent.sleep(0.2)
    gevent.sleep(1)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--values", type=int, default=1, help="values the key holds")
    parser.add_argument("--value-size", type=int, default=1000)
    parser.add_argument("--replies-mb", type=float, default=8.0, help="MB of replies each client asks for")
    parser.add_argument("--gets", type=int, help="GETs each client sends (instead of --replies-mb)")
    parser.add_argument("--queue-bytes", type=int, default=DEFAULT_QUEUE_BYTES, help="the server's")
    parser.add_argument("--redis", action="store_true", help="the server over a redis-server of its own")
    return parser.parse_args()


def redis_calls(port: int | None) -> dict[str, int]:
    """Whole GETs and first fetches (GETRANGE) the Redis on ``port`` has run, and the bytes it
    has sent (none: {}). (The whole GETs include the server's bookkeeping: a GET of the
    cluster figures with each STATS this script polls.)"""
    if port is None:
        return {}
    import redis

    with contextlib.closing(redis.Redis(port=port)) as raw:
        stats = raw.info("commandstats")
        sent = raw.info("stats")["total_net_output_bytes"]
    calls = {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("get", "getrange")}
    return {**calls, "sent": sent}


def main() -> int:
    args = parse_args()
    reply = args.values * (args.value_size + 3)
    gets = args.gets or max(1, int(args.replies_mb * 1e6 / reply))
    server_args = ["--queue-bytes", str(args.queue_bytes), "--max-line", str(args.value_size + 64)]
    stuck: list[socket.socket] = []
    with contextlib.ExitStack() as stack:
        redis_port = stack.enter_context(redis_server()) if args.redis else None
        if redis_port is not None:
            server_args += ["--store", f"redis://127.0.0.1:{redis_port}/0"]
        server_proc, port = stack.enter_context(server(*server_args))
        try:
            good = Client(port=port, timeout=60)
            store_key(good, args.values, args.value_size)
            baseline, _ = proc_status(server_proc.pid)
            asked = redis_calls(redis_port)
            target = good.stats()["commands"] + args.clients * gets
            flood = b"GET:v\n" * gets
            prober = Prober(good)

            def one() -> None:
                sock = socket.create_connection(("127.0.0.1", port), timeout=120)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # pins little in the kernel
                stuck.append(sock)
                sock.sendall(flood)

            gevent.joinall([gevent.spawn(one) for _ in range(args.clients)], raise_error=True)
            monitor = Client(port=port, timeout=60)
            peak = wait_for_peak(monitor, server_proc.pid, target, baseline)
            _, fds = proc_status(server_proc.pid)
            stats = monitor.stats()
            asked = {name: calls - asked[name] for name, calls in redis_calls(redis_port).items()}
            elapsed = time.monotonic() - prober.start
            latency = prober.stop()
            for sock in stuck:
                sock.close()
            wait_gone(monitor)
            after, fds_after = proc_status(server_proc.pid)
            per_client = (peak - baseline) * 1024 / args.clients
            bound = args.queue_bytes + 2 * MiB
            print(
                f"{args.clients} clients that never read, each asking for {gets} GETs of {args.values} x "
                f"{args.value_size} B ({gets * reply / 1e6:g} MB of replies); the server applied them in "
                f"{elapsed:.1f} s"
            )
            print(
                f"server RSS: {baseline} kB before, peak {peak} kB "
                f"({per_client / MiB:.2f} MiB per stuck client), {after} kB after they left "
                f"(fds {fds} -> {fds_after})"
            )
            verdict = "within" if per_client <= bound else "OVER"
            print(
                f"per stuck client: {per_client / MiB:.2f} MiB, {verdict} --queue-bytes + 2 MiB "
                f"= {bound / MiB:.0f} MiB"
            )
            print(f"replies dropped: {stats['messages_dropped']}; active while stuck: {stats['active']}")
            if asked:
                print(
                    f"Redis sent {asked['sent'] / 1e6:.1f} MB, ran {asked['get']} whole GETs (with the "
                    f"STATS polls') and {asked['getrange']} first fetches (GETRANGE)"
                )
            print(latency)
            if prober.slow:
                print(f"round trips over 0.5 s, as (started at s, took s): {prober.slow}")
            good.close()
            monitor.close()
            return 0 if per_client <= bound else 1
        finally:
            for sock in stuck:
                sock.close()


if __name__ == "__main__":
    sys.exit(main())
