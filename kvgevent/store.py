"""Stores: where values live. Data only: no sockets, no protocol, no logging.

A store maps a key to an ordered list of values. Keys are non-empty bytes without ':' or a
newline (the server's parser guarantees it; a ``str`` key is accepted for convenience and
encoded as UTF-8). Values are opaque bytes.

Contract shared by every store (:class:`KVStore`):

* Mutations (``put``, ``update``, ``delete``) run under the store's ``lock``, a
  ``gevent.lock.Semaphore``, so a store whose calls yield (network I/O) still applies one
  mutation at a time and the p0 UPDATE stays atomic.
* Any method may yield to other greenlets; callers must not assume otherwise.
* ``get`` returns a new list: the caller may keep it while others mutate the key.
* A store that cannot serve raises :class:`~kvgevent.errors.StoreError`; nothing else.
* :meth:`KVStore.apply` runs a batch of commands in order; the server hands it each run of
  PUT/GET/UPDATE/DELETE it parsed from one read, so a store can do the batch at once (the
  memory store under one lock acquisition, a networked store in one round trip).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

from gevent.lock import Semaphore

from .errors import KVError
from .protocol import Delete, Get, Put, Update

Key = bytes | str
DataCommand = Put | Get | Update | Delete
DATA_COMMANDS = frozenset((Put, Get, Update, Delete))
"""The command types a store applies (PING, STATS, AUTH are the server's)."""
WRITES = frozenset((Put, Update))
"""The commands that make the data bigger (refused over --max-memory; DELETE is not)."""
Result = list[bytes] | KVError | None

UNBOUNDED = 1 << 62
"""A work budget never reached."""

KEY_COST = 170
"""Bytes a key costs in a MemoryStore beyond its own length: its bytes object (41 with the
allocator's rounding), its list (64 + 16 for the first slot) and its dict entry (about 45 at
an average fill of the table). CPython 3.11, 64-bit; checked against RSS by tests/test_memory.py."""

VALUE_COST = 50
"""Bytes a value costs beyond its length: its bytes object (41) and its list slot (about 9)."""


def key_bytes(key: Key) -> bytes:
    """A key as the stores hold it: bytes (a ``str`` is encoded as UTF-8)."""
    return key.encode() if isinstance(key, str) else key


class KVStore(abc.ABC):
    """The interface of the original's ``KVStore``: put, get, update, delete."""

    def __init__(self) -> None:
        self.lock = Semaphore()

    @abc.abstractmethod
    def put(self, key: Key, value: bytes) -> None:
        """Append ``value`` at the end of the key's list (creating the key)."""

    @abc.abstractmethod
    def get(self, key: Key) -> list[bytes]:
        """All values of ``key`` in stored order; ``[]`` if the key is absent."""

    @abc.abstractmethod
    def update(self, key: Key, old: bytes, new: bytes) -> None:
        """The original's semantics: if the key is absent it becomes ``[new]``; otherwise the
        first value equal to ``old`` (if any) is removed and ``new`` is appended at the end."""

    @abc.abstractmethod
    def delete(self, key: Key) -> None:
        """Remove the key and all its values (nothing happens if it is absent)."""

    def apply(self, commands: Sequence[DataCommand]) -> list[list[bytes] | KVError | None]:
        """Apply ``commands`` (keys are bytes, as parsed) in order and return one result per
        command: the values of a Get (a new list, or None when there are none), None for the
        others, or the KVError that command met (the others still run). This default makes
        one call per command; stores override it to batch."""
        results: list[list[bytes] | KVError | None] = []
        for cmd in commands:
            kind = cmd.__class__
            try:
                if kind is Get:
                    results.append(self.get(cmd[0]))
                    continue
                if kind is Put:
                    self.put(cmd[0], cmd[1])
                elif kind is Update:
                    self.update(cmd[0], cmd[1], cmd[2])  # type: ignore[misc]
                elif kind is Delete:
                    self.delete(cmd[0])
                else:
                    raise TypeError(f"not a data command: {cmd!r}")
                results.append(None)
            except KVError as exc:
                results.append(exc)
        return results

    def apply_some(
        self, commands: Sequence[DataCommand], budget: int
    ) -> tuple[list[list[bytes] | KVError | None], int]:
        """Apply the first of ``commands`` (at least one) and return their results (as
        :meth:`apply` does) and the work done, in :data:`~kvgevent.config.TURN_WORK` units:
        about one per value scanned or copied. A store stops after the command that takes
        the work to ``budget``, so that one client's batch on huge keys does not hold the
        event loop; the caller applies the rest later. This default applies them all."""
        return self.apply(commands), 0

    def memory_used(self) -> int:
        """Bytes of this process's memory the data holds (0 for a store kept elsewhere)."""
        return 0

    @abc.abstractmethod
    def count_keys(self) -> int:
        """Number of keys holding at least one value."""

    def write_position(self) -> int:
        """Where the mutations applied so far end, for :meth:`barrier` (the server notes it
        per connection after each batch, when :attr:`needs_barrier`). The default: 0."""
        return 0

    def barrier(self, position: int | None = None) -> None:  # noqa: B027 - optional hook
        """Return once the mutations up to ``position`` (a :meth:`write_position`; None:
        every mutation applied so far) are as durable as this store promises (the server
        calls it before a PONG); raise StoreError if that cannot be. May yield. The default
        (nothing is promised beyond memory) returns at once."""

    needs_barrier = False
    """True if :meth:`barrier` may wait: the server then sends earlier replies first."""

    shared = False
    """True if other server processes use the same data (e.g. Redis): the server then
    publishes its client counts with :meth:`report_clients` and adds :meth:`cluster_stats`."""

    def report_clients(  # noqa: B027
        self, worker: str, active: int, dropped_delta: int, final: bool = False
    ) -> None:
        """Publish one worker's client counts (shared stores only); ``final``: it is leaving."""

    def cluster_stats(self, worker: str, active: int) -> dict[str, int]:
        """Totals over every worker sharing the store, with this ``worker``'s own current
        ``active`` count rather than its last report (shared stores only)."""
        return {}

    def stats(self) -> dict[str, int]:
        """The store's own counters, added to the server's STATS line."""
        return {}

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the store holds (connections, files). The default does nothing."""


class MemoryStore(KVStore):
    """The embedded default: a ``dict`` from key to a list of values, in this process.

    Never yields and never fails; the semaphore is still taken for mutations so that the
    store honours the same contract as those that do. Its :meth:`apply` works on the dict
    directly (it does not call :meth:`put`, :meth:`get`...): a subclass that changes one of
    those must override :meth:`apply` too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[bytes, list[bytes]] = {}
        """The values, by key (for stores built on this one, such as DurableStore)."""
        self.used_bytes = 0
        """What :attr:`data` costs, by the KEY_COST/VALUE_COST model (see memory_used)."""

    def put(self, key: Key, value: bytes) -> None:
        with self.lock:
            self.apply_under_lock([Put(key_bytes(key), value)])

    def get(self, key: Key) -> list[bytes]:
        values = self.data.get(key if key.__class__ is bytes else key_bytes(key))
        return list(values) if values else []

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        with self.lock:
            self.apply_under_lock([Update(key_bytes(key), old, new)])

    def delete(self, key: Key) -> None:
        with self.lock:
            self.apply_under_lock([Delete(key_bytes(key))])

    def count_keys(self) -> int:
        return len(self.data)

    def memory_used(self) -> int:
        return self.used_bytes

    def apply(self, commands: Sequence[DataCommand]) -> list[Result]:
        # The whole batch under one acquisition of the lock, with no method call per command:
        # a PUT went from 350 ns to about 100 (timeit), the lock alone costing 270 ns a call.
        with self.lock:
            return self.apply_some_under_lock(commands, UNBOUNDED)[0]

    def apply_some(self, commands: Sequence[DataCommand], budget: int) -> tuple[list[Result], int]:
        with self.lock:
            return self.apply_some_under_lock(commands, budget)

    def apply_under_lock(self, commands: Sequence[DataCommand]) -> list[Result]:
        """:meth:`apply`, for a caller that holds :attr:`lock` already (DurableStore)."""
        return self.apply_some_under_lock(commands, UNBOUNDED)[0]

    def affordable(self, commands: Sequence[DataCommand], budget: int) -> tuple[int, int]:
        """How many of ``commands``, from the first (at least one), :meth:`apply_some` would
        apply within ``budget``, and the work they take (estimated on the data as it is)."""
        data = self.data
        work = 0
        for index, cmd in enumerate(commands):
            if cmd.__class__ is not Put:
                values = data.get(cmd[0])
                if values:
                    work += len(values)
                    if work >= budget:
                        return index + 1, work
        return len(commands), work

    def apply_some_under_lock(self, commands: Sequence[DataCommand], budget: int) -> tuple[list[Result], int]:
        """:meth:`apply_some`, for a caller that holds :attr:`lock` already. Work: one unit
        per value a GET copies, an UPDATE scans or a DELETE frees; a PUT costs nothing."""
        data = self.data
        results: list[Result] = []
        append = results.append
        used = self.used_bytes
        work = 0
        try:
            for cmd in commands:
                kind = cmd.__class__
                if kind is Put:
                    value = cmd[1]
                    values = data.get(cmd[0])
                    if values is None:
                        data[cmd[0]] = [value]
                        used += KEY_COST + VALUE_COST + len(cmd[0]) + len(value)
                    else:
                        values.append(value)
                        used += VALUE_COST + len(value)
                    append(None)
                    continue
                values = data.get(cmd[0])
                if kind is Get:
                    if values:
                        work += len(values)
                        append(values[:])
                    else:
                        append(None)
                elif kind is Update:
                    new = cmd[2]  # type: ignore[misc]
                    if values is None:
                        data[cmd[0]] = [new]
                        used += KEY_COST + VALUE_COST + len(cmd[0]) + len(new)
                    else:
                        work += len(values)
                        try:
                            values.remove(cmd[1])
                            used -= VALUE_COST + len(cmd[1])
                        except ValueError:
                            pass
                        values.append(new)
                        used += VALUE_COST + len(new)
                    append(None)
                elif kind is Delete:
                    if values is not None:
                        del data[cmd[0]]
                        work += len(values)
                        used -= KEY_COST + len(cmd[0]) + VALUE_COST * len(values) + sum(map(len, values))
                    append(None)
                else:
                    raise TypeError(f"not a data command: {cmd!r}")
                if work >= budget:
                    break
        finally:
            self.used_bytes = used
        return results, work
