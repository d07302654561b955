"""``python run_client.py``: send protocol lines to a server and print the replies.

Lines come from the command line (``run_client.py PUT:k:v GET:k``) or, when none are given,
from stdin, one request per line. Each request is followed by ``PING`` on the wire, so the
replies printed for it are complete. Exit status: 0 if every request succeeded, 1 if the
server answered ``ERR`` to any, 3 if the connection failed (with one line on stderr).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence

from .cli import add_env_option, non_negative_float, port_number
from .client import Client
from .config import DEFAULT_CLIENT_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT
from .errors import ConnectionLost

EXIT_ERR_REPLY = 1
EXIT_CONNECTION = 3
STDIN_BATCH = 1000
"""Requests sent per write when reading stdin: one round trip per batch, not per line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run_client.py",
        description="Send kvgevent protocol lines (PUT:key:value, GET:key, "
        "UPDATE:key:old:new, DELETE:key, PING, STATS) and print the replies.",
        epilog="With no LINE arguments, requests are read from stdin, one per line. "
        "Exit status: 0 ok, 1 the server answered ERR, 3 connection failed.",
    )
    parser.add_argument("lines", nargs="*", metavar="LINE", help="a request, e.g. GET:fruit")
    add_env_option(parser, "host", DEFAULT_HOST, "server address")
    add_env_option(parser, "port", DEFAULT_PORT, "server port", type=port_number)
    add_env_option(
        parser, "timeout", DEFAULT_CLIENT_TIMEOUT, "seconds to wait for the server", type=non_negative_float
    )
    return parser


def _batches(lines: Iterable[str], size: int) -> Iterator[list[bytes]]:
    batch: list[bytes] = []
    for line in lines:
        line = line.rstrip("\r\n")
        if line:
            batch.append(line.encode("utf-8", "surrogateescape"))
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source: Iterable[str] = args.lines if args.lines else sys.stdin
    out = sys.stdout.buffer
    status = 0
    try:
        with Client(args.host, args.port, timeout=args.timeout or None) as client:
            for batch in _batches(source, STDIN_BATCH):
                for reply in client.send_raw(batch):
                    for line in reply:
                        out.write(line + b"\n")
                        if line.startswith(b"ERR "):
                            status = EXIT_ERR_REPLY
                out.flush()
    except ConnectionLost as exc:
        out.flush()
        print(f"run_client.py: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    return status
