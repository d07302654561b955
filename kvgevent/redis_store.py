"""RedisStore: the store interface over Redis or Redis Cluster, shared by many kvgevent
processes.

Each kvgevent key is a Redis list named ``<prefix><key>``: PUT is RPUSH, GET is LRANGE, DELETE
is DEL, and UPDATE is a Lua script (LREM the first ``old``, RPUSH ``new``), atomic on the
Redis side, so workers updating one key never lose or duplicate a value. A key's values live
in one list, hence in one cluster slot. kvgevent's own bookkeeping lives under
``<prefix>_meta:``, which no client key can reach (client keys never contain ':').

Batches are not sent one round trip each: every batch queued while a round trip is in flight
goes out together in the next one (:mod:`kvgevent.resp`), so a worker serves many requests per
Redis round trip; the store's semaphore is not held around network calls (Redis itself makes
each command, and the UPDATE script, atomic). Redis Cluster goes through redis-py's cluster
pipeline, one per batch. Calls are cooperative because the process is
monkey-patched (``run_server.py`` patches before anything else).

When Redis cannot be reached or does not answer within ``timeout``, commands fail with
``ERR store unavailable``; the outage and the recovery are logged once each.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from .errors import KVError, StoreError
from .logs import get_logger
from .protocol import Delete, Get, Put, Update
from .resp import Dispatcher, RespConnection
from .store import DataCommand, Key, KVStore, key_bytes

DEFAULT_PREFIX = "kvgevent:"
"""Namespace of kvgevent's keys in a Redis that others may share."""

DEFAULT_REDIS_TIMEOUT = 2.0
"""Seconds a Redis call may take before its commands get ``ERR store unavailable``."""

MAX_CONNECTIONS = 256
"""Connections to Redis per kvgevent process (one per client round trip in flight)."""

COUNT_KEYS_EVERY = 5.0
"""Seconds the ``keys`` figure of STATS is reused when counting took long (it scans every key)."""

WORKER_TTL = 5.0
"""Seconds after which a worker that stopped reporting no longer counts in cluster totals."""

# Atomic p0 UPDATE: remove the first `old` (if any), append `new` (an absent key becomes [new]).
UPDATE_SCRIPT = "redis.call('LREM', KEYS[1], 1, ARGV[1]) return redis.call('RPUSH', KEYS[1], ARGV[2])"
_SCRIPT = UPDATE_SCRIPT.encode()
_NOT_NOW = ("CLUSTERDOWN", "LOADING", "TRYAGAIN", "MASTERDOWN", "BUSY")
"""Error replies that mean Redis cannot serve now: ERR store unavailable, not store error."""

DISPATCH_CONNECTIONS = 4
"""Round trips in flight at once from one process (each carries every batch queued meanwhile)."""

ERR_UNAVAILABLE = StoreError("store unavailable")


class RedisStore(KVStore):
    """``url``: ``redis://host:port/db`` or ``redis+cluster://host:port`` (any node)."""

    shared = True  # other processes see the same data: the server reports its counts here

    def __init__(
        self, url: str, prefix: str = DEFAULT_PREFIX, timeout: float = DEFAULT_REDIS_TIMEOUT, log: Any = None
    ) -> None:
        super().__init__()
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[BaseException], ...] = (
            redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError,
            OSError,
        )
        # Errors that mean "not now" rather than "not this": for them, ERR store unavailable.
        import hiredis

        self._unavailable = (
            *self._errors,
            redis.exceptions.ClusterDownError,
            redis.exceptions.TryAgainError,
            redis.exceptions.BusyLoadingError,
            redis.exceptions.MasterDownError,
            redis.exceptions.SlotNotCoveredError,
            redis.exceptions.RedisClusterException,
            hiredis.ProtocolError,
        )

        self.url = url
        self.prefix = prefix.encode()
        self.log = log if log is not None else get_logger()
        parsed = urlparse(url)
        self.cluster = parsed.scheme == "redis+cluster"
        options: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "retry": Retry(NoBackoff(), 0),  # fail fast; the client decides whether to retry
        }
        self._dispatcher: Dispatcher | None = None  # the fast data path (plain redis:// only)
        if self.cluster:
            from redis.cluster import RedisCluster

            self.client: Any = RedisCluster(
                host=parsed.hostname or "127.0.0.1", port=parsed.port or 6379, **options
            )
        elif parsed.scheme == "redis":
            # redis-py for the occasional calls (SCAN, bookkeeping); the dispatcher for data.
            self.client = redis.Redis.from_url(url, max_connections=MAX_CONNECTIONS, **options)
            db = int(parsed.path.strip("/") or 0)
            self._dispatcher = Dispatcher(
                lambda: RespConnection(
                    parsed.hostname or "127.0.0.1",
                    parsed.port or 6379,
                    db,
                    parsed.password,
                    parsed.username,
                    timeout,
                ),
                connections=DISPATCH_CONNECTIONS,
            )
        elif parsed.scheme == "rediss":  # TLS to Redis: redis-py's pipelines (no dispatcher)
            self.client = redis.Redis.from_url(url, max_connections=MAX_CONNECTIONS, **options)
        else:
            raise ValueError(f"not a Redis URL: {url!r} (redis://host:port/db or redis+cluster://host:port)")
        self._meta = self.prefix + b"_meta:"
        self._down_since: float | None = None
        self._keys = (0.0, 0)  # (reuse until, count)

    # --- the store interface ---------------------------------------------------------------

    def apply(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        if self._dispatcher is None:
            return self._apply_redis_py(commands)
        prefix, encoded = self.prefix, []
        for cmd in commands:
            kind, key = cmd.__class__, prefix + cmd[0]
            if kind is Get:
                encoded.append((b"LRANGE", key, b"0", b"-1"))
            elif kind is Put:
                encoded.append((b"RPUSH", key, cmd[1]))
            elif kind is Update:
                encoded.append((b"EVAL", _SCRIPT, b"1", key, cmd[1], cmd[2]))  # type: ignore[misc]
            elif kind is Delete:
                encoded.append((b"DEL", key))
            else:
                raise TypeError(f"not a data command: {cmd!r}")
        replies = self._call(self._dispatcher.execute, encoded)
        return self._results(commands, replies)

    def _apply_redis_py(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        """Through one redis-py pipeline (for a cluster, it routes each command to its slot's
        node; for rediss://, it speaks TLS)."""
        prefix = self.prefix
        pipe = self.client.pipeline(transaction=False)
        for cmd in commands:
            kind, key = cmd.__class__, prefix + cmd[0]
            if kind is Get:
                pipe.lrange(key, 0, -1)
            elif kind is Put:
                pipe.rpush(key, cmd[1])
            elif kind is Update:
                # (execute_command: the cluster pipeline has no eval(), but routes EVAL by its key)
                pipe.execute_command("EVAL", UPDATE_SCRIPT, 1, key, cmd[1], cmd[2])  # type: ignore[misc]
            elif kind is Delete:
                pipe.delete(key)
            else:
                raise TypeError(f"not a data command: {cmd!r}")
        return self._results(commands, self._call(pipe.execute, raise_on_error=False))

    def _results(
        self, commands: Sequence[DataCommand], replies: list[Any]
    ) -> list[list[bytes] | KVError | None]:
        results: list[list[bytes] | KVError | None] = []
        for cmd, reply in zip(commands, replies, strict=True):
            if isinstance(reply, Exception):
                if isinstance(reply, self._unavailable) or str(reply).startswith(_NOT_NOW):
                    results.append(ERR_UNAVAILABLE)
                else:
                    self.log.warning("store_error", error=str(reply)[:200])
                    results.append(StoreError("store error"))
            elif cmd.__class__ is Get:
                results.append(reply or None)
            else:
                results.append(None)
        return results

    def put(self, key: Key, value: bytes) -> None:
        self._raise_first(self.apply([Put(key_bytes(key), value)]))

    def get(self, key: Key) -> list[bytes]:
        result = self.apply([Get(key_bytes(key))])[0]
        if isinstance(result, KVError):
            raise result
        return result or []

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        self._raise_first(self.apply([Update(key_bytes(key), old, new)]))

    def delete(self, key: Key) -> None:
        self._raise_first(self.apply([Delete(key_bytes(key))]))

    def count_keys(self) -> int:
        """Keys under the prefix (a SCAN of the keyspace, reused for COUNT_KEYS_EVERY s)."""
        counted_at, count = self._keys
        if time.monotonic() < counted_at:
            return count

        def scan() -> int:
            pattern = _glob_escape(self.prefix) + b"*"
            meta = 0
            total = 0
            for key in self.client.scan_iter(match=pattern, count=1000):
                total += 1
                meta += key.startswith(self._meta)
            return total - meta

        began = time.monotonic()
        count = self._call(scan)
        took = time.monotonic() - began
        # A slow count (a big keyspace) is reused for a while; a quick one is always fresh.
        self._keys = (time.monotonic() + (COUNT_KEYS_EVERY if took > 0.05 else 0.0), count)
        return count

    def close(self) -> None:
        if self._dispatcher is not None:
            self._dispatcher.close()
        try:
            self.client.close()
        except Exception:
            pass

    # --- many workers, one store -------------------------------------------------------------

    def report_clients(self, worker: str, active: int, dropped_delta: int, final: bool = False) -> None:
        """Publish this worker's client counts (called every second by the server, and a last
        time, ``final``, when it stops: then it leaves the table)."""

        def report() -> None:
            pipe = self.client.pipeline(transaction=False)
            if final:
                pipe.hdel(self._meta + b"workers", worker)
            else:
                pipe.hset(self._meta + b"workers", worker, f"{active} {time.time():.3f}")
            if dropped_delta:
                pipe.incrby(self._meta + b"dropped", dropped_delta)
            pipe.execute()

        self._call(report)

    def cluster_stats(self, worker: str, active: int) -> dict[str, int]:
        """Cluster-wide totals: clients connected to live workers (this one's counted now,
        the others' as last reported), clients dropped by any."""

        def read() -> tuple[dict[bytes, bytes], bytes | None]:
            pipe = self.client.pipeline(transaction=False)
            pipe.hgetall(self._meta + b"workers")
            pipe.get(self._meta + b"dropped")
            workers, dropped = pipe.execute()
            return workers, dropped

        workers, dropped = self._call(read)
        now, total, live = time.time(), active, 1
        for name, entry in workers.items():
            count, at = entry.split()
            if name != worker.encode() and now - float(at) <= WORKER_TTL:
                total += int(count)
                live += 1
        return {"cluster_active": total, "cluster_dropped": int(dropped or 0), "workers": live}

    # --- outages -------------------------------------------------------------------------------

    def _call(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """Run a Redis call; an unreachable Redis becomes ERR store unavailable (logged once
        per outage, as is the recovery)."""
        try:
            result = function(*args, **kwargs)
        except self._unavailable as exc:
            if self._down_since is None:
                self._down_since = time.monotonic()
                self.log.error("store_unavailable", store=_redacted(self.url), error=str(exc)[:200])
            raise ERR_UNAVAILABLE.fresh() from None
        if self._down_since is not None:
            self.log.info(
                "store_recovered",
                store=_redacted(self.url),
                outage_s=round(time.monotonic() - self._down_since, 3),
            )
            self._down_since = None
        return result

    @staticmethod
    def _raise_first(results: list[Any]) -> None:
        for result in results:
            if isinstance(result, KVError):
                raise result


def _glob_escape(prefix: bytes) -> bytes:
    out = bytearray()
    for byte in prefix:
        if byte in b"*?[]\\":
            out += b"\\"
        out.append(byte)
    return bytes(out)


def _redacted(url: str) -> str:
    """The URL without a password, for logs."""
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url
