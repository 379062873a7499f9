"""Replay of a recording: a playhead over the recorded rows, feeding `Metrics` as it moves.

No UI here: the replay app drives a `Playback` from a timer and shows its snapshots, exactly as
the live app shows the snapshots of a running run. Moving forward feeds only the rows between
the old and the new playhead; moving back rebuilds the metrics from the start, because
`Metrics` (like the run it describes) only goes forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from marlwatch.metrics import Metrics, Snapshot
from marlwatch.recording import SCHEMA, Recording, RunInfo

SPEEDS: tuple[float, ...] = (1.0, 4.0, 16.0, math.inf)
# At "as fast as possible" each advance feeds this many rows, so one step stays a bounded
# amount of work for the caller (the UI thread) however large the recording is.
MAX_SPEED_ROWS = 20_000


def speed_label(speed: float) -> str:
    return "max" if math.isinf(speed) else f"{speed:g}x"


class Playback:
    """A playhead over one recording's rows, sorted by time."""

    def __init__(self, info: RunInfo | None, batches: Iterable[pa.RecordBatch]) -> None:
        self.info = info
        table = pa.Table.from_batches(list(batches), schema=SCHEMA)
        # Rows arrive in write order (per process, batched); replay goes by their time instead.
        # A stable sort keeps the write order of rows with equal times (the end marker stays last).
        order = np.argsort(table.column("t_ns").to_numpy(), kind="stable")
        self.table = table.take(pa.array(order)).combine_chunks()
        self.t = self.table.column("t_ns").to_numpy()
        self.start_ns = int(self.t[0]) if len(self.t) else 0
        self.end_ns = int(self.t[-1]) if len(self.t) else 0
        self.position_ns = self.start_ns
        self.speed = SPEEDS[0]
        self.playing = False
        self._fed = 0  # rows [0, _fed) are in self.metrics
        self.metrics = Metrics(info)

    @classmethod
    def from_recording(cls, rec: Recording) -> Playback:
        return cls(rec.info, rec.batches())

    # -- state ------------------------------------------------------------------------------
    @property
    def rows(self) -> int:
        return len(self.t)

    @property
    def at_end(self) -> bool:
        return self._fed >= len(self.t)

    @property
    def position_s(self) -> float:
        return (self.position_ns - self.start_ns) / 1e9

    @property
    def duration_s(self) -> float:
        return (self.end_ns - self.start_ns) / 1e9

    def snapshot(self) -> Snapshot:
        return self.metrics.snapshot()

    # -- controls ---------------------------------------------------------------------------
    def play(self) -> None:
        if self.at_end:
            self.seek_ns(self.start_ns)
        self.playing = True

    def pause(self) -> None:
        self.playing = False

    def toggle(self) -> None:
        if self.playing:
            self.pause()
        else:
            self.play()

    def set_speed(self, speed: float) -> None:
        if speed not in SPEEDS:
            raise ValueError(f"speed must be one of {', '.join(speed_label(s) for s in SPEEDS)}")
        self.speed = speed

    def faster(self) -> None:
        self.speed = SPEEDS[min(SPEEDS.index(self.speed) + 1, len(SPEEDS) - 1)]

    def slower(self) -> None:
        self.speed = SPEEDS[max(SPEEDS.index(self.speed) - 1, 0)]

    def to_start(self) -> None:
        self.seek_ns(self.start_ns)

    def to_end(self) -> None:
        self.seek_ns(self.end_ns)

    def step(self, seconds: float) -> None:
        self.seek_ns(self.position_ns + int(seconds * 1e9))

    def seek_s(self, seconds: float) -> None:
        """Seek to `seconds` after the first recorded row."""
        self.seek_ns(self.start_ns + int(seconds * 1e9))

    def seek_ns(self, t_ns: int) -> None:
        t_ns = min(max(int(t_ns), self.start_ns), self.end_ns)
        target = int(np.searchsorted(self.t, t_ns, side="right"))
        if target < self._fed:
            self.metrics = Metrics(self.info)
            self._fed = 0
        self._feed_to(target)
        self.position_ns = t_ns

    def advance(self, wall_s: float) -> bool:
        """Move the playhead by `wall_s` of wall time at the current speed; True when it moved."""
        if not self.playing or self.at_end:
            if self.at_end:
                self.playing = False
            return False
        if math.isinf(self.speed):
            target = min(self._fed + MAX_SPEED_ROWS, len(self.t))
            self._feed_to(target)
            self.position_ns = int(self.t[target - 1]) if target else self.start_ns
        else:
            self.seek_ns(self.position_ns + int(wall_s * self.speed * 1e9))
        if self.at_end:
            self.position_ns = self.end_ns
            self.playing = False
        return True

    def _feed_to(self, target: int) -> None:
        if target > self._fed:
            for batch in self.table.slice(self._fed, target - self._fed).to_batches():
                self.metrics.add(batch)
            self._fed = target
