"""Turn telemetry frames and system samples into recording rows (Arrow record batches).

Monitor-side, no UI: the headless runner, the live app and the pipeline benchmark all use it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from marlwatch.recording import CORE, COUNTER, EVENT, ITER, KIND_TYPE, NAME_TYPE, PROC, SCHEMA, SPAN
from marlwatch.schema import one_batch
from marlwatch.sysstats import ProcSample
from marlwatch.wire import Batch

_STR = pa.string()


def _const(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    if value is None:
        return pa.nulls(n, type_)
    if pa.types.is_dictionary(type_):
        return pa.DictionaryArray.from_arrays(pa.array(np.zeros(n, np.int8), type_.index_type), pa.array([value], _STR))
    return pa.repeat(pa.scalar(value, type_), n)


def _kind(kind: str, n: int) -> pa.Array:
    return _const(kind, n, KIND_TYPE)


def _names(values: list[str | None]) -> pa.Array:
    return pa.array(values, NAME_TYPE)


def _batch(n: int, **cols: pa.Array) -> pa.RecordBatch:
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


class ProcStream:
    """Decodes one process's batch frames: its phase-name table and its iteration count.

    A frame is checked and taken in when it arrives (`add`); its rows are built when the monitor
    delivers (`take_rows`), all of the frames since then in one batch: building Arrow arrays
    costs a fixed ~0.1 ms a call, and three per frame, 12 frames a second, were a third of the
    headless monitor's CPU."""

    _KINDS = pa.array([SPAN, ITER, COUNTER], _STR)

    def __init__(self, slot: int, t_origin_ns: int) -> None:
        self.slot = slot
        self.t_origin_ns = t_origin_ns
        self.names: list[str] = []
        self.iteration = 0
        self.last_tick_ns: int | None = None
        self.spans = 0
        self.pending_rows = 0
        self._spans: list[tuple[np.ndarray, ...]] = []  # (ids, parents, t, dur, iter), origin applied
        self._ticks: list[tuple[np.ndarray, np.ndarray]] = []  # (t, iter)
        self._counters: list[tuple[str, int, int, float]] = []  # (name, t, iter, value)

    def add(self, b: Batch) -> int:
        """Take in one frame (ValueError if it names a phase it never declared); returns its rows."""
        n, k = len(b.ids), len(b.ticks)
        if n and (int(b.ids.max()) >= len(self.names) + len(b.new_names)
                  or int(b.parents.max()) >= len(self.names) + len(b.new_names)):
            raise ValueError("span refers to an unknown phase id")
        if b.new_names:
            self.names.extend(b.new_names)
        if n:
            iters = b.first_iteration + np.searchsorted(b.ticks, b.t0, side="right")
            self._spans.append((b.ids, b.parents, b.t0 - self.t_origin_ns, b.t1 - b.t0, iters))
            self.spans += n
        if k:
            self._ticks.append((b.ticks - self.t_origin_ns, np.arange(b.first_iteration + 1, b.first_iteration + k + 1)))
            self.iteration = b.first_iteration + k
            self.last_tick_ns = int(b.ticks[-1]) - self.t_origin_ns
        self._counters.extend((name, t - self.t_origin_ns, self.iteration, value) for name, t, value in b.counters)
        rows = n + k + len(b.counters)
        self.pending_rows += rows
        return rows

    def take_rows(self) -> pa.RecordBatch | None:
        """The rows of the frames taken in since the last call (spans, ticks, counters), or None."""
        if not self.pending_rows:
            return None
        spans = [np.concatenate(c) for c in zip(*self._spans, strict=True)] if self._spans else None
        ticks = [np.concatenate(c) for c in zip(*self._ticks, strict=True)] if self._ticks else None
        counters, self._spans, self._ticks, self._counters = self._counters, [], [], []
        self.pending_rows = 0
        n = len(spans[0]) if spans else 0
        k = len(ticks[0]) if ticks else 0
        m = len(counters)
        total = n + k + m
        # One dictionary for name and parent: the process's phase table, then its counters' names.
        names = list(self.names)
        index = {name: i for i, name in enumerate(names)}
        counter_codes = []
        for name, *_ in counters:
            if name not in index:
                index[name] = len(names)
                names.append(name)
            counter_codes.append(index[name])
        none = np.full(k, -1, np.int64)
        name_codes = np.concatenate([spans[0] if n else np.zeros(0, np.int64), none,
                                     np.array(counter_codes, np.int64)]).astype(np.int32)
        parent_codes = np.concatenate([spans[1] if n else np.zeros(0, np.int64), none,
                                       np.full(m, -1, np.int64)]).astype(np.int32)
        dictionary = pa.array(names, _STR)

        def phase(codes: np.ndarray) -> pa.Array:
            return pa.DictionaryArray.from_arrays(pa.array(codes, pa.int32(), mask=codes < 0), dictionary)

        kind = np.repeat(np.array([0, 1, 2], np.int8), [n, k, m])
        t = np.concatenate([spans[2] if n else np.zeros(0, np.int64), ticks[0] if k else np.zeros(0, np.int64),
                            np.array([c[1] for c in counters], np.int64)])
        it = np.concatenate([spans[4] if n else np.zeros(0, np.int64), ticks[1] if k else np.zeros(0, np.int64),
                             np.array([c[2] for c in counters], np.int64)])
        dur = np.concatenate([spans[3] if n else np.zeros(0, np.int64), np.zeros(k + m, np.int64)])
        value = np.concatenate([np.zeros(n + k), np.array([c[3] for c in counters], np.float64)])
        is_span = kind == 0
        return _batch(
            total,
            kind=pa.DictionaryArray.from_arrays(pa.array(kind, KIND_TYPE.index_type), self._KINDS),
            proc=_const(self.slot, total, pa.int16()),
            name=phase(name_codes),
            parent=phase(parent_codes),
            t_ns=pa.array(t),
            dur_ns=pa.array(dur, pa.int64(), mask=~is_span),
            iter=pa.array(it, pa.int64()),
            value=pa.array(value, pa.float64(), mask=kind != 2),
        )


class SystemSamples:
    """Core and process samples kept as plain numbers until `rows()` turns them into ONE batch.

    Building an Arrow batch costs about 0.1 ms whatever its rows; a batch per sample (two per
    sample at 10 Hz) was a third of the headless monitor's CPU. The monitor takes the rows once
    per delivery."""

    def __init__(self) -> None:
        self._clear()

    def _clear(self) -> None:
        self._core_t: list[int] = []
        self._core_first: list[int] = []
        self._core_values: list[list[float]] = []
        self._procs: list[tuple[int, list[ProcSample]]] = []

    def add_cores(self, t_ns: int, utilisation: list[float], first: int = 0) -> None:
        if utilisation:
            self._core_t.append(t_ns)
            self._core_first.append(first)
            self._core_values.append(utilisation)

    def add_procs(self, t_ns: int, samples: list[ProcSample]) -> None:
        if samples:
            self._procs.append((t_ns, samples))

    def rows(self) -> pa.RecordBatch | None:
        """The samples added since the last call as rows (core rows, then process rows), or None."""
        parts = []
        if self._core_t:
            counts = [len(v) for v in self._core_values]
            n = sum(counts)
            core = np.concatenate([np.arange(f, f + c) for f, c in zip(self._core_first, counts, strict=True)])
            parts.append(_batch(
                n,
                kind=_kind(CORE, n),
                t_ns=pa.array(np.repeat(np.array(self._core_t, np.int64), counts)),
                core=pa.array(core.astype(np.int16)),
                value=pa.array(np.fromiter((u for v in self._core_values for u in v), np.float64, n)),
            ))
        if self._procs:
            samples = [(t, s) for t, batch in self._procs for s in batch]
            n = 2 * len(samples)
            parts.append(_batch(
                n,
                kind=_kind(PROC, n),
                proc=pa.array(np.repeat(np.array([s.slot for _, s in samples], np.int16), 2)),
                name=_names(["cpu_percent", "rss_bytes"] * len(samples)),
                t_ns=pa.array(np.repeat(np.array([t for t, _ in samples], np.int64), 2)),
                value=pa.array([v for _, s in samples for v in (s.cpu_percent, float(s.rss_bytes))], pa.float64()),
            ))
        self._clear()
        return one_batch(parts)


def core_rows(t_ns: int, utilisation: list[float], first: int = 0) -> pa.RecordBatch:
    """One sample's rows: one per core; a node's cores are numbered from its `first` (marlwatch.nodes)."""
    samples = SystemSamples()
    samples.add_cores(t_ns, utilisation, first)
    rows = samples.rows()
    assert rows is not None, "a sample of no cores"
    return rows


def event_row(t_ns: int, slot: int | None, name: str, **detail: Any) -> pa.RecordBatch:
    return _batch(
        1,
        kind=_kind(EVENT, 1),
        proc=pa.array([slot], pa.int16()),
        name=_names([name]),
        t_ns=pa.array([t_ns], pa.int64()),
        text=pa.array([json.dumps(detail)], _STR),
    )
