"""Addresses and listening sockets."""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any


def worker_name() -> str:
    """This process, as named in a shared store's worker table."""
    return f"{socket.gethostname()}:{os.getpid()}"


def reuse_port_listener(host: str, port: int, backlog: int) -> Any:
    """A listening socket that other processes may bind too (the kernel spreads connects)."""
    from gevent import socket as gsocket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
