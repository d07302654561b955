#!/usr/bin/env python3
"""Talk to a kvgevent server. ``python run_client.py --help`` lists the options."""

import signal

# While the client starts (its imports, about a tenth of a second), a Ctrl-C ends the process
# as the signal's default does (a shell shows 130), not with a KeyboardInterrupt traceback from
# an import; main() puts Python's handler back.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys  # noqa: E402

from kvgevent.client.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
