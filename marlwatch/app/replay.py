"""The replay app (`marlwatch replay FILE`): the live view, driven by a recording instead of a run.

The panels are the live app's; the figures come from the same `Metrics`, fed by a `Playback`
that moves a playhead over the recorded rows on a timer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from textual.binding import Binding

from marlwatch.app import REPLAY_HZ
from marlwatch.app.base import WatchApp
from marlwatch.app.widgets import Status, clock
from marlwatch.playback import Playback, speed_label
from marlwatch.terminal import printable


class ReplayApp(WatchApp):
    # Priority: the focused phase table would take these keys for scrolling.
    BINDINGS = [
        Binding("space", "toggle", "play/pause", key_display="space", priority=True),
        Binding("p", "pause", "play/pause", show=False),  # as space (the footer shows space)
        Binding("f", "faster", "speed", key_display="f/d"),
        Binding("d", "slower", "slower", show=False),
        Binding("left", "step(-1)", "-1s", show=False, priority=True),
        Binding("right", "step(1)", "+1s", show=False, priority=True),
        Binding("[", "step(-10)", "-10s", show=False),
        Binding("]", "step(10)", "+10s", show=False),
        Binding("home", "start", "start", show=False, priority=True),
        Binding("g", "start", "start", show=False),
        Binding("end", "end", "end", show=False, priority=True),
        Binding("G", "end", "end", show=False),
    ]
    KEYS_HELP = ("[b]Keys[/b]: space or p play/pause   f faster, d slower (1x 4x 16x max)\n"
                 "      ← → step 1 s   [ ] step 10 s   home/g start   end/G end\n"
                 "      s sort the phase table   ↑/↓ select a phase   t or escape hide/show the py-spy panel\n"
                 "      ? this help   q quit")
    # In replay `f` is faster: samples come only from the recording (`marlwatch run --flame`).
    FLAME_HINT = " up to this point of the recording"
    FLAME_HOW = " (here: the samples the recording holds, from their time on)"

    def __init__(self, playback: Playback, path: str, size: int, status: str = "complete",
                 *, at_s: float | None = None, play: bool = True, speed: float = 1.0) -> None:
        super().__init__()
        self.playback = playback
        self.rec_path = path
        self.rec_size = size
        self.file_status = status
        self.playback.set_speed(speed)
        if at_s is not None:
            self.playback.seek_s(at_s)
        if play:
            self.playback.play()
        self._last_tick = time.monotonic()
        self.replay_error: str | None = None  # what stopped the playback, shown in the header

    def on_mount(self) -> None:
        self.title = printable(f"marlwatch replay: {self.rec_path}")
        self.guarded(self.refresh_view)
        warning = self.playback.source.warning() if self.playback.source else None
        if warning:
            self.notify(warning + "; the figures leave them out", title="skipped what is not valid",
                        severity="warning", timeout=15)
        self.set_interval(1.0 / REPLAY_HZ, self.tick)

    def guarded(self, step: Callable[[], object]) -> None:
        """Run a step of the playback; what it did not expect (a file that reads but holds
        something no check foresaw) pauses the replay with the error shown, instead of
        taking the app and the terminal down. The other panels keep the last good figures."""
        try:
            step()
        except Exception as e:  # noqa: BLE001 - shown to the user, who can quit or seek elsewhere
            self.playback.pause()
            self.replay_error = f"{type(e).__name__}: {e}"
            self.notify(f"replay paused at {clock(self.playback.position_s)}: {self.replay_error}",
                        title="cannot read on", severity="error", timeout=30)
            try:
                self.query_one("#header").status = self.status()
            except Exception:  # noqa: BLE001 - the notice above is what matters
                pass

    def tick(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        # Playing: the table panels follow at TABLE_HZ; the last step (the end) shows everything.
        self.guarded(lambda: self.playback.advance(dt) and self.refresh_view(everything=self.playback.at_end))

    def status(self) -> Status:
        pb = self.playback
        state = ("▶ " if pb.playing else "❚❚ ") + speed_label(pb.speed)
        if pb.at_end:
            state += " end"
        if self.file_status != "complete":
            state += f" [{self.file_status}]"
        if self.replay_error:
            state += " [error]"
        return Status("REPLAY", state, f"{clock(pb.position_s)}/{clock(pb.duration_s)}", self.rec_path, self.rec_size)

    def refresh_view(self, everything: bool = True) -> None:
        self.show(self.playback.snapshot(), self.status(), everything=everything)

    # -- keys ---------------------------------------------------------------------------------
    def action_quit(self) -> None:  # type: ignore[override]
        self.exit()

    def _then_refresh(self, step: Callable[[], object]) -> None:
        self.replay_error = None  # a key pressed: try again (seeking back reads a file anew)
        self.guarded(lambda: (step(), self.refresh_view()))

    def action_toggle(self) -> None:
        self._last_tick = time.monotonic()
        self._then_refresh(self.playback.toggle)

    def action_pause(self) -> None:
        self.action_toggle()

    def action_faster(self) -> None:
        self._then_refresh(self.playback.faster)

    def action_slower(self) -> None:
        self._then_refresh(self.playback.slower)

    def action_step(self, seconds: float) -> None:
        self._then_refresh(lambda: self.playback.step(seconds))

    def action_start(self) -> None:
        self._then_refresh(self.playback.to_start)

    def action_end(self) -> None:
        self._then_refresh(self.playback.to_end)

