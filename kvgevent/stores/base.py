"""Stores: where values live. Data only: no sockets, no protocol, no logging.

A store maps a key to an ordered list of values. Keys are non-empty bytes without ':' or a
newline (the server's parser guarantees it; a ``str`` key is accepted for convenience and
encoded as UTF-8). Values are opaque bytes.

Contract shared by every store (:class:`KVStore`):

* Each mutation (``put``, ``update``, ``delete``) is atomic, and a client's mutations apply
  in order. The stores kept in this process (the memory store, the durable store) apply them
  under the store's ``lock``, a ``gevent.lock.Semaphore``, so a store whose calls yield (the
  log's fsync) still applies one mutation at a time and the p0 UPDATE stays atomic. A store
  kept elsewhere relies on that system's own atomicity instead (the Redis store: each Redis
  command, and its UPDATE script, is atomic there) and does not hold the lock around network
  calls.
* Any method may yield to other greenlets; callers must not assume otherwise.
* ``get`` returns a new list: the caller may keep it while others mutate the key.
* A store that cannot serve raises :class:`~kvgevent.errors.StoreError`; nothing else.
* :meth:`KVStore.apply` runs a batch of commands in order; the server hands it each run of
  PUT/GET/UPDATE/DELETE it parsed from one read, so a store can do the batch at once (the
  memory store under one lock acquisition, a networked store in one round trip).
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from contextvars import ContextVar

from gevent.lock import Semaphore

from kvgevent.errors import KVError
from kvgevent.protocol import Delete, Get, Put, Update
from kvgevent.timings import Timings

Key = bytes | str
DataCommand = Put | Get | Update | Delete
DATA_COMMANDS = frozenset((Put, Get, Update, Delete))
"""The command types a store applies (PING, STATS, AUTH are the server's)."""
VERBS = {Put: "put", Get: "get", Update: "update", Delete: "delete"}
"""The name of each data command, as the metrics label it."""
WRITES = frozenset((Put, Update))
"""The commands that make the data bigger (refused over --max-memory; DELETE is not)."""


class Cut:
    """A GET's reply of which a store kept elsewhere fetched the first bytes only (``first``,
    its first lines and part of the next): the whole is fetched when its client has room for
    it (:attr:`KVStore.fetch_whole`), never for a client whose replies are being dropped."""

    __slots__ = ("first",)

    def __init__(self, first: bytes) -> None:
        self.first = first

    def __repr__(self) -> str:
        return f"Cut({len(self.first)} bytes)"


Result = list[bytes] | KVError | None
PlainResult = list[bytes] | KVError | Cut | None
"""A plain op's result (:attr:`KVStore.apply_plain`): a :data:`Result`, or a GET's Cut."""
Lines = bytes | KVError | Cut | None
"""A GET's result from :attr:`KVStore.get_plain`: the reply's lines as the client gets them
(``<key>:<value>\\n`` each), None for a key with no values, that GET's KVError, or a
:class:`Cut` (a long reply, to be fetched whole)."""
PlainOp = tuple[bytes] | tuple[bytes, bytes | None]
"""A plain command (:attr:`KVStore.apply_plain`): ``(key,)`` a GET, ``(key, value)`` a PUT,
``(key, None)`` a DELETE."""

UNBOUNDED = 1 << 62
"""A work budget never reached."""

STORE_WAIT: ContextVar[float] = ContextVar("kvgevent_store_wait", default=0.0)
"""Seconds the current greenlet has spent waiting on a store kept elsewhere (such a store adds
its calls' time). Per greenlet, as each has a context of its own: the server does not count a
client's own waits on Redis as time its batch held the event loop when it judges whose turns
are heavy."""


def key_bytes(key: Key) -> bytes:
    """A key as the stores hold it: bytes (a ``str`` is encoded as UTF-8)."""
    return key.encode() if isinstance(key, str) else key


class KVStore(abc.ABC):
    """The interface of the original's ``KVStore``: put, get, update, delete."""

    def __init__(self) -> None:
        self.lock = Semaphore()
        self.applied = {"put": 0, "get": 0, "update": 0, "delete": 0}
        """Data commands this store has carried out, by verb (the server's metrics read it)."""

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
            self.applied[VERBS[kind]] += 1
            try:
                if kind is Get:
                    results.append(self.get(cmd[0]))
                    continue
                if kind is Put:
                    self.put(cmd[0], cmd[1])  # type: ignore[misc]  # (kind narrows cmd; mypy does not follow __class__)
                elif kind is Update:
                    self.update(cmd[0], cmd[1], cmd[2])  # type: ignore[misc]  # (kind narrows cmd; mypy does not follow __class__)
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

    lookup: Callable[[bytes], list[bytes] | None] | None = None
    """A key's values read at once, without the lock, for a store that holds its data in this
    process (the memory and durable stores: the dict's own ``get``; the list is the store's
    own, as :meth:`apply`'s); None for the others. The session serves batches of GETs
    through it."""

    apply_plain: Callable[[list[PlainOp]], list[PlainResult]] | None = None
    """For a store kept elsewhere (the Redis store): ``apply_plain(ops)``, plain commands in
    order in one call (it may yield): ``(key,)`` a GET, ``(key, value)`` a PUT, ``(key, None)``
    a DELETE; one result per op, as :meth:`apply` gives its command's (a GET's values or
    None, None for a write, or that op's KVError); raises KVError if the store failed as a
    whole. Counts nothing (the caller counts what it serves). None for the others. The
    session serves runs of well-formed PUT, GET and DELETE lines through it, without a
    command object each."""

    fetch_whole: Callable[[list[bytes]], list[Lines]] | None = None
    """For a store whose :attr:`apply_plain` and :attr:`get_plain` give :class:`Cut` results:
    ``fetch_whole(keys)``, the whole reply lines of ``keys[0]`` (a GET cut short) and a GET
    of each key after it, as :attr:`get_plain` gives them (they are fetched again, after it:
    the replies are in the order of the GETs); raises KVError if the store failed as a
    whole."""

    get_plain: Callable[[list[bytes]], list[Lines]] | None = None
    """For a store kept elsewhere, with :attr:`apply_plain`: ``get_plain(keys)``, as
    ``apply_plain`` with a GET of each key, but quicker: each result is the GET's reply
    lines as they are to be sent (:data:`Lines`), not its values; raises KVError if the store
    failed as a whole."""

    serve_plain: Callable[[Sequence[object], list[bytes], int, bool], tuple[int, int]] | None = None
    """For a store that holds its data in this process and promises nothing beyond memory (the
    memory store), ``serve_plain(items, out, budget, puts)``: the well-formed PUT, GET and
    DELETE request lines that lead ``items`` (by :func:`~kvgevent.protocol.parse`'s rules for
    the spellings that need no case folding), applied in order under one acquisition of the
    lock, without a command object each, and counted in :attr:`applied`; the replies of their
    GETs added to ``out`` (small ones only: :func:`~kvgevent.protocol.add_small_reply`).
    Returns how many it served and their work, as :meth:`apply_some`: it stops at a line
    that is anything else (or not bytes), at a GET whose reply is not small, before a PUT
    unless ``puts``, and after the command whose work reached ``budget`` (the turn ends
    there, where the general path ends it as it applies the next command: a PING after it
    waits for the next turn). None for the others. The session serves the usual batches
    through it, and the rest as commands."""

    needs_barrier = False
    """True if :meth:`barrier` may wait: the server then sends earlier replies first."""

    waits_elsewhere = False
    """True if the store's calls wait on another process (Redis): they add the time to
    :data:`STORE_WAIT`, which the server reads around each batch only for such a store."""

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

    def timings(self) -> dict[str, Timings]:
        """The store's own duration histograms, by name (for the server's metrics)."""
        return {}

    def not_ready(self) -> str | None:
        """Why the store cannot serve now (one line: /readyz), or None. May yield."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the store holds (connections, files). The default does nothing."""
