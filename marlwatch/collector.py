"""Turn telemetry frames and system samples into recording rows (Arrow record batches).

Monitor-side, no UI: the headless runner, the live app and the pipeline benchmark all use it.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa

from marlwatch.recording import CORE, COUNTER, EVENT, ITER, PROC, SCHEMA, SPAN
from marlwatch.sysstats import ProcSample
from marlwatch.wire import Batch

_STR = pa.string()


def _const(value: Any, n: int, type_: pa.DataType) -> pa.Array:
    return pa.repeat(pa.scalar(value, type_), n) if value is not None else pa.nulls(n, type_)


def _batch(n: int, **cols: pa.Array) -> pa.RecordBatch:
    arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in SCHEMA]
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


class ProcStream:
    """Decodes one process's batch frames: its phase-name table and its iteration count."""

    def __init__(self, slot: int, t_origin_ns: int) -> None:
        self.slot = slot
        self.t_origin_ns = t_origin_ns
        self.names: list[str] = []
        self._names_arr = pa.array([None], _STR)  # index -1 (root) maps to the trailing null
        self.iteration = 0
        self.last_tick_ns: int | None = None
        self.spans = 0

    def rows(self, b: Batch) -> pa.RecordBatch | None:
        if b.new_names:
            self.names.extend(b.new_names)
            self._names_arr = pa.array([*self.names, None], _STR)
        parts: list[pa.RecordBatch] = []
        n = len(b.ids)
        if n:
            if int(b.ids.max()) >= len(self.names) or int(b.parents.max()) >= len(self.names):
                raise ValueError("span refers to an unknown phase id")
            ids = np.where(b.ids < 0, len(self.names), b.ids)
            parents = np.where(b.parents < 0, len(self.names), b.parents)
            iters = b.first_iteration + np.searchsorted(b.ticks, b.t0, side="right")
            parts.append(
                _batch(
                    n,
                    kind=_const(SPAN, n, _STR),
                    proc=_const(self.slot, n, pa.int16()),
                    name=self._names_arr.take(pa.array(ids)),
                    parent=self._names_arr.take(pa.array(parents)),
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
                    kind=_const(ITER, k, _STR),
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
                    kind=_const(COUNTER, m, _STR),
                    proc=_const(self.slot, m, pa.int16()),
                    name=pa.array([c[0] for c in b.counters], _STR),
                    t_ns=pa.array([c[1] - self.t_origin_ns for c in b.counters], pa.int64()),
                    iter=_const(self.iteration, m, pa.int64()),
                    value=pa.array([c[2] for c in b.counters], pa.float64()),
                )
            )
        if not parts:
            return None
        if len(parts) == 1:
            return parts[0]
        return pa.Table.from_batches(parts, schema=SCHEMA).combine_chunks().to_batches()[0]


def core_rows(t_ns: int, utilisation: list[float], first: int = 0) -> pa.RecordBatch:
    """One row per core; a node's cores are numbered from its `first` (marlwatch.nodes)."""
    n = len(utilisation)
    return _batch(
        n,
        kind=_const(CORE, n, _STR),
        t_ns=_const(t_ns, n, pa.int64()),
        core=pa.array(range(first, first + n), pa.int16()),
        value=pa.array(utilisation, pa.float64()),
    )


def proc_rows(t_ns: int, samples: list[ProcSample]) -> pa.RecordBatch:
    n = 2 * len(samples)
    return _batch(
        n,
        kind=_const(PROC, n, _STR),
        proc=pa.array([s.slot for s in samples for _ in (0, 1)], pa.int16()),
        name=pa.array(["cpu_percent", "rss_bytes"] * len(samples), _STR),
        t_ns=_const(t_ns, n, pa.int64()),
        value=pa.array([v for s in samples for v in (s.cpu_percent, float(s.rss_bytes))], pa.float64()),
    )


def event_row(t_ns: int, slot: int | None, name: str, **detail: Any) -> pa.RecordBatch:
    return _batch(
        1,
        kind=pa.array([EVENT], _STR),
        proc=pa.array([slot], pa.int16()),
        name=pa.array([name], _STR),
        t_ns=pa.array([t_ns], pa.int64()),
        text=pa.array([json.dumps(detail)], _STR),
    )
