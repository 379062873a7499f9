"""`marlwatch replay FILE`: the live view, driven by a recording instead of a run.

The panels are the live app's; the figures come from the same `Metrics`, fed by a `Playback`
that moves a playhead over the recorded rows on a timer.
"""

from __future__ import annotations

import argparse
import math
import time

from textual.binding import Binding

from marlwatch.app.base import REFRESH_HZ, WatchApp
from marlwatch.app.widgets import Status, clock
from marlwatch.playback import SPEEDS, Playback, speed_label


class ReplayApp(WatchApp):
    # Priority: the focused phase table would take these keys for scrolling.
    BINDINGS = [
        Binding("space", "toggle", "play/pause", key_display="space", priority=True),
        Binding("f", "faster", "speed"),
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
                 "      s sort the phase table   ? this help   q quit")

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

    def on_mount(self) -> None:
        self.title = f"marlwatch replay: {self.rec_path}"
        self.refresh_view()
        self.set_interval(1.0 / REFRESH_HZ, self.tick)

    def tick(self) -> None:
        now = time.monotonic()
        dt, self._last_tick = now - self._last_tick, now
        if self.playback.advance(dt):
            self.refresh_view()

    def status(self) -> Status:
        pb = self.playback
        state = ("▶ " if pb.playing else "❚❚ ") + speed_label(pb.speed)
        if pb.at_end:
            state += " end"
        if self.file_status != "complete":
            state += f" [{self.file_status}]"
        return Status("REPLAY", state, f"{clock(pb.position_s)}/{clock(pb.duration_s)}", self.rec_path, self.rec_size)

    def refresh_view(self) -> None:
        self.show(self.playback.snapshot(), self.status())

    # -- keys ---------------------------------------------------------------------------------
    def action_quit(self) -> None:  # type: ignore[override]
        self.exit(0)

    def action_toggle(self) -> None:
        self.playback.toggle()
        self._last_tick = time.monotonic()
        self.refresh_view()

    def action_pause(self) -> None:
        self.action_toggle()

    def action_faster(self) -> None:
        self.playback.faster()
        self.refresh_view()

    def action_slower(self) -> None:
        self.playback.slower()
        self.refresh_view()

    def action_step(self, seconds: float) -> None:
        self.playback.step(seconds)
        self.refresh_view()

    def action_start(self) -> None:
        self.playback.to_start()
        self.refresh_view()

    def action_end(self) -> None:
        self.playback.to_end()
        self.refresh_view()


def _speed(text: str) -> float:
    value = math.inf if text.strip().lower() in ("max", "inf") else None
    if value is None:
        try:
            value = float(text.strip().rstrip("xX"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"--speed takes 1, 4, 16 or max, got {text!r}") from None
    if value not in SPEEDS:
        raise argparse.ArgumentTypeError(f"--speed takes 1, 4, 16 or max, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording (.arrow) written by `marlwatch run`")
    parser.add_argument("--speed", type=_speed, default=1.0, help="1, 4, 16 or max (default 1)")
    parser.add_argument("--at", type=float, default=None, metavar="SECONDS",
                        help="start with the playhead this many seconds into the recording")
    parser.add_argument("--paused", action="store_true", help="start paused")


def load(path: str) -> tuple[Playback, str, int]:
    """Open and read a recording for replay; bad files raise UsageError with one line."""
    from marlwatch.cli import UsageError, open_or_fail

    rec = open_or_fail(path)
    try:
        playback = Playback.from_recording(rec)
    except Exception as e:  # noqa: BLE001 - a damaged file must give one line, not a traceback
        raise UsageError(f"{path}: damaged recording ({type(e).__name__}: {e})") from None
    if playback.rows == 0:
        raise UsageError(f"{path}: the recording holds no rows")
    return playback, rec.status, rec.path.stat().st_size


def cli(args: argparse.Namespace) -> int:
    from marlwatch.cli import UsageError

    if args.at is not None and (math.isnan(args.at) or args.at < 0):
        raise UsageError(f"--at must be a number of seconds >= 0, got {args.at}")
    playback, status, size = load(args.file)
    app = ReplayApp(playback, args.file, size, status, at_s=args.at, play=not args.paused, speed=args.speed)
    code = app.run()
    return code or 0
