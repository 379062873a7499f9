"""Helpers shared by the benchmarks: medians, a table printer, the machine description.

Every benchmark module has `measure(quick: bool) -> dict` (figures plus a `rows` list for the
table) and runs alone as a script. These machines are shared and noisy: comparisons are made as
ratios of interleaved repeats, and every figure is a median with its spread.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
MARLWATCH = str(Path(sys.executable).with_name("marlwatch"))  # the venv's command, as a user runs it


def tmux(*args: str) -> str:
    """Run a tmux command (a real terminal for the app); its output."""
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def tmux_session(session: str, command: str) -> int:
    """Start `command` in a new detached 120x40 tmux session; the pid of its pane (the command,
    exec'ed)."""
    return int(tmux("new-session", "-d", "-s", session, "-x", "120", "-y", "40", "-P", "-F", "#{pane_pid}",
                    "exec " + command))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> tuple[float, float]:
    return (min(xs), max(xs)) if xs else (float("nan"), float("nan"))


def compile_bytecode() -> None:
    """Compile the package's bytecode, as `pip install` does for a regular (not editable) install.

    An editable install leaves it to the interpreter, and with PYTHONDONTWRITEBYTECODE set (as on
    many CI machines and containers) every command would compile marlwatch's modules again: ~0.1 s
    that no installed user pays, and a third of `summary`'s budget."""
    import compileall

    for package in ("marlwatch", "algorithms"):
        compileall.compile_dir(REPO / package, quiet=1)


def machine() -> dict[str, Any]:
    freq = psutil.cpu_freq()
    return {
        "host": platform.node(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "mhz": round(freq.current) if freq else None,
        "python": platform.python_version(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def row(figure: str, value: str, target: str = "", met: bool | None = None, note: str = "") -> dict[str, Any]:
    return {"figure": figure, "value": value, "target": target,
            "met": "" if met is None else ("yes" if met else "NO"), "note": note}


def print_table(rows: list[dict[str, Any]], file=sys.stdout) -> None:
    cols = ["figure", "value", "target", "met", "note"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols} if rows else {c: len(c) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols), file=file)
    print("  ".join("-" * widths[c] for c in cols), file=file)
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols), file=file)


def drain(conn) -> None:
    """Read and drop a pipe's frames until it closes: the monitor's side, when only the
    producer's cost is measured."""
    try:
        while True:
            conn.recv_bytes()
    except (EOFError, OSError):
        pass


def drained_pipe():
    """A pipe's write end, and the process that drains its read end (a daemon: it ends with us)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    r, w = ctx.Pipe(duplex=False)
    drainer = ctx.Process(target=drain, args=(r,), daemon=True)
    drainer.start()
    r.close()
    return w, drainer


def main_for(measure, argv: list[str] | None = None) -> int:
    """`python bench/X.py [--quick] [--json]` for one benchmark module."""
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true", help="fewer repeats, shorter runs")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    a = p.parse_args(argv)
    compile_bytecode()
    out = measure(quick=a.quick)
    if a.json:
        print(json.dumps(out, indent=2, default=str))
    else:
        print_table(out["rows"])
    return 0
