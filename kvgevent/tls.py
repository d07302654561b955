"""TLS over a plain socket with ``ssl.MemoryBIO``, for one reader and one writer at a time.

Why not ``SSLSocket``: with gevent 26.9 a reader greenlet blocked in ``recv`` and a writer
greenlet in ``sendall`` on one gevent ``SSLSocket`` deadlocked (the reply never left). Here
the socket stays plain: :meth:`TlsStream.recv` reads ciphertext from the socket and decrypts
it, :meth:`TlsStream.sendall` encrypts and writes ciphertext, and neither waits for the other.

Two locks, made by ``lock_factory`` (``threading.Lock`` for threads, ``gevent.lock.Semaphore``
for greenlets): one is held only around calls into the ``SSLObject`` (OpenSSL is not safe
for concurrent use from threads), the other around draining the outgoing BIO into the socket,
so TLS records leave in the order they were made even when the reader must send (handshake
data, alerts) while the writer is sending replies.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Callable
from typing import Any

SEND_SLICE = 64 * 1024
"""Plaintext encrypted and sent at a time. Encrypting a whole 1 MiB batch at once held 1 MiB of
ciphertext twice (the BIO and its copy) per client that did not read, uncounted by --max-memory,
and the BIO kept that size afterwards."""

RECORD_READ = 1 << 16
"""Ciphertext bytes asked of one socket ``recv``."""


def server_context(certfile: str, keyfile: str | None = None) -> ssl.SSLContext:
    """A server context: TLS 1.2 or newer, no renegotiation. Raises OSError/SSLError if the
    certificate or key cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    context.load_cert_chain(certfile, keyfile)
    return context


def client_context(cafile: str | None = None, verify: bool = True) -> ssl.SSLContext:
    """A client context checking the server against ``cafile`` (or the system's CAs)."""
    context = ssl.create_default_context(cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


class TlsStream:
    """A TLS session over ``sock``: ``handshake()``, then ``recv``/``sendall`` of plaintext.

    ``recv`` returns ``b""`` at the end of the stream (close_notify or EOF). Errors are the
    socket's OSError, or ``ssl.SSLError`` for a TLS failure. The caller owns and closes the
    socket.
    """

    def __init__(
        self,
        sock: socket.socket,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        lock_factory: Callable[[], Any] | None = None,
    ) -> None:
        make_lock = lock_factory or _NoLock
        self.sock = sock
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self._tls_lock = make_lock()
        self._send_lock = make_lock()
        self._eof = False
        self._failure: ssl.SSLError | None = None  # met after plaintext: raised by the next recv
        self.records = 0  # records the last recv decrypted

    def handshake(self) -> None:
        """Run the handshake to completion (blocking in the socket's own way)."""
        while True:
            try:
                with self._tls_lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                if not self._fill():
                    closed = "connection closed during the TLS handshake"
                    raise ssl.SSLEOFError(ssl.SSL_ERROR_EOF, closed) from None

    @property
    def failure_held(self) -> bool:
        """A TLS failure met after plaintext waits for the next :meth:`recv` (which raises it
        without reading the socket: a caller that waits for the socket first may wait for
        nothing)."""
        return self._failure is not None

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes of plaintext; waits for at least one byte or the end. A TLS
        failure (a corrupt record, a fatal alert) after plaintext that came before it is
        raised by the next call: that plaintext is returned first, as a socket returns the
        bytes that came before a reset (the client's whole lines before it are served).
        :attr:`records` says how many records it decrypted (the work it did)."""
        if self._failure is not None:
            raise self._failure
        self.records = 0
        while True:
            chunks = self._decrypt(size)
            # Sent now unless the writer is sending (it may wait for a client that does not
            # read): it sends these bytes before it lets the lock go (sendall). Waiting for
            # it held a reader that had an alert to send (a refused renegotiation) from
            # seeing the end of the stream.
            if self._outgoing.pending and not self._send_lock.locked():
                self._flush()
            if chunks:
                return b"".join(chunks)
            if self._eof or not self._fill():
                return b""

    def _decrypt(self, size: int) -> list[bytes]:
        """The plaintext the TLS engine can give now, up to ``size`` bytes: none when it
        needs more ciphertext or the stream has ended (``_eof``). A TLS failure raises,
        unless plaintext came before it: then it is kept for the next :meth:`recv`."""
        chunks: list[bytes] = []
        total = 0
        try:
            with self._tls_lock:
                while total < size:
                    chunk = self._tls.read(size - total)
                    if not chunk:  # the peer's close_notify (SSLObject returns b"" for it)
                        self._eof = True
                        break
                    chunks.append(chunk)
                    total += len(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            self._eof = True
        except ssl.SSLError as failure:
            if not chunks:
                raise
            self._failure = failure
        self.records += len(chunks)  # (a read gives one record's plaintext at most)
        return chunks

    def sendall(self, data: bytes) -> None:
        """Encrypt ``data`` and write it all to the socket, SEND_SLICE bytes at a time: the
        ciphertext held at once (and the outgoing BIO, which keeps its largest size) stays
        one slice big however big ``data`` is."""
        view = memoryview(data)
        with self._send_lock:
            for start in range(0, len(view), SEND_SLICE):
                with self._tls_lock:
                    self._tls.write(view[start : start + SEND_SLICE])
                    ciphertext = self._outgoing.read()
                self.sock.sendall(ciphertext)
                del ciphertext
            # What the reader made while the last send waited (an alert: recv leaves it to
            # this lock's holder) goes before the lock is let go, or it would wait for the
            # next send. (No wait between this look and the release: nothing can slip in.)
            while self._outgoing.pending:
                self._flush_held()

    def close_notify(self) -> bytes:
        """Make this side's close_notify alert (nothing can be sent after it) and return its
        ciphertext, for the caller to send if it can; b"" if the session cannot make one."""
        with self._tls_lock:
            try:
                self._tls.unwrap()
            except ssl.SSLWantReadError:  # (it waits for the peer's: ours is made)
                pass
            except (ssl.SSLError, ValueError):
                return b""
            return self._outgoing.read()

    def _fill(self) -> bool:
        """Read ciphertext from the socket into the TLS engine; False at end of stream. The
        engine is not told of an end without the peer's close_notify (a bare FIN, as from a
        client that half-closes): told, OpenSSL 3 fails the session, and this side's
        close_notify, sent after the last reply, could not be made (a strict client then
        took a complete reply for a truncated one, an attacker's pass)."""
        data = self.sock.recv(RECORD_READ)
        if data:
            with self._tls_lock:
                self._incoming.write(data)
        return bool(data)

    def _flush(self) -> None:
        """Send whatever the TLS engine has produced (handshake messages, alerts)."""
        with self._send_lock:
            self._flush_held()

    def _flush_held(self) -> None:
        """:meth:`_flush`, the send lock held already."""
        with self._tls_lock:
            ciphertext = self._outgoing.read()
        if ciphertext:
            self.sock.sendall(ciphertext)


class _NoLock:
    """For a single greenlet or thread: nothing to exclude."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None

    def locked(self) -> bool:
        return False
