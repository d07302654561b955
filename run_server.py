#!/usr/bin/env python3
"""Run the kvgevent server. ``python run_server.py --help`` lists the options."""

import signal

# Until the server installs its own handlers (before it listens), a Ctrl-C ends the process
# as the signal's default does, not with a KeyboardInterrupt traceback from an import or an
# AOF replay: nothing is served yet. A SIGHUP (logrotate's postrotate, ExecReload=) is ignored
# meanwhile: its default action killed a server still importing, a death that systemd counts
# as clean (Restart=on-failure does not restart it). The SIGHUP handler replaces this.
signal.signal(signal.SIGINT, signal.SIG_DFL)
signal.signal(signal.SIGHUP, signal.SIG_IGN)

from gevent import monkey  # noqa: E402

# Before anything else imports socket or threading: with a Redis store, its client's sockets
# must be gevent's, or one Redis round trip would block every client.
monkey.patch_all()

import sys  # noqa: E402

from kvgevent.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
