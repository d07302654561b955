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
"""

from __future__ import annotations

import abc

from gevent.lock import Semaphore

Key = bytes | str


def _key(key: Key) -> bytes:
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

    @abc.abstractmethod
    def count_keys(self) -> int:
        """Number of keys holding at least one value."""

    def close(self) -> None:  # noqa: B027 - optional hook, not abstract
        """Release what the store holds (connections, files). The default does nothing."""


class MemoryStore(KVStore):
    """The embedded default: a ``dict`` from key to a list of values, in this process.

    Never yields and never fails; the semaphore is still taken for mutations so that the
    store honours the same contract as those that do.
    """

    def __init__(self) -> None:
        super().__init__()
        self._data: dict[bytes, list[bytes]] = {}

    def put(self, key: Key, value: bytes) -> None:
        with self.lock:
            values = self._data.get(_key(key))
            if values is None:
                self._data[_key(key)] = [value]
            else:
                values.append(value)

    def get(self, key: Key) -> list[bytes]:
        values = self._data.get(_key(key))
        return list(values) if values else []

    def update(self, key: Key, old: bytes, new: bytes) -> None:
        key = _key(key)
        with self.lock:
            values = self._data.get(key)
            if values is None:
                self._data[key] = [new]
                return
            try:
                values.remove(old)
            except ValueError:
                pass
            values.append(new)

    def delete(self, key: Key) -> None:
        with self.lock:
            self._data.pop(_key(key), None)

    def count_keys(self) -> int:
        return len(self._data)
