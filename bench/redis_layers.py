#!/usr/bin/env python3
"""Where a batch of 16 GETs spends kvgevent's CPU over Redis, layer by layer, without the
clients' sockets: the memory store's whole session, and over a local redis-server (started
here on a free loopback port) the dispatcher alone (16 GETs encoded already), the store
(``get_plain``: encoding, the dispatcher, the checks) and the whole session (parsing the
lines, the store, the reply lines). 50 greenlets each send their batches one after another,
as 50 clients pipelining 16 GETs would. Prints the process's CPU per batch (user + system,
getrusage) for each, three rounds each: the difference between two layers is what the upper
one adds.

Pin it to one core and Redis to the other for steadier figures, e.g.
``taskset -c 0 python bench/redis_layers.py --redis-cpu 1``.

usage: python bench/redis_layers.py [--batches 40000] [--redis-cpu N]
"""

from __future__ import annotations

import argparse
import random
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gevent import monkey  # noqa: E402

monkey.patch_all()

import gevent  # noqa: E402

from bench.common import redis_server  # noqa: E402

CLIENTS = 50
"""Greenlets sending batches at once (the compare grid's 50 connections)."""

BATCH = 16
"""GETs per batch (the grid's pipeline depth)."""

KEYS = 10_000
"""Keys, one 16-byte value each (the load generator's defaults)."""


def session_for(store: Any) -> Any:
    """A session of a server with ``store`` and no limits, its log discarded."""
    from kvgevent.server.auth_throttle import AuthThrottle
    from kvgevent.server.counters import Counters
    from kvgevent.server.memory import MemoryGuard
    from kvgevent.server.session import Session, Shared

    class Quiet:
        def bind(self, **_: Any) -> Quiet:
            return self

        def warning(self, *_: Any, **__: Any) -> None:
            pass

        info = error = exception = warning

    log: Any = Quiet()
    guard = MemoryGuard(0, store, lambda: 1, log)
    shared = Shared(store, Counters(), None, dict, guard, AuthThrottle(), log)
    return Session(shared, 1, "127.0.0.1:1", "127.0.0.1", 1 << 20)


def cpu_per_batch(batch: Callable[[int], Any], batches: int) -> float:
    """Microseconds of this process's CPU per call of ``batch(i)``, CLIENTS greenlets at once."""
    each = batches // CLIENTS

    def client() -> None:
        for i in range(each):
            batch(i)

    gevent.joinall([gevent.spawn(client) for _ in range(CLIENTS)])  # (warm)
    before = resource.getrusage(resource.RUSAGE_SELF)
    gevent.joinall([gevent.spawn(client) for _ in range(CLIENTS)], raise_error=True)
    after = resource.getrusage(resource.RUSAGE_SELF)
    used = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return used / (each * CLIENTS) * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=40_000)
    parser.add_argument("--redis-cpu", type=int, help="pin redis-server to this CPU")
    args = parser.parse_args()
    from kvgevent.stores.memory import MemoryStore
    from kvgevent.stores.redis_store import RedisStore
    from kvgevent.stores.resp import get

    keys = [b"k%d" % i for i in range(KEYS)]
    rng = random.Random(1)
    picks = [[rng.choice(keys) for _ in range(BATCH)] for _ in range(200)]
    lines = [[b"GET:" + key for key in pick] for pick in picks]
    memory = MemoryStore()
    for key in keys:
        memory.put(key, b"v" * 16)
    with redis_server(args.redis_cpu) as port:
        store = RedisStore(f"redis://127.0.0.1:{port}/0", prefix="layers:")
        end = time.monotonic() + 10
        while True:  # (until Redis answers)
            try:
                for key in keys:
                    store.put(key, b"v" * 16)
                break
            except Exception:
                if time.monotonic() > end:
                    raise
                gevent.sleep(0.1)
        dispatcher: Any = store._dispatcher
        payloads = [b"".join(get(b"layers:" + key) for key in pick) for pick in picks]
        expected = [bytes] * BATCH
        memory_session, redis_session = session_for(memory), session_for(store)
        layers: list[tuple[str, Callable[[int], Any]]] = [
            ("memory store, whole session", lambda i: memory_session.handle(lines[i % 200])),
            ("Redis: dispatcher alone", lambda i: dispatcher.execute_encoded(payloads[i % 200], expected)),
            ("Redis: store.get_plain", lambda i: store.get_plain(picks[i % 200])),
            ("Redis: whole session", lambda i: redis_session.handle(lines[i % 200])),
        ]
        print(f"CPU per batch of {BATCH} GETs, {CLIENTS} greenlets, µs (three rounds):")
        for name, batch in layers:
            rounds = [cpu_per_batch(batch, args.batches) for _ in range(3)]
            print(f"  {name:30s} " + "  ".join(f"{r:6.2f}" for r in rounds))
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
