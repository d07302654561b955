#!/usr/bin/env python3
"""Compaction under load (issue 10): the worst round trip of a polite client while the server
compacts a big append-only file, and the server's peak RSS beside the size of the data.

Targets: worst polite round trip under 50 ms, peak RSS under 1.2x the data (key + value bytes).

How. The log is written directly with ``kvgevent.stores.aof``'s ``MAGIC`` and ``encode_record``, not
sent through a socket: it is faster, a 1 MiB value would not pass the default ``--max-line``,
and the start-up replay it gives is timed too. It is fsynced before the server starts, as a
log kept by ``--fsync everysec`` would be (no gigabyte of dirty pages left for the server's
first fsync, which would fall inside the compaction). It holds one key ``big`` with ``--big-values`` values of
``--big-size`` bytes, ``--small-keys`` keys ``k<i>`` holding ``v<i>``, then churn
(``PUT:junk:<big value>`` + ``DELETE:junk``) until the file is ``--log-ratio`` times the live
records, so the compaction has something to drop. Then ``run_server.py`` starts on it through
``bench/common.py``'s ``server()`` (pinned to CPU 0; this process moves to CPU 1) with
``--fsync everysec``, ``--aof-rewrite-min-size 1`` and an ``--aof-rewrite-growth`` just above
1: a replay never starts a compaction, and the first write that grows the file by 256 KiB does
(``DurableStore._should_rewrite``: size >= min size and >= growth x the size after the load).
That write is a 512 KiB PUT of a key ``trigger``, sent once a polite client (``GET:k1`` +
``PING``, 10 ms pauses, its own connection and thread) has run for a second. A writer (10 PUTs +
``PING`` every 50 ms, new keys) runs from then on to show that writes go on. STATS on a third
connection, polled every 10 ms, tells when the compaction ends (``aof_rewrites`` counts it); the
compaction's seconds are from the trigger to that poll. ``server()`` sends the server's stderr to
/dev/null, so the ``aof_rewritten`` log event is not read. A thread samples the server's VmRSS
every 20 ms from its launch (the replay included) until after the compaction.

usage: python bench/compaction_bench.py [--big-values 1000] [--big-size 1048576]
       [--small-keys 1000000] [--log-ratio 1.5] [--dir DIR] [--json]
exit status: 0 if both targets are met, 1 otherwise
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_status, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402
from kvgevent.stores.aof import MAGIC, encode_record  # noqa: E402

TARGET_RTT_MS = 50.0
TARGET_RSS_RATIO = 1.2
GROWTH_MARGIN = 256 << 10
"""Bytes the log must grow after the replay before a compaction starts..."""
TRIGGER_SIZE = 2 * GROWTH_MARGIN
"""...and the value of the PUT that makes it grow that much."""
POLITE_REQUEST = b"GET:k1\nPING\n"
POLITE_PAUSE = 0.01
WRITER_PUTS = 10
WRITER_PAUSE = 0.05
POLL_S = 0.01
SAMPLE_S = 0.02
BASELINE_S = 1.0
"""Seconds of polite round trips before the trigger (and of settling after the start)."""
COMPACTION_TIMEOUT = 900.0
SMALL_BATCH = 10_000


# --- the log ------------------------------------------------------------------------------------


def write_big(out: BinaryIO, count: int, size: int) -> int:
    """``count`` values of ``size`` bytes for the key ``big``; returns their key + value bytes."""
    filler = b"x" * size
    for i in range(count):
        value = (b"%08d" % i + filler)[:size]
        out.write(encode_record(b"PUT:big:" + value))
    return count * (len(b"big") + size)


def write_small(out: BinaryIO, count: int) -> int:
    """Keys ``k<i>`` holding ``v<i>``; returns their key + value bytes."""
    data = 0
    for start in range(0, count, SMALL_BATCH):
        payloads = [b"PUT:k%d:v%d" % (i, i) for i in range(start, min(count, start + SMALL_BATCH))]
        out.write(b"".join([encode_record(p) for p in payloads]))
        data += sum(len(p) - len(b"PUT::") for p in payloads)
    return data


def write_churn(out: BinaryIO, target: int, size: int) -> int:
    """PUT + DELETE pairs of a throwaway key until ``target`` bytes; returns the pairs."""
    put, delete = encode_record(b"PUT:junk:" + b"j" * size), encode_record(b"DELETE:junk")
    pairs = written = 0
    while written < target:
        out.write(put)
        out.write(delete)
        written += len(put) + len(delete)
        pairs += 1
    return pairs


def build_log(path: str, args: argparse.Namespace) -> dict[str, Any]:
    began = time.perf_counter()
    with open(path, "wb") as out:
        out.write(MAGIC)
        data = write_big(out, args.big_values, args.big_size)
        data += write_small(out, args.small_keys)
        live = out.tell()
        pairs = write_churn(out, int(live * (args.log_ratio - 1)), max(args.big_size, 1024))
        out.flush()
        os.fsync(out.fileno())  # as a log kept by --fsync everysec would be: no GBs left dirty
    return {
        "data_bytes": data,
        "live_log_bytes": live,
        "log_bytes": os.path.getsize(path),
        "churn_pairs": pairs,
        "write_s": round(time.perf_counter() - began, 2),
    }


# --- watching the server ------------------------------------------------------------------------


def child_pid() -> int | None:
    """The pid of a child of this process (the server), from /proc/<pid>/stat."""
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as stat:
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            return int(name)
    return None


class RssSampler(threading.Thread):
    """VmRSS of the server every SAMPLE_S, as (perf_counter, kB), from the moment it exists."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.pid: int | None = None
        self.samples: list[tuple[float, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            if self.pid is None:
                self.pid = child_pid()
            if self.pid is not None:
                with contextlib.suppress(OSError, StopIteration, ValueError):  # gone, or a zombie
                    self.samples.append((time.perf_counter(), proc_status(self.pid)[0]))
            self.done.wait(SAMPLE_S)

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for at, rss in self.samples if start <= at <= end), default=0)

    def stop(self) -> None:
        self.done.set()
        self.join()


class Prober(threading.Thread):
    """One connection sending ``request(i)`` (which ends with a PING), waiting for its PONG,
    then pausing; records (start, seconds) of each round trip and counts ERR replies."""

    def __init__(self, port: int, request: Callable[[int], bytes], pause: float) -> None:
        super().__init__(daemon=True)
        self.request, self.pause = request, pause
        self.trips: list[tuple[float, float]] = []
        self.errors = 0
        self.failure: BaseException | None = None
        self.done = threading.Event()
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=COMPACTION_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def run(self) -> None:
        try:
            i = 0
            while not self.done.is_set():
                began = time.perf_counter()
                self.sock.sendall(self.request(i))
                reply = self._read_reply()
                self.trips.append((began, time.perf_counter() - began))
                self.errors += sum(1 for line in reply.split(b"\n") if line.startswith(b"ERR"))
                i += 1
                self.done.wait(self.pause)
        except BaseException as exc:
            self.failure = exc

    def _read_reply(self) -> bytes:
        reply = b""
        while not reply.endswith(b"PONG\n"):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            reply += chunk
        return reply

    def stop(self) -> None:
        self.done.set()
        self.join()
        self.sock.close()
        if self.failure is not None:
            raise RuntimeError(f"a probing client failed: {self.failure!r}")

    def during(self, start: float, end: float) -> list[float]:
        """Seconds of the round trips that overlap ``start``..``end``."""
        return [took for at, took in self.trips if at <= end and at + took >= start]


def writer_batch(i: int) -> bytes:
    first = i * WRITER_PUTS
    return b"".join(b"PUT:w%d:x%d\n" % (n, n) for n in range(first, first + WRITER_PUTS)) + b"PING\n"


# --- the run ------------------------------------------------------------------------------------


def wait_for_compaction(monitor: Client, rewrites_before: int) -> tuple[float | None, float, dict]:
    """Poll STATS until a compaction has ended; (first seen running, ended, last STATS)."""
    seen = None
    deadline = time.perf_counter() + COMPACTION_TIMEOUT
    while True:
        stats = monitor.stats()
        now = time.perf_counter()
        if stats["aof_rewrites"] > rewrites_before:
            return seen, now, stats
        if seen is None and stats["aof_rewriting"]:
            seen = now
        if stats["aof_rewrite_failures"] or now > deadline:
            raise RuntimeError(f"no compaction ended: {stats}")
        time.sleep(POLL_S)


def compact_under_load(port: int, pid: int) -> dict[str, Any]:
    """Start the probes, trigger a compaction, wait for its end; timings and STATS."""
    monitor = Client(port=port, timeout=COMPACTION_TIMEOUT)
    time.sleep(BASELINE_S)
    before = monitor.stats()
    polite = Prober(port, lambda _: POLITE_REQUEST, POLITE_PAUSE)
    polite.start()
    time.sleep(BASELINE_S)
    rss_before = proc_status(pid)[0]
    writer = Prober(port, writer_batch, WRITER_PAUSE)
    writer.start()
    trigger = time.perf_counter()
    monitor.put("trigger", b"t" * TRIGGER_SIZE)
    seen, ended, after = wait_for_compaction(monitor, before["aof_rewrites"])
    writer.stop()
    polite.stop()
    time.sleep(BASELINE_S)
    final = monitor.stats()
    monitor.close()
    return {
        "before": before,
        "after": after,
        "final": final,
        "rss_before_kb": rss_before,
        "rss_after_kb": proc_status(pid)[0],
        "trigger": trigger,
        "seen": seen,
        "ended": ended,
        "polite": polite,
        "writer": writer,
    }


def run(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    path = os.path.join(directory, "bench.aof")
    built = build_log(path, args)
    growth = 1 + GROWTH_MARGIN / built["log_bytes"]
    sampler = RssSampler()
    sampler.start()
    launched = time.perf_counter()
    server_args = ["--aof", path, "--fsync", "everysec", "--aof-rewrite-min-size", "1"]
    try:
        with server(*server_args, "--aof-rewrite-growth", repr(growth), cpu=0) as (proc, port):
            serving = time.perf_counter()
            if sampler.pid != proc.pid:
                sampler.samples.clear()  # another child was sampled: start over with the server
                sampler.pid = proc.pid
            measured = compact_under_load(port, proc.pid)
        log_after = os.path.getsize(path)
    finally:
        sampler.stop()
    return {
        **built,
        **measured,
        "startup_s": serving - launched,
        "serving": serving,
        "sampler": sampler,
        "log_after_bytes": log_after,
    }


# --- the report -----------------------------------------------------------------------------------


def percentiles_ms(seconds: list[float]) -> dict[str, Any]:
    ordered = sorted(seconds)
    n = len(ordered)
    if not n:
        return {"count": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {
        "count": n,
        "p50_ms": round(ordered[n // 2] * 1000, 2),
        "p99_ms": round(ordered[min(n - 1, n * 99 // 100)] * 1000, 2),
        "max_ms": round(ordered[-1] * 1000, 2),
    }


def summarize(args: argparse.Namespace, r: dict[str, Any]) -> dict[str, Any]:
    sampler, polite, writer = r["sampler"], r["polite"], r["writer"]
    trigger, ended = r["trigger"], r["ended"]
    data = r["data_bytes"] + len(b"trigger") + TRIGGER_SIZE
    during = polite.during(trigger, ended)
    peak = sampler.peak()
    slow = [
        (round(at - trigger, 3), round(took * 1000, 1))
        for at, took in polite.trips
        if at <= ended and at + took >= trigger and took * 1000 >= TARGET_RTT_MS
    ]
    worst = percentiles_ms(during)["max_ms"] or 0.0
    return {
        "big_values": args.big_values,
        "big_size": args.big_size,
        "small_keys": args.small_keys,
        "data_bytes": data,
        "keys": r["before"]["keys"],
        "log_bytes_written": r["log_bytes"],
        "live_log_bytes": r["live_log_bytes"],
        "churn_pairs": r["churn_pairs"],
        "log_write_s": r["write_s"],
        "startup_with_replay_s": round(r["startup_s"], 2),
        "log_bytes_before": r["before"]["aof_bytes"],
        "log_bytes_after": r["after"]["aof_bytes"],
        "log_file_bytes_at_exit": r["log_after_bytes"],
        "compaction_s": round(ended - trigger, 3),
        "compaction_seen_running_after_s": None if r["seen"] is None else round(r["seen"] - trigger, 3),
        "rewrites": r["final"]["aof_rewrites"] - r["before"]["aof_rewrites"],
        "polite_before": percentiles_ms([t for at, t in polite.trips if at + t < trigger]),
        "polite_during": percentiles_ms(during),
        "polite_slow_trips": slow,
        "polite_errors": polite.errors,
        "writer_batches_during": len(writer.during(trigger, ended)),
        "writer_during": percentiles_ms(writer.during(trigger, ended)),
        "writer_errors": writer.errors,
        "rss_replay_peak_kb": sampler.peak(end=r["serving"]),
        "rss_before_kb": r["rss_before_kb"],
        "rss_compaction_peak_kb": sampler.peak(trigger, ended),
        "rss_peak_kb": peak,
        "rss_after_kb": r["rss_after_kb"],
        "rss_samples": len(sampler.samples),
        "rss_peak_ratio": round(peak * 1024 / data, 3),
        "rtt_pass": worst < TARGET_RTT_MS,
        "rss_pass": peak * 1024 < TARGET_RSS_RATIO * data,
    }


def mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def print_report(s: dict[str, Any]) -> None:
    data = s["data_bytes"]
    kb = {k: s[k] * 1024 for k in s if k.startswith("rss_") and k.endswith("_kb")}

    def rss(key: str) -> str:
        return f"{mb(kb[key])} ({kb[key] / data:.2f}x)"

    print(
        f"data: key 'big' with {s['big_values']:,} values of {s['big_size']:,} B + {s['small_keys']:,} "
        f"small keys (+ the trigger's {TRIGGER_SIZE:,} B) = {data:,} B of keys and values ({mb(data)}); "
        f"{s['keys']:,} keys after the replay"
    )
    print(
        f"log: {mb(s['log_bytes_written'])} written directly in {s['log_write_s']:.1f} s "
        f"({mb(s['live_log_bytes'])} of live records + {s['churn_pairs']:,} PUT+DELETE churn pairs); "
        f"start-up with its replay {s['startup_with_replay_s']:.2f} s"
    )
    seen = s["compaction_seen_running_after_s"]
    print(
        f"compaction: {s['compaction_s']:.2f} s from the trigger to the STATS that saw it done "
        f"(seen running after {'-' if seen is None else f'{seen * 1000:.0f} ms'}); log "
        f"{mb(s['log_bytes_before'])} -> {mb(s['log_bytes_after'])}; {s['rewrites']} compaction(s)"
    )
    for name, label in (("polite_before", "polite, 1 s before"), ("polite_during", "polite, during")):
        p = s[name]
        print(
            f"{label:<20} {p['count']:>6,} round trips (GET:k1 + PING), p50 {p['p50_ms']} ms, "
            f"p99 {p['p99_ms']} ms, max {p['max_ms']} ms"
        )
    w = s["writer_during"]
    print(
        f"{'writer, during':<20} {w['count']:>6,} batches of {WRITER_PUTS} PUTs + PING, "
        f"p50 {w['p50_ms']} ms, max {w['max_ms']} ms; "
        f"ERR replies: writer {s['writer_errors']}, polite {s['polite_errors']}"
    )
    if s["polite_slow_trips"]:
        print(
            f"polite round trips >= {TARGET_RTT_MS:.0f} ms, as (s after the trigger, ms): "
            f"{s['polite_slow_trips']}"
        )
    print(
        f"server RSS: replay peak {rss('rss_replay_peak_kb')}, before the compaction {rss('rss_before_kb')}, "
        f"peak during it {rss('rss_compaction_peak_kb')}, after {rss('rss_after_kb')}; "
        f"overall peak {rss('rss_peak_kb')} ({s['rss_samples']:,} samples)"
    )
    worst = s["polite_during"]["max_ms"]
    print(
        f"targets: worst polite round trip {worst} ms < {TARGET_RTT_MS:.0f} ms: "
        f"{'PASS' if s['rtt_pass'] else 'FAIL'}; peak RSS {s['rss_peak_ratio']:.2f}x data < "
        f"{TARGET_RSS_RATIO}x: {'PASS' if s['rss_pass'] else 'FAIL'}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--big-values", type=int, default=1000, help="values of the key 'big'")
    parser.add_argument("--big-size", type=int, default=1 << 20, help="bytes per big value")
    parser.add_argument("--small-keys", type=int, default=1_000_000, help="keys k<i> holding v<i>")
    parser.add_argument("--log-ratio", type=float, default=1.5, help="log size / live records, >= 1")
    parser.add_argument("--dir", default=str(ROOT), help="where the temporary directory for the log goes")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity") and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})  # the server has CPU 0
    with tempfile.TemporaryDirectory(prefix="kvcompact-", dir=args.dir) as directory:
        summary = summarize(args, run(args, directory))
    if args.json:
        print(json.dumps(summary))
    else:
        print_report(summary)
    return 0 if summary["rtt_pass"] and summary["rss_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
