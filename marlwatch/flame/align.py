"""Aligning py-spy's clock with the run's, and attributing each sample to the span it ran in."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from marlwatch.flame.pyspy import Samples
from marlwatch.recording import SCHEMA, STACK

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




def attribute(slot: int, samples: Samples, spans: Iterable[tuple[int, int, str, int, bool]], rate: float
              ) -> tuple[pa.RecordBatch, int, dict[str, float | None]]:
    """The `stack` rows of process `slot`'s samples, given its spans of the sampled window as
    (start_ns, dur_ns, name, iter, top_level): py-spy's clock shifted onto the run's, samples
    near a top-level phase change snapped into the phase their stack says, each attributed to
    its innermost span. Returns the rows, the unattributed count and how the clocks were aligned."""
    index = SpanIndex.build(spans)
    shift, agree, mapping = estimate_shift(samples, index, index.top)
    samples.t_ns += shift
    snapped = snap_to_loop_phase(samples, index, mapping, max(SNAP_NS, int(1e9 / rate)))
    order = np.argsort(samples.t_ns, kind="stable")
    samples = Samples(samples.t_ns[order], [samples.stacks[i] for i in order])
    batch, lost = stack_rows(slot, samples, index, rate)
    alignment = {"shift_ms": shift / 1e6, "agreement": None if math.isnan(agree) else agree, "snapped": snapped}
    return batch, lost, alignment
