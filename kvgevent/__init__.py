"""kvgevent: the CMU 15-440 p0 key-value server, on gevent.

The public API::

    from kvgevent import KeyValueServer, MemoryStore
    server = KeyValueServer(MemoryStore())
    server.start(9999)
"""

from .config import DEFAULT_HOST, DEFAULT_MAX_LINE, DEFAULT_PORT, DEFAULT_QUEUE_SIZE
from .errors import (
    ClientError,
    ConnectionLost,
    InvalidArgument,
    KVError,
    ProtocolError,
    ServerError,
    StoreError,
)
from .logs import configure_logging, get_logger
from .protocol import Delete, Get, LineBuffer, Ping, Put, Stats, Update, encode, parse
from .server import KeyValueServer
from .store import KVStore, MemoryStore

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_MAX_LINE",
    "DEFAULT_PORT",
    "DEFAULT_QUEUE_SIZE",
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
    "Ping",
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
