"""MemoryStore: the embedded default store, a ``dict`` from key to a list of values in this
process, with the cost model that ``--max-memory`` counts its data by."""

from __future__ import annotations

from collections.abc import Sequence
from operator import length_hint

from kvgevent.config import INLINE_REPLY_BYTES
from kvgevent.protocol import (
    DELETE_SPELLINGS,
    GET_SPELLINGS,
    PUT_SPELLINGS,
    Delete,
    Get,
    Put,
    Update,
    add_small_reply,
)
from kvgevent.stores.base import UNBOUNDED, DataCommand, Key, KVStore, Result, key_bytes

VALUE_COST = 50
"""Bytes a value costs beyond its length: its bytes object (41) and its list slot (about 9)."""

KEY_COST = 170
"""Bytes a key costs in a MemoryStore beyond its own length: its bytes object (41 with the
allocator's rounding), its list (64 + 16 for the first slot) and its dict entry (about 45 at
an average fill of the table). CPython 3.11, 64-bit; checked against RSS by tests/test_memory.py."""


class MemoryStore(KVStore):
    """The embedded default: a ``dict`` from key to a list of values, in this process.

    Never yields and never fails; the semaphore is still taken for mutations so that the
    store honours the same contract as those that do. Its :meth:`apply` and
    :meth:`serve_plain` work on the dict directly (they do not call :meth:`put`,
    :meth:`get`...): a subclass that changes one of those must override both too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.data: dict[bytes, list[bytes]] = {}
        """The values, by key (for stores built on this one, such as DurableStore)."""
        self.used_bytes = 0
        """What :attr:`data` costs, by the KEY_COST/VALUE_COST model (see memory_used)."""
        self.lookup = self.data.get  # (data is never replaced: see KVStore.lookup)

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
        # the lock costs more than a PUT (bench/OPTIMISATIONS.md, "the lock per batch").
        with self.lock:
            return self.apply_some_under_lock(commands, UNBOUNDED)[0]

    def apply_some(self, commands: Sequence[DataCommand], budget: int) -> tuple[list[Result], int]:
        with self.lock:
            return self.apply_some_under_lock(commands, budget)

    def apply_under_lock(self, commands: Sequence[DataCommand]) -> list[Result]:
        """:meth:`apply`, for a caller that holds :attr:`lock` already (DurableStore)."""
        return self.apply_some_under_lock(commands, UNBOUNDED)[0]

    def serve_plain(
        self, items: Sequence[object], out: list[bytes], budget: int, puts: bool
    ) -> tuple[int, int]:
        """See :attr:`KVStore.serve_plain`: PUTs cost no work, a GET one unit per value it
        copies, a DELETE one per value it frees; the same effects, counts and replies as
        :meth:`apply_some` on their commands. One loop, one acquisition of the lock, no
        command object, tuple or call per usual line (bench/OPTIMISATIONS.md, "one loop for
        the usual lines")."""
        data = self.data
        get = data.get
        used = self.used_bytes
        work = gets = deletes = 0
        append = out.append
        lines = iter(items)  # (where it stopped is read from the iterator: no count per PUT)
        unserved = 0  # 1 when it stops at a line it does not serve
        finished = False  # the loop ran to the end (else where it stopped is the iterator's)
        lock = self.lock
        lock.acquire()  # (with its release in the finally: cheaper than a with block)
        try:
            for line in lines:
                # A marker (a too-long line) has no split: AttributeError, caught below
                # (a check per line would cost more than the rest of a PUT's checks).
                fields = line.split(b":", 2)  # type: ignore[attr-defined]  # (a marker: see above)
                count = len(fields)
                verb = fields[0]
                # verb:key:value (the value may hold ':'), verb:key (no ':' in the key).
                # (Two equality tests cost less than hashing each new verb for the set;
                # the capitalised spelling first, as the seed's load generator sends it.)
                if (
                    count == 3
                    and (verb == b"Put" or verb == b"PUT" or verb in PUT_SPELLINGS)
                    and fields[1]
                    and puts
                ):
                    _, key, value = fields
                    values = get(key)
                    if values is None:
                        data[key] = [value]
                        used += KEY_COST + len(key) + len(value)
                    else:
                        values.append(value)
                        used += len(value)
                    continue  # (a PUT costs no work: the budget needs no look)
                if count == 2 and fields[1] and (verb == b"Get" or verb == b"GET" or verb in GET_SPELLINGS):
                    key = fields[1]
                    found = get(key, NO_VALUES)
                    if len(found) == 1 and len(found[0]) <= INLINE_REPLY_BYTES:  # the usual GET
                        append(b"".join((key, b":", found[0], b"\n")))
                    elif not add_small_reply(key, found, out):
                        unserved = 1  # (the general path builds a big reply in chunks)
                        break
                    work += len(found)
                    gets += 1
                elif count == 2 and fields[1] and verb in DELETE_SPELLINGS:
                    freed = data.pop(fields[1], None)
                    work += len(freed) if freed else 0
                    used -= data_cost(fields[1], freed)
                    deletes += 1
                else:
                    unserved = 1
                    break
                if work >= budget:  # the turn's work is done after this one
                    break
            else:
                finished = True
        except AttributeError:
            unserved = 1
        finally:
            served = len(items) - (0 if finished else length_hint(lines)) - unserved
            new_puts = served - gets - deletes  # (each line served is one of them)
            self.used_bytes = used + VALUE_COST * new_puts
            applied = self.applied
            applied["get"] += gets
            applied["put"] += new_puts
            applied["delete"] += deletes
            lock.release()
        return served, work

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
        work = puts = gets = 0  # (counted in locals: the hot path pays no dict per command)
        try:
            for cmd in commands:
                kind = cmd.__class__
                if kind is Put:
                    puts += 1
                    value = cmd[1]  # type: ignore[misc]  # (kind narrows cmd; mypy does not follow __class__)
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
                    gets += 1
                    if values:
                        work += len(values)
                        append(values[:])  # a copy: a later command of the batch may change it
                    else:
                        append(None)
                elif kind is Update:
                    self.applied["update"] += 1
                    scanned, grew = _update(data, cmd, values)  # type: ignore[arg-type]  # (kind narrows cmd; mypy does not follow __class__)
                    work += scanned
                    used += grew
                    append(None)
                elif kind is Delete:
                    self.applied["delete"] += 1
                    if values is not None:
                        del data[cmd[0]]
                        work += len(values)
                        used -= data_cost(cmd[0], values)
                    append(None)
                else:
                    raise TypeError(f"not a data command: {cmd!r}")
                if work >= budget:
                    break
        finally:
            self.used_bytes = used
            applied = self.applied
            applied["put"] += puts
            applied["get"] += gets
        return results, work


NO_VALUES: list[bytes] = []
"""What a GET of a missing key finds (never changed)."""


def data_cost(key: bytes, values: list[bytes] | None) -> int:
    """What ``key`` and its ``values`` cost by the KEY_COST/VALUE_COST model (0 for None)."""
    if values is None:
        return 0
    return KEY_COST + len(key) + VALUE_COST * len(values) + sum(map(len, values))


def _update(data: dict[bytes, list[bytes]], cmd: Update, values: list[bytes] | None) -> tuple[int, int]:
    """The p0 UPDATE on ``data`` (``values``: the key's list, or None); returns the values it
    scanned and the bytes the data grew by (by the cost model)."""
    key, old, new = cmd
    if values is None:
        data[key] = [new]
        return 0, KEY_COST + VALUE_COST + len(key) + len(new)
    scanned, grew = len(values), VALUE_COST + len(new)
    try:
        values.remove(old)
        grew -= VALUE_COST + len(old)
    except ValueError:
        pass
    values.append(new)
    return scanned, grew
