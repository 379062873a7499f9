"""A real `Run` whose processes are a recording: the live app's tests without training anything.

`ScriptedLauncher` plays a recording's rows into a real monitor, as if its processes sent them:
the monitor records them into a new file, samples this machine's cores, and hands them to the
listeners (Metrics, the py-spy controller) once per pump; `drive()` and the live app run unchanged.
The rows come out `speed` times faster than they were recorded, so a 28 s recording plays in a few
seconds, the same every time; a process can be made to crash at a given moment.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.monitor import Monitor
from marlwatch.recording import END, EVENT, STACK, RunInfo, open_recording
from marlwatch.runner import Run, RunConfig
from tests.conftest import REPO

SHIPPED = REPO / "recordings" / "maddpg-3agents-2workers.arrow"  # 150 iterations, 28 s, 3 processes


class ScriptedLauncher:
    """The Launcher protocol (marlwatch/launchers/__init__.py), with a recording for processes."""

    def __init__(self, path: Path = SHIPPED, *, speed: float = 10.0, hold: bool = False,
                 crash_at: tuple[int, float] | None = None, until_s: float | None = None) -> None:
        """`hold`: keep running once every row is played, until asked to stop. `crash_at`: (slot,
        recorded second) at which that process dies, killed, as a launcher reports it. `until_s`:
        play no row recorded after this second until the attribute is set to None (from any thread)."""
        rec = open_recording(path)
        self.info: RunInfo = rec.info
        # Every row the processes sent, and the samples the monitor took of them, but not the
        # end marker (the monitor writes its own when the run ends) nor what a py-spy controller
        # wrote then (its samples and flame_* events: this run's controller writes its own).
        table = pa.Table.from_batches(list(rec.batches()))
        kind, name = table.column("kind"), pc.fill_null(table.column("name").cast(pa.string()), "")
        flame = pc.or_(pc.equal(kind, STACK), pc.and_(pc.equal(kind, EVENT), pc.starts_with(name, "flame_")))
        table = table.filter(pc.and_(pc.not_equal(kind, END), pc.invert(flame)))
        self.rows = table.sort_by("t_ns")
        self.times = self.rows.column("t_ns").to_numpy()
        self.speed = speed
        self.hold = hold
        self.crash_at = crash_at
        self.until_s = until_s
        self.played = 0
        self.t0: float | None = None
        self.stop_reason: str | None = None

    # -- Launcher ------------------------------------------------------------------------------
    def run_info(self) -> RunInfo:
        return dataclasses.replace(self.info, extra=dict(self.info.extra))

    def record_stem(self) -> str:
        return "scripted"

    def describe(self) -> str:
        return f"{self.info.title()} (scripted)"

    def start(self, monitor: Monitor) -> None:
        for slot in sorted(self.info.procs, key=int):
            monitor.add_process(self.info.procs[slot])

    def waitables(self) -> list:
        return []

    def poll(self, monitor: Monitor, ready: list) -> None:
        if self.stop_reason is not None:
            return
        if self.t0 is None:
            # The clock starts at the first poll, not at start(): whoever drives the run (an app
            # still mounting on a cold machine) sees it from its first row, however late it begins.
            self.t0 = time.monotonic()
        upto = int((time.monotonic() - self.t0) * self.speed * 1e9)
        if self.until_s is not None:
            upto = min(upto, int(self.until_s * 1e9))
        end = int(self.times.searchsorted(upto, side="right"))
        if end > self.played:
            for batch in self.rows.slice(self.played, end - self.played).to_batches():
                monitor.emit(batch)
            self.played = end
        if self.crash_at is not None and upto >= self.crash_at[1] * 1e9:
            slot, self.crash_at = self.crash_at[0], None
            monitor.process_exited(slot, -9, error="was killed by SIGKILL")

    @property
    def done(self) -> bool:
        return self.played >= len(self.times)

    @property
    def running(self) -> bool:
        return self.stop_reason is None and (self.hold or not self.done)

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason

    def kill(self, monitor: Monitor) -> None:
        self.stop_reason = self.stop_reason or "killed"


def scripted_run(tmp_path: Path, path: Path = SHIPPED, **launcher_options) -> tuple[Run, ScriptedLauncher]:
    """A started Run playing `path` (recording into tmp_path/live.arrow)."""
    launcher = ScriptedLauncher(path, **launcher_options)
    run = Run(RunConfig(record=str(tmp_path / "live.arrow")), launcher=launcher)
    run.start()
    return run, launcher
