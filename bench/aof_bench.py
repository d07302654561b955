#!/usr/bin/env python3
"""Durability costs: write throughput with no log and with each fsync policy, and replay speed.

For each configuration it starts ``run_server.py`` (pinned to CPU 0 when ``taskset`` exists),
runs ``run_client.py bench -t put`` from CPU 1 (every batch of PUTs ends with a PING, so under
``--fsync always`` every batch waits for its fsync, shared between connections), and prints
ops/s and latency. Then it writes a log of ``--replay-records`` records and times a start-up
replay of it.

usage: python bench/aof_bench.py [-c 50] [-P 16] [-n 300000] [--replay-records 1000000]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import load, server  # noqa: E402
from kvgevent.stores.aof import MAGIC, encode_record  # noqa: E402
from kvgevent.stores.durable import DurableStore  # noqa: E402


def run_config(name: str, server_args: list[str], bench_args: list[str]) -> dict:
    with server(*server_args, cpu=0) as (_, port):
        report = load(port, "put", *bench_args, cpu=1)["put"]
    report["config"] = name
    return report


def replay_speed(records: int, directory: str) -> tuple[float, int]:
    path = os.path.join(directory, "replay.aof")
    with open(path, "wb") as out:
        out.write(MAGIC)
        batch = []
        for i in range(records):
            batch.append(encode_record(b"PUT:key%d:value%d" % (i % 100_000, i)))
            if len(batch) == 10_000:
                out.write(b"".join(batch))
                batch = []
        out.write(b"".join(batch))
    size = os.path.getsize(path)
    began = time.perf_counter()
    store = DurableStore(path)
    store.open()
    seconds = time.perf_counter() - began
    store.close()
    return seconds, size


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", dest="clients", default="50")
    parser.add_argument("-P", dest="pipeline", default="16")
    parser.add_argument("-n", dest="requests", default="300000")
    parser.add_argument("--replay-records", type=int, default=1_000_000)
    args = parser.parse_args()
    bench_args = ["-c", args.clients, "-P", args.pipeline, "-n", args.requests]
    with tempfile.TemporaryDirectory(prefix="kvaof-", dir=str(ROOT)) as directory:
        configs = [("no log", [])] + [
            (f"--fsync {policy}", ["--aof", os.path.join(directory, f"{policy}.aof"), "--fsync", policy])
            for policy in ("no", "everysec", "always")
        ]
        print(
            f"PUT, {args.clients} connections x pipeline {args.pipeline}, {args.requests} requests "
            "(each batch ends with a PING):"
        )
        print(f"{'config':<18} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8}")
        for name, server_args in configs:
            r = run_config(name, server_args, bench_args)
            print(f"{name:<18} {r['ops_s']:>10,} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}", flush=True)
        seconds, size = replay_speed(args.replay_records, directory)
        print(
            f"replay: {args.replay_records:,} records ({size / 1e6:.0f} MB) in {seconds:.2f} s = "
            f"{args.replay_records / seconds:,.0f} records/s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
