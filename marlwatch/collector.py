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
    """Decodes one process's batch frames: its phase-name table and its iteration count."""

    def __init__(self, slot: int, t_origin_ns: int) -> None:
        self.slot = slot
        self.t_origin_ns = t_origin_ns
        self.names: list[str] = []
        self._names_arr = pa.array([], _STR)  # the dictionary of its span rows' name and parent
        self.iteration = 0
        self.last_tick_ns: int | None = None
        self.spans = 0

    def rows(self, b: Batch) -> pa.RecordBatch | None:
        if b.new_names:
            self.names.extend(b.new_names)
            self._names_arr = pa.array(self.names, _STR)
        parts: list[pa.RecordBatch] = []
        n = len(b.ids)
        if n:
            if int(b.ids.max()) >= len(self.names) or int(b.parents.max()) >= len(self.names):
                raise ValueError("span refers to an unknown phase id")
            iters = b.first_iteration + np.searchsorted(b.ticks, b.t0, side="right")
            # The process's phase table is the dictionary: no string is built per span.
            parts.append(
                _batch(
                    n,
                    kind=_kind(SPAN, n),
                    proc=_const(self.slot, n, pa.int16()),
                    name=self._phase(b.ids),
                    parent=self._phase(b.parents),
                    t_ns=pa.array(b.t0 - self.t_origin_ns),
                    dur_ns=pa.array(b.t1 - b.t0),
                    iter=pa.array(iters, pa.int64()),
                )
            )
            self.spans += n
        k = len(b.ticks)
        if k:
            parts.append(
                _batch(
                    k,
                    kind=_kind(ITER, k),
                    proc=_const(self.slot, k, pa.int16()),
                    t_ns=pa.array(b.ticks - self.t_origin_ns),
                    iter=pa.array(np.arange(b.first_iteration + 1, b.first_iteration + k + 1), pa.int64()),
                )
            )
            self.iteration = b.first_iteration + k
            self.last_tick_ns = int(b.ticks[-1]) - self.t_origin_ns
        if b.counters:
            m = len(b.counters)
            parts.append(
                _batch(
                    m,
                    kind=_kind(COUNTER, m),
                    proc=_const(self.slot, m, pa.int16()),
                    name=_names([c[0] for c in b.counters]),
                    t_ns=pa.array([c[1] - self.t_origin_ns for c in b.counters], pa.int64()),
                    iter=_const(self.iteration, m, pa.int64()),
                    value=pa.array([c[2] for c in b.counters], pa.float64()),
                )
            )
        return one_batch(parts)


    def _phase(self, ids: np.ndarray) -> pa.Array:
        """Phase ids (-1: none) as a dictionary array over the process's phase table."""
        return pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32(), mask=ids < 0), self._names_arr)


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
