#!/usr/bin/env python3
"""Run the kvgevent server. ``python run_server.py --help`` lists the options."""

from gevent import monkey

# Before anything else imports socket or threading: with a Redis store, its client's sockets
# must be gevent's, or one Redis round trip would block every client.
monkey.patch_all()

import sys  # noqa: E402

from kvgevent.serve.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
