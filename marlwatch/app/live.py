"""The live app (`marlwatch run`): watch a started run.

One thread owns the run: it drives it (`marlwatch.runner.drive`, the loop headless `run` uses
too), which records every row and feeds `Metrics` through `run.listeners`, and posts a
`SnapshotUpdate` at most REFRESH_HZ times a second. When asked to stop, the same thread finishes
the run, so the run is never touched from two threads. The UI thread only displays what it is sent,
and on Linux at a lower priority than the run (UI_NICE): where training fills every core, drawing
waits for a gap instead of taking the core from a training process. The run's thread keeps the
run's priority, so the pipes are drained and the recording written as fast as before.
"""

from __future__ import annotations

import os
import sys
import threading
import time

from textual import work
from textual.binding import Binding
from textual.worker import get_current_worker

from marlwatch.app import REFRESH_HZ
from marlwatch.app.base import WatchApp
from marlwatch.app.flame_panel import TopFunctionsPanel
from marlwatch.app.messages import RunEnded, SnapshotUpdate
from marlwatch.app.widgets import Status, clock
from marlwatch.collector import event_row
from marlwatch.metrics import Metrics
from marlwatch.runner import drive

NO_SPANS_NOTICE_S = 10.0
UI_NICE = 10  # the UI thread's nice value above the run's (CFS: ~1/10 of the weight under contention)


AB_EVENT = "app_ab"  # an A/B window starts: {"drawing": bool, "cpu_s": the monitor's CPU time so far}


def lower_thread_priority(native_id: int, by: int) -> bool:
    """Raise the nice value of one thread of this process by `by` (at most 19). Linux only: there
    nice is a thread's, and `setpriority` takes a thread id; elsewhere it is the whole process's,
    and a thread id is no process id. False when not done (not Linux, or not allowed)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, native_id, min(19, os.getpriority(os.PRIO_PROCESS, native_id) + by))
    except OSError:
        return False
    return True


def blank_window(t_ns: int, window_ns: int) -> bool:
    """Whether the run's time `t_ns` falls in a window where an A/B-ing app draws nothing."""
    return (t_ns // window_ns) % 2 == 1


class LiveApp(WatchApp):
    """Watch a started `Run`; `q` stops it and closes its recording."""

    KEYS_HELP = ("[b]Keys[/b]: q quit (stops the run, finishes the recording)   p pause/resume the view\n"
                 "      s sort the phase table   ↑/↓ select a phase   f py-spy on it for 5 s\n"
                 "      t or escape hide/show the py-spy panel   ? this help   Ctrl-C same as q")
    FLAME_HINT = "; press f to profile it"
    FLAME_HOW = " (f profiles the selected phase for 5 s, once it does real work)"

    BINDINGS = [Binding("f", "flame", "py-spy")]
    FLAME_SECONDS = 5.0

    def __init__(self, run, flame=None, refresh_hz: float = REFRESH_HZ, blank_s: float | None = None,
                 ui_nice: int = 0) -> None:
        """`flame`: the run's py-spy controller (marlwatch.flame); one is made for the `f` key if None.
        `blank_s` (bench/bench_app.py's in-run A/B): the app draws only in every other window of
        that many seconds of the run's clock (windows `run.now_ns() // blank_s` even), and in the
        others computes and shows nothing, as `--headless` does; Metrics is fed throughout.
        `ui_nice`: how much to lower the UI thread's priority once the run's thread runs (UI_NICE
        in `marlwatch run`; 0 in tests, whose UI thread is pytest's, and every later child of it
        would inherit the lower priority)."""
        super().__init__()
        self.run_ = run
        if flame is None:
            from marlwatch.flame.controller import FlameController

            flame = FlameController(run)
        self.flame = flame
        flame.on_message = lambda text: self.notify(text, timeout=8)  # notify is thread-safe, and plain text
        self.refresh_hz = refresh_hz
        self.blank_ns = int(blank_s * 1e9) if blank_s else None
        self._window: int | None = None
        self.metrics = Metrics(run.info)
        run.listeners.append(self.metrics.add)
        self.stop_requested = threading.Event()
        self.run_done = threading.Event()  # set once run.finish() returned
        self.pumping = False  # the run's thread was started
        self.quitting = False
        self.interrupted = False
        self.ended: RunEnded | None = None
        self.paused = False
        self.latest: SnapshotUpdate | None = None
        self.ui_nice = ui_nice
        self._ui_thread: int | None = None  # the thread Textual runs the app on, known at mount

    def on_mount(self) -> None:
        self.title = f"marlwatch: {self.run_.describe()}"
        if self.run_.cfg.listen is not None:
            self.notify(f"export MARLWATCH_ADDRESS={self.run_.monitor.address}\n"
                        f"export MARLWATCH_AUTHKEY={self.run_.monitor.authkey.hex()}",
                        title="listening: run these where your processes start", markup=False, timeout=120)
        self.show(self.metrics.snapshot(), self._status(0))
        self._ui_thread = threading.get_native_id()
        self.pumping = True
        self.pump_run()

    # -- the run's thread ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, name="run", exit_on_error=True)
    def pump_run(self) -> None:
        run = self.run_
        worker = get_current_worker()
        no_spans_said = False
        if self.ui_nice and self._ui_thread is not None:
            # From this thread, once it exists: a thread inherits its creator's priority, and an
            # unprivileged one cannot raise its own again.
            lower_thread_priority(self._ui_thread, self.ui_nice)

        def post() -> None:
            nonlocal no_spans_said
            if self.blank_ns is not None:
                now = run.now_ns()
                window = now // self.blank_ns
                if window != self._window:
                    # Recorded, so that the bench reads each window's bounds and the monitor's
                    # CPU time at them (all its threads) from the recording itself.
                    self._window = window
                    run.emit(event_row(now, None, AB_EVENT, drawing=not blank_window(now, self.blank_ns),
                                       cpu_s=time.process_time()))
                if blank_window(now, self.blank_ns):
                    return
            snap = self.metrics.snapshot()
            self.post_message(SnapshotUpdate(snap, run.recording_bytes))
            if not no_spans_said and not snap.phases and snap.t_s > NO_SPANS_NOTICE_S and run.launcher is not None \
                    and run.cfg.command is not None:
                no_spans_said = True
                self.notify("no spans so far: the command's processes have not connected (CPU and memory "
                            "are still shown)", severity="warning", timeout=15)

        try:
            drive(run, every=post, period_s=1.0 / self.refresh_hz,
                  should_stop=lambda: self.stop_requested.is_set() or worker.is_cancelled)
        finally:
            try:
                run.finish()
            finally:
                self.run_done.set()
        self.post_message(RunEnded(self.metrics.snapshot(), run.recording_bytes, run.failure, run.stop_reason))

    # -- the UI thread ------------------------------------------------------------------------
    def _status(self, size: int) -> Status:
        if self.ended is not None:
            mode = "FAILED" if self.ended.failure else "FINISHED"
        elif self.stop_requested.is_set():
            mode = "STOPPING"
        else:
            mode = "LIVE"
        detail = "view paused (p)" if self.paused else ("press q to leave" if self.ended else "")
        snap = self.snapshot
        elapsed = clock(snap.t_s) if snap else ""
        return Status(mode, detail, elapsed, str(self.run_.record_path), size)

    def on_snapshot_update(self, message: SnapshotUpdate) -> None:
        self.latest = message
        if not self.paused and self.ended is None:
            self.snapshot = message.snapshot
            self.show(message.snapshot, self._status(message.recording_bytes), everything=False)

    def on_run_ended(self, message: RunEnded) -> None:
        self.ended = message
        if self.quitting:
            self.exit()
            return
        # Nothing runs any more: `f` leaves the footer and the py-spy panel's hint.
        self.query_one(TopFunctionsPanel).hint = ""
        self.refresh_bindings()
        self.snapshot = message.snapshot
        self.show(message.snapshot, self._status(message.recording_bytes))
        if message.failure:
            self.notify(message.failure, title="run failed", severity="error", timeout=30)
        elif message.snapshot.complete:
            self.notify("run finished; the recording is complete. q to leave.", timeout=10)
        else:
            self.notify("run finished, but the recording has no end marker. q to leave.", severity="warning",
                        timeout=30)

    def stop(self) -> None:
        """Ask the run's thread to finish the run, and the app to leave once it has; safe from a
        signal handler (sets an Event, or schedules the exit on the app's loop)."""
        self.quitting = True
        self.stop_requested.set()
        loop = self._loop
        if self.ended is not None and loop is not None and not loop.is_closed():
            # The run has ended already (the app stays open on its last state): nobody else will
            # see `quitting`. A SIGTERM or a closed terminal must still end the app.
            loop.call_soon_threadsafe(self.exit)

    def action_quit(self) -> None:  # type: ignore[override]
        if self.ended is not None:
            self.exit()
            return
        if not self.stop_requested.is_set():
            self.notify("stopping the run and closing the recording…", timeout=10)
        self.stop()
        size = self.latest.recording_bytes if self.latest else 0
        self.query_one("#header").status = self._status(size)

    def action_interrupt(self) -> None:
        self.interrupted = True
        self.action_quit()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "flame" and self.ended is not None:
            return False
        return super().check_action(action, parameters)

    def action_flame(self) -> None:
        """f: py-spy on the processes running the selected phase (handled by the run's thread)."""
        from marlwatch.app.widgets import PhaseTable

        phase = self.query_one(PhaseTable).selected_phase
        if phase is None or self.ended is not None or self.stop_requested.is_set():
            self.notify("no running phase to profile", severity="warning")
            return
        # A newer `f` replaces one still waiting for its phase to do real work (docs/flame.md).
        self.flame.request(phase, self.FLAME_SECONDS, reason="f key", replace=True)
        self.query_one(TopFunctionsPanel).set_closed(False)  # its samples will show there
        self._flame_layout()
        self.notify(f"py-spy: {phase} for {self.FLAME_SECONDS:g} s, once it does real work…", timeout=4)

    def action_pause(self) -> None:
        self.paused = not self.paused
        if not self.paused and self.latest is not None and self.ended is None:
            self.snapshot = self.latest.snapshot
            self.show(self.latest.snapshot, self._status(self.latest.recording_bytes))
        else:
            size = self.latest.recording_bytes if self.latest else 0
            self.query_one("#header").status = self._status(size)

