#!/usr/bin/env python3
"""Talk to a kvgevent server. ``python run_client.py --help`` lists the options."""

import signal

# While the client starts (its imports, about a tenth of a second), a Ctrl-C ends the process
# as the signal's default does (a shell shows 130), not with a KeyboardInterrupt traceback from
# an import; main() puts Python's handler back. (A SIGINT ignored, as a shell's background
# job or `trap '' INT` leaves it, stays ignored.)
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys

from kvgevent.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
