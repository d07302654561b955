"""The ``kvgevent-cli`` command: ``run_client.py`` once installed."""

from __future__ import annotations

import sys


def main() -> None:
    import signal

    # As in run_client.py: a Ctrl-C while the client imports ends the process as the signal's
    # default does, not with a traceback; the client's main() puts Python's handler back.
    # (One ignored, as in a shell's background job, stays ignored.)
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    from kvgevent.client.cli import main as client

    sys.exit(client())
