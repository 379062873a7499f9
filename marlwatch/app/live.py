"""`marlwatch run`: start a run and watch it live.

One thread owns the run: it calls `run.pump()` (which records every row and feeds `Metrics`
through `run.listeners`) and posts a `SnapshotUpdate` at most REFRESH_HZ times a second. When
asked to stop it calls `run.finish()` itself, so the run is never touched from two threads.
The UI thread only displays what it is sent.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time

from textual import work
from textual.binding import Binding
from textual.worker import get_current_worker

from marlwatch.app.base import REFRESH_HZ, WatchApp
from marlwatch.app.flame_panel import TopFunctionsPanel
from marlwatch.app.messages import RunEnded, SnapshotUpdate
from marlwatch.app.widgets import Status, clock
from marlwatch.metrics import Metrics, Snapshot
from marlwatch.runner import STOP_GRACE_S
from marlwatch.terminal import say

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130


class LiveApp(WatchApp):
    """Watch a started `Run`; `q` stops it and closes its recording."""

    KEYS_HELP = ("[b]Keys[/b]: q quit (stops the run, finishes the recording)   p pause/resume the view\n"
                 "      s sort the phase table   ↑/↓ select a phase   f py-spy on it for 5 s\n"
                 "      t or escape hide/show the py-spy panel   ? this help   Ctrl-C same as q")
    FLAME_HINT = "; press f to profile it"
    FLAME_HOW = " (f profiles the selected phase for 5 s, once it does real work)"

    BINDINGS = [Binding("f", "flame", "py-spy")]
    FLAME_SECONDS = 5.0

    def __init__(self, run, refresh_hz: float = REFRESH_HZ) -> None:
        super().__init__()
        self.run_ = run
        if run.flame is None:
            # Before the run's thread starts: the `f` key needs a controller (marlwatch.flame).
            from marlwatch.flame import FlameController

            run.flame = FlameController(run)
        run.flame.on_message = lambda text: self.notify(text, timeout=8)  # notify is thread-safe, and plain text
        self.refresh_hz = refresh_hz
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

    def on_mount(self) -> None:
        self.title = f"marlwatch: {self.run_.cfg.algo}"
        self.show(self.metrics.snapshot(), self._status(0))
        self.pumping = True
        self.pump_run()

    # -- the run's thread ---------------------------------------------------------------------
    @work(thread=True, exclusive=True, name="run", exit_on_error=True)
    def pump_run(self) -> None:
        run, period = self.run_, 1.0 / self.refresh_hz
        worker = get_current_worker()
        next_post = time.monotonic()
        try:
            while run.alive and not self.stop_requested.is_set() and not worker.is_cancelled:
                run.pump(min(0.1, period))
                if time.monotonic() >= next_post:
                    next_post = time.monotonic() + period
                    self.post_message(SnapshotUpdate(self.metrics.snapshot(), run.recording_bytes))
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
            self.show(message.snapshot, self._status(message.recording_bytes))

    def on_run_ended(self, message: RunEnded) -> None:
        self.ended = message
        if self.quitting:
            self.exit(self.exit_code_for(message))
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

    def exit_code_for(self, ended: RunEnded) -> int:
        if ended.failure:
            return EXIT_FAILED
        return EXIT_INTERRUPTED if self.interrupted else EXIT_OK

    def stop(self) -> None:
        """Ask the run's thread to finish the run; safe from a signal handler (sets an Event)."""
        self.quitting = True
        self.stop_requested.set()

    def action_quit(self) -> None:  # type: ignore[override]
        if self.ended is not None:
            self.exit(self.exit_code_for(self.ended))
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
        self.run_.flame.request(phase, self.FLAME_SECONDS, reason="f key", replace=True)
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


def run_live(args: argparse.Namespace) -> int:
    """`marlwatch run` with the app. Bad input fails before the terminal is taken over."""
    from marlwatch.cli import UsageError, make_run, start_run
    from marlwatch.report import human_bytes, summary_text

    refresh = getattr(args, "refresh", REFRESH_HZ)
    if not 0.1 <= refresh <= 30:
        raise UsageError(f"--refresh must be between 0.1 and 30 redraws per second, got {refresh}")
    run = make_run(args, default_iterations=None)
    start_run(run)
    app = LiveApp(run, refresh_hz=refresh)

    def on_term(signum: int, frame: object) -> None:
        app.interrupted = True
        app.stop()

    # Ctrl-C reaches the app as a key (the terminal is in raw mode); these are for `kill`.
    old_term = signal.signal(signal.SIGTERM, on_term)
    old_int = signal.signal(signal.SIGINT, on_term)
    try:
        code = app.run()
    finally:
        signal.signal(signal.SIGTERM, old_term)
        signal.signal(signal.SIGINT, old_int)
        # Whatever ended the app, the run's thread finishes the run (never two threads on it),
        # then no child may outlive us and the recording gets its end marker.
        app.stop()
        if app.pumping:
            app.run_done.wait(STOP_GRACE_S + 10)
        if run.started:
            run.kill_children()
            if run.writer is not None and not run.writer.closed:
                run.writer.close(t_ns=run.now_ns(), detail={"stop_reason": "app exited"})
    snap: Snapshot = app.snapshot or app.metrics.snapshot()
    if app.ended is not None:
        snap = app.ended.snapshot
    # The status is the file's: the run's thread may not have finished it (the fallback above).
    complete = run.writer is not None and run.writer.closed and run.writer.failed is None
    print(summary_text(snap, str(run.record_path), "complete" if complete else "truncated"))
    say(f"recording {run.record_path} ({human_bytes(run.recording_bytes)})")
    if run.failure:
        say(f"run failed: {run.failure}")
        return EXIT_FAILED
    if app.return_code:  # the app itself failed (Textual printed why)
        return app.return_code if code is None else code
    return EXIT_OK if code is None else code
