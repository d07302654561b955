#!/usr/bin/env python3
"""Talk to a kvgevent server. ``python run_client.py --help`` lists the options."""

import sys

from kvgevent.client.cli import main

if __name__ == "__main__":
    sys.exit(main())
