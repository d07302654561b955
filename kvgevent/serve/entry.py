"""The ``kvgevent-server`` command (and ``python -m kvgevent``): ``run_server.py`` once
installed. gevent patches the standard library before anything else imports it: with a Redis
store, its client's sockets must be gevent's, or one Redis round trip would block every client."""

from __future__ import annotations

import sys


def main() -> None:
    import signal

    # As in run_server.py: a SIGINT before the server's own handlers ends the process quietly,
    # and a SIGHUP is ignored (its default action would kill it) until reopen_on_hangup.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from gevent import monkey

    monkey.patch_all()
    from kvgevent.serve.cli import main as serve  # (after the patch)

    sys.exit(serve())
