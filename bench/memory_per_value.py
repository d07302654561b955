#!/usr/bin/env python3
"""Memory per stored value: the server holding a million small values, against the same data
in a plain ``dict[str, list[bytes]]`` in a bare Python process.

Starts ``run_server.py`` on a free loopback port, stores ``--values`` values (one per key,
``--value-size`` bytes, keys like ``key123456``) with ``run_client.py``'s pipe mode, and reads
the server's RSS before and after. Then builds the same dict in a fresh interpreter and
measures its RSS the same way. Prints bytes per value for both and their ratio.

usage: python bench/memory_per_value.py [--values 1000000] [--value-size 10]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import proc_status, server  # noqa: E402
from kvgevent.client import Client  # noqa: E402

PLAIN_DICT = """
import sys
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:"))
n, size = int(sys.argv[1]), int(sys.argv[2])
before = rss()
d = {}
for i in range(n):
    d["key%d" % i] = [(b"%0*d" % (size, i))[:size]]
print(rss() - before)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--values", type=int, default=1_000_000)
    parser.add_argument("--value-size", type=int, default=10)
    args = parser.parse_args()

    with server() as (proc, port):
        probe = Client(port=port)
        time.sleep(0.5)
        before, _ = proc_status(proc.pid)
        lines = b"".join(
            b"PUT:key%d:%s\n" % (i, (b"%0*d" % (args.value_size, i))[: args.value_size])
            for i in range(args.values)
        )
        loaded = subprocess.run(
            [sys.executable, str(ROOT / "run_client.py"), "--port", str(port), "--pipe"],
            input=lines,
            capture_output=True,
            cwd=ROOT,
            check=True,
        )
        assert probe.stats()["keys"] == args.values, loaded.stdout
        time.sleep(0.5)
        after, _ = proc_status(proc.pid)
        probe.close()
    plain = int(
        subprocess.run(
            [sys.executable, "-c", PLAIN_DICT, str(args.values), str(args.value_size)],
            capture_output=True,
            check=True,
        ).stdout
    )
    served = after - before
    print(f"{args.values} values of {args.value_size} B, one per key:")
    print(
        f"  kvgevent server:              {served * 1024 / args.values:6.1f} B per value "
        f"(RSS +{served / 1024:.0f} MB)"
    )
    print(
        f"  plain dict[str, list[bytes]]: {plain * 1024 / args.values:6.1f} B per value "
        f"(RSS +{plain / 1024:.0f} MB)"
    )
    print(f"  ratio: {served / plain:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
