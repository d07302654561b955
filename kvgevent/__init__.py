"""kvgevent: the CMU 15-440 p0 key-value server, on gevent.

The public API::

    from kvgevent import KeyValueServer, MemoryStore, Client
    server = KeyValueServer(MemoryStore())
    server.start(9999)

The package has four wings: this root (what every wing shares: :mod:`kvgevent.protocol`,
:mod:`kvgevent.errors`, :mod:`kvgevent.config`, :mod:`kvgevent.logs`, :mod:`kvgevent.tls`,
:mod:`kvgevent.args`), :mod:`kvgevent.server` (the gevent I/O), :mod:`kvgevent.stores` (where
values live) and :mod:`kvgevent.client` (the client library and ``run_client.py``), plus
:mod:`kvgevent.serve` (``run_server.py``'s command line). Names are imported on first use
(PEP 562), so ``from kvgevent import Client`` loads the client and the root, not the server.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_HOMES = {
    "DEFAULT_HOST": "kvgevent.config",
    "DEFAULT_MAX_LINE": "kvgevent.config",
    "DEFAULT_PORT": "kvgevent.config",
    "DEFAULT_QUEUE_SIZE": "kvgevent.config",
    "ClientError": "kvgevent.errors",
    "ConnectionLost": "kvgevent.errors",
    "NotSent": "kvgevent.errors",
    "InvalidArgument": "kvgevent.errors",
    "KVError": "kvgevent.errors",
    "ProtocolError": "kvgevent.errors",
    "ServerError": "kvgevent.errors",
    "StoreError": "kvgevent.errors",
    "configure_logging": "kvgevent.logs",
    "get_logger": "kvgevent.logs",
    "Delete": "kvgevent.protocol",
    "Get": "kvgevent.protocol",
    "LineBuffer": "kvgevent.protocol",
    "Ping": "kvgevent.protocol",
    "Put": "kvgevent.protocol",
    "Stats": "kvgevent.protocol",
    "Update": "kvgevent.protocol",
    "encode": "kvgevent.protocol",
    "parse": "kvgevent.protocol",
    "KeyValueServer": "kvgevent.server.server",
    "KVStore": "kvgevent.stores.base",
    "MemoryStore": "kvgevent.stores.memory",
    "Client": "kvgevent.client.client",
    "Pipeline": "kvgevent.client.client",
}
"""Each public name and the module that defines it."""

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_LINE",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_SIZE",
    "Client",
    "ClientError",
    "ConnectionLost",
    "Delete",
    "Get",
    "InvalidArgument",
    "KVError",
    "KVStore",
    "KeyValueServer",
    "LineBuffer",
    "MemoryStore",
    "NotSent",
    "Ping",
    "Pipeline",
    "ProtocolError",
    "Put",
    "ServerError",
    "Stats",
    "StoreError",
    "Update",
    "configure_logging",
    "encode",
    "get_logger",
    "parse",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvgevent' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])


if TYPE_CHECKING:  # what a type checker and an IDE see: the same names, imported eagerly
    from kvgevent.client.client import Client, Pipeline
    from kvgevent.config import DEFAULT_HOST, DEFAULT_MAX_LINE, DEFAULT_PORT, DEFAULT_QUEUE_SIZE
    from kvgevent.errors import (
        ClientError,
        ConnectionLost,
        InvalidArgument,
        KVError,
        NotSent,
        ProtocolError,
        ServerError,
        StoreError,
    )
    from kvgevent.logs import configure_logging, get_logger
    from kvgevent.protocol import Delete, Get, LineBuffer, Ping, Put, Stats, Update, encode, parse
    from kvgevent.server.server import KeyValueServer
    from kvgevent.stores.base import KVStore
    from kvgevent.stores.memory import MemoryStore
