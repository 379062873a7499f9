"""Benchmark: where the live app's CPU goes, by thread of the monitor, at several redraw rates.

`bench/bench_app.py` says how much the app's drawing costs (its charge to training); this says
which thread pays it. A real `marlwatch run --workers 2` in a 120x40 tmux pane per rate; over a
window in the middle of the run, each thread's CPU time (psutil, user+system) as a share of one
core. Threads are named from `py-spy dump`: `MainThread` is Textual's UI; the run's thread (it pumps
the pipes, records and makes snapshots: `LiveApp.pump_run`, a Textual thread worker) runs in
asyncio's executor, `asyncio_0`; then Textual's input and output threads, and the threads Python
does not know (Arrow's, the allocator's), summed as `native`. Without py-spy, by thread id.

Rates: 1 Hz (the default until 2026-12-03), the default, and 0.1 Hz (a floor that draws almost
nothing): the UI thread's share above the floor is the drawing. The run thread's share follows
the run's message rate (its recording and pumping; a snapshot is ~1 % of its busy time, py-spy),
which moves with each run's IPS, shown beside it: compare the run thread's shares only at equal
IPS, and the app's charge with bench_app.py's in-run A/B. Runs one after the other, so compare
within a run of this script (the machine's speed drifts through a day: docs/benchmarks.md §6).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
from _common import MARLWATCH, REPO, main_for, row, tmux_session
from bench_app import SETTINGS, steady_ips

from marlwatch.app import REFRESH_HZ

UI_THREAD, RUN_THREAD = "MainThread", "run"


def thread_names(pid: int) -> dict[int, str]:
    """OS thread id -> Python thread name, from `py-spy dump`; {} when py-spy cannot attach."""
    spy = Path(sys.executable).with_name("py-spy")
    if not spy.exists():
        return {}
    out = subprocess.run([str(spy), "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=30).stdout
    return {int(tid): name for tid, name in re.findall(r'^Thread (\d+) \([^)]*\): "([^"]*)"', out, re.M)}


def one_rate(refresh: float, record: Path, warm_s: float, window_s: float) -> dict[str, float]:
    """Per-thread CPU of the live monitor at `refresh`, as % of one core, over `window_s`."""
    session = f"mwthreads{int(refresh * 100)}"
    cmd = [MARLWATCH, "run", "--workers", "2", "--iterations", "1000000", "--record", str(record),
           "--refresh", f"{refresh:g}", *SETTINGS]
    pid = tmux_session(session, " ".join(cmd))
    try:
        proc = psutil.Process(pid)
        time.sleep(warm_s)  # past start-up and warm-up: iterations flow
        names = thread_names(pid)
        before = {t.id: t.user_time + t.system_time for t in proc.threads()}
        t0 = time.monotonic()
        time.sleep(window_s)
        after = {t.id: t.user_time + t.system_time for t in proc.threads()}
        dt = time.monotonic() - t0
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    shares: dict[str, float] = {}
    for tid, cpu in after.items():
        name = names.get(tid, "native" if names else f"thread {tid}")
        name = RUN_THREAD if name.startswith("asyncio_") else name
        shares[name] = shares.get(name, 0.0) + 100 * (cpu - before.get(tid, 0.0)) / dt
    time.sleep(5)  # the hangup stops the run; the monitor finishes its recording
    shares["IPS"] = steady_ips(record)[0]
    return shares


def measure(quick: bool = False) -> dict:
    if shutil.which("tmux") is None:
        raise SystemExit("app_threads needs tmux (a real terminal for the app)")
    warm_s, window_s = (20.0, 20.0) if quick else (25.0, 50.0)
    rates = sorted({1.0, REFRESH_HZ, 0.1}, reverse=True)
    by_rate: dict[float, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for refresh in rates:
            by_rate[refresh] = one_rate(refresh, Path(tmp) / f"{refresh:g}.arrow", warm_s, window_s)
            print(f"  {refresh:g} Hz: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(by_rate[refresh].items())),
                  file=sys.stderr)
    floor = by_rate[0.1]
    rows = []
    for refresh in rates:
        shares = by_rate[refresh]
        ui, run = shares.get(UI_THREAD, float("nan")), shares.get(RUN_THREAD, float("nan"))
        total = sum(v for k, v in shares.items() if k != "IPS")
        note = (f"UI {ui - floor.get(UI_THREAD, 0.0):+.2f}, run thread {run - floor.get(RUN_THREAD, 0.0):+.2f}, "
                f"all {total - sum(v for k, v in floor.items() if k != 'IPS'):+.2f} points over 0.1 Hz"
                if refresh != 0.1 else "the floor")
        label = f"monitor CPU by thread at --refresh {refresh:g}" + (" (default)" if refresh == REFRESH_HZ else "")
        rows.append(row(label, f"UI {ui:.2f}% run {run:.2f}% all {total:.2f}%", "", None,
                        f"{note}; the run at {shares['IPS']:.1f} IPS"))
    return {"window_s": window_s, "by_rate": {f"{k:g}": v for k, v in by_rate.items()}, "rows": rows}


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main_for(measure))
