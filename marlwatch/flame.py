"""py-spy flame graphs tied to phases (format and clock alignment: docs/flame.md).

While a run is going, `FlameController` runs `py-spy record --format chrometrace --idle` for a
few seconds on exactly the processes that execute a phase, rebuilds every stack sample from
py-spy's timestamped trace, attributes it to the innermost span open in that process at that
moment, and writes the samples into the recording as rows of kind `stack`:

    kind="stack", proc=slot, name=attributed phase, t_ns=first sample, dur_ns=time covered,
    iter=the span's iteration, value=number of samples, text=folded stack (root first, ";")

Consecutive samples with the same stack in the same span share one row. `Metrics` ignores the
kind. `marlwatch flame FILE --phase P` renders only the samples taken while P (or a phase
under it) ran: text (top functions), speedscope JSON or an SVG flame graph.

Where py-spy cannot attach (no permission, process gone, py-spy missing) the run goes on; the
controller writes a `flame_failed` event and a one-line message.

Exit codes of `marlwatch flame`: 0 written; 2 bad input (unreadable recording, no samples for
the phase, unwritable output).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from marlwatch.collector import event_row
from marlwatch.metrics import Metrics, Warmup, function_name, with_warmup_gauge
from marlwatch.outputs import write_text
from marlwatch.phase_activity import REAL_WORK_SHARE, WINDOW_S, PhaseActivity, Share, top_segment
from marlwatch.recording import COUNTER, EVENT, ITER, SCHEMA, SPAN, STACK, Recording, RecordingError
from marlwatch.report import warming_up
from marlwatch.terminal import printable, say

DEFAULT_SECONDS = 5.0
DEFAULT_RATE = 100
# --auto-flame: the length of the windows it compares, and how much a phase's p95 must grow
# (and by at least 1 ms) over the first window's to count as a jump.
AUTO_WINDOW_S = 2.0
AUTO_P95_JUMP = 1.5
# A capture keeps the sampled processes' spans of its window in memory until the samples are
# attributed: a minute of even fine-grained spans stays in the tens of MB.
MAX_SECONDS = 60
SPAN_WAIT_S = 10.0  # how long to wait for a process's spans covering the sampled window
WAIT_REPORT_S = 10.0  # while a request waits for real work, say so this often


def in_phase(name: str | None, phase: str) -> bool:
    """`update` covers `update` and `update/critic`, not `update_x`."""
    return name is not None and (name == phase or name.startswith(phase + "/"))


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


# -- reading py-spy's chrometrace -----------------------------------------------------------
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


# -- aligning py-spy's clock with the run's --------------------------------------------------
# marlwatch's own process loops (process.learner_main, workers.serve_rollout) call one function
# per top-level phase; the frame right below them says which top-level phase a sample is in.
LOOP_FRAMES = ("learner_main (", "serve_rollout (")
MAX_SHIFT_MS = 400
SNAP_NS = 5_000_000  # at most this far (or one sampling period) a sample is moved by snap_to_loop_phase
MIN_SHIFT_MS = 50  # samples are stamped when handled, so py-spy's times can also run late


def _loop_marker(stack: str) -> str | None:
    frames = stack.split(";")
    for i in range(len(frames) - 2, -1, -1):
        if frames[i].startswith(LOOP_FRAMES):
            return frames[i + 1].split(" (", 1)[0]
    return None


def estimate_shift(samples: Samples, spans: SpanIndex, top_level: np.ndarray
                   ) -> tuple[int, float, dict[str, str]]:
    """The shift (ns) to add to py-spy's times so samples line up with the spans, the share
    of loop-marked samples that agree with their top-level span after it, and the learned map
    from loop function to top-level phase.

    py-spy counts time from when it started, a few ms (on a loaded machine, tens of ms) after
    marlwatch launched it, and stamps a sample when its writer thread handles it. The shift is
    found from the data: the one (-50..+400 ms, 1 ms steps) under which the function called by
    the process loop best predicts the top-level span open at each sample (a function maps to
    one phase). Among equally good shifts the run nearest to zero wins, so a shift of a whole
    (regular) iteration is not taken. Without loop-marked samples the shift is 0.
    """
    markers = [_loop_marker(st) for st in samples.stacks]
    keep = np.array([m is not None for m in markers])
    if keep.sum() < 5 or not top_level.any():
        return 0, math.nan, {}
    codes = {m: i for i, m in enumerate(sorted({m for m in markers if m is not None}))}
    mk = np.array([codes[m] for m in markers if m is not None], np.int64)
    t = samples.t_ns[keep]
    top_idx = np.flatnonzero(top_level)
    starts, ends = spans.start[top_idx], spans.end[top_idx]
    names = sorted({spans.names[i] for i in top_idx})
    label_of_span = np.array([names.index(spans.names[i]) for i in top_idx] + [len(names)], np.int64)
    shifts = np.arange(-MIN_SHIFT_MS, MAX_SHIFT_MS + 1) * 1_000_000
    scores = np.zeros(len(shifts))

    def table(d: int) -> np.ndarray:
        pos = np.searchsorted(starts, t + d, side="right") - 1
        inside = (pos >= 0) & (ends[np.maximum(pos, 0)] > t + d)
        lab = np.where(inside, label_of_span[np.maximum(pos, 0)], len(names))
        counts = np.bincount(mk * (len(names) + 1) + lab, minlength=len(codes) * (len(names) + 1))
        return counts.reshape(len(codes), len(names) + 1)[:, : len(names)]

    for j, d in enumerate(shifts):
        scores[j] = table(d).max(axis=1).sum()
    best = scores.max()
    good = np.flatnonzero(scores >= best - max(1.0, 0.01 * len(t)))
    # Contiguous runs of good shifts; the run nearest to zero; its middle.
    runs = np.split(good, np.flatnonzero(np.diff(good) > 1) + 1)
    nearest = min(runs, key=lambda r: min(abs(shifts[r[0]]), abs(shifts[r[-1]])) if not
                  (shifts[r[0]] <= 0 <= shifts[r[-1]]) else 0)
    pick = int(nearest[len(nearest) // 2])
    at_pick = table(int(shifts[pick]))
    mapping = {m: names[int(at_pick[i].argmax())] for m, i in codes.items() if at_pick[i].sum() > 0}
    return int(shifts[pick]), float(scores[pick] / len(t)), mapping


def snap_to_loop_phase(samples: Samples, spans: SpanIndex, mapping: dict[str, str], window_ns: int) -> int:
    """Move a sample by at most `window_ns` into the nearest top-level span its loop function
    belongs to (`mapping`), when the span at its time is another one; returns how many moved.

    py-spy's stamps jitter by a few ms, so right after a phase change a sample can land in the
    neighbouring top-level phase. The stack says which one it was in; within the stamps'
    uncertainty the sample is put there. Samples without a loop frame are left as they are.
    """
    top_idx = np.flatnonzero(spans.top)
    if not mapping or len(top_idx) == 0:
        return 0
    starts, ends = spans.start[top_idx], spans.end[top_idx]
    moved = 0
    for k, stack in enumerate(samples.stacks):
        want = mapping.get(_loop_marker(stack) or "")
        if want is None:
            continue
        t = int(samples.t_ns[k])
        pos = int(np.searchsorted(starts, t, side="right")) - 1
        if pos >= 0 and ends[pos] > t and spans.names[top_idx[pos]] == want:
            continue
        best: int | None = None
        for q in range(max(0, pos - 2), min(len(top_idx), pos + 3)):
            if spans.names[top_idx[q]] != want:
                continue
            target = min(max(t, int(starts[q])), int(ends[q]) - 1)
            if abs(target - t) <= window_ns and (best is None or abs(target - t) < abs(best - t)):
                best = target
        if best is not None:
            samples.t_ns[k] = best
            moved += 1
    return moved


# -- attributing samples to spans ------------------------------------------------------------
@dataclass
class SpanIndex:
    """Spans of one process (start, end, name, iter) for point look-ups."""

    start: np.ndarray
    end: np.ndarray
    names: list[str]
    iters: np.ndarray
    top: np.ndarray  # top-level span (no parent)
    parent: np.ndarray  # index of the enclosing span, -1 at top level

    @classmethod
    def build(cls, rows: Iterable[tuple[int, int, str, int, bool]]) -> SpanIndex:
        """From (start_ns, dur_ns, name, iter, top_level) rows."""
        rows = sorted(rows, key=lambda r: (r[0], -r[1]))  # by start; a parent before its child
        start = np.array([r[0] for r in rows], np.int64)
        end = start + np.array([r[1] for r in rows], np.int64)
        # Spans of one thread nest: one pass with a stack of open spans gives each its parent.
        parent = np.full(len(rows), -1, np.int64)
        open_: list[int] = []
        ends = end.tolist()
        for i, s in enumerate(start.tolist()):
            while open_ and ends[open_[-1]] <= s:
                open_.pop()
            if open_:
                parent[i] = open_[-1]
            open_.append(i)
        return cls(start, end, [r[2] for r in rows], np.array([r[3] for r in rows], np.int64),
                   np.array([r[4] for r in rows], bool), parent)

    def innermost(self, t_ns: np.ndarray) -> np.ndarray:
        """Index of the innermost span open at each time (-1: none).

        Every span open at t encloses the last span that started at or before t (spans nest),
        so the innermost one is found walking up from that span: O(depth) per sample."""
        last = np.searchsorted(self.start, t_ns, side="right") - 1
        ends, parent = self.end.tolist(), self.parent.tolist()
        out = np.empty(len(t_ns), np.int64)
        for n, (t, i) in enumerate(zip(t_ns.tolist(), last.tolist(), strict=True)):
            while i >= 0 and ends[i] <= t:
                i = parent[i]
            out[n] = i
        return out


def stack_rows(slot: int, samples: Samples, spans: SpanIndex, rate: float) -> tuple[pa.RecordBatch, int]:
    """Rows of kind `stack` for the attributed samples; returns them and the unattributed count."""
    idx = spans.innermost(samples.t_ns)
    period = int(1e9 / rate)
    rows: dict[str, list] = {name: [] for name in SCHEMA.names}
    unattributed = int((idx < 0).sum())
    prev: tuple[int, str] | None = None
    for t, stack, k in zip(samples.t_ns.tolist(), samples.stacks, idx.tolist(), strict=True):
        if k < 0:
            prev = None
            continue
        if prev == (k, stack):  # same span, same stack: one more sample on the previous row
            rows["value"][-1] += 1
            rows["dur_ns"][-1] = t + period - rows["t_ns"][-1]
            continue
        prev = (k, stack)
        for col, v in (("kind", STACK), ("proc", slot), ("name", spans.names[k]), ("parent", None), ("t_ns", t),
                       ("dur_ns", period), ("iter", int(spans.iters[k])), ("core", None), ("value", 1.0),
                       ("text", stack), ("bin", None)):
            rows[col].append(v)
    return pa.RecordBatch.from_pydict(rows, schema=SCHEMA), unattributed


# -- the controller: runs py-spy during a live run -------------------------------------------
@dataclass
class _Session:
    slot: int
    pid: int
    proc: subprocess.Popen
    out: Path
    t_launch_ns: int
    t_end_ns: int | None = None
    events: list[dict[str, Any]] | None = None
    error: str | None = None
    last_tick_ns: int = -1  # the latest iteration end seen from this process


@dataclass
class FlameRequest:
    phase: str
    seconds: float = DEFAULT_SECONDS
    reason: str = "requested"
    replace: bool = False  # drop waiting requests of the same reason (the app's `f` key: the latest wins)
    # While it waits for its phase to do real work (marlwatch.phase_activity):
    since: float | None = None  # monotonic time it was taken in
    said_at: float | None = None  # when the last waiting message was given
    said: str | None = None  # what the last waiting message said: "absent" (no process ran it) or "share"
    max_share: float = 0.0  # the largest top-level share seen while waiting


@dataclass
class _Capture:
    request: FlameRequest
    sessions: list[_Session]
    spans: dict[int, list[tuple[int, int, str, int, bool]]] = field(default_factory=lambda: defaultdict(list))
    t_start_ns: int = 0
    ended_at: float | None = None  # monotonic time py-spy was done (waiting for spans from then on)


class FlameController:
    """Runs py-spy on a live `Run` on request (`request()`, `--flame`, the app's `f` key) or
    automatically (`auto=True`: once, when a phase becomes the hottest or its p95 jumps).

    It plugs into the run with a listener (to see which processes run a phase and to keep the
    spans of the sampled window) and a hook that `Run.pump()` calls after each pump and
    `Run.finish()` calls with final=True. Everything runs in the thread that pumps the run.
    """

    def __init__(self, run: Any, *, rate: int = DEFAULT_RATE, auto: bool = False,
                 auto_seconds: float = DEFAULT_SECONDS, on_message: Callable[[str], None] | None = None) -> None:
        self.run = run
        self.rate = rate
        self.auto = auto
        self.auto_seconds = auto_seconds
        self.on_message = on_message
        self.messages: list[str] = []
        self.incoming: deque[FlameRequest] = deque()  # from any thread; taken in by poll()
        self.pending: list[FlameRequest] = []  # taken in, waiting for a process or for real work
        # Top-level spans and iteration ends while a request is pending (None when none is): the "does
        # it do real work" rule of marlwatch.phase_activity.
        self.activity: PhaseActivity | None = None
        self.warmup: Warmup | None = None  # the run's warm-up, where it reports one (seen while tracking)
        self.capture: _Capture | None = None
        self.done: list[dict[str, Any]] = []  # one summary per finished capture
        self.phase_slots: dict[str, set[int]] = defaultdict(set)
        self._auto_fired = False
        # --auto-flame compares short windows of the run (a fresh Metrics each) with the first
        # window after start-up, so that a jump shows as soon as it happens, even hours into a
        # run, where whole-run figures would hardly move.
        self._auto_metrics: Metrics | None = None
        self._auto_windows = 0
        self._auto_baseline: dict[str, float] | None = None
        self._auto_hottest: str | None = None
        self._auto_candidate: str | None = None
        self._next_auto_check = 0.0
        if auto:
            self._auto_metrics = Metrics(run.info)
            self._next_auto_check = time.monotonic() + AUTO_WINDOW_S
        run.listeners.append(self.on_batch)
        run.hooks.append(self.poll)

    # -- requests ----------------------------------------------------------------------------
    def request(self, phase: str, seconds: float = DEFAULT_SECONDS, reason: str = "requested",
                replace: bool = False) -> None:
        """Profile `phase` for `seconds` once a process runs it and it does real work
        (marlwatch.phase_activity); one capture at a time. `replace`: drop requests of the same
        `reason` that are still waiting.

        May be called from any thread (the live app's UI thread): it only appends to a deque that
        the run's thread takes from in `poll()`."""
        self.incoming.append(FlameRequest(phase, seconds, reason, replace))

    @property
    def busy(self) -> bool:
        return self.capture is not None

    def _say(self, text: str) -> None:
        self.messages.append(text)
        if self.on_message is not None:
            self.on_message(text)

    # -- listener ----------------------------------------------------------------------------
    def on_batch(self, batch: pa.RecordBatch) -> None:
        if self._auto_metrics is not None and not self._auto_fired:
            self._auto_metrics.add(batch)
        if not self.pending and not self.incoming and self.capture is None:
            return  # idle (the live app always has a controller for its `f` key): costs nothing
        kind = batch.column("kind")
        is_span = pc.equal(kind, SPAN).to_numpy(zero_copy_only=False)
        if self.pending or self.incoming:
            self._track_activity(batch, kind, is_span)
        if is_span.any():
            # Which process runs which phase: distinct (proc, name) pairs with numpy, without
            # copying the batch (this runs for every batch of a run, profiled or not).
            enc = pc.dictionary_encode(batch.column("name"))
            codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            procs = batch.column("proc").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
            pairs = np.unique((procs[is_span] << 32) | (codes[is_span] & 0xFFFFFFFF))
            names = enc.dictionary.to_pylist()
            for key in pairs.tolist():
                slot, code = key >> 32, key & 0xFFFFFFFF
                if slot >= 0 and code != 0xFFFFFFFF:
                    self.phase_slots[names[code]].add(slot)
        cap = self.capture
        if cap is None:
            return
        slots = {s.slot for s in cap.sessions}
        if is_span.any():
            spans = batch.filter(pa.array(is_span))
            for slot, name, parent, t, dur, it in zip(
                    *(spans.column(c).to_pylist() for c in ("proc", "name", "parent", "t_ns", "dur_ns", "iter")),
                    strict=True):
                if slot in slots and t + dur >= cap.t_start_ns:
                    cap.spans[slot].append((t, dur, name, it, parent is None))
        iters = batch.filter(pc.equal(kind, ITER))
        if iters.num_rows:
            for slot, t in zip(iters.column("proc").to_pylist(), iters.column("t_ns").to_pylist(), strict=True):
                for s in cap.sessions:
                    if s.slot == slot:
                        s.last_tick_ns = max(s.last_tick_ns, t)

    def _track_activity(self, batch: pa.RecordBatch, kind: pa.Array, is_span: np.ndarray) -> None:
        """Top-level spans and iteration ends, for the real-work rule (marlwatch.phase_activity)."""
        if self.activity is None:
            self.activity = PhaseActivity()

        def ints(c: str, mask: np.ndarray) -> np.ndarray:
            return batch.column(c).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[mask]

        top = is_span & pc.is_null(batch.column("parent")).to_numpy(zero_copy_only=False)
        if top.any():
            enc = pc.dictionary_encode(batch.column("name"))
            codes = enc.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)[top]
            ok = codes >= 0
            self.activity.add_spans(ints("proc", top)[ok], enc.dictionary.to_pylist(), codes[ok],
                                    ints("t_ns", top)[ok], ints("dur_ns", top)[ok])
        ticks = pc.equal(kind, ITER).to_numpy(zero_copy_only=False)
        if ticks.any():
            self.activity.add_ticks(ints("proc", ticks), ints("t_ns", ticks))
        gauges = batch.filter(pc.equal(kind, COUNTER))
        for name, t, value in zip(*(gauges.column(c).to_pylist() for c in ("name", "t_ns", "value")), strict=True):
            if name is not None and t is not None and value is not None:
                self.warmup = with_warmup_gauge(self.warmup, name, value, t)

    def slots_for(self, phase: str) -> list[int]:
        return sorted({slot for name, slots in self.phase_slots.items() if in_phase(name, phase) for slot in slots})

    # -- hook --------------------------------------------------------------------------------
    def poll(self, final: bool = False) -> None:
        self._take_incoming()
        if self.capture is not None:
            self._advance(final)
        if final:
            for req in self.pending:
                self._give_up(req)
            self.pending.clear()
            return
        if self.capture is None and self.auto and not self._auto_fired and time.monotonic() >= self._next_auto_check:
            self._next_auto_check = time.monotonic() + AUTO_WINDOW_S
            self._check_auto()
        if not self.pending:
            self.activity = None  # nothing waits: stop keeping top-level time
            return
        ready = None
        for req in self.pending:
            if self._ready(req) and ready is None and self.capture is None:
                ready = req
        if ready is not None:
            self.pending.remove(ready)
            self._start(ready, self.slots_for(ready.phase))

    def _take_incoming(self) -> None:
        while self.incoming:
            req = self.incoming.popleft()
            req.since = time.monotonic()
            if req.replace:
                for old in [r for r in self.pending if r.reason == req.reason]:
                    self.pending.remove(old)
                    self._say(f"flame: no longer waiting for '{old.phase}' ('{req.phase}' was asked for since)")
            self.pending.append(req)

    def _roles(self, slots: list[int]) -> str:
        return " + ".join(self.run.procs[s].role if s in self.run.procs else f"slot {s}" for s in slots)

    def _ready(self, req: FlameRequest) -> bool:
        """Whether `req`'s phase runs and does real work now; says so while it waits (at once,
        then every WAIT_REPORT_S)."""
        slots = self.slots_for(req.phase)
        share = self.activity.share(req.phase, slots) if self.activity is not None and slots else None
        if share is not None:
            req.max_share = max(req.max_share, share.share)
            if share.share >= REAL_WORK_SHARE:
                return True
        now = time.monotonic()
        kind = "share" if share is not None else "absent"
        # Said at once when there is news (the phase runs now), else every WAIT_REPORT_S.
        if req.said == kind and req.said_at is not None and now - req.said_at < WAIT_REPORT_S:
            return False
        waited = now - (req.since or now)
        if share is not None:
            top = top_segment(req.phase)
            what = f"'{req.phase}'" if top == req.phase else f"'{req.phase}' ('{top}')"
            state = (f"{top}: {self._share_text(share, slots)}; profiling starts at {100 * REAL_WORK_SHARE:g}%")
            lead = "still waiting" if req.said == "share" else "waiting"
            self._say(f"flame: {lead} for {what} to do real work before profiling it "
                      f"({state}; {self._progress(waited)})")
        elif self.activity is not None and self.activity.running_s() >= WINDOW_S and req.said is None:
            self._say(f"flame: waiting for a process to run '{req.phase}' (none has so far)")
        else:
            return False  # nothing known yet (start-up), or said already: say nothing
        req.said, req.said_at = kind, now
        return False

    def _share_text(self, share: Share, slots: list[int]) -> str:
        if share.iterations:
            return f"{_pct(share.share)} of {self._roles(slots)} iteration time, median of the last {share.iterations}"
        return f"{_pct(share.share)} of {self._roles(slots)} time over {share.window_s:g} s"

    def _progress(self, waited_s: float) -> str:
        """How far the wait is: the run's warm-up where it reports one, and the time waited."""
        w = self.warmup
        warm = f"{warming_up(w)} ({100 * w.done / w.needed:.0f}%), " if w is not None and w.active else ""
        return f"{warm}waited {waited_s:.0f} s"

    def _give_up(self, req: FlameRequest) -> None:
        """The run ended while `req` waited."""
        slots = self.slots_for(req.phase)
        if not slots:
            seen = sorted({top_segment(p) for p in self.phase_slots})
            why = f"no process ran '{req.phase}'" + (f" (phases seen: {', '.join(seen)}; is the name right?)"
                                                      if seen else "")
        else:
            top = top_segment(req.phase)
            why = (f"'{req.phase}' never did real work ('{top}' took at most {_pct(req.max_share)} of "
                   f"{self._roles(slots)} time; a capture needs {100 * REAL_WORK_SHARE:g}%)")
        self.run.emit(event_row(self.run.now_ns(), None, "flame_skipped", phase=req.phase, reason=why,
                                max_share=req.max_share))
        hint = "; a longer run (--iterations) gives it time" if slots else ""
        self._say(f"flame: the run ended before profiling '{req.phase}': {why}; nothing was profiled{hint}")

    def _check_auto(self) -> None:
        """Close the current window and compare it with the baseline window."""
        m = self._auto_metrics
        if m is None:
            return
        snap = m.snapshot()
        self._auto_metrics = Metrics(self.run.info)
        self._auto_windows += 1
        if self._auto_windows == 1 or snap.iterations < 5:
            return  # start-up (imports, first iterations) would look like jumps
        hottest = snap.hottest.name if snap.hottest else None
        p95 = {p.name: p.p95_ms for p in snap.phases if p.count >= 10 and not math.isnan(p.p95_ms)}
        if self._auto_baseline is None:
            self._auto_baseline, self._auto_hottest = p95, hottest
            return
        reason, phase = None, None
        # A new hottest phase counts once it holds for two windows in a row (not one noisy window).
        if hottest is not None and hottest != self._auto_hottest and hottest == self._auto_candidate:
            reason, phase = f"'{hottest}' became the hottest phase (was '{self._auto_hottest}')", hottest
        self._auto_candidate = hottest if hottest != self._auto_hottest else None
        if phase is None:
            for name, now in sorted(p95.items(), key=lambda kv: -kv[1]):
                before = self._auto_baseline.get(name)
                if before is None:
                    self._auto_baseline[name] = now  # a phase that started later: its first window
                elif now > AUTO_P95_JUMP * before and now - before > 1.0:
                    reason, phase = f"p95 of '{name}' jumped from {before:.1f} to {now:.1f} ms", name
                    break
        if phase is not None:
            self._auto_fired = True
            self._auto_metrics = None  # no longer needed
            self._say(f"flame: auto: {reason}; profiling it for {self.auto_seconds:g} s")
            self.pending.insert(0, FlameRequest(phase, self.auto_seconds, f"auto: {reason}"))

    def _start(self, req: FlameRequest, slots: list[int]) -> None:
        cmd = pyspy_command()
        run = self.run
        cap = _Capture(req, [], t_start_ns=run.now_ns())
        tmp = Path(tempfile.mkdtemp(prefix="marlwatch-flame-"))
        for slot in slots:
            st = run.procs.get(slot)
            pid = st.pid if st is not None else None
            role = st.role if st is not None else f"slot {slot}"
            if not cmd:
                self._fail(slot, pid, role, "py-spy not found (pip install py-spy, or set MARLWATCH_PYSPY)")
                continue
            if st is not None and not getattr(st, "same_machine", True):
                self._fail(slot, pid, role, f"it runs on another machine ({st.node or 'another node'}); py-spy can "
                                            "only attach to processes on the monitor's machine")
                continue
            if pid is None or (st is not None and st.exitcode is not None):
                self._fail(slot, pid, role, "process gone")
                continue
            out = tmp / f"slot{slot}.json"
            args = [*_raised_priority(), *cmd, "record", "--pid", str(pid), "--format", "chrometrace", "--idle",
                    "--nonblocking", "--rate",
                    str(self.rate), "--duration", str(max(1, math.ceil(req.seconds))), "--output", str(out)]
            t_launch = run.now_ns()  # py-spy's clock starts just after this (docs/flame.md)
            try:
                proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
            except OSError as e:
                self._fail(slot, pid, role, f"cannot start py-spy: {e.strerror or e}")
                continue
            cap.sessions.append(_Session(slot, pid, proc, out, t_launch))
        if not cap.sessions:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        self.capture = cap
        roles = ", ".join(run.procs[s.slot].role for s in cap.sessions)
        run.emit(event_row(cap.t_start_ns, None, "flame_started", phase=req.phase, seconds=req.seconds,
                            rate=self.rate, slots=[s.slot for s in cap.sessions], reason=req.reason))
        waited = f" (it does real work now; {self._progress(time.monotonic() - req.since)})" \
            if req.said_at is not None and req.since is not None else ""
        self._say(f"flame: profiling '{req.phase}' in {roles} for {req.seconds:g} s at {self.rate} Hz{waited}")

    def _fail(self, slot: int, pid: int | None, role: str, why: str) -> None:
        self.run.emit(event_row(self.run.now_ns(), slot, "flame_failed", pid=pid, error=why))
        who = f"{role} (pid {pid})" if pid is not None else role
        self._say(f"flame: py-spy could not profile {who}: {why}; the run goes on")

    def _advance(self, final: bool) -> None:
        cap = self.capture
        assert cap is not None
        for s in cap.sessions:
            if s.events is not None or s.error is not None:
                continue
            if final and s.proc.poll() is None:
                s.proc.send_signal(signal.SIGINT)  # py-spy writes what it has on Ctrl-C
                try:
                    s.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
            if s.proc.poll() is None:
                continue
            s.t_end_ns = self.run.now_ns()
            err = s.proc.stderr.read() if s.proc.stderr else ""
            if s.proc.returncode != 0 or not s.out.exists():
                s.error = _pyspy_error(err, s.proc.returncode)
                continue
            try:
                data = json.loads(s.out.read_text())
                s.events = data if isinstance(data, list) else data.get("traceEvents", [])
            except (OSError, ValueError) as e:
                s.error = f"unreadable py-spy output ({e})"
        if any(s.events is None and s.error is None for s in cap.sessions):
            return
        if cap.ended_at is None:
            cap.ended_at = time.monotonic()
        # Spans arrive when their process flushes; an iteration that ended after the sampled
        # window means every span that started inside it has arrived.
        waiting = [s for s in cap.sessions if s.events is not None
                   and s.last_tick_ns < (s.t_end_ns or 0)
                   and self.run.procs[s.slot].exitcode is None]
        if waiting and not final and time.monotonic() - cap.ended_at < SPAN_WAIT_S:
            return
        self._finish_capture(cap)

    def _finish_capture(self, cap: _Capture) -> None:
        self.capture = None
        total, unattributed = 0, 0
        phases: Counter = Counter()
        alignment: dict[str, dict[str, float | None]] = {}
        for s in cap.sessions:
            role = self.run.procs[s.slot].role
            if s.error is not None:
                self._fail(s.slot, s.pid, role, s.error)
                continue
            samples = samples_from_chrometrace(s.events or [], self.rate, s.t_launch_ns)
            index = SpanIndex.build(cap.spans.get(s.slot, []))
            shift, agree, mapping = estimate_shift(samples, index, index.top)
            samples.t_ns += shift
            snapped = snap_to_loop_phase(samples, index, mapping, max(SNAP_NS, int(1e9 / self.rate)))
            order = np.argsort(samples.t_ns, kind="stable")
            samples = Samples(samples.t_ns[order], [samples.stacks[i] for i in order])
            alignment[str(s.slot)] = {"shift_ms": shift / 1e6, "agreement": None if math.isnan(agree) else agree,
                                      "snapped": snapped}
            batch, lost = stack_rows(s.slot, samples, index, self.rate)
            total += len(samples.t_ns) - lost
            unattributed += lost
            if batch.num_rows:
                self.run.emit(batch)
                for name, count in zip(batch.column("name").to_pylist(), batch.column("value").to_pylist(),
                                       strict=True):
                    phases[name] += int(count)
        try:
            if not os.environ.get("MARLWATCH_FLAME_KEEP"):  # debugging: keep py-spy's raw output
                shutil.rmtree(cap.sessions[0].out.parent, ignore_errors=True)
        except (OSError, IndexError):
            pass
        summary = {"phase": cap.request.phase, "samples": total, "unattributed": unattributed,
                   "slots": [s.slot for s in cap.sessions if s.error is None], "phases": dict(phases),
                   "alignment": alignment}
        self.done.append(summary)
        self.run.emit(event_row(self.run.now_ns(), None, "flame_done", **summary))
        if total or unattributed:
            in_req = sum(v for k, v in phases.items() if in_phase(k, cap.request.phase))
            self._say(f"flame: {total} samples stored ({in_req} in '{cap.request.phase}', "
                      f"{unattributed} outside any span)")



def _pct(share: float) -> str:
    """1.5%, 0.031%: small shares keep two significant digits."""
    return f"{100 * share:.1f}%" if share >= 0.01 or share == 0 else f"{100 * share:.2g}%"


def _raised_priority() -> list[str]:
    """py-spy stamps samples when it handles them: on a busy machine (the run keeps every core
    busy) a descheduled py-spy stamps late and samples irregularly. When we may (root), it runs
    at a higher priority than the training processes."""
    nice = shutil.which("nice")
    if nice and hasattr(os, "geteuid") and os.geteuid() == 0:
        return [nice, "-n", "-10"]
    return []


def _pyspy_error(stderr: str, code: int | None) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Permission Denied"):
            return "permission denied (ptrace not allowed; run as root or set kernel.yama.ptrace_scope=0)"
    for ln in lines:
        if ln.startswith("Error:"):
            return ln[len("Error:"):].strip()
    return lines[0] if lines else f"py-spy exited with code {code}"


def parse_flame_arg(text: str) -> tuple[str, float]:
    """`PHASE[:SECONDS]` of `marlwatch run --flame`."""
    phase, _, secs = text.partition(":")
    phase = phase.strip().strip("/")
    if not phase:
        raise argparse.ArgumentTypeError(f"expected PHASE[:SECONDS], got {text!r}")
    if not secs:
        return phase, DEFAULT_SECONDS
    try:
        seconds = float(secs)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {secs!r}") from None
    if not 0 < seconds <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"seconds must be in (0, {MAX_SECONDS}], got {secs}")
    return phase, seconds


def attach(run: Any, args: argparse.Namespace) -> FlameController | None:
    """Attach a controller when `run` was asked for flame graphs (`--flame`, `--auto-flame`)."""
    flame = getattr(args, "flame", None)
    auto = bool(getattr(args, "auto_flame", False))
    if not flame and not auto:
        return None
    ctl = FlameController(run, rate=getattr(args, "flame_rate", DEFAULT_RATE), auto=auto)
    for phase, seconds in flame or []:
        ctl.request(phase, seconds)
    return ctl


# -- reading samples back ----------------------------------------------------------------------
@dataclass
class StackRead:
    """What a recording holds for `marlwatch flame --phase P`."""

    stacks: Counter  # folded stack -> samples taken while P (or a phase below it) ran
    per_slot: dict[int, Counter]  # the same, per process
    by_phase: Counter  # every stored sample's attributed phase -> samples (any phase)
    events: list[tuple[str, dict[str, Any]]]  # flame_* events (name, detail), in order


def read_stacks(rec: Recording, phase: str) -> StackRead:
    """The samples of `phase` and what was captured besides. Streams the recording batch by batch."""
    out = StackRead(Counter(), defaultdict(Counter), Counter(), [])
    for batch in rec.batches():
        kind = batch.column("kind")
        events = batch.filter(pc.equal(kind, EVENT))
        for slot, name, text in zip(*(events.column(c).to_pylist() for c in ("proc", "name", "text")), strict=True):
            if name and name.startswith("flame_"):
                try:
                    detail = json.loads(text or "{}")
                except ValueError:
                    detail = {}
                out.events.append((name, {"slot": slot, **(detail if isinstance(detail, dict) else {})}))
        stacks = batch.filter(pc.equal(kind, STACK))
        for slot, name, stack, count in zip(*(stacks.column(c).to_pylist()
                                              for c in ("proc", "name", "text", "value")), strict=True):
            out.by_phase[name] += int(count)
            if in_phase(name, phase):
                out.stacks[stack] += int(count)
                out.per_slot[int(slot)][stack] += int(count)
    out.per_slot = dict(out.per_slot)
    return out


def no_samples_reason(path: str, phase: str, read: StackRead, roles: dict[str, str]) -> str:
    """Why `read` has no samples of `phase`: what was captured instead, and what to try."""
    if not read.by_phase:
        said = []
        for name, d in read.events:
            if name == "flame_failed":
                role = roles.get(str(d.get("slot")), "a process")
                said.append(f"py-spy could not profile {role} (pid {d.get('pid')}): {d.get('error')}")
            elif name == "flame_skipped":
                said.append(f"'{d.get('phase')}' was not profiled: {d.get('reason')}")
        started = sum(1 for name, _ in read.events if name == "flame_started")
        done = sum(1 for name, _ in read.events if name == "flame_done")
        if started > done:
            said.append("a capture started but the run ended before its samples were stored")
        if said:
            return f"{path} holds no py-spy samples: " + "; ".join(dict.fromkeys(said))
        return (f"{path} holds no py-spy samples: it was recorded without --flame or --auto-flame "
                f"(e.g. `marlwatch run --flame {phase}:5` takes some)")
    total = sum(read.by_phase.values())
    ranked = sorted(read.by_phase.items(), key=lambda kv: (-kv[1], kv[0]))
    where = ", ".join(f"{name} {n}" for name, n in ranked[:4]) + (", ..." if len(ranked) > 4 else "")
    requested = list(dict.fromkeys(str(d.get("phase")) for name, d in read.events if name == "flame_started"))
    notes = [f"py-spy ran for {', '.join(repr(p) for p in requested)}"] if requested else []
    notes += [f"'{d.get('phase')}' was not profiled: {d.get('reason')}" for name, d in read.events
              if name == "flame_skipped" and d.get("phase") == phase]
    # The phase py-spy was asked for, where it has samples; else the top level of the biggest.
    tries = [p for p in requested if any(in_phase(name, p) for name in read.by_phase)] \
        or [top_segment(ranked[0][0])]
    return (f"{path}: no py-spy samples were taken while '{phase}' ran; the file's {total} samples are in "
            f"{where}" + (f" ({'; '.join(notes)})" if notes else "") + f"; try --phase {tries[0]}")


def _frames(stack: str) -> list[str]:
    return stack.split(";")


def by_function(stacks: Counter) -> Counter:
    """Frames merged by function: `f (x.py:12);g (y.py:3)` -> `f (x.py);g (y.py)`, the frame
    names of py-spy's own `--nolineno` output. Samples recorded on different lines of one
    function add up into one frame of the flame graph."""
    out: Counter = Counter()
    for stack, count in stacks.items():
        out[";".join(function_name(fr) for fr in _frames(stack))] += count
    return out


def top_functions_text(stacks: Counter, phase: str, n: int = 25) -> str:
    """Functions (or, for stacks with lines, source lines) ranked by self then total samples."""
    self_c: Counter = Counter()
    incl: Counter = Counter()
    total = sum(stacks.values())
    for stack, count in stacks.items():
        frames = _frames(stack)
        self_c[frames[-1]] += count
        for f in set(frames):
            incl[f] += count
    lines = [f"phase {phase}: {total} samples", "",
             f"{'self':>7} {'self%':>6} {'total':>7} {'total%':>6}  function"]
    ranked = sorted(incl, key=lambda f: (-self_c[f], -incl[f], f))[:n]
    for f in ranked:
        lines.append(f"{self_c[f]:7d} {100 * self_c[f] / total:5.1f}% {incl[f]:7d} {100 * incl[f] / total:5.1f}%  {f}")
    return "\n".join(printable(line) for line in lines)  # frames come from the recording


def speedscope(per_slot: dict[int, Counter], phase: str, roles: dict[str, str]) -> dict[str, Any]:
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    profiles = []
    for slot in sorted(per_slot):
        samples, weights = [], []
        for stack, count in per_slot[slot].items():
            ids = []
            for fr in _frames(stack):
                if fr not in index:
                    name, _, where = fr.partition(" (")
                    file, _, line = where.rstrip(")").rpartition(":")
                    entry: dict[str, Any] = {"name": name, "file": file or where.rstrip(")")}
                    if line.isdigit():
                        entry["line"] = int(line)
                    index[fr] = len(frames)
                    frames.append(entry)
                ids.append(index[fr])
            samples.append(ids)
            weights.append(count)
        profiles.append({"type": "sampled", "name": f"{roles.get(str(slot), f'slot {slot}')}: {phase}",
                         "unit": "none", "startValue": 0, "endValue": sum(weights), "samples": samples,
                         "weights": weights})
    return {"$schema": "https://www.speedscope.app/file-format-schema.json", "shared": {"frames": frames},
            "profiles": profiles, "name": f"marlwatch flame: {phase}", "activeProfileIndex": 0,
            "exporter": "marlwatch"}


def _svg_text(text: str) -> str:
    """Recorded text as SVG character data: control characters are not allowed in XML at all."""
    return html.escape(printable(text))


def flame_svg(stacks: Counter, title: str, width: int = 1200, row: int = 17) -> str:
    """A flame graph (root at the bottom) as a self-contained SVG with hover titles."""
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for stack, count in stacks.items():
        node = tree
        node["n"] += count
        for fr in _frames(stack):
            node = node["kids"].setdefault(fr, {"n": 0, "kids": {}})
            node["n"] += count

    def depth(node: dict[str, Any]) -> int:
        return 1 + max((depth(k) for k in node["kids"].values()), default=0)

    levels = depth(tree)
    height = (levels + 2) * row
    total = max(1, tree["n"])
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="monospace" font-size="11">',
           f'<text x="4" y="{row - 4}" font-size="13">{_svg_text(title)} ({total} samples)</text>']

    def draw(name: str, node: dict[str, Any], x: float, level: int) -> None:
        w = node["n"] / total * width
        if w < 0.5:
            return
        y = height - (level + 1) * row
        hue = 20 + (zlib.crc32(name.encode()) % 40)  # the same colour for a function in every file
        pct = 100 * node["n"] / total
        label = _svg_text(name)
        out.append(f'<g><title>{label}: {node["n"]} samples ({pct:.1f}%)</title>'
                   f'<rect x="{x:.1f}" y="{y}" width="{max(w - 0.5, 0.5):.1f}" height="{row - 1}" '
                   f'fill="hsl({hue},85%,60%)"/>')
        chars = int(w / 7)
        if chars >= 4:
            text = name if len(name) <= chars else name[:chars - 2] + ".."
            out.append(f'<text x="{x + 3:.1f}" y="{y + row - 5}">{_svg_text(text)}</text>')
        out.append("</g>")
        cx = x
        for kid_name, kid in sorted(node["kids"].items()):
            draw(kid_name, kid, cx, level + 1)
            cx += kid["n"] / total * width

    cx = 0.0
    for name, kid in sorted(tree["kids"].items()):
        draw(name, kid, cx, 0)
        cx += kid["n"] / total * width
    out.append("</svg>")
    return "\n".join(out)


# -- command line ------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("file", help="a recording with py-spy samples (marlwatch run --flame PHASE)")
    parser.add_argument("--phase", required=True, help="phase path; its sub-phases are included (update -> update/*)")
    parser.add_argument("--to", choices=("text", "speedscope", "svg"), default="text",
                        help="text: top functions; speedscope: JSON for speedscope.app; svg: a flame graph")
    parser.add_argument("-o", "--out", default=None, help="output file (default: stdout)")
    parser.add_argument("--top", type=int, default=25, metavar="N", help="text: number of functions (default 25)")
    parser.add_argument("--lines", action="store_true",
                        help="one frame per source line (default: one per function, as py-spy's --nolineno)")


def cli(args: argparse.Namespace) -> int:
    from marlwatch.cli import UsageError, open_or_fail, warn_skipped

    rec = open_or_fail(args.file)
    phase = args.phase.strip().strip("/")
    if not phase:
        raise UsageError("--phase must name a phase, e.g. update or sample/env_step")
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    try:
        read = read_stacks(rec, phase)
    except RecordingError as e:  # nothing valid in it
        raise UsageError(str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged file must give one line, not a traceback (as summary)
        raise UsageError(f"{args.file}: damaged recording ({type(e).__name__}: {e})") from None
    if not read.stacks:
        raise UsageError(no_samples_reason(args.file, phase, read, rec.info.procs))
    stacks = read.stacks if args.lines else by_function(read.stacks)
    if args.to == "text":
        text = top_functions_text(stacks, phase, args.top)
    elif args.to == "speedscope":
        per_slot = read.per_slot if args.lines else {k: by_function(v) for k, v in read.per_slot.items()}
        text = json.dumps(speedscope(per_slot, phase, rec.info.procs))
    else:
        text = flame_svg(stacks, f"marlwatch: {phase} ({rec.info.title()})")
    if args.out is None:
        print(text)
        warn_skipped(rec)
        return 0
    try:
        write_text(args.out, text + "\n", inputs=(rec.path,))
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    say(f"wrote {args.out} ({sum(stacks.values())} samples of '{phase}')")
    warn_skipped(rec)
    return 0


def iter_stack_rows(batches: Iterable[pa.RecordBatch]) -> Iterator[dict[str, Any]]:
    """Stack rows as dicts (for replay: the samples at their point in time)."""
    for b in batches:
        s = b.filter(pc.equal(b.column("kind"), STACK))
        yield from s.to_pylist()
