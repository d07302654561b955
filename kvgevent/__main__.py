"""``python -m kvgevent``: the server (as ``run_server.py``); how --workers starts its workers."""

from gevent import monkey

monkey.patch_all()  # first: a Redis store's sockets must be cooperative

import sys  # noqa: E402

from kvgevent.serve.cli import main  # noqa: E402

sys.exit(main())
