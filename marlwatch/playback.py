"""Replay of a recording: a playhead over the recorded rows, feeding `Metrics` as it moves.

No UI here: the replay app drives a `Playback` from a timer and shows its snapshots, exactly as
the live app shows the snapshots of a running run. Moving forward feeds only the rows between
the old and the new playhead; moving back rebuilds the metrics from the start, because
`Metrics` (like the run it describes) only goes forward.

Memory stays bounded by a few batches whatever the recording's length: opening reads the file
once for each batch's time range (an index of three numbers a batch; for a format 2 file from the
batches' headers alone, nothing decompressed), and playing reads it again in order, holding only
the batches that straddle the playhead. Batches are written in time order except for spans,
which are written when they end: a batch can hold rows older than the one before it, so a batch
is read once the playhead reaches its earliest row and dropped once every row in it is fed.

A jump (back, or forward past spans not read yet) in a format 2 file rebuilds the metrics from
the recording's aggregates: every aggregate batch whose spans all started before the new
playhead stands for them (those span batches are never decompressed), and only the other rows
and the spans of the last stretch (at most one aggregate group, 65,536 spans) are fed as rows.
The aggregates and the other rows (~5% of a file's rows) are read once, at open, and kept.
So a jump costs a fraction of what `summary` does, not a pass over every span.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.metrics import Metrics, Snapshot
from marlwatch.recording import AGGREGATES_PART, ROWS_PART, SPANS_PART, Part, Recording, RunInfo
from marlwatch.schema import one_batch

SPEEDS: tuple[float, ...] = (1.0, 4.0, 16.0, math.inf)
CACHE_BYTES = 128 << 20  # aggregates and other rows kept for jumps (a 10M-span file: ~25 MB)


def speed_label(speed: float) -> str:
    return "max" if math.isinf(speed) else f"{speed:g}x"


@dataclass
class _BatchRange:
    """Where one batch of the file lies in time, and how many rows it has."""

    first_ns: int
    last_ns: int
    rows: int


@dataclass
class _OpenBatch:
    """A batch read from the file, its rows in time order, fed up to `fed`."""

    rows: pa.RecordBatch
    t: np.ndarray
    fed: int = 0


class Playback:
    """A playhead over one recording's rows, in time order."""

    def __init__(self, info: RunInfo | None,
                 batches: Callable[[], Iterable[pa.RecordBatch]] | Iterable[pa.RecordBatch],
                 source: Recording | None = None) -> None:
        """`batches`: a function that reads the recording's batches from the start (called once to
        index them and again at every rewind), or the batches themselves (kept in memory);
        `source`: the recording they come from (what its reader skipped is counted there)."""
        self.info = info
        self.source = source  # the file, when played from one
        # A format 2 file: its batches as their headers describe them (None: read them to know).
        self._parts: list[Part] | None = source.parts() if source is not None else None
        self._cache: dict[int, pa.RecordBatch] = {}  # part number -> its checked rows (not spans)
        self._cache_bytes = 0
        if self._parts is not None:
            rows = [p for p in self._parts if p.part in (SPANS_PART, ROWS_PART)]
            self.rows = sum(p.rows for p in rows)
            self.start_ns = min((p.first_ns for p in rows), default=0)
            self.end_ns = max((p.last_ns for p in rows), default=0)
        else:
            if callable(batches):
                self._read: Callable[[], Iterable[pa.RecordBatch]] = batches
            else:
                kept = list(batches)
                self._read = lambda: kept
            self._index: list[_BatchRange] = []
            for b in self._read():
                if b.num_rows:
                    t = pc.min_max(b.column("t_ns"))
                    self._index.append(_BatchRange(t["min"].as_py(), t["max"].as_py(), b.num_rows))
            self.rows = sum(r.rows for r in self._index)
            self.start_ns = min((r.first_ns for r in self._index), default=0)
            self.end_ns = max((r.last_ns for r in self._index), default=0)
        self.position_ns = self.start_ns
        self.speed = SPEEDS[0]
        self.playing = False
        if self._parts is not None:
            # Read what every jump reads (aggregates, other rows: ~5% of the rows) once, now, so
            # that no jump, the first one included, has to decompress it.
            for _ in self._read_parts([p for p in self._parts if p.part in (AGGREGATES_PART, ROWS_PART)]):
                pass
        self._rewind()

    @classmethod
    def from_recording(cls, rec: Recording) -> Playback:
        return cls(rec.info, rec.batches, source=rec)

    def _rewind(self, target_ns: int | None = None) -> None:
        """Back to nothing fed; for a format 2 file, with the aggregates of every span that started
        by `target_ns` already in the metrics."""
        self.metrics = Metrics(self.info, self.source.skipped if self.source else None)
        self._next = 0  # index of the next batch to read from the file
        self._open: list[_OpenBatch] = []
        self._fed = 0  # rows fed to self.metrics
        if self._parts is None:
            self._reader: Iterator[pa.RecordBatch] = (b for b in self._read() if b.num_rows)
            return
        src = self.source
        src.reset_skipped()
        used = self._aggregates_by(target_ns) if target_ns is not None else []
        covered = {s for p in used for s in range(p.covers[0], p.covers[1] + 1)}
        chunk: list[pa.RecordBatch] = []
        for b in self._read_parts(used):
            chunk.append(b)
            if sum(c.num_rows for c in chunk) >= 1 << 16:
                self._add_together(chunk)
                chunk = []
        self._add_together(chunk)
        rest = [p for p in self._parts if p.part == ROWS_PART or (p.part == SPANS_PART and p.seq not in covered)]
        self._fed = self.rows - sum(p.rows for p in rest)
        self._index = [_BatchRange(p.first_ns, p.last_ns, p.rows) for p in rest]
        self._index_parts = rest
        self._reader = self._read_parts(rest)

    def _add_together(self, batches: list[pa.RecordBatch]) -> None:
        rows = one_batch(batches)
        if rows is not None:
            self.metrics.add(rows)

    def _read_parts(self, parts: list[Part]) -> Iterator[pa.RecordBatch]:
        """The checked rows of each part, in order. A jump reads the aggregates and every batch of
        other rows again (about a twentieth of a file's rows): those are kept from the first
        read (up to CACHE_BYTES), so later jumps only decode the spans around the playhead. Only
        batches read while nothing was left out so far are kept, so that what the reader skipped
        is still counted (in `source.skipped`) at every pass."""
        src = self.source
        missing = [p for p in parts if p.seq not in self._cache]
        fresh = src.read(missing) if missing else iter(())
        for p in parts:
            b = self._cache.get(p.seq)
            if b is None:
                b = next(fresh, None)
                if b is None:
                    return
                if p.part != SPANS_PART and not src.skipped.rows and self._cache_bytes + b.nbytes <= CACHE_BYTES:
                    self._cache[p.seq] = b
                    self._cache_bytes += b.nbytes
            yield b

    def _aggregates_by(self, t_ns: int) -> list[Part]:
        """The aggregate batches that can stand for their spans at playhead `t_ns`: every span they
        cover started by then, and every batch they cover is in the file."""
        present = {p.seq for p in self._parts}
        return [p for p in self._parts if p.part == AGGREGATES_PART and p.covers is not None and p.last_ns <= t_ns
                and all(s in present for s in range(p.covers[0], p.covers[1] + 1))]

    def _unread_aggregates(self, t_ns: int) -> bool:
        """Whether aggregates could stand for spans by `t_ns` that are not read yet (a jump then
        costs less rebuilt from the aggregates than fed span by span)."""
        if self._parts is None:
            return False
        unread = {p.seq for p in self._index_parts[self._next:] if p.part == SPANS_PART}
        return any(p.covers[0] in unread for p in self._aggregates_by(t_ns))

    # -- state ------------------------------------------------------------------------------
    @property
    def at_end(self) -> bool:
        return self._fed >= self.rows

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
        if t_ns < self.position_ns or self._unread_aggregates(t_ns):
            self._rewind(t_ns)
        self._feed_to(t_ns)
        self.position_ns = t_ns

    def advance(self, wall_s: float) -> bool:
        """Move the playhead by `wall_s` of wall time at the current speed; True when it moved."""
        if not self.playing or self.at_end:
            if self.at_end:
                self.playing = False
            return False
        if math.isinf(self.speed):
            # As fast as possible: one batch of the file per step (at most ~64k rows: the writer's
            # batch size), so a step stays a bounded amount of work for the UI thread.
            upto = self._index[self._next].last_ns if self._next < len(self._index) else self.end_ns
            self.seek_ns(max(upto, self.position_ns))
        else:
            self.seek_ns(self.position_ns + int(wall_s * self.speed * 1e9))
        if self.at_end:
            self.position_ns = self.end_ns
            self.playing = False
        return True

    def _feed_to(self, t_ns: int) -> None:
        """Feed every row with t <= t_ns not fed yet. Batches are read one at a time, so a long jump
        (to the end, say) never holds more than the batches around t_ns and a chunk of whole ones:
        consecutive batches that lie wholly before t_ns are fed to Metrics together (up to 65,536
        rows), in the same order as one by one, since a call costs about as much as its rows."""
        self._feed_open(t_ns)
        whole: list[pa.RecordBatch] = []
        while self._next < len(self._index) and self._index[self._next].first_ns <= t_ns:
            b = next(self._reader, None)
            if b is None:  # the file changed since it was indexed: play what was there
                self._index = self._index[: self._next]
                self.rows = sum(r.rows for r in self._index)
                break
            entry = self._index[self._next]
            self._next += 1
            self._fed += entry.rows - b.num_rows  # rows the reader's checks left out
            # A stable sort keeps the write order of rows with equal times (the end marker stays last).
            order = np.argsort(b.column("t_ns").to_numpy(), kind="stable")
            rows = b.take(pa.array(order))
            if entry.last_ns <= t_ns and not self._open:
                whole.append(rows)
                if sum(w.num_rows for w in whole) >= 1 << 16:
                    self._feed_whole(whole)
                    whole = []
                continue
            self._feed_whole(whole)
            whole = []
            self._open.append(_OpenBatch(rows, rows.column("t_ns").to_numpy()))
            self._feed_open(t_ns)
        self._feed_whole(whole)

    def _feed_whole(self, batches: list[pa.RecordBatch]) -> None:
        rows = one_batch(batches)
        if rows is None:
            return
        self.metrics.add(rows)
        self._fed += rows.num_rows

    def _feed_open(self, t_ns: int) -> None:
        for ob in self._open:
            upto = int(np.searchsorted(ob.t, t_ns, side="right"))
            if upto > ob.fed:
                self.metrics.add(ob.rows.slice(ob.fed, upto - ob.fed))
                self._fed += upto - ob.fed
                ob.fed = upto
        self._open = [ob for ob in self._open if ob.fed < len(ob.t)]
