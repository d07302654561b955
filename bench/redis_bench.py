#!/usr/bin/env python3
"""Throughput over Redis: one worker over memory, against one and two workers over a local
redis-server (started here on a free loopback port, no persistence).

Each configuration is loaded with ``run_client.py bench`` (GET and PUT, ``-c`` connections,
``-P`` requests per write, ``--processes`` bench processes). Everything shares this machine's
cores (server workers, Redis, the bench), so the figures say how the pieces compare here, not
what separate machines would do.

usage: python bench/redis_bench.py [-c 50] [-P 16] [-n 1000000] [--processes 1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, redis_server, server  # noqa: E402


def measure(server_args: list[str], bench_args: list[str]) -> dict[str, dict]:
    with server(*server_args) as (_, port):
        time.sleep(1.0)  # every worker up
        return load(port, "get,put", *bench_args)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", dest="clients", default="50")
    parser.add_argument("-P", dest="pipeline", default="16")
    # (a million: a test of a few seconds; at 200,000 each lasted under a second, and its
    # ramp-up and tail moved the figures by a tenth from one run to the next)
    parser.add_argument("-n", dest="requests", default="1000000")
    parser.add_argument("--processes", default="1")
    args = parser.parse_args()
    bench_args = ["-c", args.clients, "-P", args.pipeline, "-n", args.requests, "--processes", args.processes]
    with redis_server() as redis_port:
        url = f"redis://127.0.0.1:{redis_port}/0"
        configs = [
            ("1 worker, memory store", []),
            ("1 worker, Redis store", ["--store", url]),
            ("2 workers, Redis store", ["--store", url, "--workers", "2"]),
        ]
        print(
            f"{args.clients} connections x pipeline {args.pipeline}, {args.requests} requests per test, "
            f"{args.processes} bench process(es):"
        )
        print(f"{'config':<26} {'GET ops/s':>11} {'PUT ops/s':>11} {'GET p99 ms':>11}")
        for name, server_args in configs:
            r = measure(server_args, bench_args)
            get, put = r["get"], r["put"]
            row = f"{name:<26} {get['ops_s']:>11,} {put['ops_s']:>11,} {get['p99_ms']:>11.2f}"
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
