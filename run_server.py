#!/usr/bin/env python3
"""Run the kvgevent server. ``python run_server.py --help`` lists the options."""

import sys

from kvgevent.cli import main

if __name__ == "__main__":
    sys.exit(main())
