"""The one error hierarchy of kvgevent.

Every error a client can cause or observe is a :class:`KVError`. Its :attr:`~KVError.reason`
is a fixed phrase (never an echoed exception text, never containing ':' or a newline), and
:attr:`~KVError.reply` is the exact ``ERR`` line the server sends for it. The server converts
errors to replies at exactly one place (its command loop); the client library turns ``ERR``
lines back into :class:`ServerError`.
"""

from __future__ import annotations


class KVError(Exception):
    """Base of every kvgevent error. ``reason`` is the fixed phrase of the ``ERR`` reply."""

    reason: str = "internal error"

    def __init__(self, reason: str | None = None) -> None:
        if reason is not None:
            self.reason = reason
        super().__init__(self.reason)

    def fresh(self) -> KVError:
        """A new instance with the same reason. Raise this, not a shared constant: a raised
        exception keeps its traceback, and with it the frames (and the connection) it left."""
        return type(self)(self.reason)

    @property
    def reply(self) -> bytes:
        """The protocol line for this error: ``ERR <reason>\\n``."""
        return b"ERR " + self.reason.encode() + b"\n"


class ProtocolError(KVError):
    """A request line that is not a valid command; the connection stays usable."""

    reason = "bad request"


class StoreError(KVError):
    """The store could not carry out an operation."""

    reason = "store error"


class ClientError(KVError):
    """Base of the errors raised by :mod:`kvgevent.client`."""

    reason = "client error"


class ServerError(ClientError):
    """The server answered ``ERR <reason>``; :attr:`reason` holds the phrase."""


class ConnectionLost(ClientError):
    """The connection failed, closed, or a reply did not arrive in time."""

    reason = "connection lost"


class NotSent(ConnectionLost):
    """A :class:`ConnectionLost` found before anything of the call was sent (the server had
    closed the connection, an idle timeout perhaps, or sent what nothing asked for): none of
    it reached the server, so the call can be made again on a new connection."""


class InvalidArgument(ClientError, ValueError):
    """A key or value that cannot be sent (':' in a key, a newline anywhere, an empty key)."""

    reason = "invalid argument"
