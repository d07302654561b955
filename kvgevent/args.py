"""Command-line argument helpers both programs use (``run_server.py`` and ``run_client.py``):
number types that say what they accept, byte sizes with K/M/G suffixes, and options whose
default comes from a ``KVGEVENT_*`` environment variable; a parser whose --help says when it
cannot be written, and the standard output pointed away once it cannot be. No gevent."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import Any

ENV_PREFIX = "KVGEVENT_"


def _number(convert: Callable[[str], Any], accept: Callable[[Any], bool], name: str) -> Callable[[str], Any]:
    """An argparse type: ``convert`` the text, refuse values ``accept`` rejects. ``name`` is
    what argparse says in its error ("invalid port_number value")."""

    def parse(text: str) -> Any:
        value = convert(text)
        if not accept(value):
            raise ValueError(text)
        return value

    parse.__name__ = name
    return parse


port_number = _number(int, lambda v: 0 <= v <= 65535, "port_number")  # 0 = any free port
positive_int = _number(int, lambda v: v >= 1, "positive_int")
non_negative_float = _number(float, lambda v: v >= 0, "non_negative_float")  # NaN refused too
positive_float = _number(float, lambda v: v > 0, "positive_float")
growth_ratio = _number(float, lambda v: v > 1, "growth_ratio")

BYTE_SUFFIXES = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
"""Suffixes of a size (any case, optionally followed by B or iB): powers of 1024, as in
systemd's MemoryMax= (Redis reads 1k as 1000 but 1kb as 1024; here both are 1024)."""


def _byte_count(text: str) -> int:
    """``536870912``, ``512M``, ``512mb``, ``0.5G``: a whole number of bytes, at least 0."""
    stripped = text.strip().upper()
    if stripped.endswith("IB") and stripped[-3:-2].isalpha():
        stripped = stripped[:-2]
    elif stripped.endswith("B"):
        stripped = stripped[:-1]
    unit = stripped[-1:] if stripped[-1:].isalpha() else ""
    if unit not in BYTE_SUFFIXES:
        raise ValueError(text)
    digits = stripped[: len(stripped) - len(unit)]
    try:
        return int(float(digits) * BYTE_SUFFIXES[unit]) if unit else int(digits)
    except OverflowError:  # "inf"
        raise ValueError(text) from None


byte_size = _number(_byte_count, lambda v: v >= 0, "byte_size")
positive_byte_size = _number(_byte_count, lambda v: v >= 1, "positive_byte_size")


class MalformedEnv:
    """The default of an option whose environment variable holds a malformed value."""

    __slots__ = ("env", "raw")

    def __init__(self, env: str, raw: str) -> None:
        self.env = env
        self.raw = raw


def check_env(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """After ``parse_args``: exit with a usage error (status 2) naming the first environment
    variable whose malformed value an option fell back to."""
    for value in vars(args).values():
        if isinstance(value, MalformedEnv):
            parser.error(f"invalid value in {value.env}: {value.raw!r}")


def add_env_option(
    parser: argparse.ArgumentParser,
    flag: str,
    default: Any,
    help: str,
    type: Callable[[str], Any] = str,
    choices: Sequence[str] | None = None,
) -> None:
    """Add ``--flag`` whose default comes from ``KVGEVENT_FLAG`` when set, else ``default``.

    A malformed environment value is reported like a malformed flag (exit status 2) by
    :func:`check_env` after parsing, unless the flag was given: ``--help`` still works."""
    env = ENV_PREFIX + flag.upper().replace("-", "_")
    raw = os.environ.get(env)
    value = default
    if raw is not None:
        try:
            value = type(raw)
            if choices is not None and value not in choices:
                raise ValueError(raw)
        except ValueError:
            value = MalformedEnv(env, raw)
    parser.add_argument(
        "--" + flag,
        default=value,
        type=type,
        choices=choices,
        metavar=None if choices else flag.upper().replace("-", "_"),
        help=f"{help} (default: {'none' if default is None else default}; env {env})",
    )


EXIT_HELP_UNWRITTEN = 1
"""The exit status when --help cannot be written (a full disk): not the 0 of a help shown."""
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE
"""What a shell shows for a process ended by SIGPIPE: ``--help | head -1``."""


def output_to_devnull(stream: Any) -> None:
    """Point ``stream``'s descriptor at /dev/null: after its reader went or a write failed,
    the interpreter's last flush of what is left then finds nothing to complain of."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


class Parser(argparse.ArgumentParser):
    """argparse's parser, but a help that cannot be written says so: argparse drops a write's
    OSError and exits 0 (``--help > /dev/full`` printed nothing, said nothing, and exit 0).
    A reader that has gone (``--help | head -1``) ends it quietly with 141, as SIGPIPE would."""

    def print_help(self, file: Any = None) -> None:  # (a stream with write, flush, fileno)
        out = sys.stdout if file is None else file
        try:
            out.write(self.format_help())
            out.flush()
        except OSError as exc:
            output_to_devnull(out)
            if isinstance(exc, BrokenPipeError):
                sys.exit(EXIT_STDOUT_CLOSED)
            self.exit(EXIT_HELP_UNWRITTEN, f"{self.prog}: cannot write the help: {exc.strerror or exc}\n")


def program_name(script: str, command: str) -> str:
    """The name a usage message gives the program: ``command`` when run as the installed
    command (``kvgevent-server``), else the script's (``run_server.py``, ``python -m``)."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return command if invoked == command else script
