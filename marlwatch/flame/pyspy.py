"""py-spy itself: finding it, starting it on a process, and reading its chrometrace output."""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def pyspy_command() -> list[str]:
    """The py-spy command: $MARLWATCH_PYSPY (split like a shell would), next to this Python, or on PATH."""
    env = os.environ.get("MARLWATCH_PYSPY")
    if env:
        return shlex.split(env)
    beside = Path(sys.executable).parent / "py-spy"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("py-spy")
    return [found] if found else []



def start(pid: int, rate: int, seconds: float, out: Path) -> subprocess.Popen:
    """`py-spy record` on `pid` for `seconds` at `rate` Hz, writing chrometrace JSON to `out`
    (raises OSError when it cannot start). Its clock starts just after this call (docs/flame.md)."""
    args = [*_raised_priority(), *pyspy_command(), "record", "--pid", str(pid), "--format", "chrometrace",
            "--idle", "--nonblocking", "--rate", str(rate), "--duration", str(max(1, math.ceil(seconds))),
            "--output", str(out)]
    return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _raised_priority() -> list[str]:
    """py-spy stamps samples when it handles them: on a busy machine (the run keeps every core
    busy) a descheduled py-spy stamps late and samples irregularly. When we may (root), it runs
    at a higher priority than the training processes."""
    nice = shutil.which("nice")
    if nice and hasattr(os, "geteuid") and os.geteuid() == 0:
        return [nice, "-n", "-10"]
    return []


def error_text(stderr: str, code: int | None) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Permission Denied"):
            return "permission denied (ptrace not allowed; run as root or set kernel.yama.ptrace_scope=0)"
    for ln in lines:
        if ln.startswith("Error:"):
            return ln[len("Error:"):].strip()
    return lines[0] if lines else f"py-spy exited with code {code}"



@dataclass
class Samples:
    """Stack samples of one process's main thread: times (ns, run clock) and folded stacks."""

    t_ns: np.ndarray
    stacks: list[str]


def samples_from_chrometrace(events: list[dict[str, Any]], rate: float, origin_ns: int) -> Samples:
    """Rebuild per-sample stacks from py-spy's chrometrace output.

    py-spy writes a `B` event when a frame appears and an `E` event when it goes, at the time of
    the sample that saw the change, in microseconds since it started (`origin_ns` on the run's
    clock). With `--idle` every sample of the thread is taken into account, so between two
    changes the stack stayed the same and was sampled every 1/rate s: a stretch [t_i, t_i+1)
    holds round((t_i+1 - t_i) * rate) samples (at least one, the one that saw the change), at
    t_i, t_i + 1/rate, ...
    """
    main_tid = _main_thread(events)
    stack: list[str] = []
    times: list[int] = []
    out_stacks: list[str] = []
    changes: list[tuple[int, str | None]] = []  # (ts_us, folded stack after the change or None)
    current_ts: int | None = None
    for e in events:
        if e.get("tid") != main_tid or e.get("ph") not in ("B", "E"):
            continue
        ts = int(e["ts"])
        if current_ts is not None and ts != current_ts:
            changes.append((current_ts, ";".join(stack) if stack else None))
        current_ts = ts
        if e["ph"] == "B":
            args = e.get("args") or {}
            line = args.get("line")
            stack.append(f"{e['name']} ({args.get('filename', '?')}{':' + str(line) if line else ''})")
        elif stack:
            stack.pop()
    if current_ts is not None:
        changes.append((current_ts, ";".join(stack) if stack else None))
    period_us = 1e6 / rate
    for (ts, folded), (next_ts, _) in zip(changes, changes[1:], strict=False):
        if folded is None:
            continue
        n = max(1, round((next_ts - ts) / period_us))
        for k in range(n):
            times.append(origin_ns + int((ts + k * period_us) * 1000))
            out_stacks.append(folded)
    return Samples(np.asarray(times, np.int64), out_stacks)


def _main_thread(events: list[dict[str, Any]]) -> int | None:
    """The training loop runs in the main thread; fall back to the busiest thread."""
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name" \
                and str((e.get("args") or {}).get("name", "")).endswith("MainThread"):
            return e.get("tid")
    counts = Counter(e.get("tid") for e in events if e.get("ph") == "B")
    return counts.most_common(1)[0][0] if counts else None

