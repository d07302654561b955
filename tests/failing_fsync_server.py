#!/usr/bin/env python3
"""``run_server.py`` whose ``os.fsync`` fails with EIO while the file named by
``KVGEVENT_TEST_FAIL_FSYNC`` exists. For the tests of a disk that stops syncing, which cannot
be made to happen for real here: the fault is injected at the OS-call boundary and nowhere
else. Not a test module (pytest collects ``test_*.py`` only)."""

from gevent import monkey

monkey.patch_all()

import errno  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvgevent.serve.cli import main  # noqa: E402

TRIGGER = os.environ["KVGEVENT_TEST_FAIL_FSYNC"]
real_fsync = os.fsync


def fsync(fd: int) -> None:
    if os.path.exists(TRIGGER):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    real_fsync(fd)


os.fsync = fsync

if __name__ == "__main__":
    sys.exit(main())
