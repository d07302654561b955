#!/usr/bin/env python3
"""Regenerate bench/REPORT.md and bench/report.png: kvgevent beside the lean card-shaped
ceiling (a minimal server of kvgevent's own shape) and Redis, measured in one compare run,
with the machine, the ratios, idle memory, memory per stored value and the account of each
optimisation.

Runs ``../shared/bench/compare`` (or ``--compare PATH``) on this checkout with the ceiling
(``--ceiling PATH``, ``gcard_lean.py``) in compare's "goref" slot, then
``bench/memory_per_value.py``. Needs what compare needs (golang-go, redis-server,
redis-tools) and, for the chart, matplotlib: ``pip install -r bench/requirements.txt``
(without it the report is written without the chart).

usage: python bench/report.py [--compare PATH] [--ceiling PATH] [--quick | --reps N --duration S]
                              [--out bench/REPORT.md]
       python bench/report.py --from DIR   (rewrite the report from an earlier run's output)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "bench"
OPTIMISATIONS = ROOT / "bench" / "OPTIMISATIONS.md"

GRID = ((1, 1), (50, 1), (50, 16), (500, 16))
"""The shapes issue 15 asks about: connections x requests in flight per connection."""

CEILING_TARGET = 0.90
"""kvgevent / ceiling that issue 15 asks for at every shape."""

REPS = 3
"""Runs per shape and server: the median of three (compare's own default, two, left single
shapes 5-10 % apart from one run to the next on the 2-core VM)."""

DURATION = 3.0
"""Measured seconds per run (compare's default is 2)."""

NAMES = {"kvgevent": "kvgevent", "goref": "lean card-shaped ceiling", "redis": "Redis"}


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import gevent

    return (
        f"{os.cpu_count()} x {model}, Linux {platform.release()}, Python {platform.python_version()}, "
        f"gevent {gevent.__version__}"
    )


def medians(results: list[dict]) -> dict[tuple[str, str, int, int], float]:
    """ops/s by (server, mode, conns, pipeline): the median over the runs that did not fail."""
    runs: dict[tuple[str, str, int, int], list[float]] = {}
    for record in results:
        if record.get("kind") == "load" and "fatal" not in record and "ops_s" in record:
            key = (record["server"], record["mode"], record["c"], record["p"])
            runs.setdefault(key, []).append(record["ops_s"])
    return {key: statistics.median(values) for key, values in runs.items()}


def rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 1e6:
        return f"{value / 1e6:.2f}M"
    return f"{value / 1e3:.1f}k"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a and b else "-"


def table(ops: dict[tuple[str, str, int, int], float]) -> str:
    """The issue's table: each shape's ops/s for the three servers and the ratios."""
    lines = [
        "| load | kvgevent | lean card-shaped ceiling | Redis | kvgevent / ceiling"
        f" (target >= {CEILING_TARGET}) | kvgevent / Redis | ceiling / Redis |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in ("get", "put"):
        for conns, pipeline in GRID:
            kv, ceiling, redis = (ops.get((server, mode, conns, pipeline)) for server in NAMES)
            met = ""
            if kv and ceiling:
                met = " (met)" if kv / ceiling >= CEILING_TARGET else " (not met)"
            lines.append(
                f"| {mode.upper()} {conns} x {pipeline} | {rate(kv)} | {rate(ceiling)} | {rate(redis)} |"
                f" {ratio(kv, ceiling)}{met} | {ratio(kv, redis)} | {ratio(ceiling, redis)} |"
            )
    return "\n".join(lines)


def idle_table(results: list[dict]) -> str:
    lines = [
        "| server | connections | kB per idle connection | kB per connection after one GET each |",
        "|---|---|---|---|",
    ]
    for record in results:
        if record.get("kind") == "idle" and "kb_per_conn" in record:
            touched = record.get("kb_per_conn_touched")
            lines.append(
                f"| {NAMES.get(record['server'], record['server'])} | {record['n']:,} |"
                f" {record['kb_per_conn']:.1f} | {'-' if touched is None else f'{touched:.1f}'} |"
            )
    return "\n".join(lines)


def chart(ops: dict[tuple[str, str, int, int], float], path: Path) -> bool:
    """ops/s per shape for the three servers, as grouped bars (log scale); False without
    matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shapes = [(mode, conns, pipeline) for mode in ("get", "put") for conns, pipeline in GRID]
    figure, axes = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for index, (server, label) in enumerate(NAMES.items()):
        values = [ops.get((server, mode, c, p), 0) for mode, c, p in shapes]
        axes.bar([x + (index - 1) * width for x in range(len(shapes))], values, width, label=label)
    axes.set_xticks(range(len(shapes)), [f"{mode.upper()}\n{c} x {p}" for mode, c, p in shapes])
    axes.set_yscale("log")
    axes.set_ylabel("ops/s (log scale)")
    axes.set_title("kvgevent, a minimal server of its own shape, and Redis (one compare run)")
    axes.legend()
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return True


def compare_command(args: argparse.Namespace) -> list[str]:
    """The compare command line (without ``--out``)."""
    grid = ",".join(f"{c}x{p}" for c, p in GRID)
    command = [args.compare, "--servers", "kvgevent,goref,redis", "--grid", grid]
    if args.quick:
        command += ["--reps", "1", "--duration", "1", "--idle", "1000"]
    else:
        command += ["--reps", str(args.reps), "--duration", str(args.duration)]
    return command


def run_compare(args: argparse.Namespace, out: Path) -> int:
    env = {
        **os.environ,
        "KV_CHECKOUT": str(ROOT),
        "GOREF_BIN": sys.executable,
        "GOREF_ARGS": f"{args.ceiling} {{port}}",
    }
    command = [*compare_command(args), "--out", str(out)]
    print("running:", " ".join(command), file=sys.stderr)
    return subprocess.run(command, env=env, cwd=ROOT).returncode


def _shown(path: str) -> str:
    """A path as the report shows it: relative to the checkout when it is near it."""
    relative = os.path.relpath(path, ROOT)
    return relative if not relative.startswith("../..") else path


def memory_per_value() -> str:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "memory_per_value.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", default=str(SHARED / "compare"))
    parser.add_argument("--ceiling", default=str(SHARED / "ceiling" / "gcard_lean.py"))
    parser.add_argument("--quick", action="store_true", help="one short run per shape, idle 1,000 only")
    parser.add_argument("--reps", type=int, default=REPS, help=f"runs per shape and server (default {REPS})")
    parser.add_argument(
        "--duration", type=float, default=DURATION, help=f"measured seconds per run (default {DURATION:g})"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "REPORT.md"))
    parser.add_argument("--from", dest="source", help="a compare output directory to report on (no new run)")
    args = parser.parse_args()

    if args.source:
        out = Path(args.source)
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((out / "results.jsonl").stat().st_mtime))
    else:
        out = Path(tempfile.mkdtemp(prefix="kvreport-"))  # kept: --from rewrites the report from it
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        if run_compare(args, out) not in (0, 1):
            return 1
        print(f"compare's output: {out}", file=sys.stderr)
    lines = (out / "results.jsonl").read_text().splitlines()
    results = [json.loads(line) for line in lines if line]
    summary = (out / "summary.md").read_text().strip()
    ops = medians(results)
    png = Path(args.out).with_name("report.png")
    drawn = chart(ops, png)
    shown = f"![ops/s per shape]({png.name})" if drawn else "(no chart: matplotlib is not installed)"
    command = [_shown(part) for part in compare_command(args)]
    report = f"""# kvgevent performance report

Regenerated by `python bench/report.py` on {started}.

- Machine: {machine()}.
- Command: `KV_CHECKOUT=. GOREF_BIN=python GOREF_ARGS="{_shown(args.ceiling)} {{port}}"
  {" ".join(command)}` (servers pinned to CPU 0, load to CPU 1; kvgevent and the ceiling
  measured with the Go load generator, Redis with redis-benchmark at the same connections and
  pipeline depth). The ceiling (`gcard_lean.py`) is kvgevent's own shape with nothing else: a
  reader greenlet per client, a queue feeding a writer greenlet, a semaphore-guarded dict, the
  same lean waits, no validation, limits, counters or logs.

{shown}

{table(ops)}

## Idle connections (server RSS)

{idle_table(results)}

## Memory per stored value

`python bench/memory_per_value.py`:

```
{memory_per_value()}
```

## The whole compare run

{summary}

{OPTIMISATIONS.read_text().strip()}
"""
    Path(args.out).write_text(report)
    print(f"wrote {args.out}" + (f" and {png}" if drawn else ""), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
