"""``python run_client.py``: the command-line client.

Modes, chosen by the arguments:

* ``run_client.py get KEY`` (also ``put``, ``update``, ``delete``, ``ping``, ``stats``):
  one command, its result, an exit status.
* ``run_client.py PUT:k:v GET:k``: protocol lines, sent as typed; the server's reply lines.
* no command, stdin a terminal: the interactive REPL (:mod:`kvgevent.client_repl`).
* no command, stdin not a terminal: one request per stdin line, words or protocol lines.
* ``--pipe``: mass insertion of protocol lines from stdin; ``--stat``: live counters;
  ``--latency``: PING round trips (:mod:`kvgevent.client_tools`).

Output is for people on a terminal and raw otherwise (one value per line, nothing else);
``--raw`` and ``--no-raw`` force either; on a terminal whatever the server sent is shown escaped
(no control bytes reach it). Exit status: 0 success, 1 the server answered ``ERR`` (or a request
was malformed), 2 bad usage, 3 the connection failed or the server made no progress for
``--timeout`` seconds; messages go to stderr.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import ssl
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TextIO

from kvgevent.args import (
    EXIT_STDOUT_CLOSED,
    Parser,
    add_env_option,
    check_env,
    output_to_devnull,
    port_number,
    positive_int,
    program_name,
)
from kvgevent.client.client import MAX_SECONDS, Client
from kvgevent.client.commands import (
    HELP,
    Request,
    command_from_words,
    error_message,
    escape_line,
    parse_request,
    reply_error,
    show_raw_reply,
    show_result,
)
from kvgevent.client.repl import run_repl
from kvgevent.client.tools import run_latency, run_pipe, run_stat
from kvgevent.config import DEFAULT_CLIENT_TIMEOUT, DEFAULT_HOST, DEFAULT_PORT
from kvgevent.errors import ConnectionLost, InvalidArgument, ServerError
from kvgevent.tls import client_context

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_CONNECTION = 3
EXIT_INTERRUPTED = 128 + signal.SIGINT  # (as a shell shows a command Ctrl-C ended)
BATCH = 1000
"""Requests sent per write when reading requests from stdin: one round trip per batch."""
STDIN_READ = 1 << 16
"""Bytes of stdin read at a time when requests come from it."""
DEFAULT_INTERVAL = 1.0
"""Seconds between two lines of --stat and --latency."""


CONNECTION_OPTIONS = ("--host", "--port", "--timeout", "--password", "--tls-ca")
"""The connection options that take a value."""
CONNECTION_SWITCHES = ("--tls", "--tls-insecure")


def seconds(accept_zero: bool, name: str) -> Callable[[str], float]:
    """An argparse type: a number of seconds up to MAX_SECONDS, above zero (or at least zero
    when ``accept_zero``); argparse reports anything else as a usage error (exit status 2)."""

    def parse(text: str) -> float:
        value = float(text)
        if not 0 <= value <= MAX_SECONDS or (value == 0 and not accept_zero):  # (NaN: False)
            raise ValueError(text)
        return value

    parse.__name__ = name  # argparse names it in its message: "invalid interval value"
    return parse


timeout_seconds = seconds(accept_zero=True, name="timeout")  # 0: wait for ever
interval_seconds = seconds(accept_zero=False, name="interval")


def add_connection_options(parser: argparse.ArgumentParser) -> None:
    """Add the connection options to ``parser`` (read back by :func:`client_for`)."""
    add_env_option(parser, "host", DEFAULT_HOST, "server address")
    add_env_option(parser, "port", DEFAULT_PORT, "server port", type=port_number)
    add_env_option(
        parser,
        "timeout",
        DEFAULT_CLIENT_TIMEOUT,
        "seconds the server may take to connect, or to take or send a byte while a reply is due; 0: no limit",
        type=timeout_seconds,
    )
    add_env_option(parser, "password", None, "send 'AUTH:<password>' first (prefer the environment variable)")
    parser.add_argument("--tls", action="store_true", help="speak TLS (checking the server's certificate)")
    add_env_option(parser, "tls-ca", None, "CA certificate (PEM) to check the server with; implies --tls")
    parser.add_argument(
        "--tls-insecure", action="store_true", help="speak TLS without checking the server's certificate"
    )


def tls_choice(args: argparse.Namespace) -> tuple[str | None, bool] | None:
    """What TLS the options ask for: ``(cafile, verify)``, or None for plain TCP (a form a
    bench worker process can be sent, where a context cannot)."""
    if args.tls_insecure:
        return (None, False)
    if args.tls or args.tls_ca:
        return (args.tls_ca, True)
    return None


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The TLS context the options ask for, or None for plain TCP. OSError for a --tls-ca
    that cannot be read, ssl.SSLError for one that is not a certificate."""
    choice = tls_choice(args)
    if choice is None:
        return None
    cafile, verify = choice
    return client_context(cafile, verify=verify)


def check_tls_ca(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """A --tls-ca that cannot be read, or holds no certificate, is a usage error (exit 2),
    said with its path: before, a bare "[Errno 2] No such file or directory" or OpenSSL's
    "[X509: NO_CERTIFICATE_OR_CRL_FOUND]", and exit 3 (the server cannot be reached)."""
    if not args.tls_ca:
        return
    try:
        client_context(args.tls_ca)
    except ssl.SSLError as exc:
        parser.error(f"--tls-ca {args.tls_ca}: no CA certificate (PEM) in it ({exc.reason or exc})")
    except OSError as exc:
        parser.error(f"--tls-ca {args.tls_ca}: {exc.strerror or exc}")


def client_for(args: argparse.Namespace) -> Client:
    """A client for the options' server, not connected yet."""
    timeout = args.timeout or None  # 0: no limit
    tls = tls_context(args) or False
    return Client(args.host, args.port, timeout=timeout, connect=False, password=args.password, tls=tls)


def leading_connection_options(argv: list[str]) -> bool:
    """True if ``argv`` holds only connection options (``--port 1 --tls``, ``--timeout=2``)."""
    at = 0
    while at < len(argv):
        option, joined, _ = argv[at].partition("=")
        if option in CONNECTION_SWITCHES and not joined:
            at += 1
        elif option in CONNECTION_OPTIONS:
            at += 1 if joined else 2
        else:
            return False
    return at == len(argv)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog=program_name("run_client.py", "kvgevent-cli"),
        allow_abbrev=False,  # "--pip" is not "--pipe": a typo is a usage error, not a guess
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The kvgevent client.\n\n" + HELP,
        epilog="examples:\n"
        "  run_client.py                      interactive, with history and help\n"
        "  run_client.py put fruit apple      one command (exit 0; 1 on ERR; 3 if unreachable)\n"
        "  run_client.py get fruit            one value per line when piped\n"
        "  run_client.py PUT:k:v GET:k        protocol lines, sent as typed\n"
        "  run_client.py --pipe < data.txt    mass insertion of protocol lines\n"
        "  run_client.py --stat               live counters, one line a second\n"
        "  run_client.py --latency            PING round-trip times\n"
        "  run_client.py bench -c 50 -P 16    load test (see: run_client.py bench --help)",
    )
    parser.add_argument("request", nargs="*", metavar="COMMAND", help="a command and its arguments")
    add_connection_options(parser)
    modes = parser.add_mutually_exclusive_group()
    modes.add_argument(
        "--pipe", action="store_true", help="send protocol lines from stdin as fast as possible"
    )
    modes.add_argument("--stat", action="store_true", help="print the server's counters every --interval")
    modes.add_argument("--latency", action="store_true", help="measure PING round trips")
    parser.add_argument(
        "--interval",
        type=interval_seconds,
        default=DEFAULT_INTERVAL,
        help=f"seconds between lines of --stat/--latency (default: {DEFAULT_INTERVAL})",
    )
    parser.add_argument("--count", type=positive_int, help="stop --stat/--latency after this many lines")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--raw", action="store_true", help="raw output even on a terminal")
    output.add_argument("--no-raw", action="store_true", help="formatted output even when piped")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the client as the arguments ask (sys.argv's by default); the exit status. A Ctrl-C
    anywhere is 130, never a traceback (run_client.py leaves SIGINT at its default while it
    imports this module: Python's handler comes back here)."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # in the arguments' checks, before a mode's own handling
        return EXIT_INTERRUPTED


def _main(argv: list[str]) -> int:
    _open_closed_streams()
    bench_argv = _bench_argv(argv)
    if bench_argv is not None:
        from kvgevent.client.bench import main as bench_main

        try:
            status = bench_main(bench_argv)
            sys.stdout.flush()
            return status
        except BrokenPipeError:  # (`bench | head -1`: as for the other modes, below)
            return _stdout_closed()
    parser = build_parser()
    args = parser.parse_args(argv)
    check_env(parser, args)
    check_tls_ca(parser, args)
    if args.request and (args.pipe or args.stat or args.latency):
        parser.error("--pipe, --stat and --latency take no COMMAND")
    try:
        status = _run(args, parser)
        sys.stdout.flush()  # here, not at exit: a closed stdout is handled below
        return status
    except BrokenPipeError:  # stdout's reader has gone (`| head -1`); sockets raise ConnectionLost
        return _stdout_closed()
    except ConnectionLost as exc:
        print(f"run_client.py: {exc}", file=sys.stderr)
        return EXIT_CONNECTION
    except ServerError as exc:  # a refused AUTH
        print(f"run_client.py: ERR {escape_line(exc.reason.encode())}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # not the server's (sockets raise ConnectionLost): this machine's
        return local_failure(exc, "run_client.py")
    except KeyboardInterrupt:  # Ctrl-C: how --stat and --latency end; anything else is cut short
        return 0 if args.stat or args.latency else EXIT_INTERRUPTED


def _open_closed_streams() -> None:
    """A standard stream the caller closed (``>&-``, ``<&-``: Python sets it to None) as
    /dev/null, so the command still runs and its exit status still tells: else the first
    print was a traceback."""
    for name, mode in (("stdin", "r"), ("stdout", "w"), ("stderr", "w")):
        if getattr(sys, name) is None:
            setattr(sys, name, open(os.devnull, mode))  # noqa: SIM115  # (for the process's life)


WRITE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
"""Errors only a write gives: the client writes nothing but its output (sockets aside)."""


def local_failure(exc: OSError, program: str) -> int:
    """One line on stderr for an OSError of this machine's, not the server's (sockets raise
    ConnectionLost): the output that cannot be written (a full disk, /dev/full), the input
    that cannot be read; and EXIT_ERROR, as exit 3 says the server cannot be reached. After a
    failed write the output is pointed at /dev/null, so the interpreter's last flush at exit
    says nothing more."""
    what = "error"
    if exc.errno in WRITE_ERRORS:
        what = "cannot write the output"
        output_to_devnull(sys.stdout)
    print(f"{program}: {what}: {exc.strerror or exc}", file=sys.stderr)
    return EXIT_ERROR


def _stdout_closed() -> int:
    """Stop quietly once stdout's reader has gone, as a Unix tool killed by SIGPIPE does, with
    the status a shell shows for one (128 + SIGPIPE = 141). Stdout is pointed at /dev/null
    first, so the interpreter's last flush of what is left finds no closed pipe."""
    output_to_devnull(sys.stdout)
    return EXIT_STDOUT_CLOSED


def _bench_argv(argv: list[str]) -> list[str] | None:
    """The bench's own arguments if ``argv`` asks for ``bench`` (``run_client.py bench --help``;
    connection options, ``--timeout 2`` or ``--tls``, may come before it), else None."""
    if "bench" not in argv:
        return None
    where = argv.index("bench")
    if leading_connection_options(argv[:where]):
        return argv[:where] + argv[where + 1 :]
    return None


def _run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the mode the arguments ask for; returns the exit status."""
    tty = args.no_raw or (not args.raw and sys.stdout.isatty())
    client = client_for(args)
    if args.pipe:
        return _run_pipe(client)
    if args.stat or args.latency:
        client.connect()
        if args.stat:
            run_stat(client, args.interval, args.count, sys.stdout, tty)
        else:
            run_latency(client, args.interval, args.count, sys.stdout)
        return 0
    if not args.request and sys.stdin.isatty():
        return run_repl(client)
    if [word.lower() for word in args.request[:1]] == ["help"]:  # (as in the REPL: nothing sent)
        print(HELP)
        return 0
    one_shot = _checked_arguments(args.request, parser)  # before connecting: usage errors as such
    client.connect()
    with client:
        if one_shot is not None:
            return run_requests(client, [], sys.stdout, tty, commands=one_shot)
        return run_requests(client, args.request or _stdin_lines(), sys.stdout, tty)


def _checked_arguments(request: list[str], parser: argparse.ArgumentParser) -> list[Request] | None:
    """The one-shot command of COMMAND words (``get k``), or None when the arguments are
    protocol lines (or there are none). Bad words, and a protocol line holding a newline (it
    would be two requests), are a usage error: exit 2, before anything is sent."""
    if not request:
        return None
    if ":" not in request[0]:
        try:
            return [Request(command=command_from_words(request))]
        except InvalidArgument as exc:
            parser.error(str(exc))
    for text in request:
        try:
            raw = parse_request(text).raw
        except InvalidArgument:
            continue  # bad words among protocol lines: reported when run, as from stdin
        if raw is not None and b"\n" in raw:
            parser.error(f"a protocol line may not contain a newline: {escape_line(raw)}")
    return None


def _run_pipe(client: Client) -> int:
    """--pipe: the summary on stdout, the first ERR lines on stderr; exit 1 if any ERR."""
    client.connect()
    progress = sys.stderr if sys.stderr.isatty() else None
    summary = run_pipe(client, sys.stdin.buffer, progress)
    for error in summary.first_errors:
        print(f"(error) {escape_line(error.encode(errors='replace'))}", file=sys.stderr)
    print(summary.line())
    return EXIT_ERROR if summary.errors else 0


def _stdin_lines() -> Iterator[str | None]:
    """Stdin's lines as typed: split on ``\\n`` only (a ``\\r`` inside a line is part of a
    value), bytes that are not UTF-8 kept (surrogateescape), so a protocol line goes out as read.
    None before a read that could wait (nothing more is readable now): what was read so far
    is then to be sent, so a producer that writes a line and waits for its reply gets it."""
    fd = sys.stdin.fileno()
    held = b""
    while True:
        if not select.select([fd], [], [], 0)[0]:  # (a regular file is always readable)
            yield None
        chunk = os.read(fd, STDIN_READ)
        if not chunk:
            break
        *lines, held = (held + chunk).split(b"\n")
        for line in lines:
            yield (line + b"\n").decode("utf-8", "surrogateescape")
    if held:
        yield held.decode("utf-8", "surrogateescape")


def _requests(lines: Iterable[str | None], errors: list[str]) -> Iterator[Request | None]:
    """The requests of typed ``lines`` (a malformed one's message goes to ``errors``); a
    None line (send what you have) is passed on as None."""
    for text in lines:
        if text is None:
            yield None
            continue
        if not text.strip():
            continue
        try:
            yield parse_request(text)
        except InvalidArgument as exc:
            errors.append(f"{exc}: {escape_line(text.strip().encode('utf-8', 'surrogateescape'))}")


def run_requests(
    client: Client,
    lines: Iterable[str | None],
    out: TextIO,
    tty: bool,
    commands: list[Request] | None = None,
) -> int:
    """Run requests (typed lines, or ready ``commands``) in batches of up to BATCH, a batch
    sent early at a None line (nothing more is ready); print each result in order; report
    errors on stderr (or inline on a terminal). Returns the exit status."""
    parse_errors: list[str] = []
    requests = commands if commands is not None else _requests(lines, parse_errors)
    printer = _Printer(out, tty)
    batch: list[Request] = []
    for request in requests:
        printer.parse_errors(parse_errors)
        if request is not None:
            batch.append(request)
        if batch and (request is None or len(batch) >= BATCH):
            printer.results(_execute(client, batch, tty))
            batch.clear()
    printer.results(_execute(client, batch, tty))
    printer.parse_errors(parse_errors)
    return printer.status


class _Printer:
    """Where :func:`run_requests` writes: output lines on ``out`` (bytes as they are when it
    has a binary buffer), an ``ERR`` inline on a terminal or else on stderr (so a pipe gets
    values only), and the exit status so far."""

    def __init__(self, out: TextIO, tty: bool) -> None:
        self.out = out
        self.tty = tty
        self.sink = out.buffer if hasattr(out, "buffer") else None
        self.status = 0

    def emit(self, line: bytes) -> None:
        if self.sink is not None:
            self.sink.write(line + b"\n")
        else:
            self.out.write(line.decode("utf-8", "backslashreplace") + "\n")

    def results(self, results: Iterable[tuple[list[bytes], ServerError | None]]) -> None:
        for lines_out, error in results:
            for line in lines_out:
                self.emit(line)
            if error is not None:
                self.status = EXIT_ERROR
                if self.tty:  # inline, where the value would have been
                    self.emit(error_message(error).encode())
                else:
                    self.out.flush()
                    print(error_message(error), file=sys.stderr)
        self.out.flush()

    def parse_errors(self, messages: list[str]) -> None:
        for message in messages:
            print(f"(error) {message}", file=sys.stderr)
            self.status = EXIT_ERROR
        messages.clear()


def _execute(
    client: Client, batch: list[Request], tty: bool
) -> Iterator[tuple[list[bytes], ServerError | None]]:
    """Send a batch (consecutive word commands in one write, protocol lines in another) and
    yield, per request in order, its output lines and its error."""
    start = 0
    while start < len(batch):
        raw = batch[start].raw is not None
        end = start
        while end < len(batch) and (batch[end].raw is not None) == raw:
            end += 1
        group = batch[start:end]
        if raw:
            for reply in client.send_raw([r.raw for r in group if r.raw is not None]):
                yield show_raw_reply(reply, tty), reply_error(reply)
        else:
            commands = [r.command for r in group if r.command is not None]
            results = client.execute(commands, raise_on_error=False)
            for command, result in zip(commands, results, strict=True):
                if isinstance(result, ServerError):
                    yield [], result
                else:
                    yield show_result(command, result, tty), None
        start = end
